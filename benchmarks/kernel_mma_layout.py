"""Trial: a Gluon INT4 decode kernel whose loads are tensor-core operands as loaded, over a page that differs from
kvtier's INT4 page only in how value codes are ordered.

kvtier's page kernel (kernels/decode_attention.py) issues about 1,400 instructions per warp for each 128-token tile
of INT4 pages and reads them at 1.2-1.4 TB/s: Triton moves the unpacked codes through shared memory to put them in
the tensor cores' operand layout. This kernel is written in Gluon (Triton's layout-explicit language), where a load
can be given that layout directly, and it computes the products transposed, tokens as the MMA rows:
scores^T (tokens x query rows) = K (q s)^T, out^T = V^T P^T, so the 4 query rows of a KV head pad to 8 MMA
columns instead of 16 rows.
- Key codes and all scales and minimums are read as kvtier stores them. A thread loads 16 contiguous code bytes of a
  token; the MMA's reduction index k is mapped to whichever channel those registers hold (the query and the key
  group's scales and minimums are gathered in that order), so the unpacked registers are the operand as they are.
- Value codes are stored channel-major, a row of 64 tokens per code byte, tokens permuted within each 32-token step
  (VALUE_TOKEN_POSITIONS), so that the 8 tokens of a channel a thread needs are one 64-bit load: an MMA register
  holds two consecutive tokens of one channel, which kvtier's token-major rows keep 64 bytes apart.
- Register relabels are checked free at compile time (``convert_layout(assert_trivial=True)``).
One warp a program, a page a loop iteration in two steps of one key group (32 tokens); key scales folded into the
query, key minimums and the unpacking's offsets added by small MMAs; the softmax rescales only when a row's maximum
grows. Like kvtier's kernel it also reads hot bf16 rows (kvtier's hot buffer and table) and writes each warm page's
log2-sum-exp for the policies' page mass; splits merge by log-sum-exp.

A benchmark of the layout, not kvtier's kernel: decode rows only (up to 8 query rows a KV head), head dim 128,
pages of 64 tokens, key groups of 32. `python benchmarks/kernel_mma_layout.py` on a GPU checks it against a float64
reference (outputs and page mass) and times it beside torch SDPA on bf16; `--sass` compiles it offline for sm_90 and
counts its loops' instructions.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

BLOCK, HEAD_DIM, HALF, STEP = 64, 128, 64, 32  # page tokens, channels, code bytes, key group (a loop step)
KV_HEADS, QUERY_HEADS, ALIGNMENT = 8, 32, 16  # Llama-3.1-8B's heads; page offsets in 16-byte units
SWAP = (0, 2, 1, 3)  # the lop3 unpacking returns a word's bytes in this order
LOG2_E = 1.4426950408889634


def _value_token_position(k: int) -> int:
    """Memory column of token k of a 32-token step in a value code byte's row: an m16n8k16 operand gives thread t of
    a quad the tokens 16s + 8h + 2t + e; they are stored together (8 a thread), then SWAPped within 4-byte words."""
    s, h, t, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    position = 8 * t + 4 * s + 2 * h + e
    return (position & ~3) | SWAP[position & 3]


VALUE_TOKEN_POSITIONS = tuple(_value_token_position(k) for k in range(STEP))


def page_fields(rows: int) -> tuple[dict, int]:
    """Byte offsets of a page's fields for ``rows`` = batch x KV heads, and the page's size (148 bytes a token and
    row, as kvtier's INT4 page)."""
    sizes = {"key_codes": rows * BLOCK * HALF, "value_codes": rows * HALF * BLOCK,
             "key_scale": rows * 2 * HEAD_DIM * 2, "key_min": rows * 2 * HEAD_DIM * 2,
             "value_scale": rows * BLOCK * 2, "value_min": rows * BLOCK * 2}
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = at
        at += size
    return offsets, at


# lop3 unpacking of one 32-bit word of 4 code bytes into 8 float16 (elements from bytes SWAP): keys as 1024 + low
# nibble and 64 + high nibble (5 instructions); values both as 64 + nibble (7 instructions; a smaller offset to
# take off a sum that runs over the whole split)
UNPACK_KEYS = gl.constexpr("""
{
.reg .b32 right8;
shr.b32 right8, $4, 8;
lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, right8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, $4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $3, right8, 0x00F000F0, 0x54005400, 0xEA;
}
""")
UNPACK_VALUES = gl.constexpr("""
{
.reg .b32 left4, right4, right8;
shl.b32 left4, $4, 4;
shr.b32 right4, $4, 4;
shr.b32 right8, $4, 8;
lop3.b32 $0, left4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $1, right4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $2, $4, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 $3, right8, 0x00F000F0, 0x54005400, 0xEA;
}
""")
KEY_LOW_OFFSET, KEY_HIGH_OFFSET, VALUE_OFFSET = (gl.constexpr(value) for value in (1024.0, 64.0, 64.0))
G_BLOCK, G_HALF, G_STEP, G_HEAD_DIM = (gl.constexpr(value) for value in (BLOCK, HALF, STEP, HEAD_DIM))


@gluon.jit
def _unpacked(codes, ASM: gl.constexpr):
    """uint8 codes -> (low nibbles, high nibbles) as float16 plus the asm's offsets, in the same layout."""
    return gl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,=r,=r,r", args=[codes],
                                     dtype=(gl.float16, gl.float16), is_pure=True, pack=4)


