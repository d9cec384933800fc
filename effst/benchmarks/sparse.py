"""``sparse`` suite: effst BlockSparseLinear and PyTorch 2:4 semi-structured weights vs dense
cuBLAS ``nn.Linear``, per layer and in whole Spikformers.

Run through the harness (``effst bench sparse --device cuda|cpu [--quick]``), which calls
``run(device, quick, rows=..., log=...)``; each row is appended to ``rows`` as soon as it is
measured, so a suite stopped by its budget (``--suite-timeout``) keeps what it finished.

Layer rows (``kind='layer'``), per (shape, block, sparsity, input): M = 32768 tokens on CUDA
(Spikformer activations, 384->1536 and 1536->384), bf16; on the CPU small M (quick: 256) and
the torch implementation (no Triton outside the interpreter).

* ``effst_*``: ``BlockSparseLinear`` (block L1P at ``sparsity`` of a random ``nn.Linear``).
  Input ``dense`` (bf16, gets dX) or ``spike uint8`` (read as bytes, no dX).
* ``dense_*``: ``F.linear`` with the same (masked) weight; spike inputs as 0/1 bf16, no dX.
* ``fwd`` = forward without autograd; ``fwd_bwd`` = forward + ``autograd.grad`` of what needs
  one (dX for dense inputs, dW, db). ``*_ms``: eager wall per call (CUDA events, L2 flushed,
  median); ``*_kernel_ms``: the same call replayed from a CUDA graph (device time only).
* ``speedup_*`` = dense / effst (wall; ``_kernel``: kernel time); ``tflops_kept_*`` = FLOPs on
  the kept tiles / effst kernel time; ``tflops_ratio_*`` = that / dense TFLOP/s.
* ``floor_ms_*``: bytes that must move (every tensor read or written once: X, kept W, Y, b;
  + dY, dX, dW, db for fwd_bwd) / measured copy bandwidth (on the CPU too); ``floor_fraction_*``
  = floor / effst kernel time (wall time on the CPU; 1.0 = at the memory floor).
* ``break_even_sparsity_fwd_bwd``: per (shape, block, input), the lowest sparsity at which
  effst fwd+bwd wall time matches dense, interpolated between measured sparsities (None if
  never, or if it is already faster at the lowest one measured).

2:4 rows (``kind='2:4'``, CUDA only): ``l1p(pattern='2:4')`` + ``prune.to_semi_structured``
(cuSPARSELt/CUTLASS through ``torch.sparse.to_sparse_semi_structured``), forward only
(inference weights), beside dense; ``floor_*_fwd`` as for the layer rows, the weight counted as
its kept half plus a 2-bit index per kept value.

Spikformer rows (``kind='model'``, CUDA): Spikformer-4-384 and -8-512 at the ImageNet token
count (224x224 images, 196 tokens), batch 64 (quick 16), T = 4, bf16 autocast: dense vs
block L1P 90 % on q/k/v/proj/fc1/fc2 converted with ``prune.to_block_sparse``, at
``effst.prune.DEFAULT_BLOCK_SIZE``: inference images/s and training step (AdamW) ms.

Spike-byte row (``kind='spike-bytes'``, every device): the bytes the spikes of one
Spikformer-4-384 inference step move (same batch, T and 196 tokens as the model rows), counted
exactly from the activation shapes of a forward pass on the meta device: every neuron's output
written once and read once by its consumer, at 4 B (fp32), 2 B (bf16, the dtype of the spikes
under the model rows' autocast) and 1 B (uint8) per spike; in total and for the neurons whose
consumers read uint8 directly (``SPIKE_BYTE_READERS``: attention / fc1 spikes into
``BlockSparseLinear``, projection / fc2 spikes into the residual add). On CUDA also timed: the
block-sparse model's inference with those neurons emitting bf16 vs uint8 spikes. Printed alone by
``python -m effst.benchmarks.sparse --spike-bytes``.

The same row counts the bytes autograd saves for the backward of one block-sparse TRAINING step
(bf16 autocast, the model rows' step) with those neurons emitting float spikes vs uint8 spikes
(a SpikeBytes, effst/ops/spike_bytes.py: the surrogate gradient path is kept and
``BlockSparseLinear`` saves the bytes), counted with ``saved_tensors_hooks`` (each storage once,
parameters and buffers left out). On CUDA counted at the row's batch and the training step
timed both ways; on the CPU counted at batch 1 and 2 and taken to the row's batch linearly
(every saved activation's size is linear in the batch; the constant is the weights' autocast
copies), since a CPU step at batch 64 would take minutes.
"""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effst.benchmarks import timing

SPARSITIES = (0.9, 0.75, 0.5, 0.95, 0.0)  # priority order
SHAPES = ((384, 1536), (1536, 384))  # (in_features, out_features): Spikformer-4-384 MLP
SPIKE_RATE = 0.2  # fraction of ones in the spike inputs
MODELS = ("spikformer-4-384", "spikformer-8-512")
MODEL_SPARSITY = 0.9


