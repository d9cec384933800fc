"""Independent float64 oracles written straight from the spec's equations (docs/slif.md,
docs/pruning.md, docs/token_sparsity.md "IMP"), checked against effst on inputs effst did not
choose.

Nothing in the oracles imports effst's reference loop, surrogates, τ parametrisation, layout
helpers or pruning code: the surrogate table, the recurrence, the hand-derived backward, the
parameter broadcasting and the pruning rules are re-typed here from the equations, so a mistake
shared by effst's reference and its kernels cannot pass unseen. SpikingJelly 2.0.0 is the second,
external oracle where its math coincides (θ fixed, τ per layer).
"""
from __future__ import annotations

import itertools
import math
import random as pyrandom
import warnings
from typing import Optional

import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

import effst
from effst import slif

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# sLIF oracle (docs/slif.md "Forward", "Backward", "Surrogates")
# ---------------------------------------------------------------------------------------------
ALPHA = {"sigmoid": 4.0, "atan": 2.0, "piecewise_quadratic": 1.0, "piecewise_exp": 1.0,
         "soft_sign": 2.0, "super_spike": 1.0, "erf": 2.0, "rect": 1.0}
SURROGATES = tuple(ALPHA)


def _sigmoid_d(x, a):
    s = 1.0 / (1.0 + torch.exp(-a * x))
    return a * s * (1.0 - s)


PSI = {  # σ'(x, α), typed from the spec's table
    "sigmoid": _sigmoid_d,
    "atan": lambda x, a: (a / 2.0) / (1.0 + (math.pi / 2.0 * a * x) ** 2),
    "piecewise_quadratic": lambda x, a: torch.clamp(a - a * a * x.abs(), min=0.0),
    "piecewise_exp": lambda x, a: (a / 2.0) * torch.exp(-a * x.abs()),
    "soft_sign": lambda x, a: 1.0 / (2.0 * a * (1.0 / a + x.abs()) ** 2),
    "super_spike": lambda x, a: a / (1.0 + x.abs()) ** 2,
    "erf": lambda x, a: (a / math.sqrt(math.pi)) * torch.exp(-((a * x) ** 2)),
    "rect": lambda x, a: (x.abs() < a / 2.0).to(x.dtype) * (1.0 / a),
}


def psi(x: torch.Tensor, name: str, a: float) -> torch.Tensor:
    return PSI[name](x, a)


def heaviside(x: torch.Tensor, name: str, a: float) -> torch.Tensor:
    """Θ(x) with Θ(0) = 1 in the forward; d/dx is σ'(x) (the added term is exactly 0 in value)."""
    return (x >= 0).to(x.dtype) + (x - x.detach()) * psi(x.detach(), name, a)


def spread(p: torch.Tensor, form: str, step_shape, channel_dim: int) -> torch.Tensor:
    """A per-layer / per-channel / per-neuron parameter as a per-neuron tensor (autograd sums
    the shared positions back)."""
    if form == "layer":
        return p.reshape(()).expand(step_shape)
    if form == "channel":
        view = [1] * len(step_shape)
        view[channel_dim % len(step_shape)] = p.shape[0]
        return p.reshape(view).expand(step_shape)
    return p


def oracle(x, w, theta, *, v_reset, v_init, surrogate, alpha, detach_reset, decay_input):
    """The spec's forward, autograd-differentiable. ``w``, ``theta``, ``v_init`` per neuron."""
    k = 1.0 / (1.0 + torch.exp(-w))
    vr = 0.0 if v_reset is None else v_reset
    v = torch.full(x.shape[1:], vr, dtype=x.dtype) if v_init is None else v_init
    out = []
    for x_t in x.unbind(0):
        # decay_input: H = V + k(X - (V - V_r)); else H = V - k(V - V_r) + X
        h = v - k * (v - vr) + (k * x_t if decay_input else x_t)
        s = heaviside(h - theta, surrogate, alpha)
        sr = s.detach() if detach_reset else s
        v = h - sr * theta if v_reset is None else (1.0 - sr) * h + sr * vr
        out.append(s)
    return torch.stack(out), v


def spec_backward(x, w, theta, v0, g_s, g_vT, *, v_reset, surrogate, alpha, detach_reset, decay_input):
    """The spec's hand-written reverse-time recurrence (per neuron, unreduced), float64."""
    k = 1.0 / (1.0 + torch.exp(-w))
    vr = 0.0 if v_reset is None else v_reset
    T = x.shape[0]
    vs, hs, ss = [v0], [], []
    for t in range(T):  # forward again, keeping V_{t-1}, H_t, S_t
        v = vs[-1]
        h = v + k * (x[t] - (v - vr)) if decay_input else v - k * (v - vr) + x[t]
        s = (h >= theta).to(F64)
        vs.append(h - s * theta if v_reset is None else (1 - s) * h + s * vr)
        hs.append(h)
        ss.append(s)
    c = torch.zeros_like(v0)
    g_x = torch.zeros_like(x)
    g_k = torch.zeros_like(v0)
    g_th = torch.zeros_like(v0)
    for t in reversed(range(T)):
        h, s, vprev = hs[t], ss[t], vs[t]
        p = psi(h - theta, surrogate, alpha)
        gv = (g_vT if t == T - 1 else 0.0) + c
        if v_reset is None:
            dvdh = torch.ones_like(h) if detach_reset else 1 - theta * p
            dvdth = -s if detach_reset else -s + theta * p
        else:
            dvdh = (1 - s) if detach_reset else (1 - s) + (vr - h) * p
            dvdth = torch.zeros_like(h) if detach_reset else (h - vr) * p
        g_h = g_s[t] * p + gv * dvdh
        g_x[t] = g_h * k if decay_input else g_h
        g_k = g_k + (g_h * (x[t] - (vprev - vr)) if decay_input else g_h * (-(vprev - vr)))
        g_th = g_th - g_s[t] * p + gv * dvdth
        c = g_h * (1 - k)
    return g_x, g_k * k * (1 - k), g_th, c


