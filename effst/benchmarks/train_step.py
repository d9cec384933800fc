"""The ``train-step`` suite: one training step of a Spikformer, effst's neurons beside SpikingJelly's.

Rows, in the order they run (a suite stopped by its time limit keeps the rows it finished; the
rows issue 12 needs come before the SpikingJelly rows, which take the longest):

1. eager training step of Spikformer-4-384 (CIFAR size, batch 64, T = 4, bf16 autocast on the
   GPU; fp32, batch 8 on the CPU; batch 1, T = 2 with ``quick``) with effst's sLIF and LIF;
2. CUDA only: the whole step (forward, loss, backward, AdamW(capturable=True)) captured in one
   CUDA graph and replayed (``mode='cuda-graph'``), for effst's sLIF and LIF;
3. token selection (issue 12), through ``effst.models.build_model(name, neuron=...,
   token_selector=..., keep_ratio=...)``: STATA (gamma = 0.5) training step vs dense, and STS
   (rho = 0.7) inference images/s vs dense, on Spikformer-4-384 (64 tokens, batch 64) and
   Spikformer-8-512 (196 tokens, batch 32) on the GPU, each pair under a CUDA graph and eager
   (each row's ``speedup_vs_dense`` is against the dense row of the same model, step and mode;
   ``target_speedup``/``target_met`` on the GPU); spikformer-tiny, eager, on the CPU. A model
   that cannot be built (the API missing) is an error row naming why;
4. the SpikingJelly importable in this process (2.0.0's ``LIFNode``, its own kernel choice),
   eager;
5. the same with SpikingJelly 0.0.0.0.14's multi-step cupy LIF (``LIFNode(step_mode='m',
   backend='cupy')``, the kernels of the ``MultiStepLIFNode`` the Spikformer authors trained
   with; ``torch`` backend on the CPU), in its own environment through
   ``bench/peers/sj_train_step.py`` (:func:`add_peer_rows`);
6. CUDA only: SpikingJelly's step under a CUDA graph, as in 2.

Every row has ``ms`` (median step time; for ``cuda-graph`` rows this is the replay, i.e. device
time), quartiles, ``images_per_s``, ``peak_memory_bytes`` (CUDA) and on CUDA eager rows
``kernel_ms`` (profiler device time of one step, :func:`effst.benchmarks.timing.kernel_time`'s
fallback method: an eager step with a non-capturable optimizer is never captured). Token-selection
rows also have ``group = 'token-selection'``: they are compared with their own dense rows, never
with the SpikingJelly rows (``speedup_vs_<peer>`` and ``slif_over_lif`` are for rows 1-2 only).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from effst.benchmarks import peers as peers_mod

MODEL = "spikformer-4-384"
RUNNER = "sj_train_step.py"  # in bench/peers/
#: (model, batch on the GPU, tokens it has) of the token-selection rows
TOKEN_MODELS = (("spikformer-4-384", 64, 64), ("spikformer-8-512", 32, 196))
STATA_KEEP_RATIO = 0.5
STS_KEEP_RATIO = 0.7


def _sj_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("spikingjelly")
    except Exception:  # not installed
        return None


def _set_spikingjelly_backend(model, backend: str) -> None:
    """0.0.0.0.x LIFNodes take ``backend`` ('torch' | 'cupy'); 2.0.0 picks its kernel itself."""
    for module in model.modules():
        if type(module).__module__.startswith("spikingjelly") and hasattr(module, "backend"):
            module.backend = backend


def time_train_step(neuron: str, device: str = "cpu", batch: int = 64, T: int = 4, dtype: str = "bf16",
                    reps: int = 10, warmup: int = 3, backend: str = "auto", sj_backend: Optional[str] = None,
                    model: str = MODEL, seed: int = 0, mode: str = "eager", train: bool = True,
                    token_selector: Optional[str] = None, keep_ratio: Optional[float] = None,
                    overrides: Optional[dict] = None) -> dict:
    """Time steps of ``model`` built with ``neuron`` ('slif', 'lif', 'spikingjelly', ...); one row.

    ``mode``: 'eager', or 'cuda-graph' (the whole step captured once, then replayed).
    ``train``: a training step (forward, cross-entropy, backward, AdamW) or, if False, an
    inference forward under ``torch.no_grad`` in eval mode. ``dtype`` 'bf16' = autocast to
    bfloat16, 'fp16' = autocast to float16, 'fp32' = none. ``token_selector``/``keep_ratio`` and ``overrides`` (config fields,
    e.g. ``{'depth': 2}``) go to ``build_model`` when given.
    Works in any process where effst imports (also a peer's environment).
    """
    import torch
    import torch.nn.functional as F

    from effst.benchmarks import timing
    from effst.models import CONFIGS, build_model
    from effst.nn import reset

    if mode not in ("eager", "cuda-graph"):
        raise ValueError(f"mode: expected 'eager' or 'cuda-graph', got {mode!r}")
    autocast_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if dtype not in autocast_dtypes:
        raise ValueError(f"dtype: expected 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    dev = torch.device(device)
    if mode == "cuda-graph" and dev.type != "cuda":
        raise ValueError("mode='cuda-graph' needs a CUDA device")
    torch.manual_seed(seed)
    selection = {} if token_selector is None else {"token_selector": token_selector, "keep_ratio": keep_ratio}
    net = build_model(model, neuron=neuron, T=T, backend=backend, **selection, **(overrides or {})).to(dev)
    if neuron == "spikingjelly" and sj_backend:
        _set_spikingjelly_backend(net, sj_backend)
    net.train(train)
    cfg = net.config if hasattr(net, "config") else CONFIGS[model]
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    graphed = mode == "cuda-graph"
    optimizer = (torch.optim.AdamW(net.parameters(), lr=1e-4, capturable=graphed) if train else None)
    amp_dtype = autocast_dtypes[dtype]

    def step() -> None:
        reset(net)
        # autocast's weight cache must be off under graph capture (torch.cuda.graphs docs)
        with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                            cache_enabled=not graphed):
            if not train:
                with torch.no_grad():
                    return net(x)
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        auxiliary = getattr(net, "auxiliary_losses", None)  # token selection: alignment/ratio terms
        if auxiliary is not None:
            for term in auxiliary().values():
                loss = loss + term
        loss.backward()
        optimizer.step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        return logits

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    step()
    sync()
    first_ms = 1e3 * (time.perf_counter() - t0)
    kernel = {}
    if graphed:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates .grad itself
        torch.cuda.reset_peak_memory_stats(dev)  # replays do not allocate: the capture's peak is the step's
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        call = graph.replay
        call()
    else:
        call = step
        for _ in range(max(warmup - 1, 0)):
            step()
    sync()
    if dev.type == "cuda" and not graphed:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    if dev.type == "cuda" and not graphed:
        kernel = timing.kernel_time_profiled(step, device, reps=1)
    q = timing.quartiles_of(times)
    library = "effst" if not neuron.startswith("spikingjelly") else f"spikingjelly {_sj_version()}"
    ms = statistics.median(times)
    return {
        "suite": "train-step", "status": "ok",
        "impl": f"{library} {neuron if library == 'effst' else 'LIFNode'}",
        "library": library, "neuron": neuron,
        "kernel": backend if library == "effst" else (sj_backend or "default"),
        "mode": mode, "step": "train" if train else "inference", "model": model,
        "token_selector": token_selector, "keep_ratio": keep_ratio, "tokens": cfg.tokens(),
        "overrides": overrides or None,
        "tokens_per_block": (net.tokens_per_block() if token_selector and hasattr(net, "tokens_per_block")
                             else None),
        "batch": batch, "T": T, "image_size": cfg.image_size, "dtype": dtype, "device": str(dev),
        "ms": ms, "ms_min": min(times), "ms_q1": q[0], "ms_q3": q[2], "reps": reps, "warmup": warmup,
        "first_call_ms": first_ms, "images_per_s": batch / (ms * 1e-3),
        "kernel_ms": ms if graphed else kernel.get("kernel_ms"),
        "kernel_method": "CUDA graph replay of the whole step" if graphed else kernel.get("kernel_method"),
        "peak_memory_bytes": peak,
    }


def _plan(device: str, quick: bool) -> dict:
    cuda = device.startswith("cuda")
    return {
        "batch": 64 if cuda else (1 if quick else 8),
        "T": 2 if (quick and not cuda) else 4,  # quick CPU mode is a smoke test (a step is seconds there)
        "dtype": "bf16" if cuda else "fp32",
        "reps": 10 if cuda else (1 if quick else 5),
        "warmup": 3 if cuda else (1 if quick else 2),
        "backend": "triton" if cuda else "auto",
    }


def _error_row(exc: BaseException, **what) -> dict:
    return {"suite": "train-step", "status": "error", **what, "error": f"{type(exc).__name__}: {exc}"}


def run(device: str, quick: bool, *, rows: Optional[list] = None, log: Callable[[str], None] = print,
        peers: Optional[dict] = None) -> list[dict]:
    """Rows for the harness (see the module docstring); ``rows`` collects them as they finish.

    ``peers``: ``{names, peers_dir, wheels, runner_dir, timeout, threads}`` to run SpikingJelly
    versions this process cannot import (:func:`add_peer_rows`); None = none. Its per-peer facts
    are stored in ``peers['info']``.
    """
    rows = [] if rows is None else rows
    plan = _plan(device, quick)
    cuda = device.startswith("cuda")

    def measure(what: dict, group: Optional[str] = None, **kwargs) -> Optional[dict]:
        try:
            row = time_train_step(device=device, **{**plan, **kwargs})
        except Exception as exc:  # reported, never a silent gap
            row = _error_row(exc, device=device, **what)
        if group is not None:
            row["group"] = group
        rows.append(row)
        label = " ".join(f"{k}={v}" for k, v in what.items() if v is not None)
        log(f"[train-step] {label}: " + (f"{row['ms']:.1f} ms" if row["status"] == "ok"
                                         else f"ERROR {row['error'][:200]}"))
        return row if row["status"] == "ok" else None

    for neuron in ("slif", "lif"):
        measure({"neuron": neuron, "mode": "eager", "model": MODEL}, neuron=neuron)
    if cuda:
        for neuron in ("slif", "lif"):
            measure({"neuron": neuron, "mode": "cuda-graph", "model": MODEL}, neuron=neuron, mode="cuda-graph")
    _token_rows(device, quick, plan, measure)
    measure({"neuron": "spikingjelly", "mode": "eager", "model": MODEL}, neuron="spikingjelly")
    _speedups(rows)   # now, so a suite cut during the peer rows keeps them
    if peers and peers.get("names"):
        peers["info"] = add_peer_rows(rows, device=device, peer_names=tuple(peers["names"]),
                                      peers_dir=peers["peers_dir"], wheels=peers.get("wheels"),
                                      runner_dir=peers["runner_dir"], suite_path=Path(__file__),
                                      timeout=peers.get("timeout", 600.0), threads=peers.get("threads"),
                                      quick=quick, log=log)
    if cuda:
        measure({"neuron": "spikingjelly", "mode": "cuda-graph", "model": MODEL}, neuron="spikingjelly",
                mode="cuda-graph")
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    """effst's eager rows against the SpikingJelly rows and sLIF against LIF (issue 9's targets)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("mode") == "eager" and r.get("model") == MODEL
          and r.get("group") is None]
    lif = next((r for r in ok if r["neuron"] == "lif" and r["library"] == "effst"), None)
    for ours in ok:
        if ours["library"] != "effst":
            continue
        for peer in ok:
            if peer["library"] == "effst":
                continue
            key = "sj014" if "0.0.0.0.14" in peer["library"] else "sj2" if "2.0.0" in peer["library"] else "sj"
            ours[f"speedup_vs_{key}"] = peer["ms"] / ours["ms"]
        if ours["neuron"] == "slif" and lif is not None:
            ours["slif_over_lif"] = ours["ms"] / lif["ms"]


