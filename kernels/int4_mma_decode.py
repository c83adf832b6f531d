"""Decode attention over INT4 pages whose loads are tensor-core operands as they arrive: a Gluon kernel.

decode_attention (kernels/decode_attention.py) launches this kernel instead of its Triton page kernel for a decode
step on CUDA whose pages it reads (``reads``): INT4 keys per channel over key groups of 32 tokens, pages a multiple
of 32 tokens, head dim 64 or 128, at most 8 query heads per KV head, a 16-bit model dtype. The splits it writes
are merged by decode_attention's own merge kernel, which also turns per-page log-sum-exps into page mass.

Written in Gluon (Triton's layout-explicit language), so that each load lands in the layout its MMA operand needs:
- Products are transposed, tokens as the MMA rows: scores^T = K (q s)^T and out^T = V^T P^T, so a KV head's query
  rows pad to the 8 columns of an m16n8k16 MMA.
- Key codes are read 16 (head dim 128) or 8 contiguous bytes of a token a thread; the MMA's reduction index k is
  mapped to whichever channel those unpacked registers hold, and the query and the key group's scales and minimums
  are gathered in that order (``_key_channel``).
- Value codes are read from kvtier's token-major rows too: a thread reads the same bytes of 8 tokens, and the
  operand's words, which pair two tokens of a byte, are assembled from them with byte permutes. Operand row r holds
  code byte ``_value_byte(r)`` and reduction index k token ``_token(k)`` of the step; keys are read in that token
  order so that the weights line up.
- Rotated pages (R = diag(s) H / sqrt(D), kvtier.rotation) are scored against q R and accumulate v R; both
  products run as MMAs with the Hadamard matrix H built in registers. H is unchanged by permuting the bits of both
  its indices, and both operand orders above are bit permutations of the channel index, so H applies in operand
  order as it is.
Register relabels are checked free at compile time (``convert_layout(assert_trivial=True)``).
- Every byte of a key group (codes, scale codes and bases, minimums, value scales and minimums) is copied from
  global into a ring of RING groups in the program's shared memory (cp.async) RING - 1 groups before it is used,
  and read from there in the layouts above; the pages' addresses are read up to four pages ahead. A one-warp program
  thus keeps three groups' reads in flight while it computes one, without holding them in registers (codes carried
  in registers from one page loop iteration to the next would be held a byte a register). On the H200 this took
  7-11% less time at batch 1, 128K-512K and batch 8, 128K than loading each group a group ahead into registers
  (benchmarks/results/kernel-h200-ring.md).
- With its reads in flight, a program waits on its own instructions more than on memory: with every page read
  from L2 instead of DRAM a call at 128K-512K tokens took only 4-11% less time on the H200
  (benchmarks/results/kernel-h200-latency.md).
  So the loop keeps its dependency chains short: the softmax rescales without a branch (``_rescaled``), a key
  group's scores and column terms are four MMA chains added after, and the first groups' copies start before the
  query is read and rotated. Together: 5.7% less time at batch 1, 128K, 8% at 512K and batch 8, 128K; 6% more
  at batch 1, 32K.
"""

from __future__ import annotations

import functools
import os

import torch

from kvtier import int4
from kvtier.formats import Int4Format
from kvtier.pages import ALIGNMENT

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
except ImportError:  # an older Triton, or none: decode_attention keeps its Triton kernel
    gluon = None

STEP = 32  # tokens a loop step: one key group
MAX_ROWS = 8  # query rows per KV head: the MMA's columns
MAX_SPLITS = 256
REGISTERS = 255  # per thread (maxnreg): a cap the kernel stays under without local memory (232 registers, Triton 3.6
# offline); 8 one-warp programs fit a multiprocessor's 64K registers
PROGRAMS_PER_MULTIPROCESSOR = 8  # splits per (sequence, KV head) fill about this many programs per multiprocessor
RING = 4  # key groups in a program's shared-memory ring: one read while RING - 1 are copied in (18.5 KB a program at
# head dim 128; 8 programs take 156 KB of a multiprocessor's 228). On the H200 8 programs with a ring of 4 took 1-9%
# less time than 12 programs at 168 registers with a ring of 3 (which keep values in local memory), and 1-11% less
# than loading each group a group ahead into registers (benchmarks/results/kernel-h200-ring.md)
ENABLED = True  # benchmarks/kernel.py turns it off to time the Triton page kernel on the same pages
LOG2_E = 1.4426950408889634


def _token(k: int) -> int:
    """The token of a 32-token step at reduction index k of the products (and row k of the scores): a thread's
    value loads cover tokens t + 4j, and the operand gives it k bits 1-2 from its lane."""
    return ((k >> 1) & 3) | ((k & 1) << 2) | (k & 24)


def _value_byte(row: int, half: int) -> int:
    """The code byte that value operand row ``row`` holds: a thread loads bytes 8g .. 8g + 7 (head dim 128; 4g ..
    4g + 3 at 64) and holds operand rows g + 8i."""
    per_thread = half // 8
    return (row & 7) * per_thread + (row >> 3)


