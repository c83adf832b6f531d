"""Packed INT4, KIVI-style: keys per channel over a block, values per token; two codes per byte.

A block of keys ``(..., T, D)`` gets one (scale, minimum) pair per channel, shared by its ``T`` tokens;
a block of values gets one pair per token, shared by its ``D`` channels. Codes are unsigned 0..15 and
packed along the head dim in halves: byte ``j`` holds channel ``j`` in its low nibble and channel ``j + D/2`` in
its high one, so that a kernel unpacks the low nibbles into the first half of the channels and the high
nibbles into the second, each half contiguous (no interleaving in registers).
Scales and minimums are stored in float16.
"""

from __future__ import annotations

import torch

LEVELS = 15  # 4 bits: codes 0..15
PARAM_DTYPE = torch.float16
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
    codes = torch.round((x - minimum.float()) / scale.float()).clamp_(0, LEVELS)
    return pack_nibbles(codes), scale, minimum


def quantize_keys(keys: torch.Tensor, valid: torch.Tensor | None = None):
    """Per-channel INT4 of key blocks.

    keys:  (..., T, D) float, T tokens of one block
    valid: (..., T) bool or None; tokens marked False (padding) are left out of the channel ranges
    returns codes (..., T, D // 2) uint8, scale (..., 1, D) and minimum (..., 1, D) float16
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
    return _quantize(x, low, high)


def quantize_values(values: torch.Tensor):
    """Per-token INT4 of value blocks: (..., T, D) -> codes (..., T, D // 2), scale and minimum (..., T, 1)."""
    x = values.float()
    return _quantize(x, x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes (..., T, D // 2) with broadcastable params -> (..., T, D) in ``dtype`` (float32 by default)."""
    return unpack_nibbles(codes).to(dtype).mul_(scale.to(dtype)).add_(minimum.to(dtype))
