"""The attention function kvtier registers with transformers: it reads every tier tile by tile.

Each tile (the sinks, a group of warm pages dequantized together, the recent buffer, the new chunk)
gives a partial softmax; partials merge by log-sum-exp, so no dense copy of the whole cache is ever
built. Warm pages are attended in the rotated basis (q R . k R = q . k) and their merged output is
rotated back once. States that do not come from a TieredCache (a DynamicCache, say) go to SDPA.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtier.kernels.partial_attention import PartialAccumulator, partial_attention

from .layer import TierView

ATTENTION_NAME = "kvtier"


def tiered_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (B, H_q, Q, D) -> (out (B, Q, H_q, D), None)."""
    if not isinstance(key, TierView):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout and module.training:
        raise NotImplementedError("kvtier's tiered cache is for inference: attention dropout is not supported.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return attend_tiers(key, query, attention_mask, scaling), None


def attend_tiers(view: TierView, query: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """query (B, H_q, Q, D) at positions past_length.. -> attention output (B, Q, H_q, D) in the query's dtype.

    Query rows are handled query_tile at a time and written straight into the output, so the float32
    temporaries stay within the cache's scratch estimate however long the prefill chunk is.
    """
    batch, query_heads, query_length, head_dim = query.shape
    kv_heads = view.new_keys.shape[1]
    groups = query_heads // kv_heads
    allowed = _allowed_matrix(attention_mask, query_length)  # (B, 1, Q, K) bool, or None for causal
    out = query.new_empty(batch, query_length, query_heads, head_dim)  # the activation the model expects
    tile = view.layer.config.query_tile
    for first in range(0, query_length, tile):
        rows = slice(first, min(first + tile, query_length))
        count = rows.stop - rows.start
        queries = (query[:, :, rows].float() * scaling).view(batch, kv_heads, groups, count, head_dim)
        tile_out = _attend_query_tile(view, queries, allowed, rows)  # (B, H_kv, G, Q_tile, D)
        out[:, rows] = tile_out.reshape(batch, query_heads, count, head_dim).transpose(1, 2)
    return out


def _attend_query_tile(view: TierView, queries: torch.Tensor, allowed, rows: slice) -> torch.Tensor:
    """queries (B, H_kv, G, Q_tile, D) scaled float32 -> out (B, H_kv, G, Q_tile, D)."""
    layer = view.layer
    plain, rotated = PartialAccumulator(), PartialAccumulator()
    rotated_queries = None
    for tile in layer.tiles(view.past_length):
        columns = slice(tile.start, tile.start + tile.keys.shape[2])
        tile_allowed = None if allowed is None else allowed[:, :, rows, columns].unsqueeze(1)
        if tile.rotated:
            if rotated_queries is None:
                rotated_queries = queries @ layer.rotation if layer.rotation is not None else queries
            rotated.add(*partial_attention(rotated_queries, tile.keys, tile.values, tile_allowed))
        else:
            plain.add(*partial_attention(queries, tile.keys.float(), tile.values.float(), tile_allowed))
    if rotated.out is not None:
        out = rotated.out @ layer.rotation.T if layer.rotation is not None else rotated.out
        plain.add(out, rotated.lse)
    _attend_new_chunk(view, queries, allowed, rows, plain)
    return plain.out


def _attend_new_chunk(view: TierView, queries, allowed, rows: slice, accumulator: PartialAccumulator) -> None:
    """The chunk's own tokens, exact, in key tiles; causal when transformers gave no mask."""
    past, key_tile = view.past_length, view.layer.config.key_tile
    chunk_length = view.new_keys.shape[2]
    query_positions = torch.arange(rows.start, rows.stop, device=queries.device)
    for first in range(0, min(chunk_length, rows.stop), key_tile):
        last = min(first + key_tile, chunk_length)
        if allowed is not None:
            tile_allowed = allowed[:, :, rows, past + first:past + last].unsqueeze(1)
        else:
            key_positions = torch.arange(first, last, device=queries.device)
            tile_allowed = key_positions[None, :] <= query_positions[:, None]  # (Q_tile, T)
        keys = view.new_keys[:, :, first:last].float()
        values = view.new_values[:, :, first:last].float()
        accumulator.add(*partial_attention(queries, keys, values, tile_allowed))


def _allowed_matrix(attention_mask, query_length: int):
    """transformers' 4D mask (B, 1, Q, K) as bool 'may attend', or None (purely causal)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(f"kvtier expects a (B, 1, Q, K) attention mask, got shape {tuple(attention_mask.shape)}.")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2
