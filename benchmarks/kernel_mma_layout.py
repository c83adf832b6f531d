"""Trial: an INT4 page layout whose loads are tensor-core operands as loaded, and a Gluon decode kernel over it.

kvtier's page kernel (kernels/decode_attention.py) issues about 1,400 instructions per warp for each 128-token tile
of INT4 pages and reads them at 1.2-1.4 TB/s: Triton moves the unpacked codes through shared memory to put them in
the tensor cores' operand layout. This trial stores a page so that each thread's share of an m16n8k16 operand is
contiguous in memory, and writes the kernel in Gluon (Triton's layout-explicit language), where a load can be given
that layout directly:
- key codes stay token-major, 64 bytes a token (byte k holds channels k and k + 64), with the bytes of a token
  permuted (KEY_BYTE_POSITIONS) so that each thread's 16 bytes of a 32-token step are one 128-bit load;
- value codes are stored channel-major, a row of 64 tokens per code byte, tokens permuted within each 32-token step
  (VALUE_TOKEN_POSITIONS), so that the value operand's consecutive tokens are one 64-bit load;
- the permutations also undo the order in which the lop3 unpacking returns a word's four bytes (SWAP), so the
  unpacked registers are the operands: no shared memory, no byte permutes;
- scales and minimums are as in kvtier's INT4 page: per key group of 32 tokens and channel, per value token.
One warp a program, a page a loop iteration in two steps of one key group (32 tokens); per-channel key scales folded
into the query, minimums and the unpacking's offsets added by small MMAs; the softmax rescales only when a row's
maximum grows.

It is a benchmark of the layout, not kvtier's kernel: no hot pages, no per-page mass, decode rows only (up to 16
query rows a KV head). `python benchmarks/kernel_mma_layout.py` on a GPU checks it against a float64 reference and
times it beside torch SDPA on bf16; `--sass` compiles it offline for sm_90 and counts its loop's instructions.
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

BLOCK, HEAD_DIM, HALF, STEP, ROWS_PAD = 64, 128, 64, 32, 16  # page tokens, channels, code bytes, key group, MMA rows
KV_HEADS, QUERY_HEADS, ALIGNMENT = 8, 32, 16  # Llama-3.1-8B's heads; page offsets in 16-byte units
SWAP = (0, 2, 1, 3)  # the lop3 unpacking returns a word's bytes in this order
LOG2_E = 1.4426950408889634


def _operand_position(k: int, bytes_per_thread: int) -> int:
    """Memory position of logical operand index k (a key code byte, or a value token of a step): an m16n8k16 operand
    gives thread t of a quad the indices 16s + 8h + 2t + e; they are stored together, then SWAPped within words."""
    s, h, t, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    position = bytes_per_thread * t + 4 * s + 2 * h + e
    return (position & ~3) | SWAP[position & 3]


KEY_BYTE_POSITIONS = tuple(_operand_position(k, 16) for k in range(HALF))
VALUE_TOKEN_POSITIONS = tuple(_operand_position(k, 8) for k in range(STEP))


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
G_BLOCK, G_HALF, G_STEP, G_ROWS_PAD, G_HEAD_DIM = (gl.constexpr(value) for value in (BLOCK, HALF, STEP, ROWS_PAD,
                                                                                      HEAD_DIM))


@gluon.jit
def _unpacked(codes, ASM: gl.constexpr):
    """uint8 codes -> (low nibbles, high nibbles) as float16 plus the asm's offsets, in the same layout."""
    return gl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,=r,=r,r", args=[codes],
                                     dtype=(gl.float16, gl.float16), is_pure=True, pack=4)


@gluon.jit
def _key_operand(unpacked, b_layout: gl.constexpr):
    """(STEP tokens, 64 positions) as loaded -> (64 code bytes, STEP tokens) B operand; registers do not move."""
    unpacked = gl.permute(gl.reshape(unpacked, [32, 4, 4, 2, 2]), [2, 3, 1, 4, 0])  # (s, h, t, e, token)
    return gl.convert_layout(gl.reshape(unpacked, [64, 32]), b_layout, assert_trivial=True)