@gluon.jit
def _key_a_operand(unpacked, a_layout: gl.constexpr):
    """(STEP tokens, 64 positions) as loaded -> (STEP tokens, 64 code bytes) A operand; registers do not move."""
    unpacked = gl.permute(gl.reshape(unpacked, [32, 4, 4, 2, 2]), [0, 2, 3, 1, 4])  # (token, s, h, t, e)
    return gl.convert_layout(gl.reshape(unpacked, [32, 64]), a_layout, assert_trivial=True)


@gluon.jit
def _value_a_operand(unpacked, a_layout: gl.constexpr):
    """(64 code bytes, STEP positions) as loaded -> (64 code bytes, STEP tokens) A operand; registers do not move."""
    unpacked = gl.permute(gl.reshape(unpacked, [64, 4, 2, 2, 2]), [0, 2, 3, 1, 4])  # (byte, s, h, t, e)
    return gl.convert_layout(gl.reshape(unpacked, [64, 32]), a_layout, assert_trivial=True)


@gluon.jit
def _key_parameters(row_ptr, vector_layout: gl.constexpr):
    """A key group's 64 float16 parameters of one half, in kvtier's channel order: 16 contiguous channels a thread
    (the run its key codes came from), relabelled to the operand indices of ``vector_layout`` (a slice of an operand
    layout) as the unpacked codes are: k = 16s + 8h + 2t + e reads channel 16t + 4s + 2e + h."""
    load_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [1, 1], [0, 1])  # (t, 16): lane % 4 = t
    runs = gl.arange(0, 4, layout=gl.SliceLayout(1, load_layout))[:, None] * 16 + \
        gl.arange(0, 16, layout=gl.SliceLayout(0, load_layout))[None, :]
    values = gl.load(row_ptr + runs)  # (4 t, 16: s, e, h), in kvtier's channel order
    values = gl.permute(gl.reshape(values, [4, 4, 2, 2]), [1, 3, 0, 2])  # (s, h, t, e)
    return gl.convert_layout(gl.reshape(values, [64]), vector_layout, assert_trivial=True)


@gluon.jit
def _rescaled(step_max, running_max, running_sum, value_bias, low_acc, high_acc, offset_acc):
    """The online softmax's state after a step whose row maxima are ``step_max`` (8,), rescaled only when some row's
    maximum grows, and the factor it was rescaled by (ones otherwise)."""
    factor = gl.full(step_max.shape, 1.0, gl.float32, layout=step_max.type.layout)
    if gl.max(step_max - running_max, axis=0) > 0.0:
        new_max = gl.maximum(running_max, step_max)
        factor = gl.exp2(running_max - new_max)
        running_sum = running_sum * factor
        value_bias = value_bias * factor
        low_acc = low_acc * factor[None, :]
        high_acc = high_acc * factor[None, :]
        offset_acc = offset_acc * factor[None, :]
        running_max = new_max
    return running_max, running_sum, value_bias, low_acc, high_acc, offset_acc, factor


