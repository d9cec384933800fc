"""pytest-benchmark entries for the CPU paths (issue 6, item 5).

In CI (``addopts = --benchmark-disable``) each runs once as a plain test and checks its result;
``pytest tests/test_benchmarks_cpu.py --benchmark-enable --benchmark-only`` times them, so a
regression shows in pytest-benchmark's comparison (``--benchmark-autosave`` /
``--benchmark-compare``). Sizes: T = 4 x [64, 4096] (1 M neuron-steps), the small CPU size of
the neuron suite. The ``triton`` backend is not here: on the CPU it only runs in the interpreter.
"""
from __future__ import annotations

import pytest
import torch

import effst.nn
from effst.benchmarks import neuron as neuron_suite
from effst.benchmarks import timing
from effst.ops.slif import resolve_backend

T, STEP_SHAPE = 4, (64, 4096)
CONFIG = neuron_suite.NEURON_CONFIG  # the benchmark's neuron (hard reset, detach_reset, ATan)


def _native_available() -> tuple[bool, str]:
    try:
        from effst.ops.slif_native import native_status
    except ImportError as exc:
        return False, f"effst.ops.slif_native cannot be imported: {exc}"
    return native_status()


@pytest.fixture(scope="module")
def inputs():
    ((x, grad),) = timing.neuron_inputs(T, STEP_SHAPE, torch.float32, "cpu", seed=0, sets=1)
    return x, grad


def _fwd_bwd(module, reset, x, grad):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        reset()
        spikes = module(x)
        return (spikes, *torch.autograd.grad(spikes, [x, *params], grad))

    return step


def _sj_node(kind: str):
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    kwargs = dict(decay_input=CONFIG["decay_input"], v_threshold=CONFIG["v_threshold"],
                  v_reset=CONFIG["v_reset"], surrogate_function=surrogate.ATan(alpha=CONFIG["alpha"]),
                  detach_reset=CONFIG["detach_reset"], step_mode="m")
    if kind == "LIF":
        return neuron.LIFNode(tau=CONFIG["tau"], **kwargs)
    return neuron.ParametricLIFNode(init_tau=CONFIG["tau"], **kwargs)


@pytest.mark.parametrize("backend", ["reference", "native", "auto"])
def test_bench_effst_slif_per_channel_cpu(benchmark, inputs, backend):
    """effst SLIF, per-channel learnable tau and V_th, forward+backward on the CPU."""
    if backend == "native":
        ok, reason = _native_available()
        if not ok:
            pytest.skip(f"native sLIF extension unavailable: {reason}")
    x, grad = inputs
    module = effst.nn.SLIF(**CONFIG, channels=STEP_SHAPE[-1], channel_dim=-1, backend=backend)
    spikes, gx, gw, gtheta = benchmark(_fwd_bwd(module, module.reset, x, grad))
    benchmark.extra_info.update(T=T, step_shape=STEP_SHAPE, dtype="float32", threads=torch.get_num_threads(),
                                kernel=resolve_backend(backend, torch.device("cpu")))
    # the timed call did the whole job: spikes of x, gradients for x and both parameter vectors
    assert spikes.shape == x.shape and 0.0 < spikes.mean().item() < 1.0
    assert gx.shape == x.shape and torch.isfinite(gx).all()
    assert gw.shape == (STEP_SHAPE[-1],) and gtheta.shape == (STEP_SHAPE[-1],)
    assert gtheta.abs().sum() > 0 and torch.isfinite(gw).all()


