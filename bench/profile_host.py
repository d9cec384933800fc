"""Where the host time of a tiny effst call goes, on a GPU machine (bench/gpu_check.sh runs it).

    python bench/profile_host.py [--calls 300]
    python bench/profile_host.py --mock-launch [--calls 3000]   # any machine, CPU tensors

For x = [4, 64, 64] fp32 on CUDA: the eager time per forward+backward call (``calls`` back to
back, synchronised at the end) of effst SLIF and LIF (Triton and native CUDA backends; SLIF
also with every launch through ``kernel[grid]``, EFFST_SLIF_LAUNCH_CACHE=0's path), the
PyTorch baseline ``sigmoid(x * w + b)``, a bare launch of an empty Triton kernel and a bare
``torch.empty``; then cProfile's top functions and the profiler's top CPU ops for SLIF; the
native CUDA backend last (its first call may build the extension). Prints
text only (it goes into gpu_check.log); the figures are host cost, not kernel time.

``--mock-launch`` measures effst's own Python per Triton-path call on any machine: CPU tensors,
``backend='triton'``, with both sLIF kernels replaced by no-op stand-ins (the first launch of a
specialisation goes through a stand-in of ``kernel[grid](...)``, which returns a stand-in
compiled kernel; later ones through that object's ``run``, as on a GPU). It times forward +
backward of x = [4, 64, 64] (nothing is computed,
so this is host cost) in fp32 and fp16: SLIF (per channel) with ``autograd.grad`` of x, w and
theta, with ``.backward()``, and with the gradient of x alone; PLIF and LIF with all their
gradients. Then cProfile's top functions and the profiler's CPU ops for the first SLIF row.
Triton's own launch cost (``JITFunction.run``'s binder, the C launcher) is not in it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import triton
import triton.language as tl

from effst.nn import LIF, SLIF


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.load(x_ptr + offs, mask=offs < n)


def per_call_us(call, calls: int) -> float:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def neuron_call(module, x, grad):
    params = list(module.parameters())

    def call():
        module.reset()
        return torch.autograd.grad(module(x), [x, *params], grad)
    return call


class _MockCompiled:
    """Stands in for a CompiledKernel: ``run`` takes the launcher's arguments and does nothing."""

    function = None
    packed_metadata = None

    def __init__(self):
        self.runs = 0

    def run(self, *args):
        self.runs += 1


class _MockKernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, **constexprs)`` launches nothing."""

    def __init__(self):
        self.jit_launches = 0
        self.compiled = _MockCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_launches += 1
            return self.compiled
        return launch


def _median_us(call, calls: int, rounds: int = 7) -> tuple[float, float]:
    """Median over ``rounds`` of the wall time and of this thread's CPU time per call (µs).
    The CPU time leaves out the time other processes hold the core (a loaded machine)."""
    for _ in range(50):
        call()
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            call()
        cpu.append((time.thread_time() - start_cpu) / calls * 1e6)
        wall.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(wall), statistics.median(cpu)


def _backward_call(module, x, grad):
    """Training-loop form: forward, ``.backward()`` into fresh ``.grad`` (zero_grad sets None)."""
    params = list(module.parameters())

    def call():
        module.reset()
        for p in (x, *params):
            p.grad = None
        module(x).backward(grad)
    return call


def _grad_x_call(module, x, grad):
    """Only the input's gradient asked for (parameters learnable but not wanted)."""
    def call():
        module.reset()
        return torch.autograd.grad(module(x), [x], grad)
    return call