@gluon.jit
def _decode_kernel(
    query_ptr,  # (B, H_q, D) bf16
    page_base_ptr, page_offset_ptr, page_position_ptr,  # uint8 base; (P,) int64 offsets in ALIGN units; (P,) int32
    kv_start_ptr, kv_end_ptr,  # (B,) int32 window
    partial_ptr, partial_lse_ptr,  # (B, H_q, S, D), (B, H_q, S) float32 per split
    page_lse_ptr,  # (B, H_q, P) float32 log2-sum-exp of each page's scores (WITH_MASS)
    hot_keys_ptr, hot_values_ptr, hot_table_ptr, hot_pages,  # hot buffers (B, H_kv, T, D) bf16; table (3, n_hot)
    hot_stride_batch, hot_stride_head, hot_stride_token,
    scale_log2, page_count, pages_per_split, splits, group,
    KV_HEADS_: gl.constexpr, ALIGN: gl.constexpr, VALUE_CODES_AT: gl.constexpr, KEY_SCALE_AT: gl.constexpr,
    KEY_MIN_AT: gl.constexpr, VALUE_SCALE_AT: gl.constexpr, VALUE_MIN_AT: gl.constexpr, WITH_MASS: gl.constexpr,
):
    # transposed products: scores^T (tokens x heads) = K (tokens x channels) . (q s)^T; out^T = V^T . P^T
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    key_load: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [1, 1], [1, 0])  # 16 bytes of a token a thread
    value_load: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, 1], [1, 0])  # 8 tokens of a code byte a thread
    heads_layout: gl.constexpr = gl.SliceLayout(0, mma)  # (8,) query rows, the columns of the products
    tokens_layout: gl.constexpr = gl.SliceLayout(1, mma)
    channel_vector: gl.constexpr = gl.SliceLayout(1, b_layout)  # key parameters for (q s)^T
    min_vector: gl.constexpr = gl.SliceLayout(0, a_layout)  # key minimums, rows of an A operand

    sequence_head = gl.program_id(0)
    split = gl.program_id(1)
    batch_index = sequence_head // KV_HEADS_

    # (q s)^T needs q^T as a B operand: (64 channels, 8 rows)
    operand_k = gl.arange(0, G_HALF, layout=gl.SliceLayout(1, b_layout))
    # the code byte an operand index reads as loaded: run 16t + 4s + 2h + e of thread t, bytes 1 and 2 of each
    # word swapped by the unpacking
    run = (operand_k // 2 % 4) * 16 + (operand_k // 16) * 4 + (operand_k // 8 % 2) * 2 + operand_k % 2
    query_channels = (run & ~3) | ((run & 1) << 1) | ((run >> 1) & 1)
    query_heads = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
    query_at = query_ptr + (sequence_head * group + query_heads)[None, :] * G_HEAD_DIM + query_channels[:, None]
    query_ok = (query_heads < group)[None, :]
    query_low = (gl.load(query_at, mask=query_ok, other=0.0).to(gl.float32) * scale_log2).to(gl.float16)  # (64, 8)
    query_high = (gl.load(query_at + G_HALF, mask=query_ok, other=0.0).to(gl.float32) * scale_log2).to(gl.float16)
    kv_start = gl.load(kv_start_ptr + batch_index)
    kv_end = gl.load(kv_end_ptr + batch_index)

    running_max = gl.full([8], -1.0e30, gl.float32, layout=heads_layout)
    running_sum = gl.zeros([8], gl.float32, layout=heads_layout)
    value_bias = gl.zeros([8], gl.float32, layout=heads_layout)
    low_acc = gl.zeros([G_HALF, 8], gl.float32, layout=mma)  # (channels, rows): sum of (w s_t) (64 + c), hot w v
    high_acc = gl.zeros([G_HALF, 8], gl.float32, layout=mma)
    offset_acc = gl.zeros([16, 8], gl.float32, layout=mma)  # sum of w s_t as the MMAs saw it (16 equal rows)

    key_offsets = (gl.arange(0, G_STEP, layout=gl.SliceLayout(1, key_load))[:, None] * G_HALF
                   + gl.arange(0, G_HALF, layout=gl.SliceLayout(0, key_load))[None, :])  # (STEP, 64)
    value_offsets = (gl.arange(0, G_HALF, layout=gl.SliceLayout(1, value_load))[:, None] * G_BLOCK
                     + gl.arange(0, G_STEP, layout=gl.SliceLayout(0, value_load))[None, :])  # (64, STEP)
    tokens = gl.arange(0, G_STEP, layout=tokens_layout)
    minus_key_low_offset = gl.full([16, G_HALF], -KEY_LOW_OFFSET, gl.float16, layout=a_layout)
    minus_key_high_offset = gl.full([16, G_HALF], -KEY_HIGH_OFFSET, gl.float16, layout=a_layout)
    ones = gl.full([16, G_STEP], 1.0, gl.float16, layout=a_layout)

    first = split * pages_per_split
    last_all = gl.minimum(first + pages_per_split, page_count + hot_pages)
    last = gl.minimum(last_all, page_count)
    for page in range(first, last):
        page_ptr = page_base_ptr + gl.load(page_offset_ptr + page).to(gl.int64) * ALIGN
        position0 = gl.load(page_position_ptr + page)
        page_sum = gl.zeros([8], gl.float32, layout=heads_layout)
        for half_page in gl.static_range(2):  # one key group a step
            token0 = half_page * G_STEP
            key_codes = gl.load(page_ptr + (sequence_head * G_BLOCK + token0) * G_HALF + key_offsets)
            value_codes = gl.load(page_ptr + VALUE_CODES_AT + sequence_head * G_HALF * G_BLOCK + token0
                                  + value_offsets)
            group_row = (sequence_head * 2 + half_page) * G_HEAD_DIM
            scale_ptr = (page_ptr + KEY_SCALE_AT).to(gl.pointer_type(gl.float16)) + group_row
            min_ptr = (page_ptr + KEY_MIN_AT).to(gl.pointer_type(gl.float16)) + group_row
            folded_low = query_low * _key_parameters(scale_ptr, channel_vector)[:, None]  # (64, 8) float16
            folded_high = query_high * _key_parameters(scale_ptr + G_HALF, channel_vector)[:, None]
            zero_rows = gl.zeros([16, G_HALF], gl.float16, layout=a_layout)  # minimums broadcast to 16 equal rows
            column_terms = gl.zeros([16, 8], gl.float32, layout=mma)
            min_low = gl.broadcast(_key_parameters(min_ptr, min_vector)[None, :], zero_rows)[0]
            min_high = gl.broadcast(_key_parameters(min_ptr + G_HALF, min_vector)[None, :], zero_rows)[0]
            column_terms = mma_v2(min_low, query_low, column_terms)
            column_terms = mma_v2(min_high, query_high, column_terms)
            column_terms = mma_v2(minus_key_low_offset, folded_low, column_terms)
            column_terms = mma_v2(minus_key_high_offset, folded_high, column_terms)
            key_low, key_high = _unpacked(key_codes, UNPACK_KEYS)  # (STEP, 64) each, as loaded
            scores = gl.zeros([G_STEP, 8], gl.float32, layout=mma) + gl.max(column_terms, axis=0)[None, :]
            scores = mma_v2(_key_a_operand(key_low, a_layout), folded_low, scores)
            scores = mma_v2(_key_a_operand(key_high, a_layout), folded_high, scores)  # (STEP, 8)
            positions = position0 + token0 + tokens
            scores = gl.where(((positions >= kv_start) & (positions < kv_end))[:, None], scores, float("-inf"))

            running_max, running_sum, value_bias, low_acc, high_acc, offset_acc, factor = _rescaled(
                gl.max(scores, axis=0), running_max, running_sum, value_bias, low_acc, high_acc, offset_acc)
            page_sum = page_sum * factor
            weights = gl.exp2(scores - running_max[None, :])  # (STEP, 8)
            step_sum = gl.sum(weights, axis=0)
            running_sum += step_sum
            page_sum += step_sum

            token_at = sequence_head * G_BLOCK + token0 + tokens
            value_scale = gl.load((page_ptr + VALUE_SCALE_AT).to(gl.pointer_type(gl.float16)) + token_at).to(
                gl.float32)
            value_min = gl.load((page_ptr + VALUE_MIN_AT).to(gl.pointer_type(gl.float16)) + token_at).to(gl.float32)
            value_bias += gl.sum(weights * value_min[:, None], axis=0)
            scaled = gl.convert_layout((weights * value_scale[:, None]).to(gl.float16), b_layout)  # (STEP, 8)
            value_low, value_high = _unpacked(value_codes, UNPACK_VALUES)  # (64, STEP) each, as loaded
            offset_acc = mma_v2(ones, scaled, offset_acc)
            low_acc = mma_v2(_value_a_operand(value_low, a_layout), scaled, low_acc)
            high_acc = mma_v2(_value_a_operand(value_high, a_layout), scaled, high_acc)

        if WITH_MASS:
            page_lse = running_max + gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [page_sum],
                                                               dtype=gl.float32, is_pure=True, pack=1)
            mass_heads = gl.arange(0, 8, layout=heads_layout)
            gl.store(page_lse_ptr + (sequence_head * group + mass_heads) * page_count + page, page_lse,
                     mask=mass_heads < group)

    # hot pages: bf16 rows of the hot buffer, 32 tokens a step; the plain query (unscaled bf16) as the B operand
    plain_channels = gl.arange(0, G_HEAD_DIM, layout=gl.SliceLayout(1, b_layout))
    plain_query = gl.load(query_ptr + (sequence_head * group + query_heads)[None, :] * G_HEAD_DIM
                          + plain_channels[:, None], mask=query_ok, other=0.0)  # (D, 8) bf16
    hot_load: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])  # (32 tokens, 64 channels)
    hot_tokens = gl.arange(0, G_STEP, layout=gl.SliceLayout(1, hot_load))
    hot_channels = gl.arange(0, G_HALF, layout=gl.SliceLayout(0, hot_load))
    hot_base = batch_index.to(gl.int64) * hot_stride_batch + (sequence_head % KV_HEADS_).to(gl.int64) * hot_stride_head
    for hot in range(gl.maximum(first, page_count), last_all):
        row = hot - page_count
        hot_offset = gl.load(hot_table_ptr + row)
        hot_position = gl.load(hot_table_ptr + hot_pages + row)
        hot_count = gl.load(hot_table_ptr + 2 * hot_pages + row)
        for sub in gl.static_range(4):  # HOT_TILE 128 = 4 steps of 32
            if sub * 32 < hot_count:
                token_ok = (sub * 32 + hot_tokens < hot_count)[:, None]
                at = hot_base + (hot_offset + sub * 32 + hot_tokens)[:, None].to(gl.int64) * hot_stride_token + \
                    hot_channels[None, :]
                key_low = gl.load(hot_keys_ptr + at, mask=token_ok, other=0.0)  # (32, 64) bf16
                key_high = gl.load(hot_keys_ptr + at + G_HALF, mask=token_ok, other=0.0)
                keys = gl.convert_layout(gl.reshape(gl.permute(gl.join(key_low, key_high), [0, 2, 1]), [32, 128]),
                                         a_layout)
                scores = mma_v2(keys, plain_query, gl.zeros([G_STEP, 8], gl.float32, layout=mma)) * scale_log2
                positions = hot_position + sub * 32 + tokens
                ok = (sub * 32 + tokens < hot_count) & (positions >= kv_start) & (positions < kv_end)
                scores = gl.where(ok[:, None], scores, float("-inf"))
                running_max, running_sum, value_bias, low_acc, high_acc, offset_acc, _ = _rescaled(
                    gl.max(scores, axis=0), running_max, running_sum, value_bias, low_acc, high_acc, offset_acc)
                weights = gl.exp2(scores - running_max[None, :])
                running_sum += gl.sum(weights, axis=0)
                plain_weights = gl.convert_layout(weights.to(gl.bfloat16), b_layout)  # (32, 8)
                value_low = gl.load(hot_values_ptr + at, mask=token_ok, other=0.0)  # (32, 64)
                value_high = gl.load(hot_values_ptr + at + G_HALF, mask=token_ok, other=0.0)
                low_acc = mma_v2(gl.convert_layout(gl.permute(value_low, [1, 0]), a_layout), plain_weights, low_acc)
                high_acc = mma_v2(gl.convert_layout(gl.permute(value_high, [1, 0]), a_layout), plain_weights,
                                  high_acc)

    bias = value_bias - VALUE_OFFSET * gl.max(offset_acc, axis=0)  # (8,)
    safe_sum = gl.where(running_sum == 0.0, 1.0, running_sum)
    lse = gl.where(running_sum == 0.0, float("-inf"), running_max + gl.log2(safe_sum))
    out_heads = gl.arange(0, 8, layout=heads_layout)
    out_channels = gl.arange(0, G_HALF, layout=tokens_layout)
    head_ok = out_heads < group
    split_rows = (sequence_head * group + out_heads) * splits + split
    gl.store(partial_lse_ptr + split_rows, lse, mask=head_ok)
    out_at = partial_ptr + split_rows[None, :] * G_HEAD_DIM + out_channels[:, None]
    gl.store(out_at, (low_acc + bias[None, :]) / safe_sum[None, :], mask=head_ok[None, :])
    gl.store(out_at + G_HALF, (high_acc + bias[None, :]) / safe_sum[None, :], mask=head_ok[None, :])