def _key_channel(k: int, half: int) -> int:
    """The code byte (channel of the low nibbles) that key reduction index k = 16s + 8h + 2t + e reads: run
    t * half / 4 + 4s + 2h + e of thread t, bytes 1 and 2 of each 4-byte word swapped by the unpacking."""
    s, h, t, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    run = t * (half // 4) + 4 * s + 2 * h + e
    return (run & ~3) | ((run & 1) << 1) | ((run >> 1) & 1)


def reads(query: torch.Tensor, paged) -> bool:
    """Whether this kernel takes a decode launch of ``query`` (B, H_q, D) over ``paged``: compiled CUDA on an NVIDIA
    sm_80 or later, and pages and shapes it handles (``handles``)."""
    if gluon is None or not ENABLED or not query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return handles(paged, query.shape[1], query.dtype) and _capability(query.device.index) >= (8, 0)


def handles(paged, query_heads: int, dtype: torch.dtype) -> bool:
    """Whether the kernel reads ``paged`` for ``query_heads`` rows of ``dtype``: INT4 pages with per-channel keys in
    groups of STEP tokens, pages a multiple of STEP, head dim 64 or 128, at most MAX_ROWS rows a KV head, a 16-bit
    dtype for the query and the hot tier, and no rotation or a Hadamard one (``rotation_signs`` given)."""
    layout = paged.warm.layout
    page_format = layout.format
    kv_heads = paged.hot_keys.shape[1]
    return (isinstance(page_format, Int4Format) and page_format.key_per_channel and page_format.key_group == STEP
            and layout.block_size % STEP == 0 and layout.head_dim in (64, 128)
            and query_heads % kv_heads == 0 and query_heads // kv_heads <= MAX_ROWS
            and dtype in (torch.bfloat16, torch.float16) and paged.hot_keys.dtype == dtype
            and (paged.rotation is None or paged.rotation_signs is not None))


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (the current one for None), read once: mma_v2 needs an NVIDIA
    sm_80 or later ((0, 0) on ROCm, whose devices also report as CUDA)."""
    return (0, 0) if torch.version.hip else torch.cuda.get_device_capability(index)


def constants(layout, rotate: bool, with_mass: bool, count_on_device: bool) -> dict:
    """The kernel's compile-time arguments for pages of ``layout``: their shape, each field's byte offset, and the
    switches."""
    at = layout.offsets
    return dict(KV_HEADS=layout.kv_heads, HEAD_DIM=layout.head_dim, BLOCK=layout.block_size, ALIGN=ALIGNMENT,
                KEY_CODES_AT=at["key_codes"], VALUE_CODES_AT=at["value_codes"], KEY_SCALE_AT=at["key_scale"],
                KEY_SCALE_BASE_AT=at["key_scale_base"], KEY_MIN_AT=at["key_min"], VALUE_SCALE_AT=at["value_scale"],
                VALUE_MIN_AT=at["value_min"],
                VALUE_CODES_LAYOUT=value_codes_layout(layout.head_dim // 2), WITH_MASS=with_mass, ROTATE=rotate,
                COUNT_ON_DEVICE=count_on_device)


def launch(query, paged, kv_start, kv_end, scale: float, partial, partial_lse, page_lse, splits: int,
           pages_per_split: int, warm_count=None) -> None:
    """Write each split's output and log2-sum-exp into ``partial`` (B, H_q, S, D) and ``partial_lse`` (B, H_q, S)
    and, given ``page_lse`` (B, H_q, n_warm), each warm page's log2-sum-exp, as decode_attention's page kernel
    does. The splits: splits - n_hot over the warm pages, pages_per_split each, then a hot page each;
    ``warm_count`` (1,) int32 on the device: the warm page count, read by the kernel (pages_per_split then unused)."""
    batch, query_heads, head_dim = query.shape
    kv_heads = paged.hot_keys.shape[1]
    hot_pages = paged.hot_table.shape[1]
    rotate = paged.rotation is not None
    signs = paged.rotation_signs if rotate else partial_lse  # not read without ROTATE
    hot_keys, hot_values = paged.hot_keys, paged.hot_values
    _decode_kernel[(batch * kv_heads, splits)](
        query, signs, paged.warm.base, paged.warm.offsets, paged.warm.positions, paged.warm_pages,
        kv_start if warm_count is None else warm_count, kv_start, kv_end,
        partial, partial_lse, partial_lse if page_lse is None else page_lse,
        hot_keys, hot_values, paged.hot_table, hot_pages, *hot_keys.stride()[:3],
        scale * LOG2_E, head_dim**-0.5, pages_per_split, splits - hot_pages, splits, query_heads // kv_heads,
        **constants(paged.warm.layout, rotate, page_lse is not None, warm_count is not None), num_warps=1,
        maxnreg=REGISTERS)


@functools.cache
def value_codes_layout(half: int):
    """The value operand (half rows, 32 tokens) of an m16n8k16 MMA (kWidth 2) with its second and third registers
    swapped: the unpacking pairs a word's bytes 0 and 2, so the word must hold (r, k), (r + 8, k), (r, k + 1),
    (r + 8, k + 1) for its first register to come out as the operand's (r, k), (r, k + 1)."""
    registers = [[8, 0], [0, 1], [0, 8], [0, 16]] + [[16 << i, 0] for i in range(half.bit_length() - 5)]
    return gl.DistributedLinearLayout(reg_bases=registers, lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[], block_bases=[], shape=[half, STEP])


if gluon is not None:
    # lop3 unpacking of one 32-bit word of 4 code bytes into 8 float16, pairing bytes (0, 2) and (1, 3): keys as
    # 1024 + low nibble and 64 + high nibble (5 instructions); values both as 64 + nibble (7 instructions)
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
    DECODE_KEY_SCALES = gl.constexpr(int4.DECODE_KEY_SCALES_PTX)
    KEY_LOW_OFFSET, KEY_HIGH_OFFSET, VALUE_OFFSET = (gl.constexpr(value) for value in (1024.0, 64.0, 64.0))
    G_STEP = gl.constexpr(STEP)

    @gluon.jit
    def _unpacked(codes, ASM: gl.constexpr):
        """uint8 codes -> (low nibbles, high nibbles) as float16 plus the asm's offsets, in the same layout."""
        return gl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,=r,=r,r", args=[codes],
                                         dtype=(gl.float16, gl.float16), is_pure=True, pack=4)

    @gluon.jit
    def _step_token(k):
        """_token as index arithmetic."""
        return ((k >> 1) & 3) | ((k & 1) << 2) | (k & 24)

    @gluon.jit
    def _operand_value_byte(row, HALF: gl.constexpr):
        """_value_byte as index arithmetic."""
        return (row & 7) * (HALF // 8) + (row >> 3)

    @gluon.jit
    def _operand_key_channel(k, HALF: gl.constexpr):
        """_key_channel as index arithmetic."""
        run = (k // 2 % 4) * (HALF // 4) + (k // 16) * 4 + (k // 8 % 2) * 2 + k % 2
        return (run & ~3) | ((run & 1) << 1) | ((run >> 1) & 1)

    @gluon.jit
    def _key_a_operand(unpacked, a_layout: gl.constexpr, HALF: gl.constexpr):
        """(STEP tokens, HALF positions) as loaded -> (STEP tokens, HALF code bytes) A operand; registers stay."""
        unpacked = gl.permute(gl.reshape(unpacked, [32, 4, HALF // 16, 2, 2]), [0, 2, 3, 1, 4])  # (token, s, h, t, e)
        return gl.convert_layout(gl.reshape(unpacked, [32, HALF]), a_layout, assert_trivial=True)

    @gluon.jit
    def _value_a_operand(codes, a_layout: gl.constexpr, codes_layout: gl.constexpr, HALF: gl.constexpr):
        """(STEP tokens, HALF code bytes) as loaded -> the (HALF rows, STEP) A operands of the low and high nibbles:
        row r is byte _value_byte(r), reduction index k token _token(k)."""
        per_thread: gl.constexpr = HALF // 8
        # (token: j43, j2, lane t; byte: lane g, x) -> (row = 8x + g, k = 8 j43 + 2t + j2): labels only
        codes = gl.permute(gl.reshape(codes, [4, 2, 4, 8, per_thread]), [4, 3, 0, 2, 1])
        codes = gl.convert_layout(gl.reshape(codes, [HALF, 32]), codes_layout)  # registers reordered, not moved
        low, high = _unpacked(codes, UNPACK_VALUES)  # hold the operand's registers, labelled as codes_layout
        low = gl.reshape(gl.permute(gl.reshape(low, [HALF // 16, 2, 8, 16, 2]), [0, 4, 2, 3, 1]), [HALF, 32])
        high = gl.reshape(gl.permute(gl.reshape(high, [HALF // 16, 2, 8, 16, 2]), [0, 4, 2, 3, 1]), [HALF, 32])
        return (gl.convert_layout(low, a_layout, assert_trivial=True),
                gl.convert_layout(high, a_layout, assert_trivial=True))

    @gluon.jit
    def _key_scales(codes, base_bits):
        """A key group's float16 scales from their one-byte codes as _ring_key_parameters read them: the bits of the
        group's base plus 32 times the code (kvtier.int4.decode_key_scales)."""
        base_pair = gl.full(codes.shape, 0, gl.int32, layout=codes.type.layout) + \
            (base_bits.to(gl.int32) & 0xFFFF) * 0x10001
        return gl.inline_asm_elementwise(asm=DECODE_KEY_SCALES, constraints="=r,=r,r,r,r,r,r", args=[codes, base_pair],
                                         dtype=gl.float16, is_pure=True, pack=4)

    # Triton 3.6 and 3.9 name these differently
    _async_copy = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    G_RING = gl.constexpr(RING)

    @gluon.jit
    def _offset_address(page_base_ptr, offset, ALIGN: gl.constexpr):
        """The address of the page at ``offset`` (a warm_offset entry: ALIGN-byte units from the base)."""
        return page_base_ptr + offset.to(gl.int64) * ALIGN

    @gluon.jit
    def _page_address(page_base_ptr, warm_offset_ptr, page, last, ALIGN: gl.constexpr):
        """The address of warm page ``page`` (the base itself past ``last``, where nothing is read)."""
        return _offset_address(page_base_ptr, gl.load(warm_offset_ptr + page, mask=page < last, other=0), ALIGN)

    @gluon.jit
    def _copy_group(rings, slot, page_ptr, step, page_row, copy_ok,
                    HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, KEY_CODES_AT: gl.constexpr,
                    VALUE_CODES_AT: gl.constexpr, KEY_SCALE_AT: gl.constexpr, KEY_SCALE_BASE_AT: gl.constexpr,
                    KEY_MIN_AT: gl.constexpr, VALUE_SCALE_AT: gl.constexpr, VALUE_MIN_AT: gl.constexpr):
        """Start copying key group ``step`` of the page at ``page_ptr`` into ring slot ``slot`` (cp.async, one
        commit group; nothing is read where ``copy_ok`` is false): its codes (key rows in _step_token order, as the
        products take them), its scale codes, minimums and scale base (the 4 bytes holding it), and its tokens'
        value scales and minimums. Masks stay constant along each thread's bytes, so that every copy is 4-16 bytes."""
        key_ring, value_ring, scale_ring, min_ring, token_ring, base_ring = rings
        codes_layout: gl.constexpr = gl.BlockedLayout([1, HALF // 4], [8, 4], [1, 1], [1, 0])
        vector_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
        token_layout: gl.constexpr = gl.BlockedLayout([1, 2], [2, 16], [1, 1], [1, 0])
        copy_rows = G_STEP * copy_ok.to(gl.int32)  # G_STEP, or 0: nothing read
        rows = gl.arange(0, G_STEP, layout=gl.SliceLayout(1, codes_layout))
        columns = gl.arange(0, HALF, layout=gl.SliceLayout(0, codes_layout))
        rows_ok = (rows < copy_rows)[:, None] & (columns >= 0)[None, :]
        first_row = page_row * BLOCK + step * G_STEP
        _async_copy(key_ring.index(slot), page_ptr + KEY_CODES_AT + (first_row + _step_token(rows))[:, None] * HALF
                    + columns[None, :], rows_ok)
        _async_copy(value_ring.index(slot), page_ptr + VALUE_CODES_AT + (first_row + rows)[:, None] * HALF
                    + columns[None, :], rows_ok)
        group_row = (page_row * (BLOCK // G_STEP) + step) * HEAD_DIM
        runs = gl.arange(0, HEAD_DIM // 4, layout=gl.SliceLayout(1, vector_layout))  # 4 channels a run
        run_channels = runs[:, None] * 4 + gl.arange(0, 4, layout=gl.SliceLayout(0, vector_layout))[None, :]
        runs_ok = (runs < (HEAD_DIM // 4) * copy_ok.to(gl.int32))[:, None] & (run_channels >= 0)
        _async_copy(scale_ring.index(slot), page_ptr + KEY_SCALE_AT + group_row + run_channels, runs_ok)
        _async_copy(min_ring.index(slot), (page_ptr + KEY_MIN_AT).to(gl.pointer_type(gl.float16)) + group_row
                    + run_channels, runs_ok)
        field = gl.arange(0, 2, layout=gl.SliceLayout(1, token_layout))
        tokens = gl.arange(0, G_STEP, layout=gl.SliceLayout(0, token_layout))
        field_at = VALUE_SCALE_AT // 2 + field * ((VALUE_MIN_AT - VALUE_SCALE_AT) // 2)  # in float16 elements
        fields_ok = (field < 2 * copy_ok.to(gl.int32))[:, None] & (tokens >= 0)[None, :]
        _async_copy(token_ring.index(slot), page_ptr.to(gl.pointer_type(gl.float16)) + field_at[:, None]
                    + (first_row + tokens)[None, :], fields_ok)
        word = gl.arange(0, 1, layout=gl.BlockedLayout([1], [32], [1], [0]))
        base_word = (page_row * (BLOCK // G_STEP) + step) // 2
        _async_copy(base_ring.index(slot), (page_ptr + KEY_SCALE_BASE_AT).to(gl.pointer_type(gl.int32)) + base_word
                    + word, word < copy_ok.to(gl.int32))
        async_copy.commit_group()

    @gluon.jit
    def _ring_key_parameters(slot_view, HALF_INDEX: gl.constexpr, vector_layout: gl.constexpr, HALF: gl.constexpr):
        """One half (HALF_INDEX 0 or 1) of a key group's parameters (float16 minimums, or one-byte scale codes) from
        its ring slot, in kvtier's channel order: HALF / 4 contiguous channels a thread (the run its key codes came
        from), relabelled to the operand indices of ``vector_layout`` (a slice of an operand layout) as the unpacked
        codes are."""
        load_layout: gl.constexpr = gl.BlockedLayout([1, HALF // 4], [4, 8], [1, 1], [0, 1])  # (t, run): lane % 4 = t
        values = slot_view.reshape([8, HALF // 4]).slice(HALF_INDEX * 4, 4).load(load_layout)
        values = gl.permute(gl.reshape(values, [4, HALF // 16, 2, 2]), [1, 3, 0, 2])  # (s, h, t, e)
        return gl.convert_layout(gl.reshape(values, [HALF]), vector_layout, assert_trivial=True)

    @gluon.jit
    def _ring_token_parameter(slot_view, FIELD: gl.constexpr, rows_layout: gl.constexpr):
        """A key group's value scales (FIELD 0) or minimums (1) from its ring slot, in score row order: row i holds
        token _step_token(i) (a permutation of the index's bits)."""
        lanes: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
        values = gl.reshape(slot_view.slice(FIELD, 1).load(lanes), [G_STEP])  # (STEP,) token order
        values = gl.permute(gl.reshape(values, [2, 2, 2, 2, 2]), [0, 1, 3, 4, 2])
        return gl.convert_layout(gl.reshape(values, [G_STEP]), rows_layout)

    @gluon.jit
    def _ring_base(slot_view, group_index):
        """A key group's scale base bits from the 4-byte word its ring slot holds (two groups' bases)."""
        word = gl.sum(slot_view.load(gl.BlockedLayout([1], [32], [1], [0])), axis=0)
        return (word >> (16 * (group_index & 1))) & 0xFFFF

    @gluon.jit
    def _hadamard(a_layout: gl.constexpr, HALF: gl.constexpr):
        """(HALF, HALF) float16 Sylvester Hadamard matrix, +-1, as an A operand: (-1)^popcount(i & j)."""
        # the parity of i & j as that of its low 3 bits (lanes: two values a thread) and of its high bits (registers:
        # constants once the compiler sees that lane bits never carry into them)
        rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, a_layout))[:, None]
        columns = gl.arange(0, HALF, layout=gl.SliceLayout(0, a_layout))[None, :]
        low = (rows & 7) & (columns & 7)
        high = (rows >> 3) & (columns >> 3)
        parity = (low ^ (low >> 1) ^ (low >> 2) ^ high ^ (high >> 1) ^ (high >> 2)) & 1
        return ((parity << 15) | 0x3C00).to(gl.int16).to(gl.float16, bitcast=True)  # -1.0 or 1.0

    @gluon.jit
    def _rescaled(step_max, running_max, running_sum, value_bias, low_acc, high_acc, offset_acc):
        """The online softmax's state after a step whose row maxima are ``step_max`` (8,), and the factor it was
        rescaled by (one for rows whose maximum did not grow). Always rescaled, without a branch: a branch ends the
        compiler's scheduling block; without one, calls at 128K tokens and more took 1.5-8% less time on the H200
        (benchmarks/results/kernel-h200-latency.md)."""
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
        query_ptr, signs_ptr,  # (B, H_q, D) model dtype, plain basis; (D,) float32 s of R = diag(s) H / sqrt(D)
        page_base_ptr, warm_offset_ptr, warm_position_ptr, warm_pages,  # uint8 base; (n_warm,) int64 distances in
        # ALIGN bytes; (n_warm,) int32 positions
        warm_count_ptr,  # with COUNT_ON_DEVICE: (1,) int32 n_warm, read here instead of warm_pages
        kv_start_ptr, kv_end_ptr,  # (B,) int32 window
        partial_ptr, partial_lse_ptr,  # (B, H_q, S, D) float32 outputs of each split, model basis; (B, H_q, S)
        page_lse_ptr,  # (B, H_q, n_warm) float32 log2-sum-exp of each warm page's scores (WITH_MASS)
        hot_keys_ptr, hot_values_ptr, hot_table_ptr, hot_pages,  # hot buffers (B, H_kv, T, D); table (3, n_hot)
        hot_stride_batch, hot_stride_head, hot_stride_token,
        scale_log2, inverse_root,  # D^-1/2
        pages_per_split, warm_splits, splits, group,  # splits: warm_splits over the warm pages, then a hot page each
        KV_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, ALIGN: gl.constexpr,
        KEY_CODES_AT: gl.constexpr, VALUE_CODES_AT: gl.constexpr, KEY_SCALE_AT: gl.constexpr,
        KEY_SCALE_BASE_AT: gl.constexpr, KEY_MIN_AT: gl.constexpr, VALUE_SCALE_AT: gl.constexpr,
        VALUE_MIN_AT: gl.constexpr,
        VALUE_CODES_LAYOUT: gl.constexpr, WITH_MASS: gl.constexpr, ROTATE: gl.constexpr,
        COUNT_ON_DEVICE: gl.constexpr,
    ):
        HALF: gl.constexpr = HEAD_DIM // 2
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        key_load: gl.constexpr = gl.BlockedLayout([1, HALF // 4], [8, 4], [1, 1], [1, 0])  # a token's run a thread
        value_load: gl.constexpr = gl.BlockedLayout([1, HALF // 8], [4, 8], [1, 1], [0, 1])  # the same bytes of 8
        # tokens a thread
        heads_layout: gl.constexpr = gl.SliceLayout(0, mma)  # (8,) query rows, the columns of the products
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma)  # tokens of the scores, channels of the outputs
        channel_vector: gl.constexpr = gl.SliceLayout(1, b_layout)  # key parameters for (q s)^T
        min_vector: gl.constexpr = gl.SliceLayout(0, a_layout)  # key minimums, rows of an A operand
        ring_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # of a slot; the ring index leads
        key_ring = gl.allocate_shared_memory(gl.uint8, [G_RING, G_STEP, HEAD_DIM // 2], ring_layout)
        value_ring = gl.allocate_shared_memory(gl.uint8, [G_RING, G_STEP, HEAD_DIM // 2], ring_layout)
        scale_ring = gl.allocate_shared_memory(gl.uint8, [G_RING, HEAD_DIM // 4, 4], ring_layout)
        min_ring = gl.allocate_shared_memory(gl.float16, [G_RING, HEAD_DIM // 4, 4], ring_layout)
        token_ring = gl.allocate_shared_memory(gl.float16, [G_RING, 2, G_STEP], ring_layout)
        base_ring = gl.allocate_shared_memory(gl.int32, [G_RING, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        rings = (key_ring, value_ring, scale_ring, min_ring, token_ring, base_ring)

        sequence_head = gl.program_id(0)
        split = gl.program_id(1)
        batch_index = sequence_head // KV_HEADS
        page_row = sequence_head  # (b, h) index inside a page's fields: b * KV_HEADS + h
        if COUNT_ON_DEVICE:  # a captured step (CUDA graph): the page count lives on the device, the grid is fixed
            page_count = gl.load(warm_count_ptr)
            per_split = gl.cdiv(page_count, warm_splits)
        else:
            page_count = warm_pages
            per_split = pages_per_split
        first = split * per_split  # past the warm pages in a hot page's split
        last = gl.minimum(first + per_split, page_count)
        # each key group's bytes are copied into a ring of shared memory (cp.async) RING - 1 groups before they are
        # read, so that a program keeps that many groups' reads in flight while it computes; the addresses of the
        # pages they come from are read further ahead. The first groups' copies start before the query is read and
        # rotated, so that their reads overlap that
        GROUPS: gl.constexpr = BLOCK // G_STEP
        AHEAD: gl.constexpr = G_RING - 1  # groups in flight while one is computed: at most 3 pages ahead
        gl.static_assert((GROUPS - 1 + AHEAD) // GROUPS <= 3,
                         "page_ptrs holds pages page .. page + 3: a deeper RING needs more addresses there")
        page_ptrs = (_page_address(page_base_ptr, warm_offset_ptr, first, last, ALIGN),
                     _page_address(page_base_ptr, warm_offset_ptr, first + 1, last, ALIGN),
                     _page_address(page_base_ptr, warm_offset_ptr, first + 2, last, ALIGN))  # pages first .. first + 2
        offset_ahead = gl.load(warm_offset_ptr + first + 3, mask=first + 3 < last, other=0)
        next_position0 = gl.load(warm_position_ptr + first, mask=first < last, other=0)
        for ahead in gl.static_range(AHEAD):  # the program's first AHEAD groups
            _copy_group(rings, ahead, page_ptrs[ahead // GROUPS], ahead % GROUPS, page_row,
                        first + ahead // GROUPS < last, HALF, HEAD_DIM, BLOCK, KEY_CODES_AT, VALUE_CODES_AT,
                        KEY_SCALE_AT, KEY_SCALE_BASE_AT, KEY_MIN_AT, VALUE_SCALE_AT, VALUE_MIN_AT)

        # (q R)^T as B operands (HALF reduction indices, 8 rows), low and high channels, in key operand order
        operand_k = gl.arange(0, HALF, layout=gl.SliceLayout(1, b_layout))
        query_channels = _operand_key_channel(operand_k, HALF)
        query_heads = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
        query_at = query_ptr + (sequence_head * group + query_heads)[None, :] * HEAD_DIM + query_channels[:, None]
        query_ok = (query_heads < group)[None, :]
        query_low = gl.load(query_at, mask=query_ok, other=0.0).to(gl.float32)  # (HALF, 8)
        query_high = gl.load(query_at + HALF, mask=query_ok, other=0.0).to(gl.float32)
        if ROTATE:  # q R = (q s) H / sqrt(D), H = [[H', H'], [H', -H']] over the halves
            hadamard = _hadamard(a_layout, HALF)
            query_low = query_low * gl.load(signs_ptr + query_channels)[:, None]
            query_high = query_high * gl.load(signs_ptr + HALF + query_channels)[:, None]
            rotated_low = mma_v2(hadamard, (query_low + query_high).to(gl.float16),
                                 gl.zeros([HALF, 8], gl.float32, layout=mma))
            rotated_high = mma_v2(hadamard, (query_low - query_high).to(gl.float16),
                                  gl.zeros([HALF, 8], gl.float32, layout=mma))
            query_scale = scale_log2 * inverse_root
            query_low = gl.convert_layout((rotated_low * query_scale).to(gl.float16), b_layout)
            query_high = gl.convert_layout((rotated_high * query_scale).to(gl.float16), b_layout)
        else:
            query_low = (query_low * scale_log2).to(gl.float16)
            query_high = (query_high * scale_log2).to(gl.float16)
        kv_start = gl.load(kv_start_ptr + batch_index)
        kv_end = gl.load(kv_end_ptr + batch_index)

        running_max = gl.full([8], -1.0e30, gl.float32, layout=heads_layout)
        running_sum = gl.zeros([8], gl.float32, layout=heads_layout)
        low_acc = gl.zeros([HALF, 8], gl.float32, layout=mma)  # (rows, query rows): sum of w v
        high_acc = gl.zeros([HALF, 8], gl.float32, layout=mma)

        tokens = gl.arange(0, G_STEP, layout=rows_layout)
        step_tokens = _step_token(tokens)  # the token of each score row
        minus_key_low_offset = gl.full([16, HALF], -KEY_LOW_OFFSET, gl.float16, layout=a_layout)
        minus_key_high_offset = gl.full([16, HALF], -KEY_HIGH_OFFSET, gl.float16, layout=a_layout)
        ones = gl.full([16, G_STEP], 1.0, gl.float16, layout=a_layout)

        slot = 0
        for page in range(first, last):
            position0 = next_position0
            next_position0 = gl.load(warm_position_ptr + page + 1, mask=page + 1 < last, other=0)
            page_ptrs = page_ptrs + (_offset_address(page_base_ptr, offset_ahead, ALIGN),)  # pages page .. page + 3
            offset_ahead = gl.load(warm_offset_ptr + page + 4, mask=page + 4 < last, other=0)
            page_sum = gl.zeros([8], gl.float32, layout=heads_layout)
            # the page's values enter the MMAs as s_t (64 + c); what that adds to the accumulators (64 s_t) and the
            # minimums they leave out (m_t) are summed per page and corrected after it, so that the accumulators
            # never hold large terms that cancel (float32 sums over a long split would lose the small result)
            value_bias = gl.zeros([8], gl.float32, layout=heads_layout)  # sum of w m_t
            offset_acc = gl.zeros([16, 8], gl.float32, layout=mma)  # sum of w s_t as the MMAs saw it (16 equal rows)
            for step in gl.static_range(GROUPS):  # one key group a step
                token0 = step * G_STEP
                # the slot read last step is free once every lane is past it: refill it with the group AHEAD on,
                # then wait for this group's copies and make every lane's visible
                _barrier()
                _copy_group(rings, (slot + AHEAD) % G_RING, page_ptrs[(step + AHEAD) // GROUPS],
                            (step + AHEAD) % GROUPS, page_row, page + (step + AHEAD) // GROUPS < last, HALF, HEAD_DIM,
                            BLOCK, KEY_CODES_AT, VALUE_CODES_AT, KEY_SCALE_AT, KEY_SCALE_BASE_AT, KEY_MIN_AT,
                            VALUE_SCALE_AT, VALUE_MIN_AT)
                async_copy.wait_group(AHEAD)
                _barrier()
                base_bits = _ring_base(base_ring.index(slot), page_row * GROUPS + step)
                key_codes = key_ring.index(slot).load(key_load)
                value_codes = value_ring.index(slot).load(value_load)
                scale_low = _ring_key_parameters(scale_ring.index(slot), 0, channel_vector, HALF)
                scale_high = _ring_key_parameters(scale_ring.index(slot), 1, channel_vector, HALF)
                min_low = _ring_key_parameters(min_ring.index(slot), 0, min_vector, HALF)
                min_high = _ring_key_parameters(min_ring.index(slot), 1, min_vector, HALF)
                value_scale = _ring_token_parameter(token_ring.index(slot), 0, rows_layout)
                value_min = _ring_token_parameter(token_ring.index(slot), 1, rows_layout)
                slot = (slot + 1) % G_RING
                folded_low = query_low * _key_scales(scale_low, base_bits)[:, None]
                folded_high = query_high * _key_scales(scale_high, base_bits)[:, None]  # (HALF, 8) float16
                zero_rows = gl.zeros([16, HALF], gl.float16, layout=a_layout)  # minimums broadcast to 16 rows
                zero_columns = gl.zeros([16, 8], gl.float32, layout=mma)
                min_low_rows = gl.broadcast(min_low[None, :], zero_rows)[0]
                min_high_rows = gl.broadcast(min_high[None, :], zero_rows)[0]
                # the scores of the low and high channels and their column terms: four MMA chains, none waiting for
                # another's result, added after
                key_low, key_high = _unpacked(key_codes, UNPACK_KEYS)  # (STEP, HALF) each, as loaded
                zero_scores = gl.zeros([G_STEP, 8], gl.float32, layout=mma)
                scores_low = mma_v2(_key_a_operand(key_low, a_layout, HALF), folded_low, zero_scores)
                scores_high = mma_v2(_key_a_operand(key_high, a_layout, HALF), folded_high, zero_scores)
                column_low = mma_v2(min_low_rows, query_low, zero_columns)
                column_high = mma_v2(min_high_rows, query_high, zero_columns)
                column_low = mma_v2(minus_key_low_offset, folded_low, column_low)
                column_high = mma_v2(minus_key_high_offset, folded_high, column_high)
                scores = (scores_low + scores_high) + gl.max(column_low + column_high, axis=0)[None, :]  # (STEP, 8)
                positions = position0 + token0 + step_tokens
                scores = gl.where(((positions >= kv_start) & (positions < kv_end))[:, None], scores, float("-inf"))

                running_max, running_sum, value_bias, low_acc, high_acc, offset_acc, factor = _rescaled(
                    gl.max(scores, axis=0), running_max, running_sum, value_bias, low_acc, high_acc, offset_acc)
                page_sum = page_sum * factor
                weights = gl.exp2(scores - running_max[None, :])  # (STEP, 8)
                step_sum = gl.sum(weights, axis=0)
                running_sum += step_sum
                page_sum += step_sum

                value_bias += gl.sum(weights * value_min.to(gl.float32)[:, None], axis=0)
                scaled = gl.convert_layout((weights * value_scale.to(gl.float32)[:, None]).to(gl.float16),
                                           b_layout)  # (STEP, 8)
                value_low, value_high = _value_a_operand(value_codes, a_layout, VALUE_CODES_LAYOUT, HALF)
                offset_acc = mma_v2(ones, scaled, offset_acc)
                low_acc = mma_v2(value_low, scaled, low_acc)
                high_acc = mma_v2(value_high, scaled, high_acc)

            page_bias = value_bias - VALUE_OFFSET * gl.max(offset_acc, axis=0)  # (8,)
            low_acc += page_bias[None, :]
            high_acc += page_bias[None, :]
            if WITH_MASS:
                page_lse = running_max + gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [page_sum],
                                                                   dtype=gl.float32, is_pure=True, pack=1)
                mass_heads = gl.arange(0, 8, layout=heads_layout)
                gl.store(page_lse_ptr + (sequence_head * group + mass_heads) * page_count + page, page_lse,
                         mask=mass_heads < group)
            page_ptrs = (page_ptrs[1], page_ptrs[2], page_ptrs[3])
        async_copy.wait_group(0)  # the copies past the last page (none read) before the program ends

        # with ROTATE, the warm part back to the model basis: y R^T = (y H / sqrt(D)) s, applied to the normalized
        # output (float16 operands need its range)
        if ROTATE:
            safe_sum = gl.where(running_sum == 0.0, 1.0, running_sum)
            low_normalized = low_acc / safe_sum[None, :]
            high_normalized = high_acc / safe_sum[None, :]
            hadamard = _hadamard(a_layout, HALF)
            zeros = gl.zeros([HALF, 8], gl.float32, layout=mma)
            low_acc = mma_v2(hadamard, gl.convert_layout((low_normalized + high_normalized).to(gl.float16), b_layout),
                             zeros)
            high_acc = mma_v2(hadamard, gl.convert_layout((low_normalized - high_normalized).to(gl.float16),
                                                          b_layout), zeros)
            unscale = safe_sum[None, :] * inverse_root
            signs_at = signs_ptr + _operand_value_byte(gl.arange(0, HALF, layout=rows_layout), HALF)
            low_acc = low_acc * gl.load(signs_at)[:, None] * unscale
            high_acc = high_acc * gl.load(signs_at + HALF)[:, None] * unscale

        # a hot page (a split of its own): model-dtype rows of the hot buffer, 32 tokens a step; the plain query as
        # the B operand
        hot_load: gl.constexpr = gl.BlockedLayout([1, HALF // 8], [4, 8], [1, 1], [1, 0])  # (32 tokens, HALF channels)
        hot_tokens = gl.arange(0, G_STEP, layout=gl.SliceLayout(1, hot_load))
        hot_channels = gl.arange(0, HALF, layout=gl.SliceLayout(0, hot_load))
        hot_base = batch_index.to(gl.int64) * hot_stride_batch + (sequence_head % KV_HEADS).to(gl.int64) * \
            hot_stride_head
        hot_split = split - warm_splits  # this split's hot page, if it has one
        for row in range(gl.maximum(hot_split, 0), gl.minimum(hot_split + 1, hot_pages)):
            hot_offset = gl.load(hot_table_ptr + row)
            hot_position = gl.load(hot_table_ptr + hot_pages + row)
            hot_count = gl.load(hot_table_ptr + 2 * hot_pages + row)
            plain_channels = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, b_layout))
            plain_query = gl.load(query_ptr + (sequence_head * group + query_heads)[None, :] * HEAD_DIM
                                  + plain_channels[:, None], mask=query_ok, other=0.0)  # (D, 8)
            for sub in gl.static_range(4):  # a hot page (at most 128 tokens) in 4 steps of 32
                if sub * 32 < hot_count:
                    token_ok = (sub * 32 + hot_tokens < hot_count)[:, None]
                    at = hot_base + (hot_offset + sub * 32 + hot_tokens)[:, None].to(gl.int64) * hot_stride_token + \
                        hot_channels[None, :]
                    key_low = gl.load(hot_keys_ptr + at, mask=token_ok, other=0.0)  # (32, HALF)
                    key_high = gl.load(hot_keys_ptr + at + HALF, mask=token_ok, other=0.0)
                    keys = gl.convert_layout(gl.reshape(gl.permute(gl.join(key_low, key_high), [0, 2, 1]),
                                                        [32, HEAD_DIM]), a_layout)
                    scores = mma_v2(keys, plain_query, gl.zeros([G_STEP, 8], gl.float32, layout=mma)) * scale_log2
                    positions = hot_position + sub * 32 + tokens
                    ok = (sub * 32 + tokens < hot_count) & (positions >= kv_start) & (positions < kv_end)
                    scores = gl.where(ok[:, None], scores, float("-inf"))
                    # (no value bias or offsets here: running_sum stands in for them, its rescaling discarded)
                    running_max, running_sum, _, low_acc, high_acc, _, _ = _rescaled(
                        gl.max(scores, axis=0), running_max, running_sum, running_sum, low_acc, high_acc,
                        running_sum[None, :])
                    weights = gl.exp2(scores - running_max[None, :])
                    running_sum += gl.sum(weights, axis=0)
                    plain_weights = gl.convert_layout(weights.to(plain_query.dtype), b_layout)  # (32, 8)
                    value_low = gl.load(hot_values_ptr + at, mask=token_ok, other=0.0)  # (32, HALF)
                    value_high = gl.load(hot_values_ptr + at + HALF, mask=token_ok, other=0.0)
                    low_acc = mma_v2(_hot_value_operand(value_low, a_layout, HALF), plain_weights, low_acc)
                    high_acc = mma_v2(_hot_value_operand(value_high, a_layout, HALF), plain_weights, high_acc)

        safe_sum = gl.where(running_sum == 0.0, 1.0, running_sum)
        lse = gl.where(running_sum == 0.0, float("-inf"), running_max + gl.log2(safe_sum))
        out_heads = gl.arange(0, 8, layout=heads_layout)
        head_ok = out_heads < group
        split_rows = (sequence_head * group + out_heads) * splits + split
        gl.store(partial_lse_ptr + split_rows, lse, mask=head_ok)
        out_channels = _operand_value_byte(gl.arange(0, HALF, layout=rows_layout), HALF)  # of each row (low half)
        out_at = partial_ptr + split_rows[None, :] * HEAD_DIM + out_channels[:, None]
        gl.store(out_at, low_acc / safe_sum[None, :], mask=head_ok[None, :])
        gl.store(out_at + HALF, high_acc / safe_sum[None, :], mask=head_ok[None, :])

    @gluon.jit
    def _hot_value_operand(values, a_layout: gl.constexpr, HALF: gl.constexpr):
        """(32 tokens, HALF channels) of the hot buffer -> (HALF rows, 32 tokens) A operand, row r holding channel
        _value_byte(r) as the warm accumulator's rows do."""
        values = gl.reshape(gl.permute(gl.reshape(values, [32, 8, HALF // 8]), [0, 2, 1]), [32, HALF])  # labels
        return gl.convert_layout(gl.permute(values, [1, 0]), a_layout)