def mock_launch(calls: int) -> int:
    """effst's Python per Triton-path call, kernels replaced by no-ops (any machine)."""
    import effst.ops.slif as slif_ops
    from effst.nn import PLIF

    os.environ["TRITON_INTERPRET"] = "1"  # lets backend='triton' take CPU tensors; nothing is interpreted
    kernels = {"slif_forward_kernel": _MockKernel(), "slif_backward_kernel": _MockKernel()}
    for name, mock in kernels.items():
        setattr(slif_ops, name, mock)
    from effst.ops import launch as launch_ops  # the cached-launch path, as it runs on a GPU

    launch_ops._cacheable = lambda kernel: True
    launch_ops._device_and_stream = lambda: (0, 0)
    torch.set_num_threads(1)
    cases = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(4, 64, 64, dtype=dtype, requires_grad=True)
        grad = torch.ones_like(x)
        name = "fp32" if dtype == torch.float32 else "fp16"
        cases.update({
            f"SLIF {name} grad(x, w, theta)": neuron_call(SLIF(channels=64, backend="triton"), x, grad),
            f"SLIF {name} .backward()": _backward_call(SLIF(channels=64, backend="triton"), x, grad),
            f"SLIF {name} grad(x) only": _grad_x_call(SLIF(channels=64, backend="triton"), x, grad),
            f"PLIF {name} grad(x, w)": neuron_call(PLIF(backend="triton"), x, grad),
            f"LIF {name} grad(x)": neuron_call(LIF(backend="triton"), x, grad),
        })
    print(f"profile_host --mock-launch: CPU, torch {torch.__version__}, triton {triton.__version__}, "
          f"1 thread, x = [4, 64, 64] (SLIF per channel, PLIF/LIF per layer), effst Triton path "
          f"with mocked launches, median of 7 rounds of {calls} calls, load average "
          f"{os.getloadavg()[0]:.2f}")
    for name, call in cases.items():
        wall, cpu = _median_us(call, calls)
        print(f"  {name:40s} {wall:9.1f} us/call wall {cpu:9.1f} us/call CPU")
    print("  launches: " + ", ".join(f"{name}: {mock.jit_launches} through kernel[grid], "
                                     f"{mock.compiled.runs} through CompiledKernel.run"
                                     for name, mock in kernels.items()))
    print_profiles(cases["SLIF fp32 grad(x, w, theta)"], "mocked SLIF fp32 grad(x, w, theta)", calls,
                   profiler_calls=200, functions=20, characters=5000)
    return 0


def print_profiles(call, what: str, calls: int, profiler_calls: int, functions: int,
                   characters: int, sync=lambda: None) -> None:
    """cProfile of ``calls`` calls (the ``functions`` costliest by own time) and torch.profiler's
    CPU-op table of ``profiler_calls`` calls; ``sync`` ends each batch (the GPU's queue)."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        call()
    sync()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(functions)
    print(f"cProfile, {calls} {what} calls, by own time:")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:characters])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(profiler_calls):
            call()
        sync()
    print(f"torch.profiler, {profiler_calls} {what} calls, CPU ops by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def _jit_launches(call):
    """``call`` with effst's cached launches off (every launch through ``kernel[grid]``)."""
    import effst.ops.slif as slif_ops

    def run():
        before = slif_ops.LAUNCH_CACHE  # (EFFST_SLIF_LAUNCH_CACHE=0 must stay off for the other rows)
        slif_ops.LAUNCH_CACHE = False
        try:
            return call()
        finally:
            slif_ops.LAUNCH_CACHE = before
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=None,
                        help="calls per measurement (default 300; 3000 with --mock-launch)")
    parser.add_argument("--mock-launch", action="store_true",
                        help="time effst's Python per Triton-path call with the kernels replaced "
                             "by no-ops, on CPU tensors (runs on any machine)")
    args = parser.parse_args()
    if args.mock_launch:
        return mock_launch(args.calls or 3000)
    calls = args.calls or 300
    if not torch.cuda.is_available():
        print("profile_host: no CUDA device; nothing to do")
        return 0
    device = "cuda"
    x = torch.randn(4, 64, 64, device=device, requires_grad=True)
    grad = torch.ones_like(x)
    w = torch.zeros(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    buffer = torch.zeros(64, device=device)
    cases = {
        "baseline sigmoid(x*w+b) fwd+grad": lambda: torch.autograd.grad(torch.sigmoid(x * w + b), [x, w, b], grad),
        "effst SLIF triton fwd+grad": neuron_call(SLIF(channels=64, backend="triton").to(device), x, grad),
        "effst SLIF triton, JITFunction launches": _jit_launches(
            neuron_call(SLIF(channels=64, backend="triton").to(device), x, grad)),
        "effst LIF triton fwd+grad": neuron_call(LIF(backend="triton").to(device), x, grad),
        "empty Triton kernel launch": lambda: _empty_kernel[(1,)](buffer, 64, BLOCK=64),
        "torch.empty(64)": lambda: torch.empty(64, device=device),
        "torch.add (1 kernel)": lambda: buffer.add(1.0),
    }
    print(f"profile_host: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, call in cases.items():
        try:
            print(f"  {name:40s} {per_call_us(call, calls):9.1f} us/call")
        except Exception as error:  # report and go on
            print(f"  {name:40s} ERROR {type(error).__name__}: {str(error)[:200]}")
    print_profiles(cases["effst SLIF triton fwd+grad"], "SLIF triton", calls, profiler_calls=50,
                   functions=25, characters=6000, sync=torch.cuda.synchronize)
    # last: the first native call may build the CUDA extension (a minute where it is not cached)
    native = neuron_call(SLIF(channels=64, backend="native").to(device), x, grad)
    print(f"  {'effst SLIF native fwd+grad':40s} {per_call_us(native, calls):9.1f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