@triton.jit
def _merge_kernel(partial_ptr, partial_lse_ptr, out_ptr, total_lse_ptr, splits, SPLITS_PAD: tl.constexpr,
                  DIM: tl.constexpr):
    """One query row: its splits' outputs weighted by their log2-sum-exp."""
    row = tl.program_id(0)
    split = tl.arange(0, SPLITS_PAD)
    ok = split < splits
    lse = tl.load(partial_lse_ptr + row * splits + split, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(ok, tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    channels = tl.arange(0, DIM)
    parts = tl.load(partial_ptr + (row * splits + split)[:, None] * DIM + channels[None, :], mask=ok[:, None],
                    other=0.0)
    tl.store(out_ptr + row * DIM + channels, (tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)).to(tl.bfloat16))
    tl.store(total_lse_ptr + row, tl.where(top == float("-inf"), 0.0, top) + tl.log2(tl.sum(weight, 0)))


def field_constants(rows: int) -> dict:
    offsets, _ = page_fields(rows)
    return {"VALUE_CODES_AT": offsets["value_codes"], "KEY_SCALE_AT": offsets["key_scale"],
            "KEY_MIN_AT": offsets["key_min"], "VALUE_SCALE_AT": offsets["value_scale"],
            "VALUE_MIN_AT": offsets["value_min"]}


def decode(query, pages: dict, kv_start, kv_end, scale: float, pages_per_split: int, poison: bool = False,
           with_mass=False, page_lse=None, total_lse=None, hot=None) -> torch.Tensor:
    """Attention of query (B, H_q, D) bf16 over ``pages`` (build_pages) and ``hot`` (build_hot) in the window."""
    batch = query.shape[0]
    page_count = pages["offsets"].shape[0]
    hot_pages = 0 if hot is None else hot["table"].shape[1]
    splits = triton.cdiv(page_count + hot_pages, pages_per_split)
    partial = torch.empty(batch, QUERY_HEADS, splits, HEAD_DIM, device=query.device, dtype=torch.float32)
    partial_lse = torch.empty(batch, QUERY_HEADS, splits, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query)
    if poison:  # a check: every output written by the kernels
        for buffer in (partial, partial_lse, out):
            buffer.fill_(float("nan"))
    if page_lse is None:
        page_lse = torch.empty(batch, QUERY_HEADS, page_count if with_mass else 1, device=query.device)
    if total_lse is None:
        total_lse = torch.empty(batch, QUERY_HEADS, device=query.device)
    if hot is None:
        hot_keys = hot_values = torch.empty(1, 1, 1, HEAD_DIM, device=query.device, dtype=torch.bfloat16)
        hot_table = torch.zeros(3, 1, device=query.device, dtype=torch.int32)
    else:
        hot_keys, hot_values, hot_table = hot["keys"], hot["values"], hot["table"]
    _decode_kernel[(batch * KV_HEADS, splits)](
        query, pages["base"], pages["offsets"], pages["positions"], kv_start, kv_end, partial, partial_lse, page_lse,
        hot_keys, hot_values, hot_table, hot_pages, hot_keys.stride(0), hot_keys.stride(1), hot_keys.stride(2),
        scale * LOG2_E, page_count, pages_per_split, splits, QUERY_HEADS // KV_HEADS,
        KV_HEADS_=KV_HEADS, ALIGN=ALIGNMENT, **field_constants(batch * KV_HEADS), WITH_MASS=with_mass, num_warps=1)
    _merge_kernel[(batch * QUERY_HEADS,)](partial, partial_lse, out, total_lse, splits,
                                          SPLITS_PAD=triton.next_power_of_2(splits), DIM=HEAD_DIM)
    return out


def build_hot(batch: int, first_position: int, segments: list[int], seed: int, device="cuda") -> dict:
    """A bf16 hot buffer holding ``sum(segments)`` tokens from ``first_position`` on, as rows of at most 128."""
    generator = torch.Generator(device=device).manual_seed(seed)
    total = sum(segments)
    keys = torch.randn(batch, KV_HEADS, total, HEAD_DIM, generator=generator, device=device).bfloat16()
    values = torch.randn(batch, KV_HEADS, total, HEAD_DIM, generator=generator, device=device).bfloat16()
    rows, offset = [], 0
    for count in segments:
        for first in range(0, count, 128):
            rows.append((offset + first, first_position + offset + first, min(128, count - first)))
        offset += count
    table = torch.tensor(rows, dtype=torch.int32).T.contiguous().to(device)
    return {"keys": keys, "values": values, "table": table}


def build_pages(batch: int, tokens: int, seed: int, device="cuda") -> dict:
    """Random INT4 pages for ``tokens`` (a multiple of 64) in this layout, at shuffled places in one buffer, and
    their logical codes and parameters for the reference."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, page_count = batch * KV_HEADS, tokens // BLOCK
    _, page_bytes = page_fields(rows)

    def codes():  # (P, rows, 64 tokens, 64 bytes): byte k holds channels k (low nibble) and k + 64 (high)
        return torch.randint(0, 256, (page_count, rows, BLOCK, HALF), generator=generator, device=device,
                             dtype=torch.uint8)

    def uniform(*shape):
        return (torch.rand(*shape, generator=generator, device=device) * 0.3 + 0.05).half()

    def normal(*shape):
        return (torch.randn(*shape, generator=generator, device=device) - 1.0).half()

    logical = {"key_codes": codes(), "value_codes": codes(), "key_scale": uniform(page_count, rows, 2, HEAD_DIM),
               "key_min": normal(page_count, rows, 2, HEAD_DIM), "value_scale": uniform(page_count, rows, BLOCK),
               "value_min": normal(page_count, rows, BLOCK)}
    key_codes = logical["key_codes"]  # kvtier's own order, as are the scales and minimums
    by_byte = logical["value_codes"].transpose(2, 3)  # (P, rows, 64 bytes, 64 tokens)
    value_codes = torch.empty_like(by_byte)
    for token0 in range(0, BLOCK, STEP):
        places_in_step = token0 + torch.tensor(VALUE_TOKEN_POSITIONS, device=device)
        value_codes[..., places_in_step] = by_byte[..., token0:token0 + STEP]
    fields = [key_codes, value_codes] + [logical[name].view(torch.uint8) for name in
                                         ("key_scale", "key_min", "value_scale", "value_min")]
    page = torch.cat([field.reshape(page_count, -1) for field in fields], 1)  # (P, page_bytes)
    places = torch.randperm(page_count, generator=generator, device=device)
    base = torch.empty(page_count, page_bytes, dtype=torch.uint8, device=device)
    base[places] = page
    return {"base": base, "offsets": places.to(torch.int64) * (page_bytes // ALIGNMENT),
            "positions": torch.arange(page_count, device=device, dtype=torch.int32) * BLOCK, "logical": logical}


def reference(query, logical: dict, kv_start, kv_end, scale: float, hot=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention over the dequantized logical pages and then the hot tokens (which follow them in position
    order): the output (B, H_q, D) and each warm page's softmax weight (B, H_q, P)."""
    batch, group = query.shape[0], QUERY_HEADS // KV_HEADS
    page_count = logical["key_codes"].shape[0]

    def dequantized(codes, scale_, minimum):  # -> (B, H_q, T, D)
        nibbles = torch.cat([codes & 15, codes >> 4], -1).double()  # (P, rows, 64, 128)
        values = (nibbles * scale_.double() + minimum.double()).transpose(0, 1).reshape(batch, KV_HEADS, -1, HEAD_DIM)
        return values.repeat_interleave(group, 1)

    keys = dequantized(logical["key_codes"], logical["key_scale"].repeat_interleave(STEP, 2),
                       logical["key_min"].repeat_interleave(STEP, 2))
    values = dequantized(logical["value_codes"], logical["value_scale"][..., None], logical["value_min"][..., None])
    if hot is not None:
        keys = torch.cat([keys, hot["keys"].double().repeat_interleave(group, 1)], 2)
        values = torch.cat([values, hot["values"].double().repeat_interleave(group, 1)], 2)
    positions = torch.arange(keys.shape[2], device=query.device)
    valid = (positions[None, :] >= kv_start[:, None]) & (positions[None, :] < kv_end[:, None])  # (B, T)
    scores = torch.einsum("bhd,bhtd->bht", query.double(), keys) * scale
    weights = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)  # (B, H_q, T)
    page_mass = weights[..., :page_count * BLOCK].reshape(batch, QUERY_HEADS, page_count, BLOCK).sum(-1)
    return torch.einsum("bht,bhtd->bhd", weights, values), page_mass