def _plan(device: str, quick: bool) -> tuple[int, list[tuple]]:
    """Token count M and the layer configurations ``(shape, block, sparsity, input)`` in priority order."""
    if device != "cuda":
        m = 256 if quick else 2048
        blocks = (32,) if quick else (32, 64)
        sparsities = (0.9, 0.5) if quick else SPARSITIES
        return m, [(s, b, p, i) for b in blocks for s in SHAPES[:1 if quick else 2] for i in ("dense", "spike")
                   for p in sparsities]
    m = 32768
    configs = []
    sparsities = (0.9, 0.75, 0.5) if quick else SPARSITIES
    for block in ((64,) if quick else (64, 128, 32)):  # 128: DEFAULT_BLOCK_SIZE, before 32 (cut first)
        configs += [(s, block, p, "dense") for s in SHAPES for p in sparsities]
        configs += [(s, block, p, "spike") for s in SHAPES for p in ((0.9, 0.0) if block != 128 else (0.9,))]
    if quick:  # the default tile (DEFAULT_BLOCK_SIZE, the model rows' layout) at 90 %, run last
        configs += [(s, 128, 0.9, i) for s in SHAPES for i in ("dense", "spike")]
    return m, configs


def _schedule(device: str, configs: list[tuple], quick: bool) -> list[tuple]:
    """``(kind, what)`` in the order measured: on CUDA the 64x64 layer rows, the 2:4 rows, the
    Spikformer rows, the spike-byte row, then the other tiles' layer rows (a suite cut by its
    budget keeps the first); on the CPU the spike-byte row, then the layer rows."""
    plan = [("layer", c) for c in configs]
    if device != "cuda":
        return [("spike-bytes", SPIKE_BYTES_MODEL)] + plan  # bytes only (no timing): a meta-device pass
    first = sum(1 for c in configs if c[1] == 64)  # the 64x64 rows come first in every CUDA plan
    return (plan[:first] + [("2:4", s) for s in SHAPES] + [("model", n) for n in MODELS[:1 if quick else 2]]
            + [("spike-bytes", SPIKE_BYTES_MODEL)] + plan[first:])


def _stamp(device: str, quick: bool) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine()),
        "command": "effst bench sparse --device " + device + (" --quick" if quick else ""),
    }


def _time(fn: Callable, device: str, quick: bool) -> dict:
    reps = 5 if quick or device != "cuda" else 15
    return timing.time_function(fn, device=device, warmup=3, reps=reps, min_reps=3, max_seconds=1.0)


class _LayerCase:
    """One layer configuration: the block-sparse layer, the dense weight, the inputs."""

    def __init__(self, m, in_features, out_features, sparsity, block, input_kind, device, dtype, seed=0):
        from effst.nn.block_sparse import BlockSparseLinear

        torch.manual_seed(seed)
        linear = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        backend = "auto" if device == "cuda" else "torch"  # never the interpreter in a benchmark
        self.layer = BlockSparseLinear.from_dense(linear, sparsity=sparsity, block_size=(block, block), backend=backend)
        self.weight = self.layer.to_dense().detach().clone().requires_grad_()
        self.bias = self.layer.bias.detach().clone().requires_grad_()
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.spikes = input_kind == "spike"
        if self.spikes:
            bits = torch.rand((m, in_features), generator=generator, device=device) < SPIKE_RATE
            self.x_effst, self.x_dense = bits.to(torch.uint8), bits.to(dtype)
        else:
            self.x_dense = torch.randn((m, in_features), generator=generator, device=device, dtype=dtype)
            self.x_effst = self.x_dense.detach().clone().requires_grad_()
            self.x_dense.requires_grad_()
        self.grad_y = torch.randn((m, out_features), generator=generator, device=device, dtype=dtype)

    def effst_fwd(self, i=0):
        with torch.no_grad():
            return self.layer(self.x_effst)

    def effst_fwd_bwd(self, i=0):
        inputs = [self.layer.values, self.layer.bias] + ([] if self.spikes else [self.x_effst])
        return torch.autograd.grad(self.layer(self.x_effst), inputs, self.grad_y)

    def dense_fwd(self, i=0):
        with torch.no_grad():
            return F.linear(self.x_dense, self.weight, self.bias)

    def dense_fwd_bwd(self, i=0):
        inputs = [self.weight, self.bias] + ([] if self.spikes else [self.x_dense])
        return torch.autograd.grad(F.linear(self.x_dense, self.weight, self.bias), inputs, self.grad_y)


def _floor_bytes(m, k, n, weight_bytes, x_bytes, elem, spikes) -> tuple[float, float]:
    """Bytes that must move for fwd and fwd+bwd (each tensor once): X, the stored weight, Y, b;
    + dY, dW (as large as the stored weight), db and, for float inputs, dX."""
    fwd = m * k * x_bytes + weight_bytes + m * n * elem + n * elem
    bwd = m * n * elem + weight_bytes + n * elem + (0 if spikes else m * k * elem)  # dY, dW, db, dX
    return fwd, fwd + bwd


