"""The ``neuron`` suite: forward+backward of effst's fused neurons beside SpikingJelly's.

effst SLIF (per-channel learnable tau and V_th), PLIF and LIF run in this process; SpikingJelly
2.0.0 (LIFNode / ParametricLIFNode) and 0.0.0.0.14 (``cupy`` backend on the GPU, ``torch`` on
the CPU) run in their own environments through ``bench/peers/sj_neuron.py``. Every
implementation times the same random inputs with the same method (:mod:`effst.benchmarks.timing`).

SpikingJelly 2.0.0 on CUDA runs with its own default choice of implementation in every dtype
(it offers its Triton/CUDA kernels for fp32 only and falls back to its torch reference for
half precision; the row's ``implementation`` says what ran), plus its native ``cuda``
implementation forced in fp32, which its wheel does not build: those rows are
``status: 'unavailable'`` (the peer as users install it), not errors. 0.0.0.0.14's cupy kernels
need ``numpy.int``, which NumPy >= 1.24 removed: the alias is restored inside its subprocess only,
and the rows say so in ``note``.

Each row states ms (eager wall, median) and, on CUDA, kernel_ms (device time: CUDA-graph replay
or profiler), G neuron-steps/s, and achieved bytes/s ÷ the copy bandwidth measured in the same
run for each of the two, with the byte count given by :func:`bytes_per_neuron_step`.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from effst.benchmarks import peers as peers_mod
from effst.benchmarks import timing

RUNNER = "sj_neuron.py"  # in bench/peers/

# Spikformer's neuron (hard reset to 0, detach_reset) with ATan, the setting docs/benchmarks.md
# measured SpikingJelly's CPU path at. One configuration for every implementation.
NEURON_CONFIG = {
    "tau": 2.0,
    "v_threshold": 1.0,
    "v_reset": 0.0,
    "surrogate": "atan",
    "alpha": 2.0,
    "detach_reset": True,
    "decay_input": True,
}

PARAMETERS = {
    "SLIF": "tau and V_th learned, per channel (last dim)",
    "PLIF": "tau learned, per layer; V_th fixed",
    "LIF": "tau and V_th fixed",
}

BYTES_FORMULA = (
    "bytes per neuron-step = 5 x itemsize(dtype): forward reads x and writes the spikes "
    "(x.dtype); backward reads grad_spikes and x (H recomputed, not stored) and writes grad_x. "
    "Per-neuron state and parameter traffic is O(N), not O(T*N), and left out. The same count is "
    "used for every implementation (it is the work all of them must do at that I/O dtype); "
    "peers that store H or V in fp32 move more than this, so the ratio measures useful "
    "throughput against the hardware limit. docs/benchmarks.md's 9 B (bf16) assumes uint8 spikes, "
    "which no implementation here emits."
)


def bytes_per_neuron_step(dtype: torch.dtype) -> int:
    """Minimal DRAM traffic of one neuron-step of forward+backward (see BYTES_FORMULA)."""
    return 5 * torch.empty((), dtype=dtype).element_size()


@dataclass
class NeuronPlan:
    """What the suite times: sizes, dtypes, neurons, peers, and the timing budget per case."""

    device: str
    Ts: tuple[int, ...]
    step_shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    neurons: tuple[str, ...] = ("SLIF", "PLIF", "LIF")
    # 0.0.0.0.14 first: on CUDA its cupy rows are the comparison most worth having if the
    # suite's budget runs out
    peers: tuple[str, ...] = ("sj014", "sj2")
    effst: bool = True  # time effst's own neurons (off only to run peers alone)
    # effst backends; every neuron on the first, SLIF alone on the others, timed after the peers
    # (CUDA: the native CUDA kernel beside Triton, the figure that decides backend='auto' there)
    effst_backends: tuple[str, ...] = ("auto",)
    repeat: int = 1  # rounds of the whole suite; ms = median of the rounds' medians
    warmup: int = 5
    reps: int = 50
    max_seconds: float = 1.5
    seed: int = 0
    peer_timeout: float = 600.0


def default_plan(device: str, quick: bool) -> NeuronPlan:
    """Issue 2's sizes on the GPU (x = [T, 64, 65536]); small ones on the CPU; tiny with quick."""
    if device == "cuda":
        backends = ("triton", "native")
        if quick:
            return NeuronPlan(device, (4, 16), (64, 16384), ("float32", "bfloat16", "float16"),
                              effst_backends=backends, warmup=3, reps=20, max_seconds=0.5)
        # 0.75 s per case: the calls take ~1 ms, so that is still >= 50 reps (fits gpu_check's budget)
        return NeuronPlan(device, (4, 8, 16, 32), (64, 65536), ("float32", "bfloat16", "float16"),
                          effst_backends=backends, max_seconds=0.75, peer_timeout=150.0)
    if quick:
        return NeuronPlan(device, (2, 4), (4, 1024), ("float32",), warmup=1, reps=3,
                          max_seconds=0.5, peer_timeout=300.0)
    # warmup 3: SpikingJelly 0.0.0.0.14's TorchScript steps are re-optimised on the first calls.
    # 3 rounds: a shared CPU's background load (and cgroup throttling) comes in bursts.
    return NeuronPlan(device, (4, 8, 16), (64, 4096), ("float32", "bfloat16"), warmup=3, reps=15,
                      max_seconds=3.0, repeat=3)


