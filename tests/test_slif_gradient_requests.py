"""sLIF's Triton backward computes only the gradients the autograd engine will use.

``ctx.needs_input_grad`` only says which inputs require grad; ``autograd.grad(out, [x])`` with
learnable w and theta, ``backward(inputs=[w])`` or a non-leaf x nobody asks for need less.
SLIFFunction.backward asks the engine (effst.ops.slif._edges_that_run) and launches the
kernel with None for the rest. A spy on the launcher records which gradient buffers it got;
every value is checked against the float64 reference. CPU: Triton's interpreter (conftest).
"""
import pytest
import torch

from effst import slif
from effst.nn import PLIF, SLIF
from effst.ops import slif as slif_ops


class _Launches(list):
    """(grad_x, grad_w, grad_theta) per backward launch, True = allocated; ``states``: the
    (v_init, grad_v_init) pair of each launch the same way."""

    def __init__(self):
        super().__init__()
        self.states = []


@pytest.fixture
def launched(monkeypatch):
    """The gradient buffers each backward launch got (None: not computed)."""
    seen = _Launches()
    backward = slif_ops._backward

    def spy(*args):
        seen.append(tuple(g is not None for g in args[-4:-1]))
        seen.states.append((args[6] is not None, args[-1] is not None))
        return backward(*args)

    monkeypatch.setattr(slif_ops, "_backward", spy)
    return seen


class _Questions(list):
    call = 0  # the label recorded for the questions that follow


@pytest.fixture
def asked(monkeypatch):
    """The questions put to the engine (_will_engine_execute_node), each recorded as the
    label ``asked.call`` held when it was asked."""
    questions = _Questions()
    will_execute = slif_ops._will_engine_execute_node

    def counting(node):
        questions.append(questions.call)
        return will_execute(node)

    monkeypatch.setattr(slif_ops, "_will_engine_execute_node", counting)
    return questions


def neuron(device, cls=SLIF):
    torch.manual_seed(3)
    kwargs = {"channels": 4} if cls is SLIF else {}
    m = cls(backend="triton", **kwargs).to(device=device, dtype=torch.float64)
    with torch.no_grad():  # distinct per-channel values, so a wrong sum shows
        m.w.copy_(torch.linspace(-0.5, 0.7, m.w.numel(), dtype=torch.float64).view(m.w.shape))
        m.v_threshold.copy_(torch.linspace(0.6, 1.1, m.v_threshold.numel(),
                                           dtype=torch.float64).view(m.v_threshold.shape))
    return m


def inputs(device):
    torch.manual_seed(4)
    x = (torch.randn(6, 3, 4, dtype=torch.float64) + 0.6).to(device)
    weight = torch.randn(6, 3, 4, dtype=torch.float64, device=device)  # d loss / d spikes
    return x, weight


def reference_grads(m, x, weight):
    """d(sum(spikes * weight)) / d(x, w, theta) from the float64 pure-torch reference."""
    xr = x.detach().clone().requires_grad_(True)
    w = m.w.detach().clone().requires_grad_(True)
    theta = m.v_threshold.detach().clone().requires_grad_(True)
    spikes = slif(xr, w, theta, v_reset=m.v_reset, backend="reference")
    return torch.autograd.grad((spikes * weight).sum(), [xr, w, theta])


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def leaf_case(device, cls=SLIF):
    """A neuron, a leaf x that requires grad, the loss weights and the reference gradients."""
    m = neuron(device, cls)
    x, weight = inputs(device)
    x.requires_grad_(True)
    return m, x, weight, reference_grads(m, x, weight)


def test_grad_of_x_alone_skips_parameter_gradients(launched, device):
    m, x, weight, expected = leaf_case(device)
    (gx,) = torch.autograd.grad((m(x) * weight).sum(), [x])
    assert launched[-1] == (True, False, False)
    assert m.w.grad is None and m.v_threshold.grad is None
    assert_close(gx, expected[0])
    m.reset()  # the full computation gives the same grad_x
    (m(x) * weight).sum().backward()
    assert launched[-1] == (True, True, True)
    assert_close(x.grad, gx)
    for actual, wanted in zip((m.w.grad, m.v_threshold.grad), expected[1:]):
        assert_close(actual, wanted)


