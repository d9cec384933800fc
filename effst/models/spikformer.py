"""Spikformer (Zhou et al. 2023) as the sLIF/DSP paper uses it (docs/pruning.md).

Data flow: an image ``[B, C, H, W]`` is repeated over T (DVS frames ``[B, T, C, H, W]`` are
used as they are) -> Spiking Patch Splitting (four Conv3x3-BN-LIF stages, max-pools, a
relative-position conv added to the features) -> ``depth`` blocks of
``x = x + SSA(x); x = x + MLP(x)`` -> mean over tokens and T -> Linear head.

Two memory layouts share one implementation. The CIFAR10 / ImageNet variants keep tokens as
``[T, B, N, D]`` and project with ``nn.Linear``; the CIFAR10-DVS variant keeps channels
first, ``[T, B, D, N]``, and projects with bias-free ``nn.Conv1d(kernel_size=1)`` as the
original code does. Module names are a contract with the pruning code and the pipeline:
``blocks[i].attn.{q,k,v,proj}_linear`` and ``blocks[i].mlp.{fc1,fc2}`` (see
:func:`prune_targets`).

The spiking neuron is chosen by name: ``lif``, ``plif``, ``slif``, ``stl`` (threshold only)
from :mod:`effst.nn`, or ``spikingjelly`` (the peer's own ``LIFNode``, for comparison). Every
neuron is built with the paper's settings (tau 2, hard reset to 0, detach_reset, V_th 1 or 0.5
for the attention neuron, sigmoid surrogate with alpha 4) and carries its channel count and
channel dim (``neuron.effst_channels``, ``neuron.effst_channel_dim``) so that
:func:`effst.convert` and :func:`effst.prune.dsp` can make or keep it per-channel.

Weight matrices may have their widths changed by DSP: the attention width (``attn_dim``) and
the MLP width (``hidden``) live in :class:`SpikformerConfig`, so a pruned model can be rebuilt
from ``model.spec()`` and its state_dict loaded.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from effst.nn.neuron_kinds import is_spiking_neuron
from effst.nn.weight_counts import weight_counts, weight_mask
from effst.nn import LIF, PLIF, SLIF
from effst.ops.slif import BACKENDS
from effst.nn.token_routing import TokenRoute, run_neuron_on_tokens
from effst.models.token_selection import DEFAULT_KEEP_RATIO, SELECTORS, TokenSelection, TokenSelector, distillation_loss
from effst.models.token_selection import dataclass_from_dict, dataclass_to_dict

#: Neuron kinds :func:`build_model` accepts. ``spikingjelly`` is the installed SpikingJelly's
#: ``LIFNode(step_mode='m')`` (2.0.0 picks its own kernels); ``spikingjelly-cupy`` is
#: 0.0.0.0.x's ``LIFNode(step_mode='m', backend='cupy')``, the benchmark peer on a GPU.
NEURONS: tuple[str, ...] = ("lif", "plif", "slif", "stl", "spikingjelly", "spikingjelly-cupy")
#: Architecture variants: the CIFAR10 stem (two max-pools), DVS and ImageNet (four max-pools).
VARIANTS: tuple[str, ...] = ("cifar", "dvs", "imagenet")

# docs/pruning.md: the neuron everywhere, and the attention neuron's threshold.
NEURON_TAU = 2.0
NEURON_V_THRESHOLD = 1.0
ATTENTION_V_THRESHOLD = 0.5
NEURON_V_RESET = 0.0
NEURON_SURROGATE = "sigmoid"
NEURON_ALPHA = 4.0

# Channel dim of the per-step shape ([B, ...]) that each neuron sees.
CONV_CHANNEL_DIM = -3      # [B, C, H, W] after a Conv2d
TOKEN_CHANNEL_DIM = -1     # [B, N, D] (token layout)
CHANNEL_FIRST_DIM = -2     # [B, D, N] (DVS channel-first layout)


@dataclass(frozen=True)
class SpikformerConfig:
    """Shape of a Spikformer. ``dim`` is the embedding width D of the residual stream.

    ``attn_dim`` is the width of q/k/v (and of the projection's input): None means D; DSP
    shrinks it to a multiple of ``heads``. ``hidden`` is the MLP width. ``pool_after`` lists
    the SPS stages (0..3) followed by ``MaxPool2d(3, 2, 1)``; None means the variant's default
    (cifar: stages 2 and 3; dvs and imagenet: all four).
    """

    depth: int
    dim: int
    heads: int
    hidden: int
    T: int
    image_size: int
    in_channels: int
    num_classes: int
    variant: str = "cifar"
    attn_dim: Optional[int] = None
    attn_scale: float = 0.125
    pool_after: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        for name in ("depth", "dim", "heads", "hidden", "T", "image_size", "in_channels", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {self.variant!r}")
        if self.dim % 8 != 0:
            raise ValueError(f"dim: expected a multiple of 8 (the SPS stem widths are D/8, D/4, D/2), got {self.dim}")
        width = self.width
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"attn_dim: expected None or a positive int, got {self.attn_dim!r}")
        if width % self.heads != 0:
            raise ValueError(f"attn_dim: the attention width {width} must be a multiple of heads={self.heads}")
        if isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)) \
                or not math.isfinite(self.attn_scale) or self.attn_scale <= 0:
            raise ValueError(f"attn_scale: expected a positive float, got {self.attn_scale!r}")
        if self.pool_after is not None:
            pools = tuple(self.pool_after)
            if any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 3 for p in pools) \
                    or len(set(pools)) != len(pools):
                raise ValueError(f"pool_after: expected distinct SPS stage indices in 0..3, got {self.pool_after!r}")
            object.__setattr__(self, "pool_after", tuple(sorted(pools)))

    @property
    def width(self) -> int:
        """Attention width (q/k/v output size): ``attn_dim`` or, when None, ``dim``."""
        return self.dim if self.attn_dim is None else self.attn_dim

    @property
    def mlp_ratio(self) -> float:
        """``hidden / dim`` (4 for every paper config before pruning)."""
        return self.hidden / self.dim

    @property
    def pools(self) -> tuple[int, ...]:
        """SPS stages followed by a max-pool (the resolved ``pool_after``)."""
        if self.pool_after is not None:
            return self.pool_after
        return (2, 3) if self.variant == "cifar" else (0, 1, 2, 3)

    @property
    def channel_first(self) -> bool:
        """True for the DVS variant: ``[T, B, D, N]`` activations and Conv1d projections."""
        return self.variant == "dvs"

    def tokens(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        """Number of tokens N for an input of the given size (default ``image_size``)."""
        h = self.image_size if height is None else height
        w = self.image_size if width is None else width
        for _ in self.pools:
            h, w = (h + 1) // 2, (w + 1) // 2  # MaxPool2d(3, stride 2, padding 1)
        return h * w

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for checkpoints and reports)."""
        return dataclass_to_dict(self, ("pool_after",))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpikformerConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (``__post_init__`` makes
        ``pool_after`` a tuple)."""
        return dataclass_from_dict(cls, data, "config", ("pool_after",))


#: The paper's architectures (docs/pruning.md) and a small one for the embedded digits data
#: (8x8 grey images; one max-pool gives 4x4 = 16 tokens).
CONFIGS: dict[str, SpikformerConfig] = {
    "spikformer-4-384": SpikformerConfig(depth=4, dim=384, heads=12, hidden=1536, T=4, image_size=32,
                                         in_channels=3, num_classes=10, variant="cifar"),
    "spikformer-2-256": SpikformerConfig(depth=2, dim=256, heads=16, hidden=1024, T=16, image_size=128,
                                         in_channels=2, num_classes=10, variant="dvs", attn_scale=0.25),
    "spikformer-8-512": SpikformerConfig(depth=8, dim=512, heads=8, hidden=2048, T=4, image_size=224,
                                         in_channels=3, num_classes=1000, variant="imagenet"),
    "spikformer-tiny": SpikformerConfig(depth=1, dim=32, heads=4, hidden=128, T=4, image_size=8,
                                        in_channels=1, num_classes=10, variant="cifar", pool_after=(2,)),
}


# --------------------------------------------------------------------------- neurons
def make_neuron(kind: str, *, channels: int, channel_dim: int, v_threshold: float = NEURON_V_THRESHOLD,
                per_channel: bool = True, backend: str = "auto") -> nn.Module:
    """One multi-step spiking neuron with the paper's settings (docs/pruning.md).

    ``channels``/``channel_dim`` describe the input it will see; sLIF/STL neurons use them for
    per-channel parameters when ``per_channel``; every kind records them as
    ``effst_channels``/``effst_channel_dim`` for later conversion and pruning.
    """
    common = dict(tau=NEURON_TAU, v_threshold=float(v_threshold), v_reset=NEURON_V_RESET,
                  surrogate=NEURON_SURROGATE, alpha=NEURON_ALPHA, detach_reset=True, decay_input=True)
    if kind == "lif":
        node = LIF(**common, backend=backend)
    elif kind == "plif":
        node = PLIF(**common, backend=backend)
    elif kind in ("slif", "stl"):
        node = SLIF(**common, learn_tau=kind == "slif", learn_threshold=True,
                    channels=channels if per_channel else None, channel_dim=channel_dim, backend=backend)
    elif kind in ("spikingjelly", "spikingjelly-cupy"):
        try:
            from spikingjelly.activation_based import neuron as sj_neuron, surrogate as sj_surrogate
        except ImportError as error:  # pragma: no cover - spikingjelly is a test dependency
            raise ImportError(f"neuron={kind!r} needs SpikingJelly (pip install spikingjelly)") from error
        extra = {}
        if kind == "spikingjelly-cupy":
            if "backend" not in inspect.signature(sj_neuron.LIFNode.__init__).parameters:
                raise ValueError("neuron='spikingjelly-cupy' needs SpikingJelly 0.0.0.0.x (its LIFNode takes "
                                 "backend='cupy'); the installed SpikingJelly has no backend argument")
            extra["backend"] = "cupy"
        node = sj_neuron.LIFNode(tau=NEURON_TAU, decay_input=True, v_threshold=float(v_threshold),
                                 v_reset=NEURON_V_RESET,
                                 surrogate_function=sj_surrogate.Sigmoid(alpha=NEURON_ALPHA),
                                 detach_reset=True, step_mode="m", **extra)
    else:
        raise ValueError(f"neuron: expected one of {list(NEURONS)}, got {kind!r}")
    node.effst_channels = int(channels)
    node.effst_channel_dim = int(channel_dim)
    return node


def _bn_over_last(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d over the last dim of ``[M, N, C]`` (token layout)."""
    return bn(x.transpose(-1, -2)).transpose(-1, -2)


class _Builder:
    """What every submodule needs to build its neurons."""

    def __init__(self, neuron: str, per_channel: bool, backend: str):
        self.neuron = neuron
        self.per_channel = per_channel
        self.backend = backend

    def __call__(self, channels: int, channel_dim: int, v_threshold: float = NEURON_V_THRESHOLD) -> nn.Module:
        return make_neuron(self.neuron, channels=channels, channel_dim=channel_dim, v_threshold=v_threshold,
                           per_channel=self.per_channel, backend=self.backend)


# --------------------------------------------------------------------------- modules
class SPS(nn.Module):
    """Spiking Patch Splitting: ``[T, B, C, H, W]`` -> tokens ``[T, B, N, D]`` (or ``[T, B, D, N]``)."""

    def __init__(self, config: SpikformerConfig, neuron: _Builder):
        super().__init__()
        d = config.dim
        widths = (config.in_channels, d // 8, d // 4, d // 2, d)
        self.pools = config.pools
        self.channel_first = config.channel_first
        # Original Spikformer names: proj_conv, proj_conv1, proj_conv2, proj_conv3.
        for stage in range(4):
            suffix = "" if stage == 0 else str(stage)
            setattr(self, f"proj_conv{suffix}",
                    nn.Conv2d(widths[stage], widths[stage + 1], kernel_size=3, padding=1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(widths[stage + 1]))
            setattr(self, f"proj_lif{suffix}", neuron(widths[stage + 1], CONV_CHANNEL_DIM))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(d)
        self.rpe_lif = neuron(d, CONV_CHANNEL_DIM)

    def stage(self, index: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]:
        """(conv, bn, neuron) of SPS stage ``index`` in 0..3."""
        suffix = "" if index == 0 else str(index)
        return (getattr(self, f"proj_conv{suffix}"), getattr(self, f"proj_bn{suffix}"),
                getattr(self, f"proj_lif{suffix}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        x = x.flatten(0, 1)
        for index in range(4):
            conv, bn, lif = self.stage(index)
            x = bn(conv(x))
            x = lif(x.reshape(T, B, *x.shape[1:])).flatten(0, 1)
            if index in self.pools:
                x = self.maxpool(x)
        feature = x
        x = self.rpe_bn(self.rpe_conv(x))
        x = self.rpe_lif(x.reshape(T, B, *x.shape[1:])).flatten(0, 1) + feature
        x = x.reshape(T, B, x.shape[1], -1)  # [T, B, D, N]
        return x if self.channel_first else x.transpose(-1, -2).contiguous()


def _projection(in_features: int, out_features: int, channel_first: bool) -> nn.Module:
    """Linear with bias (token layout) or bias-free Conv1d k=1 (channel-first DVS layout)."""
    if channel_first:
        return nn.Conv1d(in_features, out_features, kernel_size=1, bias=False)
    return nn.Linear(in_features, out_features)


def _fire(neuron: nn.Module, current: torch.Tensor, route: Optional[TokenRoute]) -> torch.Tensor:
    """Run ``neuron`` on ``current``; with a ``route`` (STATA: kept tokens differ per timestep) the
    membrane follows the token identity instead of the compact slot."""
    if route is None:
        return neuron(current)
    return run_neuron_on_tokens(neuron, current, route)   # one route per selection: slots computed once


class _Projector(nn.Module):
    """Shared forward of a projection -> BatchNorm1d -> neuron stack in either layout."""

    channel_first: bool

    def _project(self, x: torch.Tensor, layer: nn.Module, bn: nn.Module) -> torch.Tensor:
        T, B = x.shape[:2]
        y = layer(x.flatten(0, 1))
        y = bn(y) if self.channel_first else _bn_over_last(bn, y)
        return y.reshape(T, B, *y.shape[1:])


class SSA(_Projector):
    """Spiking self-attention: q/k/v = proj -> BN -> LIF, ``attn = q k^T * scale``, ``x = attn v``,
    attention LIF (V_th 0.5), then proj -> BN -> LIF back to D."""

    def __init__(self, config: SpikformerConfig, neuron: _Builder):
        super().__init__()
        d, width = config.dim, config.width
        self.heads = config.heads
        self.scale = float(config.attn_scale)
        self.channel_first = config.channel_first
        cdim = CHANNEL_FIRST_DIM if self.channel_first else TOKEN_CHANNEL_DIM
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_linear", _projection(d, width, self.channel_first))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(width))
            setattr(self, f"{name}_lif", neuron(width, cdim))
        self.attn_lif = neuron(width, cdim, v_threshold=ATTENTION_V_THRESHOLD)
        self.proj_linear = _projection(width, d, self.channel_first)
        self.proj_bn = nn.BatchNorm1d(d)
        self.proj_lif = neuron(d, cdim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, N, W]`` (or ``[T, B, W, N]``) -> ``[T, B, heads, N, W/heads]``."""
        if self.channel_first:
            x = x.transpose(-1, -2)
        T, B, N, width = x.shape
        return x.reshape(T, B, N, self.heads, width // self.heads).transpose(2, 3)

    def forward(self, x: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
                route: Optional[TokenRoute] = None, details: bool = False):
        """``key_mask`` ``[B, N]`` (0/1, may carry a straight-through gradient): SparseSpikformer's
        training mask ``A'_ij = A_ij (d_j + (1 - d_j) delta_ij)``. ``route``: the token identities
        of a compact input whose kept set differs per timestep (see :func:`_fire`).
        ``details=True`` returns ``(output, scores, queries, keys)``: the attention scores
        ``q k^T * scale`` ``[T, B, heads, N, N]`` (before the attention neuron) and the query and
        key spikes ``[T, B, N, W]`` (token layout)."""
        q = _fire(self.q_lif, self._project(x, self.q_linear, self.q_bn), route)
        k = _fire(self.k_lif, self._project(x, self.k_linear, self.k_bn), route)
        v = _fire(self.v_lif, self._project(x, self.v_linear, self.v_bn), route)
        width = q.shape[-2] if self.channel_first else q.shape[-1]
        if width % self.heads != 0:
            raise ValueError(f"attention width {width} is not a multiple of heads={self.heads}")
        queries, keys = q, k
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        scores = attn
        if key_mask is not None:
            n = attn.shape[-1]
            eye = torch.eye(n, dtype=attn.dtype, device=attn.device)
            keep = key_mask.to(attn.dtype)[:, None, :]                # [B, 1, N] over keys j
            attn = attn * (keep + (1 - keep) * eye)[None, :, None]    # keep the diagonal
        y = attn @ v  # [T, B, heads, N, W/heads]
        T, B, _, N, _ = y.shape
        y = y.transpose(2, 3).reshape(T, B, N, width)
        if self.channel_first:
            y = y.transpose(-1, -2)
        y = _fire(self.attn_lif, y.contiguous(), route)
        out = _fire(self.proj_lif, self._project(y, self.proj_linear, self.proj_bn), route)
        return (out, scores, queries, keys) if details else out


class MLP(_Projector):
    """fc1 -> BN -> LIF -> fc2 -> BN -> LIF (Linear, or Conv1d k=1 in the DVS layout)."""

    def __init__(self, config: SpikformerConfig, neuron: _Builder):
        super().__init__()
        d, hidden = config.dim, config.hidden
        self.channel_first = config.channel_first
        cdim = CHANNEL_FIRST_DIM if self.channel_first else TOKEN_CHANNEL_DIM
        self.fc1 = _projection(d, hidden, self.channel_first)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = neuron(hidden, cdim)
        self.fc2 = _projection(hidden, d, self.channel_first)
        self.fc2_bn = nn.BatchNorm1d(d)
        self.fc2_lif = neuron(d, cdim)

    def forward(self, x: torch.Tensor, *, route: Optional[TokenRoute] = None) -> torch.Tensor:
        x = _fire(self.fc1_lif, self._project(x, self.fc1, self.fc1_bn), route)
        return _fire(self.fc2_lif, self._project(x, self.fc2, self.fc2_bn), route)


class Block(nn.Module):
    """One spiking transformer block: ``x = x + SSA(x); x = x + MLP(x)``."""

    def __init__(self, config: SpikformerConfig, neuron: _Builder):
        super().__init__()
        self.attn = SSA(config, neuron)
        self.mlp = MLP(config, neuron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Spikformer(nn.Module):
    """Spikformer classifier. Input ``[B, C, H, W]`` (repeated over T) or ``[B, T, C, H, W]``
    (frames); output logits ``[B, num_classes]``.

    The membrane state of every neuron is reset at the start and at the end of each forward,
    so a call never depends on the previous one and no final state holds on to the autograd
    graph (calling ``reset_net`` afterwards, as training loops do, is harmless).
    """

    def __init__(self, config: SpikformerConfig, neuron: str = "lif", *, channels: bool = True,
                 backend: str = "auto", token_selection: Optional[TokenSelection] = None):
        super().__init__()
        if not isinstance(config, SpikformerConfig):
            raise TypeError(f"config: expected a SpikformerConfig, got {type(config).__name__}")
        if token_selection is not None and not isinstance(token_selection, TokenSelection):
            raise TypeError(f"token_selection: expected a TokenSelection or None, got {type(token_selection).__name__}")
        if token_selection is not None and config.channel_first:
            raise ValueError("token_selector: token selection needs the token layout [T, B, N, D]; "
                             f"variant={config.variant!r} keeps channels first")
        if neuron not in NEURONS:
            raise ValueError(f"neuron: expected one of {list(NEURONS)}, got {neuron!r}")
        if not isinstance(channels, bool):
            raise TypeError(f"channels: expected a bool, got {type(channels).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        self.config = config
        self.neuron = neuron
        self.channels = channels
        self.backend = backend
        self._last_tokens: Optional[int] = None
        build = _Builder(neuron, channels, backend)
        self.patch_embed = SPS(config, build)
        self.blocks = nn.ModuleList(Block(config, build) for _ in range(config.depth))
        self.head = nn.Linear(config.dim, config.num_classes)
        self.selector = None if token_selection is None else TokenSelector(
            token_selection, depth=config.depth, dim=config.dim, T=config.T, heads=config.heads)
        self.apply(_init_weights)

    @property
    def token_selection(self) -> Optional[TokenSelection]:
        """The token selector's options (block lists resolved), or None for the dense model."""
        return None if self.selector is None else self.selector.selection

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Weighted auxiliary loss terms of the last forward (add their sum to the task loss):
        ``'ratio'`` (STS, training), ``'intra_alignment'``/``'inter_alignment'`` (STATA,
        training). Empty for the dense model and the random controls. STS's distillation needs
        a teacher: :meth:`set_teacher` adds it here as ``'distillation'``."""
        return {} if self.selector is None else dict(self.selector.losses)

    def tokens_per_block(self) -> list[float]:
        """Image tokens each block's attention saw in the last forward (mean per sample and
        timestep; the anchor not counted)."""
        if self.selector is None:
            return [float(self.config.tokens())] * self.config.depth if self._last_tokens is None \
                else [float(self._last_tokens)] * self.config.depth
        return [float(t) for t in self.selector.tokens]

    @property
    def T(self) -> int:
        """Number of time steps."""
        return self.config.T

    def spec(self) -> dict[str, Any]:
        """Everything :func:`build_model_from_spec` needs to rebuild this architecture
        (JSON-serialisable; load the state_dict into the result)."""
        spec = {"config": self.config.to_dict(), "neuron": self.neuron, "channels": self.channels,
                "backend": self.backend}
        if self.selector is not None:
            spec["token_selection"] = self.selector.selection.to_dict()
        return spec

    def on_neurons_converted(self, neuron: str, channels: bool, backend: Optional[str]) -> None:
        """Called by :func:`effst.convert` after it replaced the neurons, so ``spec()`` stays true."""
        self.neuron, self.channels = neuron, channels
        if backend is not None:
            self.backend = backend

    def neurons(self) -> Iterator[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every spiking neuron, in forward order."""
        for name, module in self.named_modules():
            if is_spiking_neuron(module):
                yield name, module

    def reset(self) -> None:
        """Reset the membrane state of every neuron."""
        for _, module in self.neurons():
            module.reset()

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input and return it as ``[T, B, C, H, W]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        c = self.config.in_channels
        if x.dim() == 4:
            if x.shape[1] != c:
                raise ValueError(f"x: expected [B, {c}, H, W] images, got shape {tuple(x.shape)}")
            return x.unsqueeze(0).expand(self.T, *x.shape)
        if x.dim() == 5:
            if x.shape[1] != self.T or x.shape[2] != c:
                raise ValueError(f"x: expected [B, T={self.T}, {c}, H, W] frames, got shape {tuple(x.shape)}")
            return x.transpose(0, 1)
        raise ValueError(f"x: expected [B, {c}, H, W] images or [B, T={self.T}, {c}, H, W] frames, "
                         f"got shape {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean spike features ``[B, D]`` (before the head)."""
        self.reset()
        x = self.patch_embed(self.time_major(x))
        if self.selector is not None:
            return self.selector(self.blocks, x)
        self._last_tokens = x.shape[3 if self.config.channel_first else 2]
        for block in self.blocks:
            x = block(x)
        token_dim = 3 if self.config.channel_first else 2
        return x.mean(dim=token_dim).mean(dim=0)

    def set_teacher(self, teacher: Optional[nn.Module]) -> None:
        """STS distillation: in training, every forward also runs ``teacher`` (the dense model,
        eval mode, no gradient, same device) and adds ``distill_weight * KL(teacher || student)``
        to :meth:`auxiliary_losses` as ``'distillation'``. The teacher is not a submodule: it is
        neither saved with the model nor trained. ``None`` removes it."""
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher: expected an nn.Module or None, got {type(teacher).__name__}")
        if teacher is not None and (self.selector is None or self.selector.selection.family != "sts"):
            raise ValueError("teacher: distillation is part of STS training; this model has no STS selector")
        if teacher is self:
            # Running the student as its own teacher would switch it to eval mode mid-training.
            raise ValueError("teacher: expected a separate (dense) model, got the student itself")
        self.__dict__["_teacher"] = teacher    # bypasses nn.Module registration on purpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            logits = self.head(self.forward_features(x))
        finally:
            self.reset()
        teacher = self.__dict__.get("_teacher")
        if teacher is not None and self.training and self.selector.selection.distill_weight > 0:
            teacher.eval()
            with torch.no_grad():
                target = teacher(x)
            self.selector.losses["distillation"] = self.selector.selection.distill_weight * \
                distillation_loss(logits, target)
        return logits


def _init_weights(module: nn.Module) -> None:
    # As the original code: truncated normal (std 0.02) for Linear layers; PyTorch defaults
    # for convolutions; BatchNorm starts at identity.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- public helpers
def build_model(name: Union[str, SpikformerConfig], *, neuron: str = "lif", num_classes: Optional[int] = None,
                T: Optional[int] = None, backend: str = "auto", channels: bool = True,
                token_selector: Optional[str] = None, keep_ratio: Optional[float] = None,
                token_options: Optional[dict[str, Any]] = None, **overrides: Any) -> Spikformer:
    """Build a Spikformer from a named config (``CONFIGS``) or a :class:`SpikformerConfig`.

    Args:
        name: ``'spikformer-4-384'`` (CIFAR10), ``'spikformer-2-256'`` (CIFAR10-DVS),
            ``'spikformer-8-512'`` (ImageNet), ``'spikformer-tiny'`` (8x8 digits), or a config.
        neuron: ``'lif'``, ``'plif'``, ``'slif'``, ``'stl'`` or ``'spikingjelly'``.
        num_classes, T: override the config's values.
        backend: sLIF backend of the effst neurons ('auto', 'reference', 'triton', 'native').
        channels: per-channel tau/V_th for ``slif``/``stl`` neurons (else per layer).
        token_selector: None (dense), ``'sts'`` (SparseSpikformer), ``'stata'``, or the random
            controls ``'sts-random'`` / ``'stata-random'`` (docs/token_sparsity.md).
        keep_ratio: rho for STS (site i keeps floor(N rho^i)), gamma for STATA (each pruning
            block keeps floor(gamma n)); None: 0.7 for STS, 0.5 for STATA.
        token_options: other :class:`~effst.models.token_selection.TokenSelection` fields
            (mode, sts_blocks, gumbel_tau, ratio_weight, distill_weight, stata_blocks,
            align_blocks, intra_weight, inter_weight, anchor_init).
        overrides: any other :class:`SpikformerConfig` field (depth, dim, heads, hidden,
            attn_dim, image_size, in_channels, variant, attn_scale, pool_after).
    """
    if isinstance(name, SpikformerConfig):
        config = name
    elif isinstance(name, str):
        if name not in CONFIGS:
            raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
        config = CONFIGS[name]
    else:
        raise TypeError(f"name: expected a config name or a SpikformerConfig, got {type(name).__name__}")
    known = {f.name for f in fields(SpikformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"build_model: unknown arguments {unknown}; config fields are {sorted(known)}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if T is not None:
        overrides["T"] = T
    if overrides:
        config = replace(config, **overrides)
    selection = None
    if token_selector is not None:
        if token_selector not in SELECTORS:
            raise ValueError(f"token_selector: expected None or one of {list(SELECTORS)}, got {token_selector!r}")
        if token_options is not None and not isinstance(token_options, dict):
            raise TypeError(f"token_options: expected a dict of TokenSelection fields or None, "
                            f"got {type(token_options).__name__}")
        options = dict(token_options or {})
        if "selector" in options or "keep_ratio" in options:
            raise TypeError("token_options: pass the selector and keep ratio as token_selector= and keep_ratio=")
        ratio = DEFAULT_KEEP_RATIO[token_selector] if keep_ratio is None else keep_ratio
        selection = TokenSelection.from_dict({"selector": token_selector, "keep_ratio": ratio, **options})
    elif keep_ratio is not None or token_options:
        raise ValueError("keep_ratio/token_options: only meaningful with a token_selector")
    return Spikformer(config, neuron, channels=channels, backend=backend, token_selection=selection)


def build_model_from_spec(spec: dict[str, Any]) -> Spikformer:
    """Rebuild the architecture described by :meth:`Spikformer.spec` (weights not included)."""
    if not isinstance(spec, dict) or "config" not in spec:
        raise ValueError("spec: expected the dict returned by Spikformer.spec() (with a 'config' entry)")
    config = SpikformerConfig.from_dict(spec["config"])
    selection = spec.get("token_selection")
    return Spikformer(config, spec.get("neuron", "lif"), channels=spec.get("channels", True),
                      backend=spec.get("backend", "auto"),
                      token_selection=None if selection is None else TokenSelection.from_dict(selection))


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The Spikformer inside DDP / DataParallel / torch.compile wrappers, and its name prefix."""
    prefix = ""
    while not isinstance(model, Spikformer):
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model, prefix = model.module, prefix + "module."
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            raise TypeError(f"model: expected a Spikformer (possibly wrapped by DDP or torch.compile), "
                            f"got {type(model).__name__}")
    return model, prefix


ATTENTION_TARGETS = ("q_linear", "k_linear", "v_linear", "proj_linear")
MLP_TARGETS = ("fc1", "fc2")


def prune_targets(model: nn.Module) -> list[str]:
    """Qualified names of the weight matrices the paper prunes: per block q, k, v, proj
    (SSA) and fc1, fc2 (MLP), in that order."""
    inner, prefix = unwrap(model)
    names = []
    for i in range(len(inner.blocks)):
        names += [f"{prefix}blocks.{i}.attn.{n}" for n in ATTENTION_TARGETS]
        names += [f"{prefix}blocks.{i}.mlp.{n}" for n in MLP_TARGETS]
    return names


def _weight_tensor(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}: cannot find its weight (expected .weight or .to_dense())")
    return weight


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a projection computes with (masks applied; block-sparse densified)."""

    to_dense = getattr(module, "to_dense", None)
    if callable(to_dense):
        return to_dense()
    weight = _weight_tensor(module)
    mask = weight_mask(module)
    if mask is not None:
        weight = weight * mask.to(weight.dtype)  # idempotent where .weight is already masked
    return weight


def _storage(module: nn.Module) -> set[int]:
    """Ids of the parameters that store a projection's weight (not its bias)."""
    if callable(getattr(module, "to_dense", None)):   # block-sparse: the stored tiles are the weight
        return {id(p) for name, p in module.named_parameters() if name != "bias"}
    return {id(p) for name, p in module.named_parameters()
            if name in ("weight", "weight_orig") or name.endswith("weight.original")}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts, with pruned synapses not counted.

    A synapse is pruned when its layer's mask says so (a ``*mask`` buffer shaped like the
    weight, as effst's L1P and torch.nn.utils.prune keep) or, for a block-sparse layer, when it
    lies outside the kept tiles. A dense layer without a mask counts all its entries.

    Returns:
        ``total``: every parameter of the model (neuron parameters included), pruned synapses
            of any layer excluded — the paper's "Param" of the whole model;
        ``blocks``: kept entries of the target weight matrices (q, k, v, proj, fc1, fc2) — the
            paper's "Param" of the ST blocks (Spikformer-4-384: 7.08 M);
        ``blocks_all``: every parameter inside the blocks (biases, BatchNorms, neurons too),
            pruned synapses excluded;
        ``total_dense``, ``blocks_dense``: ``total`` and ``blocks`` with nothing pruned.
    """
    from effst.nn.block_sparse import BlockSparseLinear

    inner, _ = unwrap(model)
    targets = set(prune_targets(inner))
    weights = {name: module for name, module in inner.named_modules()
               if name in targets or isinstance(module, BlockSparseLinear) or weight_mask(module) is not None}
    in_blocks = {id(p) for p in inner.blocks.parameters()}
    storage: set[int] = set()
    counts = dict(total=0, blocks=0, blocks_all=0, total_dense=0, blocks_dense=0)
    for name, module in weights.items():
        dense, kept = weight_counts(module)
        ids = _storage(module)
        storage |= ids
        counts["total"] += kept
        counts["total_dense"] += dense
        if name in targets:
            counts["blocks"] += kept
            counts["blocks_dense"] += dense
        if ids & in_blocks:
            counts["blocks_all"] += kept
    for i, p in {id(p): p for p in inner.parameters()}.items():
        if i not in storage:
            counts["total"] += p.numel()
            counts["total_dense"] += p.numel()
            if i in in_blocks:
                counts["blocks_all"] += p.numel()
    return counts


__all__ = ["CONFIGS", "NEURONS", "VARIANTS", "SpikformerConfig", "Spikformer", "SPS", "SSA", "MLP", "Block",
           "build_model", "build_model_from_spec", "make_neuron", "prune_targets", "count_parameters",
           "effective_weight", "unwrap", "ATTENTION_TARGETS", "MLP_TARGETS"]