@dataclass
class _Variant:
    """One implementation family: who runs it and which dtypes it supports."""

    library: str
    peer: Optional[str]
    kernel: str
    dtypes: Optional[tuple[str, ...]] = None  # None = every dtype of the plan
    first_T_only: bool = False  # one T per neuron and dtype is enough (an answer that cannot depend on T)
    extra_env: dict = field(default_factory=dict)
    backend: Optional[str] = None  # 0.0.0.0.14 constructor backend
    numpy_int_compat: bool = False  # restore numpy.int in the peer's subprocess (0.0.0.0.14)


def _peer_variants(name: str, device: str) -> list[_Variant]:
    label = peers_mod.PEERS[name].label
    if name == "sj2":
        if device == "cuda":
            # its default choice in every dtype (the row records which implementation ran), and
            # its native CUDA operators forced in fp32, the one dtype they would serve
            return [_Variant(label, name, "default"),
                    _Variant(label, name, "cuda", dtypes=("float32",), first_T_only=True, extra_env={
                        "SJ_LIF_CUDA_IMPLEMENTATION": "cuda", "SJ_PLIF_CUDA_IMPLEMENTATION": "cuda"})]
        return [_Variant(label, name, "torch")]
    if name == "sj014":
        if device == "cuda":  # its cupy kernels: fp32 and fp16 (half2) only
            return [_Variant(label, name, "cupy", dtypes=("float32", "float16"), backend="cupy",
                             numpy_int_compat=True)]
        return [_Variant(label, name, "torch", backend="torch", numpy_int_compat=True)]
    raise ValueError(f"peers: unknown peer {name!r}; expected some of {list(peers_mod.PEERS)}")


def _case_rows(plan: NeuronPlan, variant: _Variant, neurons: tuple[str, ...]) -> list[dict]:
    rows = []
    for dtype in plan.dtypes:
        if variant.dtypes is not None and dtype not in variant.dtypes:
            continue
        for neuron in neurons:
            for T in plan.Ts[:1] if variant.first_T_only else plan.Ts:
                rows.append({
                    "suite": "neuron", "library": variant.library, "peer": variant.peer,
                    "neuron": neuron, "parameters": PARAMETERS[neuron], "kernel": variant.kernel,
                    "dtype": dtype, "T": T, "step_shape": list(plan.step_shape),
                    "neurons_per_step": math.prod(plan.step_shape), "device": plan.device,
                    "id": f"{variant.peer or 'effst'}/{variant.kernel}/{neuron}/{dtype}/T{T}",
                })
    return rows


def _effst_rows(plan: NeuronPlan, log: Callable[[str], None], secondary: bool = False) -> list[dict]:
    """effst's neurons on the plan's first backend, or SLIF alone on the others (``secondary``)."""
    if not secondary:
        return _effst_backend_rows(plan, plan.effst_backends[0], tuple(n for n in plan.neurons if n in PARAMETERS),
                                   log)
    return [row for backend in plan.effst_backends[1:]
            for row in _effst_backend_rows(plan, backend, ("SLIF",), log)]


