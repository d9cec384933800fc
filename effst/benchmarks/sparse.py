"""``sparse`` suite: effst BlockSparseLinear vs dense ``F.linear`` vs PyTorch BSR.

Run through the harness (``effst bench sparse --device cuda|cpu [--quick]``), which calls
``run(device, quick)`` and writes the rows to bench.json / bench.md / sparse_vs_sparsity.png.

What is timed, per (shape, block sparsity, block, dtype, input kind), for each implementation,
forward (no autograd) and forward+backward (``y.backward(dy)``: dX when the input is a float
tensor that needs it, dW and db):

* ``effst``  -- ``effst.nn.BlockSparseLinear`` (Triton kernels on CUDA; on the CPU the torch
  gather-based implementation, backend ``'torch'``, which also touches only the kept tiles).
  Spike inputs are passed as uint8 (read as one byte, no dX).
* ``dense``  -- ``F.linear`` on the dense weight with the pruned tiles zeroed (cuBLAS / MKL).
  Spike inputs are given as 0/1 floats in the compute dtype (F.linear cannot read bytes);
  no dX is computed for them either.
* ``bsr``    -- what PyTorch itself offers: ``W.to_sparse_bsr(block)``; forward
  ``(W_bsr @ X^T)^T + b``; backward ``dX = (W^T_bsr @ dY^T)^T`` (a second BSR of W^T),
  ``dW = torch.sparse.sampled_addmm(W_bsr, dY^T, X)`` on W's block pattern (falling back to
  ``torch.sparse._triton_ops.sampled_addmm``, PyTorch's own BSR Triton kernel, on CUDA when the
  public op refuses BSR), ``db = dY.sum(0)``. Any step PyTorch does not support on that device
  / dtype is reported in ``bsr_error`` and its times are left empty.

Derived columns: ``speedup_fwd`` / ``speedup_fwd_bwd`` = dense ms / effst ms;
``speedup_vs_bsr_*`` = bsr ms / effst ms; ``tflops_kept_fwd_bwd`` = FLOPs on the kept tiles /
effst time; ``tflops_dense_fwd_bwd`` = dense FLOPs / dense time; ``tflops_ratio`` = their ratio
(docs/benchmarks.md). FLOPs: 2*M*N*K per product (x3 with dX, x2 without; kept tiles: N*K replaced
by nnz_tiles*bm*bk). ``target``/``target_met``: the issue's H100 targets, checked on CUDA bf16
forward+backward rows (>= 3x at 90 %, >= 1.5x at 75 %, >= 0.9x at 50 %, faster than BSR).

Timing (:mod:`effst.benchmarks.timing`): CUDA events per call with the L2 flushed before each
call, median of ``reps`` calls after warm-up (the first call, which compiles, is not timed);
on the CPU ``time.perf_counter`` per call, median. Shapes: M = 32768 tokens on CUDA (the
Spikformer activations: CIFAR 384<->1536, ImageNet 512<->2048); on the CPU M is smaller
(4096, quick 512) so the suite finishes, and every row records its M.

Time budget: rows are measured in priority order (bf16, block 32, spike inputs, CIFAR shapes
first) until ``budget_s`` runs out (env ``EFFST_SPARSE_BUDGET_S``; default 50 s on CUDA so the
suite ends inside gpu_check.sh's limit; on the CPU 40 s quick, 240 s full); the rest are reported as
``status='skipped'`` rows that say so, never dropped silently.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
import platform
import sys
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from effst.benchmarks import timing
from effst.nn.block_sparse import BlockSparseLinear

SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BLOCKS = (32, 16, 64)  # priority order
DTYPES = ("bfloat16", "float32")
INPUTS = ("spike", "dense")
SHAPES = (  # (model, in_features, out_features)
    ("spikformer-cifar", 384, 1536),
    ("spikformer-cifar", 1536, 384),
    ("spikformer-imagenet", 512, 2048),
    ("spikformer-imagenet", 2048, 512),
)
TARGETS = {0.9: 3.0, 0.75: 1.5, 0.5: 0.9}  # minimum speedup over dense, H100 bf16 fwd+bwd
SPIKE_RATE = 0.2  # fraction of ones in the spike inputs


def _plan(device: str, quick: bool) -> tuple[int, list[tuple]]:
    """Token count M and the configurations in priority order."""
    if device == "cuda":
        m = 32768
        if quick:
            configs = [(shape, p, 32, "bfloat16", inp) for shape in SHAPES[:2] for inp in INPUTS for p in SPARSITIES]
            return m, configs
        configs = []
        # Most informative first: bf16 block 32 on the CIFAR shapes, then the other blocks,
        # then ImageNet, then fp32.
        for dtype, shapes, block, inp in itertools.product(DTYPES, (SHAPES[:2], SHAPES[2:]), BLOCKS, INPUTS):
            for shape in shapes:
                for p in SPARSITIES:
                    configs.append((shape, p, block, dtype, inp))
        return m, configs
    # CPU: fp32 only (PyTorch has no CPU BSR matmul for bf16).
    if quick:
        return 512, [(SHAPES[0], p, 32, "float32", inp) for inp in INPUTS for p in SPARSITIES]
    configs = [(shape, p, block, "float32", inp)
               for block in BLOCKS for shape in SHAPES for inp in INPUTS for p in SPARSITIES]
    return 4096, configs


def _default_budget(device: str, quick: bool) -> float:
    env = os.environ.get("EFFST_SPARSE_BUDGET_S")
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"EFFST_SPARSE_BUDGET_S: expected seconds > 0, got {env!r}")
        if value <= 0:
            raise ValueError(f"EFFST_SPARSE_BUDGET_S: expected seconds > 0, got {env!r}")
        return value
    if device == "cuda":
        return 50.0
    return 40.0 if quick else 240.0


class _Case:
    """Tensors of one configuration, shared by the three implementations."""

    def __init__(self, m, in_features, out_features, sparsity, block, dtype, input_kind, device, seed=0):
        torch.manual_seed(seed)
        linear = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        # On the CPU the torch implementation, never the Triton interpreter.
        self.layer = BlockSparseLinear.from_dense(
            linear, sparsity=sparsity, block_size=(block, block), backend="torch" if device == "cpu" else "triton"
        )
        self.weight = self.layer.to_dense().detach().clone().requires_grad_()
        self.bias = self.layer.bias.detach().clone().requires_grad_()
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.spikes = input_kind == "spike"
        if self.spikes:
            bits = torch.rand((m, in_features), generator=generator, device=device) < SPIKE_RATE
            self.x_effst = bits.to(torch.uint8)
            self.x_float = bits.to(dtype)
        else:
            self.x_float = torch.randn((m, in_features), generator=generator, device=device, dtype=dtype)
            self.x_effst = self.x_float
        self.x_float.requires_grad_(not self.spikes)
        self.grad_y = torch.randn((m, out_features), generator=generator, device=device, dtype=dtype)
        self.nnz = self.layer.nnz_blocks
        self.tiles = self.layer.block_mask.numel()

    def effst_fwd(self, i):
        with torch.no_grad():
            return self.layer(self.x_effst)

    def effst_fwd_bwd(self, i):
        self.layer.values.grad = self.layer.bias.grad = self.x_float.grad = None
        x = self.x_effst
        self.layer(x).backward(self.grad_y)

    def dense_fwd(self, i):
        with torch.no_grad():
            return F.linear(self.x_float, self.weight, self.bias)

    def dense_fwd_bwd(self, i):
        self.weight.grad = self.bias.grad = self.x_float.grad = None
        F.linear(self.x_float, self.weight, self.bias).backward(self.grad_y)


class _BSR:
    """PyTorch's BSR path for one case (built once; construction is not timed)."""

    def __init__(self, case: _Case, block: int):
        w = case.weight.detach()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
            self.w_bsr = w.to_sparse_bsr((block, block))
            self.wt_bsr = w.t().contiguous().to_sparse_bsr((block, block))
        self.bias = case.bias.detach()
        self.x = case.x_float.detach()
        self.grad_y = case.grad_y
        self.need_dx = not case.spikes
        self.sampled, self.sampled_name = torch.sparse.sampled_addmm, "torch.sparse.sampled_addmm"

    def fwd(self, i):
        return (self.w_bsr @ self.x.t()).t() + self.bias

    def _dw(self):
        return self.sampled(self.w_bsr, self.grad_y.t(), self.x, beta=0.0)

    def probe_dw(self) -> None:
        """Pick a dW product PyTorch supports here, or raise with its message."""
        try:
            self._dw()
            return
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as first:
            if self.x.device.type != "cuda":
                raise
            try:
                from torch.sparse import _triton_ops

                self.sampled = _triton_ops.sampled_addmm
                self.sampled_name = "torch.sparse._triton_ops.sampled_addmm"
                self._dw()
            except Exception as second:  # noqa: BLE001 - reported in the row
                raise RuntimeError(f"sampled_addmm: {first}; _triton_ops.sampled_addmm: {second}") from None

    def fwd_bwd(self, i):
        y = (self.w_bsr @ self.x.t()).t() + self.bias
        dx = (self.wt_bsr @ self.grad_y.t()).t() if self.need_dx else None
        dw = self._dw()
        db = self.grad_y.sum(0)
        return y, dx, dw, db


