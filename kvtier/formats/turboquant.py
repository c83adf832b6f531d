"""The TurboQuant page format (arXiv 2504.19874): unit vectors on a Lloyd-Max codebook, norms apart, and for
keys a 1-bit QJL sketch of the residual that can make the query-key dot product unbiased (by default it is scaled
for the least squared error instead; see below).

Keys and values arrive rotated (randomized Hadamard), so every coordinate of x / |x| follows the same known
distribution and one codebook per bit width serves all channels (see lloyd_max). For a key x with unit
direction y = x / |x|, codes c and residual r = y - levels[c]:

    q . x  ~  |x| (q . levels[c] + sqrt(pi / 2) / D * |r| * (q S^T) . sign(r S^T))

with S a (D, D) standard Gaussian matrix fixed per layer (the "sketch"); the second term's expectation over S
is |x| q . r, so the estimate is unbiased. Values keep only the codebook part (MSE-optimal).

The unbiased sketch term u = sqrt(pi / 2) / D |r| S^T sign(S r) is noisy: E|u - r|^2 = (pi / 2 - 1 / D) |r|^2,
more than the |r|^2 error of leaving the residual out, so for a query in a random direction the unbiased
estimate scatters more than the codebook part alone. ``qjl_estimator="min_mse"`` scales u by the lambda that
minimizes E|r - lambda u|^2 over S: lambda = E[r . u] / E|u|^2 = 1 / (pi / 2 + (D - 1) / D) (0.39 at D = 64),
which leaves E|r - lambda u|^2 = (1 - lambda) |r|^2: the sign bit then removes 39% of the residual's squared
error instead of adding 55%, at the price of a bias (dot products shrink toward the codebook part's).

Keys can first be centered (``key_group`` > 0): the mean key of every ``key_group`` tokens is stored in float16
and only the differences are quantized. Keys share a large common component (per-channel offsets, slowly
turning low-frequency rotary channels) that a per-vector norm would otherwise spread over every token's error;
the mean is the part of the key that INT4's per-channel minimum captures.

Fields: key_planes (B, H, block, key_bits, D // 8) and value_planes (B, H, block, bits, D // 8) uint8 (key_bits:
``bits`` unless the keys are given their own width), bit p of channel j in byte j // 8 of plane p at bit j % 8;
key_signs (B, H, block, D // 8) uint8 (with the sketch) the residual's signs, packed alike; key_norm, value_norm,
key_residual_norm (B, H, block, 1) float16; key_mean (B, H, block // key_group, D) float16 when keys are centered.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvtier.int4 import PARAM_DTYPE

from .lloyd_max import boundaries, codebook

_TINY = 1e-12
_BIT_WEIGHTS = 1 << torch.arange(8)  # bit i of a byte


@functools.lru_cache(maxsize=None)
def levels(bits: int, dim: int, device: str) -> torch.Tensor:
    """(2^bits,) float32 codebook levels on ``device``."""
    return codebook(bits, dim).float().to(device)


@functools.lru_cache(maxsize=None)
def _boundaries(bits: int, dim: int, device: str) -> torch.Tensor:
    return boundaries(codebook(bits, dim)).float().to(device)


def qjl_sketch(dim: int, seed: int) -> torch.Tensor:
    """(D, D) float32 matrix of independent standard normals, reproducible from ``seed``."""
    return torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., D) of 0/1 -> (..., D // 8) uint8, channel j at bit j % 8 of byte j // 8."""
    grouped = bits.to(torch.int32).unflatten(-1, (-1, 8))
    return (grouped * _BIT_WEIGHTS.to(bits.device, torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., D // 8) uint8 -> (..., D) int32 of 0/1."""
    weights = _BIT_WEIGHTS.to(packed.device, torch.int32)
    return ((packed.to(torch.int32).unsqueeze(-1) & weights) != 0).to(torch.int32).flatten(-2)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) integer codes < 2^bits -> (..., bits, D // 8) uint8 bit planes."""
    return torch.stack([pack_bits((codes >> plane) & 1) for plane in range(bits)], dim=-2)


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """(..., bits, D // 8) uint8 -> (..., D) int64 codes."""
    bits = unpack_bits(planes)  # (..., bits, D)
    shifts = torch.arange(planes.shape[-2], device=planes.device).unsqueeze(-1)
    return (bits.long() << shifts).sum(-2)


@dataclass(frozen=True)
class TurboQuantFormat:
    bits: int = 3  # codebook bits per channel, of values (and of keys unless key_bits is set)
    qjl: bool = True  # keys add a 1-bit sketch of their residual (scaled as qjl_estimator says)
    key_group: int = 0  # tokens sharing one stored key mean (keys quantized as differences from it); 0: none
    qjl_estimator: str = "min_mse"  # how the sketch term is scaled: "min_mse" or "unbiased" (see the module doc)
    key_bits: int = 0  # codebook bits per key channel; 0: ``bits``
    name = "turboquant"

    @property
    def bits_of_keys(self) -> int:
        return self.key_bits or self.bits

    @property
    def label(self) -> str:
        centered = f"+mean/{self.key_group}" if self.key_group else ""
        sketch = ("+qjl" + ("(min-mse)" if self.qjl_estimator == "min_mse" else "")) if self.qjl else ""
        bits = f"{self.bits}bit" if self.bits_of_keys == self.bits else f"k{self.bits_of_keys}v{self.bits}bit"
        return f"turboquant-{bits}" + sketch + centered

    def qjl_scale(self, dim: int) -> float:
        """The factor of |r| (q S^T) . sign(S r) in a key's dot product: sqrt(pi / 2) / D, times the min-MSE lambda."""
        unbiased = math.sqrt(math.pi / 2) / dim
        return unbiased if self.qjl_estimator == "unbiased" else unbiased / (math.pi / 2 + (dim - 1) / dim)

    def fields(self, batch: int, heads: int, block: int, dim: int):
        norms = (batch, heads, block, 1)
        fields = {"key_planes": ((batch, heads, block, self.bits_of_keys, dim // 8), torch.uint8),
                  "value_planes": ((batch, heads, block, self.bits, dim // 8), torch.uint8)}
        if self.qjl:
            fields["key_signs"] = ((batch, heads, block, dim // 8), torch.uint8)
            fields["key_residual_norm"] = (norms, PARAM_DTYPE)
        fields["key_norm"] = (norms, PARAM_DTYPE)
        fields["value_norm"] = (norms, PARAM_DTYPE)
        if self.key_group:
            fields["key_mean"] = ((batch, heads, block // self.key_group, dim), PARAM_DTYPE)
        return fields

    def encode(self, vectors: torch.Tensor, bits: int | None = None):
        """(..., D) float32 -> codes (..., D) int64, norms (..., 1) float32, unit residual (..., D) float32, on the
        codebook of ``bits`` (None: ``self.bits``)."""
        dim, device, bits = vectors.shape[-1], str(vectors.device), bits or self.bits
        norms = vectors.norm(dim=-1, keepdim=True)
        unit = vectors / norms.clamp_min(_TINY)
        codes = torch.bucketize(unit, _boundaries(bits, dim, device))
        return codes, norms, unit - levels(bits, dim, device)[codes]

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, valid=None, sketch: torch.Tensor | None = None):
        """keys, values (B, H, block, D) rotated; valid (B, block) bool or None (padding stays out of key means)."""
        keys = keys.float()
        if self.key_group:
            key_mean = self._key_means(keys, valid)  # (B, H, groups, D)
            keys = keys - key_mean.to(keys.dtype).repeat_interleave(self.key_group, dim=-2)
        key_codes, key_norm, key_residual = self.encode(keys, self.bits_of_keys)
        value_codes, value_norm, _ = self.encode(values.float())
        page = {"key_planes": pack_planes(key_codes, self.bits_of_keys),
                "value_planes": pack_planes(value_codes, self.bits),
                "key_norm": key_norm.to(PARAM_DTYPE), "value_norm": value_norm.to(PARAM_DTYPE)}
        if self.qjl:
            if sketch is None:
                raise ValueError("TurboQuant keys with the QJL bit need the layer's sketch matrix")
            page["key_signs"] = pack_bits(key_residual @ sketch.T >= 0)
            page["key_residual_norm"] = key_residual.norm(dim=-1, keepdim=True).to(PARAM_DTYPE)
        if self.key_group:
            page["key_mean"] = key_mean
        return page

    def _key_means(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, H, block, D) -> float16 means over each group of key_group real tokens: (B, H, groups, D)."""
        batch, heads, block, dim = keys.shape
        grouped = keys.view(batch, heads, block // self.key_group, self.key_group, dim)
        if valid is None:
            return grouped.mean(-2).to(PARAM_DTYPE)
        weights = valid.view(batch, 1, block // self.key_group, self.key_group, 1).to(keys.dtype)
        return ((grouped * weights).sum(-2) / weights.sum(-2).clamp_min(1)).to(PARAM_DTYPE)

    def dequantize(self, fields: dict, dtype: torch.dtype = torch.float32, sketch: torch.Tensor | None = None):
        planes = fields["key_planes"]
        dim = planes.shape[-1] * 8
        keys = levels(self.bits_of_keys, dim, str(planes.device)).to(dtype)[unpack_planes(planes)]
        if self.qjl:
            signs = unpack_bits(fields["key_signs"]).to(dtype) * 2 - 1  # (..., D) of +-1
            residual_scale = self.qjl_scale(dim) * fields["key_residual_norm"].to(dtype)
            keys = keys + residual_scale * (signs @ sketch.to(dtype))
        keys = keys * fields["key_norm"].to(dtype)
        if self.key_group:
            keys = keys + fields["key_mean"].to(dtype).repeat_interleave(self.key_group, dim=-2)
        table = levels(self.bits, dim, str(planes.device)).to(dtype)
        values = table[unpack_planes(fields["value_planes"])] * fields["value_norm"].to(dtype)
        return keys, values
