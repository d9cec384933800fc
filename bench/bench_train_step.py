"""Benchmark suite ``train-step``: one training step of Spikformer-4-384 at CIFAR size.

effst's sLIF (learned per-channel tau and V_th; Triton kernels on the GPU, ``auto`` on the CPU)
and effst's LIF, against the same model with SpikingJelly's ``LIFNode`` — whichever SpikingJelly
is importable in the process (2.0.0 here; the harness runs 0.0.0.0.14 with its cupy backend in a
separate environment through :func:`time_train_step`). A step is forward, cross-entropy,
backward and an AdamW update, bf16 autocast on the GPU (batch 64), fp32 on the CPU (batch 8;
batch 1 and T=2 in quick mode, a smoke test). Reported: median, min and quartiles of the step time over repetitions after warmup.

Used by ``effst bench train-step`` (``run(device, quick) -> list[dict]``); runnable alone:
``python bench/bench_train_step.py --device cpu --quick``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

MODEL = "spikformer-4-384"


def _sj_version() -> Optional[str]:
    try:
        import spikingjelly
    except ImportError:
        return None
    try:
        from importlib.metadata import version

        return version("spikingjelly")
    except Exception:  # pragma: no cover - metadata missing
        return getattr(spikingjelly, "__version__", "unknown")


def _set_spikingjelly_backend(model, backend: str) -> None:
    """0.0.0.0.x LIFNodes take ``backend`` ('torch' | 'cupy'); 2.0.0 picks its kernel itself."""
    for module in model.modules():
        if type(module).__module__.startswith("spikingjelly") and hasattr(module, "backend"):
            module.backend = backend


def time_train_step(neuron: str, device: str = "cpu", batch: int = 64, T: int = 4, dtype: str = "bf16",
                    reps: int = 10, warmup: int = 3, backend: str = "auto", sj_backend: Optional[str] = None,
                    model: str = MODEL, seed: int = 0) -> dict:
    """Time ``reps`` training steps of ``model`` built with ``neuron`` ('slif', 'lif', 'spikingjelly').

    Works in any process where effst imports (also a peer's environment). ``dtype`` 'bf16' =
    autocast to bfloat16 (CUDA), 'fp32' = none. Returns one result row.
    """
    import torch
    import torch.nn.functional as F

    from effst.models import CONFIGS, build_model
    from effst.nn import reset

    torch.manual_seed(seed)
    dev = torch.device(device)
    net = build_model(model, neuron=neuron, T=T, backend=backend).to(dev)
    if neuron == "spikingjelly" and sj_backend:
        _set_spikingjelly_backend(net, sj_backend)
    cfg = CONFIGS[model]
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    use_amp = dtype == "bf16"

    def step() -> None:
        reset(net)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    step()
    sync()
    first_ms = 1e3 * (time.perf_counter() - t0)
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    library = "effst" if neuron != "spikingjelly" else f"spikingjelly {_sj_version()}"
    return {
        "suite": "train-step", "status": "ok", "impl": f"{library} {neuron if neuron != 'spikingjelly' else 'LIFNode'}",
        "library": library, "neuron": neuron, "kernel": backend if neuron != "spikingjelly" else (sj_backend or "default"),
        "model": model, "batch": batch, "T": T, "image_size": cfg.image_size, "dtype": dtype, "device": str(dev),
        "ms": statistics.median(times), "ms_min": min(times), "ms_q1": q[0], "ms_q3": q[2], "reps": reps,
        "warmup": warmup, "first_call_ms": first_ms,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    }


def run(device: str, quick: bool) -> list[dict]:
    """Rows for the harness: effst sLIF, effst LIF and SpikingJelly LIFNode, plus speedups.

    GPU: batch 64, T=4, bf16 autocast, effst on its Triton kernels. CPU: fp32, batch 8, T=4; quick
    CPU mode (a smoke test): batch 1, T=2, one timed step.
    A configuration that fails becomes an error row naming the exception.
    """
    cuda = device.startswith("cuda")
    batch = 64 if cuda else (1 if quick else 8)
    T = 2 if (quick and not cuda) else 4  # quick CPU mode is a smoke test (a step is seconds there)
    dtype = "bf16" if cuda else "fp32"
    reps, warmup = (10, 3) if cuda else ((1, 1) if quick else (5, 2))
    backend = "triton" if cuda else "auto"
    rows = []
    for neuron in ("slif", "lif", "spikingjelly"):
        try:
            rows.append(time_train_step(neuron, device, batch=batch, T=T, dtype=dtype, reps=reps, warmup=warmup,
                                        backend=backend))
        except Exception as exc:  # reported, never a silent gap
            rows.append({"suite": "train-step", "status": "error", "neuron": neuron, "device": device,
                         "batch": batch, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"})
    peer = next((r for r in rows if r["neuron"] == "spikingjelly" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok" and r["neuron"] != "spikingjelly" and peer is not None:
            r["speedup_vs_spikingjelly"] = peer["ms"] / r["ms"]
            r["target_speedup"] = 1.3 if cuda else None
            r["target_met"] = (r["speedup_vs_spikingjelly"] >= 1.3) if cuda else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.device, args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
