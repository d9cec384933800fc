"""The sLIF launch path: plans, in-kernel parameter-gradient partials, skipped gradients,
byte spikes, cached module plans, torch.compile with Inductor (CPU, under the interpreter).

GPU-only checks (CUDA graphs, no host synchronisation) are in test_slif_cuda_graphs.py.
"""
import pytest
import torch

from effst import slif
from effst.nn import LIF, PLIF, SLIF
from effst.ops import slif as slif_ops
from effst.ops.layout import resolve_parameter_layout
from slif_cases import assert_matches, covering_cases, make_inputs, reference_for, run_case

COVERING = covering_cases()


def plan_for(x_shape, w_shape, theta_shape, channel_dim=-1, **options):
    step = x_shape[1:]
    return slif_ops.make_plan(
        "triton", x_shape, torch.float32, resolve_parameter_layout(w_shape, step, channel_dim, "w"),
        resolve_parameter_layout(theta_shape, step, channel_dim, "v_threshold"),
        options.get("v_reset", 0.0), 1, 2.0, False, True)


def test_plan_chooses_partials_by_channel_span():
    # channels along dim 0 of [4, 130]: each channel spans 130 >= MIN_PARTIAL_ROW neurons
    plan = plan_for((3, 4, 130), (4,), (), channel_dim=0)
    assert (plan.row_len, plan.rows, plan.w_partial, plan.theta_partial) == (130, 4, True, True)
    assert plan.programs == 4 * plan.column_blocks
    # channel-last: spans of one neuron -> the tiled grid (test_tiled_plan_for_short_channel_runs)
    plan = plan_for((3, 40, 6), (6,), ())
    assert (plan.tile_rows > 0, plan.w_partial, plan.theta_partial) == (True, True, True)
    # per-neuron parameters are stored per neuron (that is the parameter's shape)
    plan = plan_for((3, 40, 6), (40, 6), (40, 6))
    assert not plan.w_partial and not plan.theta_partial


def test_tiled_plan_for_short_channel_runs(monkeypatch):
    # Channel runs shorter than MIN_PARTIAL_ROW: [row tiles, row_len] column partials, row_len
    # a multiple of the channel period; the partial buffer is N / tile_rows plus idle columns.
    rows, columns = slif_ops.BACKWARD_BLOCK // slif_ops.TILE_COLUMNS, slif_ops.TILE_COLUMNS
    for x_shape, channel_dim, period in [((8, 64, 65536), -1, 65536),  # the neuron benchmark
                                         ((4, 64, 64, 384), -1, 384),  # Spikformer-like
                                         ((3, 1000, 3), -1, 3), ((2, 50, 7, 9), 1, 63)]:
        C = x_shape[1:][channel_dim]
        plan = plan_for(x_shape, (C,), (C,), channel_dim=channel_dim)
        assert (plan.tile_rows, plan.backward_block) == (rows, columns)
        assert plan.w_partial and plan.theta_partial and plan.row_len % period == 0
        assert plan.rows == (plan.N + plan.row_len * rows - 1) // (plan.row_len * rows)
        idle = plan.column_blocks * columns / plan.row_len  # lanes per useful column
        assert idle < 1.13
        assert plan.parameter_gradient_size(True) <= plan.N / rows + plan.row_len
    plan = plan_for((8, 64, 65536), (65536,), (65536,))
    assert plan.parameter_gradient_size(True) * 16 == plan.N  # 1 partial per 16 neurons
    # one parameter per layer or per neuron beside a per-channel one
    plan = plan_for((3, 40, 6), (6,), (40, 6))
    assert plan.tile_rows and plan.w_partial and not plan.theta_partial
    plan = plan_for((3, 40, 6), (), (6,))
    assert plan.tile_rows and plan.w_partial and plan.theta_partial
    # long channel runs keep one partial per program; no per-channel parameter: no tiles
    assert plan_for((3, 4, 130), (4,), (), channel_dim=0).tile_rows == 0
    assert plan_for((3, 40, 6), (), (40, 6)).tile_rows == 0
    # the contract path (partials=False) keeps per-neuron gradients
    step = (40, 6)
    layout = resolve_parameter_layout((6,), step, -1, "w")
    plan = slif_ops.make_plan("triton", (3,) + step, torch.float32, layout, layout, 0.0, 1, 2.0,
                              False, True, partials=False)
    assert plan.tile_rows == 0 and not plan.w_partial
    # more row tiles than grid dimension 1 allows, or EFFST_SLIF_TILE_COLUMNS=0: per neuron
    monkeypatch.setattr(slif_ops, "TILE_COLUMNS", 0)
    plan = plan_for((3, 1000, 3), (3,), (3,))
    assert plan.tile_rows == 0 and not plan.w_partial and plan.rows == 1
    monkeypatch.setattr(slif_ops, "TILE_COLUMNS", 32)
    monkeypatch.setattr(slif_ops, "MAX_GRID_ROWS", 1)  # (3000 neurons: 2 tiles of 16 x 96)
    plan = plan_for((3, 1000, 3), (3,), (3,))
    assert plan.tile_rows == 0 and not plan.w_partial and plan.rows == 1


