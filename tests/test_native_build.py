"""The native extension builds every documented way, from the clone, with nothing by hand:

* CMake against libtorch (`find_package(Torch)`) plus the C++ tests, run by ctest; with a CUDA
  compiler present the CUDA kernels and their test are compiled for sm_80 and sm_90 too;
* nvcc alone compiles the torch-free CUDA kernels with the flags torch extensions use;
* the CUDA op glue (csrc/slif_cuda_ops.cpp) compiles against this torch's headers;
* the ahead-of-time build (`EFFST_BUILD_NATIVE=1`, setup.py) produces an importable
  `effst._native` whose recorded source hash matches the sources.

Build folders live next to the on-first-use cache ($EFFST_CACHE_DIR or ~/.cache/effst), so a
second run only recompiles what changed. A missing cmake or nvcc skips its test, saying so.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effst.ops import slif_native

REPO = Path(__file__).resolve().parents[1]


def _build_dir(kind: str) -> Path:
    base = slif_native.cache_dir()
    path = base.with_name(f"{base.name}-{kind}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_tool_or_header(relative: str) -> Path | None:
    """A file of the CUDA toolkit (e.g. 'bin/cuobjdump', 'include/cuda_runtime_api.h')."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _nvcc()
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in homes:
        if home and (Path(home) / relative).is_file():
            return Path(home) / relative
    return None


def _ninja() -> str | None:
    folder = slif_native.ninja_dir()  # the same ninja the on-first-use build uses
    if folder is not None:
        return str(folder / "ninja")
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the pip package ships the binary
    except ImportError:
        return None
    candidate = Path(ninja.BIN_DIR) / "ninja"
    return str(candidate) if candidate.is_file() else None


def _run(cmd, cwd=None, timeout=900, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{tail}"
    return out.stdout + out.stderr


def test_cmake_build_and_ctest():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed: the CMake build and ctest cannot run here")
    build = _build_dir("cmake")
    configure = [cmake, "-S", str(REPO), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"]
    ninja = _ninja()
    if ninja and not (build / "CMakeCache.txt").is_file():
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    nvcc = _nvcc()
    if nvcc:
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    _run(configure)
    _run([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 2)])
    if nvcc:
        # the CUDA part must have been built: kernels library and the CUDA kernel test
        cache = (build / "CMakeCache.txt").read_text()
        assert "CMAKE_CUDA_COMPILER:" in cache and (build / "test_cuda_kernels").is_file(), \
            "nvcc is present but CMake did not build the CUDA kernels"
        cuobjdump = shutil.which("cuobjdump") or _cuda_tool_or_header("bin/cuobjdump")
        if cuobjdump:
            listing = _run([str(cuobjdump), "--list-elf", str(build / "libeffst_slif_cuda_kernels.a")])
            assert "sm_80" in listing and "sm_90" in listing, listing
    ctest = Path(cmake).with_name("ctest")
    log = _run([str(ctest) if ctest.is_file() else "ctest", "--test-dir", str(build),
                "--output-on-failure"])
    assert "test_recurrence" in log and "test_native_op" in log and "tests passed" in log, log
    assert "0 tests failed" in log, log


def test_nvcc_compiles_torch_free_cuda_kernels(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: the .cu files cannot be compiled here")
    # No torch include path: the kernels must be torch-free. The defines are the ones torch's
    # CUDAExtension adds, which disable implicit half/bfloat16 conversions.
    flags = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    obj = tmp_path / "slif_cuda.o"
    _run([nvcc, *flags, "-c", str(REPO / "kernels" / "slif_cuda.cu"), "-o", str(obj)])
    assert obj.stat().st_size > 0


def test_cuda_op_glue_compiles_against_torch_headers(tmp_path):
    # csrc/slif_cuda_ops.cpp is only built into CUDA builds of torch; check that it compiles
    # against this torch's headers anyway. A CPU wheel lacks one generated CUDA header, which
    # is stubbed here.
    header = _cuda_tool_or_header("include/cuda_runtime_api.h")
    if header is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h): the CUDA op glue cannot be compiled")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           f"-I{tmp_path}"]
    for path in include_paths():
        cmd.append(f"-isystem{path}")
    cmd += [f"-isystem{header.parent}", str(REPO / "csrc" / "slif_cuda_ops.cpp")]
    _run(cmd)


def test_ahead_of_time_build_imports_and_runs():
    # What `EFFST_BUILD_NATIVE=1 pip install --no-build-isolation -e .` runs (setup.py
    # build_ext), into a separate folder so the working tree is left alone.
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    build = _build_dir("aot")
    env = dict(os.environ, EFFST_BUILD_NATIVE="1", EFFST_NATIVE_CUDA="0")
    _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build / "lib"),
          "--build-temp", str(build / "temp")], cwd=REPO, env=env)
    built = sorted((build / "lib" / "effst").glob("_native*.so"))
    assert built, f"no effst/_native*.so under {build / 'lib'}"
    recorded = (build / "lib" / "effst" / "_native.sha1").read_text().strip()
    assert recorded == slif_native._build_config().source_hash()
    # Import it as the module effst._native in a fresh process and run the op.
    script = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("effst._native", {str(built[-1])!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        info = torch.ops.effst_native.build_info()
        x = torch.tensor([[0.5, 2.0], [1.5, 0.1]])
        s, v = torch.ops.effst_native.slif_forward(x, torch.zeros(1), torch.ones(1), None, 1, 2, 1, 2,
                                                   0.0, 1, 2.0, False, True)
        print(info, s.tolist(), v.tolist())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # k = 0.5: H = 0.25, 1.0 -> spike on neuron 1; then H = 0.875, 0.05
    assert f"source_hash={recorded}" in out.stdout and "[[0.0, 1.0], [0.0, 0.0]]" in out.stdout, out.stdout


def test_ninja_found_without_path_and_first_build_says_what_it_does(monkeypatch, tmp_path, capsys):
    # A venv used without activation: PATH lacks the venv's bin folder, yet the build must
    # find this interpreter's ninja (next to sys.executable or the ninja package), put it
    # first on PATH only while building, and a first build prints one line before and after.
    expected = slif_native.ninja_dir()
    if expected is None:
        pytest.skip("no ninja installed for this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert slif_native.ninja_dir() is not None
    assert slif_native._missing_tool() is None or "compiler" in slif_native._missing_tool()
    seen = {}

    def fake_load(**kwargs):
        seen["path"] = os.environ["PATH"]
        seen["build_directory"] = kwargs["build_directory"]

    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("EFFST_CACHE_DIR", str(tmp_path))
    config = slif_native._build_config()
    slif_native._build(config, with_cuda=False)
    assert seen["path"].split(os.pathsep)[0] == str(slif_native.ninja_dir())
    assert os.environ["PATH"] == "/usr/bin:/bin"  # restored afterwards
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "compiling the native sLIF extension" in err[0]
    assert str(tmp_path) in err[0] and "built in" in err[1]
