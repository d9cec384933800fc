"""Sweep the sLIF Triton kernels' launch options on a GPU; print a table, write JSON.

    python bench/tune_slif.py OUT_DIR [--budget-s 25]

For x = [T, 64 * 65536] (4.19 M neurons), fp16, T in (8, 32), per-layer learnable w and V_th
(hard reset to 0, ATan, every gradient wanted), it times the forward and the backward kernel
separately, in *kernel time*: each launch captured once in a CUDA graph and replayed, the L2
flushed before every replay, the replay checked against an eager call, median
(``effst.benchmarks.timing.kernel_time``, the neuron suite's method). An earlier version put
CUDA events around one eager call, which also timed the launcher's Python (tens of µs on the
2026-11-30 H200 host): its T = 8 figures were host-bound. Each time is reported as a fraction
of the machine's copy bandwidth (``timing.copy_bandwidth``, 512 MiB, measured in the same run),
counting the bytes the kernel must move: forward x in, spikes out, V checkpoints out; backward
grad_spikes and x in, grad_x out, checkpoints in.

Swept, each list in priority order (the defaults first, so a run cut short by the budget still
has them), half of the budget per T:
- forward: FORWARD_BLOCK x FORWARD_WARPS x FORWARD_PRELOAD (x tiles of a whole chunk loaded
  before the recurrence) at the default chunk, then the best of those at the other chunks;
- backward: BACKWARD_BLOCK x BACKWARD_WARPS x MAX_CHUNK.
Then the best forward and backward per T once more in bf16. Every value can be tried without
editing code: EFFST_SLIF_FORWARD_BLOCK, _FORWARD_WARPS, _FORWARD_PRELOAD, _BACKWARD_BLOCK,
_BACKWARD_WARPS, _MAX_CHUNK (effst/ops/slif.py). Output: OUT_DIR/tune_slif.json and the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from effst.benchmarks.timing import copy_bandwidth, kernel_time
from effst.ops import slif as slif_ops
from effst.ops.layout import resolve_parameter_layout

NEURONS = 64 * 65536
TS = (8, 32)
CHUNKS = (8, 4, 16)  # default first
# (block, warps, preload); fp16 elements per thread = block / (32 * warps): 8 -> 16-byte accesses
FORWARD_CONFIGS = ((1024, 4, False), (1024, 4, True), (512, 4, False), (512, 4, True),
                   (512, 2, True), (2048, 8, True), (1024, 8, False))
BACKWARD_CONFIGS = ((512, 4), (256, 2), (256, 4), (512, 2), (1024, 8), (512, 8))
KNOBS = ("FORWARD_BLOCK", "FORWARD_WARPS", "FORWARD_PRELOAD", "BACKWARD_BLOCK", "BACKWARD_WARPS",
         "MAX_CHUNK")
REPS = 10


def setup(T: int, dtype: torch.dtype):
    torch.manual_seed(0)
    x = (torch.randn(T, NEURONS, device="cuda") * 1.5 + 0.5).to(dtype)
    grad = torch.randn(T, NEURONS, device="cuda").to(dtype)
    w = torch.zeros(1, device="cuda")
    theta = torch.ones(1, device="cuda")
    return x, grad, w, theta


def plan_for(T: int, dtype: torch.dtype):
    layout = resolve_parameter_layout((), (NEURONS,), -1, "w")
    return slif_ops.make_plan("triton", (T, NEURONS), dtype, layout, layout, 0.0, 1, 2.0, False,
                              True)


def measure(kind: str, T: int, dtype: torch.dtype, knobs: dict, copy_bytes_per_s: float) -> dict:
    """Kernel time of the forward or backward launch with ``knobs`` set on effst.ops.slif."""
    try:
        return _measure(kind, T, dtype, knobs, copy_bytes_per_s)
    except Exception as error:  # e.g. a config the compiler refuses: record it, sweep on
        torch.cuda.synchronize()
        return {"kind": kind, "T": T, "dtype": str(dtype).replace("torch.", ""), **knobs,
                "ms": None, "bytes": None, "method": None, "fraction_of_copy": None,
                "error": f"{type(error).__name__}: {str(error)[:300]}"}


def _measure(kind: str, T: int, dtype: torch.dtype, knobs: dict, copy_bytes_per_s: float) -> dict:
    for name, value in knobs.items():
        setattr(slif_ops, name, value)
    plan = plan_for(T, dtype)  # after the knobs: the plan reads BACKWARD_BLOCK and MAX_CHUNK
    x, grad, w, theta = setup(T, dtype)
    _, _, checkpoints = slif_ops.triton_forward(x, w, theta, None, plan)
    if kind == "forward":
        timing = kernel_time(lambda: slif_ops.triton_forward(x, w, theta, None, plan), "cuda",
                             reps=REPS)
        moved = 2 * x.numel() * x.element_size() + checkpoints.numel() * 4
    else:
        timing = kernel_time(lambda: slif_ops.triton_backward(grad, None, x, w, theta, None,
                                                              checkpoints, plan), "cuda", reps=REPS)
        moved = 3 * x.numel() * x.element_size() + checkpoints.numel() * 4
    ms = timing.get("kernel_ms")
    return {"kind": kind, "T": T, "dtype": str(dtype).replace("torch.", ""), **knobs,
            "ms": ms, "bytes": moved, "method": timing.get("kernel_method"),
            "error": timing.get("kernel_error") or timing.get("kernel_graph_error"),
            "fraction_of_copy": moved / (ms * 1e-3) / copy_bytes_per_s if ms else None}


def describe(row: dict) -> str:
    knobs = (f"block={row['FORWARD_BLOCK']:5d} warps={row['FORWARD_WARPS']} "
             f"preload={int(row['FORWARD_PRELOAD'])}" if row["kind"] == "forward" else
             f"block={row['BACKWARD_BLOCK']:5d} warps={row['BACKWARD_WARPS']}          ")
    result = (f"{row['ms']:.4f} ms ({100 * row['fraction_of_copy']:.0f} % of copy)"
              if row["ms"] else f"failed: {row['error']}")
    return (f"{row['kind']:8s} T={row['T']:3d} {row['dtype']:8s} {knobs} "
            f"chunk={row['MAX_CHUNK']:2d}: {result}")


def best(rows: list, kind: str, T: int, dtype: str = "float16"):
    mine = [r for r in rows if r["kind"] == kind and r["T"] == T and r["dtype"] == dtype
            and r["fraction_of_copy"]]
    return max(mine, key=lambda r: r["fraction_of_copy"]) if mine else None


def effective_chunks(T: int) -> list:
    """CHUNKS without those that run like an earlier one at this T (every chunk >= T is one)."""
    seen, kept = set(), []
    for chunk in CHUNKS:
        if min(chunk, T) not in seen:
            seen.add(min(chunk, T))
            kept.append(chunk)
    return kept


def plan_measurements(defaults: dict, T: int) -> list:
    """(kind, knobs) for one T in priority order, forward and backward interleaved."""
    forward = [("forward", dict(defaults, FORWARD_BLOCK=b, FORWARD_WARPS=w, FORWARD_PRELOAD=p))
               for b, w, p in FORWARD_CONFIGS]
    backward = [("backward", dict(defaults, BACKWARD_BLOCK=b, BACKWARD_WARPS=w, MAX_CHUNK=c))
                for c in effective_chunks(T) for b, w in BACKWARD_CONFIGS]
    # interleave so that both kernels get measured before either list is exhausted
    ordered = []
    for i in range(max(len(forward), len(backward))):
        ordered += ([forward[i]] if i < len(forward) else []) + ([backward[i]] if i < len(backward) else [])
    return ordered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=25.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_slif: needs a CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    defaults = {name: getattr(slif_ops, name) for name in KNOBS}
    copy = copy_bandwidth("cuda", 512 << 20)
    copy_bytes_per_s = copy["bytes_per_s"]
    print(f"copy bandwidth {copy_bytes_per_s / 1e9:.0f} GB/s; defaults {defaults}", flush=True)
    rows, stopped_early = [], False
    try:
        for i, T in enumerate(TS):
            deadline = started + args.budget_s * (i + 1) / len(TS)
            for kind, knobs in plan_measurements(defaults, T):
                if time.perf_counter() > deadline:
                    stopped_early = True
                    break
                rows.append(measure(kind, T, torch.float16, knobs, copy_bytes_per_s))
                print(describe(rows[-1]), flush=True)
            top = best(rows, "forward", T)
            for chunk in effective_chunks(T)[1:]:  # the best forward at the other chunk lengths
                if top and time.perf_counter() < deadline:
                    rows.append(measure("forward", T, torch.float16,
                                        dict(top_knobs(top), MAX_CHUNK=chunk), copy_bytes_per_s))
                    print(describe(rows[-1]), flush=True)
        for T in TS:  # the best fp16 configs per T, again in bf16
            for kind in ("forward", "backward"):
                top = best(rows, kind, T)
                if top and time.perf_counter() < started + args.budget_s + 5:
                    rows.append(measure(kind, T, torch.bfloat16, top_knobs(top), copy_bytes_per_s))
                    print(describe(rows[-1]), flush=True)
    finally:
        for name, value in defaults.items():
            setattr(slif_ops, name, value)
    result = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "torch": torch.__version__, "copy_bandwidth_gbs": copy_bytes_per_s / 1e9,
        "copy_method": copy["method"], "neurons": NEURONS, "defaults": defaults,
        "stopped_early": stopped_early, "seconds": time.perf_counter() - started, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_slif.json").write_text(json.dumps(result, indent=1))
    for T in TS:
        for kind in ("forward", "backward"):
            default = next((r for r in rows if r["kind"] == kind and r["T"] == T
                            and r["dtype"] == "float16" and top_knobs(r) == defaults), None)
            top = best(rows, kind, T)
            if top:
                base = (f"{100 * default['fraction_of_copy']:.0f} %" if default and
                        default["fraction_of_copy"] else "not measured")
                print(f"best {kind} T={T}: {describe(top)} (defaults: {base})")
        # the chunk is shared (the forward writes the checkpoints the backward reads): the
        # fastest forward + backward pair per chunk length
        pairs = []
        for chunk in effective_chunks(T):
            times = [min((r["ms"] for r in rows if r["kind"] == kind and r["T"] == T
                          and r["dtype"] == "float16" and r["MAX_CHUNK"] == chunk and r["ms"]),
                         default=None) for kind in ("forward", "backward")]
            if None not in times:
                pairs.append((sum(times), chunk, times))
        for total, chunk, (fwd, bwd) in sorted(pairs)[:1]:
            print(f"best forward + backward T={T}: chunk {chunk}, {fwd:.4f} + {bwd:.4f} = "
                  f"{total:.4f} ms")
    return 0


def top_knobs(row: dict) -> dict:
    return {name: row[name] for name in KNOBS}


if __name__ == "__main__":
    sys.exit(main())
