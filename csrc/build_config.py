"""What the native extension is built from, and with which flags: the one list that the
on-first-use build (effst/ops/slif_native.py) and the ahead-of-time build (setup.py) share.

Deliberately free of torch and effst imports so setup.py can load it by path.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sources compiled into the extension, relative to the repository root.
CPU_SOURCES = (
    "csrc/slif_ops.cpp",
    "csrc/slif_autograd.cpp",
    "csrc/slif_cpu.cpp",
    "csrc/slif_cpu_isa_baseline.cpp",
    "csrc/slif_cpu_isa_avx2.cpp",
)
CUDA_SOURCES = (
    "csrc/slif_cuda_ops.cpp",
    "kernels/slif_cuda.cu",
)
# Everything whose content changes the binary (sources and headers).
HASHED_GLOBS = ("csrc/*.cpp", "csrc/*.h", "kernels/*.cuh", "kernels/*.cu", "csrc/build_config.py")

# Portable flags: no -march=native, so a cached or installed build can move between machines
# (AVX2 kernels are compiled separately and chosen at run time). OpenMP makes
# at::parallel_for use torch's thread pool (without it ATen's inline parallel_for runs serially).
# -fno-trapping-math: lets GCC if-convert (vectorise) the reset's and surrogate's selects; it
# changes no result, only whether FP exceptions are raised precisely (nothing here traps).
CXX_FLAGS = ("-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-Wno-psabi")  # -g0: setuptools adds -g (3x compile time)
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "-std=c++17")


def source_hash() -> str:
    """SHA-1 (16 hex digits) over the content of every native source, header and this file."""
    digest = hashlib.sha1()
    for pattern in HASHED_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sources_present() -> bool:
    """True when the native sources are next to the package (a clone / editable install)."""
    return all((ROOT / s).is_file() for s in CPU_SOURCES + CUDA_SOURCES)


def defines(with_cuda: bool, python_module: bool) -> list[str]:
    """Preprocessor flags: source hash (reported by build_info), CUDA switch, module init."""
    flags = [f"-DEFFST_SOURCE_HASH={source_hash()}", f"-DEFFST_WITH_CUDA={int(with_cuda)}"]
    if python_module:
        flags.append("-DEFFST_PYTHON_MODULE")
    return flags
