"""A user's first day (issue 13): a cheap ``import effst``, a kernel library without training
dependencies, packaging metadata, and a README whose references, examples and commands hold."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (no conftest, no TRITON_INTERPRET) and return stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_effst_loads_neither_torch_nor_triton():
    out = run_python("import sys, effst; print(effst.__version__); "
                     "print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))")
    version, loaded = out.split("\n")[:2]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version)
    assert loaded == "[]", f"import effst loaded {loaded}"


def test_lazy_attributes_resolve_to_the_real_objects():
    out = run_python(
        "import effst, inspect\n"
        "from effst.ops.slif import slif\n"
        "import effst.nn, effst.models, effst.prune\n"
        "assert effst.slif is slif and inspect.isfunction(effst.slif)\n"
        "from effst.ops.spike_bytes import SpikeBytes, as_spike_bytes\n"
        "assert effst.SpikeBytes is SpikeBytes and effst.as_spike_bytes is as_spike_bytes\n"
        "assert effst.nn.SLIF.__name__ == 'SLIF' and callable(effst.prune.l1p)\n"
        "assert callable(effst.convert) and callable(effst.models.build_model)\n"
        "assert set(effst.__all__) <= set(dir(effst))\n"
        "try:\n"
        "    effst.no_such_thing\n"
        "except AttributeError as e:\n"
        "    print(e)\n")
    assert "module 'effst' has no attribute 'no_such_thing'" in out


def test_kernel_library_does_not_need_the_training_extra():
    """torch, triton and numpy are the core dependencies; scikit-learn, matplotlib, tqdm, PyYAML
    and TensorBoard belong to ``effst[train]`` and must not be imported by the library."""
    out = run_python(
        "import sys, torch, effst\n"
        "from effst.nn import SLIF, BlockSparseLinear\n"
        "from effst.models import build_model, count_parameters\n"
        "import effst.prune\n"
        "model = build_model('spikformer-tiny', backend='reference')\n"
        "effst.convert(model, 'slif')\n"
        # (tqdm is left out: torch itself imports it when it is installed)
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'yaml', 'tensorboard') if m in sys.modules))\n")
    assert out.strip() == "[]"


def pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def test_packaging_dependencies_and_license():
    project = pyproject()["project"]
    assert sorted(map(requirement_name, project["dependencies"])) == ["numpy", "torch", "triton"]
    train = set(map(requirement_name, project["optional-dependencies"]["train"]))
    assert {"scikit-learn", "matplotlib", "tqdm", "pyyaml", "tensorboard"} <= train
    # The version is written once, in effst/__init__.py.
    assert project["dynamic"] == ["version"] and "version" not in project
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "effst.__version__"}
    # An SPDX expression, not the deprecated table that makes setuptools print warnings.
    assert project["license"] == "Apache-2.0"
    # The bootstrap's pinned list installs the train extra.
    pinned = {requirement_name(line) for line in (REPO / "scripts/requirements-cpu.txt").read_text().split("\n")
              if line.strip() and not line.startswith("#")}
    assert train <= pinned, train - pinned


def test_ci_runs_exactly_the_readme_test_command():
    first_lines = README.split("```")[1]
    command = next(line.split("#")[0].strip() for line in first_lines.splitlines() if "pytest" in line)
    assert command == "bash scripts/bootstrap.sh && .venv/bin/python -m pytest"
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_readme_points_only_at_files_in_the_repository():
    assert "shared/" not in README and "SPEC.md" not in README
    referenced = set(re.findall(r"`((?:docs|bench|scripts|tests|effst|kernels|csrc)/[\w./-]+\.\w+)`", README))
    referenced |= set(re.findall(r"\b(docs/[\w.-]+\.md)\b", README))
    assert {"docs/slif.md", "docs/pruning.md", "docs/benchmarks.md"} <= referenced
    missing = sorted(path for path in referenced if not (REPO / path).exists())
    assert not missing, f"README refers to missing files: {missing}"


def test_no_source_or_doc_refers_to_the_brief_outside_the_repository():
    """Users have no shared/docs/SPEC.md: docstrings and comments cite docs/ instead."""
    offenders = []
    for pattern in ("effst/**/*.py", "tests/*.py", "docs/*.md", "bench/*.md", "kernels/*", "csrc/*"):
        for path in REPO.glob(pattern):
            if path.is_file() and path.name != Path(__file__).name:
                text = path.read_text(errors="replace")
                if re.search(r"shared/docs|SPEC\.md|SPEC (section|§)", text):
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders


def test_docs_cite_their_sources_and_cover_what_the_readme_relies_on():
    slif = (REPO / "docs/slif.md").read_text()
    for surrogate in ("sigmoid", "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign", "super_spike",
                      "erf", "rect"):
        assert f"`{surrogate}`" in slif
    assert "sigmoid(w)" in slif and "detach_reset" in slif
    pruning = (REPO / "docs/pruning.md").read_text()
    for fact in ("ceil(p · n)", "9.32 M", "7.08 M", "84–307", "0.9 pJ", "4.6 pJ", "94.76"):
        assert fact in pruning, fact
    assert "copy bandwidth" in (REPO / "docs/benchmarks.md").read_text()


def test_readme_surrogates_match_the_code():
    from effst.ops.surrogates import SURROGATE_NAMES

    listed = re.search(r"the surrogates \(([^)]*)\)", README.replace("\n", " "))
    assert listed is not None
    named = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert named == set(SURROGATE_NAMES)


def test_every_neuron_the_readme_documents_is_accepted():
    from effst.models import NEURONS
    from effst.train.config import NEURON_NAMES, Settings

    sentence = re.search(r"`neuron` is ((?:`\w+`[^`]*){2,}?)\(the peer", README.replace("\n", " "))
    assert sentence is not None, "README no longer lists the neurons of build_model"
    documented = re.findall(r"`(\w+)`", sentence.group(1))
    assert "stl" in documented
    for name in documented:
        assert name in NEURONS and name in NEURON_NAMES, name
        Settings(neuron=name).validate()


def test_readme_first_steps_run_on_the_cpu():
    """The README's first example, as written, on the CPU, in a fresh interpreter."""
    block = README.split("## First steps (CPU)", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "cuda" not in block
    out = run_python(block)
    assert "torch.Size([2, 10])" in out and "'total'" in out


def test_bootstrap_rerun_is_quiet_and_says_each_step():
    """Re-running the bootstrap on an up-to-date .venv prints only its own one-line steps."""
    venv_python = REPO / ".venv/bin/python"
    stamp = REPO / ".venv/.effst-bootstrap"
    if not venv_python.exists() or not stamp.exists() or Path(sys.executable).parent != venv_python.parent:
        pytest.skip("runs where the tests run from the bootstrap's own .venv")
    inputs = b"".join((REPO / name).read_bytes() for name in
                      ("scripts/requirements-cpu.txt", "scripts/bootstrap.sh", "pyproject.toml", "setup.py"))
    import hashlib

    if stamp.read_text().strip() != hashlib.sha1(inputs).hexdigest()[:16]:
        pytest.skip("the .venv is older than the bootstrap inputs: a re-run would reinstall")
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("bootstrap: ") for line in lines), lines
    assert "bootstrap: .venv is up to date" in lines and len(lines) <= 5
    assert done.stderr == "", done.stderr


