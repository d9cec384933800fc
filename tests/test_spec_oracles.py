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

    w_form, th_form = r.choice(("layer", "channel", "neuron")), r.choice(("layer", "channel", "neuron"))
    T = T if T is not None else r.choice((1, 2, 5, 9, 19))
    v_reset = r.choice((0.0, -0.4, 0.3, None))
    v_init_kind = r.choice(("none", "neuron", "broadcast", "float"))
    v_init = {"none": None, "float": 0.2,
              "neuron": 0.5 * torch.randn(shape, generator=g, dtype=F64),
              "broadcast": 0.5 * torch.randn(shape[-1:], generator=g, dtype=F64)}[v_init_kind]
    surrogate = r.choice(SURROGATES)
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
    s, v = slif(x, w, th, v_reset=c["v_reset"], v_init=v0, surrogate=c["surrogate"], alpha=c["alpha"],
                detach_reset=c["detach_reset"], decay_input=c["decay_input"],
                channel_dim=c["channel_dim"], backend=backend, return_state=True)
    assert s.dtype == dtype and s.shape == c["x"].shape
    assert v.dtype == pdtype, f"final state dtype {v.dtype}, expected {pdtype} (docs/slif.md: fp32 state)"
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


TOL = {F64: 1e-9, torch.float32: 2e-4}


def assert_agree(got: dict, want: dict, tol: float, what: str) -> None:
    assert torch.equal(got["spikes"], want["spikes"]), f"{what}: spikes differ"
    for name in ("v_final", "grad_x", "grad_w", "grad_theta", "grad_v_init"):
        if want[name] is None:
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
def test_slif_matches_spec_oracle_float32(backend, device):
    for i in range(12 if backend != "triton" else 4):
        c = make_case(2000 + i, T=(1, 4, 9)[i % 3])
        assert_agree(run_effst(c, backend, torch.float32, where(backend, device)), run_oracle(rounded_to(c, torch.float32)),
                     TOL[torch.float32], f"{backend} fp32 case {i}")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_slif_large_T_float64(backend, device):
    """T = 70: many checkpoint chunks, the carry crossing each chunk boundary."""
    c = make_case(77, T=70)
    assert_agree(run_effst(c, backend, F64, where(backend, device)), run_oracle(c), TOL[F64], f"{backend} T=70")


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