#: ``group`` of the token-selection rows (compared with their own dense rows only, not with the peers)
TOKEN_GROUP = "token-selection"
#: issue 12's GPU targets: the selector's row over the dense row of the same model, step and mode
TOKEN_TARGETS = {"stata": 1.25, "sts": 1.3}
#: (repetitions, warm-up) of a token row on the GPU: small, so the eight pairs fit the suite's budget
TOKEN_REPS_CUDA = (5, 2)


def _token_rows(device: str, quick: bool, plan: dict, measure) -> None:
    """Dense vs STATA (training step) and dense vs STS (inference) at the issue's sizes: on the
    GPU under a CUDA graph and eager, graph rows first (the eager step is host-bound); on the CPU
    eager only."""
    cuda = device.startswith("cuda")
    # on the CPU a smoke test: spikformer-tiny with 2 blocks (STS selects from the second block on)
    models = TOKEN_MODELS if cuda else (("spikformer-tiny", plan["batch"], 16),)
    reps, warmup = TOKEN_REPS_CUDA if cuda else (plan["reps"], plan["warmup"])
    modes = ("cuda-graph", "eager") if cuda else ("eager",)
    pairs = (("train", None, None), ("train", "stata", STATA_KEEP_RATIO),
             ("inference", None, None), ("inference", "sts", STS_KEEP_RATIO))
    for model, batch, _ in models:
        base = dict(neuron="lif", model=model, batch=batch, reps=reps, warmup=warmup,
                    overrides=None if cuda else {"depth": 2})
        for mode in modes:
            dense = {}
            for step, selector, ratio in pairs:
                what = {"neuron": "lif", "mode": mode, "model": model, "step": step, "token_selector": selector,
                        "keep_ratio": ratio}
                row = measure(what, group=TOKEN_GROUP, train=step == "train", token_selector=selector,
                              keep_ratio=ratio, mode=mode, **base)
                if row is None:
                    continue
                if selector is None:
                    dense[step] = row
                elif step in dense:
                    row["speedup_vs_dense"] = dense[step]["ms"] / row["ms"]
                    row["target_speedup"] = TOKEN_TARGETS[selector] if cuda else None
                    row["target_met"] = row["speedup_vs_dense"] >= row["target_speedup"] if cuda else None


