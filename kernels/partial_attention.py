"""Attention over one tile of keys as a partial softmax, and the log-sum-exp merge of partials.

Attending tile by tile and merging is exact: for tiles a and b with partial outputs o_a, o_b and
log-sum-exps lse_a, lse_b, the full output is (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b).
This is the plain-torch reference the tiered attention runs on any device.
"""

from __future__ import annotations

import torch


def partial_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of scaled queries over one tile, with its log-sum-exp.

    queries: (B, H_kv, G, Q, D) float32, already multiplied by the softmax scale; G query heads per KV head
    keys, values: (B, H_kv, T, D) float32
    allowed: bool, broadcastable to (B, H_kv, G, Q, T), or None for all allowed
    returns out (B, H_kv, G, Q, D) and lse (B, H_kv, G, Q); rows with nothing allowed get out 0, lse -inf
    """
    return attend_scores(masked_scores(queries, keys, allowed), values)


def masked_scores(queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """(B, H_kv, G, Q, T) scores, -inf where ``allowed`` is False."""
    scores = torch.einsum("bhgqd,bhtd->bhgqt", queries, keys)
    return scores if allowed is None else scores.masked_fill(~allowed, -torch.inf)


def attend_scores(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of masked scores (B, H_kv, G, Q, T) over values (B, H_kv, T, D) -> out and lse, as above."""
    row_max = scores.amax(dim=-1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max.unsqueeze(-1))
    total = weights.sum(dim=-1)
    out = torch.einsum("bhgqt,bhtd->bhgqd", weights, values) / total.clamp_min(1e-30).unsqueeze(-1)
    return out, row_max + torch.log(total)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint key sets; shapes as returned by :func:`partial_attention`."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    out = (weight_a.unsqueeze(-1) * out_a + weight_b.unsqueeze(-1) * out_b) / total.clamp_min(1e-30).unsqueeze(-1)
    return out, top + torch.log(total)


class PartialAccumulator:
    """Running merge of partial results; starts empty (lse -inf everywhere)."""

    def __init__(self):
        self.out = None
        self.lse = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out, lse
        else:
            self.out, self.lse = merge_partials(self.out, self.lse, out, lse)
