"""Native sLIF backend: the C++ CPU kernel and the hand-written CUDA kernel (issue 3).

The kernels live outside the package (``kernels/`` holds the torch-free recurrence and CUDA
kernels, ``csrc/`` the torch op registration and the CPU kernel) and are compiled into one
library that registers ``torch.ops.effst_native.slif_forward`` / ``slif_backward``. Two ways
to get it, tried in this order:

1. Ahead of time: ``EFFST_BUILD_NATIVE=1 pip install --no-build-isolation -e .`` builds the
   module ``effst._native`` (used unless its recorded source hash differs from the sources).
2. On first use: :func:`torch.utils.cpp_extension.load` compiles the sources with ninja into
   ``$EFFST_CACHE_DIR/native`` (default ``~/.cache/effst/native``), one folder per torch,
   Python and CUDA version; it rebuilds only when a source or flag changes. Prebuild with
   ``python -m effst.ops.slif_native``.

``EFFST_NATIVE_DISABLE=1`` turns the backend off (to exercise the fallback);
``EFFST_NATIVE_CUDA=0`` builds without the CUDA kernels (they are built when torch has CUDA
and a CUDA toolkit is found; if they fail to compile, the CPU kernel is built alone, with a
warning saying why);
``EFFST_NATIVE_VERBOSE=1`` shows the compiler output; ``EFFST_NATIVE_CPU_ISA=baseline|avx2``
forces one of the two CPU kernel builds (default: AVX2 where the CPU has it);
``EFFST_NATIVE_CPU_STREAM=0|1`` forces plain or streaming stores of the outputs (default:
streaming for outputs of 8 MiB and up); ``EFFST_NATIVE_CPU_BLOCK=<n>`` sets the neurons per
work item (tuning; default about 8192 / T).

:func:`slif_forward_native` and :func:`slif_backward_native` implement the internal kernel
contract of :mod:`effst.ops.slif` on the ``[T, N]`` view (:mod:`effst.ops.layout`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "native_status",
    "native_build_info",
    "slif_forward_native",
    "slif_backward_native",
    "native_surrogate_grad",
    "cache_dir",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_AOT_MODULE = "effst._native"
_AOT_HASH_FILE = "_native.sha1"  # written next to the built module by setup.py

_lock = threading.Lock()
_status: Optional[tuple[bool, str]] = None
_cuda_note = ""  # why the loaded library has no CUDA kernels, when it has none


def _build_config():
    """csrc/build_config.py, loaded by path (it is not part of the installed package)."""
    path = _REPO_ROOT / "csrc" / "build_config.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("effst_native_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_dir(with_cuda: Optional[bool] = None) -> Path:
    """Where the on-first-use build goes: one folder per torch / Python / CUDA combination."""
    root = Path(os.environ.get("EFFST_CACHE_DIR") or Path.home() / ".cache" / "effst") / "native"
    if with_cuda is None:
        with_cuda = _want_cuda()
    cuda = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{cuda}"
    config = _build_config()
    if config is not None and config.sources_present():
        # One folder per source version too: two checkouts (or a checkout and its fresh clone)
        # must never rebuild the library in place while another process has it loaded.
        where = hashlib.sha1(f"{config.ROOT}:{config.source_hash()}".encode()).hexdigest()[:12]
        tag += f"-src{where}"
    return root / tag.replace("+", "_")


def _want_cuda() -> bool:
    """Build the CUDA kernels when torch has CUDA and a CUDA toolkit (nvcc) is installed."""
    if not torch.version.cuda or os.environ.get("EFFST_NATIVE_CUDA", "1") == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _ops_registered() -> bool:
    try:
        torch.ops.effst_native.build_info
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_ahead_of_time(config) -> Optional[str]:
    """Import effst._native if it exists and is not stale; returns a note when it was skipped."""
    spec = importlib.util.find_spec(_AOT_MODULE)
    if spec is None or spec.origin is None:
        return None
    if config is not None and config.sources_present():
        recorded = Path(spec.origin).with_name(_AOT_HASH_FILE)
        current = config.source_hash()
        if not recorded.is_file() or recorded.read_text().strip() != current:
            return (f"the ahead-of-time build {spec.origin} is stale (built from other sources); "
                    "rebuilding on first use instead (rerun EFFST_BUILD_NATIVE=1 pip install "
                    "--no-build-isolation -e . to refresh it)")
    importlib.import_module(_AOT_MODULE)
    return None


def _build_on_first_use(config) -> None:
    """Compile and load the library; without CUDA kernels if those fail to build."""
    global _cuda_note
    if not _want_cuda():
        _cuda_note = ("torch has no CUDA" if not torch.version.cuda else
                      "no CUDA toolkit (nvcc, CUDA_HOME) was found, or EFFST_NATIVE_CUDA=0")
        _build(config, with_cuda=False)
        return
    try:
        _build(config, with_cuda=True)
    except Exception as error:  # e.g. nvcc too old/new for this torch: keep the CPU kernel
        _cuda_note = f"compiling the CUDA kernels failed: {_summarize_error(error)}"
        warnings.warn(f"effst: {_cuda_note}; building the native CPU kernel only", stacklevel=4)
        _build(config, with_cuda=False)


def ninja_dir() -> Optional[Path]:
    """The folder of the ninja that builds the extension, preferring this interpreter's own.

    Order: the bin folder next to ``sys.executable`` (a venv used without activation), the
    ``ninja`` Python package's binary, then whatever PATH offers. None when there is none.
    """
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the pip package; its BIN_DIR holds the binary

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        found = shutil.which("ninja", path=str(folder))
        if found:
            return Path(found).parent
    found = shutil.which("ninja")
    return Path(found).parent if found else None


class _NinjaOnPath:
    """Put :func:`ninja_dir` first on PATH while torch's build runs (it calls plain ``ninja``)."""

    def __enter__(self):
        self.saved = os.environ.get("PATH")
        folder = ninja_dir()
        if folder is not None:
            os.environ["PATH"] = os.pathsep.join([str(folder)] + ([self.saved] if self.saved else []))
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = self.saved


