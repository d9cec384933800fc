"""Packaging. The default build is pure Python: the native sLIF extension is then compiled on
first use by torch.utils.cpp_extension.load into a cache (see effst/ops/slif_native.py).

Set EFFST_BUILD_NATIVE=1 to compile it ahead of time as the module ``effst._native``:

    EFFST_BUILD_NATIVE=1 pip install --no-build-isolation -e .

(``--no-build-isolation`` so the build uses the installed torch.) The CUDA kernels are
included when torch has CUDA and a CUDA toolkit is found; EFFST_NATIVE_CUDA=0 leaves them out.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
ext_modules = []
cmdclass = {}

if os.environ.get("EFFST_BUILD_NATIVE", "0") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("effst_native_build_config", ROOT / "csrc" / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)

    with_cuda = (bool(torch.version.cuda) and CUDA_HOME is not None
                 and os.environ.get("EFFST_NATIVE_CUDA", "1") != "0")
    sources = list(config.CPU_SOURCES) + (list(config.CUDA_SOURCES) if with_cuda else [])
    defines = config.defines(with_cuda=with_cuda, python_module=True)
    compile_args = {"cxx": list(config.CXX_FLAGS) + defines}
    if with_cuda:
        compile_args["nvcc"] = list(config.NVCC_FLAGS) + defines
    extension_type = CUDAExtension if with_cuda else CppExtension
    ext_modules = [extension_type(
        name="effst._native",
        sources=sources,
        extra_compile_args=compile_args,
        extra_link_args=list(config.LD_FLAGS),
    )]

    class BuildNative(BuildExtension):
        """Builds with ninja and records the source hash next to the module, so that
        effst.ops.slif_native can tell a stale ahead-of-time build from a current one."""

        def run(self):
            super().run()
            for ext in self.extensions:
                built = Path(self.get_ext_fullpath(ext.name))
                built.with_name("_native.sha1").write_text(config.source_hash() + "\n")

    cmdclass = {"build_ext": BuildNative.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
