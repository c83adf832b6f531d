"""attach() and detach(): point a transformers model's attention and generate() at a TieredCache."""

from __future__ import annotations

import dataclasses
import functools

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .attention import ATTENTION_NAME, tiered_attention_forward
from .cache import TieredCache
from .config import TierConfig
from .errors import UnsupportedModelError

AttentionInterface.register(ATTENTION_NAME, tiered_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


class KVTier:
    """What :func:`attach` returns: the configuration, a cache factory, and the last cache's stats."""

    def __init__(self, model, config: TierConfig):
        self.model = model
        self.config = config
        self.cache: TieredCache | None = None  # the cache of the latest generate() call
        self.previous_attention = model.config._attn_implementation
        self.original_generate = model.generate

    def new_cache(self, attention_mask=None) -> TieredCache:
        """A fresh empty cache; pass the prompt's 2D attention mask when it is left-padded."""
        self.cache = TieredCache(self.config, self.model.config, padding_mask=attention_mask)
        return self.cache

    def generate(self, *args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = self.new_cache(kwargs.get("attention_mask"))
        elif isinstance(kwargs["past_key_values"], TieredCache):
            self.cache = kwargs["past_key_values"]
        return self.original_generate(*args, **kwargs)

    def stats(self) -> dict:
        """Per-tier tokens and bytes of the latest cache (empty before the first generate)."""
        if self.cache is None:
            return {"tokens": 0, "budget_bytes": self.config.budget_bytes, "cache_bytes": 0, "budget_used": 0.0}
        return self.cache.stats()


def attach(model, budget_gb: float = 2.0, config: TierConfig | None = None, **overrides) -> KVTier:
    """Make ``model.generate()`` keep its KV cache in tiers under ``budget_gb`` of device memory.

    ``config`` gives every knob at once; keyword ``overrides`` replace single fields (``recent_window=256``).
    """
    if getattr(model, "_kvtier", None) is not None:
        raise ValueError("kvtier is already attached to this model; call kvtier.detach(model) first.")
    config = dataclasses.replace(config or TierConfig(), budget_gb=budget_gb, **overrides)
    check_model(model)
    handle = KVTier(model, config)
    _set_attention(model, ATTENTION_NAME)
    model.generate = functools.wraps(handle.original_generate)(lambda *args, **kwargs: handle.generate(*args, **kwargs))
    model._kvtier = handle
    return handle


def detach(model) -> None:
    """Undo :func:`attach`: the stock attention and cache come back."""
    handle = getattr(model, "_kvtier", None)
    if handle is None:
        raise ValueError("kvtier is not attached to this model.")
    _set_attention(model, handle.previous_attention)
    del model.generate  # the instance attribute; the class's generate shows through again
    model._kvtier = None


def check_model(model) -> None:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not hasattr(model, "generate"):
        raise UnsupportedModelError(f"kvtier: {name} is not a transformers generative model (no config/generate).")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"kvtier: {name} is an encoder-decoder model; kvtier serves decoder-only models.")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"kvtier: {name} does not route attention through transformers' AttentionInterface, so kvtier cannot "
            "read its cache. Use a model whose class sets _supports_attention_backend (Llama, Qwen2, Mistral, ...)."
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        layer_types.add("sliding_attention")
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(
            f"kvtier: {name} has layer types {sorted(layer_types)}; kvtier serves full-attention layers only "
            "(sliding-window, chunked and linear-attention layers keep their own caches). Use the model's stock cache."
        )
    for field in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(getattr(config, field, None), int):
            raise UnsupportedModelError(f"kvtier: {name}'s config has no integer {field}.")


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