def two_four_weight_bytes(n: int, k: int, elem: int) -> float:
    """Bytes of a 2:4 semi-structured ``[n, k]`` weight: the kept half of the values plus a 2-bit
    index per kept value (the format's metadata)."""
    kept = n * k // 2
    return kept * elem + kept * 2 / 8


def _floor_columns(row: dict, name: str, floor_bytes: float, bandwidth: Optional[float], ms: Optional[float]) -> None:
    """``floor_bytes_<name>``, and with a measured bandwidth ``floor_ms_<name>`` (bytes / copy
    bandwidth) and ``floor_fraction_<name>`` (floor / ``ms``, the measured time; 1.0 = at the floor)."""
    row[f"floor_bytes_{name}"] = floor_bytes
    if bandwidth:
        row[f"floor_ms_{name}"] = floor_bytes / bandwidth * 1e3
        if ms:
            row[f"floor_fraction_{name}"] = row[f"floor_ms_{name}"] / ms


def _measure_layer(case: _LayerCase, device: str, quick: bool, row: dict, bandwidth: Optional[float]) -> None:
    m, k, n, block = row["M"], row["in_features"], row["out_features"], row["block"]
    nnz = case.layer.nnz_blocks
    row["kept_tiles"] = nnz
    row["block_sparsity"] = case.layer.block_sparsity
    for impl in ("effst", "dense"):
        for name in ("fwd", "fwd_bwd"):
            fn = getattr(case, f"{impl}_{name}")
            result = _time(fn, device, quick)
            row[f"{impl}_{name}_ms"] = result["ms"]
            row[f"{impl}_{name}_ms_q1"], row[f"{impl}_{name}_ms_q3"] = result["ms_q1"], result["ms_q3"]
            row["reps"] = result["reps"]
            kernel = timing.kernel_time(fn, device, reps=10 if quick else 20)
            row[f"{impl}_{name}_kernel_ms"] = kernel.get("kernel_ms")
            if kernel.get("kernel_graph_error"):
                row[f"{impl}_{name}_kernel_graph_error"] = kernel["kernel_graph_error"]
            row["kernel_method"] = kernel.get("kernel_method")
    row["timing_method"] = result["method"]
    products = 2 if case.spikes else 3
    dense_flops, kept_flops = 2.0 * m * n * k, 2.0 * m * nnz * block * block
    elem = case.weight.element_size()
    floors = _floor_bytes(m, k, n, nnz * block * block * elem, case.x_effst.element_size(), elem, case.spikes)
    for name, factor, floor_bytes in (("fwd", 1, floors[0]), ("fwd_bwd", products, floors[1])):
        row[f"speedup_{name}"] = row[f"dense_{name}_ms"] / row[f"effst_{name}_ms"]
        effst_t = row[f"effst_{name}_kernel_ms"] or row[f"effst_{name}_ms"]  # wall where no kernel time (CPU)
        dense_t = row[f"dense_{name}_kernel_ms"] or row[f"dense_{name}_ms"]
        if row[f"effst_{name}_kernel_ms"] and row[f"dense_{name}_kernel_ms"]:
            row[f"speedup_{name}_kernel"] = dense_t / effst_t
        row[f"tflops_kept_{name}"] = factor * kept_flops / (effst_t * 1e9)
        row[f"tflops_dense_{name}"] = factor * dense_flops / (dense_t * 1e9)
        row[f"tflops_ratio_{name}"] = row[f"tflops_kept_{name}"] / row[f"tflops_dense_{name}"]
        _floor_columns(row, name, floor_bytes, bandwidth, effst_t)