@gluon.jit
def _value_operand(unpacked, b_layout: gl.constexpr):
    """(64 code bytes, STEP positions) as loaded -> (STEP tokens, 64 code bytes) B operand; registers do not move."""
    unpacked = gl.permute(gl.reshape(unpacked, [64, 4, 2, 2, 2]), [2, 3, 1, 4, 0])  # (s, h, t, e, byte)
    return gl.convert_layout(gl.reshape(unpacked, [32, 64]), b_layout, assert_trivial=True)


@gluon.jit
def _decode_kernel(
    query_ptr,  # (B, H_q, D) bf16
    page_base_ptr, page_offset_ptr, page_position_ptr,  # uint8 base; (P,) int64 offsets in ALIGN units; (P,) int32
    kv_start_ptr, kv_end_ptr,  # (B,) int32 window
    partial_ptr, partial_lse_ptr,  # (B, H_q, S, D), (B, H_q, S) float32 per split
    scale_log2, page_count, pages_per_split, splits, group,
    KV_HEADS_: gl.constexpr, ALIGN: gl.constexpr, VALUE_CODES_AT: gl.constexpr, KEY_SCALE_AT: gl.constexpr,
    KEY_MIN_AT: gl.constexpr, VALUE_SCALE_AT: gl.constexpr, VALUE_MIN_AT: gl.constexpr,
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    key_load: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [1, 1], [1, 0])  # 16 bytes of a token a thread
    value_load: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, 1], [1, 0])  # 8 tokens of a code byte a thread
    rows_layout: gl.constexpr = gl.SliceLayout(1, mma)
    columns_layout: gl.constexpr = gl.SliceLayout(0, mma)

    sequence_head = gl.program_id(0)  # b * H_kv + h: also the head's row inside a page
    split = gl.program_id(1)
    batch_index = sequence_head // KV_HEADS_

    query_rows = gl.arange(0, G_ROWS_PAD, layout=gl.SliceLayout(1, a_layout))
    query_channels = gl.arange(0, G_HALF, layout=gl.SliceLayout(0, a_layout))
    query_at = query_ptr + (sequence_head * group + query_rows)[:, None] * G_HEAD_DIM + query_channels[None, :]
    query_ok = (query_rows < group)[:, None]
    # the halves of q, matching low and high nibbles, in log2 units: (ROWS_PAD, 64) float16 A operands
    query_low = (gl.load(query_at, mask=query_ok, other=0.0).to(gl.float32) * scale_log2).to(gl.float16)
    query_high = (gl.load(query_at + G_HALF, mask=query_ok, other=0.0).to(gl.float32) * scale_log2).to(gl.float16)
    kv_start = gl.load(kv_start_ptr + batch_index)
    kv_end = gl.load(kv_end_ptr + batch_index)

    running_max = gl.full([G_ROWS_PAD], -1.0e30, gl.float32, layout=rows_layout)
    running_sum = gl.zeros([G_ROWS_PAD], gl.float32, layout=rows_layout)
    value_bias = gl.zeros([G_ROWS_PAD], gl.float32, layout=rows_layout)  # sum of w m_t, the value minimums
    low_acc = gl.zeros([G_ROWS_PAD, G_HALF], gl.float32, layout=mma)  # sum of (w s_t) (64 + c), low nibbles
    high_acc = gl.zeros([G_ROWS_PAD, G_HALF], gl.float32, layout=mma)
    offset_acc = gl.zeros([G_ROWS_PAD, 8], gl.float32, layout=mma)  # sum of w s_t as the MMAs saw it (8 equal columns)

    key_offsets = (gl.arange(0, G_STEP, layout=gl.SliceLayout(1, key_load))[:, None] * G_HALF
                   + gl.arange(0, G_HALF, layout=gl.SliceLayout(0, key_load))[None, :])  # (STEP, 64)
    value_offsets = (gl.arange(0, G_HALF, layout=gl.SliceLayout(1, value_load))[:, None] * G_BLOCK
                     + gl.arange(0, G_STEP, layout=gl.SliceLayout(0, value_load))[None, :])  # (64, STEP)
    operand_bytes = gl.arange(0, G_HALF, layout=gl.SliceLayout(1, b_layout))
    eight = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
    columns = gl.arange(0, G_STEP, layout=columns_layout)
    minus_key_low_offset = gl.full([G_HALF, 8], -KEY_LOW_OFFSET, gl.float16, layout=b_layout)
    minus_key_high_offset = gl.full([G_HALF, 8], -KEY_HIGH_OFFSET, gl.float16, layout=b_layout)
    ones = gl.full([G_STEP, 8], 1.0, gl.float16, layout=b_layout)

    first = split * pages_per_split
    last = gl.minimum(first + pages_per_split, page_count)
    for page in range(first, last):
        page_ptr = page_base_ptr + gl.load(page_offset_ptr + page).to(gl.int64) * ALIGN
        position0 = gl.load(page_position_ptr + page)
        for half_page in gl.static_range(2):  # one key group a step
            token0 = half_page * G_STEP
            key_codes = gl.load(page_ptr + (sequence_head * G_BLOCK + token0) * G_HALF + key_offsets)
            value_codes = gl.load(page_ptr + VALUE_CODES_AT + sequence_head * G_HALF * G_BLOCK + token0 + value_offsets)

            # scores = (q s) . (offset + c) + q . m - (q s) . offset: the scales folded into the query; the minimums
            # and the offsets as one row per query row, from MMAs against columns that repeat (all 8 equal)
            group_row = (sequence_head * 2 + half_page) * G_HEAD_DIM
            scale_ptr = (page_ptr + KEY_SCALE_AT).to(gl.pointer_type(gl.float16)) + group_row
            min_ptr = (page_ptr + KEY_MIN_AT).to(gl.pointer_type(gl.float16)) + group_row
            folded_low = query_low * gl.load(scale_ptr + query_channels)[None, :]  # (ROWS_PAD, 64) float16
            folded_high = query_high * gl.load(scale_ptr + G_HALF + query_channels)[None, :]
            repeated = operand_bytes[:, None] + eight[None, :] * 0  # (64, 8): channel k in every column
            row_terms = gl.zeros([G_ROWS_PAD, 8], gl.float32, layout=mma)
            row_terms = mma_v2(query_low, gl.load(min_ptr + repeated), row_terms)
            row_terms = mma_v2(query_high, gl.load(min_ptr + G_HALF + repeated), row_terms)
            row_terms = mma_v2(folded_low, minus_key_low_offset, row_terms)
            row_terms = mma_v2(folded_high, minus_key_high_offset, row_terms)
            key_low, key_high = _unpacked(key_codes, UNPACK_KEYS)  # (STEP, 64) each, as loaded
            scores = gl.zeros([G_ROWS_PAD, G_STEP], gl.float32, layout=mma) + gl.max(row_terms, axis=1)[:, None]
            scores = mma_v2(folded_low, _key_operand(key_low, b_layout), scores)
            scores = mma_v2(folded_high, _key_operand(key_high, b_layout), scores)  # (ROWS_PAD, STEP)
            positions = position0 + token0 + columns
            scores = gl.where(((positions >= kv_start) & (positions < kv_end))[None, :], scores, -1.0e30)

            step_max = gl.max(scores, axis=1)
            if gl.max(step_max - running_max, axis=0) > 0.0:  # rescale only when some row's maximum grows
                new_max = gl.maximum(running_max, step_max)
                decay = gl.exp2(running_max - new_max)
                running_sum = running_sum * decay
                value_bias = value_bias * decay
                low_acc = low_acc * decay[:, None]
                high_acc = high_acc * decay[:, None]
                offset_acc = offset_acc * decay[:, None]
                running_max = new_max
            weights = gl.exp2(scores - running_max[:, None])  # (ROWS_PAD, STEP)
            running_sum += gl.sum(weights, axis=1)

            # values: v = s_t c + m_t per token; w s_t as the A operand, w m_t summed apart
            token_at = sequence_head * G_BLOCK + token0 + columns
            value_scale = gl.load((page_ptr + VALUE_SCALE_AT).to(gl.pointer_type(gl.float16)) + token_at).to(gl.float32)
            value_min = gl.load((page_ptr + VALUE_MIN_AT).to(gl.pointer_type(gl.float16)) + token_at).to(gl.float32)
            value_bias += gl.sum(weights * value_min[None, :], axis=1)
            scaled = gl.convert_layout((weights * value_scale[None, :]).to(gl.float16), a_layout, assert_trivial=True)
            value_low, value_high = _unpacked(value_codes, UNPACK_VALUES)  # (64, STEP) each, as loaded
            offset_acc = mma_v2(scaled, ones, offset_acc)
            low_acc = mma_v2(scaled, _value_operand(value_low, b_layout), low_acc)
            high_acc = mma_v2(scaled, _value_operand(value_high, b_layout), high_acc)

    bias = value_bias - VALUE_OFFSET * gl.max(offset_acc, axis=1)  # (ROWS_PAD,)
    safe_sum = gl.where(running_sum == 0.0, 1.0, running_sum)
    lse = gl.where(running_sum == 0.0, float("-inf"), running_max + gl.log2(safe_sum))
    out_rows = gl.arange(0, G_ROWS_PAD, layout=rows_layout)
    out_channels = gl.arange(0, G_HALF, layout=columns_layout)
    row_ok = out_rows < group
    split_rows = (sequence_head * group + out_rows) * splits + split
    gl.store(partial_lse_ptr + split_rows, lse, mask=row_ok)
    out_at = partial_ptr + split_rows[:, None] * G_HEAD_DIM + out_channels[None, :]
    gl.store(out_at, (low_acc + bias[:, None]) / safe_sum[:, None], mask=row_ok[:, None])
    gl.store(out_at + G_HALF, (high_acc + bias[:, None]) / safe_sum[:, None], mask=row_ok[:, None])


