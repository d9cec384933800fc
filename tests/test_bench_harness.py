"""The benchmark harness end to end on the CPU at tiny sizes (issue 6).

Runs ``python -m effst.benchmarks`` in subprocesses (without TRITON_INTERPRET, as a user would):
the neuron suite with a SpikingJelly 2.0.0 peer created from the registry into a fresh
directory, a deliberately broken peer and an uninstallable one (reported, not dropped),
external suite modules that are missing / raise / return rows, and ``bench/gpu_check.sh
--dry-run``. Nothing here is timed; the figures are only checked for consistency.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from effst.benchmarks import main as bench_main
from effst.benchmarks.peers import PEERS, STAMP

REPO = Path(__file__).resolve().parents[1]

# The documented top-level JSON fields (effst/benchmarks/schema.py docstring).
TOP_FIELDS = {"schema", "created", "command", "argv", "cwd", "device", "quick", "suites", "threads",
              "triton_interpret", "machine", "versions", "copy_bandwidth", "peers", "train_step_peers", "rows",
              "comparisons", "neuron", "suite_seconds", "suite_budgets", "plots", "errors"}
MACHINE_FIELDS = {"hostname", "platform", "cpu_model", "cpu_count", "torch_threads", "device", "cpu_cache_bytes",
                  "load_average_1m"}
VERSION_FIELDS = {"effst", "python", "torch", "torch_cuda", "triton", "numpy", "spikingjelly", "cupy"}
NEURON_ROW_FIELDS = {"suite", "status", "library", "peer", "neuron", "parameters", "kernel", "dtype", "T",
                     "step_shape", "neurons_per_step", "ms", "ms_min", "ms_q1", "ms_q3", "reps", "warmup",
                     "first_call_ms", "input_sets", "peak_memory_bytes", "firing_rate", "neuron_steps",
                     "gneuron_steps_per_s", "bytes_per_neuron_step", "achieved_bytes_per_s",
                     "copy_bandwidth_fraction"}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a benchmark runs real kernels, never the interpreter
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _bench(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-X", "faulthandler", "-m", "effst.benchmarks", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    """One tiny neuron-suite run with both SpikingJelly peers installed into a fresh dir."""
    out = tmp_path_factory.mktemp("bench-out")
    peers_dir = tmp_path_factory.mktemp("peers")
    done = _bench(["neuron", "--device", "cpu", "--quick", "--peers", "sj2,sj014", "--T", "2,3",
                   "--shape", "3x5x7", "--effst-backends", "auto,reference", "--out", str(out),
                   "--peers-dir", str(peers_dir),
                   "--wheels", str(peers_dir / "no-wheels-here")])
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return out, peers_dir, json.loads((out / "bench.json").read_text()), done.stdout


def test_json_has_documented_fields(neuron_run):
    out, _, result, _ = neuron_run
    assert TOP_FIELDS <= result.keys(), TOP_FIELDS - result.keys()
    assert result["schema"] == "effst-bench/2"
    assert result["device"] == "cpu" and result["quick"] is True and result["suites"] == ["neuron"]
    assert "effst.benchmarks" in result["command"] and "--quick" in result["argv"]
    assert MACHINE_FIELDS <= result["machine"].keys()
    assert result["machine"]["torch_threads"] == result["threads"] >= 1
    assert VERSION_FIELDS <= result["versions"].keys()
    assert result["versions"]["torch"] and result["versions"]["python"]
    copy = result["copy_bandwidth"]
    assert copy["bytes_per_s"] > 1e8 and copy["buffer_bytes"] == 64 << 20
    # sampled at the start and after the (one, --quick) neuron round; the best one is the limit
    assert len(copy["samples_bytes_per_s"]) == 2 and copy["bytes_per_s"] == max(copy["samples_bytes_per_s"])
    assert result["triton_interpret"] is False
    assert result["errors"] == 0
    assert "bytes per neuron-step" in result["neuron"]["bytes_formula"]
    assert result["neuron"]["plan"]["Ts"] == [2, 3] and result["neuron"]["plan"]["step_shape"] == [3, 5, 7]


def test_neuron_rows_effst_and_sj2_peer(neuron_run):
    _, peers_dir, result, _ = neuron_run
    rows = result["rows"]
    effst_rows = [r for r in rows if r["library"] == "effst" and r["backend_requested"] == "auto"]
    second_backend = [r for r in rows if r["library"] == "effst" and r["backend_requested"] == "reference"]
    peer_rows = [r for r in rows if r["library"] == "spikingjelly 2.0.0"]
    old_rows = [r for r in rows if r["library"] == "spikingjelly 0.0.0.0.14"]
    # every (neuron, T) pair is present: 3 effst neurons and 2 peer neurons at T = 2, 3;
    # the second effst backend times SLIF alone
    assert sorted((r["neuron"], r["T"]) for r in effst_rows) == sorted(
        (n, t) for n in ("SLIF", "PLIF", "LIF") for t in (2, 3))
    assert sorted((r["neuron"], r["T"], r["kernel"]) for r in second_backend) == [
        ("SLIF", 2, "reference"), ("SLIF", 3, "reference")]
    assert sorted((r["neuron"], r["T"], r["kernel"]) for r in old_rows) == sorted(
        (n, t, "torch") for n in ("PLIF", "LIF") for t in (2, 3))
    assert len(rows) == len(effst_rows) + len(second_backend) + len(peer_rows) + len(old_rows)
    assert sorted((r["neuron"], r["T"]) for r in peer_rows) == sorted(
        (n, t) for n in ("PLIF", "LIF") for t in (2, 3))
    for row in effst_rows + second_backend + peer_rows + old_rows:
        assert row["status"] == "ok", row
        assert NEURON_ROW_FIELDS <= row.keys(), NEURON_ROW_FIELDS - row.keys()
        assert row["neurons_per_step"] == 105 and row["dtype"] == "float32"
        steps = row["T"] * 105
        assert row["neuron_steps"] == steps
        assert row["ms_min"] <= row["ms"] and row["reps"] >= 1
        assert row["gneuron_steps_per_s"] == pytest.approx(steps / (row["ms"] * 1e-3) / 1e9)
        assert row["bytes_per_neuron_step"] == 20  # 5 x fp32
        assert row["achieved_bytes_per_s"] == pytest.approx(20 * steps / (row["ms"] * 1e-3))
        assert row["copy_bandwidth_fraction"] == pytest.approx(
            row["achieved_bytes_per_s"] / result["copy_bandwidth"]["bytes_per_s"])
        assert 0.0 < row["firing_rate"] < 1.0  # the random inputs make neurons fire, not all the time
        assert row["input_sets"] >= 2  # tiny inputs fit in cache, so they rotate
    # the SLIF row is the per-channel learnable one, on the CPU backend effst picks
    slif = next(r for r in effst_rows if r["neuron"] == "SLIF")
    assert slif["backend_requested"] == "auto" and slif["kernel"] in ("native", "reference")
    # each peer ran isolated: its own spikingjelly from the fresh peers directory
    for name, version in (("sj2", "2.0.0"), ("sj014", "0.0.0.0.14")):
        info = result["peers"][name]
        assert info["status"] == "ok" and info["location"] == str(peers_dir / name)
        assert info["source"] in ("registry", "wheels")
        (run,) = info["runs"]
        assert run["ok"] and run["spikingjelly_file"].startswith(str(peers_dir / name))
        assert run["versions"]["spikingjelly"] == version
    # 0.0.0.0.14 gets numpy.int back in its own subprocess only (this numpy has none), and says so
    import numpy

    assert "int" not in vars(numpy)
    assert result["peers"]["sj014"]["runs"][0]["numpy_int_compat_applied"] is True
    assert result["peers"]["sj2"]["runs"][0]["numpy_int_compat_applied"] is False
    for row in old_rows:
        assert "numpy.int = int" in row["note"] and row["implementation"] == "torch"
    for row in peer_rows:
        assert "note" not in row and row["implementation"] == "torch"
    # LIF and PLIF have the same math in all three and saw the same inputs: equal firing rates
    for T in (2, 3):
        for kind in ("LIF", "PLIF"):
            ours = next(r for r in effst_rows if r["neuron"] == kind and r["T"] == T)
            for theirs in (peer_rows, old_rows):
                same = next(r for r in theirs if r["neuron"] == kind and r["T"] == T)
                assert ours["firing_rate"] == same["firing_rate"], (kind, T, same["library"])
    for row in second_backend:  # reference and the CPU backend fire identically too
        same = next(r for r in effst_rows if r["neuron"] == "SLIF" and r["T"] == row["T"])
        assert row["firing_rate"] == same["firing_rate"]


def test_outputs_table_markdown_plot(neuron_run):
    out, _, result, stdout = neuron_run
    assert "G n-steps/s" in stdout and "of copy BW" in stdout and "effst vs peers" in stdout
    md = (out / "bench.md").read_text()
    assert "| library | neuron | kernel |" in md and "spikingjelly 2.0.0" in md
    assert result["plots"] == ["neuron_time_vs_T.png"]
    assert (out / "neuron_time_vs_T.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparisons = result["comparisons"]
    assert {(c["effst"].split()[0], c["T"]) for c in comparisons if "2.0.0 PLIF" in c["peer"]} >= {
        ("SLIF", 2), ("SLIF", 3), ("PLIF", 2), ("PLIF", 3)}
    for c in comparisons:
        assert c["speedup"] == pytest.approx(c["peer_ms"] / c["effst_ms"])
        assert c["target"] is None  # targets are the H100's, not checked on the CPU
    # --render rebuilds the tables and plots from the JSON alone
    (out / "bench.md").unlink()
    (out / "neuron_time_vs_T.png").unlink()
    done = _bench(["--render", str(out / "bench.json")], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "bench.md").read_text() == md
    assert (out / "neuron_time_vs_T.png").is_file()


def test_broken_and_uninstallable_peers_are_reported(tmp_path):
    """A peer whose spikingjelly fails to import, and one pip cannot install: error rows, rc 3."""
    peers_dir = tmp_path / "peers"
    broken = peers_dir / "sj014"
    (broken / "spikingjelly").mkdir(parents=True)
    (broken / "spikingjelly" / "__init__.py").write_text(
        "raise ImportError('deliberately broken peer for the harness test')\n")
    # a stamp with the requirements ensure_env would install, so it is re-used as is
    spec = PEERS["sj014"]
    (broken / STAMP).write_text(json.dumps({"requirements": [spec.requirement]}))
    out = tmp_path / "out"
    env = _env()
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "nowhere"))  # sj2 cannot be installed
    done = subprocess.run(
        [sys.executable, "-m", "effst.benchmarks", "neuron", "--device", "cpu", "--quick", "--skip-effst",
         "--peers", "sj014,sj2", "--peers-dir", str(peers_dir), "--wheels", str(tmp_path / "none"),
         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    sj014_rows = [r for r in rows if r["peer"] == "sj014"]
    sj2_rows = [r for r in rows if r["peer"] == "sj2"]
    # every planned case of each failed peer is a row: 2 neurons x 2 T values (quick plan)
    assert len(sj014_rows) == 4 and len(sj2_rows) == 4
    for row in sj014_rows:
        assert row["status"] == "error"
        assert "deliberately broken peer" in row["error"] and "cannot import spikingjelly" in row["error"]
    for row in sj2_rows:
        assert row["status"] == "error" and "peer environment could not be created" in row["error"]
        assert "spikingjelly==2.0.0" in row["error"]
    assert result["peers"]["sj2"]["status"] == "error" and result["peers"]["sj014"]["runs"][0]["ok"] is False
    assert not (peers_dir / "sj2").exists()  # a failed install leaves no half environment
    assert result["errors"] == 8
    assert "ERROR" in done.stdout and "deliberately broken" in (out / "bench.md").read_text()


def test_module_suites_missing_raising_and_returning_rows(tmp_path, monkeypatch, capsys):
    """The harness with stand-in suite modules: one raises, one is missing, one returns rows and
    runs SpikingJelly 0.0.0.0.14 as a peer through add_peer_rows and bench/peers/sj_train_step.py."""
    from effst.benchmarks import harness

    package = tmp_path / "fake_suites"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "exploding.py").write_text(
        "def run(device, quick):\n    raise RuntimeError('sparse suite exploded on purpose')\n")
    # its own rows, and time_train_step, which the harness calls inside the SpikingJelly 0.0.0.0.14
    # peer environment (the runner imports this file by path)
    (package / "training.py").write_text(
        "from pathlib import Path\n"
        "def run(device, quick, *, rows, log, peers):\n"
        "    from effst.benchmarks.train_step import add_peer_rows\n"
        "    assert device == 'cpu' and quick is True\n"
        "    rows += [{'impl': 'effst', 'library': 'effst', 'ms': 2.5},\n"
        "             {'impl': 'sj', 'library': 'spikingjelly 2.0.0', 'neuron': 'spikingjelly', 'ms': 3.5,\n"
        "              'batch': 3, 'T': 2, 'dtype': 'fp32', 'reps': 4, 'warmup': 2, 'model': 'tiny'},\n"
        "             {'impl': 'broken', 'status': 'error', 'error': 'x'}]\n"
        "    peers['info'] = add_peer_rows(rows, device=device, peer_names=tuple(peers['names']),\n"
        "        peers_dir=peers['peers_dir'], wheels=peers['wheels'], runner_dir=peers['runner_dir'],\n"
        "        suite_path=Path(__file__), timeout=300, quick=quick, log=log)\n"
        "    return rows\n"
        "def time_train_step(**kwargs):\n"
        "    from importlib import metadata\n"
        "    return {'ms': 7.0, 'library': 'spikingjelly ' + metadata.version('spikingjelly'), 'kwargs': kwargs}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(harness.SUITE_MODULES, "sparse", "fake_suites.exploding")
    monkeypatch.setitem(harness.SUITE_MODULES, "train-step", "fake_suites.training")
    monkeypatch.setitem(harness.SUITE_MODULES, "native-cpu", "fake_suites.missing")
    out = tmp_path / "out"
    peers_dir = tmp_path / "peers"
    status = bench_main(["sparse", "train-step", "native-cpu", "--device", "cpu", "--quick", "--out", str(out),
                         "--peers", "sj2,sj014", "--peers-dir", str(peers_dir), "--copy-bytes", str(1 << 20)])
    assert status == 3, capsys.readouterr()
    result = json.loads((out / "bench.json").read_text())
    by_suite = {}
    for row in result["rows"]:
        by_suite.setdefault(row["suite"], []).append(row)
    assert result["suites"] == ["sparse", "train-step", "native-cpu"]
    (sparse,) = by_suite["sparse"]
    assert sparse["status"] == "error" and "sparse suite exploded on purpose" in sparse["error"]
    assert "RuntimeError" in sparse["traceback"]
    train = by_suite["train-step"]
    # 2.0.0 was timed by the suite itself, so only 0.0.0.0.14 runs as a peer, with the suite's
    # configuration (CI size: one step) and its torch backend on the CPU
    assert [(r.get("impl"), r["status"]) for r in train] == [
        ("effst", "ok"), ("sj", "ok"), ("broken", "error"), (None, "ok")]
    peer = train[3]
    assert peer["library"] == "spikingjelly 0.0.0.0.14" and peer["peer"] == "sj014" and peer["ms"] == 7.0
    assert peer["kwargs"] == {"batch": 3, "T": 2, "dtype": "fp32", "reps": 1, "warmup": 1, "model": "tiny",
                              "neuron": "spikingjelly", "device": "cpu", "sj_backend": "torch"}
    assert "numpy.int = int" in peer["note"]  # the shim, applied in the peer's process only
    assert train[0]["speedup_vs_sj014"] == pytest.approx(7.0 / 2.5)
    info = result["train_step_peers"]
    assert list(info) == ["sj014"] and info["sj014"]["status"] == "ok"
    assert info["sj014"]["spikingjelly_file"].startswith(str(peers_dir / "sj014"))
    (native,) = by_suite["native-cpu"]
    assert native["status"] == "error" and native["error"] == "suite module fake_suites.missing not found"
    assert result["errors"] == 3 and "train_step.png" in result["plots"]


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--peers", "sj3"], "unknown peer 'sj3'"),
    (["--suite-timeout", "neuron=-1"], "--suite-timeout"),
    (["--T", "0,4"], "--T"),
    (["--dtypes", "int8"], "--dtypes"),
    (["--threads", "0"], "--threads"),
    (["--effst-backends", "cupy"], "--effst-backends"),
    (["--repeat", "0"], "--repeat"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys, monkeypatch):
    import torch

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.chdir(REPO)
    assert bench_main(["neuron", "--device", "cpu", *args] if args[0] != "--device" else ["neuron", *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_suite_is_an_argument_error(capsys):
    assert bench_main(["bogus"]) == 2
    assert ("SUITE: expected some of neuron, overhead, sparse, train-step, native-cpu, all; got bogus"
            in capsys.readouterr().err)


def test_merge_rounds_takes_the_median_of_round_medians_and_keeps_failures():
    from effst.benchmarks.neuron import merge_rounds

    def row(case, ms, status="ok"):
        return {"id": case, "status": status, "ms": ms, "ms_min": ms - 1, "reps": 5,
                **({"error": f"failed at {ms}"} if status == "error" else {})}

    rounds = [[row("a", 10.0), row("b", 3.0)], [row("a", 30.0), row("b", 4.0, "error")],
              [row("a", 12.0), row("b", 5.0)]]
    a, b = merge_rounds(rounds)
    assert a["ms"] == 12.0 and a["round_ms"] == [10.0, 30.0, 12.0] and a["ms_min"] == 9.0
    assert a["rounds"] == 3 and a["reps"] == 15 and a["ms_q1"] <= 12.0 <= a["ms_q3"]
    assert b["status"] == "error" and b["error"] == "failed at 4.0" and (b["rounds"], b["rounds_ok"]) == (3, 2)
    assert merge_rounds([rounds[0]]) == rounds[0]


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh --dry-run: the GPU session's script, same steps, CPU and CI sizes."""
    env = _env()
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, EFFST_GPU_TUNE="1")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, log[-6000:]
    for step in ("install: ok", "versions: ok", "bench: ok", "render: ok", "gpu-tests-core: ok",
                 "gpu-compile-tests: ok", "tune-slif: ok", "gpu-tests-rest: ok",
                 "host-profile: ok"):  # dry run: EFFST_GPU_TUNE=1
        assert step in log, log[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["suites"] == ["neuron", "overhead", "sparse", "train-step", "native-cpu"]
    suites_seen = {r["suite"] for r in result["rows"]}
    assert suites_seen == set(result["suites"])
    # a suite that could not even run (missing module, exception) is a defect of the tree
    suite_failures = [r for r in result["rows"] if r["status"] == "error" and "traceback" in r
                      or r["status"] == "error" and "not found" in str(r.get("error"))]
    assert not suite_failures, suite_failures
    assert all(r["status"] == "ok" for r in result["rows"] if r.get("library") == "effst")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "bench.md" in files and "neuron_time_vs_T.png" in files
    assert {"overhead.png", "train_step.png"} <= set(files)
    # the train-step suite's token-selection rows ran through effst.models.build_model
    tokens = [r for r in result["rows"] if r["suite"] == "train-step" and r.get("token_selector")]
    assert {r["token_selector"] for r in tokens} == {"sts", "stata"} and all(r["status"] == "ok" for r in tokens)


def _load_peer_script(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench" / "peers"))
    spec = importlib.util.spec_from_file_location(f"peer_{name}_under_test", REPO / "bench" / "peers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numpy_int_compat_sets_only_the_missing_int_alias(monkeypatch):
    import numpy

    common = _load_peer_script("peer_common", monkeypatch)
    bool_before = numpy.bool
    if "int" in vars(numpy):  # an old NumPy still has it: nothing to do, nothing done
        assert common.apply_numpy_int_compat() is False
        return
    try:
        assert common.apply_numpy_int_compat() is True and numpy.int is int
        assert common.apply_numpy_int_compat() is False  # already there: left alone
        assert numpy.bool is bool_before  # NumPy 2's real numpy.bool is never replaced
    finally:
        vars(numpy).pop("int", None)


def test_sj2_missing_native_operators_is_unavailable_not_an_error(monkeypatch):
    runner = _load_peer_script("sj_neuron", monkeypatch)
    missing = RuntimeError("No available sj_plif CUDA implementation. cuda: Native operators for "
                           "spikingjelly._ops.plif were not built. Install from source with SJ_BUILD_NATIVE=1")
    fields = runner.failure_fields(missing)
    assert fields["status"] == "unavailable" and "wheel ships without" in fields["note"]
    assert "were not built" in fields["error"]
    other = runner.failure_fields(ValueError("shapes do not match"))
    assert other["status"] == "error" and "ValueError: shapes do not match" in other["error"]
    from effst.benchmarks import schema

    rows = [schema.normalise_row({"status": "unavailable"}, "neuron"), schema.normalise_row({"status": "bogus"}, "x")]
    assert rows[0]["status"] == "unavailable" and rows[1]["status"] == "error" and "bogus" in rows[1]["error"]
    assert schema.count_errors(rows) == 1


def test_peer_variants_on_cuda_use_defaults_for_half_and_the_shim_for_cupy():
    from effst.benchmarks.neuron import _peer_variants

    default, native = _peer_variants("sj2", "cuda")
    assert default.kernel == "default" and default.dtypes is None and not default.extra_env
    assert native.kernel == "cuda" and native.dtypes == ("float32",) and native.first_T_only
    from effst.benchmarks.neuron import _case_rows, default_plan

    plan = default_plan("cuda", quick=False)
    assert plan.peers[0] == "sj014"  # the cupy rows first: the ones most worth having if time runs out
    assert {(r["neuron"], r["dtype"], r["T"]) for r in _case_rows(plan, native, ("LIF", "PLIF"))} == {
        ("LIF", "float32", 4), ("PLIF", "float32", 4)}
    assert len(_case_rows(plan, default, ("LIF", "PLIF"))) == 2 * 3 * 4
    assert native.extra_env == {"SJ_LIF_CUDA_IMPLEMENTATION": "cuda", "SJ_PLIF_CUDA_IMPLEMENTATION": "cuda"}
    (cupy,) = _peer_variants("sj014", "cuda")
    assert cupy.backend == "cupy" and cupy.numpy_int_compat and cupy.dtypes == ("float32", "float16")
    assert all(not v.numpy_int_compat for v in _peer_variants("sj2", "cpu"))


def test_derive_gives_eager_and_kernel_bandwidth_fractions():
    from effst.benchmarks.neuron import derive

    row = {"status": "ok", "T": 4, "neurons_per_step": 1000, "dtype": "float16", "ms": 2.0, "kernel_ms": 0.5}
    derive([row], copy_bytes_per_s=1e9)
    assert row["bytes_per_neuron_step"] == 10
    assert row["copy_bandwidth_fraction"] == pytest.approx(4 * 1000 * 10 / 2e-3 / 1e9)
    assert row["kernel_copy_bandwidth_fraction"] == pytest.approx(4 * row["copy_bandwidth_fraction"])


def test_kernel_time_is_cuda_only():
    from effst.benchmarks import timing

    assert timing.kernel_time(lambda: None, "cpu") == {} and timing.kernel_time_profiled(lambda: None, "cpu") == {}


def test_overhead_suite_on_cpu_one_thread():
    import torch

    from effst.benchmarks import overhead

    threads = torch.get_num_threads()
    rows = overhead.run("cpu", quick=True, log=lambda msg: None)
    assert torch.get_num_threads() == threads  # restored after the one-thread measurement
    ops = [(r["library"].split()[0], r["op"]) for r in rows]
    assert ops == [("torch", "baseline sigmoid(x*w+b)"), ("effst", "SLIF"), ("effst", "PLIF"), ("effst", "LIF"),
                   ("effst", "BlockSparseLinear"), ("spikingjelly", "PLIF")]
    base = rows[0]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["threads"] == 1 and row["us_min"] <= row["us"] and row["ms"] == pytest.approx(row["us"] / 1e3)
        assert row["ratio_to_baseline"] == pytest.approx(row["us"] / base["us"])
    slif = rows[1]
    assert slif["kernel"] == "native" and slif["target"] == "<= 1x baseline"
    assert slif["target_met"] == (slif["ratio_to_baseline"] <= 1.0)


def test_train_step_rejects_bad_mode_and_dtype():
    from effst.benchmarks.train_step import time_train_step

    with pytest.raises(ValueError, match="mode"):
        time_train_step("lif", mode="graph")
    with pytest.raises(ValueError, match="dtype"):
        time_train_step("lif", dtype="int8")
    with pytest.raises(ValueError, match="cuda-graph"):
        time_train_step("lif", device="cpu", mode="cuda-graph")


@pytest.mark.gpu
def test_kernel_time_graph_replay_and_profiler_fallback_on_cuda():
    import torch

    from effst.benchmarks import timing

    x = torch.randn(1 << 20, device="cuda")
    graphed = timing.kernel_time(lambda: (x * 2 + 1,), "cuda", reps=5)
    assert graphed["kernel_method"].startswith("CUDA graph") and 0 < graphed["kernel_ms"] < 5

    def syncing():  # a host synchronisation cannot be captured: the profiler measures it instead
        y = x * 2
        float(y[0])
        return (y,)

    profiled = timing.kernel_time(syncing, "cuda", reps=8)
    assert profiled["kernel_method"].startswith("torch.profiler") and profiled["kernel_graph_error"]
    assert 0 < profiled["kernel_ms"] < 5


@pytest.mark.gpu
@pytest.mark.parametrize("mode,model,overrides", [
    ("eager", "spikformer-tiny", None),
    ("cuda-graph", "spikformer-tiny", None),
    # the suite's own model (CIFAR shape) at one block: if only the tiny one fails, it is the model
    ("cuda-graph", "spikformer-4-384", {"depth": 1}),
])
def test_train_step_eager_and_cuda_graph_on_cuda(mode, model, overrides):
    from effst.benchmarks.train_step import time_train_step

    row = time_train_step("lif", device="cuda", batch=2, T=2, model=model, reps=2, warmup=2,
                          backend="triton", mode=mode, overrides=overrides)
    assert row["status"] == "ok" and row["mode"] == mode and row["ms"] > 0, row
    # eager: the profiler's device time (kernel_error says why when it has none)
    assert row["kernel_ms"] is not None and row["kernel_ms"] > 0, row
    assert row["ms_min"] <= row["ms_q1"] <= row["ms"] <= row["ms_q3"], row


@pytest.mark.gpu
def test_overhead_suite_and_neuron_kernel_time_on_cuda():
    import torch

    import effst.nn
    from effst.benchmarks import overhead, timing

    rows = overhead.run("cuda", quick=True, log=lambda msg: None)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["us"] > 0 and row["kernel_ms"] is not None and row["kernel_ms"] > 0, row
    module = effst.nn.SLIF(channels=64, channel_dim=-1, backend="triton").cuda()
    measured = timing.time_neuron(module, module.reset, T=4, step_shape=(8, 64), dtype=torch.float16,
                                  device="cuda", seed=0, warmup=2, reps=5, max_seconds=None, also_profile=True)
    assert measured["kernel_ms"] > 0 and measured["kernel_profiler_ms"] > 0
    # issue 9: effst's CUDA path has no host synchronisation, so the call is capturable
    assert measured["kernel_method"].startswith("CUDA graph"), measured.get("kernel_graph_error")


def _gpu_check_settings() -> tuple[dict, dict, dict, str]:
    """gpu_check.sh's GPU-run settings: (limits and deadline, floors, suite budgets, text)."""
    text = (REPO / "bench" / "gpu_check.sh").read_text()
    gpu_part = text.split('if [ "$DRY" = 1 ]; then\n    # CPU')[0]
    values = {k: int(v) for k, v in re.findall(
        r"\b(DEADLINE|KILL_GRACE|MIN_STEP|TEST_TIMEOUT|T_[A-Z_]+)=(\d+)", gpu_part)}
    floors = {k: int(v) for k, v in re.findall(
        r"\[([a-z-]+)\]=(\d+)", re.search(r"declare -A FLOOR=\(([^)]*)\)", text).group(1))}
    budgets = {k: float(v) for k, v in re.findall(
        r"([a-z-]+)=(\d+)", re.search(r'SUITE_TIMEOUTS="([^"]+)"', gpu_part).group(1))}
    return values, floors, budgets, text


def test_gpu_check_budgets_fit_the_device_session():
    """gpu_check.sh ends within 8 minutes whatever hangs (its deadline, one kill grace, the
    summary); even when every step before the tests uses its whole limit, the later steps keep
    their floors; the bench's suite budgets leave it time to start up and write its files, and
    each is above what the suite took on the H200 on 2026-11-30 with a margin."""
    values, floors, budgets, _ = _gpu_check_settings()
    grace = values["KILL_GRACE"]
    assert values["DEADLINE"] + grace + 10 <= 480, values
    before_tests = sum(values[k] + grace for k in ("T_INSTALL", "T_VERSIONS", "T_BENCH", "T_RENDER"))
    later = ("gpu-tests-core", "gpu-compile-tests", "tune-slif", "native-build", "gpu-tests-rest",
             "host-profile")  # native-build: the wait for the background build (floor 0)
    assert set(later) - {"native-build"} | {"render"} == set(floors), floors
    assert before_tests + sum(floors.get(s, 0) + grace for s in later) <= values["DEADLINE"], (values, floors)
    assert all(values[k] >= floors[s] for k, s in (
        ("T_TESTS_CORE", "gpu-tests-core"), ("T_TESTS_COMPILE", "gpu-compile-tests"),
        ("T_TESTS_REST", "gpu-tests-rest"), ("T_PROFILE", "host-profile"), ("T_RENDER", "render")))
    assert floors["gpu-tests-core"] >= values["TEST_TIMEOUT"]  # one hung test cannot take all of it
    assert set(budgets) == {"neuron", "overhead", "sparse", "train-step"}
    assert sum(budgets.values()) <= values["T_BENCH"] - 15
    measured = json.loads((REPO / "bench" / "results" / "2026-11-30-h200" / "bench.json").read_text())
    for suite, seconds in measured["suite_seconds"].items():
        if seconds >= measured["suite_budgets"][suite]:  # cut by its budget then: needs more
            assert budgets[suite] >= 1.5 * seconds, (suite, seconds, budgets)
        else:
            assert budgets[suite] >= 1.1 * seconds, (suite, seconds, budgets)


def test_gpu_check_step_deadline_and_test_split():
    """The script's own bookkeeping, run by bash: the floors kept for later steps, a step that
    gets less than MIN_STEP is skipped (and counts as a failure), and the GPU tests run as the
    core files, the compile tests, then everything else."""
    values, floors, _, text = _gpu_check_settings()
    head = text.split("\nSCRIPT=")[0]  # the settings, before any step runs
    start = text.index("reserve_after() {")
    function = text[start:text.index("\n}\n", start) + 3]  # the script's own, as it runs
    probe = head + "\n" + function + """
echo "plan=${PLAN[*]}"; echo "core=$CORE_TESTS"
echo "after_bench=$(reserve_after bench)"; echo "after_profile=$(reserve_after host-profile)"
"""
    done = subprocess.run(["bash", "-c", probe, "gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OUT": "/tmp/unused", "EFFST_GPU_TUNE": "0"}, timeout=30)
    assert done.returncode == 0, done.stderr
    out = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert out["plan"].split() == ["install", "versions", "bench", "render", "gpu-tests-core",
                                   "gpu-compile-tests", "native-build", "gpu-tests-rest", "host-profile"]
    assert out["core"].split() == ["tests/test_slif_triton.py", "tests/test_slif_launch_cache.py",
                                   "tests/test_launch_cache.py", "tests/test_slif_cuda_graphs.py"]
    kept = ("render", "gpu-tests-core", "gpu-compile-tests", "native-build", "gpu-tests-rest", "host-profile")
    assert int(out["after_bench"]) == sum(floors.get(s, 0) + values["KILL_GRACE"] for s in kept)
    assert int(out["after_profile"]) == 0
    # step() itself on a toy plan, the clock set by hand (SECONDS): each step's limit is the time
    # left minus the floors of the steps after it; one with less than MIN_STEP left is skipped
    # and the run counts as failed. (SECONDS may tick once between setting and reading it.)
    start = text.index("step() {")
    step = text[start:text.index("\n}\n", start) + 3]
    toy = function + step + """
DEADLINE=20; KILL_GRACE=1; MIN_STEP=3; PLAN=(a b c); declare -A FLOOR=([b]=4 [c]=2)
SUMMARY=(); FAILED=0
SECONDS=0; step a 100 "0" true; SECONDS=10; step b 100 "0" true; SECONDS=17; step c 100 "0" true
printf '%s\\n' "${SUMMARY[@]}"; echo "failed=$FAILED"
"""
    done = subprocess.run(["bash", "-c", toy], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"=== \[a\] \(limit (11s, at 0s|10s, at 1s) of 20s\) true", done.stdout), done.stdout
    assert re.search(r"=== \[b\] \(limit (6s, at 10s|5s, at 11s) of 20s\) true", done.stdout), done.stdout
    assert "a: ok (exit 0" in done.stdout and "b: ok (exit 0" in done.stdout, done.stdout
    assert "c: SKIPPED (no time left)" in done.stdout and "failed=1" in done.stdout, done.stdout


def test_conftest_reports_failures_now_and_limits_each_test(tmp_path):
    """tests/conftest.py with EFFST_TEST_REPORT_NOW=1 and EFFST_TEST_TIMEOUT: a failure's
    traceback and output are printed right after its result line; a test past the limit fails
    (TestTimeout) and the next one runs; one stuck where Python's handler cannot run gets its
    stack printed and ends the process after the grace period."""
    import shutil

    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(
        "import signal, time\n\n"
        "def test_a_fails():\n    print('output of a')\n    assert 1 == 2, 'deliberate failure'\n\n"
        "def test_b_sleeps():\n    time.sleep(60)\n\n"
        "def test_c_passes():\n    pass\n\n"
        "def test_d_stuck():\n    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n"
        "    time.sleep(60)\n\n"
        "def test_e_never_runs():\n    pass\n")
    env = {**os.environ, "EFFST_TEST_DEVICE": "cpu", "EFFST_TEST_REPORT_NOW": "1", "EFFST_TEST_TIMEOUT": "1",
           "EFFST_TEST_TIMEOUT_GRACE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "EFFST_TEST_TIMEOUT=1 s per test" in out, out
    a_result = out.index("test_probe.py::test_a_fails FAILED")
    assert a_result < out.index("deliberate failure") < out.index("test_probe.py::test_b_sleeps"), out
    assert "output of a" in out, out
    assert "TestTimeout: test_probe.py::test_b_sleeps ran past EFFST_TEST_TIMEOUT=1 s" in out, out
    assert "test_probe.py::test_c_passes PASSED" in out, out
    assert "Timeout (0:00:02)!" in out and "in test_d_stuck" in out, out  # faulthandler's dump
    assert "test_e_never_runs" not in out, out
    # and a bad setting is a usage error naming the variable
    env["EFFST_TEST_TIMEOUT"] = "soon"
    bad = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_probe.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 4 and "EFFST_TEST_TIMEOUT: expected seconds >= 0" in bad.stdout + bad.stderr


def test_sj2_implementation_detection_reads_its_recorded_choices(monkeypatch):
    """The runner names what SpikingJelly 2.0.0 chose: a kernel per device, or the torch reference
    fallback recorded under (device, reason) (half precision); nothing for a version without it."""
    import sys
    import types

    runner = _load_peer_script("sj_neuron", monkeypatch)
    chosen = types.SimpleNamespace(name="triton")
    selection = types.SimpleNamespace(_selections={0: chosen, (0, "Torch reference implementation required"): None})
    for name in ("spikingjelly", "spikingjelly._ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "spikingjelly._ops.lif", types.SimpleNamespace(_selection=selection))
    assert runner.sj2_selections("LIF") == {
        0: "triton", (0, "Torch reference implementation required"):
            "torch-reference (Torch reference implementation required)"}
    monkeypatch.setitem(sys.modules, "spikingjelly._ops.plif", None)  # not importable (0.0.0.0.14)
    assert runner.sj2_selections("PLIF") == {}


def test_kernel_speedup_compares_like_with_like():
    """Against a peer only the profiler could time, effst's profiler figure is used, not its graph replay."""
    from effst.benchmarks.neuron import comparisons

    def row(library, neuron, kernel, ms, kernel_ms, method, **extra):
        return {"status": "ok", "library": library, "neuron": neuron, "kernel": kernel, "dtype": "float16", "T": 8,
                "ms": ms, "kernel_ms": kernel_ms, "kernel_method": method, **extra}

    rows = [row("effst", "SLIF", "triton", 1.0, 0.20, "CUDA graph replay", kernel_profiler_ms=0.25),
            row("spikingjelly 0.0.0.0.14", "PLIF", "cupy", 2.0, 0.75, "torch.profiler: sum"),
            row("spikingjelly 2.0.0", "PLIF", "torch-reference", 3.0, 0.80, "CUDA graph replay")]
    found = {c["peer"].split(" PLIF")[0]: c for c in comparisons(rows, "cuda") if "PLIF" in c["peer"]}
    cupy, sj2 = found["spikingjelly 0.0.0.0.14"], found["spikingjelly 2.0.0"]
    assert cupy["kernel_speedup"] == pytest.approx(0.75 / 0.25) and cupy["effst_kernel_ms"] == 0.25
    assert sj2["kernel_speedup"] == pytest.approx(0.80 / 0.20) and sj2["effst_kernel_ms"] == 0.20
    assert cupy["speedup"] == pytest.approx(2.0) and cupy["target"] == 4.0 and cupy["met"] is False


def test_profile_host_jit_rows_restore_the_launch_cache_switch(monkeypatch):
    """bench/profile_host.py's ``kernel[grid]`` rows turn effst's launch cache off for their own
    call only: a run with EFFST_SLIF_LAUNCH_CACHE=0 keeps it off for every other row (it was
    switched on after the first such row)."""
    import importlib.util

    from effst.ops import slif as slif_ops

    spec = importlib.util.spec_from_file_location("profile_host_under_test", REPO / "bench" / "profile_host.py")
    profile_host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_host)
    for setting in (False, True):
        monkeypatch.setattr(slif_ops, "LAUNCH_CACHE", setting)
        assert profile_host._jit_launches(lambda: slif_ops.LAUNCH_CACHE)() is False
        assert slif_ops.LAUNCH_CACHE is setting