@pytest.mark.parametrize("cls", [SLIF, PLIF])
def test_grad_of_one_parameter_skips_the_others(cls, launched, device):
    m, x, weight, expected = leaf_case(device, cls)  # x: a leaf requiring grad, not asked for
    (gw,) = torch.autograd.grad((m(x) * weight).sum(), [m.w])
    assert launched[-1] == (False, True, False)
    assert_close(gw, expected[1])
    if cls is SLIF:  # (a new module: this one's plan now holds w's capture hint)
        m = neuron(device, cls)
        (gt,) = torch.autograd.grad((m(x) * weight).sum(), [m.v_threshold])
        assert launched[-1] == (False, False, True)
        assert_close(gt, expected[2])


def test_backward_with_inputs_and_non_leaf_x(launched, device):
    m = neuron(device)
    x, weight = inputs(device)
    x0 = (x / 2).requires_grad_(True)
    expected = reference_grads(m, x, weight)

    def loss():
        m.reset()
        return (m(x0 * 2) * weight).sum()  # x is a non-leaf (MulBackward0)

    (gx0,) = torch.autograd.grad(loss(), [x0])
    assert launched[-1] == (True, False, False)
    assert_close(gx0, 2 * expected[0])
    loss().backward(inputs=[m.v_threshold])  # accumulated, not captured: no hint follows
    assert launched[-1] == (False, False, True)
    assert x0.grad is None and m.w.grad is None
    assert_close(m.v_threshold.grad, expected[2])
    m.v_threshold.grad = None
    torch.autograd.grad(loss(), [m.w, m.v_threshold])
    assert launched[-1] == (False, True, True)  # the non-leaf x's edge does not run
    loss().backward()
    assert launched[-1] == (True, True, True)
    assert_close(x0.grad, 2 * expected[0])
    assert_close(m.w.grad, expected[1])
    assert_close(m.v_threshold.grad, expected[2])


def test_functional_slif_and_a_carried_state(launched, device):
    # The functional API (a plan per call), and a second call whose v_init is the first call's
    # state: its edge is a fourth input that keeps every question open.
    m = neuron(device)
    x, weight = inputs(device)
    x.requires_grad_(True)
    w = m.w.detach().clone().requires_grad_(True)
    theta = m.v_threshold.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((slif(x, w, theta, backend="triton") * weight).sum(), [x])
    assert launched[-1] == (True, False, False)
    assert_close(gx, reference_grads(m, x, weight)[0])
    s1, v1 = slif(x, w, theta, backend="triton", return_state=True)
    s2 = slif(x, w, theta, v_init=v1, backend="triton")
    (gw,) = torch.autograd.grad((s2 * weight).sum(), [w])
    assert launched[-2:] == [(False, True, False), (False, True, False)]
    r1, rv1 = slif(x, w, theta, backend="reference", return_state=True)
    r2 = slif(x, w, theta, v_init=rv1, backend="reference")
    assert_close(gw, torch.autograd.grad((r2 * weight).sum(), [w])[0])


def test_captured_leaves_are_asked_again_after_the_hint(launched, asked, device, monkeypatch):
    # autograd.grad(out, [x, w, theta]) with leaves: the engine raises for each captured leaf
    # (it means "used"); the plan then keeps those gradients on for CAPTURE_HINT_CALLS calls
    # without asking, and a different request in that window still gets correct values.
    monkeypatch.setattr(slif_ops, "CAPTURE_HINT_CALLS", 2)
    m, x, weight, expected = leaf_case(device)

    def grads(wanted):
        m.reset()
        return torch.autograd.grad((m(x) * weight).sum(), wanted)

    for g, e in zip(grads([x, m.w, m.v_threshold]), expected):
        assert_close(g, e)
    assert len(asked) == 3 and launched[-1] == (True, True, True)
    for g, e in zip(grads([x, m.w, m.v_threshold]), expected):  # hinted: nothing asked
        assert_close(g, e)
    assert len(asked) == 3
    assert_close(grads([x])[0], expected[0])  # hint left: computed anyway, still exact
    assert len(asked) == 3 and launched[-1] == (True, True, True)
    assert_close(grads([x])[0], expected[0])  # hints spent: asked, parameters skipped
    assert launched[-1] == (True, False, False) and len(asked) == 5