@triton.jit
def _merge_kernel(partial_ptr, partial_lse_ptr, out_ptr, splits, SPLITS_PAD: tl.constexpr, DIM: tl.constexpr):
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


def field_constants(rows: int) -> dict:
    offsets, _ = page_fields(rows)
    return {"VALUE_CODES_AT": offsets["value_codes"], "KEY_SCALE_AT": offsets["key_scale"],
            "KEY_MIN_AT": offsets["key_min"], "VALUE_SCALE_AT": offsets["value_scale"],
            "VALUE_MIN_AT": offsets["value_min"]}


def decode(query, pages: dict, kv_start, kv_end, scale: float, pages_per_split: int) -> torch.Tensor:
    """Attention of query (B, H_q, D) bf16 over ``pages`` (build_pages) in the window [kv_start, kv_end)."""
    batch = query.shape[0]
    page_count = pages["offsets"].shape[0]
    splits = triton.cdiv(page_count, pages_per_split)
    partial = torch.empty(batch, QUERY_HEADS, splits, HEAD_DIM, device=query.device, dtype=torch.float32)
    partial_lse = torch.empty(batch, QUERY_HEADS, splits, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query)
    _decode_kernel[(batch * KV_HEADS, splits)](
        query, pages["base"], pages["offsets"], pages["positions"], kv_start, kv_end, partial, partial_lse,
        scale * LOG2_E, page_count, pages_per_split, splits, QUERY_HEADS // KV_HEADS,
        KV_HEADS_=KV_HEADS, ALIGN=ALIGNMENT, **field_constants(batch * KV_HEADS), num_warps=1)
    _merge_kernel[(batch * QUERY_HEADS,)](partial, partial_lse, out, splits,
                                          SPLITS_PAD=triton.next_power_of_2(splits), DIM=HEAD_DIM)
    return out


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
    key_codes = torch.empty_like(logical["key_codes"])
    key_codes[..., torch.tensor(KEY_BYTE_POSITIONS, device=device)] = logical["key_codes"]
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


