"""The INT4 page format, KIVI-style: keys per channel over key groups (or per token), values per token.

Fields (B, H batch and KV heads; see kvtier.int4 for the nibble packing):
key_codes, value_codes (B, H, block, D // 2) uint8; key_scale, key_min (B, H, block // key_group, D)
float16 per channel, or (B, H, block, 1) per token; value_scale, value_min (B, H, block, 1) float16.
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
        key_params = (batch, heads, block // self.key_group, dim) if self.key_per_channel else (batch, heads, block, 1)
        codes, token_params = (batch, heads, block, dim // 2), (batch, heads, block, 1)
        return {"key_codes": (codes, torch.uint8), "value_codes": (codes, torch.uint8),
                "key_scale": (key_params, int4.PARAM_DTYPE), "key_min": (key_params, int4.PARAM_DTYPE),
                "value_scale": (token_params, int4.PARAM_DTYPE), "value_min": (token_params, int4.PARAM_DTYPE)}

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, sketch=None) -> dict:
        if self.key_per_channel:
            key_codes, key_scale, key_min = self._quantize_keys_by_group(keys, valid)
        else:
            key_codes, key_scale, key_min = int4.quantize_values(keys)
        value_codes, value_scale, value_min = int4.quantize_values(values)
        return dict(key_codes=key_codes, key_scale=key_scale, key_min=key_min,
                    value_codes=value_codes, value_scale=value_scale, value_min=value_min)

    def _quantize_keys_by_group(self, keys: torch.Tensor, valid: torch.Tensor | None):
        """Per-channel INT4 over groups of key_group tokens: (B, H, block, D) -> codes (B, H, block, D // 2),
        scale and minimum (B, H, groups, D)."""
        batch, heads, block, dim = keys.shape
        group = self.key_group
        grouped = keys.view(batch, heads, block // group, group, dim)
        if valid is not None:
            valid = valid[:, None, :].expand(batch, heads, block).reshape(batch, heads, block // group, group)
        codes, scale, minimum = int4.quantize_keys(grouped, valid)  # params (B, H, groups, 1, D)
        return codes.view(batch, heads, block, dim // 2), scale.squeeze(-2), minimum.squeeze(-2)

    def dequantize(self, fields: dict, dtype: torch.dtype = torch.float32, sketch=None):
        key_scale, key_min = fields["key_scale"], fields["key_min"]
        if self.key_per_channel:  # (n, B, H, groups, D) -> one row per token
            key_scale = key_scale.repeat_interleave(self.key_group, dim=3)
            key_min = key_min.repeat_interleave(self.key_group, dim=3)
        keys = int4.dequantize(fields["key_codes"], key_scale, key_min, dtype)
        values = int4.dequantize(fields["value_codes"], fields["value_scale"], fields["value_min"], dtype)
        return keys, values
