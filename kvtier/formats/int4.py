"""The INT4 page format, KIVI-style: keys per channel over key groups (or per token), values per token.

Fields (B, H batch and KV heads; see kvtier.int4 for the nibble packing and the key scale codes):
key_codes, value_codes (B, H, block, D // 2) uint8; per channel: key_scale (B, H, block // key_group, D) uint8
codes, key_scale_base (B, H, block // key_group, 1) float16 and key_min (B, H, block // key_group, D) float16; per
token: key_scale, key_min (B, H, block, 1) float16; value_scale, value_min (B, H, block, 1) float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier import int4


@dataclass(frozen=True)
class Int4Format:
    key_group: int  # tokens sharing one per-channel key (scale, min)
    key_per_channel: bool = True
    name = "int4"
    label = "int4"
    qjl = False  # INT4 keys carry no residual sketch

    def fields(self, batch: int, heads: int, block: int, dim: int):
        codes, token_params = (batch, heads, block, dim // 2), (batch, heads, block, 1)
        if self.key_per_channel:
            groups = (batch, heads, block // self.key_group)
            key_fields = {"key_scale": ((*groups, dim), int4.SCALE_CODE_DTYPE),
                          "key_scale_base": ((*groups, 1), int4.PARAM_DTYPE),
                          "key_min": ((*groups, dim), int4.PARAM_DTYPE)}
        else:
            key_fields = {"key_scale": (token_params, int4.PARAM_DTYPE), "key_min": (token_params, int4.PARAM_DTYPE)}
        return {"key_codes": (codes, torch.uint8), "value_codes": (codes, torch.uint8), **key_fields,
                "value_scale": (token_params, int4.PARAM_DTYPE), "value_min": (token_params, int4.PARAM_DTYPE)}

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, sketch=None) -> dict:
        if self.key_per_channel:
            key_fields = self._quantize_keys_by_group(keys, valid)
        else:
            key_codes, key_scale, key_min = int4.quantize_values(keys)
            key_fields = dict(key_codes=key_codes, key_scale=key_scale, key_min=key_min)
        value_codes, value_scale, value_min = int4.quantize_values(values)
        return dict(**key_fields, value_codes=value_codes, value_scale=value_scale, value_min=value_min)

    def _quantize_keys_by_group(self, keys: torch.Tensor, valid: torch.Tensor | None) -> dict:
        """Per-channel INT4 over groups of key_group tokens: (B, H, block, D) -> key_codes (B, H, block, D // 2),
        key_scale codes and key_min (B, H, groups, D), key_scale_base (B, H, groups, 1)."""
        batch, heads, block, dim = keys.shape
        group = self.key_group
        grouped = keys.view(batch, heads, block // group, group, dim)
        if valid is not None:
            valid = valid[:, None, :].expand(batch, heads, block).reshape(batch, heads, block // group, group)
        codes, scale_codes, base, minimum = int4.quantize_keys(grouped, valid)  # params (B, H, groups, 1, D or 1)
        return dict(key_codes=codes.view(batch, heads, block, dim // 2), key_scale=scale_codes.squeeze(-2),
                    key_scale_base=base.squeeze(-2), key_min=minimum.squeeze(-2))

    def key_scales(self, fields: dict) -> torch.Tensor:
        """The key scales of ``fields`` as float16: (..., groups, D) decoded per channel, (..., block, 1) per token."""
        if self.key_per_channel:
            return int4.decode_key_scales(fields["key_scale"], fields["key_scale_base"])
        return fields["key_scale"]

    def dequantize(self, fields: dict, dtype: torch.dtype = torch.float32, sketch=None):
        key_scale, key_min = self.key_scales(fields), fields["key_min"]
        if self.key_per_channel:  # (n, B, H, groups, D) -> one row per token
            key_scale = key_scale.repeat_interleave(self.key_group, dim=3)
            key_min = key_min.repeat_interleave(self.key_group, dim=3)
        keys = int4.dequantize(fields["key_codes"], key_scale, key_min, dtype)
        values = int4.dequantize(fields["value_codes"], fields["value_scale"], fields["value_min"], dtype)
        return keys, values