def _break_even(rows: list[dict]) -> None:
    """Fill ``break_even_sparsity_fwd_bwd`` into every measured layer row of each group."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind") == "layer" and r.get("status") == "ok":
            groups.setdefault((r["in_features"], r["out_features"], r["block"], r["input"]), []).append(r)
    for members in groups.values():
        points = sorted((r["sparsity"], r["speedup_fwd_bwd"]) for r in members)
        value = None
        if len(points) >= 2 and points[0][1] < 1.0:
            for (p0, s0), (p1, s1) in zip(points, points[1:]):
                if s0 < 1.0 <= s1:
                    value = p0 + (1.0 - s0) * (p1 - p0) / (s1 - s0)
                    break
        for r in members:
            r["break_even_sparsity_fwd_bwd"] = value


def _two_four_row(m, k, n, device, dtype, quick, stamp, bandwidth: Optional[float] = None) -> dict:
    from effst import prune

    row = {"kind": "2:4", "M": m, "in_features": k, "out_features": n, "sparsity": 0.5, "dtype": str(dtype).split(".")[-1],
           "input": "dense", "shape": f"M={m} {k}->{n}", **stamp}
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    prune.l1p(linear, 0.5, pattern="2:4")
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight = linear.weight.detach().clone()
    bias = linear.bias.detach().clone()
    sparse = nn.Sequential(linear)
    prune.to_semi_structured(sparse)

    def dense(i=0):
        with torch.no_grad():
            return F.linear(x, weight, bias)

    def semi(i=0):
        with torch.no_grad():
            return sparse(x)

    torch.testing.assert_close(semi().float(), dense().float(), rtol=5e-2, atol=5e-2)
    for name, fn in (("dense", dense), ("semi_structured", semi)):
        row[f"{name}_fwd_ms"] = _time(fn, device, quick)["ms"]
        row[f"{name}_fwd_kernel_ms"] = timing.kernel_time(fn, device, reps=10).get("kernel_ms")
    row["speedup_fwd"] = row["dense_fwd_ms"] / row["semi_structured_fwd_ms"]
    if row["dense_fwd_kernel_ms"] and row["semi_structured_fwd_kernel_ms"]:
        row["speedup_fwd_kernel"] = row["dense_fwd_kernel_ms"] / row["semi_structured_fwd_kernel_ms"]
    elem = weight.element_size()
    _floor_columns(row, "fwd", _floor_bytes(m, k, n, two_four_weight_bytes(n, k, elem), elem, elem, False)[0],
                   bandwidth, row["semi_structured_fwd_kernel_ms"] or row["semi_structured_fwd_ms"])
    row["note"] = "forward only: to_semi_structured makes inference weights"
    return row


IMAGENET_SHAPE = {"image_size": 224, "variant": "imagenet", "num_classes": 1000, "in_channels": 3}  # 196 tokens
# Neurons (name suffixes) whose spikes the next op reads as uint8 without a conversion kernel:
# attn_lif -> proj_linear and fc1_lif -> fc2 (BlockSparseLinear after to_block_sparse), proj_lif
# and fc2_lif -> the residual add (type promotion inside the add). q/k/v spikes feed a matmul
# and the patch-splitting spikes a convolution, which need floating inputs.
SPIKE_BYTE_READERS = ("attn.attn_lif", "attn.proj_lif", "mlp.fc1_lif", "mlp.fc2_lif")
SPIKE_BYTES_MODEL = "spikformer-4-384"


def spike_elements(name: str = SPIKE_BYTES_MODEL, overrides: Optional[dict] = None) -> dict[str, int]:
    """Spikes each neuron of model ``name`` emits per image and per timestep (``{qualified name:
    elements}``, forward order), from one forward pass on the meta device (shapes only, no data).

    ``overrides``: config fields (default: the ImageNet shape, 196 tokens)."""
    from effst.models import build_model

    net = build_model(name, neuron="lif", T=1, backend="reference",
                      **(IMAGENET_SHAPE if overrides is None else overrides)).eval().to("meta")
    cfg = net.config
    counts: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda mod, inp, out, key=key: counts.__setitem__(key, out[0, 0].numel()))
             for key, module in net.neurons()]
    try:
        with torch.no_grad():
            net(torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def spike_bytes(batch: int, T: int, name: str = SPIKE_BYTES_MODEL, overrides: Optional[dict] = None) -> dict:
    """Bytes moved by the spikes of one inference step (each spike tensor written once, read once),
    for the whole model and for the ``SPIKE_BYTE_READERS`` neurons, per spike dtype."""
    per_image_step = spike_elements(name, overrides)
    readers = sum(n for key, n in per_image_step.items() if key.endswith(SPIKE_BYTE_READERS))
    total = sum(per_image_step.values())
    out = {"spikes_per_step": total * batch * T, "byte_reader_spikes_per_step": readers * batch * T,
           "neurons": len(per_image_step)}
    for label, size in (("fp32", 4), ("bf16", 2), ("uint8", 1)):
        out[f"spike_bytes_{label}"] = 2 * size * total * batch * T
        out[f"byte_reader_spike_bytes_{label}"] = 2 * size * readers * batch * T
    return out


def _spike_bytes_row(device: str, quick: bool, stamp: dict, overrides: Optional[dict] = None) -> dict:
    batch, T = (16 if quick else 64), 4
    row = {"kind": "spike-bytes", "model": SPIKE_BYTES_MODEL, "batch": batch, "T": T, "status": "ok",
           **spike_bytes(batch, T, overrides=overrides), **stamp}
    row["byte_reader_saving_bytes_vs_bf16"] = row["byte_reader_spike_bytes_bf16"] - row["byte_reader_spike_bytes_uint8"]
    if device == "cuda":  # time the saving: block-sparse model, byte readers emitting bf16 vs uint8
        net, x = _block_sparse_model(SPIKE_BYTES_MODEL, device, batch, overrides)
        readers = [m for key, m in net.neurons() if key.endswith(SPIKE_BYTE_READERS)]
        for label, dtype in (("bf16", None), ("uint8", torch.uint8)):
            for module in readers:
                module.spike_dtype = dtype
            row[f"inference_ms_{label}_spikes"] = _inference_ms(net, x, device, quick)["ms"]
        row["inference_speedup_uint8_spikes"] = row["inference_ms_bf16_spikes"] / row["inference_ms_uint8_spikes"]
        row["model_sparsity"], row["block"] = MODEL_SPARSITY, _default_block()
        del net
        torch.cuda.empty_cache()
    row.update(_spike_bytes_training(device, batch, quick, overrides))
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude=()) -> tuple[torch.Tensor, dict]:
    """Run ``forward`` (returning a loss) under ``saved_tensors_hooks``: ``(loss, {dtype name:
    bytes})`` of what autograd saves for the backward, each storage counted once (whole
    storage: what the saved tensor keeps alive), storages of ``exclude`` (parameters, buffers)
    left out, a SpikeBytes counted as its bytes."""
    from effst.ops.spike_bytes import SpikeBytes

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        held = t.spike_bytes if isinstance(t, SpikeBytes) else t
        storage = held.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = (storage.nbytes(), str(held.dtype).split(".")[-1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    by_dtype: dict[str, int] = {}
    for size, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    return loss, by_dtype


def _spike_bytes_training(device: str, batch: int, quick: bool, overrides: Optional[dict]) -> dict:
    """Saved-activation bytes (and on CUDA the time) of one block-sparse training step with the
    ``SPIKE_BYTE_READERS`` neurons emitting float vs uint8 spikes (see the module docstring)."""
    from effst.nn import reset

    from effst.nn.block_sparse import BlockSparseLinear

    net, x = _build(SPIKE_BYTES_MODEL, device, batch, overrides, block_sparse=True)
    net.train()
    if device != "cuda":  # the CPU implementation, also under the Triton interpreter (tests)
        for module in net.modules():
            if isinstance(module, BlockSparseLinear):
                module.backend = "torch"
    readers = [m for key, m in net.neurons() if key.endswith(SPIKE_BYTE_READERS)]
    y = torch.randint(0, net.config.num_classes, (batch,), device=device)
    keep = list(net.parameters()) + list(net.buffers())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    out: dict = {}

    def forward(xb, yb):
        reset(net)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = net(xb)
        return F.cross_entropy(logits.float(), yb)

    def train_step(i=0):
        forward(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for label, dtype in (("float", None), ("uint8", torch.uint8)):
        for module in readers:
            module.spike_dtype = dtype
        counts = []
        for b in ((batch,) if device == "cuda" else (1, 2)):
            loss, by_dtype = saved_activation_bytes(lambda: forward(x[:b], y[:b]), keep)
            loss.backward()  # the step runs to its end (the byte path's gradient included)
            net.zero_grad(set_to_none=True)
            counts.append((b, sum(by_dtype.values()), by_dtype))
            out[f"train_loss_{label}_spikes_batch{b}"] = loss.item()
        if device == "cuda":
            out[f"train_saved_bytes_{label}_spikes"] = counts[0][1]
            out[f"train_saved_bytes_{label}_spikes_by_dtype"] = counts[0][2]
        else:
            (b1, n1, _), (b2, n2, by2) = counts
            per_image = (n2 - n1) // (b2 - b1)
            out[f"train_saved_bytes_{label}_spikes"] = n1 + per_image * (batch - b1)
            out[f"train_saved_bytes_{label}_spikes_per_image"] = per_image
            out[f"train_saved_bytes_{label}_spikes_by_dtype_batch{b2}"] = by2
    if device == "cuda":  # timed after both counts (the optimizer steps change the weights)
        for label, dtype in (("float", None), ("uint8", torch.uint8)):
            for module in readers:
                module.spike_dtype = dtype
            out[f"train_ms_{label}_spikes"] = timing.time_function(
                train_step, device=device, warmup=2, reps=3 if quick else 8, min_reps=3, max_seconds=4.0)["ms"]
    out["train_saved_counted_at"] = f"batch {batch}" if device == "cuda" else "batch 1 and 2, linear to the row's batch"
    out["train_saved_saving_bytes"] = out["train_saved_bytes_float_spikes"] - out["train_saved_bytes_uint8_spikes"]
    out["train_saved_saving_fraction"] = out["train_saved_saving_bytes"] / out["train_saved_bytes_float_spikes"]
    if device == "cuda":
        out["train_speedup_uint8_spikes"] = out["train_ms_float_spikes"] / out["train_ms_uint8_spikes"]
    for module in readers:
        module.spike_dtype = None
    del net, optimizer
    return out


def _default_block() -> list:
    from effst import prune

    return list(prune.DEFAULT_BLOCK_SIZE)


def _build(name: str, device: str, batch: int, overrides: Optional[dict], block_sparse: bool):
    """Spikformer ``name`` (effst LIF, T = 4) on ``device``, block-L1P-90 % + to_block_sparse when
    ``block_sparse``; and a random input batch."""
    from effst import prune
    from effst.models import build_model
    from effst.models.spikformer import prune_targets

    torch.manual_seed(0)
    net = build_model(name, neuron="lif", T=4, **(IMAGENET_SHAPE if overrides is None else overrides)).to(device)
    if block_sparse:
        prune.block_l1p(net, MODEL_SPARSITY, targets=prune_targets(net), block_size=prune.DEFAULT_BLOCK_SIZE)
        prune.to_block_sparse(net)
    cfg = net.config
    return net, torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)


def _block_sparse_model(name: str, device: str, batch: int, overrides: Optional[dict]):
    net, x = _build(name, device, batch, overrides, block_sparse=True)
    return net.eval(), x


def _inference_ms(net, x, device: str, quick: bool) -> dict:
    from effst.nn import reset

    def infer(i=0):
        reset(net)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            return net(x)

    return timing.time_function(infer, device=device, warmup=2, reps=3 if quick else 8, min_reps=3, max_seconds=4.0)


def _model_rows(name: str, device: str, quick: bool, stamp: dict, overrides: Optional[dict] = None) -> list[dict]:
    """Dense vs block-L1P-90 % BlockSparseLinear Spikformer: inference and training step.

    ``overrides``: config fields (default: the ImageNet shape, 196 tokens)."""
    from effst.nn import reset

    batch = 16 if quick else 64
    out = []
    results = {}
    for variant in ("dense", "block-sparse"):
        net, x = _build(name, device, batch, overrides, block_sparse=variant == "block-sparse")
        cfg = net.config
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def train_step(i=0):
            reset(net)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                logits = net(x)
            F.cross_entropy(logits.float(), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for step in ("inference", "train"):
            net.train(step == "train")
            if step == "inference":
                t = _inference_ms(net, x, device, quick)
            else:
                t = timing.time_function(train_step, device=device, warmup=2, reps=3 if quick else 8, min_reps=3,
                                         max_seconds=4.0)
            results[(variant, step)] = t["ms"]
            row = {"kind": "model", "model": name, "variant": variant, "step": step, "batch": batch, "T": 4,
                   "image_size": cfg.image_size, "dtype": "bfloat16 (autocast)", "ms": t["ms"], "ms_q1": t["ms_q1"], "ms_q3": t["ms_q3"],
                   "images_per_s": batch / (t["ms"] * 1e-3), "timing_method": t["method"], "status": "ok", **stamp}
            if variant == "block-sparse":
                row.update(sparsity=MODEL_SPARSITY, block=_default_block(),
                           speedup_vs_dense=results[("dense", step)] / t["ms"])
            out.append(row)
        del net, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def run(device: str, quick: bool, *, rows: Optional[list] = None, log: Callable[[str], None] = print,
        tokens: Optional[int] = None) -> list[dict]:
    """Measure the plan of ``device`` ('cuda' or 'cpu'); rows are appended to ``rows`` as measured."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda': no CUDA device is available")
    rows = [] if rows is None else rows
    m, configs = _plan(device, quick)
    m = int(tokens) if tokens is not None else m
    stamp = _stamp(device, quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth = timing.copy_bandwidth(device, (256 if device == "cuda" else 64) << 20)["bytes_per_s"]
    for kind, what in _schedule(device, configs, quick):
        try:
            if kind == "layer":
                (k, n), block, p, inp = what
                row = {"kind": "layer", "shape": f"M={m} {k}->{n}", "M": m, "in_features": k, "out_features": n,
                       "sparsity": p, "block": block, "dtype": str(dtype).split(".")[-1],
                       "input": "spike uint8" if inp == "spike" else "dense", "device": device, **stamp}
                row["effst_backend"] = "triton" if device == "cuda" else "torch (CPU: kept tiles only)"
                case = _LayerCase(m, k, n, p, block, inp, device, dtype)
                _measure_layer(case, device, quick, row, bandwidth)
                row["status"] = "ok"
                new = [row]
            elif kind == "2:4":
                new = [dict(_two_four_row(m, what[0], what[1], device, dtype, quick, stamp, bandwidth), status="ok")]
            elif kind == "spike-bytes":
                new = [_spike_bytes_row(device, quick, stamp)]
            else:
                new = _model_rows(what, device, quick, stamp)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            new = [{"kind": kind, "what": repr(what), "status": "error", "error": f"{type(exc).__name__}: {exc}"[:500], **stamp}]
        finally:
            case = None
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.extend(new)
        for r in new:
            log(f"sparse {r.get('kind')} {r.get('shape', r.get('model', ''))} p={r.get('sparsity')} "
                f"block={r.get('block')} {r.get('input', r.get('step', ''))}: {r['status']}"
                + (f" speedup fwd {r['speedup_fwd']:.2f}x fwd+bwd {r.get('speedup_fwd_bwd', float('nan')):.2f}x"
                   if r["status"] == "ok" and "speedup_fwd" in r else "")
                + (f" {r.get('error', '')}" if r["status"] == "error" else ""))
        _break_even(rows)
    return rows


def _print_spike_bytes(batch: int = 64, T: int = 4) -> None:
    """The spike-byte figures of docs/block_sparse.md."""
    b = spike_bytes(batch, T)
    gb = 1e9
    train = _spike_bytes_training("cpu", batch, True, None)
    print(f"{SPIKE_BYTES_MODEL}, 224x224 images (196 tokens), batch {batch}, T = {T}, one inference step "
          f"({b['neurons']} neurons; each spike tensor written once and read once):")
    print(f"  all spikes:    {b['spikes_per_step']:,} -> fp32 {b['spike_bytes_fp32'] / gb:.3f} GB, "
          f"bf16 {b['spike_bytes_bf16'] / gb:.3f} GB, uint8 {b['spike_bytes_uint8'] / gb:.3f} GB")
    print(f"  byte readers ({', '.join(SPIKE_BYTE_READERS)}): {b['byte_reader_spikes_per_step']:,} -> "
          f"fp32 {b['byte_reader_spike_bytes_fp32'] / gb:.3f} GB, bf16 {b['byte_reader_spike_bytes_bf16'] / gb:.3f} GB, "
          f"uint8 {b['byte_reader_spike_bytes_uint8'] / gb:.3f} GB")
    print(f"One block-sparse training step (block L1P {MODEL_SPARSITY:.0%}, bf16 autocast, batch {batch}, "
          f"counted at {train['train_saved_counted_at']}), bytes autograd saves for the backward "
          f"(parameters left out), with the byte readers emitting:")
    for label in ("float", "uint8"):
        print(f"  {label:>5} spikes: {train[f'train_saved_bytes_{label}_spikes'] / gb:.3f} GB "
              f"({train[f'train_saved_bytes_{label}_spikes_per_image']:,} B per image)")
    print(f"  saving: {train['train_saved_saving_bytes'] / gb:.3f} GB "
          f"({train['train_saved_saving_fraction']:.2%}); loss equal: "
          f"{train['train_loss_float_spikes_batch2'] == train['train_loss_uint8_spikes_batch2']}")


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing and counts the launch."""

    def __init__(self, counter: list) -> None:
        self.counter = counter

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.counter.append(grid)


class _BindNoLaunch(_NoLaunch):
    """``kernel[grid](...)`` does the Python of ``JITFunction.run`` before its launch -- Triton's
    argument binder and specialisation (built for an sm_90 target) and its cache key -- then
    nothing: the uncached path as a GPU runs it, less the C launcher and the in-memory kernel
    lookup. Works for any kernel, interpreted or not (it builds its own JITFunction)."""

    def __init__(self, counter: list, kernel) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        super().__init__(counter)
        jit = JITFunction(kernel.fn)
        self.binder = create_function_from_signature(jit.signature, jit.params,
                                                     make_backend(GPUTarget("cuda", 90, 32)))
        self.debug = jit.debug
        self.keys: dict = {}

    def __getitem__(self, grid):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        def launch(*args, **kwargs):
            kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            _, specialization, options = self.binder(*args, **kwargs)
            compute_cache_key(self.keys, specialization, options)
            self.counter.append(grid)
        return launch


class _CachedNoLaunch(_NoLaunch):
    """Stands in for a JITFunction and the CompiledKernel its ``kernel[grid](...)`` returns, so
    effst.ops.launch caches it: the first launch of a specialisation goes through
    ``kernel[grid]`` (counted in ``counter``), later ones through ``run`` (counted in ``runs``);
    neither does anything."""

    function = packed_metadata = None

    def __init__(self, counter: list, runs: list) -> None:
        super().__init__(counter)
        self.runs = runs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.append(grid)
            return self
        return launch

    def run(self, *args) -> None:
        self.runs.append(None)  # (no new object per call: a growing heap of them slows the GC)


def host_cost(rows: int = 8, rounds: int = 7, round_seconds: float = 0.3) -> dict:
    """Host time (µs) of one tiny ``BlockSparseLinear`` fwd+bwd on the CPU (one thread): the
    overhead suite's layer (64 -> 64, 16x16 tiles, half kept), x = [rows, 64] fp32,
    ``autograd.grad`` of x, values and bias; each row the median over ``rounds`` of a round of
    back-to-back calls (``<row>_us``; ``<row>_us_min`` the fastest round), the rows' rounds
    interleaved (round 1 of every row, then round 2, ...) so that a busy machine slows them
    alike. Rows: ``torch``: the torch
    implementation; ``triton_python``: the Triton path with every launch through
    ``kernel[grid](...)`` replaced by a no-op (effst's Python on the uncached path, as
    EFFST_BSL_LAUNCH_CACHE=0 runs it, without Triton's binder); ``triton_jit``: the same with
    Triton's binder and cache key run per launch (:class:`_BindNoLaunch`: the uncached path's
    Python as on a GPU, less the launcher and the kernel lookup); ``triton_cached``: the Triton
    path as a GPU runs it, launches through effst.ops.launch's cache with ``CompiledKernel.run``
    replaced by a no-op (all of effst's Python per call; what remains on a GPU is the launcher's
    C code); ``dense``: ``F.linear``, forward and ``autograd.grad`` of x, weight and bias."""
    import statistics

    from effst.benchmarks.overhead import per_call_us
    from effst.nn import BlockSparseLinear
    from effst.ops import block_sparse_linear as ops
    from effst.ops import launch as launch_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    layer = BlockSparseLinear.from_dense(linear, sparsity=0.5, block_size=(16, 16), backend="torch")
    x = torch.randn(rows, 64, requires_grad=True)
    grad_y = torch.randn(rows, 64)
    weight, bias = linear.weight.detach().clone().requires_grad_(), linear.bias.detach().clone().requires_grad_()
    inputs = [x, layer.values, layer.bias]
    kernels = ("_bsl_forward_kernel", "_bsl_grad_input_kernel", "_bsl_grad_weight_kernel", "_sum_splits_kernel")
    saved = {name: getattr(ops, name) for name in kernels + ("_use_triton", "LAUNCH_CACHE", "_LAUNCHES")}
    saved_launch = {name: getattr(launch_ops, name) for name in ("_cacheable", "_device_and_stream")}
    launches: list = []
    runs: list = []
    stand_ins = {"triton_python": {name: _NoLaunch(launches) for name in kernels},
                 "triton_jit": {name: _BindNoLaunch(launches, saved[name]) for name in kernels},
                 "triton_cached": {name: _CachedNoLaunch(launches, runs) for name in kernels}}

    def bsl_step():
        return torch.autograd.grad(layer(x), inputs, grad_y)

    def dense_step():
        return torch.autograd.grad(F.linear(x, weight, bias), [x, weight, bias], grad_y)

    def configure(row: str) -> None:
        """Point the op at the row's kernels (the real ones and the torch path for 'torch')."""
        layer.backend = "torch" if row == "torch" else "auto"
        ops._use_triton = saved["_use_triton"] if row == "torch" else (lambda device, backend: True)
        ops.LAUNCH_CACHE = row == "triton_cached"
        for name in kernels:
            setattr(ops, name, stand_ins[row][name] if row in stand_ins else saved[name])

    steps = {"torch": bsl_step, "triton_python": bsl_step, "triton_jit": bsl_step, "triton_cached": bsl_step,
             "dense": dense_step}
    samples: dict = {row: [] for row in steps}
    out = {"rows": rows, "rounds": rounds}
    try:
        ops._LAUNCHES = {}  # this run's plans (and compiled stand-ins) only
        launch_ops._cacheable = lambda kernel: isinstance(kernel, _CachedNoLaunch)
        launch_ops._device_and_stream = lambda: (0, 0)
        for _ in range(rounds):
            for row, step in steps.items():
                configure(row)
                samples[row].append(per_call_us(step, "cpu", rounds=1, round_seconds=round_seconds)["us"])
        for row, values in samples.items():
            out[f"{row}_us"], out[f"{row}_us_min"] = statistics.median(values), min(values)
        configure("triton_python")
        launches.clear()
        bsl_step()
        out["launches_per_call"] = len(launches)
        configure("triton_cached")
        launches.clear()
        runs.clear()
        bsl_step()
        out["cached_runs_per_call"], out["jit_launches_per_cached_call"] = len(runs), len(launches)
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)
        for name, value in saved_launch.items():
            setattr(launch_ops, name, value)
        layer.backend = "torch"
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    import os
    import sys

    if sys.argv[1:] == ["--spike-bytes"]:
        _print_spike_bytes()
    elif sys.argv[1:] == ["--host-cost"]:
        cost = host_cost()
        print(f"BlockSparseLinear 64->64, 16x16 tiles, half kept, x = [{cost['rows']}, 64] fp32, fwd + autograd.grad, "
              f"1 thread, median of {cost['rounds']} interleaved rounds (load average {os.getloadavg()[0]:.2f}):")
        for key, label in (("torch_us", "torch implementation"),
                           ("triton_python_us", f"Triton path, {cost['launches_per_call']} kernel[grid] as no-ops"),
                           ("triton_jit_us", "Triton path, kernel[grid] = Triton's binder + key"),
                           ("triton_cached_us",
                            f"Triton path, {cost['cached_runs_per_call']} cached launches, run() as no-ops"),
                           ("dense_us", "F.linear")):
            print(f"  {label:<52} {cost[key]:8.1f} us  ({cost[key] / cost['dense_us']:.2f}x F.linear)"
                  f"  min {cost[key + '_min']:8.1f} us ({cost[key + '_min'] / cost['dense_us_min']:.2f}x)")
    else:
        sys.exit("usage: python -m effst.benchmarks.sparse --spike-bytes | --host-cost "
                 "(the suite itself runs through 'effst bench sparse')")
