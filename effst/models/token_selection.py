"""Token selection for Spikformer: SparseSpikformer's STS and STATA's anchor tokens (docs/token_sparsity.md).

Selectors (``build_model(..., token_selector=..., keep_ratio=...)``):

* ``'sts'`` -- SparseSpikformer's Spiking Token Selector. A predictor
  ``Linear(D, D/2) - GELU - Linear(D/2, 2) - LogSoftmax`` on the T-mean of the block input sits
  at the start of blocks ``sts_blocks`` (default 1, 2, 3, 0-indexed). Site i keeps
  ``floor(N * rho^i)`` of the original N tokens (cumulative: a dropped token stays dropped); one
  set per sample, shared by all T. Training (``mode='mask'``): hard 2-way Gumbel-Softmax
  (tau 1, straight-through), all tokens stay in the tensor and attention is masked,
  ``A'_ij = A_ij (d_j + (1 - d_j) delta_ij)``; the ratio loss
  ``ratio_weight * mean_i mean_b (mean_n d_{i,b,n} - rho^i)^2`` and the distillation term
  (:func:`distillation_loss`, weight ``distill_weight``, against the dense teacher) drive the count.
  Inference (``mode='compact'``): exact top-k of the keep log-probability, kept tokens gathered
  (one fused kernel, :func:`effst.ops.token_select.topk_gather`).
* ``'stata'`` -- STATA. A learnable anchor token per timestep (``[T, D]``, initialised to
  ``anchor_init``) is put in front of the tokens after SPS and never dropped. In the blocks
  ``stata_blocks`` (default ``floor(L/3) + 3m``) every token is scored by the anchor row of the
  block's own attention scores (``popcount(q0 & k_i)``, no extra attention), the best
  ``max(1, floor(gamma * n))`` image tokens are kept *per timestep* (ties: lower index first),
  right after the SSA residual; the dropped tokens leave the network in training and inference.
  Neurons after that keep their membrane per token identity. Intra-alignment (weight
  ``intra_weight``) and inter-alignment (``inter_weight``) losses on the anchor rows of
  ``align_blocks`` (default ``{0, floor(L/3) + 1, L - 1}``).
* ``'sts-random'`` / ``'stata-random'`` -- the papers' random baselines: the same counts and
  places, tokens chosen at random (no predictor, no anchor, no auxiliary loss).

The head pools over the kept image tokens (a masked mean in mask mode) in training and
inference (spec S5, T13). After a forward, ``Spikformer.auxiliary_losses()`` holds the weighted
auxiliary terms (add them to the task loss) and ``tokens_per_block()`` the image tokens each
block's attention saw (mean per sample and timestep).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effst.nn.token_routing import TokenRoute
from effst.ops.token_select import (
    anchor_topk_gather,
    gather_tokens,
    masked_mean,
    topk_gather,
    topk_tokens_reference,
)

SELECTORS: tuple[str, ...] = ("sts", "stata", "sts-random", "stata-random")
MODES: tuple[str, ...] = ("auto", "mask", "compact")
#: Keep ratio when none is given: rho = 0.7 (SparseSpikformer's LTH table), gamma = 0.5.
DEFAULT_KEEP_RATIO = {"sts": 0.7, "sts-random": 0.7, "stata": 0.5, "stata-random": 0.5}


def sts_blocks_default(depth: int) -> tuple[int, ...]:
    """STS sites: blocks 1, 2, 3 (0-indexed; SparseSpikformer's code), those that exist; a
    one-block model selects at the start of block 0 (effst's choice, so small models work)."""
    return tuple(i for i in (1, 2, 3) if i < depth) or (0,)


def stata_blocks_default(depth: int) -> tuple[int, ...]:
    """STATA pruning blocks P_I: every 3 blocks from floor(L/3) (L=4: {1}; L=8: {2, 5})."""
    return tuple(range(depth // 3, depth, 3))


def align_blocks_default(depth: int) -> tuple[int, ...]:
    """STATA alignment blocks P_a = P_r: {0, floor(L/3) + 1, L - 1} (L=4: {0, 2, 3})."""
    return tuple(sorted({i for i in (0, depth // 3 + 1, depth - 1) if 0 <= i < depth}))


def keep_count(tokens: int, ratio: float) -> int:
    """Tokens kept out of ``tokens``: ``max(1, int(tokens * ratio))`` in float64, exactly as the
    authors' code computes it (SparseSpikformer: ``int(init_n * token_ratio[i])`` with
    ``token_ratio = [rho, rho ** 2, rho ** 3]``, so pass ``ratio = rho ** i``; STATA: floor of
    ``gamma * n``). No rounding to the nearest integer first: ``int(90 * 0.7)`` is 62 because
    ``90 * 0.7 == 62.99999999999999`` in float64, and effst keeps 62 as well
    (docs/token_sparsity.md)."""
    return max(1, int(tokens * ratio))


def dataclass_to_dict(obj, sequence_fields: tuple[str, ...]) -> dict[str, Any]:
    """``asdict(obj)`` with the tuple fields named in ``sequence_fields`` as lists (JSON)."""
    data = asdict(obj)
    for name in sequence_fields:
        if data[name] is not None:
            data[name] = list(data[name])
    return data


def dataclass_from_dict(cls, data: dict[str, Any], what: str, sequence_fields: tuple[str, ...]):
    """Inverse of :func:`dataclass_to_dict`: unknown keys are an error naming ``what``; lists
    in ``sequence_fields`` become tuples again."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; expected a subset of {sorted(known)}")
    data = dict(data)
    for name in sequence_fields:
        if isinstance(data.get(name), list):
            data[name] = tuple(data[name])
    return cls(**data)


_BLOCK_LIST_FIELDS = ("sts_blocks", "stata_blocks", "align_blocks")


@dataclass(frozen=True)
class TokenSelection:
    """Options of a token selector (see the module docstring). ``None`` block lists mean the
    defaults for the model's depth."""

    selector: str
    keep_ratio: float
    mode: str = "auto"
    sts_blocks: Optional[tuple[int, ...]] = None
    gumbel_tau: float = 1.0
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    stata_blocks: Optional[tuple[int, ...]] = None
    align_blocks: Optional[tuple[int, ...]] = None
    intra_weight: float = 0.01
    inter_weight: float = 0.01
    anchor_init: float = 1.0

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"token_selector: expected one of {list(SELECTORS)} or None, got {self.selector!r}")
        ratio = self.keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep_ratio: expected a float in (0, 1], got {ratio!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        if self.family == "stata" and self.mode == "mask":
            # STATA drops its tokens in training and inference; there is no masked variant.
            raise ValueError(f"mode: token_selector={self.selector!r} always drops tokens (compact); "
                             f"expected 'auto' or 'compact', got 'mask'")
        for name in ("gumbel_tau",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a positive finite float, got {value!r}")
        for name in ("ratio_weight", "distill_weight", "intra_weight", "inter_weight", "anchor_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite float, got {value!r}")
            if name != "anchor_init" and value < 0:
                raise ValueError(f"{name}: expected a float >= 0, got {value!r}")
        for name in ("sts_blocks", "stata_blocks", "align_blocks"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name}: expected a list of distinct block indices >= 0 or None, got {value!r}")
            blocks = tuple(value)
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
                raise ValueError(f"{name}: expected distinct block indices >= 0, got {value!r}")
            object.__setattr__(self, name, tuple(sorted(blocks)))

    @property
    def family(self) -> str:
        """``'sts'`` or ``'stata'``."""
        return self.selector.split("-")[0]

    @property
    def random(self) -> bool:
        """True for the random-choice controls."""
        return self.selector.endswith("-random")

    def resolved(self, depth: int) -> "TokenSelection":
        """A copy with every block list filled in for ``depth`` blocks (and checked)."""
        out = replace(self,
                      sts_blocks=sts_blocks_default(depth) if self.sts_blocks is None else self.sts_blocks,
                      stata_blocks=stata_blocks_default(depth) if self.stata_blocks is None else self.stata_blocks,
                      align_blocks=align_blocks_default(depth) if self.align_blocks is None else self.align_blocks)
        for name in ("sts_blocks", "stata_blocks", "align_blocks"):
            bad = [b for b in getattr(out, name) if b >= depth]
            if bad:
                raise ValueError(f"{name}: block indices {bad} do not exist in a {depth}-block model")
        sites = out.sts_blocks if out.family == "sts" else out.stata_blocks
        if not sites:
            raise ValueError(f"token_selector={self.selector!r}: a {depth}-block model has no block to select "
                             f"tokens in (set {'sts_blocks' if out.family == 'sts' else 'stata_blocks'})")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for checkpoints)."""
        return dataclass_to_dict(self, _BLOCK_LIST_FIELDS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenSelection":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return dataclass_from_dict(cls, data, "token selection", _BLOCK_LIST_FIELDS)


# --------------------------------------------------------------------------- losses
def ratio_loss(decisions: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
    """SparseSpikformer's keep-ratio loss (unweighted): ``mean_i mean_b (mean_n d_{i,b,n} - target_i)^2``
    over the cumulative decisions ``d_i`` ``[B, N]`` of every site."""
    if len(decisions) != len(targets) or not decisions:
        raise ValueError(f"decisions/targets: expected equal non-zero lengths, got {len(decisions)} and {len(targets)}")
    bad = [tuple(d.shape) for d in decisions if not isinstance(d, torch.Tensor) or d.dim() != 2]
    if bad:
        raise ValueError(f"decisions: expected [B, N] tensors, got shapes {bad}")
    terms = [((d.mean(dim=1) - target) ** 2).mean() for d, target in zip(decisions, targets)]
    return torch.stack(terms).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))``, batch mean (unweighted; the teacher is detached)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits.detach(), dim=-1),
                    reduction="batchmean", log_target=True)


def intra_alignment_loss(maps: torch.Tensor) -> torch.Tensor:
    """STATA Eq. 10 for one group of maps ``[B, G, N]`` (G timesteps or heads): per sample the G
    maps are sorted by l2 norm (descending, ties to the lower index), rank r (detached teacher)
    supervises rank r + G//2, the loss is the l2 distance, averaged over the pairs and the batch.
    G < 2 gives 0."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        raise ValueError(f"maps: expected a [B, G, N] tensor, got {getattr(maps, 'shape', type(maps).__name__)}")
    B, G, _ = maps.shape
    half = G // 2
    if half == 0:
        return maps.sum() * 0
    order = torch.sort(maps.norm(dim=2), dim=1, descending=True, stable=True).indices
    ranked = torch.gather(maps, 1, order[:, :, None].expand_as(maps))
    teacher, student = ranked[:, :half].detach(), ranked[:, half:2 * half]
    return (student - teacher).norm(dim=2).mean()


def inter_alignment_loss(maps: list[torch.Tensor]) -> torch.Tensor:
    """STATA Eq. 11: mean over block pairs i < j of ``||phi_i - detach(phi_j)||_2`` (per sample,
    over all of the map's entries), batch mean. Maps ``[B, ...]`` share one shape (Spikformer keeps
    the token grid, so no interpolation is needed). Fewer than 2 maps give 0."""
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) > 1:
        # Different shapes would broadcast into a wrong distance; the caller must resize first.
        raise ValueError(f"maps: expected one shape for all maps, got {sorted(shapes)}")
    if len(maps) < 2:
        return maps[0].sum() * 0 if maps else torch.zeros(())
    terms = [(maps[i] - maps[j].detach()).flatten(1).norm(dim=1).mean()
             for i in range(len(maps)) for j in range(i + 1, len(maps))]
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- the selector
class STSPredictor(nn.Sequential):
    """``Linear(D, D/2) - GELU - Linear(D/2, 2) - LogSoftmax``; column 0 = keep."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 2), nn.LogSoftmax(dim=-1))


class TokenSelector(nn.Module):
    """The blocks' forward with token selection; held by :class:`~effst.models.Spikformer` as
    ``model.selector`` (its predictors / anchor are model parameters)."""

    def __init__(self, selection: TokenSelection, *, depth: int, dim: int, T: int, heads: int):
        super().__init__()
        self.selection = selection.resolved(depth)
        self.heads = heads
        s = self.selection
        if s.selector == "sts":
            self.predictors = nn.ModuleList(STSPredictor(dim) for _ in s.sts_blocks)
        if s.selector == "stata":
            self.anchor = nn.Parameter(torch.full((T, dim), float(s.anchor_init)))
        self.losses: dict[str, torch.Tensor] = {}
        self.tokens: list = []     # per block: image tokens its attention saw (float or 0-d tensor)

    def mode(self) -> str:
        """``'mask'`` or ``'compact'`` for the next forward (``'auto'``: mask in training)."""
        if self.selection.family == "stata":
            return "compact"
        if self.selection.mode == "auto":
            return "mask" if self.training else "compact"
        return self.selection.mode

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """Run ``blocks`` on the SPS output ``x`` ``[T, B, N, D]``; return pooled features ``[B, D]``."""
        self.losses, self.tokens = {}, []
        if self.selection.family == "sts":
            return self._sts(blocks, x)
        return self._stata(blocks, x)

    # ---- SparseSpikformer
    def _sts(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        s = self.selection
        _, B, N, _ = x.shape
        mode = self.mode()
        policy = torch.ones(B, N, dtype=x.dtype, device=x.device)   # mask mode: cumulative decision
        decisions, targets = [], []
        for i, block in enumerate(blocks):
            if i in s.sts_blocks:
                site = s.sts_blocks.index(i) + 1
                k = keep_count(N, s.keep_ratio ** site)
                n = x.shape[2]
                if s.random:
                    score = torch.rand(B, n, device=x.device)
                else:
                    logp = self.predictors[site - 1](x.mean(dim=0))   # [B, n, 2]
                    score = logp[..., 0]
                if mode == "mask":
                    if self.training and not s.random:
                        hard = F.gumbel_softmax(logp, tau=s.gumbel_tau, hard=True)[..., 0]
                        policy = policy * hard
                        decisions.append(policy)
                        targets.append(s.keep_ratio ** site)
                    else:
                        candidates = score.detach().masked_fill(policy == 0, float("-inf"))
                        index = topk_tokens_reference(candidates, k)
                        policy = torch.zeros_like(policy).scatter(1, index, 1.0)
                else:
                    # One kernel: top-k of the keep log-probability (read in place from the
                    # predictor's output) and the kept tokens of every timestep gathered.
                    _, x = topk_gather(score, x, k)
            if mode == "mask":
                self.tokens.append(policy.detach().sum(dim=1).mean())   # a tensor: no host sync here
                x = x + block.attn(x, key_mask=policy)
            else:
                self.tokens.append(float(x.shape[2]))
                x = x + block.attn(x)
            x = x + block.mlp(x)
        if decisions:
            self.losses["ratio"] = s.ratio_weight * ratio_loss(decisions, targets)
        if mode == "mask":
            # A sample whose Gumbel draws dropped every token is pooled over all of them.
            keep = policy.detach() > 0
            keep = torch.where(keep.any(dim=1, keepdim=True), keep, torch.ones_like(keep))
            return masked_mean(x, keep)
        return x.mean(dim=2).mean(dim=0)

    # ---- STATA
    def _stata(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        s = self.selection
        T, B, N, D = x.shape
        anchored = not s.random
        first = 1 if anchored else 0     # image tokens start here
        if anchored:
            x = torch.cat([self.anchor[:, None, None, :].to(x.dtype).expand(T, B, 1, D), x], dim=2)
        tokens = x.shape[2]
        ids = None             # [T, B, n] token identity of each slot (None: identity)
        route = None
        align_maps = []
        for i, block in enumerate(blocks):
            self.tokens.append(float(x.shape[2] - first))
            y, scores, queries, keys = block.attn(x, route=route, details=True)
            x = x + y
            n = x.shape[2]
            if anchored and self.training and i in s.align_blocks:
                rows = scores[:, :, :, 0, first:]                        # [T, B, H, n - 1] anchor rows
                if ids is not None:
                    rows = self._to_grid(rows, ids[..., first:] - first, N)
                align_maps.append(rows)
            if i in s.stata_blocks:
                k = keep_count(n - first, s.keep_ratio)
                flat = x[:, :, first:].reshape(T * B, n - first, D)
                if anchored:
                    _, index, compact = anchor_topk_gather(
                        queries[:, :, 0, :].reshape(T * B, -1), keys[:, :, first:, :].reshape(T * B, n - first, -1),
                        flat, k)
                else:
                    index = topk_tokens_reference(torch.rand(T * B, n - first, device=x.device), k)
                    compact = gather_tokens(flat, index)
                current = torch.arange(first, n, device=x.device).expand(T, B, n - first) if ids is None \
                    else ids[..., first:]
                kept = torch.gather(current.reshape(T * B, -1), 1, index).reshape(T, B, k)
                compact = compact.reshape(T, B, k, D)
                if anchored:
                    x = torch.cat([x[:, :, :1], compact], dim=2)
                    ids = torch.cat([torch.zeros(T, B, 1, dtype=torch.int64, device=x.device), kept], dim=2)
                else:
                    x, ids = compact, kept
                route = TokenRoute(ids, tokens)      # shared by every later neuron of the blocks
            x = x + block.mlp(x, route=route)
        if align_maps:
            self._alignment_losses(align_maps)
        return x[:, :, first:].mean(dim=2).mean(dim=0)

    @staticmethod
    def _to_grid(rows: torch.Tensor, ids: torch.Tensor, tokens: int) -> torch.Tensor:
        """Anchor rows of kept tokens ``[T, B, H, k]`` -> full token grid ``[T, B, H, tokens]``, 0 where dropped."""
        T, B, H, k = rows.shape
        full = torch.zeros(T, B, H, tokens, dtype=rows.dtype, device=rows.device)
        return full.scatter(3, ids[:, :, None, :].expand(T, B, H, k), rows)

    def _alignment_losses(self, maps: list[torch.Tensor]) -> None:
        s = self.selection
        per_t = [m.mean(dim=2).transpose(0, 1) for m in maps]       # phi_T: [B, T, N], head mean
        per_head = [m.mean(dim=0) for m in maps]                   # phi_H: [B, H, N], T mean
        intra = torch.stack([intra_alignment_loss(a) + intra_alignment_loss(b)
                             for a, b in zip(per_t, per_head)]).mean()
        self.losses["intra_alignment"] = s.intra_weight * intra
        if len(maps) > 1:
            self.losses["inter_alignment"] = s.inter_weight * inter_alignment_loss(per_t)


__all__ = ["SELECTORS", "MODES", "DEFAULT_KEEP_RATIO", "TokenSelection", "TokenSelector", "STSPredictor",
           "ratio_loss", "distillation_loss", "intra_alignment_loss", "inter_alignment_loss", "keep_count",
           "sts_blocks_default", "stata_blocks_default", "align_blocks_default"]