def _effst_backend_rows(plan: NeuronPlan, backend: str, neurons: tuple[str, ...],
                        log: Callable[[str], None]) -> list[dict]:
    import effst.nn
    from effst.ops.slif import resolve_backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            kernel = resolve_backend(backend, torch.device(plan.device))
        except Exception as exc:  # reported on every row of this backend below
            kernel, kernel_error = backend, f"{type(exc).__name__}: {exc}"
        else:
            kernel_error = None
    note = "; ".join(str(w.message) for w in caught) or None
    rows = _case_rows(plan, _Variant("effst", None, kernel), neurons)
    for row in rows:
        row["backend_requested"] = backend
        row["implementation"] = f"effst {kernel}"
        if note:
            row["note"] = note
        if kernel_error:
            row.update(status="error", error=kernel_error)
            log(_progress(row))
            continue
        try:
            if row["neuron"] == "SLIF":
                module = effst.nn.SLIF(**NEURON_CONFIG, channels=plan.step_shape[-1], channel_dim=-1,
                                       backend=backend)
            elif row["neuron"] == "PLIF":
                module = effst.nn.PLIF(**NEURON_CONFIG, backend=backend)
            else:
                module = effst.nn.LIF(**NEURON_CONFIG, backend=backend)
            module = module.to(plan.device)
            measured = timing.time_neuron(
                module, module.reset, T=row["T"], step_shape=plan.step_shape,
                dtype=getattr(torch, row["dtype"]), device=plan.device, seed=plan.seed,
                warmup=plan.warmup, reps=plan.reps, max_seconds=plan.max_seconds, also_profile=True)
            row.update(status="ok", **measured)
        except Exception as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        log(_progress(row))
    return rows