def reference(query, logical: dict, kv_start, kv_end, scale: float) -> torch.Tensor:
    """float64 attention over the dequantized logical pages: (B, H_q, D)."""
    batch = query.shape[0]

    def dequantized(codes, scale_, minimum):  # -> (B, H_q, T, D)
        nibbles = torch.cat([codes & 15, codes >> 4], -1).double()  # (P, rows, 64, 128)
        values = (nibbles * scale_.double() + minimum.double()).transpose(0, 1).reshape(batch, KV_HEADS, -1, HEAD_DIM)
        return values.repeat_interleave(QUERY_HEADS // KV_HEADS, 1)

    keys = dequantized(logical["key_codes"], logical["key_scale"].repeat_interleave(STEP, 2),
                       logical["key_min"].repeat_interleave(STEP, 2))
    values = dequantized(logical["value_codes"], logical["value_scale"][..., None], logical["value_min"][..., None])
    positions = torch.arange(keys.shape[2], device=query.device)
    valid = (positions[None, :] >= kv_start[:, None]) & (positions[None, :] < kv_end[:, None])  # (B, T)
    scores = torch.einsum("bhd,bhtd->bht", query.double(), keys) * scale
    return torch.einsum("bht,bhtd->bhd", scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1), values)


def count_sass() -> dict:
    """The kernel compiled offline for sm_90 by the installed Triton: registers, stack and the loop's opcodes."""
    from kernel_sass import HOPPER, disassemble, loop_bodies, opcode
    from triton.experimental.gluon._runtime import GluonASTSource

    values = {"KV_HEADS_": KV_HEADS, "ALIGN": ALIGNMENT, **field_constants(KV_HEADS)}
    pointer_types = {"query_ptr": "*bf16", "page_base_ptr": "*u8", "page_offset_ptr": "*i64",
                     "page_position_ptr": "*i32", "kv_start_ptr": "*i32", "kv_end_ptr": "*i32"}
    signature, constexprs, attributes = {}, {}, {}
    for index, param in enumerate(_decode_kernel.params):
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", values[param.name]
        elif param.name.endswith("_ptr"):
            signature[param.name] = pointer_types.get(param.name, "*fp32")
            attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32" if param.name == "scale_log2" else "i32"
    source = GluonASTSource(fn=_decode_kernel, signature=signature, constexprs=constexprs, attrs=attributes)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": 1})
    resources, sass = disassemble(compiled.asm["cubin"])
    loop = max(loop_bodies(sass), key=len)
    return {"triton": triton.__version__, **resources, "loop_instructions": len(loop),
            "opcodes": dict(collections.Counter(opcode(instruction) for instruction in loop).most_common())}


