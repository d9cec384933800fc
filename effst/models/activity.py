"""Firing rates, synaptic operations and theoretical energy of a spiking model (docs/pruning.md).

:func:`record_firing_rates` hooks a model for the duration of a ``with`` block and counts, over
every forward pass inside it:

- per neuron layer: spikes / (neurons x time steps x samples) — the firing rate;
- per synaptic layer (Linear, Conv1d/2d/3d, any leaf module with ``in_features`` and
  ``out_features`` such as a block-sparse linear, and the two matrix products of each
  Spikformer self-attention): its multiply-accumulates per sample (dense shape, but only
  the non-zero weights, so pruned synapses cost nothing) and the mean value of its input.

A layer fed by spikes (or by sums of spike tensors on the residual stream) does accumulates:
``SOPs = rate x MACs``, which is docs/pruning.md's ``T x fr x FLOPs`` since MACs here are counted over
all T steps. In a Spikformer the encoding conv (``patch_embed.proj_conv``, fed by the image
or frames) and the classifier (``head``, fed by mean features) are multiply-accumulates and
every other layer accumulates. In any other model the first synaptic layer of a forward and
every layer whose input is not made of non-negative integers are multiply-accumulates.
Energy: ``E_AC`` = 0.9 pJ per SOP, ``E_MAC`` = 4.6 pJ per MAC.

For self-attention ``q k^T`` an accumulate happens for each query spike (rate of ``q_lif``),
and for ``attn v`` for each value spike (rate of ``v_lif``); each product counts
``T·B·N·N·W`` MACs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from effst.nn.neuron_kinds import is_spiking_neuron
from effst.models.spikformer import SSA, effective_weight, unwrap

#: Energy per accumulate (synaptic operation on a spike) and per multiply-accumulate, in pJ.
E_AC_PJ = 0.9
E_MAC_PJ = 4.6


@dataclass
class _Synaptic:
    kind: str
    macs: float = 0.0          # summed over calls (all T steps and samples)
    input_sum: float = 0.0     # summed input values (= events for spike inputs)
    input_numel: float = 0.0
    spiking: bool = True       # every call so far had an integer-valued, non-encoding input
    order: int = 0


@dataclass
class _Neuron:
    spikes: float = 0.0
    numel: float = 0.0
    last_rate: float = 0.0
    order: int = 0


@dataclass
class FiringRateRecorder:
    """What :func:`record_firing_rates` collected; read it after (or inside) the ``with``."""

    samples: int = 0
    neurons: dict[str, _Neuron] = field(default_factory=dict)
    synaptic: dict[str, _Synaptic] = field(default_factory=dict)
    _first_layer_pending: bool = False

    def firing_rates(self) -> dict[str, float]:
        """Firing rate of every neuron layer that ran, in forward order."""
        items = sorted(self.neurons.items(), key=lambda item: item[1].order)
        return {name: (n.spikes / n.numel if n.numel else 0.0) for name, n in items if n.numel}

    def mean_firing_rate(self) -> float:
        """All spikes over all neuron-steps of the model."""
        numel = sum(n.numel for n in self.neurons.values())
        return sum(n.spikes for n in self.neurons.values()) / numel if numel else 0.0

    def layers(self) -> list[dict[str, Any]]:
        """Per synaptic layer: MACs and SOPs per sample, input rate, energy per sample (pJ)."""
        if self.samples == 0:
            return []
        rows = []
        for name, s in sorted(self.synaptic.items(), key=lambda item: item[1].order):
            if s.input_numel == 0:
                continue
            rate = s.input_sum / s.input_numel
            macs = s.macs / self.samples
            sops = rate * macs if s.spiking else 0.0
            energy = sops * E_AC_PJ if s.spiking else macs * E_MAC_PJ
            rows.append({"name": name, "kind": s.kind, "spiking_input": s.spiking, "input_rate": rate,
                         "macs_per_sample": macs, "sops_per_sample": sops, "energy_pj_per_sample": energy})
        return rows

    def summary(self) -> dict[str, Any]:
        """Everything in one JSON-serialisable dict (firing rates, layers, totals, energy)."""
        layers = self.layers()
        sops = sum(row["sops_per_sample"] for row in layers)
        macs = sum(row["macs_per_sample"] for row in layers if not row["spiking_input"])
        energy_pj = sops * E_AC_PJ + macs * E_MAC_PJ
        return {"samples": self.samples, "firing_rates": self.firing_rates(),
                "mean_firing_rate": self.mean_firing_rate(), "layers": layers,
                "sops_per_sample": sops, "macs_per_sample": macs,
                "energy_mj_per_sample": energy_pj * 1e-9, "e_ac_pj": E_AC_PJ, "e_mac_pj": E_MAC_PJ}


def _is_synaptic(module: nn.Module) -> Optional[str]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if (len(module._modules) == 0 and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)):
        return "linear"
    return None


def _spike_like(x: torch.Tensor) -> bool:
    return bool(((x >= 0) & (x == torch.round(x))).all())


@contextmanager
def record_firing_rates(model: nn.Module, *, batch_dim: int = 0) -> Iterator[FiringRateRecorder]:
    """Record firing rates and synaptic operations of ``model`` inside a ``with`` block.

    Args:
        model: any module (a Spikformer, possibly DDP-wrapped, or a SpikingJelly network).
        batch_dim: dim of the model's first input that counts samples (0 for a Spikformer's
            ``[B, ...]``; 1 for a network fed ``[T, B, ...]``).

    Yields:
        A :class:`FiringRateRecorder`; ``recorder.summary()`` has per-layer firing rates,
        SOPs, MACs and energy per sample. Hooks are removed when the block exits.
    """
    recorder = FiringRateRecorder()
    handles = []
    try:
        _, prefix = unwrap(model)
        mac_layers: Optional[set[str]] = {f"{prefix}patch_embed.proj_conv", f"{prefix}head"}
    except TypeError:
        mac_layers = None  # not a Spikformer: decide from the inputs
    counter = iter(range(1 << 62))

    def on_model_input(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() > batch_dim:
            recorder.samples += int(x.shape[batch_dim])
        recorder._first_layer_pending = True

    def neuron_hook(name):
        def hook(module, inputs, output):
            spikes = output[0] if isinstance(output, tuple) else output
            if not isinstance(spikes, torch.Tensor):
                return
            record = recorder.neurons.setdefault(name, _Neuron(order=next(counter)))
            count = float(spikes.detach().sum(dtype=torch.float64))
            record.spikes += count
            record.numel += spikes.numel()
            record.last_rate = count / spikes.numel() if spikes.numel() else 0.0
        return hook

    def synaptic_hook(name, kind):
        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            record = recorder.synaptic.setdefault(name, _Synaptic(kind, order=next(counter)))
            with torch.no_grad():
                nnz = float(torch.count_nonzero(effective_weight(module).detach()))
                out_features = output.shape[1] if kind == "conv" else output.shape[-1]
                positions = output.numel() / max(out_features, 1)
                record.macs += positions * nnz
                record.input_sum += float(x.detach().sum(dtype=torch.float64))
                record.input_numel += x.numel()
                encoding = recorder._first_layer_pending
                recorder._first_layer_pending = False
                if mac_layers is not None:
                    record.spiking = name not in mac_layers
                elif encoding or not _spike_like(x.detach()):
                    record.spiking = False
        return hook

    def attention_hook(name, module_names):
        q_name, v_name = module_names

        def hook(module, inputs, output):
            x = inputs[0]
            T, B = x.shape[:2]
            tokens = x.shape[-1] if module.channel_first else x.shape[-2]
            width = module.q_linear.weight.shape[0] if hasattr(module.q_linear, "weight") \
                else module.q_linear.out_features
            macs = float(T * B * tokens * tokens * width)
            for suffix, source in (("qk", q_name), ("av", v_name)):
                record = recorder.synaptic.setdefault(f"{name}.{suffix}", _Synaptic("matmul", order=next(counter)))
                neuron = recorder.neurons.get(source)
                rate = neuron.last_rate if neuron is not None else 0.0
                record.macs += macs
                # The product's "input" is the spike tensor whose events trigger accumulates.
                record.input_sum += rate * T * B * tokens * width
                record.input_numel += T * B * tokens * width
        return hook

    handles.append(model.register_forward_pre_hook(on_model_input))
    for name, module in model.named_modules():
        if is_spiking_neuron(module):
            handles.append(module.register_forward_hook(neuron_hook(name)))
        elif isinstance(module, SSA):
            prefix = f"{name}." if name else ""
            handles.append(module.register_forward_hook(
                attention_hook(name, (f"{prefix}q_lif", f"{prefix}v_lif"))))
        else:
            kind = _is_synaptic(module)
            if kind is not None:
                handles.append(module.register_forward_hook(synaptic_hook(name, kind)))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["record_firing_rates", "FiringRateRecorder", "E_AC_PJ", "E_MAC_PJ"]
