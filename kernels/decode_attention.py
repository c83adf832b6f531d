"""Paged decode attention over every tier in place: a Triton split-K kernel and its plain-torch reference.

One program takes one (sequence, KV head) pair, all the query heads that share that KV head (GQA, so each
KV byte is read once), and a range of pages. Warm pages are packed INT4 or TurboQuant codes (see kvtier.formats),
dequantized in registers (TurboQuant: codebook levels times the vector's norm, plus the key's QJL sign term
scored against the sketched query); hot pages are the model dtype, read from the hot buffer. An online softmax runs
over the pages; a second small kernel merges the splits by log-sum-exp and turns per-page log-sum-exps
into per-page attention mass for the policies.

Warm pages live in the rotated basis (keys and values were multiplied by R before quantizing), so they
are scored against the rotated query q R and accumulate rotated values; the hot accumulator stays plain. Each
program rotates its query rows and turns its warm accumulator back (times R^T) itself, so a split's partial output
is in the model basis and no matrix product runs outside the kernels.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from kvtier import int4
from kvtier.formats import TurboQuantFormat
from kvtier.formats.turboquant import levels as turboquant_levels
from kvtier.kernels import int4_mma_decode
from kvtier.kernels.partial_attention import PartialAccumulator, attend_scores, masked_scores, partial_attention
from kvtier.pages import ALIGNMENT, PageLayout, WarmPages

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

HOT_TILE = 128  # hot tokens per kernel step; hot pages are cut to at most this many tokens
MAX_SPLITS = 64
# (num_warps, num_stages) of the page kernel, by the kind of page that dominates the launch;
# benchmarks/kernel.py --sweep measures the alternatives
LAUNCH = {"int4": (4, 4), "dense": (4, 2)}
WARM_TILE = 128  # warm tokens the kernel reads per step (whole pages)
QUERY_ROWS_PER_PROGRAM = 64  # a KV head's query rows one program takes at most; more rows (a prefill tile's query
# heads x positions) are spread over programs of their own, each reading the pages once for its rows
SPLIT_PROGRAMS_PER_MULTIPROCESSOR = 2  # on CUDA, splits per (sequence, KV head) fill about this many programs per
# multiprocessor (rounded down to a power of two): 32 splits at batch 1 and 4 at batch 8 with 8 KV heads on 132 SMs,
# the fastest of 2-64 at batch 1, 2, 4 and 8 on the H200 (benchmarks/results/kernel-splits-h200.md)
SPLITS_PER_HEAD = None  # a fixed number instead of that rule (benchmarks/kernel_variants.py sets it)
# Compile-time variants of the INT4 warm path (benchmarks/kernel_variants.py times them; all match the reference).
# lop3_unpack is on: 3.1-5.8% faster than without on the H200; the others measured slower and are off (offset 0.2-3.9%,
# fold 3.9-11.5%, mass_dot no cheaper; benchmarks/results/kernel-variants-h200-lop3.json, kernel-variants-h200.json):
# fold_key_scales: per-channel key scales multiply the query per key group, (q s_g) . c_t + q . m_g, in one batched
#     dot over the tile's key groups, instead of dequantizing every key element
# offset_codes: nibbles enter the dots as the float16 1 + c/64 (the code's bits under 1.0's exponent; no subtraction
#     per element), and what the offset adds comes off once per row: values fold 64 s_t into the weights and take
#     the weights' sum off; per-token keys take 64 times the query's sum off, folded keys the folded query's sum (a dot
#     with -1). Per-channel keys, which are dequantized per element, keep c (changing their group parameters would
#     be recomputed per element)
# mass_dot: each page's softmax sum comes from one dot of the weights with a page indicator, not a reshape and sum
# lop3_unpack: compiled CUDA only (the interpreter keeps the plain unpacking): inline PTX turns 4 code bytes into 8
#     float16 1024 + c (then c, by a subtraction per two codes), or 1 + c/64 with offset_codes, with two byte
#     permutes, two shifts and four lop3 instructions
VARIANT = {"fold_key_scales": False, "offset_codes": False, "mass_dot": False, "lop3_unpack": True}
VARIANT_NAMES = {"fold": "fold_key_scales", "offset": "offset_codes", "mass_dot": "mass_dot", "lop3": "lop3_unpack"}

MASS_PAGES = 16  # page columns of the mass_dot indicator: at least a tile's pages, and a tensor-core width
MASS_TILE = 128  # warm pages whose mass one program of the merge kernel turns from log-sum-exps into shares
MERGE_ROWS = 16  # query rows one merge program takes at most
MERGE_CHANNELS = 16  # channels one merge program takes: at batch 1 a KV head's ~130 splits are merged by
# HEAD_DIM / 16 programs at once, not one program walking them in turn (H200, 128K tokens and 198 splits: 6.3 us
# for the merge against 18 us)
MERGE_ELEMENTS = 4096  # split partials one merge program loads at a time (rows x splits x channels)
LOG2_E = 1.4426950408889634


def variant_switches(name: str) -> dict:
    """A variant's VARIANT dict from its name: "base", or keys of VARIANT_NAMES joined by "+" ("fold+offset")."""
    parts = [] if name == "base" else name.split("+")
    unknown = [part for part in parts if part not in VARIANT_NAMES]
    if unknown:
        raise ValueError(f"unknown kernel variant parts {unknown}: use base, or {', '.join(VARIANT_NAMES)} joined by +")
    chosen = {VARIANT_NAMES[part] for part in parts}
    return {switch: switch in chosen for switch in VARIANT}


@dataclass
class PagedKV:
    """One layer's cached tokens as the decode attention reads them.

    warm: packed pages (WarmPages, or warm pages joined with staged cold ones, kvtier.prefetch); their device
        tables (``warm.base``, ``warm.offsets``, ``warm.positions``, ``warm.rows`` rows) feed the kernel and
        their host rows (``warm.table``, ``warm.read``) the reference
    hot_keys, hot_values: (B, H_kv, T_hot, D) model dtype buffers
    hot_pages: (offset in the hot buffer, position of the first token, token count) per hot page, on the host
    hot_table: (3, n_hot) int32 on the device, the same rows as columns
    rotation: (D, D) float32 R, or None; warm pages hold k R and v R
    sketch: (D, D) float32 S of TurboQuant keys' residual signs, or None
    rotation_signs: (D,) float32 s where R = diag(s) H / sqrt(D) (kvtier.rotation), or None: the Gluon INT4 kernel
        applies such an R by its Hadamard structure and leaves other rotations to the page kernel
    """

    warm: WarmPages
    hot_keys: torch.Tensor
    hot_values: torch.Tensor
    hot_pages: list[tuple[int, int, int]]
    hot_table: torch.Tensor
    rotation: torch.Tensor | None
    sketch: torch.Tensor | None = None
    rotation_signs: torch.Tensor | None = None

    @property
    def warm_pages(self) -> int:
        return self.warm.rows


def hot_table_tensor(rows: list[tuple[int, int, int]], device) -> torch.Tensor:
    """The (offset, position, count) rows as the kernel reads them: (3, n_hot) int32 columns on ``device``."""
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).T.contiguous().to(device)