def check(batch: int, tokens: int, pages_per_split: int, seed: int) -> dict:
    """Relative error against the float64 reference, batch rows in different windows, output poisoned first."""
    pages = build_pages(batch, tokens, seed)
    query = torch.randn(batch, QUERY_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_start = torch.tensor([0, 700, 64, 5][:batch], device="cuda", dtype=torch.int32)
    kv_end = torch.tensor([tokens, tokens - 333, 1000, tokens - 64][:batch], device="cuda", dtype=torch.int32)
    expected = reference(query, pages["logical"], kv_start, kv_end, HEAD_DIM**-0.5)
    got = decode(query, pages, kv_start, kv_end, HEAD_DIM**-0.5, pages_per_split)
    error = ((got.double() - expected).norm() / expected.norm()).item()
    return {"batch": batch, "tokens": tokens, "pages_per_split": pages_per_split, "relative_error": error}


def timing(batch: int, tokens: int, pages_per_split: tuple[int, ...]) -> dict:
    """Device time (CUDA graph, L2 flushed: kernel.py's graph_ms) beside SDPA on bf16 keys and values."""
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
    row["speedup"] = row["sdpa_ms"] / row["ms"]
    row["tb_per_s"] = row["page_bytes"] / row["ms"] / 1e9
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | SDPA ms | trial INT4 ms | speedup | INT4 TB/s | pages a split |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_ms']:.3f} | {row['ms']:.3f} | "
                     f"{row['speedup']:.2f}x | {row['tb_per_s']:.2f} | {row['pages_per_split']} |")
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
        result = count_sass()
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
        f"INT4 decode over the trial's operand-ordered page layout (`python benchmarks/kernel_mma_layout.py`), "
        f"{result['environment']['device']}, torch {result['environment']['torch']}, triton "
        f"{result['environment']['triton']}; 32 query and 8 KV heads of dim 128; graph-replayed device time, "
        f"L2 flushed, fastest pages a split of "
        f"{args.pages_per_split}. Largest relative error against float64: "
        f"{max(row['relative_error'] for row in checks):.2e}.\n\n" + text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
