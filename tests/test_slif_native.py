"""Native sLIF backend (C++ CPU kernel; CUDA kernel on the GPU machine) against the float64
autograd reference, on the same covering set of configurations as the Triton tests.

The extension is built once per test session (effst.ops.slif_native caches the build on disk
and the loaded library in the process). CI has a C++ compiler and ninja, so an unavailable
extension is a failure here, not a skip.
"""
import importlib.machinery
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import effst.nn
import effst.ops.slif as slif_module
from effst import slif
from effst.ops import slif_native
from effst.ops.layout import reduce_to_parameter, resolve_parameter_layout
from effst.ops.surrogates import DEFAULT_ALPHA, SURROGATE_NAMES, resolve_surrogate, surrogate_grad
from slif_cases import (Case, assert_matches, covering_cases, make_inputs, reference_for,
                        run_case, surrogate_cases)

REPO = Path(__file__).resolve().parents[1]
COVERING = covering_cases()
SURROGATES = surrogate_cases()


@pytest.fixture(scope="module", autouse=True)
def native_extension():
    ok, reason = slif_native.native_status()
    if not ok:
        pytest.fail(f"the native extension could not be built or loaded: {reason}")


def _cpu_isas() -> list[str]:
    return ["baseline", "avx2"] if slif_native.native_build_info()["cpu_isa"] == "avx2" else ["baseline"]


# ----------------------------------------------------------------------------- surrogates
@pytest.mark.parametrize("name", SURROGATE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_surrogates_match_python_definitions(name, dtype):
    # The header's surrogate ids must follow SURROGATE_NAMES and compute the same sigma'(x).
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64)
    for alpha in (DEFAULT_ALPHA[name], 0.7, 3.1):
        # include the kinks of the piecewise surrogates and points just beside them
        edges = torch.tensor([1 / alpha, alpha / 2], dtype=torch.float64)
        points = torch.cat([x, edges, -edges, edges * (1 + 1e-6), edges * (1 - 1e-6)]).to(dtype)
        got = slif_native.native_surrogate_grad(points, name, alpha)
        want = surrogate_grad(points, name, alpha)
        assert got.dtype == dtype
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name} alpha={alpha}: {m}")
    assert resolve_surrogate(name, None)[0] == SURROGATE_NAMES.index(name)


# ----------------------------------------------------------------------------- covering set
@pytest.mark.parametrize("index", range(len(COVERING)), ids=[str(c) for c in COVERING])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_covering_set_matches_reference(index, dtype):
    case = COVERING[index]
    inputs = make_inputs(case, seed=1000 + index)
    assert_matches(run_case(case, inputs, "native", dtype), reference_for(case, inputs, dtype),
                   dtype, str(case))


