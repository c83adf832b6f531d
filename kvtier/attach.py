"""attach() and detach(): point a transformers model's attention and generate() at a TieredCache."""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .attention import ATTENTION_NAME, tiered_attention_forward
from .cache import TieredCache
from .compat import CACHE_KEYWORD
from .config import TierConfig
from .errors import KVTierError, UnsupportedModelError
from .graph import DecodeGraph

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
        """The model's generate() with a TieredCache; records the tokens the cache holds afterwards (for save())."""
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        passed = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 also names it cache=
        if passed is None:
            passed = kwargs[CACHE_KEYWORD] = self.new_cache(kwargs.get("attention_mask"))
        elif isinstance(passed, TieredCache):
            self.cache = passed
            check_continuation(self.cache, input_ids)
        graph = self.decode_graph(passed)
        own_forward = self.model.__dict__.get("forward")  # an instance attribute (accelerate's hooks set one), or None
        if graph is not None:  # decode steps replay a CUDA graph: the model's forward goes through it meanwhile
            model_forward = self.model.forward
            self.model.forward = functools.wraps(model_forward)(  # generate() reads the forward's signature
                lambda *inputs, **named: graph.forward(model_forward, *inputs, **named))
        try:
            output = self.original_generate(*args, **kwargs)
        finally:
            if graph is not None and own_forward is None:
                del self.model.forward  # the class's forward shows through again
            elif graph is not None:
                self.model.forward = own_forward
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        if isinstance(passed, TieredCache) and sequences is not None and sequences.shape[1] >= passed.get_seq_length():
            passed.token_ids = sequences[:, :passed.get_seq_length()].cpu()
        return output

    def decode_graph(self, cache) -> DecodeGraph | None:
        """The DecodeGraph that serves ``cache``'s decode steps (kept on the cache), or None (``cuda_graph``)."""
        if not isinstance(cache, TieredCache) or self.config.cuda_graph == "off":
            return None
        captured = self.config.cuda_graph == "auto"
        if captured and self.model.device.type != "cuda":
            return None
        if cache.decode_graph is None:
            cache.decode_graph = DecodeGraph(cache, captured)
        return cache.decode_graph

    def save(self, path, token_ids: torch.Tensor | None = None):
        """Write the latest cache to the directory ``path``; load it with ``kvtier.load(path, model)``. ``token_ids``
        (B, N): the tokens it holds, by default those its last generate() recorded."""
        if self.cache is None:
            raise KVTierError("kvtier: nothing to save yet; run model.generate() first.")
        return self.cache.save(path, token_ids, model=self.model)

    def set_budgets(self, budget_gb: float | None = None, host_budget_gb: float | None = None,
                    disk_budget_gb: float | None = None) -> None:
        """Change the budgets (None: unchanged) of the latest cache, at once (see TieredCache.set_budgets: a smaller
        budget moves pages down by policy, all or nothing), and of every cache generate() makes from now on."""
        config = self.config.with_budgets(budget_gb, host_budget_gb, disk_budget_gb)  # invalid values raise here
        if self.cache is not None:
            self.cache.set_budgets(budget_gb, host_budget_gb, disk_budget_gb)
        self.config = config

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


def check_continuation(cache: TieredCache, input_ids) -> None:
    """A cache that knows its tokens (recorded by generate(), or loaded) continues only the same tokens."""
    held = cache.token_ids
    if held is None or not isinstance(input_ids, torch.Tensor) or held.shape[1] != cache.get_seq_length():
        return
    prefix = input_ids[:, :held.shape[1]].cpu()
    if prefix.shape != held.shape or not torch.equal(prefix, held):
        differs = (prefix != held[:, :prefix.shape[1]]).nonzero() if prefix.shape[0] == held.shape[0] else None
        where = f", first at row {differs[0, 0]} position {differs[0, 1]}" if differs is not None and len(differs) else ""
        raise KVTierError(
            f"kvtier: the cache holds {tuple(held.shape)} tokens that input_ids {tuple(input_ids.shape)} do not start "
            f"with{where}. Pass the sequence the cache was built from followed by the new tokens, or no "
            "past_key_values for a new prompt.")


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