@pytest.mark.parametrize("kind", ["LIF", "PLIF"])
def test_bench_effst_matches_spikingjelly_cpu(benchmark, inputs, kind):
    """effst LIF/PLIF (backend auto) timed, and checked against SpikingJelly 2.0.0's CPU path."""
    x, grad = inputs
    ours = (effst.nn.LIF if kind == "LIF" else effst.nn.PLIF)(**CONFIG, backend="auto")
    spikes, gx, *gparams = benchmark(_fwd_bwd(ours, ours.reset, x, grad))
    theirs = _sj_node(kind)
    ref_spikes, ref_gx, *ref_gparams = _fwd_bwd(theirs, theirs.reset, x, grad)()
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    for ours_g, ref_g in zip(gparams, ref_gparams):  # PLIF's w: one scalar summed over 1 M steps
        torch.testing.assert_close(ours_g.reshape(()), ref_g.reshape(()), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("kind", ["LIF", "PLIF"])
def test_bench_spikingjelly_cpu(benchmark, inputs, kind):
    """SpikingJelly 2.0.0 LIFNode / ParametricLIFNode (its CPU torch path), the peer baseline."""
    x, grad = inputs
    node = _sj_node(kind)
    spikes, gx, *_ = benchmark(_fwd_bwd(node, node.reset, x, grad))
    assert spikes.shape == x.shape and torch.isfinite(gx).all()


def test_bench_copy_bandwidth_cpu(benchmark):
    """The roofline reference: dst.copy_(src) of 64 MiB (bytes/s = 2 x size / time)."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    benchmark(dst.copy_, src)
    benchmark.extra_info["bytes_moved"] = 2 * src.numel() * 4
    assert torch.equal(dst, src)


# ---------------------------------------------------------------------------- suite plans (no timing)
def test_merged_rounds_quartiles_lie_inside_the_measured_range():
    """Two rounds: the default (exclusive) quantile method puts q1 below the smaller median
    (7.5 for 10 and 20); the inclusive one keeps both quartiles inside [10, 20]."""
    def row(ms):
        return {"id": "a", "status": "ok", "ms": ms, "ms_min": ms - 1, "reps": 3}

    (merged,) = neuron_suite.merge_rounds([[row(10.0)], [row(20.0)]])
    assert (merged["ms_q1"], merged["ms"], merged["ms_q3"]) == (12.5, 15.0, 17.5)


def test_train_step_plan_on_cuda_runs_token_rows_before_spikingjelly(monkeypatch):
    """The train-step suite's rows on a GPU, in order, with time_train_step faked (ms = a
    function of the row): effst eager and CUDA-graph rows, then the token pairs of both models
    under a CUDA graph and eager (each selector row against the dense row of its own model,
    step and mode, with the issue's target), then SpikingJelly; token rows are a group of their
    own that the SpikingJelly comparisons leave alone."""
    from effst.benchmarks import train_step

    def fake(neuron, device, mode="eager", train=True, token_selector=None, model=train_step.MODEL, **kwargs):
        ms = {"stata": 40.0, "sts": 10.0}.get(token_selector, 50.0 if train else 20.0)
        ms *= 2.0 if neuron == "spikingjelly" else 1.0 if mode == "cuda-graph" else 1.5
        return {"status": "ok", "library": "spikingjelly 2.0.0" if neuron == "spikingjelly" else "effst",
                "neuron": neuron, "mode": mode, "model": model, "step": "train" if train else "inference",
                "token_selector": token_selector, "ms": ms, "reps": kwargs["reps"], "batch": kwargs["batch"]}

    monkeypatch.setattr(train_step, "time_train_step", fake)
    rows = train_step.run("cuda", quick=False, log=lambda message: None)
    order = [(r["neuron"], r["mode"], r["model"], r["step"], r["token_selector"]) for r in rows]
    main, small, large = train_step.MODEL, "spikformer-4-384", "spikformer-8-512"
    pairs = [("train", None), ("train", "stata"), ("inference", None), ("inference", "sts")]
    tokens = [("lif", mode, model, step, selector) for model in (small, large)
              for mode in ("cuda-graph", "eager") for step, selector in pairs]
    assert order == [("slif", "eager", main, "train", None), ("lif", "eager", main, "train", None),
                     ("slif", "cuda-graph", main, "train", None), ("lif", "cuda-graph", main, "train", None),
                     *tokens,
                     ("spikingjelly", "eager", main, "train", None), ("spikingjelly", "cuda-graph", main, "train", None)]
    token_rows = [r for r in rows if r.get("group") == train_step.TOKEN_GROUP]
    assert len(token_rows) == 16 and all(r["reps"] == train_step.TOKEN_REPS_CUDA[0] for r in token_rows)
    for row in token_rows:
        assert not any(key.startswith("speedup_vs_sj") for key in row) and "slif_over_lif" not in row, row
        if row["token_selector"] is None:
            assert "speedup_vs_dense" not in row
            continue
        dense = 50.0 if row["step"] == "train" else 20.0
        assert row["speedup_vs_dense"] == pytest.approx(dense / {"stata": 40.0, "sts": 10.0}[row["token_selector"]])
        assert row["target_speedup"] == train_step.TOKEN_TARGETS[row["token_selector"]]
        assert row["target_met"] == (row["speedup_vs_dense"] >= row["target_speedup"])
    slif = rows[0]
    assert slif["speedup_vs_sj2"] == pytest.approx(100.0 / 75.0) and slif["slif_over_lif"] == 1.0
