"""Decode attention over a layer's cold pages computed on the host, where they live (``cold_attention="host"``).

Instead of streaming cold pages across PCIe, the query goes to the host (one small copy and a wait for it),
the numba kernel (kvtier.kernels.host_attention) attends every host slab in place on the packed codes, and the
partial result, turned back from the rotated basis, returns to the device to be merged with the device tiers'
partial result by log-sum-exp.
"""

from __future__ import annotations

import torch

from kvtier.kernels.host_attention import host_attention
from kvtier.kernels.partial_attention import PartialAccumulator


def attend_cold_on_host(layer, query: torch.Tensor, scaling: float, kv_start: torch.Tensor, kv_end: torch.Tensor):
    """query (B, H_q, 1, D) -> out (B, H_q, D) float32 and lse (B, H_q) over the layer's cold pages, on the query's
    device (lse -inf and out 0 where no cold page is attended)."""
    batch, query_heads, _, head_dim = query.shape
    kv_heads = layer.hot_keys.shape[1]
    layer.cache.prefetcher.wait_for_host_writes()
    rotated = query[:, :, 0].float() * scaling  # (B, H_q, D)
    if layer.rotation is not None:
        rotated = rotated @ layer.rotation
    rotated = rotated.view(batch, kv_heads, query_heads // kv_heads, head_dim).cpu()  # (B, H_kv, G, D)
    starts, ends = kv_start.cpu(), kv_end.cpu()
    sketch = None if layer.sketch is None else layer.sketch.cpu()
    accumulator = PartialAccumulator()
    for slab, _, entries in layer.cold.chunks():  # each slab that holds pages, with its entries
        rows = torch.tensor([entry.row for entry in entries])
        positions = torch.tensor([entry.start for entry in entries])
        out, lse, _ = host_attention(rotated, slab.pages, rows, positions, starts, ends, layer.warm.layout, sketch)
        accumulator.add(out, lse)
    out = accumulator.out  # (B, H_kv, G, D), rotated basis
    if layer.rotation is not None:
        out = out @ layer.rotation.cpu().T
    return (out.reshape(batch, query_heads, head_dim).to(query.device),
            accumulator.lse.reshape(batch, query_heads).to(query.device))
