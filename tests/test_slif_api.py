"""Public sLIF API: the reference against SpikingJelly, modules, state, errors, torch.compile."""
import itertools
import math
import zlib

import pytest
import torch
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

import effst
from effst import slif
from effst.nn import LIF, PLIF, SLIF
from effst.ops.parametrization import tau_to_w, w_to_tau
from effst.ops.slif_reference import slif_reference
from effst.ops.surrogates import DEFAULT_ALPHA, SURROGATE_NAMES, surrogate_grad

SJ_SURROGATES = {"sigmoid": "Sigmoid", "atan": "ATan", "piecewise_quadratic": "PiecewiseQuadratic",
                 "piecewise_exp": "PiecewiseExp", "soft_sign": "SoftSign",
                 "super_spike": "SuperSpike", "erf": "Erf"}


# ------------------------------------------------------------------ SpikingJelly as oracle
@pytest.mark.parametrize("name", sorted(SJ_SURROGATES))
def test_surrogates_match_spikingjelly(name):
    sj = getattr(sj_surrogate, SJ_SURROGATES[name])()
    assert DEFAULT_ALPHA[name] == sj.alpha
    x = torch.linspace(-3, 3, 601, dtype=torch.float64, requires_grad=True)
    sj(x).sum().backward()
    torch.testing.assert_close(surrogate_grad(x.detach(), name, sj.alpha), x.grad, rtol=1e-12, atol=1e-12)


SJ_COMBOS = list(itertools.product([0.0, None], [False, True], [True, False], ["sigmoid", "atan"]))


@pytest.mark.parametrize("v_reset,detach_reset,decay_input,surrogate", SJ_COMBOS)
@pytest.mark.parametrize("parametric", [False, True])
def test_reference_matches_spikingjelly(v_reset, detach_reset, decay_input, surrogate, parametric):
    # crc32 of the repr, not hash(): str hashes change from one process to the next
    torch.manual_seed(zlib.crc32(repr((v_reset, detach_reset, decay_input, surrogate,
                                       parametric)).encode()))
    T, shape = 7, (5, 9)
    x = (torch.randn(T, *shape, dtype=torch.float64) * 1.2 + 0.6)
    g = torch.randn(T, *shape, dtype=torch.float64)
    sj_cls = neuron.ParametricLIFNode if parametric else neuron.LIFNode
    kwargs = dict(v_threshold=0.9, v_reset=v_reset, detach_reset=detach_reset,
                  decay_input=decay_input, step_mode="m",
                  surrogate_function=getattr(sj_surrogate, SJ_SURROGATES[surrogate])())
    node = sj_cls(init_tau=2.5, **kwargs) if parametric else sj_cls(tau=2.5, **kwargs)
    node = node.to(torch.float64)
    xs = x.clone().requires_grad_(True)
    sj_spikes = node(xs)
    (sj_spikes * g).sum().backward()

    xr = x.clone().requires_grad_(True)
    # PLIF keeps w as an fp32-initialised parameter: start from its exact value
    w0 = node.w.detach().reshape(()) if parametric else torch.tensor(tau_to_w(2.5), dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    ours = slif_reference(xr, w, 0.9, v_reset=v_reset, surrogate=surrogate,
                          detach_reset=detach_reset, decay_input=decay_input)
    (ours * g).sum().backward()
    assert torch.equal(ours.detach(), sj_spikes.detach())
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-9, atol=1e-9)
    if parametric:
        torch.testing.assert_close(w.grad, node.w.grad.reshape(()), rtol=1e-9, atol=1e-9)


