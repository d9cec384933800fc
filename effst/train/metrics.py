"""What a training run measures: loss and accuracy, parameter counts, firing rates and energy.

Firing rates, SOPs and energy are counted by :mod:`effst.models.activity` (docs/pruning.md: E_AC 0.9 pJ
per synaptic operation on spikes, E_MAC 4.6 pJ per multiply-accumulate of the non-spiking
layers; pruned synapses do no work); this module runs it over a test split.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from effst.data import DataSplit, batches
from effst.train.distributed import DistEnv, all_sum


def reset_states(model: torch.nn.Module) -> None:
    """Reset the membrane state of every spiking neuron (effst's and SpikingJelly's)."""
    from effst.nn import reset

    reset(model)


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA for ``amp`` 'auto'/'bf16'; nothing on CPU unless 'bf16'."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: DataSplit, *, batch_size: int = 256, device: torch.device = torch.device("cpu"),
             amp: str = "auto", env: Optional[DistEnv] = None, workers: int = 0) -> dict:
    """Loss and accuracy of ``model`` on ``split`` (each rank a shard; totals all-reduced)."""
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for x, y in batches(split, batch_size, train=False, rank=rank, world_size=world, num_workers=workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        reset_states(model)
        with autocast_context(device, amp):
            logits = model(x)
        reset_states(model)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train(was_training)
    if env is not None:
        loss_sum, correct, count = all_sum([loss_sum, correct, count], env)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "samples": int(count)}


# ----------------------------------------------------------------------------- sizes
@torch.no_grad()
def parameter_counts(model: torch.nn.Module) -> dict:
    """Parameters of the whole model and of the transformer blocks: stored and non-zero.

    ``total``/``blocks`` count stored parameters (a DSP model is physically smaller);
    ``total_nonzero``/``blocks_nonzero`` leave out the weights pruned to zero (L1P masks).
    "Blocks" is the paper's "Param of the ST blocks": the prune-target matrices q, k, v,
    proj, fc1, fc2 (:func:`effst.models.count_parameters`, the one definition).
    """
    from effst.models import count_parameters

    c = count_parameters(model)
    return {"total": c["total_dense"], "blocks": c["blocks_dense"], "total_nonzero": c["total"],
            "blocks_nonzero": c["blocks"]}


# ----------------------------------------------------------------------------- activity
@torch.no_grad()
def measure_activity(model: torch.nn.Module, split: DataSplit, *, batch_size: int = 256,
                     device: torch.device = torch.device("cpu"), amp: str = "auto",
                     max_batches: Optional[int] = None, workers: int = 0) -> dict:
    """Firing rate of every spiking layer, and SOPs/MACs/energy per sample, on ``split``
    (counted by :func:`effst.models.record_firing_rates`, docs/pruning.md)."""
    from effst.models import record_firing_rates

    was_training = model.training
    model.eval()
    with record_firing_rates(model) as recorder:
        for i, (x, _) in enumerate(batches(split, batch_size, train=False, num_workers=workers)):
            if max_batches is not None and i >= max_batches:
                break
            reset_states(model)
            with autocast_context(device, amp):
                model(x.to(device))
            reset_states(model)
    model.train(was_training)
    s = recorder.summary()
    return {
        "firing_rate": s["firing_rates"],
        "mean_firing_rate": s["mean_firing_rate"],
        "layers": s["layers"],
        "sops": s["sops_per_sample"],
        "macs": s["macs_per_sample"],
        "energy_uj": s["energy_mj_per_sample"] * 1e3,
        "samples": s["samples"],
    }
