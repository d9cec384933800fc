"""Triton sLIF kernels (forward and backward) against the float64 autograd reference.

On the CPU these run through the Triton interpreter (conftest sets TRITON_INTERPRET=1); on the
GPU machine bench/gpu_check.sh runs the same file with EFFST_TEST_DEVICE=cuda.
"""
import pytest
import torch

from effst import slif
from effst.ops import slif as slif_ops
from effst.ops.layout import resolve_parameter_layout
from effst.ops.slif import compute_dtype_for, slif_backward_triton, slif_forward_triton
from effst.ops.surrogates import SURROGATE_NAMES
from slif_cases import (Case, assert_matches, covering_cases, make_inputs, reference_for, run_case,
                        surrogate_cases)

COVERING = covering_cases()


@pytest.mark.parametrize("index", range(len(COVERING)), ids=[str(c) for c in COVERING])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_covering_set_matches_reference(index, dtype, device):
    case = COVERING[index]
    inputs = make_inputs(case, seed=1000 + index)
    expected = reference_for(case, inputs, dtype)
    result = run_case(case, inputs, "triton", dtype, device)
    assert_matches(result, expected, dtype, str(case))


@pytest.mark.parametrize("index", range(0, len(COVERING), 3))
def test_float16_io_matches_reference(index, device):
    case = COVERING[index]
    inputs = make_inputs(case, seed=2000 + index)
    expected = reference_for(case, inputs, torch.float16)
    result = run_case(case, inputs, "triton", torch.float16, device)
    assert_matches(result, expected, torch.float16, str(case))


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(0, len(COVERING), 5))
def test_bfloat16_io_matches_reference(index, device):
    # bf16 is unreliable in the CPU interpreter, so this one runs on the GPU machine only.
    case = COVERING[index]
    inputs = make_inputs(case, seed=3000 + index)
    expected = reference_for(case, inputs, torch.bfloat16)
    result = run_case(case, inputs, "triton", torch.bfloat16, device)
    assert_matches(result, expected, torch.bfloat16, str(case))


@pytest.mark.parametrize("max_chunk", [8, 3])  # 3: T = 8 and 17 end in a partial chunk
@pytest.mark.parametrize("index", range(2, len(COVERING), 5))  # all T, all resets
def test_forward_preload_variant_is_bitwise_equal(index, max_chunk, monkeypatch, device):
    # EFFST_SLIF_FORWARD_PRELOAD=1 loads a chunk's x tiles up front and replaces the per-step
    # branch by masks: same arithmetic, so the same bits as the default path, and both match
    # the float64 reference.
    case = COVERING[index]
    inputs = make_inputs(case, seed=5000 + index)
    monkeypatch.setattr(slif_ops, "MAX_CHUNK", max_chunk)
    results = []
    for preload in (False, True):
        monkeypatch.setattr(slif_ops, "FORWARD_PRELOAD", preload)
        results.append(run_case(case, inputs, "triton", torch.float64, device))
    for name, value in results[0].items():
        if value is None:
            assert results[1][name] is None, name
        else:
            torch.testing.assert_close(results[1][name], value, rtol=0, atol=0,
                                       msg=lambda m, n=name: f"{case} {n}: {m}")
    assert_matches(results[1], reference_for(case, inputs, torch.float64), torch.float64,
                   str(case))


