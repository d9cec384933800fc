"""Peers of the ``train-step`` suite: SpikingJelly versions its own process cannot import.

``bench/bench_train_step.py`` times effst and the SpikingJelly importable in the harness's
process (2.0.0). SpikingJelly 0.0.0.0.14 (``backend='cupy'`` on the GPU, ``'torch'`` on the
CPU) lives in its own environment, so the same model and step run there through
``bench/peers/sj_train_step.py`` with the configuration copied from the suite's own rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from effst.benchmarks import peers as peers_mod

RUNNER = "sj_train_step.py"


def _sj_backend(name: str, device: str) -> Optional[str]:
    if name == "sj014":
        return "cupy" if device == "cuda" else "torch"
    return None  # 2.0.0 picks its own kernel


def add_peer_rows(rows: list[dict], *, device: str, peer_names: tuple[str, ...], peers_dir: Path,
                  wheels: Optional[Path], runner_dir: Path, suite_path: Path, timeout: float,
                  threads: Optional[int] = None, quick: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Append one row per peer not already measured in-process; returns per-peer info."""
    measured = {r.get("library") for r in rows if r.get("status") == "ok"}
    template = (next((r for r in rows if r.get("status") == "ok" and r.get("neuron") == "spikingjelly"), None)
                or next((r for r in rows if r.get("status") == "ok" and "batch" in r), None))
    info = {}
    for name in peer_names:
        spec = peers_mod.PEERS[name]
        if spec.label in measured:
            continue  # the suite timed this version in its own process already
        sj_backend = _sj_backend(name, device)
        row = {"suite": "train-step", "library": spec.label, "peer": name, "neuron": "spikingjelly",
               "kernel": sj_backend or "default", "device": device}
        info[name] = {"label": spec.label}
        if template is None:
            row.update(status="error", error="no successful train-step row to copy the configuration from")
            rows.append(row)
            continue
        log(f"[train-step] preparing peer environment {peers_dir / name} ({spec.requirement})")
        env = peers_mod.ensure_env(spec, peers_dir, wheels)
        info[name].update(location=str(env.path), source=env.source)
        if not env.ok:
            row.update(status="error", error=f"peer environment could not be created: {env.error}")
            info[name]["status"] = "error"
            rows.append(row)
            continue
        kwargs = {key: template[key] for key in ("batch", "T", "dtype", "reps", "warmup", "model") if key in template}
        kwargs.update(neuron="spikingjelly", device=device, sj_backend=sj_backend)
        if quick:  # CI size: the point is that the peer runs, one timed step is enough
            kwargs.update(reps=1, warmup=1)
        if sj_backend == "cupy" and kwargs.get("dtype") == "bf16":
            kwargs["dtype"] = "fp32"  # its kernels take fp32 and fp16 only: a number, not an error
            row["note"] = "SpikingJelly 0.0.0.0.14's cupy kernels have no bf16; timed in fp32"
        request = {"expect_version": spec.version, "expect_location": str(env.path),
                   "suite_module": str(suite_path), "threads": threads, "kwargs": kwargs}
        log(f"[train-step] running {spec.label} ({row['kernel']}) in a subprocess")
        run = peers_mod.run_runner(env, runner_dir / RUNNER, request, timeout=timeout)
        info[name].update(status="ok" if run.ok else "error", seconds=round(run.seconds, 2),
                          spikingjelly_file=run.payload.get("spikingjelly_file"))
        if run.ok:
            row.update(run.payload["row"])
            row.update(suite="train-step", peer=name, status="ok")
        else:
            row.update(status="error", error=f"peer run failed: {run.error}", stderr_tail=run.stderr_tail or None)
        rows.append(row)
        log(f"[train-step] {spec.label}: " + (f"{row['ms']:.1f} ms" if run.ok else f"ERROR {row['error'][:200]}"))
        if run.ok:
            for ours in rows:
                if ours.get("status") == "ok" and ours.get("library") == "effst":
                    ours[f"speedup_vs_{name}"] = row["ms"] / ours["ms"]
    return info
