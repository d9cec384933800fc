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
