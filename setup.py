"""Packaging. Set EFFST_BUILD_NATIVE=1 to compile the native extension ahead of time
(otherwise it is compiled on first use by torch.utils.cpp_extension.load into a cache)."""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("EFFST_BUILD_NATIVE", "0") == "1":
    from effst_native_build import native_extension  # noqa: E402  (provided by the native build)

    ext_modules, cmdclass = native_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
