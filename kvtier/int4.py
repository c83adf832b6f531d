"""Packed INT4, KIVI-style: keys per channel over a block, values per token; two codes per byte.

A block of keys ``(..., T, D)`` gets one (scale, minimum) pair per channel, shared by its ``T`` tokens;
a block of values gets one pair per token, shared by its ``D`` channels. Codes are unsigned 0..15 and
packed along the head dim in halves: byte ``j`` holds channel ``j`` in its low nibble and channel ``j + D/2`` in
its high one, so that a kernel unpacks the low nibbles into the first half of the channels and the high
nibbles into the second, each half contiguous (no interleaving in registers).
Minimums and value scales are stored in float16. Key scales (per channel over a key group) are stored as one byte
each, ``encode_key_scales``: a channel's scale is base * 2^e * (1 + m / 32), code 32 e + m, over the 8 octaves above
the group's ``base``, a power of two stored in float16 once per group (126-252 times below its widest channel's
scale). A code is the nearest to the scale, within 1/64 of it (a channel narrower than base gets base), and the
float16 scale is the bits of ``base`` plus 32 times the code (``decode_key_scales``). Keys are then coded against the
decoded scale; where it came out below the scale, a channel's top values clip to code 15, by at most 15/64 of a step.
"""

from __future__ import annotations

import torch

LEVELS = 15  # 4 bits: codes 0..15
PARAM_DTYPE = torch.float16
SCALE_CODE_DTYPE = torch.uint8
SCALE_STEPS = 32  # key scale codes: 32 steps an octave (5 bits) ...
SCALE_OCTAVES = 8  # ... over 8 octaves above the group's base (3 bits)
_CODE_TOP = SCALE_OCTAVES * SCALE_STEPS - 1  # 255
_SCALE_TOP = 2.0 ** (SCALE_OCTAVES - 1) * (2 - 1 / SCALE_STEPS)  # code 255 as a multiple of base: 252
_BASE_EXPONENTS = (-14, 8)  # a float16 normal base whose largest code stays finite (2^8 * 252 < 65504)
_TINY = 1e-6


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) integer codes in 0..15 -> (..., D // 2) uint8."""
    codes = codes.to(torch.uint8)
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., D // 2) uint8 -> (..., D) uint8 codes in 0..15."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
    """Asymmetric 4-bit codes for x given per-group bounds (broadcastable), params rounded to float16 first."""
    scale = ((high - low) / LEVELS).clamp_min(_TINY).to(PARAM_DTYPE)
    minimum = low.to(PARAM_DTYPE)
    return _packed_codes(x, scale, minimum), scale, minimum


def _packed_codes(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """x coded against its stored float16 scale and minimum (broadcastable): nearest of 0..15, packed."""
    return pack_nibbles(torch.round((x - minimum.float()) / scale.float()).clamp_(0, LEVELS))


def encode_key_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) positive float32 scales of a key group's channels -> one-byte codes (..., D) uint8 and the group's
    base (..., 1) float16, the smallest power of two that puts the widest channel within code 255. Decoded, a code
    is the grid's nearest to its scale (base for scales below base). (Rounded up instead, so that the codes always
    spanned a channel's range, the cache lost a passkey on 24 prompts that the dense cache and nearest codes answer:
    benchmarks/results/quality-cpu-passkeys24-scale-codes.md.)"""
    widest = scales.amax(dim=-1, keepdim=True).clamp(max=2.0 ** _BASE_EXPONENTS[1] * _SCALE_TOP)
    exponent = torch.ceil(torch.log2(widest / _SCALE_TOP)).clamp(*_BASE_EXPONENTS)
    exponent = torch.where(widest > torch.exp2(exponent) * _SCALE_TOP, exponent + 1, exponent)  # log2 rounding
    ratio = (scales / torch.exp2(exponent)).clamp(1.0, _SCALE_TOP)  # exact: a power of two
    mantissa, octave = torch.frexp(ratio)  # ratio = 2 mantissa * 2^(octave - 1), 2 mantissa in [1, 2)
    codes = (octave - 1) * SCALE_STEPS + torch.round((2 * mantissa - 1) * SCALE_STEPS).to(torch.int32)
    return codes.clamp(0, _CODE_TOP).to(SCALE_CODE_DTYPE), torch.exp2(exponent).to(PARAM_DTYPE)


def decode_key_scales(codes: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Codes (..., D) uint8 and base (..., 1) float16 -> float16 scales (..., D): the bits of base plus 32 codes
    (base's exponent field plus the code's octave, the code's 5 low bits as the top of the mantissa)."""
    bits = base.view(torch.int16).to(torch.int32) + codes.to(torch.int32) * (1 << (10 - 5))
    return bits.to(torch.int16).view(PARAM_DTYPE)


# decode_key_scales in PTX, for the CUDA kernels (inline_asm_elementwise, pack 4): four code bytes ($2) -> four float16
# scales ($0, $1), bytes to 16-bit lanes by byte permutes, then each lane times 32 plus the base's bits ($3: those bits
# in both lanes), a multiply-add a pair
DECODE_KEY_SCALES_PTX = """
{
.reg .b32 pair;
prmt.b32 pair, $2, 0, 0x4140;
mad.lo.u32 $0, pair, 32, $3;
prmt.b32 pair, $2, 0, 0x4342;
mad.lo.u32 $1, pair, 32, $3;
}
"""


def quantize_keys(keys: torch.Tensor, valid: torch.Tensor | None = None):
    """Per-channel INT4 of key blocks, scales as one-byte codes.

    keys:  (..., T, D) float, T tokens of one block
    valid: (..., T) bool or None; tokens marked False (padding) are left out of the channel ranges
    returns codes (..., T, D // 2) uint8, scale codes (..., 1, D) uint8, base (..., 1, 1) and minimum (..., 1, D)
    float16; decode_key_scales(scale codes, base) are the scales
    """
    x = keys.float()
    if valid is None:
        low, high = x.amin(dim=-2, keepdim=True), x.amax(dim=-2, keepdim=True)
    else:
        mask = valid.unsqueeze(-1)  # (..., T, 1)
        low = torch.where(mask, x, torch.inf).amin(dim=-2, keepdim=True)
        high = torch.where(mask, x, -torch.inf).amax(dim=-2, keepdim=True)
        no_valid = ~mask.any(dim=-2, keepdim=True)
        low, high = low.masked_fill(no_valid, 0.0), high.masked_fill(no_valid, 0.0)
    scale_codes, base = encode_key_scales(((high - low) / LEVELS).clamp_min(_TINY))
    minimum = low.to(PARAM_DTYPE)
    return _packed_codes(x, decode_key_scales(scale_codes, base), minimum), scale_codes, base, minimum


def quantize_values(values: torch.Tensor):
    """Per-token INT4 of value blocks: (..., T, D) -> codes (..., T, D // 2), scale and minimum (..., T, 1)."""
    x = values.float()
    return _quantize(x, x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes (..., T, D // 2) with broadcastable params -> (..., T, D) in ``dtype`` (float32 by default)."""
    return unpack_nibbles(codes).to(dtype).mul_(scale.to(dtype)).add_(minimum.to(dtype))