def _peer_rows(plan: NeuronPlan, name: str, peers_dir: Path, wheels: Optional[Path],
               runner_dir: Path, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    spec = peers_mod.PEERS[name]
    variants = _peer_variants(name, plan.device)
    neurons = tuple(n for n in plan.neurons if n in ("LIF", "PLIF"))
    planned = [(v, _case_rows(plan, v, neurons)) for v in variants]
    every_row = [r for _, rows in planned for r in rows]
    info = {"label": spec.label, "requirement": spec.requirement}

    def fail_all(rows, message, **extra):
        for row in rows:
            row.update(status="error", error=message, **extra)
            log(_progress(row))

    runner = runner_dir / RUNNER
    log(f"[neuron] preparing peer environment {peers_dir / name} ({spec.requirement})")
    env = peers_mod.ensure_env(spec, peers_dir, wheels)
    info.update(location=str(env.path), source=env.source)
    if not env.ok:
        info.update(status="error", error=env.error)
        fail_all(every_row, f"peer environment could not be created: {env.error}")
        return every_row, info
    info["status"] = "ok"
    info["runs"] = []
    for variant, rows in planned:
        if not rows:
            continue
        request = {
            "peer": name, "expect_version": spec.version, "expect_location": str(env.path),
            "timing_module": timing.__file__, "device": plan.device,
            "threads": torch.get_num_threads(), "seed": plan.seed, "backend": variant.backend,
            "numpy_int_compat": variant.numpy_int_compat,
            "neuron": NEURON_CONFIG,
            "cases": [{"id": r["id"], "neuron": r["neuron"], "T": r["T"], "step_shape": r["step_shape"],
                       "dtype": r["dtype"]} for r in rows],
            "timing": {"warmup": plan.warmup, "reps": plan.reps, "max_seconds": plan.max_seconds},
        }
        log(f"[neuron] running {spec.label} ({variant.kernel}) in a subprocess: {len(rows)} cases")
        run = peers_mod.run_runner(env, runner, request, timeout=plan.peer_timeout, extra_env=variant.extra_env)
        info["runs"].append({"kernel": variant.kernel, "ok": run.ok, "error": run.error or None,
                             "returncode": run.returncode, "seconds": round(run.seconds, 2),
                             "env": variant.extra_env or None,
                             "spikingjelly_file": run.payload.get("spikingjelly_file"),
                             "numpy_int_compat_applied": run.payload.get("numpy_int_compat_applied"),
                             "versions": run.payload.get("versions")})
        if not run.ok:
            fail_all(rows, f"peer run failed: {run.error} (environment {env.path}; delete it to have "
                           "it re-created)", stderr_tail=run.stderr_tail or None)
            info["status"] = "error"
            continue
        by_id = {r["id"]: r for r in run.payload.get("results", [])}
        for row in rows:
            result = by_id.get(row["id"])
            if result is None:
                row.update(status="error", error="the peer runner returned no result for this case")
            else:
                row.update({k: v for k, v in result.items() if k != "id"})
                row["kernel_requested"] = row["kernel"]
                if row.get("implementation"):  # what actually ran (2.0.0's default choice)
                    row["kernel"] = row["implementation"]
            log(_progress(row))
    return every_row, info


def _progress(row: dict) -> str:
    what = f"[neuron] {row['library']} {row['neuron']} {row['kernel']} {row['dtype']} T={row['T']}"
    if row.get("status") == "ok":
        kernel = f", kernel {row['kernel_ms']:.3f} ms" if row.get("kernel_ms") is not None else ""
        return f"{what}: {row['ms']:.3f} ms eager{kernel}"
    return f"{what}: {str(row.get('status')).upper()} {str(row.get('error'))[:200]}"


def derive(rows: list[dict], copy_bytes_per_s: Optional[float]) -> None:
    """Throughput, bytes/s and the copy-bandwidth fraction of every ok row (in place)."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        steps = row["T"] * row["neurons_per_step"]
        seconds = row["ms"] * 1e-3
        per_step = bytes_per_neuron_step(getattr(torch, row["dtype"]))
        row["neuron_steps"] = steps
        row["gneuron_steps_per_s"] = steps / seconds / 1e9
        row["bytes_per_neuron_step"] = per_step
        row["achieved_bytes_per_s"] = steps * per_step / seconds
        row["copy_bandwidth_fraction"] = (row["achieved_bytes_per_s"] / copy_bytes_per_s
                                          if copy_bytes_per_s else None)
        if row.get("kernel_ms"):  # the same bytes over the device time alone
            row["kernel_achieved_bytes_per_s"] = steps * per_step / (row["kernel_ms"] * 1e-3)
            row["kernel_copy_bandwidth_fraction"] = (row["kernel_achieved_bytes_per_s"] / copy_bytes_per_s
                                                     if copy_bytes_per_s else None)


# Targets of issues 2 and 9 on an H100/H200-class GPU (checked only on CUDA; recorded, never
# asserted here): eager wall vs the peers, kernel time vs the copy bandwidth, and how host-bound
# an eager call may be (eager wall / kernel time, half precision).
TARGETS = {"vs_sj2_plif": 1.5, "vs_sj014_cupy": 4.0, "bf16_copy_fraction_T>=8": 0.70,
           "eager_over_kernel_half": 1.3}


def comparisons(rows: list[dict], device: str) -> list[dict]:
    """effst vs the fastest peer kernel at equal neuron family, shape, T and dtype."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []

    def fastest(library, neuron, dtype, T):  # over the library's kernels (2.0.0: cuda, triton)
        cands = [r for r in ok if r["library"] == library and r["neuron"] == neuron
                 and r["dtype"] == dtype and r["T"] == T]
        return min(cands, key=lambda r: r["ms"]) if cands else None

    pairs = [("SLIF", "spikingjelly 2.0.0", "PLIF", "vs_sj2_plif"),
             ("PLIF", "spikingjelly 2.0.0", "PLIF", None),
             ("LIF", "spikingjelly 2.0.0", "LIF", None),
             ("SLIF", "spikingjelly 0.0.0.0.14", "PLIF", "vs_sj014_cupy"),
             ("LIF", "spikingjelly 0.0.0.0.14", "LIF", None)]
    for ours in ok:
        if ours["library"] != "effst":
            continue
        for neuron, peer_lib, peer_neuron, target_key in pairs:
            if ours["neuron"] != neuron:
                continue
            peer = fastest(peer_lib, peer_neuron, ours["dtype"], ours["T"])
            if peer is None:
                continue
            target = TARGETS.get(target_key) if device == "cuda" and target_key else None
            speedup = peer["ms"] / ours["ms"]
            # like with like: a peer timed by the profiler only (cupy) against effst's profiler figure
            ours_kernel = ours.get("kernel_ms")
            if str(peer.get("kernel_method") or "").startswith("torch.profiler") and ours.get("kernel_profiler_ms"):
                ours_kernel = ours["kernel_profiler_ms"]
            kernel_speedup = peer["kernel_ms"] / ours_kernel if ours_kernel and peer.get("kernel_ms") else None
            out.append({
                "effst": f"{neuron} ({ours['kernel']})", "peer": f"{peer_lib} {peer_neuron} ({peer['kernel']})",
                "dtype": ours["dtype"], "T": ours["T"], "effst_ms": ours["ms"], "peer_ms": peer["ms"],
                "speedup": speedup, "effst_kernel_ms": ours_kernel,
                "peer_kernel_ms": peer.get("kernel_ms"), "kernel_speedup": kernel_speedup, "target": target,
                "met": None if target is None else speedup >= target,
            })
        if device == "cuda" and ours["neuron"] == "SLIF" and ours["dtype"] == "bfloat16" and ours["T"] >= 8:
            # a bandwidth target is the kernels' (device time); eager wall when there is none
            fraction = ours.get("kernel_copy_bandwidth_fraction") or ours.get("copy_bandwidth_fraction")
            target = TARGETS["bf16_copy_fraction_T>=8"]
            out.append({"effst": f"SLIF ({ours['kernel']})", "peer": "measured copy bandwidth",
                        "dtype": ours["dtype"], "T": ours["T"], "copy_bandwidth_fraction": fraction,
                        "target": target, "met": None if fraction is None else fraction >= target})
        if (device == "cuda" and ours["neuron"] == "SLIF" and ours["dtype"] in ("bfloat16", "float16")
                and ours.get("kernel_ms")):
            ratio = ours["ms"] / ours["kernel_ms"]
            target = TARGETS["eager_over_kernel_half"]
            out.append({"effst": f"SLIF ({ours['kernel']})", "peer": "its own kernel time (eager / kernel)",
                        "dtype": ours["dtype"], "T": ours["T"], "effst_ms": ours["ms"],
                        "effst_kernel_ms": ours["kernel_ms"], "eager_over_kernel": ratio,
                        "target": target, "met": ratio <= target})
    return out


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per case from repeated rounds: ms = median of the rounds' medians.

    A case that failed in any round is reported as that failure (with how many rounds were ok).
    """
    if len(rounds) == 1:
        return list(rounds[0])
    groups: dict[str, list[dict]] = {}
    for round_rows in rounds:
        for row in round_rows:
            groups.setdefault(row["id"], []).append(row)
    merged = []
    for group in groups.values():
        ok = [r for r in group if r.get("status") == "ok"]
        if len(ok) < len(group):
            row = dict(next(r for r in group if r.get("status") != "ok"))
            row.update(rounds=len(group), rounds_ok=len(ok))
        else:
            medians = sorted(r["ms"] for r in ok)
            row = dict(ok[0])
            row.update(ms=statistics.median(medians), ms_min=min(r["ms_min"] for r in ok),
                       round_ms=[r["ms"] for r in ok], rounds=len(ok), reps=sum(r["reps"] for r in ok))
            if len(medians) >= 2:
                quartiles = timing.quartiles_of(medians)
                row.update(ms_q1=quartiles[0], ms_q3=quartiles[2])
        merged.append(row)
    return merged


def run(device: str, quick: bool, *, copy_bandwidth: Callable[[], float], peers_dir: Path,
        wheels: Optional[Path], runner_dir: Path, plan: Optional[NeuronPlan] = None,
        log: Callable[[str], None] = print, rows: Optional[list] = None) -> dict:
    """Run the suite; returns ``{'rows', 'peers', 'comparisons', 'plan', ...}``.

    ``copy_bandwidth()`` measures the copy bandwidth again and returns the best value seen so
    far (the hardware limit is what the machine can do, not what a busy moment allowed); it is
    called after every round. With ``plan.repeat > 1`` the whole suite runs in rounds, every
    implementation once per round, so background load hits them alike. ``rows``, when given,
    holds the merged rows measured so far (a caller that stops the suite keeps them).
    """
    plan = plan or default_plan(device, quick)
    rows = [] if rows is None else rows
    rounds: list[list[dict]] = []
    peer_info: dict[str, dict] = {}
    for index in range(plan.repeat):
        if plan.repeat > 1:
            log(f"[neuron] round {index + 1} of {plan.repeat}")
        rounds.append([])
        if plan.effst:
            rounds[-1].extend(_effst_rows(plan, log))
            rows[:] = merge_rounds(rounds)
        # peers before effst's other backends: on CUDA the native one may compile first (minutes),
        # and a suite stopped by its time limit should still have the peer rows
        for name in plan.peers:
            peer_rows, info = _peer_rows(plan, name, peers_dir, wheels, runner_dir, log)
            rounds[-1].extend(peer_rows)
            rows[:] = merge_rounds(rounds)
            if name in peer_info:  # later rounds: keep the first round's facts, add the runs
                peer_info[name]["runs"] = peer_info[name].get("runs", []) + info.get("runs", [])
                if info.get("status") != "ok":
                    peer_info[name].update(status="error", error=info.get("error"))
            else:
                peer_info[name] = info
        if plan.effst and len(plan.effst_backends) > 1:
            rounds[-1].extend(_effst_rows(plan, log, secondary=True))
            rows[:] = merge_rounds(rounds)
        best_copy = copy_bandwidth()
    derive(rows, best_copy)
    return {
        "rows": rows,
        "peers": peer_info,
        "comparisons": comparisons(rows, device),
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()},
        "neuron_config": NEURON_CONFIG,
        "bytes_formula": BYTES_FORMULA,
    }
