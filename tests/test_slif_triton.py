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
from slif_cases import (assert_matches, covering_cases, make_inputs, reference_for, run_case,
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
