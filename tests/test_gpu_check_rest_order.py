"""bench/gpu_check.sh's GPU-test steps: every gpu-marked test file is in one of them, and the
rest step runs the most important files first (issue 12's token files before the 61 native CUDA
tests, which alphabetically came first and could use up the step's limit)."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _script_files() -> tuple[list[str], list[str], list[str], list[str]]:
    """(CORE_TESTS, REST_FIRST, REST_LAST, rest_test_files' output) from the script as it runs."""
    text = SCRIPT.read_text()
    settings = "\n".join(line for line in text.splitlines()
                         if re.match(r"(CORE_TESTS|REST_FIRST|REST_LAST)=", line))
    start = text.index("rest_test_files() {")
    function = text[start:text.index("\n}\n", start) + 3]
    probe = settings + "\n" + function + """
echo "core=$CORE_TESTS"; echo "first=$REST_FIRST"; echo "last=$REST_LAST"; echo "rest=$(rest_test_files)"
"""
    done = subprocess.run(["bash", "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = dict(line.split("=", 1) for line in done.stdout.splitlines())
    return tuple(out[k].split() for k in ("core", "first", "last", "rest"))


def test_rest_step_order_and_every_test_file_in_one_step():
    core, first, last, rest = _script_files()
    assert first and last, (first, last)
    every = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    for name in core + first + last:
        assert name in every, f"gpu_check.sh names {name}, which does not exist"
    # core and rest together are every test file, each once
    assert sorted(core + rest) == every and len(set(rest)) == len(rest), (core, rest)
    assert rest[:len(first)] == first and rest[-len(last):] == last, rest
    assert rest.index("tests/test_token_selection.py") < rest.index("tests/test_slif_native.py")
    # every file with gpu tests is run by a step: the core step or the rest step (the compile
    # step selects by marker across all files)
    gpu_files = [name for name in every
                 if re.search(r"pytest\.mark\.gpu\b", (REPO / name).read_text())]
    assert gpu_files and set(gpu_files) <= set(core) | set(rest), gpu_files
    assert "tests/test_token_kernels.py" in gpu_files and "tests/test_slif_native.py" in gpu_files