def test_effst_modules_match_spikingjelly_plif():
    torch.manual_seed(0)
    x = (torch.randn(6, 4, 10) + 0.5).requires_grad_(True)
    sj = neuron.ParametricLIFNode(init_tau=2.0, detach_reset=True, step_mode="m",
                                  surrogate_function=sj_surrogate.ATan())
    ours = PLIF(tau=2.0, detach_reset=True, surrogate="atan")
    a = sj(x)
    a.sum().backward()
    grad_sj = x.grad.clone()
    x.grad = None
    b = ours(x)
    b.sum().backward()
    assert torch.equal(a, b)
    torch.testing.assert_close(x.grad, grad_sj)
    torch.testing.assert_close(ours.w.grad, sj.w.grad.reshape(()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ modules and state
def test_slif_module_parameters_and_repr():
    m = SLIF(tau=3.0, v_threshold=0.7, channels=5)
    assert isinstance(m.w, torch.nn.Parameter) and m.w.shape == (5,)
    assert isinstance(m.v_threshold, torch.nn.Parameter)
    torch.testing.assert_close(m.tau, torch.full((5,), 3.0))
    assert "per channel (C=5" in repr(m) and "learned" in repr(m)
    lif = LIF(tau=2.0)
    assert not any(True for _ in lif.parameters())
    assert set(lif.state_dict()) == {"w", "v_threshold"}
    plif = PLIF()
    assert [n for n, _ in plif.named_parameters()] == ["w"]
    torch.testing.assert_close(w_to_tau(torch.tensor(tau_to_w(4.0))), torch.tensor(4.0))


def test_state_persists_until_reset_and_reset_net_works():
    torch.manual_seed(1)
    m = SLIF(channels=3)
    x = torch.rand(4, 2, 3)
    first = m(x)
    assert isinstance(m.v, torch.Tensor) and m.v.shape == (2, 3)
    continued = m(x)  # starts from the stored state
    whole = slif(torch.cat([x, x]), m.w, m.v_threshold, backend="reference")
    torch.testing.assert_close(torch.cat([first, continued]), whole)
    functional.reset_net(torch.nn.Sequential(m))
    assert m.v == 0.0
    torch.testing.assert_close(m(x), first)
    with pytest.raises(ValueError, match="reset"):
        m(torch.rand(4, 5, 3))


def test_single_step_mode_equals_multi_step():
    torch.manual_seed(2)
    x = torch.rand(5, 3, 4)
    multi = SLIF(channels=4)(x)
    single = SLIF(channels=4)
    single.step_mode = "s"
    steps = torch.stack([single(x[t]) for t in range(5)])
    torch.testing.assert_close(steps, multi)


def test_checkpoint_round_trip(tmp_path):
    m = SLIF(channels=4, tau=2.7)
    with torch.no_grad():
        m.v_threshold.mul_(0.5)
    torch.save(m.state_dict(), tmp_path / "slif.pt")
    fresh = SLIF(channels=4)
    fresh.load_state_dict(torch.load(tmp_path / "slif.pt"))
    torch.testing.assert_close(fresh.tau, m.tau)
    torch.testing.assert_close(fresh.v_threshold, m.v_threshold)


def test_learning_moves_tau_and_threshold():
    torch.manual_seed(3)
    m = SLIF(channels=6)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.rand(4, 8, 6)
    before = (m.w.detach().clone(), m.v_threshold.detach().clone())
    for _ in range(3):
        functional.reset_net(m)
        loss = (m(x).mean() - 0.9) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(m.w.detach(), before[0])
    assert not torch.equal(m.v_threshold.detach(), before[1])


def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), SLIF(channels=6, backend="reference"))
    x = torch.randn(3, 2, 6)
    eager = model(x)
    model[1].reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)