@pytest.mark.parametrize("index", range(len(SURROGATES)), ids=[str(c) for c in SURROGATES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_surrogate(index, dtype):
    case = SURROGATES[index]
    inputs = make_inputs(case, seed=4000 + index)
    assert_matches(run_case(case, inputs, "native", dtype), reference_for(case, inputs, dtype),
                   dtype, str(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(0, len(COVERING), 4))
def test_16bit_io_matches_reference(index, dtype):
    case = COVERING[index]
    inputs = make_inputs(case, seed=2000 + index)
    result = run_case(case, inputs, "native", dtype)
    assert_matches(result, reference_for(case, inputs, dtype), dtype, str(case))


@pytest.mark.parametrize("index", range(0, len(COVERING), 7))
def test_cpu_kernel_builds_agree_bit_for_bit(index, monkeypatch):
    # The AVX2 and the portable build round every operation the same way (no FMA contraction).
    case = COVERING[index]
    inputs = make_inputs(case, seed=5000 + index)
    results = []
    for isa in _cpu_isas():
        monkeypatch.setenv("EFFST_NATIVE_CPU_ISA", isa)
        results.append(run_case(case, inputs, "native", torch.float32))
    for name, value in results[0].items():
        if value is not None:
            assert torch.equal(value, results[-1][name]), f"{case} {name}: builds differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_streaming_stores_give_the_same_results(dtype, monkeypatch):
    # Outputs of 8 MiB and more are written with streaming stores; force both ways on a small
    # case whose rows start at unaligned addresses (N = 1003) and compare bit for bit.
    case = Case(T=5, step_shape=(17, 59), w_form="channel", theta_form="neuron", v_reset=0.0,
                detach_reset=True, decay_input=True, surrogate="atan", with_v_init=True,
                with_grad_v_final=True)
    inputs = make_inputs(case, seed=99)
    results = []
    for stream in ("0", "1"):
        monkeypatch.setenv("EFFST_NATIVE_CPU_STREAM", stream)
        results.append(run_case(case, inputs, "native", dtype))
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), f"{name}: streaming changed the result"
    assert_matches(results[1], reference_for(case, inputs, dtype), dtype, "streamed")


def test_block_size_does_not_change_results(monkeypatch):
    # Neurons are split into blocks (per-thread work items); tiny and odd block sizes put block
    # boundaries inside channel runs and give ragged last blocks. Results must not change.
    case = next(c for c in COVERING if c.T == 17 and c.w_form == "channel" and c.channel_dim == 0)
    inputs = make_inputs(case, seed=100)
    default = run_case(case, inputs, "native", torch.float64)
    for block in ("7", "64"):
        monkeypatch.setenv("EFFST_NATIVE_CPU_BLOCK", block)
        result = run_case(case, inputs, "native", torch.float64)
        for name, value in default.items():
            if value is not None:
                assert torch.equal(value, result[name]), f"block={block} {name}"
    monkeypatch.setenv("EFFST_NATIVE_CPU_BLOCK", "0")
    with pytest.raises(RuntimeError, match="EFFST_NATIVE_CPU_BLOCK: expected a positive integer"):
        run_case(case, inputs, "native", torch.float64)


def test_unknown_cpu_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("EFFST_NATIVE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="EFFST_NATIVE_CPU_ISA: expected 'baseline' or 'avx2'"):
        slif(torch.randn(2, 3), torch.tensor(0.0), 1.0, backend="native")


def test_non_default_alpha():
    case = SURROGATES[0]
    inputs = make_inputs(case, seed=7)
    x = inputs["x"].clone().requires_grad_(True)
    outs = []
    for backend in ("reference", "native"):
        x.grad = None
        s = slif(x, inputs["w"], inputs["theta"], surrogate="sigmoid", alpha=3.7, backend=backend)
        (s * inputs["grad_spikes"]).sum().backward()
        outs.append((s.detach(), x.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["transposed", "strided_time", "strided_neurons", "expanded_time"])
def test_non_contiguous_input(layout):
    case = COVERING[55]  # T = 17, per-step shape (3, 5)
    assert case.T == 17 and case.step_shape == (3, 5)
    inputs = make_inputs(case, seed=55)
    transforms = {
        "transposed": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
        "strided_time": lambda x: torch.repeat_interleave(x, 2, dim=0)[::2],
        "strided_neurons": lambda x: torch.repeat_interleave(x, 2, dim=-1)[..., ::2],
        # the same step repeated: row stride 0
        "expanded_time": lambda x: x[:1].expand_as(x),
    }
    if layout == "expanded_time":
        inputs = dict(inputs, x=inputs["x"][:1].expand_as(inputs["x"]).clone())
    expected = reference_for(case, inputs, torch.float64)
    result = run_case(case, inputs, "native", torch.float64, x_transform=transforms[layout])
    assert_matches(result, expected, torch.float64, layout)


def test_many_blocks_on_several_threads_and_determinism():
    # Large enough to be split into blocks run on both threads; the channel entries (inner = 41)
    # straddle block boundaries. Two runs must give bit-identical parameter gradients.
    torch.manual_seed(11)
    T, shape = 9, (5, 37, 41)
    x = (torch.randn(T, *shape, dtype=torch.float64) * 1.5 + 0.6).requires_grad_(True)
    w = (torch.rand(37, dtype=torch.float64) * 3 - 1.5).requires_grad_(True)
    theta = (torch.rand(37, dtype=torch.float64) + 0.4).requires_grad_(True)
    g = torch.randn(T, *shape, dtype=torch.float64)
    results = []
    for backend in ("reference", "native", "native"):
        for t in (x, w, theta):
            t.grad = None
        s = slif(x, w, theta, v_reset=None, channel_dim=1, backend=backend)
        (s * g).sum().backward()
        results.append([s.detach(), x.grad.clone(), w.grad.clone(), theta.grad.clone()])
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)
    assert torch.get_num_threads() >= 1


def test_scalar_per_step_shape():
    x = torch.tensor([0.3, 1.2, 0.9, 2.0, -0.1], dtype=torch.float64)
    w = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(slif(x, w, 1.0, backend="native"), slif(x, w, 1.0, backend="reference"),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- the contract
def _contract_inputs(T=17, shape=(4, 6), dtype=torch.float64, seed=5):
    torch.manual_seed(seed)
    x = torch.randn(T, *shape, dtype=dtype) + 0.4
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(shape[-1], dtype=cd)
    theta = torch.rand(shape[-1], dtype=cd) + 0.5
    layout = resolve_parameter_layout(w.shape, shape, -1, "w")
    config = (layout.channels, layout.inner, layout.channels, layout.inner, 0.0, 1, 2.0, False, True)
    return x, w, theta, layout, config


def test_kernel_contract_against_reference():
    x, w, theta, layout, config = _contract_inputs()
    T = x.shape[0]
    x2d = x.reshape(T, -1)
    spikes, v_final = slif_native.slif_forward_native(x2d, w, theta, None, *config)
    assert spikes.dtype == x.dtype and spikes.shape == x2d.shape and v_final.shape == (x2d.shape[1],)
    grad_spikes = torch.randn_like(spikes)
    grad_x, grad_w, grad_theta, grad_v_init = slif_native.slif_backward_native(
        grad_spikes, None, x2d, w, theta, None, *config)
    assert grad_w.shape == grad_theta.shape == (x2d.shape[1],)
    assert grad_v_init.shape == (1,) and not grad_v_init.any()  # placeholder: no v_init
    xr, wr, tr = (t.clone().requires_grad_(True) for t in (x, w, theta))
    s, v = slif(xr, wr, tr, backend="reference", return_state=True)
    (s * grad_spikes.reshape(s.shape)).sum().backward()
    torch.testing.assert_close(spikes.reshape(s.shape), s.detach(), rtol=0, atol=0)
    torch.testing.assert_close(v_final.reshape(v.shape), v.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x.reshape(s.shape), xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reduce_to_parameter(grad_w, layout.channels, layout.inner), wr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reduce_to_parameter(grad_theta, layout.channels, layout.inner), tr.grad, rtol=1e-9, atol=1e-9)


def test_kernel_contract_empty_sequence_and_no_neurons():
    _, w, theta, _, config = _contract_inputs()
    v_init = torch.randn(24, dtype=torch.float64)
    spikes, v_final = slif_native.slif_forward_native(torch.empty(0, 24, dtype=torch.float64), w,
                                                      theta, v_init, *config)
    assert spikes.shape == (0, 24) and torch.equal(v_final, v_init)
    grad_v_final = torch.randn(24, dtype=torch.float64)
    gx, gw, gth, gv = slif_native.slif_backward_native(
        torch.empty(0, 24, dtype=torch.float64), grad_v_final, torch.empty(0, 24, dtype=torch.float64),
        w, theta, v_init, *config)
    assert gx.shape == (0, 24) and torch.equal(gv, grad_v_final)
    assert not gw.any() and not gth.any()
    spikes, v_final = slif_native.slif_forward_native(torch.empty(3, 0), torch.zeros(1), torch.ones(1),
                                                      None, 1, 1, 1, 1, None, 1, 2.0, False, True)
    assert spikes.shape == (3, 0) and v_final.shape == (0,)


@pytest.mark.parametrize("bad, message", [
    (lambda a: dict(a, w=a["w"].float()), "w: expected dtype"),
    (lambda a: dict(a, theta=a["theta"][:-1]), "theta: expected a 1-D tensor of 6"),
    (lambda a: dict(a, x2d=a["x2d"].unsqueeze(0)), "x: expected a 2-D"),
    (lambda a: dict(a, x2d=a["x2d"].to(torch.int32)), "x: expected dtype float32, float64"),
    (lambda a: dict(a, v_init=torch.zeros(5, dtype=torch.float64)), "v_init: expected a 1-D tensor of 24"),
    (lambda a: dict(a, surrogate_id=8), "surrogate_id: expected an index"),
    (lambda a: dict(a, alpha=float("nan")), "alpha: expected a finite value > 0"),
    (lambda a: dict(a, v_reset=float("inf")), "v_reset: expected a finite float or None"),
    (lambda a: dict(a, w_inner=0), "w_channels/w_inner: expected values >= 1"),
])
def test_kernel_contract_errors_name_the_argument(bad, message):
    x, w, theta, layout, config = _contract_inputs()
    args = dict(x2d=x.reshape(x.shape[0], -1), w=w, theta=theta, v_init=None,
                w_channels=layout.channels, w_inner=layout.inner, theta_channels=layout.channels,
                theta_inner=layout.inner, v_reset=0.0, surrogate_id=1, alpha=2.0,
                detach_reset=False, decay_input=True)
    with pytest.raises(RuntimeError, match=message):
        slif_native.slif_forward_native(**bad(args))


def test_backward_checks_grad_spikes():
    x, w, theta, _, config = _contract_inputs()
    x2d = x.reshape(x.shape[0], -1)
    with pytest.raises(RuntimeError, match="grad_spikes: expected shape"):
        slif_native.slif_backward_native(x2d[:, :5], None, x2d, w, theta, None, *config)
    with pytest.raises(RuntimeError, match="grad_spikes: expected dtype"):
        slif_native.slif_backward_native(x2d.float(), None, x2d, w, theta, None, *config)
    with pytest.raises(RuntimeError, match="grad_v_final: expected dtype"):
        slif_native.slif_backward_native(x2d, torch.zeros(24), x2d, w, theta, None, *config)


# ----------------------------------------------------------------------------- modules / dispatch
def test_slif_module_trains_like_the_reference():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 10, 8) * 1.5 + 0.6
    grads = []
    for backend in ("reference", "native"):
        torch.manual_seed(0)
        neuron = effst.nn.SLIF(tau=2.5, channels=8, detach_reset=True, backend=backend)
        with torch.no_grad():
            neuron.w.add_(torch.linspace(-0.5, 0.5, 8))
        first = neuron(x)
        second = neuron(x)  # continues from the stored membrane
        (first.sum() + 2 * second.sum()).backward()
        grads.append((first, second, neuron.w.grad.clone(), neuron.v_threshold.grad.clone()))
        neuron.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


def test_auto_uses_native_on_cpu():
    assert slif_module.resolve_backend("auto", torch.device("cpu")) == "native"


def test_unavailable_extension_auto_warns_once_and_explicit_raises(monkeypatch):
    monkeypatch.setattr(slif_native, "_status", (False, "no C++ compiler found (test)"))
    monkeypatch.setattr(slif_module, "_warned_native_fallback", False)
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="no C.. compiler found .test.") as record:
        out = slif(x, torch.tensor(0.0), 1.0, backend="auto")
        slif(x, torch.tensor(0.0), 1.0, backend="auto")
    assert len([w for w in record if "native sLIF extension unavailable" in str(w.message)]) == 1
    torch.testing.assert_close(out, slif(x, torch.tensor(0.0), 1.0, backend="reference"))
    with pytest.raises(RuntimeError, match="backend='native'.*no C.. compiler found"):
        slif(x, torch.tensor(0.0), 1.0, backend="native")


def test_disable_variable_reports_why(monkeypatch):
    monkeypatch.setenv("EFFST_NATIVE_DISABLE", "1")
    assert slif_native._load() == (False, "disabled by EFFST_NATIVE_DISABLE=1")


def test_cuda_build_failure_keeps_the_cpu_kernel(monkeypatch):
    # If nvcc cannot build the CUDA kernels (e.g. a toolkit that does not match torch), the
    # CPU kernel is still built, with a warning, and the reason is kept for the CUDA error.
    calls = []

    def fake_build(config, with_cuda):
        calls.append(with_cuda)
        if with_cuda:
            raise RuntimeError("nvcc fatal   : Unsupported gpu architecture 'compute_100'")

    monkeypatch.setattr(slif_native, "_cuda_note", "")
    monkeypatch.setattr(slif_native, "_want_cuda", lambda: True)
    monkeypatch.setattr(slif_native, "_build", fake_build)
    with pytest.warns(UserWarning, match="compiling the CUDA kernels failed: nvcc fatal"):
        slif_native._build_on_first_use(slif_native._build_config())
    assert calls == [True, False]
    assert "Unsupported gpu architecture" in slif_native._cuda_note


def test_stale_ahead_of_time_build_is_not_loaded(tmp_path, monkeypatch):
    # A built effst._native whose recorded source hash differs from the sources is skipped
    # (importing it would register stale ops under the same names).
    fake = tmp_path / "_native.cpython-311-x86_64-linux-gnu.so"
    fake.write_bytes(b"not a library")
    (tmp_path / "_native.sha1").write_text("0123456789abcdef\n")
    spec = importlib.machinery.ModuleSpec("effst._native", None, origin=str(fake))
    monkeypatch.setattr(slif_native.importlib.util, "find_spec",
                        lambda name: spec if name == "effst._native" else None)
    note = slif_native._load_ahead_of_time(slif_native._build_config())
    assert note is not None and "stale" in note and str(fake) in note


def test_build_info_and_cache_dir():
    info = slif_native.native_build_info()
    assert info["source_hash"] == slif_native._build_config().source_hash()
    assert info["cpu_isa"] in ("avx2", "baseline") and info["cuda"] in ("0", "1")
    assert "native" in str(slif_native.cache_dir())


def test_prebuild_command_reports_ready():
    # The one-liner the bootstrap runs to build the extension ahead of the tests.
    out = subprocess.run([sys.executable, "-m", "effst.ops.slif_native"], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "effst native extension: ready" in out.stdout


# ----------------------------------------------------------------------------- CUDA (GPU machine)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(0, len(COVERING), 3))
def test_cuda_kernel_matches_reference(index, dtype, device):
    if slif_native.native_build_info()["cuda"] != "1":
        pytest.fail("the native extension was built without CUDA kernels on a CUDA machine "
                    "(no nvcc / CUDA toolkit found when it was built)")
    case = COVERING[index]
    inputs = make_inputs(case, seed=6000 + index)
    assert_matches(run_case(case, inputs, "native", dtype, device), reference_for(case, inputs, dtype),
                   dtype, str(case))


@pytest.mark.gpu
def test_cuda_long_sequence_crosses_checkpoints(device):
    case = Case(T=53, step_shape=(7, 129), w_form="channel", theta_form="neuron", v_reset=None,
                detach_reset=False, decay_input=True, surrogate="atan", with_v_init=True,
                with_grad_v_final=True)
    inputs = make_inputs(case, seed=77)
    assert_matches(run_case(case, inputs, "native", torch.float64, device),
                   reference_for(case, inputs, torch.float64), torch.float64, str(case))
    assert math.ceil(case.T / 16) > 1


def test_autograd_lives_in_cpp():
    # backend='native' on the CPU is one operator call whose backward node is C++
    # (csrc/slif_autograd.cpp): no Python autograd Function, parameter sums done in C++.
    torch.manual_seed(21)
    x = (torch.randn(5, 3, 4, dtype=torch.float64) + 0.5).requires_grad_(True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.8, dtype=torch.float64)  # needs no gradient
    spikes, v = slif(x, w, theta, v_reset=None, backend="native", return_state=True)
    node = spikes.grad_fn
    while node is not None and "SLIFNative" not in node.name():
        node = node.next_functions[0][0]
    assert node is not None, spikes.grad_fn
    (spikes.sum() + v.sum()).backward()
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    sr, vr = slif(xr, wr, theta, v_reset=None, backend="reference", return_state=True)
    (sr.sum() + vr.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-9, atol=1e-9)
    with torch.inference_mode():  # below the Autograd key: the forward alone
        assert torch.equal(slif(x, w, theta, v_reset=None, backend="native"), sr.detach())


@pytest.mark.parametrize("with_v_init", [False, True])
def test_opcheck_native_autograd_op(with_v_init):
    # effst_native::slif: schema, autograd registration and fake (Meta) implementation agree.
    torch.manual_seed(22)
    x = (torch.randn(5, 3, 4) + 0.5).requires_grad_(True)
    w = torch.zeros(4, requires_grad=True)
    theta = torch.full((4,), 0.8, requires_grad=True)
    v_init = (torch.randn(3, 4) * 0.2).requires_grad_(True) if with_v_init else None
    args = (x, w, theta, v_init, 4, 1, 4, 1, None, 1, 2.0, False, True)
    torch.library.opcheck(torch.ops.effst_native.slif.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    spikes, v_final = torch.ops.effst_native.slif(*args)
    assert spikes.shape == x.shape and v_final.shape == (3, 4)