def _build(config, with_cuda: bool) -> None:
    import time

    from torch.utils import cpp_extension

    sources = list(config.CPU_SOURCES) + (list(config.CUDA_SOURCES) if with_cuda else [])
    build_dir = cache_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    defines = config.defines(with_cuda=with_cuda, python_module=False)
    fresh = not any(build_dir.glob("effst_native*.so"))
    if fresh:  # a first build takes a minute or two: say so once, instead of going quiet
        print(f"effst: compiling the native sLIF extension ({'CPU + CUDA' if with_cuda else 'CPU'}"
              f" kernels) into {build_dir} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with _NinjaOnPath():
        _load_with_cpp_extension(cpp_extension, config, sources, build_dir, defines, with_cuda)
    if fresh:
        print(f"effst: native sLIF extension built in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)


def _load_with_cpp_extension(cpp_extension, config, sources, build_dir, defines, with_cuda):
    cpp_extension.load(
        name="effst_native",
        sources=[str(config.ROOT / s) for s in sources],
        extra_cflags=list(config.CXX_FLAGS) + defines,
        extra_ldflags=list(config.LD_FLAGS),
        extra_cuda_cflags=list(config.NVCC_FLAGS) + defines if with_cuda else None,
        extra_include_paths=[str(config.ROOT / "kernels")],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("EFFST_NATIVE_VERBOSE", "0") == "1",
    )


def _summarize_error(error: Exception) -> str:
    """The compiler's error lines (else the last lines) of a failed build, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "ninja: build stopped" not in line]
    chosen = errors[:4] if errors else lines[-6:]
    return " | ".join(chosen) if chosen else type(error).__name__


def _missing_tool() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r} on PATH; set CXX or install g++)"
    if ninja_dir() is None:
        return (f"ninja is not installed (looked next to {sys.executable}, in the ninja Python "
                "package and on PATH; pip install ninja)")
    return None


def _load() -> tuple[bool, str]:
    if os.environ.get("EFFST_NATIVE_DISABLE", "0") == "1":
        return False, "disabled by EFFST_NATIVE_DISABLE=1"
    if _ops_registered():
        return True, ""
    config = _build_config()
    try:
        note = _load_ahead_of_time(config)
    except (ImportError, OSError) as error:
        note = f"the ahead-of-time build {_AOT_MODULE} failed to load ({error}); building on first use"
    if note is not None:
        warnings.warn(f"effst: {note}", stacklevel=3)
    if _ops_registered():
        return True, ""
    if config is None or not config.sources_present():
        return False, ("the native sources (csrc/, kernels/) are not next to the package and no "
                       "ahead-of-time build effst._native is installed; install from a clone with "
                       "EFFST_BUILD_NATIVE=1 pip install --no-build-isolation -e .")
    missing = _missing_tool()
    if missing is not None:
        return False, missing
    try:
        _build_on_first_use(config)
    except Exception as error:  # a failed compile is a reason to report, not a crash
        tail = _summarize_error(error)
        return False, (f"building the extension in {cache_dir()} failed: {tail} "
                       "(EFFST_NATIVE_VERBOSE=1 shows the compiler output)")
    if not _ops_registered():
        return False, "the extension was built but registered no effst_native ops"
    return True, ""


def native_status() -> tuple[bool, str]:
    """Whether the native backend can run, building or loading it on the first call.

    Returns ``(True, "")`` or ``(False, reason)``; the answer is cached for the process.
    """
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
    return _status


def _require() -> None:
    ok, reason = native_status()
    if not ok:
        raise RuntimeError(f"effst native sLIF extension unavailable: {reason}")


_build_info: Optional[dict] = None


def native_build_info() -> dict[str, str]:
    """Facts about the loaded library: source_hash, cuda ('0'/'1'), cpu_isa ('avx2'/'baseline').

    Read from the library once per process (it cannot change while loaded).
    """
    global _build_info
    if _build_info is None:
        _require()
        info = torch.ops.effst_native.build_info()
        _build_info = dict(item.split("=", 1) for item in info.split(";"))
    return dict(_build_info)


def require_device_support(device: torch.device) -> None:
    """Raise unless the loaded library has kernels for ``device`` (CPU always; CUDA if built)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if native_build_info()["cuda"] != "1":
            raise RuntimeError(
                "backend='native' on a CUDA tensor: the extension was built without CUDA "
                f"kernels ({_cuda_note or 'the ahead-of-time build was made without CUDA'}); "
                "use backend='triton'")
        return
    raise RuntimeError(f"backend='native': expected a CPU or CUDA tensor, got {device}")


def _check_device(x2d: torch.Tensor) -> None:
    require_device_support(x2d.device)


def slif_forward_native(
    x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sLIF forward over ``x2d [T, N]``: returns ``(spikes [T, N] in x.dtype, v_final [N])``.

    ``w`` / ``theta`` are ``[w_channels]`` / ``[theta_channels]`` in the compute dtype
    (float64 for float64 x, else float32); neuron n uses entry ``(n // inner) % channels``.
    """
    _require()
    _check_device(x2d)
    return torch.ops.effst_native.slif_forward(
        x2d, w, theta, v_init, int(w_channels), int(w_inner), int(theta_channels),
        int(theta_inner), None if v_reset is None else float(v_reset), int(surrogate_id),
        float(alpha), bool(detach_reset), bool(decay_input))


def slif_backward_native(
    grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor], x2d: torch.Tensor,
    w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sLIF backward: ``(grad_x [T, N] x.dtype, grad_w [N], grad_theta [N], grad_v_init)``.

    Parameter gradients are per neuron (summed over T; ``grad_w`` is w.r.t. the logit w) in
    the compute dtype; reduce them with :func:`effst.ops.layout.reduce_to_parameter`.
    ``grad_v_init`` is ``[N]`` when ``v_init`` is given, else a ``[1]`` zero placeholder (as the
    Triton backend returns). ``grad_v_final=None`` means a zero final-state gradient.
    """
    _require()
    _check_device(x2d)
    return torch.ops.effst_native.slif_backward(
        grad_spikes, grad_v_final, x2d, w, theta, v_init, int(w_channels), int(w_inner),
        int(theta_channels), int(theta_inner), None if v_reset is None else float(v_reset),
        int(surrogate_id), float(alpha), bool(detach_reset), bool(decay_input))


def native_surrogate_grad(x: torch.Tensor, surrogate: str, alpha: Optional[float] = None) -> torch.Tensor:
    """sigma'(x) as the native header computes it (CPU, float32/float64); for tests."""
    from effst.ops.surrogates import resolve_surrogate

    surrogate_id, alpha = resolve_surrogate(surrogate, alpha)
    _require()
    return torch.ops.effst_native.surrogate_grad(x, surrogate_id, alpha)


if __name__ == "__main__":  # python -m effst.ops.slif_native: build (or load) and report
    ok, reason = native_status()
    if not ok:
        print(f"effst native extension: unavailable: {reason}", file=sys.stderr)
        sys.exit(1)
    print(f"effst native extension: ready ({native_build_info()}; cache {cache_dir()})")
