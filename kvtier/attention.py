"""The attention function kvtier registers with transformers: it reads every tier in place.

A first prefill chunk (an empty cache) attends only its own tokens, which the cache has not quantized: SDPA serves
it, as it serves the dense cache, but not through cuDNN's attention, which keeps an execution plan for every shape it
sees (prompt lengths vary from call to call: on the H200 that held 1.2 MiB of host memory more per generate() call,
benchmarks/results/soak-cuda*.md). A decode step (one query row) goes to the paged decode kernel on CUDA
(``decode_kernel="auto"``) and to its torch reference elsewhere; cold pages reach it through the staging ring
(kvtier.prefetch). A later prefill chunk attends the cached tiers through the reference, query tile by query tile, and
its own tokens exactly; the pieces merge by log-sum-exp, so no dense copy of the whole cache is ever built. States
that do not come from a TieredCache (a DynamicCache, say) go to SDPA.
"""

from __future__ import annotations

import itertools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtier.kernels import decode_attention as paged_kernel
from kvtier.kernels.partial_attention import PartialAccumulator, merge_partials, partial_attention

from .errors import KVTierError
from .host_tier import attend_cold_on_host
from .layer import TierView
from .prefetch import JoinedPages

ATTENTION_NAME = "kvtier"
FIRST_CHUNK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


def tiered_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (B, H_q, Q, D) -> (out (B, Q, H_q, D), None)."""
    if not isinstance(key, TierView):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout and module.training:
        raise NotImplementedError("kvtier's tiered cache is for inference: attention dropout is not supported.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if key.past_length == 0 and key.step is None:  # a first chunk attends its own tokens only, in the model's dtype
        with sdpa_kernel(FIRST_CHUNK_BACKENDS):
            return sdpa_attention_forward(module, query, key.new_keys, key.new_values, attention_mask,
                                          scaling=scaling, dropout=dropout, **kwargs)
    return attend_tiers(key, query, attention_mask, scaling), None


def attend_tiers(view: TierView, query: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """query (B, H_q, Q, D) at positions past_length.. -> attention output (B, Q, H_q, D) in the query's dtype."""
    if view.step is not None:
        return _decode_static(view, query, scaling)
    if query.shape[2] == 1:
        ranges = _decode_ranges(view, attention_mask)
        if ranges is not None:
            return _decode(view, query, scaling, *ranges)
    return _prefill(view, query, attention_mask, scaling)