def _sj_backend(name: str, device: str) -> Optional[str]:
    if name == "sj014":
        return "cupy" if device == "cuda" else "torch"
    return None  # 2.0.0 picks its own kernel


def add_peer_rows(rows: list[dict], *, device: str, peer_names: tuple[str, ...], peers_dir: Path,
                  wheels: Optional[Path], runner_dir: Path, suite_path: Path, timeout: float,
                  threads: Optional[int] = None, quick: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Append one row per peer not already measured in-process; returns per-peer info.

    The configuration is copied from the suite's own SpikingJelly row (or any eager row).
    """
    measured = {r.get("library") for r in rows if r.get("status", "ok") == "ok"}
    # the suite's own comparison rows (a row in a ``group``, e.g. token selection, is compared elsewhere)
    eager = [r for r in rows if r.get("status", "ok") == "ok" and r.get("mode", "eager") == "eager"
             and r.get("group") is None]
    template = (next((r for r in eager if r.get("neuron") == "spikingjelly"), None)
                or next((r for r in eager if "batch" in r), None))
    info = {}
    for name in peer_names:
        spec = peers_mod.PEERS[name]
        if spec.label in measured:
            continue  # the suite timed this version in its own process already
        sj_backend = _sj_backend(name, device)
        row = {"suite": "train-step", "library": spec.label, "peer": name, "neuron": "spikingjelly",
               "kernel": sj_backend or "default", "mode": "eager", "device": device}
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
        notes = []
        attempts = [kwargs]
        if sj_backend == "cupy" and kwargs.get("dtype") == "bf16":
            # its kernels take fp32 and fp16 only: fp16 autocast (the nearest to bf16), else fp32
            attempts = [dict(kwargs, dtype="fp16"), dict(kwargs, dtype="fp32")]
            notes.append("SpikingJelly 0.0.0.0.14's cupy kernels have no bf16: timed with fp16 autocast "
                         "(fp32 if that fails)")
        for attempt in attempts:
            request = {"expect_version": spec.version, "expect_location": str(env.path),
                       "suite_module": str(suite_path), "threads": threads, "kwargs": attempt,
                       "numpy_int_compat": name == "sj014"}
            log(f"[train-step] running {spec.label} ({row['kernel']}, {attempt.get('dtype')}) in a subprocess")
            run_ = peers_mod.run_runner(env, runner_dir / RUNNER, request, timeout=timeout)
            if run_.ok:
                break
            notes.append(f"{attempt.get('dtype')} failed: {run_.error[:300]}")
        info[name].update(status="ok" if run_.ok else "error", seconds=round(run_.seconds, 2),
                          spikingjelly_file=run_.payload.get("spikingjelly_file"),
                          numpy_int_compat_applied=run_.payload.get("numpy_int_compat_applied"))
        if run_.payload.get("numpy_int_compat_applied"):
            notes.append(run_.payload.get("numpy_int_note") or "numpy.int = int set in the peer's subprocess")
        if run_.ok:
            row.update(run_.payload["row"])
            row.update(suite="train-step", peer=name, status="ok")
        else:
            row.update(status="error", error=f"peer run failed: {run_.error}", stderr_tail=run_.stderr_tail or None)
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
        log(f"[train-step] {spec.label}: " + (f"{row['ms']:.1f} ms" if run_.ok else f"ERROR {row['error'][:200]}"))
        if run_.ok:
            for ours in eager:
                if ours.get("library") == "effst":
                    ours[f"speedup_vs_{name}"] = row["ms"] / ours["ms"]
    return info
