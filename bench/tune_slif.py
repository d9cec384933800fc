"""Sweep the sLIF Triton backward's launch parameters on a GPU; print a table, write JSON.

    python bench/tune_slif.py OUT_DIR [--budget-s 80]

For x = [T, 64 * 65536] (4.19 M neurons), fp16, T in (8, 32), it times the backward kernel
alone (CUDA events, median of 15 calls after warm-up) for every BACKWARD_BLOCK x BACKWARD_WARPS
x MAX_CHUNK combination below, and reports each as a fraction of the machine's copy bandwidth
(a device-to-device copy of 512 MiB, timed the same way). Then it reruns the best config per T
in bf16 and the forward at its defaults. Stops early when the time budget (default 80 s) runs
out, keeping what it measured. Output: OUT_DIR/tune_slif.json and the table on stdout.
The winning values can be tried without editing code through EFFST_SLIF_BACKWARD_BLOCK,
EFFST_SLIF_BACKWARD_WARPS and EFFST_SLIF_MAX_CHUNK (effst/ops/slif.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from effst.ops import slif as slif_ops
from effst.ops.layout import resolve_parameter_layout

NEURONS = 64 * 65536
BLOCKS = (256, 512, 1024)
WARPS = (2, 4, 8)
CHUNKS = (4, 8, 16)
TS = (8, 32)


def time_ms(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.empty(256 * 2**20, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def setup(T: int, dtype: torch.dtype):
    torch.manual_seed(0)
    x = (torch.randn(T, NEURONS, device="cuda") + 0.5).to(dtype)
    grad = torch.randn(T, NEURONS, device="cuda").to(dtype)
    w = torch.zeros(1, device="cuda")
    theta = torch.ones(1, device="cuda")
    return x, grad, w, theta


def plan_for(T: int, dtype: torch.dtype):
    layout = resolve_parameter_layout((), (NEURONS,), -1, "w")
    return slif_ops.make_plan("triton", (T, NEURONS), dtype, layout, layout, 0.0, 1, 2.0, False,
                              True)


def measure(T: int, dtype: torch.dtype, block: int, warps: int, chunk: int, copy_gbs: float):
    slif_ops.BACKWARD_BLOCK, slif_ops.BACKWARD_WARPS, slif_ops.MAX_CHUNK = block, warps, chunk
    plan = plan_for(T, dtype)
    x, grad, w, theta = setup(T, dtype)
    _, _, checkpoints = slif_ops.triton_forward(x, w, theta, None, plan)
    ms = time_ms(lambda: slif_ops.triton_backward(grad, None, x, w, theta, None, checkpoints, plan))
    element = x.element_size()
    moved = 3 * T * NEURONS * element + checkpoints.numel() * 4  # grad_s, x in; grad_x out
    fwd_ms = time_ms(lambda: slif_ops.triton_forward(x, w, theta, None, plan))
    fwd_moved = 2 * T * NEURONS * element + checkpoints.numel() * 4
    return {"T": T, "dtype": str(dtype).replace("torch.", ""), "backward_block": block,
            "backward_warps": warps, "max_chunk": chunk, "backward_ms": ms,
            "backward_fraction_of_copy": moved / ms / 1e6 / copy_gbs,
            "forward_ms": fwd_ms, "forward_fraction_of_copy": fwd_moved / fwd_ms / 1e6 / copy_gbs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=80.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_slif: needs a CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    defaults = (slif_ops.BACKWARD_BLOCK, slif_ops.BACKWARD_WARPS, slif_ops.MAX_CHUNK)
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    configs = [(b, w, c) for b in BLOCKS for w in WARPS for c in CHUNKS if b >= 32 * w]
    # defaults first, so the baseline is measured even if the budget runs out
    configs.sort(key=lambda cfg: cfg != defaults)
    stopped_early = False
    for T in TS:
        for block, warps, chunk in configs:
            if time.perf_counter() - started > args.budget_s:
                stopped_early = True
                break
            rows.append(measure(T, torch.float16, block, warps, chunk, copy_gbs))
            r = rows[-1]
            print(f"T={T:3d} fp16 block={block:5d} warps={warps} chunk={chunk:2d}: backward "
                  f"{r['backward_ms']:.3f} ms ({100 * r['backward_fraction_of_copy']:.0f} % of "
                  f"copy), forward {r['forward_ms']:.3f} ms "
                  f"({100 * r['forward_fraction_of_copy']:.0f} %)", flush=True)
    for T in TS:  # best fp16 config per T, again in bf16
        mine = [r for r in rows if r["T"] == T]
        if mine and time.perf_counter() - started < args.budget_s + 5:
            best = max(mine, key=lambda r: r["backward_fraction_of_copy"])
            rows.append(measure(T, torch.bfloat16, best["backward_block"],
                                best["backward_warps"], best["max_chunk"], copy_gbs))
    slif_ops.BACKWARD_BLOCK, slif_ops.BACKWARD_WARPS, slif_ops.MAX_CHUNK = defaults
    result = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "torch": torch.__version__, "copy_bandwidth_gbs": copy_gbs, "neurons": NEURONS,
        "defaults": dict(zip(("backward_block", "backward_warps", "max_chunk"), defaults)),
        "stopped_early": stopped_early, "seconds": time.perf_counter() - started, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_slif.json").write_text(json.dumps(result, indent=1))
    for T in TS:
        mine = [r for r in rows if r["T"] == T and r["dtype"] == "float16"]
        if mine:
            best = max(mine, key=lambda r: r["backward_fraction_of_copy"])
            print(f"best T={T}: block={best['backward_block']} warps={best['backward_warps']} "
                  f"chunk={best['max_chunk']} -> {100 * best['backward_fraction_of_copy']:.0f} % "
                  "of copy bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