def reduce_to(per_neuron: torch.Tensor, form: str, channel_dim: int) -> torch.Tensor:
    if form == "layer":
        return per_neuron.sum()
    if form == "channel":
        cd = channel_dim % per_neuron.dim()
        return per_neuron.sum(dim=[d for d in range(per_neuron.dim()) if d != cd])
    return per_neuron


# ------------------------------------------------------------------------------- random cases
STEP_SHAPES = [((4, 4), 0), ((4, 4), -1), ((3, 4, 5), 1), ((3, 4, 5), -2), ((6,), 0), ((2, 3, 2), -1)]


def make_case(seed: int, T: Optional[int] = None) -> dict:
    """A seeded random configuration and its float64 inputs (not chosen to please effst)."""
    r = pyrandom.Random(seed)
    shape, cd = r.choice(STEP_SHAPES)
    g = torch.Generator().manual_seed(seed)

    def param(form, lo, hi):
        size = {"layer": (), "channel": (shape[cd],), "neuron": shape}[form]
        return lo + (hi - lo) * torch.rand(size, generator=g, dtype=F64)

    # every surrogate and every (w, θ) form pair within any 8 / 9 consecutive seeds
    forms = ("layer", "channel", "neuron")
    w_form, th_form = forms[seed % 3], forms[(seed // 3) % 3]
    T = T if T is not None else r.choice((1, 2, 5, 9, 19))
    v_reset = r.choice((0.0, -0.4, 0.3, None))
    v_init_kind = r.choice(("none", "neuron", "broadcast", "float"))
    v_init = {"none": None, "float": 0.2,
              "neuron": 0.5 * torch.randn(shape, generator=g, dtype=F64),
              "broadcast": 0.5 * torch.randn(shape[-1:], generator=g, dtype=F64)}[v_init_kind]
    surrogate = SURROGATES[seed % len(SURROGATES)]
    alpha = r.choice((None, round(r.uniform(0.5, 4.0), 3)))
    return dict(
        seed=seed, shape=shape, channel_dim=cd, w_form=w_form, th_form=th_form, T=T,
        v_reset=v_reset, v_init=v_init, surrogate=surrogate, alpha=alpha,
        detach_reset=r.random() < 0.5, decay_input=r.random() < 0.5, state_grad=r.random() < 0.5,
        x=torch.randn((T,) + shape, generator=g, dtype=F64) * 1.4 + 0.5,
        w=param(w_form, -2.5, 2.5), theta=param(th_form, 0.3, 1.3),
        g_s=torch.randn((T,) + shape, generator=g, dtype=F64),
        g_v=torch.randn(shape, generator=g, dtype=F64),
    )


def run_oracle(c: dict) -> dict:
    shape, cd = c["shape"], c["channel_dim"]
    x = c["x"].clone().requires_grad_(True)
    w = c["w"].clone().requires_grad_(True)
    th = c["theta"].clone().requires_grad_(True)
    v0 = c["v_init"]
    # a float v_init is a constant (no gradient); a tensor one gets its gradient checked
    v0 = v0.clone().requires_grad_(True) if isinstance(v0, torch.Tensor) else v0
    v0_full = None if v0 is None else torch.as_tensor(v0, dtype=F64).expand(shape)
    alpha = ALPHA[c["surrogate"]] if c["alpha"] is None else c["alpha"]
    s, v = oracle(x, spread(w, c["w_form"], shape, cd), spread(th, c["th_form"], shape, cd),
                  v_reset=c["v_reset"], v_init=v0_full, surrogate=c["surrogate"], alpha=alpha,
                  detach_reset=c["detach_reset"], decay_input=c["decay_input"])
    loss = (s * c["g_s"]).sum() + ((v * c["g_v"]).sum() if c["state_grad"] else 0.0)
    loss.backward()
    return {"spikes": s.detach(), "v_final": v.detach(), "grad_x": x.grad, "grad_w": w.grad,
            "grad_theta": th.grad, "grad_v_init": v0.grad if isinstance(v0, torch.Tensor) else None}


def run_effst(c: dict, backend: str, dtype: torch.dtype = F64, device: str = "cpu") -> dict:
    """effst's forward + backward on the case (leaf copies on ``device``); results float64 on the CPU."""
    pdtype = F64 if dtype == F64 else torch.float32

    def leaf(t, dt):
        return t.detach().to(device=device, dtype=dt).clone().requires_grad_(True)

    x, w, th = leaf(c["x"], dtype), leaf(c["w"], pdtype), leaf(c["theta"], pdtype)
    v0 = leaf(c["v_init"], pdtype) if isinstance(c["v_init"], torch.Tensor) else c["v_init"]
    # without a gradient of the final state, the path that does not return it is exercised
    out = slif(x, w, th, v_reset=c["v_reset"], v_init=v0, surrogate=c["surrogate"], alpha=c["alpha"],
               detach_reset=c["detach_reset"], decay_input=c["decay_input"],
               channel_dim=c["channel_dim"], backend=backend, return_state=c["state_grad"])
    s, v = out if c["state_grad"] else (out, None)
    assert s.dtype == dtype and s.shape == c["x"].shape
    assert v is None or v.dtype == pdtype, f"final state dtype {v.dtype}, expected {pdtype} (docs/slif.md)"
    g_s, g_v = c["g_s"].to(device), c["g_v"].to(device)
    loss = (s.to(F64) * g_s).sum() + ((v.to(F64) * g_v).sum() if c["state_grad"] else 0.0)
    loss.backward()
    out = {"spikes": s, "v_final": v, "grad_x": x.grad, "grad_w": w.grad, "grad_theta": th.grad,
           "grad_v_init": v0.grad if isinstance(v0, torch.Tensor) else None}
    return {k: None if t is None else t.detach().to("cpu", F64) for k, t in out.items()}


def where(backend: str, device: str) -> str:
    """The device a backend's tensors live on: Triton runs on ``device`` (the interpreter on the
    CPU, the GPU under bench/gpu_check.sh); the reference and native paths on the CPU."""
    return device if backend == "triton" else "cpu"


TOL = {F64: 1e-9, torch.float32: 2e-4, torch.float16: 4e-3}


def assert_agree(got: dict, want: dict, tol: float, what: str) -> None:
    assert torch.equal(got["spikes"], want["spikes"]), f"{what}: spikes differ"
    for name in ("v_final", "grad_x", "grad_w", "grad_theta", "grad_v_init"):
        if want[name] is None or (name == "v_final" and got[name] is None):
            continue
        assert got[name] is not None and got[name].shape == want[name].shape, f"{what}: {name} shape"
        scale = max(want[name].abs().max().item(), 1.0)
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * scale,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


def rounded_to(c: dict, dtype: torch.dtype) -> dict:
    """The case with x rounded to ``dtype`` and parameters to float32 (what a kernel sees)."""
    if dtype == F64:
        return c
    r = dict(c)
    r["x"] = c["x"].to(dtype).to(F64)
    for name in ("w", "theta", "v_init"):
        if isinstance(c[name], torch.Tensor):
            r[name] = c[name].to(torch.float32).to(F64)
    return r


# ------------------------------------------------------------------------------- sLIF tests
def test_spec_backward_equals_autograd_of_spec_forward():
    """The hand-written backward of the spec and autograd on its forward agree (per neuron)."""
    for seed in range(48):
        c = make_case(1000 + seed)
        shape = c["shape"]
        w = spread(c["w"], c["w_form"], shape, c["channel_dim"]).clone().requires_grad_(True)
        th = spread(c["theta"], c["th_form"], shape, c["channel_dim"]).clone().requires_grad_(True)
        v0 = (0.3 * torch.randn(shape, dtype=F64)).requires_grad_(True)
        x = c["x"].clone().requires_grad_(True)
        alpha = ALPHA[c["surrogate"]] if c["alpha"] is None else c["alpha"]
        kw = dict(v_reset=c["v_reset"], surrogate=c["surrogate"], alpha=alpha,
                  detach_reset=c["detach_reset"], decay_input=c["decay_input"])
        s, v = oracle(x, w, th, v_init=v0, **kw)
        ((s * c["g_s"]).sum() + (v * c["g_v"]).sum()).backward()
        g = spec_backward(c["x"], w.detach(), th.detach(), v0.detach(), c["g_s"], c["g_v"], **kw)
        for got, want in zip(g, (x.grad, w.grad, th.grad, v0.grad)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,cases", [("reference", 40), ("native", 40), ("triton", 12)])
def test_slif_matches_spec_oracle_float64(backend, cases, device):
    """Spikes, final state and the x / w / V_th / v_init gradients of effst's backends against the
    oracle, float64, on seeded random configurations (every surrogate, reset, decay, detach,
    parameter form, channel_dim, v_init kind, with and without a final-state gradient)."""
    for i in range(cases):
        c = make_case(i if backend != "triton" else 500 + i,
                      T=None if backend != "triton" else (1, 3, 9, 17)[i % 4])
        assert_agree(run_effst(c, backend, F64, where(backend, device)), run_oracle(c), TOL[F64],
                     f"{backend} case {i}")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slif_matches_spec_oracle_low_precision(backend, dtype, device):
    """Inputs rounded to ``dtype``, parameters to float32, the oracle in float64 on those values:
    the same spikes, gradients within the dtype's tolerance."""
    for i in range(10 if backend != "triton" else 3):
        c = make_case(2000 + i, T=(1, 4, 9)[i % 3])
        assert_agree(run_effst(c, backend, dtype, where(backend, device)), run_oracle(rounded_to(c, dtype)),
                     TOL[dtype], f"{backend} {dtype} case {i}")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_module_state_carries_a_sequence_across_calls(backend, device):
    """effst.nn.SLIF (per-channel τ and V_th) over x[:4] then x[4:] without a reset is the oracle
    over the whole x: spikes, and the τ / V_th gradients of both calls together."""
    from effst.nn import SLIF
    dev = where(backend, device)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(9, 2, 6, generator=g, dtype=F64) * 1.2 + 0.5
    gs = torch.randn(9, 2, 6, generator=g, dtype=F64)
    node = SLIF(tau=3.0, v_threshold=0.8, v_reset=None, channels=6, surrogate="erf", backend=backend)
    node = node.to(device=dev, dtype=F64)
    with torch.no_grad():
        node.w.copy_(torch.linspace(-1.5, 1.5, 6, dtype=F64))
        node.v_threshold.copy_(torch.linspace(0.4, 1.2, 6, dtype=F64))
    w, th = node.w.detach().cpu().clone().requires_grad_(True), node.v_threshold.detach().cpu().clone().requires_grad_(True)
    want, _ = oracle(x, spread(w, "channel", (2, 6), -1), spread(th, "channel", (2, 6), -1), v_reset=None,
                     v_init=None, surrogate="erf", alpha=ALPHA["erf"], detach_reset=False, decay_input=True)
    (want * gs).sum().backward()
    first, second = node(x[:4].to(dev)), node(x[4:].to(dev))
    got = torch.cat([first, second])
    (got * gs.to(dev)).sum().backward()
    assert torch.equal(got.detach().cpu(), want.detach())
    torch.testing.assert_close(node.w.grad.cpu(), w.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(node.v_threshold.grad.cpu(), th.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_slif_large_T_float64(backend, device):
    """T = 70: many checkpoint chunks, the carry crossing each chunk boundary."""
    c = make_case(77, T=70)
    assert_agree(run_effst(c, backend, F64, where(backend, device)), run_oracle(c), TOL[F64], f"{backend} T=70")


@pytest.mark.gpu
def test_triton_on_the_gpu_matches_spec_oracle(device):
    """The Triton kernels compiled for the GPU (bench/gpu_check.sh) against the oracle: float64,
    float32, float16 and bfloat16 inputs, including sequences longer than one checkpoint chunk."""
    tol = {**TOL, torch.bfloat16: 3e-2}
    for i in range(24):
        c = make_case(3000 + i, T=(1, 3, 9, 17, 40)[i % 5])
        dtype = (F64, torch.float32, torch.float16, torch.bfloat16)[i % 4]
        want = run_oracle(rounded_to(c, dtype))
        assert_agree(run_effst(c, "triton", dtype, device), want, tol[dtype], f"gpu triton {dtype} case {i}")


# bfloat16 is unreliable in Triton's CPU interpreter: that pair runs on the GPU machine only.
THRESHOLD_CASES = [pytest.param(b, d, marks=[pytest.mark.gpu] if (b, d) == ("triton", torch.bfloat16) else [])
                   for b in ("reference", "native", "triton")
                   for d in (torch.float16, torch.bfloat16, torch.float32, F64)]


@pytest.mark.parametrize("backend,dtype", THRESHOLD_CASES)
@pytest.mark.parametrize("decay_input", [True, False])
def test_membrane_exactly_at_threshold_fires(backend, dtype, decay_input, device):
    """Θ(0) = 1: H_t == θ spikes, one ulp below does not (values exact in every dtype)."""
    dev = where(backend, device)
    theta = torch.tensor([0.75, 0.5, 1.0, 0.25])
    # k = sigmoid(0) = 1/2 exactly; from V_0 = 0: decay_input H = X/2, else H = X.
    at = (2 * theta if decay_input else theta).to(dtype)
    below = torch.nextafter(at, torch.tensor(-math.inf, dtype=dtype))
    x = torch.stack([at, below, at]).to(dev)  # the hard reset returns V to 0 after step 1
    pdt = F64 if dtype == F64 else torch.float32
    s, v = slif(x, torch.zeros((), dtype=pdt, device=dev), theta.to(dev, pdt), v_reset=0.0,
                decay_input=decay_input, backend=backend, return_state=True)
    s = s.cpu()
    assert torch.equal(s[0], torch.ones(4, dtype=dtype)), f"{backend} {dtype}: H == θ did not fire"
    assert torch.equal(s[1], torch.zeros(4, dtype=dtype)), f"{backend} {dtype}: H < θ fired"
    # step 3 starts from V_2 = H_2 (just under θ) and adds a positive charge: it fires
    assert torch.equal(s[2], torch.ones(4, dtype=dtype))
    assert v.dtype == pdt and torch.equal(v.cpu(), torch.zeros(4, dtype=pdt))


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("w", [9.0, -9.0])
def test_tau_near_one_and_very_large(backend, w, device):
    """w = 9: τ = 1 + e^-9 (k ≈ 1 - 1.2e-4); w = -9: τ ≈ 8104 (almost no leak)."""
    c = make_case(31, T=6)
    c["w"] = torch.full_like(c["w"], w)
    assert_agree(run_effst(c, backend, F64, where(backend, device)), run_oracle(c), TOL[F64],
                 f"{backend} w={w}")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_channel_dim_selects_the_axis_of_a_square_step_shape(backend, device):
    """Step shape (4, 4): a (4,) parameter means rows for channel_dim=0 and columns for -1."""
    dev = where(backend, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, 4, generator=g, dtype=F64) + 0.6
    theta = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=F64)
    for cd in (0, -1, 1, -2):
        want, _ = oracle(x, torch.zeros(4, 4, dtype=F64), spread(theta, "channel", (4, 4), cd),
                         v_reset=0.0, v_init=None, surrogate="atan", alpha=2.0,
                         detach_reset=False, decay_input=True)
        got = slif(x.to(dev), 0.0, theta.to(dev), channel_dim=cd, backend=backend)
        assert torch.equal(got.cpu(), want), f"{backend} channel_dim={cd}"


STATE_CASES = [pytest.param(b, d, marks=[pytest.mark.gpu] if (b, d) == ("triton", torch.bfloat16) else [])
               for b in ("reference", "native", "triton") for d in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", STATE_CASES)
def test_half_inputs_keep_a_float32_state(backend, dtype, device):
    """docs/slif.md: the state is float32 whatever the input dtype (the spikes are x's dtype),
    so every backend fires exactly as the float32 oracle on the same (rounded) input."""
    dev = where(backend, device)
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(9, 2, 8, generator=g) * 0.7 + 0.45).to(dtype)
    w = torch.linspace(-2.0, 2.0, 8)
    want_s, want_v = oracle(x.to(F64), spread(w.to(F64), "channel", (2, 8), -1), torch.tensor(0.9, dtype=F64),
                            v_reset=None, v_init=None, surrogate="atan", alpha=2.0,
                            detach_reset=True, decay_input=True)
    s, v = slif(x.to(dev), w.to(dev), 0.9, v_reset=None, detach_reset=True, backend=backend, return_state=True)
    assert s.dtype == dtype and v.dtype == torch.float32, f"{backend}: state {v.dtype}"
    assert torch.equal(s.cpu().to(F64), want_s), f"{backend} {dtype}: spikes differ from the fp32-state oracle"
    torch.testing.assert_close(v.cpu().to(F64), want_v, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- SpikingJelly
SJ_NAMES = {"sigmoid": "Sigmoid", "atan": "ATan", "piecewise_quadratic": "PiecewiseQuadratic",
            "piecewise_exp": "PiecewiseExp", "soft_sign": "SoftSign", "super_spike": "SuperSpike",
            "erf": "Erf", "rect": "Rect"}


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_oracle_surrogates_are_spikingjelly_functions(surrogate):
    sj = getattr(sj_surrogate, SJ_NAMES[surrogate])()
    a = sj.alpha
    x = torch.linspace(-2.5, 2.5, 1001, dtype=F64, requires_grad=True)
    sj(x).sum().backward()
    # SpikingJelly's Rect(a) is a box of height a and width 1/a: the spec's rect with α = 1/a.
    ours = psi(x.detach(), surrogate, 1.0 / a if surrogate == "rect" else a)
    if surrogate != "rect":
        assert a == ALPHA[surrogate]
    inside = (x.detach().abs() - 0.5 / a).abs() > 1e-9 if surrogate == "rect" else slice(None)
    torch.testing.assert_close(ours[inside], x.grad[inside], rtol=1e-12, atol=1e-12)


SJ_COMBOS = list(itertools.product([0.0, -0.2, None], [False, True], [True, False]))


@pytest.mark.parametrize("v_reset,detach_reset,decay_input", SJ_COMBOS)
def test_backends_match_spikingjelly_plif(v_reset, detach_reset, decay_input, device):
    """Per-layer τ, fixed θ: SpikingJelly 2.0.0's ParametricLIFNode / LIFNode (float64, torch
    path) give the same spikes and x / w gradients as every effst backend."""
    idx = SJ_COMBOS.index((v_reset, detach_reset, decay_input))
    surrogate = SURROGATES[idx % len(SURROGATES)]
    g = torch.Generator().manual_seed(idx)
    x = torch.randn(6, 3, 7, generator=g, dtype=F64) * 1.3 + 0.5
    gs = torch.randn(6, 3, 7, generator=g, dtype=F64)
    sj_a = ALPHA[surrogate] if surrogate != "rect" else 1.0 / ALPHA["rect"]
    sj_sur = getattr(sj_surrogate, SJ_NAMES[surrogate])(alpha=sj_a)
    kw = dict(v_threshold=0.8, v_reset=v_reset, detach_reset=detach_reset, decay_input=decay_input,
              surrogate_function=sj_sur, step_mode="m")
    for parametric in (False, True):
        node = (sj_neuron.ParametricLIFNode(init_tau=3.0, **kw) if parametric
                else sj_neuron.LIFNode(tau=3.0, **kw)).to(F64)
        xs = x.clone().requires_grad_(True)
        (node(xs) * gs).sum().backward()
        node.reset()
        spikes_sj = node(x.clone()).detach()
        node.reset()
        w0 = node.w.detach().reshape(()).to(F64) if parametric else torch.tensor(-math.log(2.0), dtype=F64)
        for backend in ("reference", "native", "triton"):
            dev = where(backend, device)
            xe = x.to(dev).clone().requires_grad_(True)
            w = w0.to(dev).clone().requires_grad_(True)
            s = slif(xe, w, 0.8, v_reset=v_reset, surrogate=surrogate, detach_reset=detach_reset,
                     decay_input=decay_input, backend=backend)
            (s * gs.to(dev)).sum().backward()
            s, xe_grad, w_grad = s.detach().cpu(), xe.grad.cpu(), w.grad.cpu()
            what = f"{backend} vs SJ {'PLIF' if parametric else 'LIF'} {surrogate}"
            assert torch.equal(s, spikes_sj), what
            torch.testing.assert_close(xe_grad, xs.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")
            if parametric:
                torch.testing.assert_close(w_grad, node.w.grad.reshape(()).to(F64), rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"{what} w: {m}")


# ---------------------------------------------------------------------------------------------
# Pruning oracles (docs/pruning.md "L1P", "Block L1P", "Random controls";
# docs/token_sparsity.md "IMP"), exact decimal arithmetic for k = ceil(p * n)
# ---------------------------------------------------------------------------------------------
from fractions import Fraction  # noqa: E402

from torch import nn  # noqa: E402

import effst.prune as prune  # noqa: E402
from effst.prune.imp import mask_counts, prune_round  # noqa: E402


def pruned_count(p, n: int) -> int:
    """k = ceil(p * n) with p read as the decimal it was written as (0.07 * 100 = 7, not 8)."""
    return math.ceil(Fraction(str(p)) * n)


def keep_rule(scores: list, p) -> list:
    """Prune every score <= the k-th smallest (1-indexed); k = 0 prunes nothing."""
    k = pruned_count(p, len(scores))
    if k == 0:
        return [True] * len(scores)
    threshold = sorted(scores)[k - 1]
    return [s > threshold for s in scores]


def tile_scores(w: torch.Tensor, bm: int, bk: int) -> list:
    """L1 norm of every bm x bk tile (edge tiles: their real entries), row-major, as exact floats."""
    rows, cols = w.shape
    return [math.fsum(abs(float(v)) for v in w[r:r + bm, c:c + bk].flatten())
            for r in range(0, rows, bm) for c in range(0, cols, bk)]


def adversarial_weight(g: torch.Generator, shape, levels: int) -> torch.Tensor:
    """Weights on a few magnitudes with random signs: many exact ties in |w|, zeros included."""
    mags = torch.randint(0, levels, shape, generator=g).to(F64) / levels
    signs = torch.randint(0, 2, shape, generator=g).to(F64) * 2 - 1
    return mags * signs


PRUNE_PS = ("0", "0.07", "0.1", "0.29", "0.5", "0.55", "0.77", "0.9", "0.99")


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
def test_l1p_mask_oracle_with_ties(dtype):
    g = torch.Generator().manual_seed(3)
    for i, shape in enumerate(((37, 53), (1, 7), (64, 48), (5, 1))):
        w = adversarial_weight(g, shape, levels=(3, 50)[i % 2]).to(dtype)
        for p in PRUNE_PS:
            want = keep_rule([abs(float(v)) for v in w.flatten()], p)
            got = prune.l1p_mask(w, float(p))
            assert got.dtype == torch.bool and got.shape == w.shape
            assert got.flatten().tolist() == want, f"{dtype} {shape} p={p}"


def test_block_l1p_mask_oracle_with_ties_and_edge_tiles():
    g = torch.Generator().manual_seed(4)
    for shape, block in (((40, 72), (16, 16)), ((64, 48), (32, 16)), ((33, 100), (16, 32))):
        w = adversarial_weight(g, shape, levels=4).to(torch.float32)
        w[:16, :] = 0.0  # whole tiles of equal (zero) norm
        grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        for p in PRUNE_PS:
            if grid[0] * grid[1] - pruned_count(p, grid[0] * grid[1]) < 1:
                continue  # a request that keeps no tile is adapted (and warned about) by effst
            want = keep_rule(tile_scores(w, *block), p)
            got = prune.block_l1p_mask(w, float(p), block)
            assert got.shape == grid and got.flatten().tolist() == want, f"{shape} {block} p={p}"


class _Mixed(nn.Module):
    """Every kind of tensor a model holds: which ones L1P and IMP may prune differs."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(2, 6, 3)          # IMP only
        self.bn = nn.BatchNorm1d(6)               # neither
        self.fc = nn.Linear(30, 20)               # both (bias: neither)
        self.pointwise = nn.Conv1d(20, 12, 1)     # both
        self.conv3 = nn.Conv1d(12, 12, 3)         # IMP only
        self.head = nn.Linear(12, 5, bias=False)  # both

    def forward(self, x):  # x [B, 2, 7, 7]
        h = self.conv2d(x).flatten(2).mean(2)
        h = self.bn(h).repeat(1, 5)
        h = self.pointwise(self.fc(h).unsqueeze(2).repeat(1, 1, 4))
        return self.head(self.conv3(h).mean(2))


def _mixed(seed: int, levels: int = 0) -> _Mixed:
    torch.manual_seed(seed)
    model = _Mixed()
    if levels:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(adversarial_weight(g, p.shape, levels).to(p.dtype))
    return model


def test_l1p_is_per_matrix_on_linear_layers_only_and_the_report_says_so():
    model = _mixed(0)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    p = 0.63
    prune.l1p(model, p)
    expected_pruned, expected_total = 0, 0
    for name in before:
        module = model.get_submodule(name)
        if name in ("fc", "pointwise", "head"):
            want = keep_rule([abs(float(v)) for v in before[name].flatten()], p)
            assert prune.get_mask(module).flatten().tolist() == want, name
            assert module.weight.detach().flatten().tolist() == [
                float(v) if k else 0.0 for v, k in zip(before[name].flatten(), want)]
            expected_pruned += want.count(False)
            expected_total += len(want)
        else:
            assert not prune.is_pruned(module), f"{name} is not a linear layer and must stay dense"
            assert torch.equal(module.weight, before[name])
    assert model.fc.bias.count_nonzero() == model.fc.bias.numel()
    rep = prune.report(model)
    assert {layer.name for layer in rep.layers} == {"fc", "pointwise", "head"}
    assert rep.params == expected_total and rep.params - rep.kept == expected_pruned
    assert rep.sparsity == pytest.approx(expected_pruned / expected_total, abs=1e-15)
    every = sum(p.numel() for p in model.parameters())
    assert rep.model_params == every and rep.model_kept == every - expected_pruned


@pytest.mark.parametrize("method", ["l1p", "block_l1p", "random"])
def test_pruned_weights_get_zero_gradients_and_stay_zero_under_adamw(method):
    model = _mixed(1)
    if method == "block_l1p":
        with pytest.warns(UserWarning):   # these matrices are smaller than one 16x16 tile
            prune.block_l1p(model, 0.5)
    else:
        getattr(prune, method)(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for step in range(3):
        loss = model(torch.randn(4, 2, 7, 7)).square().sum()
        opt.zero_grad()
        loss.backward()
        for name in ("fc", "pointwise", "head"):
            m = getattr(model, name)
            original = m.parametrizations.weight.original
            assert not original.grad[~prune.get_mask(m)].any(), f"{method} {name}: pruned entries got gradient"
        opt.step()
    for name in ("fc", "pointwise", "head"):
        m = getattr(model, name)
        assert not m.weight[~prune.get_mask(m)].any() and not m.parametrizations.weight.original[~prune.get_mask(m)].any()


def test_random_control_prunes_exactly_ceil_p_n_per_matrix():
    for p in PRUNE_PS:
        model = _mixed(2)
        with warnings.catch_warnings():   # p = 0.99 empties the 60-weight head: warned, tested below
            warnings.simplefilter("ignore")
            prune.random(model, float(p), seed=7)
        for name in ("fc", "pointwise", "head"):
            m = getattr(model, name)
            n = m.weight.numel()
            assert int((~prune.get_mask(m)).sum()) == pruned_count(p, n), f"{name} p={p}"
    big = nn.Linear(96, 64)
    prune.random(big, 0.55, structure="block", seed=1, block_size=16)
    tiles = prune.get_mask(big).reshape(4, 16, 6, 16).permute(0, 2, 1, 3).reshape(24, 256)
    assert bool((tiles.all(1) | ~tiles.any(1)).all())          # whole tiles
    assert int((~tiles.any(1)).sum()) == pruned_count("0.55", 24)


def imp_oracle(model: nn.Module, rounds: int, fraction: str = "0.25") -> list:
    """Global IMP masks after ``rounds``: every module weight of >= 2 dims, one ranking of |w|
    (ties: earlier tensor in module order, then lower flat index), keep round(n (1-f)^k) (half up)."""
    tensors = [m.weight.detach().flatten() for _, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
    entries = [(abs(float(v)), t, i) for t, w in enumerate(tensors) for i, v in enumerate(w)]
    n = len(entries)
    keep_n = math.floor(n * (1 - Fraction(fraction)) ** rounds + Fraction(1, 2))
    pruned = set((t, i) for _, t, i in sorted(entries)[:n - keep_n])
    return [[(t, i) not in pruned for i in range(w.numel())] for t, w in enumerate(tensors)]


@pytest.mark.parametrize("levels", [0, 3])
def test_imp_rounds_match_the_global_oracle(levels):
    """One global ranking over conv, linear and head weights (not BN, not biases); the masks after
    rounds 1..4 equal the oracle's, with heavy ties when ``levels`` = 3."""
    model = _mixed(5, levels)
    reference = _mixed(5, levels)  # unpruned copy: the oracle ranks the original magnitudes
    bias, bn = model.fc.bias.detach().clone(), model.bn.weight.detach().clone()
    for k in range(1, 5):
        prune_round(model, k)
        want = imp_oracle(reference, k)
        masked = [m for _, m in model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
        assert [prune.get_mask(m).flatten().tolist() for m in masked] == want, f"round {k}"
        assert mask_counts(model) == (sum(map(sum, want)), sum(map(len, want)))
        rep = prune.report(model)   # the compression counts every pruned weight, convolutions too
        every = sum(p.numel() for p in model.parameters())
        assert rep.model_params == every and rep.model_kept == every - sum(w.count(False) for w in want)
    assert not prune.is_pruned(model.bn)
    assert torch.equal(model.fc.bias, bias) and torch.equal(model.bn.weight, bn)


# ------------------------------------------------------------------------------- bad input
BAD_PRUNE_CALLS = [
    (lambda: prune.l1p_mask(torch.ones(3, 3, dtype=torch.int64), 0.5), TypeError, "weight: expected a floating-point"),
    (lambda: prune.l1p_mask([[1.0, 2.0]], 0.5), TypeError, "weight: expected a tensor"),
    (lambda: prune.l1p_mask(torch.tensor(1.0), 0.5), ValueError, "weight: expected a tensor of >= 1"),
    (lambda: prune.block_l1p_mask(torch.ones(4, 4, dtype=torch.int32), 0.5), TypeError, "weight: expected a floating-point"),
    (lambda: prune.tile_l1_norms(torch.ones(4, 4, dtype=torch.bool), 16), TypeError, "weight: expected a floating-point"),
    (lambda: prune.l1p_mask(torch.ones(3, 3), 1.0), ValueError, r"sparsity: expected a number in \[0, 1\)"),
    (lambda: prune.l1p_mask(torch.ones(3, 3), -0.1), ValueError, "sparsity"),
    (lambda: prune.l1p_mask(torch.ones(3, 3), float("nan")), ValueError, "sparsity"),
    (lambda: prune.l1p_mask(torch.ones(3, 3), torch.tensor(0.5)), TypeError, "sparsity"),
    (lambda: prune.block_l1p_mask(torch.ones(32, 32), 0.5, (24, 16)), ValueError, "block_size"),
    (lambda: prune.block_l1p(nn.Linear(32, 32), 0.5, block_size=0), ValueError, "block_size"),
    (lambda: prune.random(nn.Linear(4, 4), 0.5, structure="tile"), ValueError, "structure"),
    (lambda: prune.random(nn.Linear(4, 4), 0.5, seed="1"), TypeError, "seed"),
    (lambda: prune.l1p(nn.Conv2d(2, 2, 3), 0.5), ValueError, "model_or_module: .*nothing to prune"),
    (lambda: prune.l1p(nn.Conv2d(2, 2, 3), 0.5, targets=""), ValueError, "targets: .*not a linear layer"),
    (lambda: prune.l1p("model", 0.5), TypeError, "model_or_module: expected an nn.Module"),
    (lambda: prune.report([]), TypeError, "model: expected an nn.Module"),
    (lambda: prune_round(nn.Linear(4, 4), 1, fraction=1.5), ValueError, r"fraction: expected a float in \(0, 1\)"),
    (lambda: prune_round(nn.Linear(4, 4), 1, fraction="0.25"), TypeError, "fraction: expected a float"),
    (lambda: prune_round(nn.Linear(4, 4), -1), ValueError, "rounds: expected an int >= 0"),
    (lambda: prune_round("model", 1), TypeError, "model: expected an nn.Module"),
    (lambda: prune_round(nn.BatchNorm1d(4), 1), ValueError, "no weight tensor of >= 2 dimensions"),
    (lambda: prune.two_four_mask(torch.ones(4, 8, dtype=torch.int8)), TypeError, "weight: expected a floating-point"),
    (lambda: prune.two_four_mask(torch.ones(4, 6)), ValueError, "multiple of 4"),
    (lambda: prune.fit_block_pruning("w", 0.5, 16), TypeError, "weight: expected a tensor"),
    (lambda: prune.fit_block_pruning(torch.ones(4, 4), 1.5, 16), ValueError, "sparsity"),
    (lambda: prune.get_mask("fc"), TypeError, "module: expected an nn.Module"),
    (lambda: prune.remove("model"), TypeError, "model: expected an nn.Module"),
    (lambda: prune.strip_masks([1, 2]), TypeError, "state_dict: expected a mapping"),
    (lambda: prune.load_pruned_state_dict(nn.Linear(2, 2), [1]), TypeError, "state_dict: expected a mapping"),
    (lambda: prune.to_block_sparse("model"), TypeError, "model: expected an nn.Module"),
    (lambda: prune.to_block_sparse(nn.Linear(32, 32), block_size=3), ValueError, "block_size"),
    (lambda: prune.to_block_sparse(nn.Linear(32, 32), backend="gpu"), ValueError, "backend: expected one of"),
    (lambda: prune.apply_mask(nn.Linear(2, 2), torch.ones(2, 2, dtype=torch.bool), structure="rows"), ValueError,
     "structure: expected one of"),
]


def test_two_four_oracle_with_ties():
    """Each group of 4 consecutive inputs keeps its 2 largest |w|; equal |w|: the lower index."""
    g = torch.Generator().manual_seed(8)
    w = adversarial_weight(g, (9, 24), levels=3).to(torch.float32)
    want = []
    for row in w.tolist():
        for start in range(0, 24, 4):
            group = [abs(v) for v in row[start:start + 4]]
            best = sorted(range(4), key=lambda j: (-group[j], j))[:2]
            want += [j in best for j in range(4)]
    assert prune.two_four_mask(w).flatten().tolist() == want


@pytest.mark.parametrize("index", range(len(BAD_PRUNE_CALLS)))
def test_pruning_rejects_bad_input_by_name(index):
    call, error, match = BAD_PRUNE_CALLS[index]
    with pytest.raises(error, match=match):
        call()


def _bad_slif_calls():
    from effst.ops.parametrization import check_tau, tau_to_w, w_to_decay, w_to_tau
    from effst.ops.slif_reference import slif_reference
    from effst.ops.surrogates import resolve_surrogate, spike, surrogate_grad
    x = torch.ones(2, 3)
    return [
        (lambda: tau_to_w(torch.tensor([2.0, math.inf])), ValueError, "tau: expected every value finite and > 1"),
        (lambda: tau_to_w(torch.tensor([2.0, 1.0])), ValueError, "tau: expected every value finite and > 1"),
        (lambda: tau_to_w(torch.tensor([2, 3])), TypeError, "tau: expected a floating-point tensor"),
        (lambda: tau_to_w("2"), TypeError, "tau: expected a float > 1"),
        (lambda: check_tau(1.0), ValueError, "tau: expected a finite value > 1"),
        (lambda: check_tau(math.nan), ValueError, "tau"),
        (lambda: w_to_tau(torch.tensor([1, 2])), TypeError, "w: expected a floating-point tensor"),
        (lambda: w_to_decay(0.0), TypeError, "w: expected a floating-point tensor"),
        (lambda: surrogate_grad(torch.tensor([1, 2]), "atan"), TypeError, "x: expected a floating-point tensor"),
        (lambda: surrogate_grad(torch.ones(2), "atan", -2.0), ValueError, "alpha: expected a finite value > 0"),
        (lambda: surrogate_grad(torch.ones(2), "Atan"), ValueError, "surrogate: expected one of"),
        (lambda: spike([0.5], "atan"), TypeError, "x: expected a floating-point tensor"),
        (lambda: resolve_surrogate("atan", math.inf), ValueError, "alpha"),
        (lambda: resolve_surrogate("atan", "2"), TypeError, "alpha"),
        (lambda: slif_reference(torch.ones(2, 3, dtype=torch.int32), 0.0, 1.0), TypeError, "x: expected a floating-point"),
        (lambda: slif_reference(x, torch.zeros(4), 1.0), ValueError, r"w: shape \(4,\) matches no parameter form"),
        (lambda: slif(x, 0.0, torch.ones(2, 2)), ValueError, "v_threshold: shape"),
        (lambda: slif(torch.ones(2, 3, 4), torch.zeros(4), 1.0, channel_dim=2), ValueError, "channel_dim"),
        (lambda: slif(x, 0.0, 1.0, surrogate="gauss"), ValueError, "surrogate"),
        (lambda: slif(x.long(), 0.0, 1.0), TypeError, "x: expected a float16/bfloat16/float32/float64"),
    ]


@pytest.mark.parametrize("index", range(20))
def test_slif_math_helpers_reject_bad_input_by_name(index):
    calls = _bad_slif_calls()
    assert len(calls) == 20
    call, error, match = calls[index]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_effst_surrogate_table_matches_the_spec(surrogate):
    from effst.ops.surrogates import DEFAULT_ALPHA, surrogate_grad
    assert DEFAULT_ALPHA[surrogate] == ALPHA[surrogate]
    x = torch.linspace(-3, 3, 1201, dtype=F64)
    for a in (None, 0.7, 3.3):
        want = psi(x, surrogate, ALPHA[surrogate] if a is None else a)
        torch.testing.assert_close(surrogate_grad(x, surrogate, a), want, rtol=1e-13, atol=1e-15)


def test_element_pruning_that_empties_a_layer_says_so():
    """The rule is followed (everything <= the k-th smallest goes), with a warning naming the layer."""
    small = nn.Linear(5, 2)                  # n = 10, p = 0.95: ceil(9.5) = 10, all pruned
    with pytest.warns(UserWarning, match=r"<root>: sparsity 0.95 prunes all 10 weights .*ceil\(0.95 \* 10\) = 10"):
        prune.l1p(small, 0.95)
    assert not prune.get_mask(small).any()
    tied = nn.Sequential(nn.Linear(8, 8))    # every |w| equal: p = 0.1 prunes the ties, i.e. everything
    with torch.no_grad():
        tied[0].weight.fill_(0.25)
    with pytest.warns(UserWarning, match="0: sparsity 0.1 prunes all 64 weights .*ties with the threshold"):
        prune.l1p(tied, 0.1)
    with pytest.warns(UserWarning, match="prunes all 10 weights"):
        prune.random(nn.Linear(5, 2), 0.95, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.l1p(nn.Linear(5, 2), 0.85)     # ceil(8.5) = 9 of 10: one weight stays, no warning


def test_an_imp_checkpoint_loads_into_a_fresh_model():
    """IMP masks convolutions as well as linear layers; load_pruned_state_dict recreates all of them."""
    model = _mixed(0)
    prune_round(model, 2)
    fresh = _mixed(1)
    prune.load_pruned_state_dict(fresh, model.state_dict())
    x = torch.randn(2, 2, 7, 7)
    assert torch.equal(fresh(x), model(x))
    assert mask_counts(fresh) == mask_counts(model)
    assert torch.equal(prune.get_mask(fresh.conv2d), prune.get_mask(model.conv2d))
