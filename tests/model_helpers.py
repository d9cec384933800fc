"""Model-building helpers shared by the Spikformer, DSP and conversion tests."""
import torch
from torch import nn

from effst.models import build_model, record_firing_rates


def small(name="spikformer-tiny", **kwargs):
    kwargs.setdefault("backend", "reference")
    return build_model(name, **kwargs)


def lively(model, x):
    """Make every neuron layer fire on ``x``, attention included: a fresh network is nearly
    silent (tests on it would compare zeros), so shift the q/k/v BatchNorms up and take the
    running statistics from ``x``. Returns the model in eval mode."""
    with torch.no_grad():
        for block in model.blocks:
            for n in "qkv":
                getattr(block.attn, f"{n}_bn").bias.fill_(1.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # running stats = the statistics of x
        model.train()
        model(x)
    return model.eval()


def attention_rate(model, x):
    """Firing rate of the first attention neuron on ``x``."""
    with torch.no_grad(), record_firing_rates(model) as recorder:
        model(x)
    return recorder.firing_rates()["blocks.0.attn.attn_lif"]