def test_capture_hints_wait_longer_while_the_request_repeats(launched, asked, device,
                                                              monkeypatch):
    # Each new "captured" answer doubles the wait (1, 2, 4, then the cap 4 here): asked at
    # calls 1, 3, 6, 11, 16; a plain answer resets it.
    monkeypatch.setattr(slif_ops, "CAPTURE_HINT_CALLS", 1)
    monkeypatch.setattr(slif_ops, "CAPTURE_HINT_MAX_CALLS", 4)
    m, x, weight, expected = leaf_case(device)
    for asked.call in range(1, 17):
        m.reset()
        for g, e in zip(torch.autograd.grad((m(x) * weight).sum(), [x, m.w, m.v_threshold]),
                        expected):
            assert_close(g, e)
    assert sorted(set(asked)) == [1, 3, 6, 11, 16] and len(asked) == 15
    hints = next(iter(m._plans.values())).capture_hints
    assert [h[1] for h in hints] == [4, 4, 4, 0]  # x, w, theta captured; no v_init
    for h in hints:
        h[0] = 0
    m.reset()
    torch.autograd.grad((m(x) * weight).sum(), [x])  # w, theta answer "no": waits reset
    assert launched[-1] == (True, False, False) and [h[1] for h in hints] == [4, 0, 0, 0]


def test_initial_state_gradient_only_when_used(launched, device):
    # v_init read by the kernel, its gradient stored only when its edge runs: not for a
    # detached carried state, nor for a non-leaf state nobody asks about.
    stored = launched.states
    m, x, weight, _ = leaf_case(device)
    torch.manual_seed(6)
    a = (torch.rand(3, 4, dtype=torch.float64, device=device) * 0.5).requires_grad_(True)
    w, theta = m.w, m.v_threshold

    def grads(wanted, state):  # state(): a fresh v_init for each graph
        out = slif(x, w, theta, v_init=state(), backend="triton")
        ref = slif(x, w, theta, v_init=state(), backend="reference")
        got = torch.autograd.grad((out * weight).sum(), wanted)
        for g, e in zip(got, torch.autograd.grad((ref * weight).sum(), wanted)):
            assert_close(g, e)

    grads([w], lambda: a * 2)  # a non-leaf state, not asked for
    assert stored[-1] == (True, False)
    grads([w, a], lambda: a * 2)
    assert stored[-1] == (True, True)
    grads([x, w], lambda: (a * 2).detach())  # needs_input_grad already says no
    assert stored[-1] == (True, False)
    m.reset()  # the module carrying its state across calls: the second call's v_init edge
    m(x)       # leads to the first call, which holds x
    (gx,) = torch.autograd.grad((m(x) * weight).sum(), [x])
    assert stored[-2:] == [(True, True), (False, False)]  # second call's node, then first's
    _, v1 = slif(x, w, theta, backend="reference", return_state=True)
    s2 = slif(x, w, theta, v_init=v1, backend="reference")
    assert_close(gx, torch.autograd.grad((s2 * weight).sum(), [x])[0])


def test_no_question_when_one_input_needs_grad(launched, device, monkeypatch):
    def refuse(node):
        raise AssertionError("asked the engine with a single gradient to compute")

    monkeypatch.setattr(slif_ops, "_will_engine_execute_node", refuse)
    m, x, weight, expected = leaf_case(device)
    m.requires_grad_(False)
    (gx,) = torch.autograd.grad((m(x) * weight).sum(), [x])
    assert launched[-1] == (True, False, False)
    assert_close(gx, expected[0])
