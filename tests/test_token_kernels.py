"""Token kernels (effst/ops/token_select.py) against float64 / integer torch references, under
Triton's interpreter on the CPU (or on CUDA with EFFST_TEST_DEVICE=cuda), and AOT-compiled for
sm_80 / sm_90 without a GPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effst.nn import token_routing
from effst.nn.token_routing import run_neuron_on_tokens
from effst.ops import token_select as ts

AOT = Path(__file__).with_name("aot_compile.py")
DTYPES = [torch.float32, torch.float16, torch.float64]


def _spikes(*shape, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


def _argsort_reference(scores, k):
    """Independent oracle: rank = number of tokens with a higher score or an equal score and a
    lower index; keep rank < k; ascending indices."""
    out = []
    for row in scores.tolist():
        n = len(row)
        rank = [sum(1 for j in range(n) if row[j] > row[i] or (row[j] == row[i] and j < i)) for i in range(n)]
        out.append([i for i in range(n) if rank[i] < k])
    return torch.tensor(out, dtype=torch.int64)


def random_route(T, B, N, K, g):
    """[T, B, K] int64: per (t, b) K distinct tokens of N, ascending (a STATA route)."""
    return torch.stack([torch.stack([torch.sort(torch.randperm(N, generator=g)[:K]).values for _ in range(B)])
                        for _ in range(T)])


@pytest.mark.parametrize("R,N,W,C,k", [(6, 17, 24, 10, 7), (3, 64, 96, 33, 44), (2, 5, 3, 4, 5), (4, 9, 70, 130, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_anchor_topk_gather_matches_reference(device, R, N, W, C, k, dtype):
    query, keys = _spikes(R, W, seed=1), _spikes(R, N, W, p=0.3, seed=2)
    x = torch.randn(R, N, C, generator=torch.Generator().manual_seed(3)).to(dtype)
    scores, index, compact = ts.anchor_topk_gather(query.to(device), keys.to(device), x.to(device), k, backend="triton")
    expected_scores = (query[:, None, :].double() * keys.double()).sum(-1)          # float64 dot of spikes
    assert torch.equal(scores.cpu().double(), expected_scores)
    expected_index = _argsort_reference(expected_scores, k)
    assert torch.equal(index.cpu(), expected_index)
    assert torch.equal(compact.cpu(), torch.stack([x[r, expected_index[r]] for r in range(R)]))


def test_anchor_topk_ties_prefer_lower_index(device):
    # Every token ties: the first k tokens win. Then a unique best token at the end wins first.
    query = torch.ones(2, 4)
    keys = torch.zeros(2, 8, 4)
    keys[:, :, 0] = 1
    keys[1, 7] = 1
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    _, index, _ = ts.anchor_topk_gather(query.to(device), keys.to(device), x.to(device), 3, backend="triton")
    assert index.cpu().tolist() == [[0, 1, 2], [0, 1, 7]]


def test_anchor_topk_gather_gradient_scatters_back(device):
    query, keys = _spikes(3, 16, seed=4), _spikes(3, 12, 16, seed=5)
    x = torch.randn(3, 12, 5, dtype=torch.float64, device=device, requires_grad=True)
    _, index, compact = ts.anchor_topk_gather(query.to(device), keys.to(device), x, 4, backend="triton")
    weight = torch.randn_like(compact)
    (compact * weight).sum().backward()
    expected = torch.zeros(3, 12, 5, dtype=torch.float64)
    for r in range(3):
        expected[r, index[r].cpu()] = weight[r].cpu()
    assert torch.equal(x.grad.cpu(), expected)


def _score_cases():
    """(name, scores [R, N] float64 oracle values, x leading groups G or None, k)."""
    g = torch.Generator().manual_seed(11)
    ties = torch.randint(0, 4, (3, 13), generator=g).double()                   # many equal scores
    every = torch.zeros(2, 9, dtype=torch.float64)                              # all tie
    distinct = torch.randn(5, 33, generator=g, dtype=torch.float64)
    return [("ties", ties, 4, 5), ("all-tie", every, None, 3), ("k=N", distinct, 2, 33), ("k=1", distinct, 3, 1),
            ("one-row", distinct[:1], None, 17)]


@pytest.mark.parametrize("case", range(len(_score_cases())), ids=[c[0] for c in _score_cases()])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64, torch.int32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gather_of_precomputed_scores_matches_reference(device, case, score_dtype, dtype):
    """STS's fused top-k + gather: scores read in place from a strided view (a column of a
    [R, N, 2] log-probability tensor), x non-contiguous, G timesteps sharing one selection;
    indices equal the independent rank oracle and the values are copied bit for bit."""
    _, oracle_scores, G, k = _score_cases()[case]
    if score_dtype == torch.int32:
        oracle_scores = (oracle_scores * 4).round()
    R, N = oracle_scores.shape
    pair = torch.stack([oracle_scores, -oracle_scores], dim=-1).to(score_dtype).to(device)   # [R, N, 2]
    scores = pair[..., 0]
    assert not scores.is_contiguous()
    C = 6
    leading = (G,) if G else ()
    x = torch.randn(*leading, R, C, N, generator=torch.Generator().manual_seed(12)).to(dtype).to(device).transpose(-1, -2)
    assert not x.is_contiguous()
    index, compact = ts.topk_gather(scores, x, k, backend="triton")
    expected = _argsort_reference(scores.double().cpu(), k)
    assert index.dtype == torch.int64 and torch.equal(index.cpu(), expected)
    grouped = x.cpu() if G else x.cpu()[None]
    want = torch.stack([torch.stack([grouped[t, r, expected[r]] for r in range(R)]) for t in range(grouped.shape[0])])
    assert compact.shape == (*leading, R, k, C)
    assert torch.equal(compact.cpu(), want if G else want[0])
    ref_index, ref_compact = ts.topk_gather(scores, x, k, backend="torch")
    assert torch.equal(index, ref_index) and torch.equal(compact, ref_compact)


def test_topk_gather_ranks_nan_and_signed_zero_like_torch(device):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, 2.0, nan, inf, -0.0, 0.0, -inf],
                           [-0.0, 0.0, -0.0, 0.0, 1.0, 1.0, -inf, nan]], device=device)
    x = torch.arange(2 * 8, dtype=torch.float32, device=device).reshape(2, 8, 1)
    for k in (1, 2, 4, 6, 8):
        index, compact = ts.topk_gather(scores, x, k, backend="triton")
        assert torch.equal(index, ts.topk_tokens_reference(scores, k)), k
        assert torch.equal(compact[..., 0], torch.gather(x[..., 0], 1, index))
    assert ts.topk_gather(scores, x, 4, backend="triton")[0].cpu().tolist() == [[1, 2, 3, 4], [0, 4, 5, 7]]   # -0.0 ties 0.0


@pytest.mark.parametrize("score_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_topk_gather_orders_subnormals_infinities_and_nan_in_every_float_dtype(device, score_dtype):
    """Every special value of each score dtype (subnormals of both signs, the extremes, +-inf,
    NaN, signed zeros) ranks as torch's stable descending sort does, at every k. The keys come
    from the scores' own bits, not a float32 widening (Triton's interpreter flushes bfloat16
    subnormals to zero when widening, and a GPU may flush float32 subnormals in a comparison)."""
    fi = torch.finfo(score_dtype)
    sub = fi.smallest_normal / 4  # a subnormal of score_dtype
    values = [0.0, -0.0, sub, -sub, 2 * sub, -2 * sub, fi.smallest_normal, -fi.smallest_normal,
              fi.max, -fi.max, float("inf"), float("-inf"), float("nan"), 1.0, -1.0]
    g = torch.Generator().manual_seed(21)
    table = torch.tensor(values, dtype=score_dtype)
    assert table[2] != 0 and table[3] != 0  # subnormals exist in this dtype
    scores = table[torch.stack([torch.randperm(len(values), generator=g) for _ in range(3)]
                   + [torch.randint(0, len(values), (len(values),), generator=g) for _ in range(3)])]
    scores = scores.to(device)
    R, N = scores.shape
    x = torch.arange(R * N, dtype=torch.float32, device=device).reshape(R, N, 1)
    for k in range(1, N + 1):
        index, compact = ts.topk_gather(scores, x, k, backend="triton")
        assert torch.equal(index.cpu(), ts.topk_tokens_reference(scores.cpu(), k)), k
        assert torch.equal(compact[..., 0], torch.gather(x[..., 0], 1, index))


def test_topk_gather_gradient_scatters_back_to_every_timestep(device):
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(13)).to(device)
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64, device=device, requires_grad=True)
    index, compact = ts.topk_gather(scores, x, 4, backend="triton")
    weight = torch.randn_like(compact)
    (compact * weight).sum().backward()
    expected = torch.zeros(2, 3, 10, 4, dtype=torch.float64)
    for t in range(2):
        for r in range(3):
            expected[t, r, index[r].cpu()] = weight[t, r].cpu()
    assert torch.equal(x.grad.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_are_exact_and_each_others_gradient(device, dtype):
    g = torch.Generator().manual_seed(6)
    R, N, K, C = 5, 20, 7, 140
    index = torch.stack([torch.sort(torch.randperm(N, generator=g)[:K]).values for _ in range(R)]).to(device)
    x = torch.randn(R, N, C, generator=g).to(dtype).to(device).requires_grad_(dtype == torch.float64)
    out = ts.gather_tokens(x, index, backend="triton")
    assert torch.equal(out, ts.gather_tokens(x, index, backend="torch"))
    full = ts.scatter_tokens(out.detach(), index, N, backend="triton")
    assert torch.equal(full, ts.scatter_tokens(out.detach(), index, N, backend="torch"))
    dropped = torch.ones(R, N, dtype=torch.bool, device=device).scatter(1, index, False)
    assert torch.all(full[dropped] == 0)
    if dtype == torch.float64:
        grad = torch.randn_like(out)
        out.backward(grad)
        assert torch.equal(x.grad, ts.scatter_tokens(grad, index, N, backend="torch"))
        compact = out.detach().requires_grad_()
        ts.scatter_tokens(compact, index, N, backend="triton").backward(full)
        assert torch.equal(compact.grad, out.detach())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_masked_mean_matches_float64_reference(device, dtype, tol):
    g = torch.Generator().manual_seed(7)
    T, B, N, C = 3, 4, 37, 150
    x = torch.randn(T, B, N, C, generator=g)
    mask = torch.rand(T, B, N, generator=g) < 0.4
    mask[:, :, 0] = True
    expected = (x.double() * mask.double()[..., None]).sum((0, 2)) / mask.double().sum((0, 2))[:, None]
    xd = x.to(dtype).to(device).requires_grad_(dtype != torch.float16)
    out = ts.masked_mean(xd, mask.to(device), backend="triton")
    assert out.dtype == dtype
    assert torch.allclose(out.double().cpu(), expected, atol=tol, rtol=tol)
    if xd.requires_grad:
        out.sum().backward()
        expected_grad = mask.double()[..., None] / mask.double().sum((0, 2))[None, :, None, None]
        assert torch.allclose(xd.grad.double().cpu(), expected_grad.expand(T, B, N, C), atol=tol)
    # [B, N] masks mean the same set at every timestep.
    same = ts.masked_mean(x.to(device), mask[0].to(device), backend="triton")
    assert torch.allclose(same.cpu().double(), ts.masked_mean_reference(x.double(), mask[0].expand(T, B, N)), atol=1e-5)


def test_neuron_membrane_follows_token_identity():
    """Per-timestep token sets: the neuron sees zero current for a dropped (token, t)."""
    from effst.nn import LIF
    T, B, N, K, C = 4, 2, 6, 3, 5
    g = torch.Generator().manual_seed(8)
    index = random_route(T, B, N, K, g)
    current = torch.rand(T, B, K, C, generator=g, dtype=torch.float64) * 2
    out = run_neuron_on_tokens(LIF(tau=2.0, backend="reference"), current, index, N, backend="torch")
    # Oracle: step the LIF by hand on the full token axis.
    v = torch.zeros(B, N, C, dtype=torch.float64)
    for t in range(T):
        x = torch.zeros(B, N, C, dtype=torch.float64)
        for b in range(B):
            x[b, index[t, b]] = current[t, b]
        h = v + (x - v) / 2.0
        s = (h >= 1.0).double()
        v = h * (1 - s)
        for b in range(B):
            assert torch.equal(out[t, b], s[b, index[t, b]])


def test_token_route_computes_its_slots_once_and_every_neuron_reuses_them(monkeypatch):
    """One route, several fused neurons: token_slots runs once (on the first neuron), later
    neurons reuse it, and the spikes and gradients equal those of bare index tensors (which
    build a fresh slot map per call)."""
    from effst.nn import LIF

    T, B, N, K, C = 3, 2, 7, 4, 5
    g = torch.Generator().manual_seed(14)
    index = random_route(T, B, N, K, g)
    current = (torch.rand(T, B, K, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    calls = []
    real = token_routing.token_slots
    monkeypatch.setattr(token_routing, "token_slots", lambda *args: calls.append(args) or real(*args))
    results = []
    for shared in (True, False):
        route = token_routing.TokenRoute(index, N)
        neurons = [LIF(tau=tau, backend="triton") for tau in (2.0, 3.0, 1.5)]
        before = len(calls)
        x = current
        for neuron in neurons:
            x = run_neuron_on_tokens(neuron, x * 1.5, route if shared else index, None if shared else N)
        x.sum().backward()
        results.append((x.detach(), current.grad.clone(), [n.v.detach() for n in neurons]))
        current.grad = None
        assert len(calls) - before == (1 if shared else 3)
    assert calls[0][0] is index and calls[0][1] == N
    assert route.slots() is route.slots()
    assert torch.equal(route.slots(), ts.token_slots(index, N))
    (spikes, grad, states), (spikes_2, grad_2, states_2) = results
    assert torch.equal(spikes, spikes_2) and torch.equal(grad, grad_2)
    assert all(torch.equal(a, b) for a, b in zip(states, states_2))
    with pytest.raises(ValueError, match="tokens: expected None or the route's 7"):
        run_neuron_on_tokens(LIF(), current.detach(), route, 8)
    with pytest.raises(ValueError, match="index: expected a route of shape"):
        run_neuron_on_tokens(LIF(), current.detach()[:2], route)
    with pytest.raises(ValueError, match="tokens: expected an int >= 4"):
        token_routing.TokenRoute(index, 3)
    with pytest.raises(ValueError, match="index: token indices must be unique"):
        token_routing.TokenRoute(torch.zeros(1, 1, 2, dtype=torch.int64), 3)


class _OracleSpike(torch.autograd.Function):
    """Heaviside forward, the surrogate's derivative backward (SPEC: sigmoid'(alpha x) * alpha,
    atan: (alpha / 2) / (1 + (pi/2 alpha x)^2))."""

    @staticmethod
    def forward(ctx, x, surrogate, alpha):
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        if ctx.surrogate == "sigmoid":
            d = a * torch.sigmoid(a * x) * (1 - torch.sigmoid(a * x))
        else:
            d = (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)
        return grad * d, None, None


def _lif_oracle(x, w, theta, *, v, hard, detach, decay, surrogate, alpha):
    """float64 LIF on the full token grid ``x`` [T, B, N, C], written from the spec equations."""
    k = torch.sigmoid(w)
    rest = 0.0 if hard else 0.0
    spikes = []
    for t in range(x.shape[0]):
        h = v + k * (x[t] - (v - rest)) if decay else v - k * (v - rest) + x[t]
        s = _OracleSpike.apply(h - theta, surrogate, alpha)
        r = s.detach() if detach else s
        v = h * (1 - r) + rest * r if hard else h - r * theta
        spikes.append(s)
    return torch.stack(spikes), v


ROUTED_CASES = [  # hard reset, detach_reset, decay_input, per-channel, surrogate, dtype
    (True, True, True, False, "sigmoid", torch.float64),     # Spikformer's neuron
    (False, False, False, True, "atan", torch.float64),
    (True, False, True, True, "atan", torch.float32),
    (False, True, True, False, "sigmoid", torch.float16),   # bf16: the GPU test (the interpreter cannot convert to it)
]


@pytest.mark.parametrize("hard,detach,decay,per_channel,surrogate,dtype", ROUTED_CASES)
def test_fused_routed_neuron_matches_a_float64_oracle(device, hard, detach, decay, per_channel, surrogate, dtype):
    """The fused per-token-identity neuron against a hand-stepped float64 LIF on the full grid
    (zero input for a dropped (token, t)); spikes exact, state and every gradient close; two
    calls in a row carry the membrane (v_init) and its gradient."""
    from effst.nn import SLIF

    T, B, N, K, C = 4, 2, 19, 7, 70     # 19 tokens: two token tiles, 70 channels: two channel tiles
    g = torch.Generator().manual_seed(11)
    neuron = SLIF(tau=1.7, v_threshold=0.8, v_reset=0.0 if hard else None, surrogate=surrogate,
                  detach_reset=detach, decay_input=decay, channels=C if per_channel else None, backend="triton")
    with torch.no_grad():
        neuron.w.add_(torch.randn(neuron.w.shape, generator=g) * 0.3)
        neuron.v_threshold.add_(torch.rand(neuron.v_threshold.shape, generator=g) * 0.4)
    neuron = neuron.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    routes = [random_route(T, B, N, K, g) for _ in range(2)]
    currents = [(torch.rand(T, B, K, C, generator=g, dtype=torch.float64) * 2.2 - 0.3).to(dtype) for _ in range(2)]
    weights = [torch.randn(T, B, K, C, generator=g, dtype=torch.float64) for _ in range(2)]
    inputs = [c.clone().to(device).requires_grad_() for c in currents]
    assert token_routing._fusable(neuron, inputs[0], N, "triton")      # the fused kernel runs, not the fallback
    spikes = [run_neuron_on_tokens(neuron, x, r.to(device), N, backend="triton") for x, r in zip(inputs, routes)]
    assert neuron.v.shape == (B, N, C)
    loss = sum((s.double() * w.to(device)).sum() for s, w in zip(spikes, weights)) + 0.5 * neuron.v.double().sum()
    loss.backward()

    w = neuron.w.detach().double().cpu().requires_grad_()
    theta = neuron.v_threshold.detach().double().cpu().requires_grad_()
    oracle_inputs = [c.detach().clone().double().requires_grad_() for c in currents]
    v = torch.zeros(B, N, C, dtype=torch.float64)
    oracle_loss = 0
    for x, r, weight, out in zip(oracle_inputs, routes, weights, spikes):
        full = torch.zeros(T, B, N, C, dtype=torch.float64)
        for t in range(T):
            for b in range(B):
                full[t, b, r[t, b]] = x[t, b]
        s, v = _lif_oracle(full, w, theta, v=v, hard=hard, detach=detach, decay=decay, surrogate=surrogate,
                           alpha=neuron.alpha)
        kept = torch.stack([torch.stack([s[t, b, r[t, b]] for b in range(B)]) for t in range(T)])
        assert torch.equal(out.detach().double().cpu(), kept.detach())
        oracle_loss = oracle_loss + (kept * weight).sum()
    (oracle_loss + 0.5 * v.sum()).backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    assert torch.allclose(neuron.v.detach().double().cpu(), v.detach(), atol=tol)
    for got, expected in ((inputs[0].grad, oracle_inputs[0].grad), (inputs[1].grad, oracle_inputs[1].grad),
                          (neuron.w.grad, w.grad), (neuron.v_threshold.grad, theta.grad)):
        assert torch.allclose(got.double().cpu(), expected.reshape(got.shape), atol=tol, rtol=tol)


def test_fused_routed_neuron_integer_spikes_and_fallbacks():
    """uint8 spikes at inference equal the float spikes; the unfused path (fused=False, or a
    neuron that is not an effst sLIF on Triton) gives the same spikes."""
    from effst.nn import LIF

    T, B, N, K, C = 3, 2, 6, 3, 4
    g = torch.Generator().manual_seed(12)
    index = random_route(T, B, N, K, g)
    current = torch.rand(T, B, K, C, generator=g) * 2
    fused = run_neuron_on_tokens(LIF(backend="triton"), current, index, N)
    with torch.no_grad():
        packed = run_neuron_on_tokens(LIF(backend="triton", spike_dtype=torch.uint8), current, index, N)
    assert packed.dtype == torch.uint8 and torch.equal(packed.float(), fused)
    assert torch.equal(run_neuron_on_tokens(LIF(backend="triton"), current, index, N, fused=False), fused)
    assert torch.equal(run_neuron_on_tokens(LIF(backend="reference"), current, index, N), fused)
    assert ts.token_slots(index, N)[0, 0].tolist().count(-1) == N - K
    # A hooked neuron (record_firing_rates) is called itself, on the full token grid.
    hooked, seen = LIF(backend="triton"), []
    hooked.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    assert not token_routing._fusable(hooked, current, N, "auto")
    assert torch.equal(run_neuron_on_tokens(hooked, current, index, N), fused) and seen == [(T, B, N, C)]


@pytest.mark.parametrize("detach", [False, True])
def test_fused_routed_neuron_with_a_nonzero_reset_potential(detach):
    """V_r != 0 (the oracle test above resets to 0 only): the fused kernel's spikes, state and
    every gradient equal the unfused path's (scatter, effst's sLIF kernel, gather) in float64."""
    from effst.nn import SLIF

    T, B, N, K, C = 3, 2, 6, 3, 5
    g = torch.Generator().manual_seed(21)
    index = random_route(T, B, N, K, g)
    current = torch.rand(T, B, K, C, generator=g, dtype=torch.float64) * 4.0 - 0.5
    results = []
    for fused in (True, False):
        neuron = SLIF(v_reset=-0.3, channels=C, detach_reset=detach, backend="triton").double()
        x = current.clone().requires_grad_()
        spikes = run_neuron_on_tokens(neuron, x, index, N, fused=fused)
        ((spikes * torch.linspace(-1, 1, C, dtype=torch.float64)).sum() + 0.5 * neuron.v.sum()).backward()
        results.append((spikes.detach(), neuron.v.detach(), x.grad, neuron.w.grad, neuron.v_threshold.grad))
    assert torch.equal(results[0][0], results[1][0]) and results[0][0].any()
    for got, want in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_per_channel_neuron_along_another_dim_is_not_fused():
    """The fused kernel indexes parameters by the last dim's channel: a per-channel neuron along
    the token dim with C = 1 (inner == 1 too) must run unfused and give the unfused spikes
    (it was fused and used threshold[0] for every token)."""
    from effst.nn import SLIF

    T, B, N, K, C = 3, 2, 6, 3, 1
    g = torch.Generator().manual_seed(0)
    index = random_route(T, B, N, K, g)
    current = torch.rand(T, B, K, C, generator=g) * 2
    neurons = [SLIF(channels=N, channel_dim=1, backend="triton") for _ in range(2)]
    for neuron in neurons:
        with torch.no_grad():
            neuron.v_threshold.copy_(torch.linspace(0.2, 1.9, N))
    assert not token_routing._fusable(neurons[0], current, N, "auto")
    assert torch.equal(run_neuron_on_tokens(neurons[0], current, index, N),
                       run_neuron_on_tokens(neurons[1], current, index, N, fused=False))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k: expected"):
        ts.anchor_topk_gather(torch.ones(2, 4), torch.ones(2, 5, 4), torch.ones(2, 5, 3), 6)
    with pytest.raises(ValueError, match="anchor_query"):
        ts.anchor_topk_gather(torch.ones(2, 3), torch.ones(2, 5, 4), torch.ones(2, 5, 3), 2)
    with pytest.raises(TypeError, match="index: expected int64"):
        ts.gather_tokens(torch.ones(2, 5, 3), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="index: token indices"):
        ts.gather_tokens(torch.ones(2, 5, 3), torch.full((2, 2), 5))
    with pytest.raises(ValueError, match="mask: expected shape"):
        ts.masked_mean(torch.ones(2, 3, 4, 5), torch.ones(3, 5))
    with pytest.raises(ValueError, match="backend"):
        ts.gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, 1], [2, 3]]), backend="cuda")
    with pytest.raises(ValueError, match="k: expected"):
        ts.topk_gather(torch.ones(2, 5), torch.ones(2, 5, 3), 0)
    with pytest.raises(ValueError, match="x: expected shape"):
        ts.topk_gather(torch.ones(2, 5), torch.ones(4, 2, 6, 3), 2)
    with pytest.raises(ValueError, match="x: expected a"):
        ts.topk_gather(torch.ones(2, 5), torch.ones(2, 5), 2)
    with pytest.raises(ValueError, match="scores: expected a 2-D"):
        ts.topk_gather(torch.ones(2, 5, 1), torch.ones(2, 5, 3), 2)
    with pytest.raises(TypeError, match="scores: expected a real"):
        ts.topk_gather(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 5, 3), 2)


def _aot_entries(arch):
    mod = "effst.ops.token_select"
    entries = []
    for x_type in ("fp16", "bf16", "fp32"):
        # One top-k + gather kernel: STATA's anchor scores (spike queries / keys in, int32 scores
        # out) and STS's precomputed keep log-probabilities read through strides: float32 under
        # autocast (bf16 activations), the model's own dtype otherwise (every float type covered).
        sts_score = {"fp16": "*fp16", "bf16": "*fp32", "fp32": "*bf16"}[x_type]
        for anchor, score_type, qk_type in ((True, "*i32", "*fp16"), (False, sts_score, sts_score)):
            entries.append({"module": mod, "kernel": "_topk_gather_kernel", "arch": arch,
                            "signature": {"score_ptr": score_type, "query_ptr": qk_type, "key_ptr": qk_type,
                                          "x_ptr": f"*{x_type}", "index_ptr": "*i64", "out_ptr": f"*{x_type}",
                                          "R": "i32", "N": "i32", "W": "i32", "C": "i32", "K": "i32",
                                          "score_row_stride": "i32", "score_token_stride": "i32"},
                            "constexprs": {"ANCHOR": anchor, **ts.topk_gather_blocks(196, 384, 384)}})
        for scatter in (False, True) if x_type != "fp16" else ():     # a plain copy: bf16 covers 16-bit
            entries.append({"module": mod, "kernel": "_move_tokens_kernel", "arch": arch,
                            "signature": {"src_ptr": f"*{x_type}", "index_ptr": "*i64", "dst_ptr": f"*{x_type}",
                                          "N": "i32", "K": "i32", "C": "i32"},
                            "constexprs": {"SCATTER": scatter, "BLOCK_K": 32, "BLOCK_C": 128}})
        entries.append({"module": mod, "kernel": "_masked_mean_kernel", "arch": arch,
                        "signature": {"x_ptr": f"*{x_type}", "mask_ptr": f"*{x_type}", "out_ptr": f"*{x_type}",
                                      "T": "i32", "B": "i32", "N": "i32", "C": "i32"},
                        "constexprs": {"ACC_DTYPE": "tl.float32", "BLOCK_N": 32, "BLOCK_C": 128}})
    # The routed neuron: bf16 with Spikformer's LIF (hard reset, detach_reset, sigmoid, nothing
    # learned); fp32 with every option flipped (soft reset, sLIF gradients, state in and out).
    for x_type, lif in (("bf16", True), ("fp32", False)):
        sizes = {n: "i32" for n in ("B", "N", "K", "C", "w_channels", "theta_channels")}
        fp32 = {n: "*fp32" for n in ("w_ptr", "theta_ptr", "v_init_ptr", "scalars_ptr")}
        entries.append({"module": mod, "kernel": "_routed_neuron_forward_kernel", "arch": arch,
                        "signature": {"x_ptr": f"*{x_type}", "slot_ptr": "*i32", **fp32, "spikes_ptr": f"*{x_type}",
                                      "v_final_ptr": "*fp32", **sizes},
                        "constexprs": {"T": 4, "HAS_V_INIT": not lif, "HARD_RESET": lif, "DECAY_INPUT": True,
                                       "COMPUTE_DTYPE": "tl.float32", "BLOCK_N": ts.ROUTED_FORWARD_BLOCK[0],
                                       "BLOCK_C": ts.ROUTED_FORWARD_BLOCK[1]}})
        entries.append({"module": mod, "kernel": "_routed_neuron_backward_kernel", "arch": arch,
                        "signature": {"grad_s_ptr": f"*{x_type}", "grad_v_final_ptr": "*fp32", "x_ptr": f"*{x_type}",
                                      "slot_ptr": "*i32", **fp32, "grad_x_ptr": f"*{x_type}", "grad_w_ptr": "*fp32",
                                      "grad_theta_ptr": "*fp32", "grad_v_init_ptr": "*fp32", **sizes},
                        "constexprs": {"T": 4, "HAS_V_INIT": not lif, "HAS_GRAD_V_FINAL": not lif, "HARD_RESET": lif,
                                       "DECAY_INPUT": True, "DETACH_RESET": lif, "SURROGATE": 0 if lif else 1,
                                       "NEED_GRAD_W": not lif, "NEED_GRAD_THETA": not lif,
                                       "COMPUTE_DTYPE": "tl.float32", "BLOCK_N": ts.ROUTED_BACKWARD_BLOCK[0],
                                       "BLOCK_C": ts.ROUTED_BACKWARD_BLOCK[1]}})
    return entries


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_aot_compile(arch):
    result = subprocess.run([sys.executable, str(AOT), json.dumps(_aot_entries(arch))], capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).parents[1])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [line for line in lines if not line["ok"]]
    assert result.returncode == 0 and not failed and len(lines) == len(_aot_entries(arch)), (failed, result.stderr[-2000:])


@pytest.mark.gpu
def test_kernels_on_cuda_at_stata_sizes_without_host_sync():
    """Spikformer-4-384 sizes (T*B = 256 rows, 64 tokens + anchor, D = 384), bf16 activations:
    Triton equals the torch path exactly, and no op synchronises with the host."""
    g = torch.Generator().manual_seed(9)
    R, N, W, C, k = 256, 64, 384, 384, 32
    query = (torch.rand(R, W, generator=g) < 0.3).to("cuda", torch.bfloat16)
    keys = (torch.rand(R, N, W, generator=g) < 0.3).to("cuda", torch.bfloat16)
    x = torch.randn(R, N, C, generator=g).to("cuda", torch.bfloat16)
    mask = (torch.rand(4, 64, N, generator=g) < 0.5).cuda()
    mask[:, :, 0] = True
    from effst.nn import LIF

    neuron = LIF(surrogate="sigmoid", alpha=4.0, detach_reset=True, backend="triton").cuda()
    current = (torch.randn(R, k, C, generator=g) + 0.8).to("cuda", torch.bfloat16).view(4, 64, k, C).requires_grad_()
    route = torch.sort(torch.rand(R, N, generator=g).argsort(dim=1)[:, :k], dim=1).values.cuda().view(4, 64, k)
    run_neuron_on_tokens(neuron, current, route, N).float().sum().backward()    # compile and cache outside
    neuron.reset()
    current.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores, index, compact = ts.anchor_topk_gather(query, keys, x, k, backend="triton")
        full = ts.scatter_tokens(compact, index, N, backend="triton")
        again = ts.gather_tokens(full, index, backend="triton")
        pooled = ts.masked_mean(x.view(4, 64, N, C), mask, backend="triton")
        spikes = run_neuron_on_tokens(neuron, current, route, N)          # the fused routed neuron
        (spikes.float() * x[:, :k].reshape(4, 64, k, C).float()).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fused_grad, current.grad = current.grad, None
    neuron.reset()
    unfused = run_neuron_on_tokens(neuron, current, route, N, fused=False)
    (unfused.float() * x[:, :k].reshape(4, 64, k, C).float()).sum().backward()
    # Same arithmetic; the compiler may contract a multiply-add differently in the two kernels.
    assert float((spikes != unfused).float().mean()) < 1e-4
    assert torch.allclose(fused_grad.float(), current.grad.float(), atol=1e-2, rtol=1e-2)
    # Learned per-channel parameters: their gradients are bitwise the same run to run.
    from effst.nn import SLIF

    learned = SLIF(channels=C, backend="triton").cuda()
    runs = []
    for _ in range(2):
        learned.zero_grad()
        learned.reset()
        run_neuron_on_tokens(learned, current.detach(), route, N).float().sum().backward()
        runs.append((learned.w.grad.clone(), learned.v_threshold.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref_scores, ref_index, ref_compact = ts.anchor_topk_gather(query, keys, x, k, backend="torch")
    assert torch.equal(scores, ref_scores) and torch.equal(index, ref_index) and torch.equal(compact, ref_compact)
    assert torch.equal(again, compact)
    expected = ts.masked_mean_reference(x.view(4, 64, N, C).double(), mask)
    assert torch.allclose(pooled.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["sts", "stata"])
def test_token_selectors_train_and_infer_on_cuda(selector):
    from effst.models import build_model

    torch.manual_seed(0)
    model = build_model("spikformer-4-384", token_selector=selector).cuda()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = logits.float().logsumexp(-1).mean() + sum(model.auxiliary_losses().values())
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    expected = [64.0, 44.0, 31.0, 21.0] if selector == "sts" else [64.0, 64.0, 32.0, 32.0]
    assert model.tokens_per_block() == expected


def test_repeated_indices_and_empty_samples_are_refused():
    with pytest.raises(ValueError, match="unique"):
        ts.gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, 1], [3, 3]]))
    with pytest.raises(ValueError, match="unique"):
        ts.scatter_tokens(torch.ones(1, 3, 2), torch.tensor([[4, 0, 4]]), 5)
    mask = torch.ones(2, 3, 4)
    mask[:, 1] = 0
    with pytest.raises(ValueError, match="at least one token"):
        ts.masked_mean(torch.ones(2, 3, 4, 5), mask)


def test_run_neuron_on_tokens_names_bad_shapes():
    from effst.nn import LIF

    with pytest.raises(ValueError, match="current: expected a 4-D"):
        run_neuron_on_tokens(LIF(), torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="index: expected shape"):
        run_neuron_on_tokens(LIF(), torch.ones(2, 1, 2, 3), torch.tensor([[0, 1], [1, 2]]), 5)


def test_topk_gather_does_not_spill_at_spikformer_token_counts():
    from aot_compile import resource_usage  # compiled for sm_90 in a subprocess, read by cuobjdump

    # 64 tokens (CIFAR Spikformer) and 196 (ImageNet, BLOCK_N = 256) at the launcher's blocks,
    # both variants: no stack or local memory, <= 128 registers (4 programs of 4 warps per SM).
    # An N x N rank matrix and 256 x 64 tiles of addresses had spilled 5 KB per thread at 196.
    entries = []
    for tokens in (64, 196):
        for anchor, score_type in ((True, "*i32"), (False, "*fp32")):
            entries.append({"name": f"{tokens} tokens anchor={anchor}", "module": "effst.ops.token_select",
                            "kernel": "_topk_gather_kernel", "options": {"num_warps": 4},
                            "signature": {"score_ptr": score_type, "query_ptr": "*fp16", "key_ptr": "*fp16",
                                          "x_ptr": "*bf16", "index_ptr": "*i64", "out_ptr": "*bf16",
                                          "R": "i32", "N": "i32", "W": "i32", "C": "i32", "K": "i32",
                                          "score_row_stride": "i32", "score_token_stride": "i32"},
                            "constexprs": {"ANCHOR": anchor, **ts.topk_gather_blocks(tokens, 384, 384)}})
    found = resource_usage(entries)
    for usage in found.values():
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0 and usage["REG"] <= 128, found
