"""The ``overhead`` suite: what one tiny forward+backward call costs a user, in eager wall time.

On a tiny input the kernels take microseconds, so the wall time of a call is its host-side cost
(Python, dispatch, launches). Every row times the same call pattern on the same tensors:
``reset`` (neurons), forward, then ``torch.autograd.grad`` of every input and learnable
parameter with a fixed output gradient; calls run back to back and are synchronised at the end
of a round (a user's loop does not synchronise per call), ``us`` = median over rounds of the
round's time / its calls.

Rows: the plain PyTorch baseline ``y = sigmoid(x * w + b)`` with per-channel learnable ``w``,
``b`` (the least any fused neuron op could cost); effst SLIF (per-channel τ and V_th), PLIF, LIF
and BlockSparseLinear (64 -> 64, 16x16 tiles, half of them kept); SpikingJelly's
``ParametricLIFNode(step_mode='m')`` from the SpikingJelly importable in this process (2.0.0).
CPU: the native path, one thread, x = [4, 2, 16]; CUDA: Triton, x = [4, 64, 64] (on CUDA every
row also has ``kernel_ms``, :func:`effst.benchmarks.timing.kernel_time`).

Targets (issue 9): CPU SLIF <= 1.0x the baseline; CUDA SLIF <= 1.0x the baseline and <= 60 us;
BlockSparseLinear <= 100 us on CUDA.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from effst.benchmarks import timing

SHAPES = {"cpu": (4, 2, 16), "cuda": (4, 64, 64)}  # x = [T, B, C]
SPARSE = {"features": 64, "block": 16, "sparsity": 0.5}
NEURON = dict(tau=2.0, v_threshold=1.0, v_reset=0.0, surrogate="atan", detach_reset=True)
TARGETS = {"cpu": {"SLIF": {"ratio": 1.0}},
           "cuda": {"SLIF": {"ratio": 1.0, "us": 60.0}, "BlockSparseLinear": {"us": 100.0}}}


def per_call_us(call: Callable[[], object], device: str, *, rounds: int, round_seconds: float) -> dict:
    """Median over ``rounds`` of (time of n back-to-back calls, synchronised at the end) / n, in µs."""
    for _ in range(3):  # warm-up: JIT compilation, allocator, autotuning
        call()
    timing.synchronize(device)
    start = time.perf_counter()
    call()
    timing.synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    calls = max(5, min(2000, int(round_seconds / estimate)))
    samples = []
    for _ in range(rounds):
        timing.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        timing.synchronize(device)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    samples.sort()
    quartiles = timing.quartiles_of(samples)
    return {"us": statistics.median(samples), "us_min": samples[0], "us_q1": quartiles[0], "us_q3": quartiles[2],
            "calls_per_round": calls, "rounds": rounds}


def _cases(device: str, dtype: torch.dtype) -> list[tuple[str, str, str, Callable[[], Callable[[], object]]]]:
    """(library, op, kernel, builder) per row; a builder returns the call to time."""
    T, B, C = SHAPES[device]
    generator = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(T, B, C, generator=generator, device=device) * 1.5 + 0.5).to(dtype).requires_grad_(True)
    grad = torch.randn(T, B, C, generator=generator, device=device).to(dtype)
    backend = "native" if device == "cpu" else "triton"

    def baseline():
        w = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
        return lambda: torch.autograd.grad(torch.sigmoid(x * w + b), [x, w, b], grad)

    def neuron(kind):
        def build():
            import effst.nn

            if kind == "SLIF":
                module = effst.nn.SLIF(**NEURON, channels=C, channel_dim=-1, backend=backend)
            else:
                module = getattr(effst.nn, kind)(**NEURON, backend=backend)
            return _neuron_call(module.to(device), module.reset, x, grad)
        return build

    def block_sparse():
        from effst.nn import BlockSparseLinear

        features = SPARSE["features"]
        linear = torch.nn.Linear(features, features, device=device, dtype=dtype)
        layer = BlockSparseLinear.from_dense(linear, sparsity=SPARSE["sparsity"],
                                             block_size=(SPARSE["block"], SPARSE["block"]))
        layer = layer.to(device)
        inputs = torch.randn(T * B, features, generator=generator, device=device).to(dtype).requires_grad_(True)
        out_grad = torch.randn(T * B, features, generator=generator, device=device).to(dtype)
        params = [p for p in layer.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(layer(inputs), [inputs, *params], out_grad)

    def sj_plif():
        from spikingjelly.activation_based import functional, neuron as sj_neuron, surrogate

        module = sj_neuron.ParametricLIFNode(init_tau=NEURON["tau"], v_threshold=NEURON["v_threshold"],
                                             v_reset=NEURON["v_reset"], detach_reset=True,
                                             surrogate_function=surrogate.ATan(alpha=2.0), step_mode="m")
        module = module.to(device)
        return _neuron_call(module, lambda: functional.reset_net(module), x, grad)

    sj = _sj_label()
    return [("torch", "baseline sigmoid(x*w+b)", "aten", baseline),
            ("effst", "SLIF", backend, neuron("SLIF")),
            ("effst", "PLIF", backend, neuron("PLIF")),
            ("effst", "LIF", backend, neuron("LIF")),
            ("effst", "BlockSparseLinear", "triton" if device == "cuda" else "torch", block_sparse),
            (sj, "PLIF", "default", sj_plif)]


def _neuron_call(module, reset, x, grad):
    params = [p for p in module.parameters() if p.requires_grad]

    def call():
        reset()
        return torch.autograd.grad(module(x), [x, *params], grad)
    return call


def _sj_label() -> str:
    try:
        from importlib.metadata import version

        return f"spikingjelly {version('spikingjelly')}"
    except Exception:
        return "spikingjelly (not installed)"


def run(device: str, quick: bool, *, rows: Optional[list] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Rows for the harness; ``rows`` collects them as they finish (kept if the suite is stopped)."""
    rows = [] if rows is None else rows
    device = "cuda" if device.startswith("cuda") else "cpu"
    dtype = torch.float32
    rounds, round_seconds = (3, 0.02) if quick else (7, 0.1)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # the issue's setting: one thread, so the figure is per-call host cost
    try:
        for library, op, kernel, build in _cases(device, dtype):
            row = {"suite": "overhead", "library": library, "op": op, "kernel": kernel, "device": device,
                   "dtype": "float32", "shape": list(SHAPES[device]) if op != "BlockSparseLinear" else
                   [SHAPES[device][0] * SHAPES[device][1], SPARSE["features"]],
                   "threads": torch.get_num_threads()}
            try:
                call = build()
                row.update(per_call_us(call, device, rounds=rounds, round_seconds=round_seconds))
                row["ms"] = row["us"] / 1e3
                row.update(timing.kernel_time(call, device, reps=10))
                row["status"] = "ok"
            except Exception as exc:  # reported, never a silent gap
                row.update(status="error", error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            log(f"[overhead] {library} {op} ({kernel}): " + (f"{row['us']:.1f} us/call" if row["status"] == "ok"
                                                            else f"ERROR {row['error'][:200]}"))
    finally:
        torch.set_num_threads(threads)
    _ratios(rows, device)
    return rows


def _ratios(rows: list[dict], device: str) -> None:
    """Each row's ratio to the baseline, and the issue's targets where it has one."""
    base = next((r for r in rows if r.get("library") == "torch" and r.get("status") == "ok"), None)
    for row in rows:
        if row.get("status") != "ok":
            continue
        if base is not None:
            row["ratio_to_baseline"] = row["us"] / base["us"]
        target = TARGETS[device].get(row["op"]) if row["library"] == "effst" else None
        if target:
            row["target"] = ", ".join(f"<= {v:g}x baseline" if k == "ratio" else f"<= {v:g} us"
                                      for k, v in target.items())
            met = [row["us"] <= target["us"]] if "us" in target else []
            if "ratio" in target:
                met.append(row.get("ratio_to_baseline") is not None and row["ratio_to_baseline"] <= target["ratio"])
            row["target_met"] = all(met)
