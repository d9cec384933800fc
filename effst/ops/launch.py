"""Cached Triton launches: every effst op launches its kernels through :func:`launch`.

``kernel[grid](...)`` (``JITFunction.run``) binds and specialises every argument, builds a
cache key and looks the compiled kernel up on every launch: 11-27 µs of Python per launch.
Within one launch plan (an op's per-shape launch parameters) almost all of that is fixed, so
the plan keeps the ``CompiledKernel`` that ``kernel[grid](...)`` returned, per specialisation,
in a dict, and later launches call ``CompiledKernel.run`` with the same arguments, exactly as
``JITFunction.run`` does at its end.

What ``JITFunction.run`` specialises (triton 3.6, ``runtime/jit.py`` and
``native_specialize_impl``), hence what the cache key must fix:

- every constexpr's value, and the compile options (``num_warps``, ``num_stages``, Triton's
  debug setting, its instrumentation mode);
- each tensor's dtype (``*fp16``, ``*u8``, ...) and whether its data pointer is 16-byte aligned;
- each int: equal to 1 (then a constexpr), divisible by 16, and its type (i32, i64, u64);
- the current device (compiled kernels are loaded per device).

The key :func:`launch` builds is ``(caller's key, device, debug, instrumentation mode)``; the
caller's key, together with the plan that owns the cache dict, must fix the rest: the
constexprs and options (plan fields, or flags in the key), every pointer's dtype, and
:func:`int_key` of every int the plan does not fix. Only launches whose caller-supplied
pointers are all 16-byte aligned use the cache (fresh allocations always are: PyTorch's
allocators align to at least 64 bytes, so a plan's own buffers need no check). Anything else
goes through ``kernel[grid](...)``: a launch off alignment, the first launch of a key, the
interpreter (``TRITON_INTERPRET=1``: the kernels are not JITFunctions), a kernel with pre-run
hooks, active launch enter/exit hooks (a profiler installs some), and a disabled cache.

Switches (read at import): ``EFFST_LAUNCH_CACHE=0`` sends every effst launch through
``kernel[grid]``; each op also has its own (``EFFST_SLIF_LAUNCH_CACHE=0``,
``EFFST_BSL_LAUNCH_CACHE=0``), see :func:`switch`.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import triton.language as tl
from triton import knobs as _triton_knobs
from triton.knobs import HookChain as _HookChain
from triton.runtime.jit import JITFunction as _JITFunction

#: EFFST_LAUNCH_CACHE=0 turns every op's cache off.
ENABLED = os.environ.get("EFFST_LAUNCH_CACHE", "1") != "0"
_driver_calls: Optional[tuple] = None


def switch(name: str) -> bool:
    """An op's cache switch: on unless ``EFFST_LAUNCH_CACHE=0`` or the environment variable
    ``name`` is ``0``."""
    return ENABLED and os.environ.get(name, "1") != "0"


def constexpr_names(kernel) -> tuple[str, ...]:
    """The names of ``kernel``'s constexpr parameters in signature order (a JITFunction or the
    interpreter's stand-in; annotations may be strings)."""
    parameters = inspect.signature(kernel.fn).parameters
    return tuple(name for name, p in parameters.items()
                 if p.annotation is tl.constexpr or p.annotation == "tl.constexpr")


def _cacheable(kernel) -> bool:
    """A real JITFunction (not the interpreter's) without pre-run hooks."""
    return isinstance(kernel, _JITFunction) and not kernel.pre_run_hooks


def _device_and_stream() -> tuple:
    """The current device and its stream, as JITFunction.run gets them."""
    global _driver_calls
    if _driver_calls is None:
        from triton.runtime import driver

        _driver_calls = (driver.active.get_current_device, driver.active.get_current_stream)
    device = _driver_calls[0]()
    return device, _driver_calls[1](device)


def _launch_hooks_idle() -> bool:
    """No launch enter/exit hooks are installed (a profiler would install some)."""
    runtime = _triton_knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and (not isinstance(hook, _HookChain) or hook.calls):
            return False
    return True


def int_key(value: int) -> tuple:
    """Triton's specialisation of an int argument: ``(== 1, divisible by 16, type)``, the type
    0 for i32, 1 for i64, 2 for u64 (truthy: needs 64 bits)."""
    return (value == 1, value % 16 == 0,
            0 if -2**31 <= value < 2**31 else (1 if -2**63 <= value < 2**63 else 2))


def _aligned(tensors: tuple) -> bool:
    """Every tensor's data pointer is 16-byte aligned."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits % 16 == 0


def launch(kernel, grid: tuple, cache: Optional[dict], key: tuple, args: tuple, constexprs: dict,
           options: dict, foreign: tuple) -> None:
    """``kernel[grid](*args, **constexprs, **options)``, through ``cache`` when it can.

    ``grid``: three ints. ``args``: the kernel's runtime arguments (tensors and ints) in its
    signature order, all before its constexprs; ``constexprs``: every constexpr, in signature
    order (:func:`constexpr_names`), as ``CompiledKernel.run`` takes all arguments positionally;
    ``options``: compile options (``num_warps``, ``num_stages``). ``cache``: the owning plan's
    dict of compiled kernels, or None (the cache is off: always the JIT). ``key``: what, beyond
    the plan, identifies the specialisation (module doc). ``foreign``: the pointers the caller
    passed in (alignment checked); the others are fresh allocations or 16-value-aligned parts
    of one.
    """
    if cache is not None and _cacheable(kernel) and _aligned(foreign):
        device, stream = _device_and_stream()
        key = (key, device, _triton_knobs.runtime.debug,
               _triton_knobs.compilation.instrumentation_mode)
        compiled = cache.get(key)
        if compiled is not None and _launch_hooks_idle():
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *constexprs.values())
            return
        compiled = kernel[grid](*args, **constexprs, **options)
        if compiled is not None and hasattr(compiled, "packed_metadata"):
            cache[key] = compiled
        return
    kernel[grid](*args, **constexprs, **options)


__all__ = ["ENABLED", "switch", "launch", "int_key", "constexpr_names"]