@pytest.mark.parametrize("index", range(0, len(COVERING), 2))
def test_partials_match_reference_for_every_layout(index, device, monkeypatch):
    # With MIN_PARTIAL_ROW = 1 every per-channel parameter of the covering set (channel_dim
    # -1, 0, 1 over 1-3-D per-step shapes) takes the in-kernel partial path.
    monkeypatch.setattr(slif_ops, "MIN_PARTIAL_ROW", 1)
    case = COVERING[index]
    inputs = make_inputs(case, seed=5000 + index)
    expected = reference_for(case, inputs, torch.float64)
    result = run_case(case, inputs, "triton", torch.float64, device)
    assert_matches(result, expected, torch.float64, str(case))


@pytest.mark.parametrize("step_shape,channel_dim", [((2, 3, 130), 1), ((5, 260), 0)])
def test_partials_on_long_channel_spans(step_shape, channel_dim, device):
    # Shapes where the default threshold picks the partial path: several programs per row
    # (260 > BLOCK 256) and several rows per channel entry.
    torch.manual_seed(8)
    C = step_shape[channel_dim]
    x = (torch.randn(10, *step_shape, dtype=torch.float64) + 0.6).to(device)
    g = torch.randn(10, *step_shape, dtype=torch.float64, device=device)
    grads = []
    for backend in ("reference", "triton"):
        w = torch.linspace(-1, 1, C, dtype=torch.float64, device=device).requires_grad_(True)
        theta = torch.tensor(0.9, dtype=torch.float64, device=device).requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        s = slif(xr, w, theta, v_reset=None, channel_dim=channel_dim, backend=backend)
        (s * g).sum().backward()
        grads.append((s.detach(), xr.grad, w.grad, theta.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_only_requested_gradients_are_computed(device, monkeypatch):
    seen = []
    launch = slif_ops._backward

    def spy(*args):  # the gradient buffers it gets (None: not computed): x, w, theta, v_init
        seen.append(tuple(g is not None for g in args[-4:-1]))
        return launch(*args)

    monkeypatch.setattr(slif_ops, "_backward", spy)
    x = (torch.randn(5, 3, 4) + 0.5).to(device).requires_grad_(True)
    w = torch.zeros(4, device=device)  # a buffer, as in LIF
    theta = torch.ones((), device=device, requires_grad=True)
    slif(x, w, theta, backend="triton").sum().backward()
    assert seen[-1] == (True, False, True) and w.grad is None and theta.grad is not None
    x2 = (torch.randn(5, 3, 4) + 0.5).to(device)
    w2 = torch.zeros(4, device=device, requires_grad=True)
    slif(x2, w2, 1.0, backend="triton").sum().backward()
    assert seen[-1] == (False, True, False) and w2.grad is not None


def test_unused_spikes_or_state_need_no_gradient_buffer(device):
    torch.manual_seed(9)
    x = (torch.randn(6, 7) + 0.5).to(device).requires_grad_(True)
    w = torch.zeros((), device=device, requires_grad=True)
    spikes, v = slif(x, w, 1.0, backend="triton", return_state=True)
    v.sum().backward()  # spikes unused: grad_spikes arrives as None
    gx = x.grad.clone()
    x.grad = None
    spikes_r, v_r = slif(x, w, 1.0, backend="reference", return_state=True)
    v_r.sum().backward()
    torch.testing.assert_close(gx, x.grad)


@pytest.mark.parametrize("spike_dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_byte_spikes_equal_float_spikes(spike_dtype, backend, device):
    if backend == "native" and device == "cuda":
        pytest.skip("the native CUDA kernel is covered by test_slif_native")
    torch.manual_seed(10)
    x = (torch.randn(9, 4, 6) + 0.6).to(device)
    w = torch.randn(6, device=device)
    with torch.no_grad():
        bytes_ = slif(x, w, 0.8, backend=backend, spike_dtype=spike_dtype)
    floats = slif(x, w, 0.8, backend=backend)
    assert bytes_.dtype == spike_dtype and bytes_.shape == x.shape
    assert torch.equal(bytes_.to(torch.float32), floats)


def test_byte_spikes_that_need_grad_are_spike_bytes_and_bad_dtypes_refused():
    from effst.ops.spike_bytes import SpikeBytes

    x = torch.randn(3, 4, requires_grad=True)
    spikes = slif(x, 0.0, 1.0, spike_dtype=torch.uint8)  # tests/test_spike_bytes.py: gradients
    assert type(spikes) is SpikeBytes and spikes.spike_bytes.dtype == torch.uint8
    with pytest.raises(ValueError, match="spike_dtype"):
        slif(torch.randn(3, 4), 0.0, 1.0, spike_dtype=torch.int32)
    with pytest.raises(ValueError, match="spike_dtype"):
        SLIF(spike_dtype=torch.float16)
    neuron = PLIF(spike_dtype=torch.uint8)  # w is a Parameter: a SpikeBytes while grad is on
    assert type(neuron(torch.randn(3, 4))) is SpikeBytes
    with torch.inference_mode():
        assert neuron(torch.randn(3, 4)).dtype == torch.uint8


@pytest.mark.parametrize("cls", [SLIF, PLIF, LIF])
def test_module_plans_once_per_shape(cls, device, monkeypatch):
    calls = []
    make = slif_ops.make_plan

    def counting(*args, **kwargs):
        calls.append(args[1])
        return make(*args, **kwargs)

    import effst.nn.neurons as neurons
    monkeypatch.setattr(neurons, "make_plan", counting)
    kwargs = {} if cls is LIF else {"channels": 4}
    m = cls(backend="triton", **kwargs).to(device)
    x = (torch.randn(5, 3, 4) + 0.5).to(device)
    first = m(x)
    m.reset()
    assert torch.equal(m(x), first) and len(calls) == 1
    m(torch.randn(5, 3, 4, device=device))  # state carried over, same plan
    m.reset()
    m(torch.randn(2, 6, 4, device=device))  # new shape: new plan
    assert len(calls) == 2
    m.detach_reset = not m.detach_reset  # an option changes: plans are dropped
    m.reset()
    m(x)
    assert len(calls) == 3
    expected = slif(x, m.w, m.v_threshold, detach_reset=m.detach_reset, backend="reference")
    m.reset()
    torch.testing.assert_close(m(x), expected)


def test_module_rejects_bad_inputs_once_planned():
    m = SLIF(channels=4, backend="triton")
    m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="reset"):
        m(torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="x: expected a tensor"):
        m([1.0, 2.0])
    with pytest.raises(TypeError, match="x: expected a float16"):
        m(torch.zeros(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 5))


def test_module_plans_follow_replaced_parameters_and_moves():
    """A plan holds the parameters' layout and was checked against their device: replacing a
    parameter with another form, or moving the module, drops it (the Triton path kept the
    per-layer plan and read threshold[0] for every channel; a moved module skipped the device
    check)."""
    x = torch.rand(4, 3, 8) * 2
    m = SLIF(backend="triton")
    m(x)
    m.reset()
    m.v_threshold = torch.nn.Parameter(torch.linspace(0.1, 3.0, 8))  # per channel now
    expected = slif(x, m.w, m.v_threshold, backend="reference")
    assert torch.equal(m(x), expected)
    m.reset()
    m.to("meta")
    with pytest.raises(ValueError, match="x: expected a tensor on meta"):
        m(x)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_inductor_training_step_matches_eager(backend, device):
    # torch.compile with the Inductor backend, fullgraph: a Linear + SLIF training step over
    # two calls (the second starts from the first one's state, and the final state is in the
    # loss); the fused kernels run behind the effst:: library ops (Triton here through the
    # interpreter; native on the CPU).
    device = "cpu" if backend == "native" else device
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), SLIF(channels=6, backend=backend)).to(device)
    x = (torch.randn(4, 3, 6) + 0.3).to(device)

    def step(module):
        model[1].reset()
        model.zero_grad()
        out = module(x) + module(x)
        ((out * torch.arange(6, device=device)).sum() + model[1].v.sum()).backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    eager_out, eager_grads = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out, grads = step(compiled)
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("cls", [SLIF, PLIF])
def test_one_autograd_node_per_call(cls, backend, device):
    # The [T, N] view, the parameters' flattening and the gradients' shapes all happen inside
    # the one node: its edges lead straight to the leaves (no View/Reshape/ToCopy nodes).
    device = "cpu" if backend == "native" else device  # the native CUDA node is the same C++
    kwargs = {"channels": 4} if cls is SLIF else {}
    m = cls(backend=backend, **kwargs).to(device)
    x = (torch.randn(5, 3, 4, device=device) + 0.5).requires_grad_(True)
    spikes = m(x)
    node = spikes.grad_fn
    assert ("SLIFNative" if backend == "native" else "SLIFFunction") in node.name()
    leaves = [fn for fn, _ in node.next_functions if fn is not None]
    assert leaves and all(type(fn).__name__ == "AccumulateGrad" for fn in leaves), node.next_functions
    assert {id(fn.variable) for fn in leaves} == {id(x), *(id(p) for p in m.parameters())}
    grads = torch.autograd.grad(spikes.sum(), [x, *m.parameters()])
    assert [g.shape for g in grads] == [x.shape, *(p.shape for p in m.parameters())]


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("T", [4, 20])  # one chunk (no checkpoint tensor saved), several chunks
def test_compiled_autograd_matches_eager_backward(backend, T, device):
    # Compiled autograd traces the backward of an EAGER forward: the saved tensors are the eager
    # path's (x in its own shape, no checkpoint tensor within one chunk), the state carried
    # across two calls, the final state in the loss.
    device = "cpu" if backend == "native" else device

    def gradients(compiled_autograd: bool):
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), SLIF(channels=6, backend=backend)).to(device)
        x = (torch.randn(T, 3, 6) + 0.3).to(device)
        out = model(x) + model(x)
        loss = (out * torch.arange(6, device=device)).sum() + model[1].v.sum()
        if compiled_autograd:
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="inductor", fullgraph=True)):
                loss.backward()
        else:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    if backend == "native":
        # The C++ node implements no compiled_args: PyTorch refuses it by name (documented in
        # docs/slif.md; the Triton path, and the native op under torch.compile, work).
        with pytest.raises(NotImplementedError, match="SLIFNativeBackward"):
            gradients(True)
        return
    for got, want in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