def test_torch_compile_fullgraph_fused_op():
    # The fused op is a torch.library custom op with a fake implementation, so dynamo keeps it
    # as one node instead of breaking the graph; the interpreter runs it on the CPU.
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.zeros(5, requires_grad=True)
    theta = torch.full((5,), 0.8, requires_grad=True)

    def f(x, w, theta):
        return slif(x, w, theta, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, theta)
    out.backward()
    grads = (x.grad.clone(), w.grad.clone(), theta.grad.clone())
    for t in (x, w, theta):
        t.grad = None
    f(x, w, theta).backward()
    torch.testing.assert_close(out, f(x, w, theta))
    for a, b in zip(grads, (x.grad, w.grad, theta.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spike_dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("with_v_init", [False, True])
def test_opcheck_library_ops(spike_dtype, with_v_init):
    # The ops torch.compile traces (effst::slif_forward / slif_backward): schema and fake
    # implementations agree with the real ones. T = 11 > one chunk, so checkpoints are saved.
    torch.manual_seed(6)
    x2d = torch.randn(11, 10) + 0.5
    w, theta = torch.zeros(2), torch.full((2,), 0.7)
    v_init = torch.randn(10) * 0.2 if with_v_init else None
    options = ("triton", spike_dtype, 2, 5, 2, 5, 0.0, 1, 2.0, False, True)
    torch.library.opcheck(torch.ops.effst.slif_forward.default, (x2d, w, theta, v_init, *options),
                          test_utils=("test_schema", "test_faketensor"))
    spikes, v_final, saved = torch.ops.effst.slif_forward(x2d, w, theta, v_init, *options)
    assert saved.shape == (1, 10) and spikes.dtype == spike_dtype
    for needs in [(True, True, True), (True, False, False), (False, True, False)]:
        args = (torch.randn(11, 10), torch.randn(10), x2d, w, theta, v_init, saved, *options, *needs)
        torch.library.opcheck(torch.ops.effst.slif_backward.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        grads = torch.ops.effst.slif_backward(*args)
        assert len(grads) == sum(needs) + with_v_init


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call,match", [
    (lambda: slif(torch.zeros(0, 3), 0.0, 1.0), "T >= 1"),
    (lambda: slif(torch.zeros(4, 3, dtype=torch.int64), 0.0, 1.0), "x: expected a float"),
    (lambda: slif(torch.zeros(4, 3, 5), torch.zeros(4), 1.0), "w: shape"),
    (lambda: slif(torch.zeros(4, 3, 5), 0.0, torch.ones(3, 4)), "v_threshold: shape"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros((), dtype=torch.int32), 1.0), "w: expected a floating"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, surrogate="tanh"), "surrogate"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, alpha=0.0), "alpha"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, alpha=-1.0), "alpha"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, backend="cuda"), "backend"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, v_init=torch.zeros(5)), "v_init"),
    (lambda: slif(torch.zeros(4, 3), torch.zeros(()), 1.0, channel_dim=3, v_threshold=None), "v_threshold"),
    (lambda: SLIF(tau=1.0), "tau"),
    (lambda: SLIF(tau=0.5), "tau"),
    (lambda: LIF(tau=float("nan")), "tau"),
    (lambda: SLIF(surrogate="relu"), "surrogate"),
    (lambda: SLIF(alpha=0.0), "alpha"),
    (lambda: SLIF(channels=0), "channels"),
    (lambda: SLIF(v_threshold=float("nan")), "v_threshold: expected a finite value"),
    (lambda: LIF(v_threshold=float("inf")), "v_threshold: expected a finite value"),
    (lambda: SLIF(v_reset=float("-inf")), "v_reset: expected a finite value"),
    (lambda: SLIF(channels=4)(torch.zeros(2, 3, 5)), "channels"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.gpu  # a CUDA input with a CPU parameter; the meta-device test below covers the CPU
def test_parameters_on_another_device():
    with pytest.raises(ValueError, match="w: expected a tensor on"):
        slif(torch.zeros(4, 3, device="cuda"), torch.zeros(()), 1.0)


def test_parameters_on_another_device_meta():
    # 'meta' stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="v_threshold: expected a tensor on"):
        slif(torch.zeros(4, 3), 0.0, torch.ones((), device="meta"))


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        slif(torch.zeros(2, 3), 0.0, 1.0, backend="triton")


def test_every_surrogate_name_is_known():
    assert len(SURROGATE_NAMES) == 8 and SURROGATE_NAMES[-1] == "rect"
    assert effst.slif is slif
    assert math.isclose(DEFAULT_ALPHA["sigmoid"], 4.0)


def test_channel_dim_out_of_range_is_refused_even_for_per_layer_parameters():
    """A channel_dim that names no dim of the per-step shape is bad input, even when no (C,)
    parameter reads it (it was silently ignored)."""
    import effst.nn

    with pytest.raises(ValueError, match="channel_dim"):
        slif(torch.ones(2, 3), 0.0, 1.0, channel_dim=5)
    with pytest.raises(TypeError, match="channel_dim"):
        slif(torch.ones(2, 3), 0.0, 1.0, channel_dim=True)
    with pytest.raises(ValueError, match="channel_dim"):
        effst.nn.SLIF(channel_dim=-3, backend="reference")(torch.ones(2, 3))
    assert slif(torch.ones(2, 3), 0.0, 1.0, channel_dim=-1).shape == (2, 3)


def test_module_copies_after_a_forward_detach_the_state_and_drop_plans():
    """copy.deepcopy (EMA models, keeping the best model) and pickling work after a forward with
    gradients: the copy's state is the same values, detached; the original keeps its graph."""
    import copy
    import io
    import pickle

    module = SLIF(channels=4, backend="reference")
    x = torch.randn(3, 2, 4, requires_grad=True) + 1.0
    module(x)
    assert module.v.grad_fn is not None
    clones = (copy.deepcopy(module), pickle.loads(pickle.dumps(module)))
    assert module.v.grad_fn is not None  # the original keeps its graph
    for clone in clones:
        assert clone.v.grad_fn is None and torch.equal(clone.v, module.v.detach())
        assert clone._plans == {} and clone.w is not module.w and torch.equal(clone.w, module.w)
    follow = [clone(x.detach()) for clone in clones]  # both continue from the same state
    assert torch.equal(follow[0], follow[1]) and torch.equal(follow[0], module(x.detach()))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False), SLIF)