def count_sass(with_mass: bool) -> dict:
    """The kernel compiled offline for sm_90 by the installed Triton: registers and stack, and the opcodes of its
    warm loop (a page an iteration) and its hot loop (a hot row of up to 128 tokens)."""
    from kernel_sass import compile_cubin, disassemble, loop_bodies, opcode
    from triton.experimental.gluon._runtime import GluonASTSource

    values = {"KV_HEADS_": KV_HEADS, "ALIGN": ALIGNMENT, "WITH_MASS": with_mass, **field_constants(KV_HEADS)}
    pointer_types = {"query_ptr": "*bf16", "page_base_ptr": "*u8", "page_offset_ptr": "*i64",
                     "page_position_ptr": "*i32", "kv_start_ptr": "*i32", "kv_end_ptr": "*i32",
                     "hot_keys_ptr": "*bf16", "hot_values_ptr": "*bf16", "hot_table_ptr": "*i32"}
    cubin = compile_cubin(_decode_kernel, values, pointer_types, {"num_warps": 1}, GluonASTSource)
    resources, sass = disassemble(cubin)
    warm_loop, hot_loop = loop_bodies(sass)[:2]

    def opcodes(loop):
        return dict(collections.Counter(opcode(instruction) for instruction in loop).most_common())
    return {"triton": triton.__version__, "with_mass": with_mass, **resources,
            "warm_loop_instructions": len(warm_loop), "warm_loop": opcodes(warm_loop),
            "hot_loop_instructions": len(hot_loop), "hot_loop": opcodes(hot_loop)}