def test_readme_prerequisites():
    section = README.split("## Before you start", 1)[1].split("\n## ", 1)[0]
    for needed in ("Python ≥ 3.10", "venv", "C++ compiler", "Disk", "No GPU needed"):
        assert needed in section, needed


def test_readme_native_cpu_figures_match_the_measured_results():
    """The README's native-CPU range is the range of bench/RESULTS.md's measured table."""
    results = (REPO / "bench/RESULTS.md").read_text()
    table = results.split("## Native CPU sLIF", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    header = rows[0]
    body = [row for row in rows[2:] if row[0].startswith("effst") and row[header.index("neuron")] == "SLIF"]
    assert body, "no effst SLIF rows in the native CPU table"
    bandwidth = [float(row[header.index("of copy bandwidth")].rstrip("%")) for row in body]
    speedup = [float(row[header.index("vs SJ PLIF")].rstrip("x")) for row in body]
    claim = re.search(r"runs at (\d+)–(\d+) % of the measured copy bandwidth, ([\d.]+)–([\d.]+)× faster",
                      README.replace("\n", " "))
    assert claim is not None, "README no longer states the native CPU figures"
    assert (int(claim.group(1)), int(claim.group(2))) == (round(min(bandwidth)), round(max(bandwidth)))
    assert (float(claim.group(3)), float(claim.group(4))) == (round(min(speedup), 1), round(max(speedup), 1))


# What each part of effst may import (itself included): lower layers only, so that no import
# hides an upward dependency inside a function.
LAYERS = {
    "ops": {"ops"},
    "nn": {"ops", "nn"},
    "models": {"ops", "nn", "models"},
    "prune": {"ops", "nn", "models", "prune"},
    "convert": {"ops", "nn", "convert"},
    "data": {"data"},
    "train": {"ops", "nn", "models", "prune", "convert", "data", "train"},
    "benchmarks": {"ops", "nn", "models", "prune", "convert", "benchmarks"},
}


def effst_imports(path: Path) -> set:
    """The ``effst.<part>`` names a file imports anywhere (module level or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            # ``from effst import nn`` imports effst.nn
            names = [f"effst.{a.name}" for a in node.names] if node.module == "effst" else [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "effst" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_no_upward_imports(part):
    root = REPO / "effst"
    files = [root / f"{part}.py"] if (root / f"{part}.py").exists() else sorted((root / part).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(REPO)): sorted(effst_imports(f) - LAYERS[part]) for f in files}
    assert not {f: names for f, names in wrong.items() if names}


def test_readme_pruning_examples_run_on_the_cpu():
    """The pruning section's examples in order (the GPU-only 2:4 one left out), as written."""
    section = README.split("## Pruning", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python")[1:]]
    runnable = [block for block in blocks if "cuda" not in block]
    assert len(runnable) >= 2
    out = run_python("\n".join(runnable) + "\nprint(type(model.blocks[0].mlp.fc1).__name__)\n")
    assert out.strip().endswith("BlockSparseLinear")