def _time(fn, device: str, quick: bool) -> dict:
    reps = 5 if quick else (20 if device == "cuda" else 7)
    return timing.time_function(fn, device=device, warmup=2 if device == "cpu" else 3, reps=reps, min_reps=3,
                                max_seconds=2.0 if device == "cpu" else 1.0)


def _row_base(device, m, shape, p, block, dtype, inp) -> dict:
    model, k, n = shape
    return {
        "shape": f"M={m} {k}->{n}",
        "model": model,
        "M": m,
        "in_features": k,
        "out_features": n,
        "sparsity": p,
        "block": block,
        "dtype": dtype,
        "input": "spike uint8" if inp == "spike" else "dense",
        "device": device,
    }


def _measure(case: _Case, device: str, quick: bool, row: dict) -> None:
    m, k, n = row["M"], row["in_features"], row["out_features"]
    row["effst_backend"] = "triton" if device == "cuda" else "torch (CPU gather over kept tiles)"
    row["block_sparsity"] = 1.0 - case.nnz / case.tiles
    row["kept_tiles"] = case.nnz
    products = 2 if case.spikes else 3  # no dX for spike inputs
    dense_flops = 2.0 * m * n * k
    kept_flops = 2.0 * m * case.nnz * row["block"] * row["block"]
    for impl, fns in (("effst", (case.effst_fwd, case.effst_fwd_bwd)), ("dense", (case.dense_fwd, case.dense_fwd_bwd))):
        for name, fn in zip(("fwd", "fwd_bwd"), fns):
            result = _time(fn, device, quick)
            row[f"{impl}_{name}_ms"] = result["ms"]
            row[f"{impl}_{name}_ms_q1"] = result["ms_q1"]
            row[f"{impl}_{name}_ms_q3"] = result["ms_q3"]
            row[f"{impl}_{name}_reps"] = result["reps"]
    row["timing_method"] = result["method"]
    try:
        bsr = _BSR(case, row["block"])
        row["bsr_fwd_ms"] = _time(bsr.fwd, device, quick)["ms"]
        bsr.probe_dw()
        row["bsr_dw_op"] = bsr.sampled_name
        row["bsr_fwd_bwd_ms"] = _time(bsr.fwd_bwd, device, quick)["ms"]
    except Exception as exc:  # noqa: BLE001 - PyTorch's BSR coverage varies; say what failed
        row["bsr_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    row["speedup_fwd"] = row["dense_fwd_ms"] / row["effst_fwd_ms"]
    row["speedup_fwd_bwd"] = row["dense_fwd_bwd_ms"] / row["effst_fwd_bwd_ms"]
    for name in ("fwd", "fwd_bwd"):
        if f"bsr_{name}_ms" in row:
            row[f"speedup_vs_bsr_{name}"] = row[f"bsr_{name}_ms"] / row[f"effst_{name}_ms"]
    row["tflops_kept_fwd"] = kept_flops / (row["effst_fwd_ms"] * 1e9)
    row["tflops_dense_fwd"] = dense_flops / (row["dense_fwd_ms"] * 1e9)
    row["tflops_ratio_fwd"] = row["tflops_kept_fwd"] / row["tflops_dense_fwd"]
    row["tflops_kept_fwd_bwd"] = products * kept_flops / (row["effst_fwd_bwd_ms"] * 1e9)
    row["tflops_dense_fwd_bwd"] = products * dense_flops / (row["dense_fwd_bwd_ms"] * 1e9)
    row["tflops_ratio"] = row["tflops_kept_fwd_bwd"] / row["tflops_dense_fwd_bwd"]
    if device == "cuda" and row["dtype"] == "bfloat16":
        need = TARGETS.get(row["sparsity"])
        parts = []
        met = True
        if need is not None:
            parts.append(f"fwd+bwd >= {need}x dense")
            met = met and row["speedup_fwd_bwd"] >= need
        parts.append("faster than BSR")
        if "speedup_vs_bsr_fwd_bwd" in row:
            met = met and row["speedup_vs_bsr_fwd_bwd"] > 1.0
        row["target"] = ", ".join(parts)
        row["target_met"] = bool(met)


def run(device: str, quick: bool, budget_s: Optional[float] = None, tokens: Optional[int] = None) -> list[dict]:
    """Measure the configurations of ``device`` ('cuda' or 'cpu'); one row per configuration.

    ``budget_s``: time budget (see the module doc); ``tokens``: override M (smoke tests).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda': no CUDA device is available")
    budget = budget_s if budget_s is not None else _default_budget(device, quick)
    m, configs = _plan(device, quick)
    if tokens is not None:
        m = int(tokens)
    start = time.perf_counter()
    stamp = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine()),
        "command": "effst bench sparse --device " + device + (" --quick" if quick else ""),
    }
    rows: list[dict] = []
    for shape, p, block, dtype, inp in configs:
        row = _row_base(device, m, shape, p, block, dtype, inp)
        row.update(stamp)
        if rows and time.perf_counter() - start > budget:  # the first configuration always runs
            row["status"] = "skipped"
            row["reason"] = f"time budget of {budget:.0f} s used up (EFFST_SPARSE_BUDGET_S raises it)"
            rows.append(row)
            continue
        try:
            case = _Case(m, shape[1], shape[2], p, block, getattr(torch, dtype), inp, device)
            _measure(case, device, quick, row)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            case = None
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


if __name__ == "__main__":  # a quick look without the harness: python bench/bench_sparse.py [cuda|cpu] [--quick]
    dev = next((a for a in sys.argv[1:] if a in ("cuda", "cpu")), "cuda" if torch.cuda.is_available() else "cpu")
    for r in run(dev, "--quick" in sys.argv):
        keys = ("shape", "sparsity", "block", "dtype", "input", "status", "effst_fwd_bwd_ms", "dense_fwd_bwd_ms",
                "bsr_fwd_bwd_ms", "speedup_fwd_bwd", "tflops_ratio", "bsr_error", "error")
        print({k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in keys if k in r})