def _decode(view: TierView, query, scaling: float, kv_start, kv_end) -> torch.Tensor:
    """One query row over every cached token (the new one is already in the hot tier).

    Cold pages arrive staged, as many ring slots at a time as are on their way: the first group is read in the
    same launch as the warm and hot pages, each further group (when the ring is smaller than the layer's cold
    pages) in a launch of its own, merged by log-sum-exp. In a step that attends cold pages on the host
    (``cold_attention="host"``, or "auto"'s choice) they are attended where they live instead (kvtier.host_tier) and
    merged the same way. A policy that wants attention mass gets
    each launch's per-page mass once the step's log-sum-exp is known."""
    layer = view.layer
    batch, query_heads, _, head_dim = query.shape
    on_host = layer.cache.cold_mode == "host" and layer.cold_tokens() > 0
    chunks = iter(()) if on_host else layer.cold_chunks()
    first_chunk = next(chunks, None)
    pages = layer.warm if first_chunk is None else JoinedPages(layer.warm, first_chunk)
    with_mass = layer.policy.wants_mass
    low = layer.low_pages()
    if use_kernel(layer.config.decode_kernel, query.is_cuda, layer.warm.layout, low):
        def attend(pages, with_hot=True):  # -> out (B, H_q, D) model dtype, lse (B, H_q), mass (B, H_kv, rows)
            lse = torch.empty(batch, query_heads, device=query.device)
            out, mass = paged_kernel.decode_attention(query[:, :, 0], layer.paged(pages, with_hot), kv_start, kv_end,
                                                      scaling, with_mass, workspace=layer.cache.workspace, lse=lse)
            return out, lse, mass, (pages.positions[:pages.rows] if with_mass else None)
    else:
        kv_heads = layer.hot_keys.shape[1]
        queries = (query.float() * scaling).view(batch, kv_heads, query_heads // kv_heads, 1, head_dim)

        def attend(pages, with_hot=True):  # -> out (B, H_q, D) float32, lse (B, H_q), mass (B, H_kv, table rows)
            out, lse, mass = paged_kernel.paged_attention_reference(queries, layer.paged(pages, with_hot), kv_start,
                                                                    kv_end, key_tile=layer.config.key_tile,
                                                                    with_mass=with_mass)
            return (out.view(batch, query_heads, head_dim), lse.view(batch, query_heads), mass,
                    _table_starts(pages) if with_mass else None)
    out, lse, *observed = attend(pages)
    launches = [(lse, *observed)]
    for chunk in itertools.chain([low] if low is not None else [], chunks):  # low-precision pages, further cold ones
        chunk_out, chunk_lse, *observed = attend(chunk, with_hot=False)
        out, lse = merge_partials(out.float(), lse, chunk_out, chunk_lse)
        launches.append((chunk_lse, *observed))
    if on_host:
        out, lse = merge_partials(out.float(), lse, *attend_cold_on_host(layer, query, scaling, kv_start, kv_end))
    if with_mass:
        for launch_lse, mass, starts in launches:
            _observe(layer, mass, starts, launch_lse, lse, layer.total_tokens)
    return out.unsqueeze(1).to(query.dtype)


def _decode_static(view: TierView, query, scaling: float) -> torch.Tensor:
    """A fixed-shape decode step (kvtier.graph): the warm pages and the hot tier, with the attended positions and the
    warm page count read from device buffers (so that a CUDA graph can replay it as pages are added), then each
    staged cold chunk in a launch of its own, merged by log-sum-exp (a change in the cold pages means a new capture)."""
    layer, step = view.layer, view.step
    batch, query_heads, _, head_dim = query.shape
    chunks = layer.cold_chunks()
    if use_kernel(layer.config.decode_kernel, query.is_cuda, layer.warm.layout):
        def attend(paged, warm_count=None):  # -> out (B, H_q, D) model dtype, lse (B, H_q) float32
            lse = torch.empty(batch, query_heads, device=query.device)
            out, _ = paged_kernel.decode_attention(query[:, :, 0], paged, step.kv_start, step.kv_end, scaling,
                                                   workspace=layer.cache.workspace, lse=lse, warm_count=warm_count)
            return out, lse
    else:
        kv_heads = layer.hot_keys.shape[1]
        queries = (query.float() * scaling).view(batch, kv_heads, query_heads // kv_heads, 1, head_dim)

        def attend(paged, warm_count=None):  # -> out (B, H_q, D) float32, lse (B, H_q)
            out, lse, _ = paged_kernel.paged_attention_reference(queries, paged, step.kv_start, step.kv_end,
                                                                 key_tile=layer.config.key_tile)
            return out.view(batch, query_heads, head_dim), lse.view(batch, query_heads)
    out, lse = attend(layer.paged(), warm_count=layer.warm.row_count)
    for chunk in chunks:
        out, lse = merge_partials(out.float(), lse, *attend(layer.paged(chunk, with_hot=False)))
    return out.unsqueeze(1).to(query.dtype)


def _table_starts(pages) -> torch.Tensor:
    """(n,) int32 first positions of a page set's table rows (the rows the reference reports mass for)."""
    return torch.tensor([entry.start for entry in pages.table], dtype=torch.int32, device=pages.positions.device)


def _observe(layer, mass, starts, piece_lse, total_lse, visible: int) -> None:
    """Feed the policy the mass (B, H_kv, n) of the pages at ``starts`` (n,), which one attention call measured as
    shares of its own softmax (log-sum-exp ``piece_lse``: (B, H_q) of a decode step, (B, H_kv, G, Q) of a prefill
    tile), rescaled to shares of the whole softmax (``total_lse``; the same tensor when the call saw every token,
    and then exact; else the rescale is averaged over the query heads and rows of a KV head, an approximation).
    Only pages wholly before position ``visible`` count: a prefill's own chunk may already fill pages that its
    queries read as new tokens."""
    if mass.numel() == 0:
        return
    if piece_lse is not total_lse:  # the call saw only part of the tokens
        scale = torch.exp(piece_lse - total_lse).nan_to_num(0.0).view(*mass.shape[:2], -1).mean(-1)  # (B, H_kv)
        mass = mass * scale.unsqueeze(-1)
    layer.policy.observe(starts, mass.sum((0, 1)), ignore_from=visible - layer.config.block_size + 1)


def _decode_ranges(view: TierView, attention_mask):
    """(kv_start, kv_end), (B,) int32 each: row b attends positions kv_start[b] <= p < kv_end[b]; None when the
    mask is not such a range (then the general path runs). Computed once per forward, at the first layer."""
    cache, layer = view.layer.cache, view.layer
    key = (None if attention_mask is None else attention_mask.data_ptr(), layer.total_tokens)
    if layer.layer_idx != 0 and cache.decode_ranges_key == key:
        return cache.decode_ranges
    batch, total = layer.hot_keys.shape[0], layer.total_tokens
    device = layer.hot_keys.device
    if attention_mask is None:
        kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
    else:
        allowed = _allowed_matrix(attention_mask, 1)[:, 0, 0, :total].expand(batch, total)  # (B, K)
        kv_start = allowed.int().argmax(-1).int()  # first allowed position
        if not bool((allowed.sum(-1) == total - kv_start).all()):  # one host sync per step
            kv_start = None
    ranges = None if kv_start is None else (kv_start, torch.full_like(kv_start, total))
    cache.decode_ranges_key, cache.decode_ranges = key, ranges
    return ranges


def use_kernel(choice: str, on_cuda: bool, layout, low_pages=None) -> bool:
    """Whether decode attention runs the Triton kernel (``decode_kernel`` is ``choice``); "triton" on pages it cannot
    read raises, saying why."""
    if choice == "torch" or (choice == "auto" and not on_cuda):
        return False
    readable = paged_kernel.kernel_reads(layout) and (low_pages is None or paged_kernel.kernel_reads(low_pages.layout))
    if paged_kernel.triton is None or not readable:
        if choice == "triton":
            raise KVTierError(
                "kvtier: decode_kernel='triton' needs the triton package (pip install triton) and pages it can read: "
                f"power-of-two block_size, head dim and key groups of at least 16 tokens; this cache has {layout}."
            )
        return False
    return True


def _prefill(view: TierView, query, attention_mask, scaling: float) -> torch.Tensor:
    """Query rows are handled query_tile at a time and written straight into the output, so the float32
    temporaries stay within the cache's scratch estimate however long the prefill chunk is."""
    batch, query_heads, query_length, head_dim = query.shape
    kv_heads = view.new_keys.shape[1]
    groups = query_heads // kv_heads
    allowed = _allowed_matrix(attention_mask, query_length)  # (B, 1, Q, K) bool, or None for causal
    out = query.new_empty(batch, query_length, query_heads, head_dim)  # the activation the model expects
    tile = view.layer.config.query_tile
    kv_start = torch.zeros(batch, dtype=torch.int32, device=query.device)
    kv_end = torch.full_like(kv_start, view.past_length)
    layer = view.layer
    with_mass = layer.policy.wants_mass
    by_kernel = not with_mass and use_kernel(layer.config.decode_kernel, query.is_cuda, layer.warm.layout,
                                             layer.low_pages())
    workspace = paged_kernel.DecodeWorkspace() if by_kernel else None
    for first in range(0, query_length, tile):
        rows = slice(first, min(first + tile, query_length))
        count = rows.stop - rows.start
        queries = (query[:, :, rows].float() * scaling).view(batch, kv_heads, groups, count, head_dim)
        accumulator = PartialAccumulator()
        _attend_new_chunk(view, queries, allowed, rows, accumulator)
        pieces = []  # (mass, log-sum-exp once added) of each past piece, when the policy wants mass
        if view.past_length:
            tile_allowed = None if allowed is None else allowed[:, 0, rows]
            ranges = _past_ranges(tile_allowed, batch, count, view.past_length, query.device) if by_kernel else None
            for pages, with_hot in _past_pages(layer):
                if ranges is not None:  # the past through the decode kernel, a tile of query rows per launch
                    accumulator.add(*_past_by_kernel(query[:, :, rows], layer.paged(pages, with_hot), *ranges,
                                                     scaling, workspace))
                    continue
                past, lse, mass = paged_kernel.paged_attention_reference(
                    queries, layer.paged(pages, with_hot), kv_start, kv_end, tile_allowed,
                    key_tile=layer.config.key_tile, with_mass=with_mass, other_lse=accumulator.lse)
                accumulator.add(past, lse)
                if with_mass:
                    pieces.append((mass, _table_starts(pages), accumulator.lse))
        for mass, starts, lse in pieces:  # exact for the last piece; rescaled, approximately, for earlier ones
            _observe(layer, mass, starts, lse, accumulator.lse, view.past_length)
        out[:, rows] = accumulator.out.reshape(batch, query_heads, count, head_dim).transpose(1, 2)
    return out


def _past_ranges(tile_allowed, batch: int, count: int, past_length: int, device):
    """(kv_start, kv_end), (B,) int32 each, when every query row of a prefill tile may attend exactly the past
    positions kv_start[b] <= p < past_length (a causal chunk, left padding); else None. tile_allowed: (B or 1, Q, K)
    bool, or None for causal."""
    kv_end = torch.full((batch,), past_length, dtype=torch.int32, device=device)
    if tile_allowed is None:
        return torch.zeros_like(kv_end), kv_end
    past = tile_allowed[:, :, :past_length].expand(batch, count, past_length)  # (B, Q, P)
    kv_start = past[:, 0].int().argmax(-1).int()  # the first row's first allowed position
    from_start = torch.arange(past_length, device=device)[None, None, :] >= kv_start[:, None, None]
    if not bool((past == from_start).all()):  # one host sync per tile
        return None
    return kv_start, kv_end


def _past_by_kernel(query, paged, kv_start, kv_end, scaling: float, workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill tile's attention over past pages in one launch of the decode kernel. Every row of a KV head attends
    the same positions, so its G query heads x Q positions are that head's query rows (the kernel reads the pages once
    for each block of QUERY_ROWS_PER_PROGRAM of them).
    query: (B, H_q, Q, D) model dtype; returns out (B, H_kv, G, Q, D) float32 and lse (B, H_kv, G, Q)."""
    batch, query_heads, count, head_dim = query.shape
    kv_heads = paged.hot_keys.shape[1]
    groups = query_heads // kv_heads
    rows = query.reshape(batch, query_heads * count, head_dim)  # row (h * G + g) * Q + q: KV head h's rows together
    lse = torch.empty(batch, query_heads * count, device=query.device)
    out, _ = paged_kernel.decode_attention(rows, paged, kv_start, kv_end, scaling, workspace=workspace, lse=lse,
                                           splits=1)  # one partial per row: the rows are programs enough
    return out.float().view(batch, kv_heads, groups, count, head_dim), lse.view(batch, kv_heads, groups, count)


def _past_pages(layer):
    """(pages, with the hot tier): the warm pages with the hot tier, the low-precision ones, then each staged cold
    chunk; lazily, because a chunk's slot is recycled as soon as the next one is asked for (a prefill streams every
    cold chunk again for each query tile)."""
    yield layer.warm, True
    if layer.low_pages() is not None:
        yield layer.low, False
    for chunk in layer.cold_chunks():
        yield chunk, False


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
