"""The keyword transformers takes a cache by: ``cache`` in the releases that renamed it (5.2x, where
``past_key_values`` is deprecated, to leave forward() in 5.40 and generate() in 6.0), ``past_key_values`` before."""

from __future__ import annotations

from transformers.generation import utils as generation_utils

CACHE_KEYWORD = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def with_cache(cache) -> dict:
    """Keyword arguments passing ``cache`` to a model's forward() or generate(), or to a model output."""
    return {CACHE_KEYWORD: cache}
