"""Multiply-accumulate counts of a (token-pruned) Spikformer, as SparseSpikformer's tables count
"FLOPs": MACs of every convolution, projection and attention product, times T.

Per timestep, with ``n_a`` tokens in a block's attention half and ``n_m`` in its MLP half
(D = dim, W = attention width, F = MLP width):

* SPS stem: ``sum_stage H_s W_s C_in C_out 9`` (each 3x3 conv at its input resolution, before
  its max-pool) plus the relative-position conv ``H W D D 9`` at the token grid;
* attention half: ``3 n_a D W`` (q, k, v) + ``2 n_a^2 W`` (``q k^T`` and ``(q k^T) v``) +
  ``n_a W D`` (proj);
* MLP half: ``2 n_m D F``;
* head: ``D * classes`` once (not per timestep).

The token selectors' own work is counted apart (``selector``): an STS predictor
``n (D D/2 + D/2 * 2)`` per site and sample (it runs on the T-mean); STATA's ranking reuses the
attention scores (0 MACs) and its anchor is one more token in every block.
Spikformer-4-384 on CIFAR10 gives 3.736 G dense and 3.029 G at rho = 0.7 (paper: 3.74, 3.04 G).
"""
from __future__ import annotations

from typing import Optional, Sequence

from effst.models.spikformer import SpikformerConfig
from effst.models.token_selection import TokenSelection, keep_count


def stem_macs(config: SpikformerConfig) -> int:
    """MACs of the SPS stem for one timestep."""
    d = config.dim
    widths = (config.in_channels, d // 8, d // 4, d // 2, d)
    h = w = config.image_size
    total = 0
    for stage in range(4):
        total += h * w * widths[stage] * widths[stage + 1] * 9
        if stage in config.pools:
            h, w = (h + 1) // 2, (w + 1) // 2
    return total + h * w * d * d * 9


def block_macs(config: SpikformerConfig, attention_tokens: int, mlp_tokens: int) -> int:
    """MACs of one block for one timestep with the given token counts."""
    d, width, hidden = config.dim, config.width, config.hidden
    attention = 3 * attention_tokens * d * width + 2 * attention_tokens ** 2 * width + attention_tokens * width * d
    return attention + 2 * mlp_tokens * d * hidden


def token_schedule(config: SpikformerConfig, selection: Optional[TokenSelection] = None) -> list[tuple[int, int]]:
    """``(attention tokens, MLP tokens)`` per block at inference (anchor included for STATA)."""
    n = config.tokens()
    if selection is None:
        return [(n, n)] * config.depth
    s = selection.resolved(config.depth)
    out = []
    if s.family == "sts":
        for i in range(config.depth):
            if i in s.sts_blocks:
                n = keep_count(config.tokens(), s.keep_ratio ** (s.sts_blocks.index(i) + 1))
            out.append((n, n))
        return out
    extra = 0 if s.random else 1
    for i in range(config.depth):
        attention = n + extra
        if i in s.stata_blocks:
            n = keep_count(n, s.keep_ratio)
        out.append((attention, n + extra))
    return out


def spikformer_macs(config: SpikformerConfig, selection: Optional[TokenSelection] = None, *,
                    tokens: Optional[Sequence[tuple[int, int]]] = None) -> dict[str, int]:
    """MACs (x T) of a Spikformer forward for one sample.

    ``tokens`` overrides the per-block ``(attention, MLP)`` token counts (default:
    :func:`token_schedule` of ``selection``). Returns ``stem``, ``blocks``, ``head``,
    ``selector`` (STS predictors; not in ``total``), ``total`` = stem + blocks + head.
    """
    if not isinstance(config, SpikformerConfig):
        raise TypeError(f"config: expected a SpikformerConfig, got {type(config).__name__}")
    if selection is not None and not isinstance(selection, TokenSelection):
        raise TypeError(f"selection: expected a TokenSelection or None, got {type(selection).__name__}")
    schedule = list(token_schedule(config, selection) if tokens is None else tokens)
    if len(schedule) != config.depth:
        raise ValueError(f"tokens: expected {config.depth} (attention, MLP) pairs, got {len(schedule)}")
    stem = stem_macs(config) * config.T
    blocks = sum(block_macs(config, a, m) for a, m in schedule) * config.T
    head = config.dim * config.num_classes
    selector = 0
    if selection is not None and selection.selector == "sts":
        s = selection.resolved(config.depth)
        d = config.dim
        # A predictor sees the tokens entering its block: the previous block's MLP tokens, or
        # all N at block 0.
        entering = [config.tokens()] + [mlp for _, mlp in schedule]
        selector = sum(entering[i] * (d * (d // 2) + (d // 2) * 2) for i in s.sts_blocks)
    return {"stem": stem, "blocks": blocks, "head": head, "selector": selector, "total": stem + blocks + head}


__all__ = ["stem_macs", "block_macs", "token_schedule", "spikformer_macs"]