@pytest.mark.parametrize("spike_dtype", [torch.float16, torch.uint8, torch.bool])
def test_forward_preload_variant_half_and_byte_spikes(spike_dtype, monkeypatch, device):
    # fp16 input, T = 7 with chunks of 3 (a partial last chunk), spikes as x's dtype or bytes.
    monkeypatch.setattr(slif_ops, "MAX_CHUNK", 3)
    torch.manual_seed(8)
    x = (torch.randn(7, 5, 48) * 1.5 + 0.6).to(torch.float16).to(device)
    w = torch.linspace(-1.0, 1.0, 48, device=device)
    theta = torch.linspace(0.5, 1.2, 48, device=device)
    outs = []
    for preload in (False, True):
        monkeypatch.setattr(slif_ops, "FORWARD_PRELOAD", preload)
        outs.append(slif(x, w, theta, v_reset=0.0, backend="triton", return_state=True,
                         spike_dtype=None if spike_dtype == torch.float16 else spike_dtype))
    expected = slif(x.double(), w.double(), theta.double(), v_reset=0.0, backend="reference",
                    return_state=True)
    assert outs[1][0].dtype == spike_dtype
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # spikes can only differ from the float64 reference where H lands within fp32 rounding of
    # V_th; with these inputs none does
    assert torch.equal(outs[1][0].cpu().double(), expected[0].cpu())
    torch.testing.assert_close(outs[1][1].cpu().double(), expected[1].cpu(), rtol=2e-4,
                               atol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_preload_variant_compiled(dtype, monkeypatch, device):
    # The compiled preload path (the interpreter compiles nothing): T = 8 (one chunk) and
    # T = 17 (a partial last chunk), hard and soft reset, against the default path and the
    # float64 reference.
    for index in (37, 42, 47, 49, 57):
        case = COVERING[index]
        inputs = make_inputs(case, seed=6000 + index)
        results = []
        for preload in (False, True):
            monkeypatch.setattr(slif_ops, "FORWARD_PRELOAD", preload)
            results.append(run_case(case, inputs, "triton", dtype, device))
        torch.testing.assert_close(results[1]["spikes"], results[0]["spikes"], rtol=0, atol=0)
        torch.testing.assert_close(results[1]["v_final"], results[0]["v_final"], rtol=1e-6,
                                   atol=1e-6)
        assert_matches(results[1], reference_for(case, inputs, dtype), dtype, str(case))


SURROGATES = surrogate_cases()


@pytest.mark.parametrize("index", range(len(SURROGATES)), ids=[str(c) for c in SURROGATES])
def test_every_surrogate(index, device):
    case = SURROGATES[index]
    inputs = make_inputs(case, seed=4000 + index)
    expected = reference_for(case, inputs, torch.float64)
    assert_matches(run_case(case, inputs, "triton", torch.float64, device), expected,
                   torch.float64, str(case))


def test_non_default_alpha(device):
    case = SURROGATES[SURROGATE_NAMES.index("sigmoid") * 2]
    inputs = make_inputs(case, seed=7)
    x = inputs["x"].to(device).requires_grad_(True)
    outs = []
    for backend in ("reference", "triton"):
        x.grad = None
        s = slif(x, inputs["w"].to(device), inputs["theta"].to(device), surrogate="atan", alpha=3.7,
                 backend=backend)
        (s * inputs["grad_spikes"].to(device)).sum().backward()
        outs.append((s.detach().cpu(), x.grad.cpu().clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["transposed", "strided_time", "strided_neurons"])
def test_non_contiguous_input(layout, device):
    case = COVERING[55]  # T = 17, per-step shape (3, 5)
    assert case.T == 17 and case.step_shape == (3, 5)
    inputs = make_inputs(case, seed=55)
    transforms = {
        # [T, 3, 5] stored as [T, 5, 3] and transposed back: per-step dims not contiguous
        "transposed": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
        # every other time step of a longer buffer: stride(0) > N
        "strided_time": lambda x: torch.repeat_interleave(x, 2, dim=0)[::2],
        # every other element along the last dim
        "strided_neurons": lambda x: torch.repeat_interleave(x, 2, dim=-1)[..., ::2],
    }
    expected = reference_for(case, inputs, torch.float64)
    result = run_case(case, inputs, "triton", torch.float64, device, x_transform=transforms[layout])
    assert_matches(result, expected, torch.float64, layout)


def test_several_programs_and_ragged_tail(device):
    # N = 2 * 1024 + 37 neurons: more than one program in both kernels, last one partial.
    torch.manual_seed(11)
    x = (torch.randn(9, 2085, dtype=torch.float64) + 0.5).to(device).requires_grad_(True)
    w = torch.randn(2085, dtype=torch.float64, device=device).requires_grad_(True)
    theta = torch.tensor(0.8, dtype=torch.float64, device=device).requires_grad_(True)
    g = torch.randn(9, 2085, dtype=torch.float64, device=device)
    results = []
    for backend in ("reference", "triton"):
        for t in (x, w, theta):
            t.grad = None
        s = slif(x, w, theta, v_reset=None, backend=backend)
        (s * g).sum().backward()
        results.append([s.detach(), x.grad.clone(), w.grad.clone(), theta.grad.clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_scalar_per_step_shape(device):
    # x = [T]: the per-step shape is (), one neuron.
    x = torch.tensor([0.3, 1.2, 0.9, 2.0, -0.1], dtype=torch.float64, device=device)
    spikes = slif(x, torch.tensor(0.0, dtype=torch.float64, device=device), 1.0, backend="triton")
    expected = slif(x, torch.tensor(0.0, dtype=torch.float64, device=device), 1.0, backend="reference")
    torch.testing.assert_close(spikes, expected, rtol=0, atol=0)


def test_backend_contract_backward_without_checkpoints(device):
    # The launcher pair is the contract every backend implements: backward called without the
    # forward's checkpoints recomputes them (T = 17 > one chunk).
    torch.manual_seed(5)
    T, shape = 17, (4, 6)
    x = (torch.randn(T, *shape, dtype=torch.float64) + 0.4).to(device)
    w = torch.randn(6, dtype=torch.float64, device=device)
    theta = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    layout = resolve_parameter_layout(w.shape, shape, -1, "w")
    config = (layout.channels, layout.inner, layout.channels, layout.inner, 0.0, 1, 2.0, False, True)
    x2d = x.reshape(T, -1)
    spikes, v_final = slif_forward_triton(x2d, w, theta, None, *config)
    grad_spikes = torch.randn_like(spikes)
    grad_x, grad_w, grad_theta, _ = slif_backward_triton(grad_spikes, None, x2d, w, theta, None, *config)
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    tr = theta.clone().requires_grad_(True)
    s = slif(xr, wr, tr, backend="reference")
    (s * grad_spikes.reshape(s.shape)).sum().backward()
    torch.testing.assert_close(spikes.reshape(s.shape), s.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad_x.reshape(s.shape), xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_w.reshape(4, 6).sum(0), wr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_theta.reshape(4, 6).sum(0), tr.grad, rtol=1e-9, atol=1e-9)
    assert compute_dtype_for(torch.float16) == torch.float32


@pytest.mark.gpu  # under the interpreter programs run one after another: it could not fail
def test_parameter_gradient_is_deterministic(device):
    torch.manual_seed(3)
    x = (torch.randn(6, 8, 300) + 0.5).to(device)
    grads = []
    for _ in range(2):
        w = torch.zeros(300, device=device, requires_grad=True)
        theta = torch.ones((), device=device, requires_grad=True)
        slif(x, w, theta, backend="triton").sum().backward()
        grads.append((w.grad.clone(), theta.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements(device):
    # Index arithmetic must be 64-bit: 2**31 + 4096 elements (bf16, ~4 GiB per tensor).
    T, N = 2, 2**30 + 2048
    x = torch.full((T, N), 0.75, dtype=torch.bfloat16, device=device)
    x[:, -1] = 3.0
    spikes = slif(x, torch.tensor(0.0, device=device), 1.0, backend="triton")
    # k = 0.5: H1 = 0.375, H2 = 0.5625 (no spikes) except the last neuron: H1 = 1.5 spikes.
    assert spikes[:, :-1].sum().item() == 0
    assert spikes[0, -1].item() == 1 and spikes[1, -1].item() == 1


# Tiled backward (channel runs shorter than MIN_PARTIAL_ROW, e.g. channel-last parameters):
# 4 x 16 tiles here so that small inputs span several row tiles and column blocks, with a
# ragged last row and a ragged last tile. (step shape, channel_dim, w form, theta form)
TILED_CASES = [
    ((37, 6), -1, "channel", "channel"),  # period 6: rows of 48, 5 rows (last 30), 2 tiles
    ((11, 7, 3), -1, "channel", "layer"),  # C = 3: rows of 48, 5 rows (last 39)
    ((19, 40), -1, "layer", "channel"),   # C = 40 (a scaled-down 384): rows of 160, 5 rows
    ((6, 5), 0, "neuron", "channel"),     # inner = 5: period 30, one row; w stays per neuron
    ((7, 9, 10), 1, "channel", "neuron"),  # inner = 10, C = 9: rows of 90, 7 rows
]


def _tiled_case(index: int, T: int = 11, **overrides) -> Case:
    shape, channel_dim, w_form, theta_form = TILED_CASES[index]
    options = dict(T=T, step_shape=shape, w_form=w_form, theta_form=theta_form,
                   v_reset=[0.0, None, -0.3][index % 3], detach_reset=index % 2 == 1,
                   decay_input=index % 4 != 3, surrogate=SURROGATE_NAMES[index % len(SURROGATE_NAMES)],
                   with_v_init=True, with_grad_v_final=True, channel_dim=channel_dim)
    options.update(overrides)
    return Case(**options)


def _small_tiles(monkeypatch):
    monkeypatch.setattr(slif_ops, "BACKWARD_BLOCK", 64)
    monkeypatch.setattr(slif_ops, "TILE_COLUMNS", 16)


def _plan_of(case: Case):
    step = case.step_shape
    channel = step[case.channel_dim]
    shapes = {"layer": (), "channel": (channel,), "neuron": step}
    return slif_ops.make_plan(
        "triton", (case.T,) + step, torch.float64,
        resolve_parameter_layout(shapes[case.w_form], step, case.channel_dim, "w"),
        resolve_parameter_layout(shapes[case.theta_form], step, case.channel_dim, "v_threshold"),
        case.v_reset, 1, 2.0, case.detach_reset, case.decay_input)


def _check_tiled(case: Case, seed: int, dtype: torch.dtype, device: str) -> None:
    # Separate input tensors for the two runs: run_case marks float64 inputs themselves as
    # leaves, so a shared input would accumulate both runs' gradients into one .grad.
    expected = reference_for(case, make_inputs(case, seed), dtype)
    result = run_case(case, make_inputs(case, seed), "triton", dtype, device)
    assert result["grad_w"] is not None and result["grad_theta"] is not None
    assert_matches(result, expected, dtype, f"{case} {dtype}")


@pytest.mark.parametrize("index", range(len(TILED_CASES)))
def test_tiled_parameter_gradients_match_reference(index, monkeypatch, device):
    _small_tiles(monkeypatch)
    case = _tiled_case(index)
    plan = _plan_of(case)
    assert plan.tile_rows == 4 and plan.backward_block == 16, plan
    assert plan.w_partial == (case.w_form != "neuron")
    assert plan.theta_partial == (case.theta_form != "neuron")
    # fp32 and fp16 I/O too for the first case, at their tolerances
    for dtype in (torch.float64, torch.float32, torch.float16)[:3 if index == 0 else 1]:
        _check_tiled(case, 7000 + index, dtype, device)


@pytest.mark.parametrize("wanted", [("x",), ("w",), ("theta",), ("w", "theta")])
def test_tiled_backward_computes_only_requested_gradients(wanted, monkeypatch, device):
    # T = 3, one chunk; w per channel (C = 6) and theta per layer, channel-last.
    _small_tiles(monkeypatch)
    torch.manual_seed(21)
    x = (torch.randn(3, 37, 6, dtype=torch.float64) * 1.5 + 0.6).to(device)
    w = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64, device=device)
    theta = torch.tensor(0.9, dtype=torch.float64, device=device)
    g = torch.randn(3, 37, 6, dtype=torch.float64, device=device)
    grads = []
    for backend in ("reference", "triton"):
        leaves = {"x": x.clone(), "w": w.clone(), "theta": theta.clone()}
        for name in wanted:
            leaves[name].requires_grad_(True)
        (slif(leaves["x"], leaves["w"], leaves["theta"], backend=backend) * g).sum().backward()
        grads.append({name: leaves[name].grad for name in leaves})
    for name in ("x", "w", "theta"):
        if name in wanted:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-9)
        else:
            assert grads[1][name] is None


def test_tiled_fallback_when_row_tiles_exceed_the_grid(monkeypatch, device):
    # More row tiles than grid dimension 1 allows: per-neuron gradients, summed afterwards.
    _small_tiles(monkeypatch)
    monkeypatch.setattr(slif_ops, "MAX_GRID_ROWS", 1)
    case = _tiled_case(0, T=4)
    plan = _plan_of(case)
    assert plan.tile_rows == 0 and not plan.w_partial and not plan.theta_partial
    _check_tiled(case, 7100, torch.float64, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tiled_backward_compiled(dtype, device):
    # The compiled tiled path at the default tile (BACKWARD_BLOCK // TILE_COLUMNS rows): [T, 70,
    # 4, 384] channel-last (17 row tiles, the last one ragged) and C = 3, T = 8 and 17, run twice
    # for bitwise-equal parameter gradients (no atomics).
    for index, (shape, T) in enumerate((((70, 4, 384), 8), ((333, 3), 17))):
        case = Case(T=T, step_shape=shape, w_form="channel", theta_form="channel", v_reset=0.0,
                    detach_reset=False, decay_input=True, surrogate="atan", with_v_init=index == 1,
                    with_grad_v_final=True)
        assert _plan_of(case).tile_rows > 0
        first, second = (run_case(case, make_inputs(case, 7200 + index), "triton", dtype, device)
                         for _ in range(2))
        for name in ("grad_w", "grad_theta"):
            assert torch.equal(first[name], second[name]), name
        _check_tiled(case, 7200 + index, dtype, device)