def hot_table_rows(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Cut (offset, position, count) segments of the hot buffer into pages of at most HOT_TILE tokens."""
    rows = []
    for offset, position, count in segments:
        for first in range(0, count, HOT_TILE):
            rows.append((offset + first, position + first, min(HOT_TILE, count - first)))
    return rows


# ------------------------------------------------------------------------------------------------ reference
def paged_attention_reference(queries: torch.Tensor, paged: PagedKV, kv_start: torch.Tensor, kv_end: torch.Tensor,
                              allowed: torch.Tensor | None = None, key_tile: int = 1024, with_mass: bool = False,
                              other_lse: torch.Tensor | None = None):
    """Softmax attention of scaled queries over the cached tokens at positions kv_start[b] <= p < kv_end[b].

    queries: (B, H_kv, G, Q, D) float (float32, or float64 for a reference), multiplied by the softmax scale
    kv_start, kv_end: (B,) integer tensors
    allowed: (B, Q, K) bool or None; further restricts which positions each query row may attend
    returns out (B, H_kv, G, Q, D), lse (B, H_kv, G, Q) (natural log; -inf where nothing was attended) and,
    with ``with_mass``, the attention mass of each warm page (B, H_kv, n_warm): summed softmax weight,
    averaged over the query heads and rows; a share of this call's softmax, or, given ``other_lse`` (B, H_kv, G, Q),
    the log-sum-exp of what the rows attend elsewhere, a share of the whole.
    """
    dtype = queries.dtype
    start, end = kv_start.view(-1, 1, 1, 1, 1), kv_end.view(-1, 1, 1, 1, 1)

    def mask(positions: torch.Tensor) -> torch.Tensor:  # positions (T,) -> (B, 1, 1, Q or 1, T)
        ok = (positions >= start) & (positions < end)
        if allowed is not None:
            columns = allowed[:, :, positions.clamp(max=allowed.shape[-1] - 1)]  # (B, Q, T)
            ok = ok & columns[:, None, None]
        return ok

    plain, rotated = PartialAccumulator(), PartialAccumulator()  # hot pieces; warm pieces in the rotated basis
    page_lse = []  # (B, H, G, Q, n) per warm piece, when the mass is wanted
    rotated_queries = queries @ paged.rotation.to(dtype) if paged.rotation is not None else queries
    block = paged.warm.block_size
    pages_per_tile = max(1, key_tile // block)
    table = paged.warm.table
    for first in range(0, len(table), pages_per_tile):
        entries = table[first:first + pages_per_tile]
        keys, values = dequantize_pages(paged, entries, dtype)  # (B, H, n * block, D)
        positions = torch.cat([torch.arange(e.start, e.start + block, device=keys.device) for e in entries])
        scores = masked_scores(rotated_queries, keys, mask(positions))
        if with_mass:
            page_lse.append(scores.unflatten(-1, (-1, block)).logsumexp(-1))
        rotated.add(*attend_scores(scores, values))
    for offset, position, count in paged.hot_pages:
        keys = paged.hot_keys[:, :, offset:offset + count].to(dtype)
        values = paged.hot_values[:, :, offset:offset + count].to(dtype)
        positions = torch.arange(position, position + count, device=keys.device)
        plain.add(*partial_attention(queries, keys, values, mask(positions)))
    if rotated.out is not None:
        warm_out = rotated.out @ paged.rotation.to(dtype).T if paged.rotation is not None else rotated.out
        plain.add(warm_out, rotated.lse)
    no_mass = queries.new_zeros(queries.shape[0], queries.shape[1], 0)
    if plain.out is None:  # nothing cached yet
        return torch.zeros_like(queries), queries.new_full(queries.shape[:-1], -torch.inf), no_mass
    if not with_mass:
        return plain.out, plain.lse, None
    if not page_lse:
        return plain.out, plain.lse, no_mass
    whole_lse = plain.lse if other_lse is None else torch.logaddexp(plain.lse, other_lse.to(plain.lse.dtype))
    safe_lse = torch.where(torch.isfinite(whole_lse), whole_lse, torch.zeros_like(whole_lse))
    shares = torch.exp(torch.cat(page_lse, -1) - safe_lse.unsqueeze(-1))  # (B, H, G, Q, n_warm)
    return plain.out, plain.lse, shares.mean(dim=(2, 3))


def dequantize_pages(paged: PagedKV, entries, dtype=torch.float32):
    """Keys and values of consecutive table rows, in the rotated basis: two (B, H, n * block, D) tensors."""
    fields = paged.warm.read(entries)  # (n, *field shape) each
    keys, values = paged.warm.layout.format.dequantize(fields, dtype, paged.sketch)  # (n, B, H, block, D) each
    return keys.permute(1, 2, 0, 3, 4).flatten(2, 3), values.permute(1, 2, 0, 3, 4).flatten(2, 3)


# ------------------------------------------------------------------------------------------------ launcher
def kernel_reads(layout: PageLayout) -> bool:
    """Whether the kernel reads pages of this layout (else attention uses the reference): power-of-two
    sizes, and key groups (INT4 per-channel parameters, TurboQuant key means) of at least 16 tokens (a
    tensor-core tile)."""
    def power_of_two(number: int) -> bool:
        return number >= 16 and number & (number - 1) == 0

    warm_format = layout.format
    grouped = warm_format.key_group > 0 and getattr(warm_format, "key_per_channel", True)
    key_group = warm_format.key_group if grouped else layout.block_size
    return power_of_two(layout.block_size) and power_of_two(key_group) and power_of_two(layout.head_dim // 2)


@functools.lru_cache(maxsize=64)
def _page_constants(layout: PageLayout, warm_tile: int) -> dict:
    """The kernel's compile-time description of a page: its format and each field's byte offset (0 where the
    format has no such field)."""
    if not kernel_reads(layout):
        raise ValueError(f"the decode kernel cannot read pages of {layout}; use paged_attention_reference")
    at = layout.offsets
    common = dict(BLOCK=layout.block_size, TILE_PAGES=max(1, warm_tile // layout.block_size))
    warm_format = layout.format
    if isinstance(warm_format, TurboQuantFormat):
        key_levels_at = 0 if warm_format.bits_of_keys == warm_format.bits else 2 ** warm_format.bits
        return dict(common, TURBOQUANT=True, BITS=warm_format.bits, KEY_BITS=warm_format.bits_of_keys,
                    KEY_LEVELS_AT=key_levels_at, QJL=warm_format.qjl,
                    KEY_GROUP=warm_format.key_group or layout.block_size, KEY_CENTERED=warm_format.key_group > 0,
                    KEY_PER_TOKEN=False, KEY_CODES_AT=at["key_planes"], VALUE_CODES_AT=at["value_planes"],
                    KEY_SCALE_AT=at["key_norm"], KEY_SCALE_BASE_AT=0, KEY_MIN_AT=at.get("key_mean", 0),
                    VALUE_SCALE_AT=at["value_norm"], VALUE_MIN_AT=0,
                    KEY_SIGNS_AT=at.get("key_signs", 0), KEY_RESIDUAL_AT=at.get("key_residual_norm", 0))
    return dict(common, TURBOQUANT=False, BITS=4, KEY_BITS=4, KEY_LEVELS_AT=0, QJL=False,
                KEY_GROUP=warm_format.key_group, KEY_CENTERED=False, KEY_PER_TOKEN=not warm_format.key_per_channel,
                KEY_CODES_AT=at["key_codes"], VALUE_CODES_AT=at["value_codes"], KEY_SCALE_AT=at["key_scale"],
                KEY_SCALE_BASE_AT=at.get("key_scale_base", 0), KEY_MIN_AT=at["key_min"],
                VALUE_SCALE_AT=at["value_scale"], VALUE_MIN_AT=at["value_min"], KEY_SIGNS_AT=0, KEY_RESIDUAL_AT=0)


@functools.lru_cache(maxsize=16)
def _turboquant_codebook(warm_format: TurboQuantFormat, head_dim: int, device: str) -> torch.Tensor:
    """The value levels (2^BITS,), followed by the key levels (2^KEY_BITS,) at KEY_LEVELS_AT when keys have their own
    bit width."""
    values = turboquant_levels(warm_format.bits, head_dim, device)
    if warm_format.bits_of_keys == warm_format.bits:
        return values
    return torch.cat([values, turboquant_levels(warm_format.bits_of_keys, head_dim, device)])


def kernel_variant(constants: dict, device) -> dict:
    """The VARIANT switches as the kernel's constexprs, those a page format or the device cannot use turned off."""
    int4_by_channel = not constants["TURBOQUANT"] and not constants["KEY_PER_TOKEN"]
    compiled_cuda = torch.device(device).type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    return dict(FOLD_KEY_SCALES=VARIANT["fold_key_scales"] and int4_by_channel,
                OFFSET_CODES=VARIANT["offset_codes"] and not constants["TURBOQUANT"],
                MASS_DOT=VARIANT["mass_dot"] and constants["TILE_PAGES"] <= MASS_PAGES,
                LOP3_UNPACK=VARIANT["lop3_unpack"] and not constants["TURBOQUANT"] and compiled_cuda,
                FAST_LOG2=compiled_cuda)


class DecodeWorkspace:
    """The kernel's scratch (split partials, per-page log-sum-exps), kept between calls and grown on demand."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
        count = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < count or buffer.device != torch.device(device):
            buffer = self.buffers[name] = torch.empty(count, dtype=torch.float32, device=device)
        return buffer[:count].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers.values())


def workspace_bytes(batch: int, query_heads: int, head_dim: int, splits: int = MAX_SPLITS) -> int:
    """Bytes of the split partials of a decode step: outputs and log-sum-exps (per-page mass buffers not included)."""
    return batch * query_heads * splits * (head_dim + 1) * 4


def max_splits(batch: int, kv_heads: int, device, one_warp: bool = False) -> int:
    """Splits per (sequence, KV head): on CUDA enough for SPLIT_PROGRAMS_PER_MULTIPROCESSOR programs per
    multiprocessor, as a power of two (or SPLITS_PER_HEAD where set); two on the CPU (so that merging is exercised).
    ``one_warp``: for the Gluon INT4 kernel (kernels/int4_mma_decode.py), whose programs are one warp each, its own
    programs per multiprocessor and limit, and any count (not rounded to a power of two)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    limit = int4_mma_decode.MAX_SPLITS if one_warp else MAX_SPLITS
    if SPLITS_PER_HEAD is not None:
        return min(limit, SPLITS_PER_HEAD)
    per_multiprocessor = int4_mma_decode.PROGRAMS_PER_MULTIPROCESSOR if one_warp else SPLIT_PROGRAMS_PER_MULTIPROCESSOR
    per_head = max(1, per_multiprocessor * _multiprocessors(device.index) // (batch * kv_heads))
    return min(limit, per_head if one_warp else 1 << (per_head.bit_length() - 1))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int | None) -> int:
    """Streaming multiprocessors of the CUDA device ``index`` (the current one for None), read once."""
    device = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_blocks(group: int) -> tuple[int, int]:
    """(rows per program, programs per KV head) for ``group`` query rows per KV head: the group padded to a power of
    two of at least 16 (a tensor-core width), or QUERY_ROWS_PER_PROGRAM rows at a time when the group is larger."""
    rows = min(max(16, 1 << (group - 1).bit_length()), QUERY_ROWS_PER_PROGRAM)
    return rows, -(-group // rows)


def divide_pages(pages: int, splits: int) -> tuple[int, int]:
    """(splits, pages a split) for ``pages`` over at most ``splits``, with no split left empty (one of none when
    there are no pages)."""
    splits = max(1, min(splits, pages))
    pages_per_split = -(-pages // splits)
    return (-(-pages // pages_per_split) if pages else 1), pages_per_split


def launch_bytes(batch: int, query_heads: int, head_dim: int, splits: int) -> int:
    """Temporaries of one decode_attention call with query_heads rows and ``splits``: its workspace, the float32
    rotated and sketched query of TurboQuant's QJL keys, and the output."""
    return workspace_bytes(batch, query_heads, head_dim, splits) + batch * query_heads * head_dim * 12


def _launch_page_kernel(query, paged: PagedKV, kv_start, kv_end, scale: float, partial, partial_lse, page_lse,
                        splits: int, pages_per_split: int, warm_count) -> None:
    """The Triton page kernel's launch for decode_attention: each split's output and log2-sum-exp into ``partial``
    and ``partial_lse``, each warm page's log2-sum-exp into ``page_lse`` (None: no mass)."""
    batch, query_heads, head_dim = query.shape
    layout = paged.warm.layout
    kv_heads = paged.hot_keys.shape[1]
    group = query_heads // kv_heads
    group_pad, blocks = row_blocks(group)
    warm_pages, hot_pages = paged.warm_pages, paged.hot_table.shape[1]
    with_mass = page_lse is not None
    rotate = paged.rotation is not None
    rotation = paged.rotation.contiguous() if rotate else partial  # not read without ROTATE
    constants = _page_constants(layout, WARM_TILE)
    codebook = _turboquant_codebook(layout.format, head_dim, str(query.device)) if constants["TURBOQUANT"] else partial
    sketched = partial  # not read without QJL
    if constants["QJL"]:  # the rotated query through the QJL sketch, scaled
        rotated = query.float() @ paged.rotation if rotate else query.float()
        sketched = rotated @ paged.sketch.T * layout.format.qjl_scale(head_dim)
    hot_keys, hot_values = paged.hot_keys, paged.hot_values
    # Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot on bf16 returns garbage there): on the CPU,
    # hot bfloat16 tiles are multiplied in float32 instead; compiled kernels use bfloat16 tensor-core dots.
    upcast_hot = hot_keys.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    # float32 operands (hot tiles of float32 models, the rotation): exact products for float32 models and the
    # interpreter, TF32 tensor cores for 16-bit models (whose query and output are rounded coarser anyway)
    float32_precision = "ieee" if hot_keys.dtype == torch.float32 or upcast_hot else "tf32"
    num_warps, num_stages = LAUNCH["int4" if warm_count is not None or warm_pages >= hot_pages else "dense"]
    variant = kernel_variant(constants, query.device)
    _decode_pages_kernel[(batch * kv_heads, splits, blocks)](
        query, rotation, sketched, codebook, paged.warm.base, paged.warm.offsets, paged.warm.positions, warm_pages,
        kv_start if warm_count is None else warm_count,
        hot_keys, hot_values, paged.hot_table, hot_pages, *hot_keys.stride()[:3],
        kv_start, kv_end, partial, partial_lse, partial_lse if page_lse is None else page_lse,
        scale * LOG2_E, pages_per_split, splits, group,
        **constants, KV_HEADS=kv_heads, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        HOT_TILE=HOT_TILE, FLOAT32_PRECISION=float32_precision, UPCAST_HOT=upcast_hot, WITH_MASS=with_mass,
        ROTATE=rotate,
        ALIGNMENT=ALIGNMENT, MASS_PAGES=MASS_PAGES, **variant, COUNT_ON_DEVICE=warm_count is not None,
        num_warps=num_warps, num_stages=num_stages,
    )


def decode_attention(query: torch.Tensor, paged: PagedKV, kv_start: torch.Tensor, kv_end: torch.Tensor, scale: float,
                     with_mass: bool = False, workspace: DecodeWorkspace | None = None, splits: int | None = None,
                     out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                     warm_count: torch.Tensor | None = None):
    """One decode step's attention with the Triton kernels: the Gluon INT4 kernel (kernels/int4_mma_decode.py) where
    it reads the pages, else the Triton page kernel; then the merge kernel.

    query: (B, H_q, D) in the model dtype; kv_start, kv_end: (B,) int32 positions bounding what each row attends.
    H_q may be any multiple of H_kv: a prefill tile passes a KV head's query heads x positions as its rows, which
    the kernel takes QUERY_ROWS_PER_PROGRAM at a time (per-page mass needs all of a head's rows in one program).
    returns out (B, H_q, D) in the model dtype and, with ``with_mass``, warm page mass (B, H_kv, n_warm) float32;
    ``lse``, if given, (B, H_q) float32, receives each row's natural-log log-sum-exp (-inf where nothing was
    attended), for merging with attention over other pages.
    ``warm_count``, if given, (1,) int32 on the device: the number of warm pages to read, so that the launch does
    not depend on it (a CUDA graph replays it while pages are added); the grid is then the full ``splits``, and
    per-page mass is not available.
    """
    batch, query_heads, head_dim = query.shape
    kv_heads = paged.hot_keys.shape[1]
    group = query_heads // kv_heads
    warm_pages, hot_pages = paged.warm_pages, paged.hot_table.shape[1]
    total_pages = warm_pages + hot_pages
    _, blocks = row_blocks(group)
    if with_mass and blocks > 1:
        raise ValueError(f"per-page mass needs at most {QUERY_ROWS_PER_PROGRAM} query rows per KV head, got {group}")
    # the Gluon INT4 kernel takes a launch of mostly warm pages (the page kernel's hot loop is its faster one)
    mostly_warm = warm_count is not None or warm_pages >= hot_pages
    one_warp = blocks == 1 and mostly_warm and int4_mma_decode.reads(query, paged)
    splits = splits or max_splits(batch, kv_heads, query.device, one_warp)
    if warm_count is not None and with_mass:
        raise ValueError("per-page mass needs the page count on the host: call without warm_count")
    if warm_count is None:  # the Gluon kernel divides the warm pages and gives each hot page a split of its own
        splits, pages_per_split = divide_pages(warm_pages if one_warp else total_pages, splits)
    else:
        pages_per_split = 0  # computed in the kernel, over every split (the Gluon kernel's warm ones)
    if one_warp:  # a hot page costs about 2.5 warm pages, and a warm split can be as few as 4
        splits += hot_pages
    workspace = workspace or DecodeWorkspace()
    partial = workspace.get("partial", (batch, query_heads, splits, head_dim), query.device)
    partial_lse = workspace.get("lse", (batch, query_heads, splits), query.device)
    page_lse = workspace.get("page_lse", (batch, query_heads, max(warm_pages, 1)), query.device) if with_mass else None
    mass = torch.empty(batch, kv_heads, warm_pages, device=query.device) if with_mass else None
    query = query.contiguous()
    hot_keys, hot_values = paged.hot_keys, paged.hot_values
    if hot_keys.stride(-1) != 1 or hot_keys.stride() != hot_values.stride():
        raise ValueError("the hot key and value buffers must share strides, with contiguous rows")
    launch = int4_mma_decode.launch if one_warp else _launch_page_kernel
    launch(query, paged, kv_start, kv_end, scale, partial, partial_lse, page_lse, splits, pages_per_split, warm_count)
    out = torch.empty_like(query) if out is None else out
    group_rows = triton.next_power_of_2(group)  # a KV head's query rows, padded to a power of two
    merge_rows = min(max(1, group_rows), MERGE_ROWS)
    merge_channels = min(MERGE_CHANNELS, head_dim)
    row_programs = -(-group // merge_rows) * (head_dim // merge_channels)
    mass_programs = -(-warm_pages // MASS_TILE) if with_mass else 0
    _merge_splits_kernel[(batch * kv_heads, row_programs + mass_programs)](
        partial, partial_lse, out, page_lse if with_mass else partial_lse, mass if with_mass else partial_lse,
        partial_lse if lse is None else lse, warm_pages, splits, group, row_programs,
        MERGE_ROWS=merge_rows, MERGE_CHANNELS=merge_channels, MASS_ROWS=group_rows, HEAD_DIM=head_dim,
        SPLITS_PAD=max(16, triton.next_power_of_2(splits)),
        SPLIT_CHUNK=max(1, min(triton.next_power_of_2(splits), MERGE_ELEMENTS // (merge_rows * merge_channels))),
        WITH_MASS=with_mass, WITH_LSE=lse is not None, MASS_TILE=MASS_TILE,
    )
    return out, mass


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:
    DECODE_KEY_SCALES = tl.constexpr(int4.DECODE_KEY_SCALES_PTX)
    OFFSET_STEP = tl.constexpr(64.0)  # with OFFSET_CODES a nibble c enters the dots as 1 + c / OFFSET_STEP

    def _lop3_unpack(nibble_bits: int, magic: int, shift_low: bool) -> str:
        """PTX turning 4 code bytes b0..b3 ($4) into 8 float16: prmt spreads b0, b1 (then b2, b3) to the two 16-bit
        halves of a register, and lop3 keeps ``nibble_bits`` of each half and ORs in ``magic``; one nibble is where
        those bits are, the other is shifted there (``shift_low``: the low nibble, left by 4; else the high one,
        right by 4). Outputs: $0, $1 the low nibbles of elements (0, 1) and (2, 3); $2, $3 the high ones."""
        low, high = ("shifted", "pair") if shift_low else ("pair", "shifted")
        shift = "shl" if shift_low else "shr"
        return f"""
        {{
        .reg .b32 pair01, pair23, shifted01, shifted23;
        prmt.b32 pair01, $4, 0, 0x4140;
        prmt.b32 pair23, $4, 0, 0x4342;
        {shift}.b32 shifted01, pair01, 4;
        {shift}.b32 shifted23, pair23, 4;
        lop3.b32 $0, {low}01, {nibble_bits:#010x}, {magic:#010x}, 0xEA;
        lop3.b32 $1, {low}23, {nibble_bits:#010x}, {magic:#010x}, 0xEA;
        lop3.b32 $2, {high}01, {nibble_bits:#010x}, {magic:#010x}, 0xEA;
        lop3.b32 $3, {high}23, {nibble_bits:#010x}, {magic:#010x}, 0xEA;
        }}
        """

    LOP3_PLAIN = tl.constexpr(_lop3_unpack(0x000F000F, 0x64006400, shift_low=False))  # 1024 + c (0x6400: 1024.0)
    LOP3_OFFSET = tl.constexpr(_lop3_unpack(0x00F000F0, 0x3C003C00, shift_low=True))  # 1 + c/64, c in bits 4-7

    @triton.jit
    def _log2(values, FAST: tl.constexpr):
        """log2 of float32 values; FAST (compiled CUDA only): the hardware approximation (lg2.approx, relative error
        about 2^-22), one instruction where tl.log2 compiles to a polynomial of about 20."""
        if FAST:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [values], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.log2(values)

    @triton.jit
    def _nibble_values(codes, OFFSET: tl.constexpr):
        """uint8 codes 0..15 -> float16 c without an int-to-float conversion (the bits 0x6400 | c are 1024 + c; the
        subtraction is exact), or with OFFSET the float16 1 + c/64 (the bits 0x3C00 | c << 4, no subtraction), for
        a caller that folds the offset into its parameters (OFFSET_STEP)."""
        if OFFSET:
            return ((codes.to(tl.int16) << 4) | 0x3C00).to(tl.float16, bitcast=True)
        return (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def _unpacked_nibbles(codes, OFFSET: tl.constexpr, LOP3: tl.constexpr):
        """(T, D/2) uint8 codes -> their low and high nibbles as two (T, D/2) float16 tensors: c, or 1 + c/64 with
        OFFSET. LOP3 (compiled CUDA only): the PTX of _lop3_unpack on 4 bytes at a time."""
        if LOP3:
            low, high = tl.inline_asm_elementwise(
                asm=LOP3_OFFSET if OFFSET else LOP3_PLAIN, constraints="=r,=r,=r,=r,r", args=[codes],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            if not OFFSET:
                low, high = low - 1024.0, high - 1024.0
        else:
            low = _nibble_values(codes & 0x0F, OFFSET)
            high = _nibble_values(codes >> 4, OFFSET)
        return low, high

    @triton.jit
    def _key_group_scales(codes_ptr, base_ptr, row_ok, ASM: tl.constexpr):
        """Key groups' float16 scales from their one-byte codes at ``codes_ptr`` (NG, W) and bases at ``base_ptr``
        (NG,): the bits of the base plus 32 times the code (kvtier.int4.decode_key_scales). With ASM (compiled CUDA)
        in inline PTX marked impure, so that each group's row is decoded once rather than again for every token it
        broadcasts to (sm_90, Triton 3.6: 1,444 instructions a warm loop iteration against 1,611 marked pure and
        1,857 in plain Triton; 1,404 with float16 scales)."""
        base_bits = tl.load(base_ptr.to(tl.pointer_type(tl.int16)), mask=row_ok, other=0)
        codes = tl.load(codes_ptr, mask=row_ok[:, None], other=0)
        if ASM:
            base_pair = tl.zeros(codes.shape, tl.int32) + ((base_bits.to(tl.int32) & 0xFFFF) * 0x10001)[:, None]
            return tl.inline_asm_elementwise(asm=DECODE_KEY_SCALES, constraints="=r,=r,r,r,r,r,r",
                                             args=[codes, base_pair], dtype=tl.float16, is_pure=False, pack=4)
        return (base_bits[:, None] + codes.to(tl.int16) * 32).to(tl.float16, bitcast=True)

    @triton.jit
    def _folded_key_scores(query_low, query_high, key_codes, scale_low, scale_high, min_low, min_high,
                           GROUP_PAD: tl.constexpr, TILE: tl.constexpr, KEY_GROUP: tl.constexpr,
                           HALF: tl.constexpr, OFFSET: tl.constexpr, LOP3: tl.constexpr):
        """Scores of a tile of per-channel INT4 keys, the group scales folded into the query: for token t of key
        group g, q . k_t = (q * s_g) . c_t + q . m_g, one batched dot over the tile's key groups.

        query_low, query_high: (G, D/2) float32 halves of q R; key_codes: (T, D/2) uint8, low nibble channel j,
        high nibble channel j + D/2; scale_*, min_*: (NG, D/2) float16 rows of the tile's key groups.
        Returns (G, T) float32.
        """
        GROUPS: tl.constexpr = TILE // KEY_GROUP
        if OFFSET:  # the codes enter as 1 + c/64: fold 64 into the scales
            scale_low, scale_high = scale_low.to(tl.float32) * OFFSET_STEP, scale_high.to(tl.float32) * OFFSET_STEP
        folded_low = (query_low[None, :, :] * scale_low.to(tl.float32)[:, None, :]).to(tl.float16)  # (NG, G, D/2)
        folded_high = (query_high[None, :, :] * scale_high.to(tl.float32)[:, None, :]).to(tl.float16)
        low_codes, high_codes = _unpacked_nibbles(key_codes, OFFSET, LOP3)  # (T, D/2) each
        low_codes = tl.permute(tl.reshape(low_codes, (GROUPS, KEY_GROUP, HALF)), (0, 2, 1))  # (NG, D/2, KEY_GROUP)
        high_codes = tl.permute(tl.reshape(high_codes, (GROUPS, KEY_GROUP, HALF)), (0, 2, 1))
        # q . m_g on the tensor cores too (float16 products are exact, the sums float32): the minimum rows
        # broadcast over the group's tokens, the query over the groups
        query_low16 = tl.broadcast_to(query_low.to(tl.float16)[None, :, :], (GROUPS, GROUP_PAD, HALF))
        query_high16 = tl.broadcast_to(query_high.to(tl.float16)[None, :, :], (GROUPS, GROUP_PAD, HALF))
        group_scores = tl.dot(query_low16, tl.broadcast_to(min_low[:, :, None], (GROUPS, HALF, KEY_GROUP)))
        group_scores = tl.dot(query_high16, tl.broadcast_to(min_high[:, :, None], (GROUPS, HALF, KEY_GROUP)),
                              group_scores)
        if OFFSET:  # the dots see 1 + c/64 against 64 s: a dot with -1 takes the folded query's sum off, exactly
            minus_one = tl.full((GROUPS, HALF, KEY_GROUP), -1.0, tl.float16)
            group_scores = tl.dot(folded_low, minus_one, group_scores)
            group_scores = tl.dot(folded_high, minus_one, group_scores)
        group_scores = tl.dot(folded_low, low_codes, group_scores)  # (NG, G, KEY_GROUP)
        group_scores = tl.dot(folded_high, high_codes, group_scores)
        return tl.reshape(tl.permute(group_scores, (1, 0, 2)), (GROUP_PAD, TILE))

    @triton.jit
    def _store_page_lse(page_lse_ptr, query_rows, head_ok, warm_pages, pages, page_ok, warm_last, safe_max, page_sums,
                        FAST_LOG2: tl.constexpr):
        """Store each (row, page) log2-sum-exp, safe_max + log2 of the page's weight sum, for the warm ``pages`` (P,)
        that ``page_ok`` (P,) marks and that come before warm_last; page_sums: (G, P)."""
        tl.store(page_lse_ptr + query_rows[:, None] * warm_pages + pages[None, :],
                 safe_max[:, None] + _log2(page_sums, FAST_LOG2),
                 mask=head_ok[:, None] & (page_ok & (pages < warm_last))[None, :])

    @triton.jit
    def _per_token(rows, KEY_GROUP: tl.constexpr, TILE: tl.constexpr, WIDTH: tl.constexpr):
        """(TILE // KEY_GROUP, WIDTH) rows of key-group parameters -> (TILE, WIDTH), one row per token."""
        expanded = tl.broadcast_to(rows[:, None, :], (TILE // KEY_GROUP, KEY_GROUP, WIDTH))
        return tl.reshape(expanded, (TILE, WIDTH))

    @triton.jit
    def _plane_bits(plane_ptr, row_ok, WIDTH: tl.constexpr):
        """One bit plane of WIDTH channels: plane_ptr (T,) points at each token's first byte of them, channel j at
        bit j % 8 of byte j // 8. Returns (T, WIDTH) bool. The bytes are read as one contiguous row a token and
        spread to channels in registers."""
        packed = tl.load(plane_ptr[:, None] + tl.arange(0, WIDTH // 8)[None, :], mask=row_ok[:, None], other=0)
        spread = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # (T, WIDTH // 8, 8)
        return tl.reshape(spread, (plane_ptr.shape[0], WIDTH)) != 0

    @triton.jit
    def _select_levels(levels_ptr, bit0, bit1, bit2, BITS: tl.constexpr):
        """levels[c] for c = bit0 + 2 bit1 + 4 bit2 (< 2^BITS; the bits past BITS are not read), by a tree of
        selects between the codebook's levels, loaded once as scalars: no gathered load per element."""
        chosen = tl.where(bit0, tl.load(levels_ptr + 1), tl.load(levels_ptr))
        if BITS >= 2:
            upper = tl.where(bit0, tl.load(levels_ptr + 3), tl.load(levels_ptr + 2))
            chosen = tl.where(bit1, upper, chosen)
        if BITS >= 3:
            upper = tl.where(bit1, tl.where(bit0, tl.load(levels_ptr + 7), tl.load(levels_ptr + 6)),
                             tl.where(bit0, tl.load(levels_ptr + 5), tl.load(levels_ptr + 4)))
            chosen = tl.where(bit2, upper, chosen)
        return chosen

    @triton.jit
    def _codebook_values(rows_ptr, first_byte, row_ok, levels_ptr, BITS: tl.constexpr, PLANE_BYTES: tl.constexpr,
                         WIDTH: tl.constexpr):
        """(T, WIDTH) float16 codebook levels of the codes in BITS bit planes (1-4) of PLANE_BYTES bytes each:
        rows_ptr (T,) points at each token's first plane, ``first_byte`` at the channels' first byte in a plane."""
        start = rows_ptr + first_byte
        bit0 = _plane_bits(start, row_ok, WIDTH)
        bit1 = bit0  # not read below 2 bits
        bit2 = bit0
        if BITS >= 2:
            bit1 = _plane_bits(start + PLANE_BYTES, row_ok, WIDTH)
        if BITS >= 3:
            bit2 = _plane_bits(start + 2 * PLANE_BYTES, row_ok, WIDTH)
        chosen = _select_levels(levels_ptr, bit0, bit1, bit2, BITS)
        if BITS == 4:  # levels 8-15 when the top bit is set
            upper = _select_levels(levels_ptr + 8, bit0, bit1, bit2, 3)
            chosen = tl.where(_plane_bits(start + 3 * PLANE_BYTES, row_ok, WIDTH), upper, chosen)
        return chosen.to(tl.float16)

    # page and split counts change from call to call: left unspecialized, they cost no recompile (one kernel per
    # format and variant, not one per divisibility of each count)
    @triton.jit(do_not_specialize=["warm_pages", "hot_pages", "pages_per_split", "splits"])
    def _decode_pages_kernel(
        query_ptr, rotation_ptr,  # (B, H_q, D) model dtype, plain basis; (D, D) float32 R (read with ROTATE)
        sketched_query_ptr, codebook_ptr,  # TurboQuant: (B, H_q, D) float32 q R S^T qjl_scale; value levels
        # (2^BITS,), then key levels (2^KEY_BITS,) from KEY_LEVELS_AT when their bits differ
        page_base_ptr, warm_offset_ptr, warm_position_ptr, warm_pages,  # uint8 base; (n_warm,) int64 distances
        # of the pages from it, in ALIGNMENT bytes; (n_warm,) int32 positions
        warm_count_ptr,  # with COUNT_ON_DEVICE: (1,) int32 n_warm, read here instead of warm_pages
        hot_keys_ptr, hot_values_ptr, hot_table_ptr, hot_pages,  # hot buffers (B, H_kv, T, D); table (3, n_hot)
        hot_stride_batch, hot_stride_head, hot_stride_token,
        kv_start_ptr, kv_end_ptr,  # (B,) int32
        partial_ptr, partial_lse_ptr,  # (B, H_q, S, D) float32 outputs of each split, model basis; (B, H_q, S)
        page_lse_ptr,  # (B, H_q, n_warm) log2-sum-exp of each warm page's scores
        scale_log2, pages_per_split, splits,
        group,  # query rows per KV head: its query heads (decode), or its query heads x positions (a prefill tile)
        # field byte offsets; TurboQuant keeps norms in the SCALE fields and key means in KEY_MIN
        KEY_CODES_AT: tl.constexpr, VALUE_CODES_AT: tl.constexpr, KEY_SCALE_AT: tl.constexpr,
        KEY_SCALE_BASE_AT: tl.constexpr, KEY_MIN_AT: tl.constexpr, VALUE_SCALE_AT: tl.constexpr,
        VALUE_MIN_AT: tl.constexpr,
        KEY_SIGNS_AT: tl.constexpr, KEY_RESIDUAL_AT: tl.constexpr,
        TURBOQUANT: tl.constexpr, BITS: tl.constexpr, KEY_BITS: tl.constexpr, KEY_LEVELS_AT: tl.constexpr,
        QJL: tl.constexpr, KEY_CENTERED: tl.constexpr,
        KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr, KEY_GROUP: tl.constexpr, KEY_PER_TOKEN: tl.constexpr, TILE_PAGES: tl.constexpr,
        HOT_TILE: tl.constexpr, FLOAT32_PRECISION: tl.constexpr, UPCAST_HOT: tl.constexpr, WITH_MASS: tl.constexpr,
        ROTATE: tl.constexpr,
        ALIGNMENT: tl.constexpr, FOLD_KEY_SCALES: tl.constexpr, OFFSET_CODES: tl.constexpr, MASS_DOT: tl.constexpr,
        MASS_PAGES: tl.constexpr, LOP3_UNPACK: tl.constexpr, FAST_LOG2: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr,
    ):
        HALF: tl.constexpr = HEAD_DIM // 2
        TILE: tl.constexpr = TILE_PAGES * BLOCK  # warm tokens per step: several pages at once
        sequence_head = tl.program_id(0)
        split = tl.program_id(1)
        batch_index = sequence_head // KV_HEADS
        kv_head = sequence_head % KV_HEADS

        heads = tl.program_id(2) * GROUP_PAD + tl.arange(0, GROUP_PAD)  # this program's rows of its KV head
        head_ok = heads < group
        query_rows = sequence_head * group + heads  # (G,)
        half = tl.arange(0, HALF)
        channels = tl.arange(0, HEAD_DIM)
        row_at = query_rows[:, None] * HEAD_DIM
        plain_query = tl.load(query_ptr + row_at + channels[None, :], mask=head_ok[:, None], other=0.0)  # (G, D)
        # the two halves of q R, matching the low and high nibbles of the packed codes: q R[:, :D/2], q R[:, D/2:]
        if ROTATE:
            rotation_at = rotation_ptr + channels[:, None] * HEAD_DIM + half[None, :]  # (D, D/2) first columns
            query_low = tl.dot(plain_query.to(tl.float32), tl.load(rotation_at), input_precision=FLOAT32_PRECISION)
            query_high = tl.dot(plain_query.to(tl.float32), tl.load(rotation_at + HALF),
                                input_precision=FLOAT32_PRECISION)
        else:
            query_low = tl.load(query_ptr + row_at + half[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
            query_high = tl.load(query_ptr + row_at + HALF + half[None, :], mask=head_ok[:, None],
                                 other=0.0).to(tl.float32)
        query_sum = tl.sum(query_low + query_high, 1)  # (G,), for per-token key minimums
        query_low16 = query_low.to(tl.float16)
        query_high16 = query_high.to(tl.float16)
        query16_sum = tl.sum(query_low16.to(tl.float32) + query_high16.to(tl.float32), 1)  # (G,), for offset codes
        if QJL:  # the sketched query, in the same halves as the sign bits
            sketched_low16 = tl.load(sketched_query_ptr + row_at + half[None, :], mask=head_ok[:, None],
                                     other=0.0).to(tl.float16)
            sketched_high16 = tl.load(sketched_query_ptr + row_at + HALF + half[None, :], mask=head_ok[:, None],
                                      other=0.0).to(tl.float16)
        if UPCAST_HOT:
            plain_query = plain_query.to(tl.float32)
        kv_start = tl.load(kv_start_ptr + batch_index)
        kv_end = tl.load(kv_end_ptr + batch_index)

        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        plain_acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        low_acc = tl.zeros([GROUP_PAD, HALF], tl.float32)  # rotated accumulator, first and second half channels
        high_acc = tl.zeros([GROUP_PAD, HALF], tl.float32)

        if COUNT_ON_DEVICE:  # a captured step (CUDA graph): the page count lives on the device, the grid is fixed
            page_count = tl.load(warm_count_ptr)
            per_split = tl.cdiv(page_count + hot_pages, splits)
        else:
            page_count = warm_pages
            per_split = pages_per_split
        first = split * per_split
        last = tl.minimum(first + per_split, page_count + hot_pages)
        warm_last = tl.minimum(last, page_count)
        page_rows = kv_head + batch_index * KV_HEADS  # (b, h) index inside a page's fields
        rows = tl.arange(0, TILE)
        token = rows % BLOCK  # inside its page
        code_row = (page_rows * BLOCK + token) * HALF  # (T,)
        plane_row = (page_rows * BLOCK + token) * (BITS * HEAD_DIM // 8)  # TurboQuant: (T,) first value plane byte
        key_plane_row = (page_rows * BLOCK + token) * (KEY_BITS * HEAD_DIM // 8)  # and first key plane byte
        sign_row = (page_rows * BLOCK + token) * (HEAD_DIM // 8)
        token_param_at = page_rows * BLOCK + token  # per-token (scale, min) rows: values, and keys per token
        key_groups = tl.arange(0, TILE // KEY_GROUP)

        for tile_first in range(first, warm_last, TILE_PAGES):
            page = tile_first + rows // BLOCK  # (T,) the page of each row
            page_ok = page < warm_last
            row_ptr = page_base_ptr + tl.load(warm_offset_ptr + page, mask=page_ok, other=0) * ALIGNMENT
            positions = tl.load(warm_position_ptr + page, mask=page_ok, other=0) + token
            valid = page_ok & (positions >= kv_start) & (positions < kv_end)

            if KEY_CENTERED or not (TURBOQUANT or KEY_PER_TOKEN):  # a row of parameters per key group (INT4
                # scale and min; TurboQuant key mean)
                group_page = tile_first + (key_groups * KEY_GROUP) // BLOCK  # (NG,)
                group_ok = group_page < warm_last
                group_ptr = page_base_ptr + tl.load(warm_offset_ptr + group_page, mask=group_ok, other=0) * ALIGNMENT
                group_index = page_rows * (BLOCK // KEY_GROUP) + (key_groups * KEY_GROUP % BLOCK) // KEY_GROUP
                group_at = group_index * HEAD_DIM
            if TURBOQUANT:  # q . k = |k| (q . levels[codes]) + q . (the group mean) + the QJL term
                key_norm = tl.load((row_ptr + KEY_SCALE_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                   mask=page_ok, other=0.0).to(tl.float32)
                key_rows_ptr = row_ptr + KEY_CODES_AT + key_plane_row
                key_levels_ptr = codebook_ptr + KEY_LEVELS_AT
                low_keys = _codebook_values(key_rows_ptr, 0, page_ok, key_levels_ptr, KEY_BITS, HEAD_DIM // 8, HALF)
                high_keys = _codebook_values(key_rows_ptr, HALF // 8, page_ok, key_levels_ptr, KEY_BITS,
                                             HEAD_DIM // 8, HALF)  # (T, D/2) float16 each
                scores = tl.dot(query_low16, tl.trans(low_keys))
                scores = tl.dot(query_high16, tl.trans(high_keys), scores) * key_norm[None, :]  # (G, T)
                if KEY_CENTERED:  # q . m_g once per key group, broadcast to the group's tokens
                    mean_ptr = (group_ptr + KEY_MIN_AT).to(tl.pointer_type(tl.float16))[:, None] + group_at[:, None]
                    low_mean = tl.load(mean_ptr + half[None, :], mask=group_ok[:, None], other=0.0)  # (NG, D/2)
                    high_mean = tl.load(mean_ptr + HALF + half[None, :], mask=group_ok[:, None], other=0.0)
                    mean_scores = (tl.sum(query_low[:, None, :] * low_mean.to(tl.float32)[None, :, :], 2)
                                   + tl.sum(query_high[:, None, :] * high_mean.to(tl.float32)[None, :, :], 2))  # (G, NG)
                    scores += tl.reshape(tl.broadcast_to(mean_scores[:, :, None],
                                                         (GROUP_PAD, TILE // KEY_GROUP, KEY_GROUP)), (GROUP_PAD, TILE))
                if QJL:  # + |k| |r| qjl_scale (q R S^T) . signs
                    residual = tl.load((row_ptr + KEY_RESIDUAL_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                       mask=page_ok, other=0.0).to(tl.float32)
                    sign_rows_ptr = row_ptr + KEY_SIGNS_AT + sign_row
                    low_signs = tl.where(_plane_bits(sign_rows_ptr, page_ok, HALF), 1.0, -1.0).to(tl.float16)
                    high_signs = tl.where(_plane_bits(sign_rows_ptr + HALF // 8, page_ok, HALF), 1.0,
                                          -1.0).to(tl.float16)
                    sketch_dots = tl.dot(sketched_low16, tl.trans(low_signs))
                    sketch_dots = tl.dot(sketched_high16, tl.trans(high_signs), sketch_dots)
                    scores += sketch_dots * (key_norm * residual)[None, :]
            else:
                key_codes = tl.load(row_ptr[:, None] + KEY_CODES_AT + code_row[:, None] + half[None, :],
                                    mask=page_ok[:, None], other=0)  # (T, D/2)
                if KEY_PER_TOKEN:  # k_t = code_t * s_t + m_t: scale the dot product after
                    scale = tl.load((row_ptr + KEY_SCALE_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                    mask=page_ok, other=0.0).to(tl.float32)
                    minimum = tl.load((row_ptr + KEY_MIN_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                      mask=page_ok, other=0.0).to(tl.float32)
                    low_codes, high_codes = _unpacked_nibbles(key_codes, OFFSET_CODES, LOP3_UNPACK)
                    scores = tl.dot(query_low16, tl.trans(low_codes))
                    scores = tl.dot(query_high16, tl.trans(high_codes), scores)
                    if OFFSET_CODES:  # q . c = 64 (q . (1 + c/64) - sum q), with q as the dot rounded it
                        scores = (scores - query16_sum[:, None]) * OFFSET_STEP
                    scores = scores * scale[None, :] + query_sum[:, None] * minimum[None, :]
                else:  # per channel over key groups: one row of (scale code, min) and a scale base per group
                    scale_ptr = (group_ptr + KEY_SCALE_AT)[:, None] + group_at[:, None]  # uint8 codes
                    base_ptr = group_ptr + KEY_SCALE_BASE_AT + group_index * 2  # float16
                    scale_low = _key_group_scales(scale_ptr + half[None, :], base_ptr, group_ok, LOP3_UNPACK)
                    scale_high = _key_group_scales(scale_ptr + HALF + half[None, :], base_ptr, group_ok,
                                                   LOP3_UNPACK)  # (NG, D/2) float16 each
                    min_ptr = (group_ptr + KEY_MIN_AT).to(tl.pointer_type(tl.float16))[:, None] + group_at[:, None]
                    min_low = tl.load(min_ptr + half[None, :], mask=group_ok[:, None], other=0.0)
                    min_high = tl.load(min_ptr + HALF + half[None, :], mask=group_ok[:, None], other=0.0)
                    if FOLD_KEY_SCALES:  # the scales folded into the query
                        scores = _folded_key_scores(query_low, query_high, key_codes, scale_low, scale_high, min_low,
                                                    min_high, GROUP_PAD, TILE, KEY_GROUP, HALF, OFFSET_CODES,
                                                    LOP3_UNPACK)
                    else:  # the group rows broadcast to their tokens
                        # the codes as c, also with OFFSET_CODES: changing the group parameters for 1 + c/64 would be
                        # recomputed for every element they broadcast to
                        low_codes, high_codes = _unpacked_nibbles(key_codes, False, LOP3_UNPACK)  # (T, D/2) each
                        low_keys = (low_codes * _per_token(scale_low, KEY_GROUP, TILE, HALF)
                                    + _per_token(min_low, KEY_GROUP, TILE, HALF))
                        high_keys = (high_codes * _per_token(scale_high, KEY_GROUP, TILE, HALF)
                                     + _per_token(min_high, KEY_GROUP, TILE, HALF))
                        scores = tl.dot(query_low16, tl.trans(low_keys))
                        scores = tl.dot(query_high16, tl.trans(high_keys), scores)
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))  # (G, T)

            new_max = tl.maximum(running_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            decay = tl.exp2(running_max - safe_max)
            weights = tl.exp2(scores - safe_max[:, None])  # (G, T)
            if WITH_MASS and MASS_DOT:  # each page's log2-sum-exp; the sums from a dot with a page indicator
                mass_pages = tl.arange(0, MASS_PAGES)
                indicator = tl.where((rows // BLOCK)[:, None] == mass_pages[None, :], 1.0, 0.0)  # (T, MASS_PAGES)
                page_sums = tl.dot(weights, indicator, input_precision="tf32")  # (G, MASS_PAGES)
                _store_page_lse(page_lse_ptr, query_rows, head_ok, warm_pages, tile_first + mass_pages,
                                mass_pages < TILE_PAGES, warm_last, safe_max, page_sums, FAST_LOG2)
                tile_sum = tl.sum(weights, 1)
            elif WITH_MASS:  # each page's log2-sum-exp; the tile's sum from the pages' sums (one reduction)
                page_sums = tl.sum(tl.reshape(weights, (GROUP_PAD, TILE_PAGES, BLOCK)), 2)  # (G, pages)
                tile_pages = tl.arange(0, TILE_PAGES)
                _store_page_lse(page_lse_ptr, query_rows, head_ok, warm_pages, tile_first + tile_pages,
                                tile_pages < TILE_PAGES, warm_last, safe_max, page_sums, FAST_LOG2)  # all in the tile
                tile_sum = tl.sum(page_sums, 1)
            else:
                tile_sum = tl.sum(weights, 1)
            running_sum = running_sum * decay + tile_sum
            running_max = new_max
            plain_acc = plain_acc * decay[:, None]

            if TURBOQUANT:  # v = |v| levels[codes]: fold |v| into the weights
                value_norm = tl.load((row_ptr + VALUE_SCALE_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                     mask=page_ok, other=0.0)
                scaled_weights = (weights * value_norm.to(tl.float32)[None, :]).to(tl.float16)
                value_rows_ptr = row_ptr + VALUE_CODES_AT + plane_row
                low_values = _codebook_values(value_rows_ptr, 0, page_ok, codebook_ptr, BITS, HEAD_DIM // 8, HALF)
                high_values = _codebook_values(value_rows_ptr, HALF // 8, page_ok, codebook_ptr, BITS, HEAD_DIM // 8,
                                               HALF)
                low_acc = tl.dot(scaled_weights, low_values, low_acc * decay[:, None])
                high_acc = tl.dot(scaled_weights, high_values, high_acc * decay[:, None])
            else:
                value_codes = tl.load(row_ptr[:, None] + VALUE_CODES_AT + code_row[:, None] + half[None, :],
                                      mask=page_ok[:, None], other=0)
                value_scale = tl.load((row_ptr + VALUE_SCALE_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                      mask=page_ok, other=0.0)
                value_min = tl.load((row_ptr + VALUE_MIN_AT).to(tl.pointer_type(tl.float16)) + token_param_at,
                                    mask=page_ok, other=0.0)
                # v = code * s_t + m_t per token: fold s_t into the weights, sum the minimums apart
                value_scale = value_scale.to(tl.float32)
                if OFFSET_CODES:  # the dots see 1 + c/64: the weights carry 64 s_t
                    value_scale = value_scale * OFFSET_STEP
                scaled_weights = (weights * value_scale[None, :]).to(tl.float16)
                value_bias = tl.sum(weights * value_min.to(tl.float32)[None, :], 1)
                if OFFSET_CODES:  # and the scaled weights' sum (as rounded) comes off: w 64 s (1 + c/64) - w 64 s
                    value_bias -= tl.sum(scaled_weights.to(tl.float32), 1)
                low_values, high_values = _unpacked_nibbles(value_codes, OFFSET_CODES, LOP3_UNPACK)
                low_acc = tl.dot(scaled_weights, low_values, low_acc * decay[:, None] + value_bias[:, None])
                high_acc = tl.dot(scaled_weights, high_values, high_acc * decay[:, None] + value_bias[:, None])

        hot_tokens = tl.arange(0, HOT_TILE)
        hot_base = batch_index.to(tl.int64) * hot_stride_batch + kv_head.to(tl.int64) * hot_stride_head
        for page in range(tl.maximum(first, page_count), last):
            row = page - page_count
            offset = tl.load(hot_table_ptr + row)
            position = tl.load(hot_table_ptr + hot_pages + row)
            count = tl.load(hot_table_ptr + 2 * hot_pages + row)
            hot_ok = hot_tokens < count
            at = hot_base + (offset + hot_tokens)[:, None] * hot_stride_token + channels[None, :]  # (T, D)
            keys = tl.load(hot_keys_ptr + at, mask=hot_ok[:, None], other=0.0)
            if UPCAST_HOT:
                keys = keys.to(tl.float32)
            scores = tl.dot(plain_query, tl.trans(keys), input_precision=FLOAT32_PRECISION)
            positions = position + hot_tokens
            valid = hot_ok & (positions >= kv_start) & (positions < kv_end)
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))

            new_max = tl.maximum(running_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            decay = tl.exp2(running_max - safe_max)
            weights = tl.exp2(scores - safe_max[:, None])
            running_sum = running_sum * decay + tl.sum(weights, 1)
            running_max = new_max
            low_acc = low_acc * decay[:, None]
            high_acc = high_acc * decay[:, None]
            values = tl.load(hot_values_ptr + at, mask=hot_ok[:, None], other=0.0)
            if UPCAST_HOT:
                values = values.to(tl.float32)
            plain_acc = plain_acc * decay[:, None] + tl.dot(weights.to(values.dtype), values,
                                                            input_precision=FLOAT32_PRECISION)

        safe_sum = tl.where(running_sum == 0.0, 1.0, running_sum)
        safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
        lse = tl.where(running_sum == 0.0, float("-inf"), safe_max + tl.log2(safe_sum))
        if ROTATE:  # the warm part back to the model basis: (v R) R^T, by the halves of R's columns
            # R's column halves read again, transposed: (D/2, D) tiles (a fresh load, not R held over the loop)
            transposed_at = rotation_ptr + half[:, None] + channels[None, :] * HEAD_DIM
            plain_acc = tl.dot(low_acc, tl.load(transposed_at), plain_acc, input_precision=FLOAT32_PRECISION)
            plain_acc = tl.dot(high_acc, tl.load(transposed_at + HALF), plain_acc, input_precision=FLOAT32_PRECISION)
        else:
            plain_acc += tl.reshape(tl.permute(tl.join(low_acc, high_acc), (0, 2, 1)), (GROUP_PAD, HEAD_DIM))
        split_rows = query_rows * splits + split  # (G,)
        tl.store(partial_lse_ptr + split_rows, lse, mask=head_ok)
        out_at = split_rows[:, None] * HEAD_DIM
        tl.store(partial_ptr + out_at + channels[None, :], plain_acc / safe_sum[:, None], mask=head_ok[:, None])

    @triton.jit
    def _split_weights_top(partial_lse_ptr, query_rows, row_ok, splits, SPLITS_PAD: tl.constexpr):
        """(top, total) per row: the largest split log2-sum-exp (0 where none is finite) and the sum of
        2^(lse - top) over the splits."""
        split_index = tl.arange(0, SPLITS_PAD)
        lse = tl.load(partial_lse_ptr + query_rows[:, None] * splits + split_index[None, :],
                      mask=row_ok[:, None] & (split_index < splits)[None, :], other=float("-inf"))  # (R, S)
        top = tl.max(lse, 1)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        return safe_top, tl.sum(tl.exp2(lse - safe_top[:, None]), 1)

    @triton.jit
    def _merge_rows(partial_ptr, partial_lse_ptr, out_ptr, lse_ptr, sequence_head, program, splits, group,
                    MERGE_ROWS: tl.constexpr, MERGE_CHANNELS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, WITH_LSE: tl.constexpr):
        """Merge MERGE_CHANNELS channels of MERGE_ROWS query rows of a KV head over the splits, SPLIT_CHUNK splits'
        loads in flight at once; ``program`` numbers (row block, channel block) pairs, channel blocks first."""
        channel_blocks: tl.constexpr = HEAD_DIM // MERGE_CHANNELS
        heads = program // channel_blocks * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
        head_ok = heads < group
        query_rows = sequence_head * group + heads  # (R,)
        top, total = _split_weights_top(partial_lse_ptr, query_rows, head_ok, splits, SPLITS_PAD)
        safe_total = tl.where(total == 0.0, 1.0, total)
        channels = program % channel_blocks * MERGE_CHANNELS + tl.arange(0, MERGE_CHANNELS)
        chunk = tl.arange(0, SPLIT_CHUNK)
        merged = tl.zeros([MERGE_ROWS, MERGE_CHANNELS], tl.float32)
        for first in range(0, splits, SPLIT_CHUNK):
            split_rows = query_rows[:, None] * splits + first + chunk[None, :]  # (R, C)
            split_ok = head_ok[:, None] & (first + chunk < splits)[None, :]
            weight = tl.exp2(tl.load(partial_lse_ptr + split_rows, mask=split_ok, other=float("-inf"))
                             - top[:, None]) / safe_total[:, None]  # (R, C)
            pieces = tl.load(partial_ptr + split_rows[:, :, None] * HEAD_DIM + channels[None, None, :],
                             mask=split_ok[:, :, None], other=0.0)  # (R, C, MERGE_CHANNELS)
            merged += tl.sum(weight[:, :, None] * pieces, 1)
        out_at = query_rows[:, None] * HEAD_DIM + channels[None, :]
        tl.store(out_ptr + out_at, merged.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        if WITH_LSE and program % channel_blocks == 0:
            log2_total = tl.where(total == 0.0, float("-inf"), top + tl.log2(safe_total))
            tl.store(lse_ptr + query_rows, log2_total * 0.6931471805599453, mask=head_ok)  # times ln 2

    @triton.jit
    def _page_mass(partial_lse_ptr, page_lse_ptr, mass_ptr, sequence_head, mass_program, warm_pages, splits, group,
                   MASS_ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr, MASS_TILE: tl.constexpr):
        """MASS_TILE warm pages' attention mass: each page's softmax share, averaged over all of the KV head's rows."""
        heads = tl.arange(0, MASS_ROWS)
        head_ok = heads < group
        query_rows = sequence_head * group + heads  # (G,)
        top, total = _split_weights_top(partial_lse_ptr, query_rows, head_ok, splits, SPLITS_PAD)
        log_total = tl.where(total == 0.0, float("inf"), top + tl.log2(tl.where(total == 0.0, 1.0, total)))
        pages = mass_program * MASS_TILE + tl.arange(0, MASS_TILE)
        page_ok = pages < warm_pages
        page_lse = tl.load(page_lse_ptr + query_rows[:, None] * warm_pages + pages[None, :],
                           mask=head_ok[:, None] & page_ok[None, :], other=float("-inf"))
        share = tl.exp2(page_lse - log_total[:, None])  # (G, pages) softmax weight of each page
        tl.store(mass_ptr + sequence_head * warm_pages + pages, tl.sum(share, 0) / group, mask=page_ok)

    @triton.jit
    def _merge_splits_kernel(
        partial_ptr, partial_lse_ptr,  # (B, H_q, S, D) float32, (B, H_q, S) log2-sum-exp of each split
        out_ptr,  # (B, H_q, D) model dtype
        page_lse_ptr, mass_ptr,  # (B, H_q, n_warm) log2-sum-exp per page; (B, H_kv, n_warm) mass out
        lse_ptr,  # (B, H_q) natural-log log-sum-exp out
        warm_pages, splits, group, row_programs,  # group: query rows per KV head
        MERGE_ROWS: tl.constexpr, MERGE_CHANNELS: tl.constexpr, MASS_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, WITH_MASS: tl.constexpr, WITH_LSE: tl.constexpr,
        MASS_TILE: tl.constexpr,
    ):
        """Programs 0 .. row_programs - 1 of a KV head merge MERGE_CHANNELS channels of MERGE_ROWS of its query rows
        each; the programs after them take MASS_TILE warm pages' mass each (over all of the head's rows, MASS_ROWS of
        them: the group padded to a power of two, not to the page kernel's 16, so that the build with mass stays
        small. With 16 rows for a group of 4 it was 2,064 SASS instructions against 544 without mass, and a decode
        call took 8.5% longer with it at batch 1, 32K tokens on the H200 even with the mass programs not launched;
        benchmarks/results/kernel-h200-latency.md)."""
        sequence_head = tl.program_id(0)
        program = tl.program_id(1)
        if program < row_programs:
            _merge_rows(partial_ptr, partial_lse_ptr, out_ptr, lse_ptr, sequence_head, program, splits, group,
                        MERGE_ROWS, MERGE_CHANNELS, HEAD_DIM, SPLITS_PAD, SPLIT_CHUNK, WITH_LSE)
        elif WITH_MASS:
            _page_mass(partial_lse_ptr, page_lse_ptr, mass_ptr, sequence_head, program - row_programs, warm_pages,
                       splits, group, MASS_ROWS, SPLITS_PAD, MASS_TILE)
