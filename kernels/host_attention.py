"""Attention of one decode step over cold (host-resident) warm pages, computed on the host: a numba kernel that
reads the packed INT4 codes in place, and its plain-torch reference.

Cold pages keep the warm tier's PageLayout byte for byte, in uint8 host slabs (P, page_bytes). Instead of copying
them to the GPU, a decode step can attend to them here and merge the result with the GPU's partial attention by
log-sum-exp (see partial_attention). Like the device kernel, the work is split into (page range, sequence, KV head)
items, each taking every query head that shares the KV head (so each packed byte is read once); numba threads take
the items as they free up, an item walks its pages one at a time with an online softmax, and a second parallel
loop merges the items by log-sum-exp.

The kernel never dequantizes keys or values. An INT4 key is code * scale + minimum, so with per-channel key groups
the query is folded into each group's parameters once, q . k = (q * scale) . code + q . minimum, and with per-token
keys q . k = scale * (q . code) + minimum * sum(q). Values are summed per page as weight * scale * code and, apart,
weight * minimum (a minimum adds the same to every channel); the two meet once per page, before the page joins the
running sum, so that no long float32 sum of large terms cancels at the end. Codes are unpacked to float32 four
tokens at a time (one load of the folded query or of the accumulator serves four tokens), float16 parameters are
decoded from their bits as they are needed (numba has no float16 on the CPU; measured: about 0.2 ns a value, a
64K-entry table no faster end to end, while gathering and converting the fields in torch first added a third to
the kernel's time), and the softmax uses a polynomial exp that vectorizes. The loops are written so that LLVM
vectorizes them: see the notes in _unpack and _page_weights.

Pages of other formats (TurboQuant), queries that are not float32 (a float64 reference, say), or a Python without
numba take the torch reference; :func:`host_kernel_reads` tells whether a layout's pages get the kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvtier.formats import Int4Format
from kvtier.kernels.partial_attention import PartialAccumulator, attend_scores, masked_scores
from kvtier.pages import PageLayout

try:
    import numba
    from numba import prange
except ImportError:  # the torch reference still works
    numba = None

ITEMS_PER_THREAD = 4  # work items per numba thread, so that ragged ranges still keep every thread busy
TILE = 4  # tokens the kernel unpacks and uses together (its dot products are written out for four)
KEY_SCALE, KEY_MIN, VALUE_SCALE, VALUE_MIN = range(4)  # rows of the kernel's decoded per-token parameters
ROW_MAX, TOTAL = range(2)  # rows of the kernel's online-softmax state
MIN_PAGES_PER_ITEM = 4  # fewer pages per item than this costs more in setup and merging than it gains
REFERENCE_TILE_TOKENS = 4096  # tokens the reference dequantizes at a time
INT4_FIELDS = ("key_codes", "value_codes", "key_scale", "key_min", "value_scale", "value_min", "key_scale_base")
KEY_CODES_AT, VALUE_CODES_AT, KEY_SCALE_AT, KEY_MIN_AT, VALUE_SCALE_AT, VALUE_MIN_AT, KEY_SCALE_BASE_AT = range(7)
# (indices into ``at``; only per-channel keys have a key_scale_base, 0 otherwise, and their key_scale is one-byte
# codes: kvtier.int4)


def host_kernel_reads(layout: PageLayout) -> bool:
    """Whether the numba kernel reads pages of this layout (else host_attention runs the torch reference):
    INT4 pages, with numba importable."""
    warm_format = layout.format
    if numba is None or not isinstance(warm_format, Int4Format) or layout.head_dim % 2:
        return False
    return not warm_format.key_per_channel or layout.block_size % warm_format.key_group == 0


def host_attention(rotated_queries: torch.Tensor, slab: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                   kv_start: torch.Tensor, kv_end: torch.Tensor, layout: PageLayout, sketch: torch.Tensor | None = None,
                   with_page_lse: bool = False):
    """Partial attention of one decode step's queries over pages of one host slab.

    rotated_queries: (B, H_kv, G, D) float32 CPU tensor: the query in the rotated basis (q @ R), already multiplied
        by the softmax scale; G query heads per KV head
    slab: uint8 (P, layout.page_bytes) CPU tensor; rows: (n,) int64 CPU tensor of the slab rows to attend
    positions: (n,) int64 CPU tensor: page i holds token positions positions[i] .. positions[i] + block_size - 1
    kv_start, kv_end: (B,) integer CPU tensors: sequence b attends positions kv_start[b] <= p < kv_end[b]
    sketch: the layer's (D, D) QJL sketch for TurboQuant keys (None otherwise)
    returns out (B, H_kv, G, D) float32 in the rotated basis, lse (B, H_kv, G) float32 natural-log log-sum-exp of
    the scores (-inf and out 0 where nothing was attended), and with ``with_page_lse`` page_lse (B, H_kv, G, n)
    per page (-inf for fully masked pages), else None. The numba kernel's first call compiles it (seconds).
    """
    if not host_kernel_reads(layout) or rotated_queries.dtype != torch.float32:
        return host_attention_reference(rotated_queries, slab, rows, positions, kv_start, kv_end, layout, sketch,
                                        with_page_lse)
    _check_arguments(rotated_queries, slab, rows, positions, kv_start, kv_end, layout)
    batch, heads, group, dim = rotated_queries.shape
    count = rows.shape[0]
    splits = _splits(batch * heads, count)
    out = _empty(batch, heads, group, dim)  # (B, H_kv, G, D)
    lse = _empty(batch, heads, group)  # (B, H_kv, G)
    page_lse = _empty(batch, heads, group, count)  # (B, H_kv, G, n)
    part_out = _empty(batch, heads, splits, group, dim)  # (B, H_kv, S, G, D)
    part_lse = _empty(batch, heads, splits, group)  # (B, H_kv, S, G)
    warm_format = layout.format
    at = np.array([layout.offsets.get(name, 0) for name in INT4_FIELDS], dtype=np.int64)
    pages = _numpy(slab)  # (P, page_bytes) uint8
    with numba.parallel_chunksize(1):  # items go to threads as they free up (this thread's setting, restored)
        _int4_attention(_numpy(rotated_queries), pages, pages.view(np.uint16), _numpy(rows, np.int64),
                        _numpy(positions, np.int64), _numpy(kv_start, np.int64), _numpy(kv_end, np.int64), at,
                        layout.block_size, warm_format.key_group, warm_format.key_per_channel, splits,
                        part_out.numpy(), part_lse.numpy(), page_lse.numpy(), out.numpy(), lse.numpy())
    return out, lse, page_lse if with_page_lse else None


def _empty(*shape: int) -> torch.Tensor:
    """A float32 output or scratch tensor; the kernel writes every element (tests poison this with NaN)."""
    return torch.empty(shape, dtype=torch.float32)


def _numpy(tensor: torch.Tensor, dtype=None) -> np.ndarray:
    """A C-contiguous numpy array over the tensor's memory (a copy only where the tensor is not contiguous or
    not of ``dtype``), so that numba always sees the same array types and compiles once."""
    array = tensor.detach().contiguous().numpy()
    return array if dtype is None else np.ascontiguousarray(array, dtype=dtype)


def _check_arguments(rotated_queries, slab, rows, positions, kv_start, kv_end, layout: PageLayout) -> None:
    """The kernel reads without bounds checks: reject shapes that disagree with the layout and rows outside the slab."""
    batch, heads, _, dim = rotated_queries.shape
    if (batch, heads, dim) != (layout.batch, layout.kv_heads, layout.head_dim):
        raise ValueError(f"queries {tuple(rotated_queries.shape)} do not match pages of {layout}")
    if slab.dtype != torch.uint8 or slab.dim() != 2 or slab.shape[1] != layout.page_bytes:
        raise ValueError(f"slab must be uint8 (P, {layout.page_bytes}), got {slab.dtype} {tuple(slab.shape)}")
    if rows.shape != positions.shape or rows.dim() != 1 or kv_start.shape != (batch,) or kv_end.shape != (batch,):
        raise ValueError("rows and positions must be (n,), kv_start and kv_end (B,)")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= slab.shape[0]):
        raise IndexError(f"slab rows must lie in [0, {slab.shape[0]})")


def _splits(pairs: int, count: int) -> int:
    """Page ranges per (sequence, KV head): enough items for every thread, each of at least a few pages."""
    threads = numba.get_num_threads()
    wanted = -(-ITEMS_PER_THREAD * threads // pairs)
    return max(1, min(wanted, -(-count // MIN_PAGES_PER_ITEM)))


# ------------------------------------------------------------------------------------------------ reference
def host_attention_reference(rotated_queries: torch.Tensor, slab: torch.Tensor, rows: torch.Tensor,
                             positions: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, layout: PageLayout,
                             sketch: torch.Tensor | None = None, with_page_lse: bool = False):
    """The same attention in plain torch, any format: dequantize the pages (a tile of REFERENCE_TILE_TOKENS at a
    time), mask by position, and merge the tiles by log-sum-exp; computes in the queries' dtype (float64 for a
    high-precision reference). Arguments and returns as :func:`host_attention`."""
    dtype = rotated_queries.dtype
    queries = rotated_queries.unsqueeze(3)  # (B, H_kv, G, 1, D)
    start, end = kv_start.reshape(-1, 1, 1, 1, 1), kv_end.reshape(-1, 1, 1, 1, 1)
    block = layout.block_size
    pages_per_tile = max(1, REFERENCE_TILE_TOKENS // block)
    accumulator, page_lse = PartialAccumulator(), []
    for first in range(0, rows.shape[0], pages_per_tile):
        tile = slice(first, first + pages_per_tile)
        fields = layout.views(slab[rows[tile]])  # (n, *field shape) each
        keys, values = layout.format.dequantize(fields, dtype, sketch)  # (n, B, H_kv, block, D) each
        keys, values = (x.permute(1, 2, 0, 3, 4).flatten(2, 3) for x in (keys, values))  # (B, H_kv, n * block, D)
        token_positions = (positions[tile, None] + torch.arange(block)).flatten()  # (n * block,)
        allowed = (token_positions >= start) & (token_positions < end)  # (B, 1, 1, 1, n * block)
        scores = masked_scores(queries, keys, allowed)  # (B, H_kv, G, 1, n * block)
        page_lse.append(scores.unflatten(-1, (-1, block)).logsumexp(-1).squeeze(3))  # (B, H_kv, G, n)
        accumulator.add(*attend_scores(scores, values))
    if accumulator.out is None:  # no pages
        out, lse = torch.zeros_like(rotated_queries), rotated_queries.new_full(rotated_queries.shape[:-1], -torch.inf)
        return out, lse, rotated_queries.new_empty(*rotated_queries.shape[:-1], 0) if with_page_lse else None
    out, lse = accumulator.out.squeeze(3), accumulator.lse.squeeze(3)
    return out, lse, torch.cat(page_lse, -1) if with_page_lse else None


# ------------------------------------------------------------------------------------------------ numba kernel
if numba is not None:
    # reassociation lets LLVM vectorize the dot products; no nnan/ninf: masked scores and empty ranges are -inf
    _FAST = {"reassoc", "contract", "nsz"}
    _HALF_BIAS = np.float32(2.0 ** 112)  # float16 exponent bias 15 -> float32 bias 127

    @numba.njit(inline="always")
    def _half(bits):
        """float16 bits (an unsigned integer) -> float32, subnormals, infinities and NaN included."""
        magnitude = np.uint32((np.uint32(bits) & np.uint32(0x7FFF)) << np.uint32(13))
        if (bits & 0x7C00) == 0x7C00:  # infinity or NaN
            value = np.uint32(magnitude | np.uint32(0x7F800000)).view(np.float32)
        else:
            value = magnitude.view(np.float32) * _HALF_BIAS
        return -value if bits & 0x8000 else value

    # 2^f = e^(f ln 2) on |f| <= 1/2 to degree 7: relative error under 1e-7, below float32's rounding
    _EXP2 = tuple(np.float32(math.log(2.0) ** k / math.factorial(k)) for k in range(8))

    @numba.njit(inline="always", fastmath=_FAST)
    def _exp(x):
        """e^x for x <= 0 (a score minus its maximum), vectorizable unlike math.exp (a libm call per element):
        2^n * 2^f with n = round(x log2 e) found in float64 (in float32 the rounding of x log2 e alone costs 4e-6
        at x = -90) and 2^f by polynomial; below e^-87 it returns about 1e-38 instead of 0 (weights sum to >= 1)."""
        y = max(np.float64(x) * 1.4426950408889634, -126.0)
        n = np.floor(y + 0.5)
        f = np.float32(y - n)
        c = _EXP2
        p = c[7] * f + c[6]
        p = p * f + c[5]
        p = p * f + c[4]
        p = p * f + c[3]
        p = p * f + c[2]
        p = p * f + c[1]
        p = p * f + c[0]
        return p * np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)

    @numba.njit(inline="always")
    def _field(memory, start, rows, columns):
        """rows * columns elements of one page's memory (1-D) from ``start``, as a (rows, columns) view."""
        return memory[start:start + rows * columns].reshape((rows, columns))

    @numba.njit(inline="always", fastmath=_FAST)
    def _decode(bits, first, last, out):
        """out[first:last] = float16 bits[first:last] (uint16) as float32."""
        source, target = bits[first:last], out[first:last]
        for i in range(source.shape[0]):
            target[i] = _half(source[i])

    @numba.njit(inline="always", fastmath=_FAST)
    def _decode_scale_codes(codes, base_bits, out):
        """out = float32 key scales from one-byte codes (D,) and their group's float16 base bits: the base's bits plus
        32 times the code (kvtier.int4.decode_key_scales)."""
        for i in range(codes.shape[0]):
            out[i] = _half(np.uint32(base_bits) + np.uint32(codes[i]) * np.uint32(32))

    @numba.njit(inline="always", fastmath=_FAST)
    def _unpack(packed, t, codes):
        """Token t of packed codes (block, D // 2) uint8 -> codes (D,) float32, the halves as packed. To vectorize,
        the inner index must be provably non-negative (so: by token and byte, not a flat offset) and the two halves
        separate views (LLVM cannot tell that codes[j + half] never meets codes[j])."""
        half = packed.shape[1]
        low, high = codes[:half], codes[half:]
        for j in range(half):
            byte = packed[t, j]  # uint8 arithmetic (not numba's default int64) converts eight codes per instruction
            low[j] = np.float32(np.uint8(byte & np.uint8(15)))
            high[j] = np.float32(np.uint8(byte >> np.uint8(4)))

    @numba.njit(inline="always")
    def _unpack_tile(packed, t, count, tile):
        """Tokens t..t+count-1 (count <= TILE) of packed codes (block, D // 2) -> tile (TILE, D) float32; rows past
        count are zeroed, so that the (zero) weights of tokens past the page's range meet zeros."""
        for k in range(TILE):
            if k < count:
                _unpack(packed, t + k, tile[k])
            else:
                tile[k, :] = 0.0

    @numba.njit(inline="always", fastmath=_FAST)
    def _dot(matrix, index, vector):
        """matrix[index] . vector, without taking a view (views cost reference counting in a hot loop)."""
        total = np.float32(0.0)
        for d in range(vector.shape[0]):
            total += matrix[index, d] * vector[d]
        return total

    @numba.njit(inline="always", fastmath=_FAST)
    def _dot_tile(matrix, index, tile):
        """matrix[index] . tile[k] for the TILE rows of tile (TILE, D): one load of matrix[index] serves four."""
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for d in range(tile.shape[1]):
            m = matrix[index, d]
            s0 += m * tile[0, d]
            s1 += m * tile[1, d]
            s2 += m * tile[2, d]
            s3 += m * tile[3, d]
        return s0, s1, s2, s3

    @numba.njit(fastmath=_FAST)
    def _key_scores_by_group(queries, key_codes, key_scale, key_scale_base, key_min, key_group, lo, hi, tile, channel,
                             folded, offsets, scores):
        """Scores (G, block + TILE) of tokens lo..hi-1 with per-channel key groups (key_scale (groups, D) one-byte
        codes, key_scale_base (groups,) and key_min (groups, D) float16 bits): per group the queries are folded into
        the scales (folded (G, D)) and minimums (offsets (G,)), then dotted with the tokens' codes, TILE tokens at a
        time. channel: (2, D) scratch."""
        group_count, dim = queries.shape
        for group in range(lo // key_group, (hi - 1) // key_group + 1):
            _decode_scale_codes(key_scale[group], key_scale_base[group], channel[0])
            _decode(key_min[group], 0, dim, channel[1])
            for g in range(group_count):
                for d in range(dim):
                    folded[g, d] = queries[g, d] * channel[0, d]
                offsets[g] = _dot(queries, g, channel[1])
            end = min(hi, (group + 1) * key_group)
            for t in range(max(lo, group * key_group), end, TILE):
                _unpack_tile(key_codes, t, min(TILE, end - t), tile)
                for g in range(group_count):
                    s0, s1, s2, s3 = _dot_tile(folded, g, tile)
                    offset = offsets[g]
                    scores[g, t], scores[g, t + 1] = offset + s0, offset + s1
                    scores[g, t + 2], scores[g, t + 3] = offset + s2, offset + s3

    @numba.njit(fastmath=_FAST)
    def _key_scores_by_token(queries, query_sums, key_codes, lo, hi, tile, params, scores):
        """Scores (G, block + TILE) of tokens lo..hi-1 with per-token keys: scale * (q . codes) + minimum * sum(q),
        TILE tokens at a time (params: decoded per-token parameters, see _decode_token_params)."""
        for t in range(lo, hi, TILE):
            _unpack_tile(key_codes, t, min(TILE, hi - t), tile)
            for g in range(queries.shape[0]):
                s0, s1, s2, s3 = _dot_tile(queries, g, tile)
                total = query_sums[g]
                scores[g, t] = params[KEY_SCALE, t] * s0 + params[KEY_MIN, t] * total
                scores[g, t + 1] = params[KEY_SCALE, t + 1] * s1 + params[KEY_MIN, t + 1] * total
                scores[g, t + 2] = params[KEY_SCALE, t + 2] * s2 + params[KEY_MIN, t + 2] * total
                scores[g, t + 3] = params[KEY_SCALE, t + 3] * s3 + params[KEY_MIN, t + 3] * total

    @numba.njit(fastmath=_FAST)
    def _page_weights(scores, lo, hi, page_max, page_total, page_lse, index):
        """scores[:, lo:hi] -> weights e^(score - the page's maximum), zero for the TILE tokens after hi (a last
        tile's reach); the page's maximum and total weight (G,) and its log-sum-exp into page_lse[:, index]."""
        for g in range(scores.shape[0]):
            row = scores[g, lo:hi]  # loops from 0 over a view: an index from lo could be negative, as numba sees it
            top = np.float32(-np.inf)
            for t in range(row.shape[0]):  # a select, not max(): numba's max() minds NaN and does not vectorize
                top = row[t] if row[t] > top else top
            total = np.float32(0.0)
            for t in range(row.shape[0]):
                weight = _exp(row[t] - top)
                row[t] = weight
                total += weight
            scores[g, hi:hi + TILE] = 0.0
            page_max[g], page_total[g] = top, total
            page_lse[g, index] = top + math.log(total)

    @numba.njit(fastmath=_FAST)
    def _accumulate_values(weights, value_codes, lo, hi, tile, params, page_acc, page_min):
        """One page's weighted values, summed apart from the running accumulator (shorter float32 sums):
        page_acc (G, D) = sum of weight * scale * codes and page_min (G,) = sum of weight * minimum over tokens
        lo..hi-1 (weights (G, block + TILE)), TILE tokens at a time: each load and store of page_acc serves four."""
        page_acc[:] = 0.0
        page_min[:] = 0.0
        for t in range(lo, hi, TILE):
            _unpack_tile(value_codes, t, min(TILE, hi - t), tile)
            for g in range(page_acc.shape[0]):
                w0, w1, w2, w3 = weights[g, t], weights[g, t + 1], weights[g, t + 2], weights[g, t + 3]
                page_min[g] += (w0 * params[VALUE_MIN, t] + w1 * params[VALUE_MIN, t + 1]
                                + w2 * params[VALUE_MIN, t + 2] + w3 * params[VALUE_MIN, t + 3])
                w0, w1 = w0 * params[VALUE_SCALE, t], w1 * params[VALUE_SCALE, t + 1]
                w2, w3 = w2 * params[VALUE_SCALE, t + 2], w3 * params[VALUE_SCALE, t + 3]
                for d in range(page_acc.shape[1]):
                    page_acc[g, d] += w0 * tile[0, d] + w1 * tile[1, d] + w2 * tile[2, d] + w3 * tile[3, d]

    @numba.njit(fastmath=_FAST)
    def _fold_page(state, acc, page_acc, page_min, page_max, page_total):
        """Online softmax: merge one page's sums (relative to its own maximum) into the running ones (relative to
        the running maximum, state[ROW_MAX]) by log-sum-exp. The page's codes and minimums meet here, so that the
        running sum holds weighted values (near zero for centered values) rather than two large sums that cancel."""
        for g in range(acc.shape[0]):
            new_max = max(state[ROW_MAX, g], page_max[g])
            alpha, beta = math.exp(state[ROW_MAX, g] - new_max), math.exp(page_max[g] - new_max)
            for d in range(acc.shape[1]):
                acc[g, d] = acc[g, d] * alpha + (page_acc[g, d] + page_min[g]) * beta
            state[TOTAL, g] = state[TOTAL, g] * alpha + page_total[g] * beta
            state[ROW_MAX, g] = new_max

    @numba.njit(fastmath=_FAST)
    def _decode_token_params(page_halves, at, pair, block, per_channel, lo, hi, params):
        """params (4, block + TILE) float32: each token's value scale and minimum (and key scale and minimum with
        per-token keys) for tokens lo..hi-1, zero for the TILE tokens after hi (a last tile's reach)."""
        start = pair * block
        _decode(page_halves[at[VALUE_SCALE_AT] // 2 + start:], lo, hi, params[VALUE_SCALE])
        _decode(page_halves[at[VALUE_MIN_AT] // 2 + start:], lo, hi, params[VALUE_MIN])
        if not per_channel:
            _decode(page_halves[at[KEY_SCALE_AT] // 2 + start:], lo, hi, params[KEY_SCALE])
            _decode(page_halves[at[KEY_MIN_AT] // 2 + start:], lo, hi, params[KEY_MIN])
        params[:, hi:hi + TILE] = 0.0

    @numba.njit(fastmath=_FAST)
    def _attend_page(queries, query_sums, page, page_halves, at, pair, block, key_group, per_channel, lo, hi, index,
                     scratch, state, acc, page_lse):
        """One page's tokens lo..hi-1 for one (sequence, KV head) ``pair`` (page (page_bytes,) uint8 and
        page_halves, the same bytes as uint16), folded into the running softmax (state, acc)."""
        tile, params, channel, folded, offsets, scores, page_acc, page_sums = scratch
        half, dim = queries.shape[1] // 2, queries.shape[1]
        _decode_token_params(page_halves, at, pair, block, per_channel, lo, hi, params)
        key_codes = _field(page, at[KEY_CODES_AT] + pair * block * half, block, half)  # (block, D // 2)
        if per_channel:
            groups = block // key_group
            key_scale = _field(page, at[KEY_SCALE_AT] + pair * groups * dim, groups, dim)  # (groups, D) codes
            key_scale_base = page_halves[at[KEY_SCALE_BASE_AT] // 2 + pair * groups:]  # (groups,) from here
            key_min = _field(page_halves, at[KEY_MIN_AT] // 2 + pair * groups * dim, groups, dim)
            _key_scores_by_group(queries, key_codes, key_scale, key_scale_base, key_min, key_group, lo, hi, tile,
                                 channel, folded, offsets, scores)
        else:
            _key_scores_by_token(queries, query_sums, key_codes, lo, hi, tile, params, scores)
        page_max, page_total, page_min = page_sums[0], page_sums[1], page_sums[2]
        _page_weights(scores, lo, hi, page_max, page_total, page_lse, index)
        value_codes = _field(page, at[VALUE_CODES_AT] + pair * block * half, block, half)  # (block, D // 2)
        _accumulate_values(scores, value_codes, lo, hi, tile, params, page_acc, page_min)
        _fold_page(state, acc, page_acc, page_min, page_max, page_total)

    @numba.njit(fastmath=_FAST)
    def _attend_range(queries, pages, halves, rows, positions, first, last, start, end, at, pair, block, key_group,
                      per_channel, page_lse, out, lse):
        """One work item: queries (G, D) of one (sequence, KV head) ``pair`` over pages first..last-1 -> its
        partial out (G, D) and lse (G,), and page_lse[:, first:last]. ``at``: each INT4 field's byte offset."""
        group, dim = queries.shape
        scratch = (np.zeros((TILE, dim), dtype=np.float32),  # tile: unpacked codes of TILE tokens
                   np.zeros((4, block + TILE), dtype=np.float32),  # params: decoded per-token parameters
                   np.zeros((2, dim), dtype=np.float32),  # channel: one key group's decoded scale and minimum
                   np.zeros((group, dim), dtype=np.float32),  # folded: queries times a key group's scales
                   np.zeros(group, dtype=np.float32),  # offsets: queries . a key group's minimums
                   np.zeros((group, block + TILE), dtype=np.float32),  # scores, then weights; TILE of padding
                   np.zeros((group, dim), dtype=np.float32),  # page_acc: the page's weighted scaled value codes
                   np.zeros((3, group), dtype=np.float32))  # page_sums: maximum, total weight, weighted minimums
        state = np.zeros((2, group), dtype=np.float32)  # running maximum and total weight
        state[ROW_MAX] = -np.inf
        acc = np.zeros((group, dim), dtype=np.float32)  # running weighted values
        query_sums = queries.sum(axis=1)
        for index in range(first, last):
            lo, hi = max(0, start - positions[index]), min(block, end - positions[index])
            if hi <= lo:  # the whole page lies outside this sequence's range: not read
                page_lse[:, index] = -np.inf
                continue
            row = rows[index]
            _attend_page(queries, query_sums, pages[row], halves[row], at, pair, block, key_group, per_channel, lo, hi,
                         index, scratch, state, acc, page_lse)
        for g in range(group):
            attended = state[TOTAL, g] > 0
            lse[g] = state[ROW_MAX, g] + math.log(state[TOTAL, g]) if attended else -np.inf
            for d in range(dim):
                out[g, d] = acc[g, d] / state[TOTAL, g] if attended else 0.0

    @numba.njit(fastmath=_FAST)
    def _merge(part_out, part_lse, out, lse):
        """Log-sum-exp merge of one (sequence, KV head, query head)'s splits: part_out (S, D), part_lse (S,)."""
        top = np.float32(-np.inf)
        for split in range(part_lse.shape[0]):
            top = max(top, part_lse[split])
        out[:] = 0.0
        if top == -np.inf:
            lse[0] = -np.inf
            return
        total = np.float32(0.0)
        for split in range(part_lse.shape[0]):
            weight = np.float32(math.exp(part_lse[split] - top))
            total += weight
            for d in range(out.shape[0]):
                out[d] += weight * part_out[split, d]
        for d in range(out.shape[0]):
            out[d] /= total
        lse[0] = top + math.log(total)

    @numba.njit(parallel=True, fastmath=_FAST)
    def _int4_attention(queries, pages, halves, rows, positions, kv_start, kv_end, at, block, key_group, per_channel,
                        splits, part_out, part_lse, page_lse, out, lse):
        """queries (B, H_kv, G, D); pages (P, page_bytes) uint8 and halves, the same memory as uint16; rows,
        positions (n,); at: byte offsets of INT4_FIELDS in a page. Work items run split-major, so that each
        thread's contiguous share of items spans every sequence (ragged ranges balance out)."""
        batch, heads, group, _ = queries.shape
        count = rows.shape[0]
        per_split = -(-count // splits)
        for item in prange(splits * batch * heads):
            split, pair = item // (batch * heads), item % (batch * heads)
            b, h = pair // heads, pair % heads
            first, last = min(count, split * per_split), min(count, (split + 1) * per_split)
            _attend_range(queries[b, h], pages, halves, rows, positions, first, last, kv_start[b], kv_end[b], at,
                          pair, block, key_group, per_channel, page_lse[b, h], part_out[b, h, split],
                          part_lse[b, h, split])
        for item in prange(batch * heads * group):
            b, h, g = item // (heads * group), item // group % heads, item % group
            _merge(part_out[b, h, :, g], part_lse[b, h, :, g], out[b, h, g], lse[b, h, g:g + 1])
