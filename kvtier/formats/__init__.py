"""Warm-page formats: how a block of keys and values becomes the packed fields of one page, and back.

A format is a small frozen dataclass (hashable, so that kernels can specialize on it) behind
:class:`WarmFormat`. It receives keys and values already in the rotated basis and returns named tensors
that :class:`~kvtier.pages.PageLayout` places in a page's bytes.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .int4 import Int4Format
from .turboquant import TurboQuantFormat

FieldSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class WarmFormat(Protocol):
    name: str  # as TierConfig.warm_format names it
    label: str  # with its parameters, for stats and tables
    qjl: bool  # whether keys carry a QJL sketch of their residual (the layer then holds a sketch matrix)

    def fields(self, batch: int, heads: int, block: int, dim: int) -> FieldSpec:
        """Each field's shape and dtype, in the order the fields sit in a page."""
        ...

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                 sketch: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """keys, values (B, H, block, D) float32 in the rotated basis; valid (B, block) bool or None -> fields."""
        ...

    def dequantize(self, fields: dict[str, torch.Tensor], dtype: torch.dtype,
                   sketch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fields with a leading page axis -> keys, values (n, B, H, block, D) in the rotated basis: the
        vectors whose dot products with the rotated query the kernel computes."""
        ...


def make_format(config) -> WarmFormat:
    """The warm format a :class:`~kvtier.config.TierConfig` names."""
    if config.warm_format == "turboquant":
        return _turboquant(config, config.turboquant_bits, config.turboquant_qjl)
    return Int4Format(config.key_group_size, key_per_channel=config.key_axis == "channel")


def make_low_format(config) -> WarmFormat | None:
    """The format of low-precision warm pages (``low_bits``), or None when the precision rule is off."""
    if config.low_bits is None:
        return None
    return _turboquant(config, config.low_bits, qjl=False, key_bits=config.low_key_bits or 0)


def _turboquant(config, bits: int, qjl: bool, key_bits: int = 0) -> TurboQuantFormat:
    """TurboQuant at ``bits`` (keys at ``key_bits``, 0: ``bits``), keys centered per key group as the config says."""
    return TurboQuantFormat(bits, qjl, config.key_group_size if config.turboquant_center_keys else 0,
                            config.turboquant_qjl_estimator, key_bits)


__all__ = ["FieldSpec", "Int4Format", "TurboQuantFormat", "WarmFormat", "make_format", "make_low_format"]