def check(batch: int, tokens: int, pages_per_split: int, seed: int) -> dict:
    """Relative error of the output and largest error of page mass against float64, with 200 hot tokens after the
    pages, batch rows in different windows, outputs poisoned first."""
    pages = build_pages(batch, tokens, seed)
    query = torch.randn(batch, QUERY_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_start = torch.tensor([0, 700, 64, 5][:batch], device="cuda", dtype=torch.int32)
    kv_end = torch.tensor([tokens, tokens - 333, 1000, tokens - 64][:batch], device="cuda", dtype=torch.int32)
    hot = build_hot(batch, tokens, [150, 50], seed)  # 200 hot tokens after the pages, as 3 rows
    kv_end = kv_end + 200 - torch.tensor([0, 20, 0, 0][:batch], device="cuda", dtype=torch.int32)
    expected, expected_mass = reference(query, pages["logical"], kv_start, kv_end, HEAD_DIM**-0.5, hot)
    got = decode(query, pages, kv_start, kv_end, HEAD_DIM**-0.5, pages_per_split, poison=True, hot=hot)
    error = ((got.double() - expected).norm() / expected.norm()).item()
    page_count = tokens // BLOCK
    page_lse = torch.full((batch, QUERY_HEADS, page_count), float("nan"), device="cuda")
    total_lse = torch.full((batch, QUERY_HEADS), float("nan"), device="cuda")
    decode(query, pages, kv_start, kv_end, HEAD_DIM**-0.5, pages_per_split, poison=True, with_mass=True,
           page_lse=page_lse, total_lse=total_lse, hot=hot)
    mass = torch.exp2(page_lse.double() - total_lse.double()[..., None])
    return {"batch": batch, "tokens": tokens, "pages_per_split": pages_per_split, "relative_error": error,
            "mass_error": (mass - expected_mass).abs().max().item()}


def timing(batch: int, tokens: int, pages_per_split: tuple[int, ...]) -> dict:
    """Device time (CUDA graph, L2 flushed: kernel.py's graph_ms) beside SDPA on bf16 keys and values; warm pages
    only, without and with page mass."""
    from kernel import graph_ms, sdpa_call

    pages = build_pages(batch, tokens, seed=tokens + batch)
    del pages["logical"]
    query = torch.randn(batch, QUERY_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_start = torch.zeros(batch, device="cuda", dtype=torch.int32)
    kv_end = torch.full_like(kv_start, tokens)
    keys = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    sdpa, backend = sdpa_call(query.unsqueeze(2), keys, values)
    row = {"batch": batch, "tokens": tokens, "sdpa_backend": backend, "sdpa_ms": graph_ms(sdpa),
           "page_bytes": pages["base"].numel(), "dense_bytes": keys.nbytes + values.nbytes,
           "ms_by_pages_per_split": {}}
    del keys, values
    for count in pages_per_split:
        row["ms_by_pages_per_split"][count] = graph_ms(
            lambda count=count: decode(query, pages, kv_start, kv_end, HEAD_DIM**-0.5, count))
    row["pages_per_split"], row["ms"] = min(row["ms_by_pages_per_split"].items(), key=lambda item: item[1])
    page_lse = torch.empty(batch, QUERY_HEADS, pages["offsets"].shape[0], device="cuda")
    row["mass_ms"] = graph_ms(lambda: decode(query, pages, kv_start, kv_end, HEAD_DIM**-0.5, row["pages_per_split"],
                                             with_mass=True, page_lse=page_lse))
    row["mass_cost"] = row["mass_ms"] / row["ms"] - 1
    row["speedup"] = row["sdpa_ms"] / row["ms"]
    row["tb_per_s"] = row["page_bytes"] / row["ms"] / 1e9
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | SDPA ms | trial INT4 ms | speedup | INT4 TB/s | pages a split | mass cost |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_ms']:.3f} | {row['ms']:.3f} | "
                     f"{row['speedup']:.2f}x | {row['tb_per_s']:.2f} | {row['pages_per_split']} | "
                     f"{row['mass_cost']:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="compile offline for sm_90 and count (no GPU)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pages-per-split", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="kernel-mma-layout")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sass:
        result = {"plain": count_sass(False), "with_mass": count_sass(True)}
        (args.out / f"{args.name}-sass-triton{triton.__version__}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return result
    checks = [check(batch, tokens, count, seed) for seed, (batch, tokens, count) in
              enumerate([(2, 4096, 1), (2, 4096, 4), (4, 4096, 64), (1, 32768, 16), (1, 32768, 512)])]
    for row in checks:
        print(json.dumps(row), flush=True)
    rows = []
    for batch in args.batches:
        for tokens in args.contexts:
            if batch * tokens > 1 << 20:
                print(f"skipped batch {batch} at {tokens} tokens: over 1M token-rows", flush=True)
                continue
            rows.append(timing(batch, tokens, tuple(args.pages_per_split)))
            print(json.dumps(rows[-1]), flush=True)
    from kernel import environment
    result = {"environment": environment(), "checks": checks, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    text = table(rows)
    (args.out / f"{args.name}.md").write_text(
        f"Gluon INT4 decode trial, kvtier's INT4 page with value codes channel-major "
        f"(`python benchmarks/kernel_mma_layout.py`), "
        f"{result['environment']['device']}, torch {result['environment']['torch']}, triton "
        f"{result['environment']['triton']}; 32 query and 8 KV heads of dim 128; graph-replayed device time, "
        f"L2 flushed, fastest pages a split of "
        f"{args.pages_per_split}. Against float64 (with hot rows): largest relative error "
        f"{max(row['relative_error'] for row in checks):.2e}, largest page-mass error "
        f"{max(row['mass_error'] for row in checks):.1e}.\n\n" + text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
