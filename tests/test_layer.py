"""The tier mechanics of TieredCache on random states, no model: placement, order, budget, attention."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from kvtier import BudgetExceededError, BudgetTooSmallError, TierConfig, TieredCache
from kvtier.attention import attend_tiers
from kvtier.config import BYTES_PER_GB
from kvtier.kernels.decode_attention import dequantize_pages
from kvtier.rotation import random_signs, rotate

MODEL = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64)
SMALL = dict(sink_tokens=2, recent_window=8, block_size=4, key_tile=8, query_tile=4)


def make_cache(budget_gb=0.01, **overrides):
    return TieredCache(TierConfig(budget_gb=budget_gb, **{**SMALL, **overrides}), MODEL)


def random_states(length, seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, 2, length, 16, generator=generator) * 2
    return keys, torch.randn(batch, 2, length, 16, generator=generator)


def cached_tokens(layer):
    """Every cached token in the original basis, read through the layer's pages: positions (N,), keys and
    values (B, H, N, D), in position order."""
    paged = layer.paged()
    positions, keys, values = [], [], []
    if paged.warm.table:
        warm_keys, warm_values = dequantize_pages(paged, paged.warm.table)
        if layer.rotation is not None:
            warm_keys, warm_values = warm_keys @ layer.rotation.T, warm_values @ layer.rotation.T
        block = paged.warm.block_size
        positions += [torch.arange(entry.start, entry.start + block) for entry in paged.warm.table]
        keys.append(warm_keys)
        values.append(warm_values)
    for offset, position, count in paged.hot_pages:
        positions.append(torch.arange(position, position + count))
        keys.append(paged.hot_keys[:, :, offset:offset + count].float())
        values.append(paged.hot_values[:, :, offset:offset + count].float())
    positions = torch.cat(positions)
    order = positions.argsort()
    order = order[positions[order] < layer.total_tokens]  # unfilled hot slots lie past the end
    return positions[order], torch.cat(keys, 2)[:, :, order], torch.cat(values, 2)[:, :, order]


def tensor_bytes(cache):
    total = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        total += layer.hot_keys.nbytes + layer.hot_values.nbytes
        total += sum(0 if extra is None else extra.nbytes for extra in (layer.rotation, layer.sketch))
        total += sum(slab.nbytes for slab in layer.warm.slabs) + layer.warm.table_bytes
    return total + (cache.prefetcher.ring.nbytes if cache.prefetcher is not None else 0)


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(1, 23), min_size=1, max_size=8), rotate=st.booleans(), seed=st.integers(0, 99),
       key_group=st.sampled_from([1, 2, 4]))
def test_every_token_in_exactly_one_tier_in_order(chunks, rotate, seed, key_group):
    cache = make_cache(rotate=rotate, key_group=key_group)
    keys, values = random_states(sum(chunks), seed)
    first = 0
    for length in chunks:
        for layer in cache.layers:
            layer.update(keys[:, :, first:first + length], values[:, :, first:first + length])
        first += length
        for layer in cache.layers:
            positions, got_keys, got_values = cached_tokens(layer)
            assert torch.equal(positions, torch.arange(first))  # each position once, in order
            hot = layer.hot_tokens()
            assert hot <= cache.config.hot_capacity and hot + layer.warm_tokens() == first
            # warm tokens within INT4 error, hot ones exact
            torch.testing.assert_close(got_keys, keys[:, :, :first], atol=1.5, rtol=0)
            torch.testing.assert_close(got_values, values[:, :, :first], atol=0.6, rtol=0)
            hot_positions = list(range(layer.sink_count)) + list(range(layer.recent_start, first))
            assert torch.equal(got_keys[:, :, hot_positions], keys[:, :, hot_positions])
        assert cache.reserved_bytes == tensor_bytes(cache) + cache.scratch_bytes <= cache.budget_bytes


def fill(cache, length, seed=0, chunk=5):
    keys, values = random_states(length, seed)
    for first in range(0, length, chunk):
        for layer in cache.layers:
            layer.update(keys[:, :, first:first + chunk], values[:, :, first:first + chunk])
            assert cache.reserved_bytes <= cache.budget_bytes
    return keys, values


def budget_for_pages(pages_per_layer, **overrides):
    probe = make_cache(**overrides)
    fill(probe, 40)  # initializes the layers and their page size
    warm = probe.layers[0].warm
    fixed = probe.hot_bytes + probe.scratch_bytes + probe.staging_bytes
    per_layer = pages_per_layer * warm.page_bytes + warm.table_bytes  # up to 8 pages share the smallest table
    return (fixed + 2 * per_layer) / BYTES_PER_GB


def test_full_budget_raises_with_the_budget_and_the_context():
    cache = make_cache(budget_gb=budget_for_pages(3, on_budget_full="raise"), pages_per_slab=2, on_budget_full="raise")
    with pytest.raises(BudgetExceededError, match=r"budget of .* GB .* is full at \d+ tokens of context"):
        fill(cache, 200)
    assert cache.reserved_bytes == tensor_bytes(cache) + cache.scratch_bytes <= cache.budget_bytes


def test_full_budget_evicts_the_oldest_warm_blocks():
    cache = make_cache(budget_gb=budget_for_pages(3, on_budget_full="evict"), on_budget_full="evict", pages_per_slab=2)
    keys, values = fill(cache, 200)
    for layer in cache.layers:
        positions, got_keys, _ = cached_tokens(layer)
        kept = positions.tolist()
        assert kept[:2] == [0, 1]  # the sinks stay
        assert len(layer.warm.table) == 3 and layer.evicted_tokens == 200 - len(kept)
        assert kept[2:] == list(range(200 - len(kept) + 2, 200))  # then the newest tokens, in order
        assert torch.equal(got_keys[:, :, -layer.recent_count:], keys[:, :, -layer.recent_count:])
    assert cache.stats()["evicted_tokens"] == 200 - len(kept)
    assert cache.reserved_bytes == tensor_bytes(cache) + cache.scratch_bytes <= cache.budget_bytes


def test_budget_smaller_than_hot_window_is_refused_with_numbers():
    cache = make_cache(budget_gb=1e-6)
    with pytest.raises(BudgetTooSmallError, match=r"cannot hold the hot window.*Raise budget_gb to at least"):
        fill(cache, 4)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("past,chunk", [(0, 9), (37, 1), (37, 6), (80, 13)])
def test_tiered_attention_equals_dense_attention_over_the_cached_tokens(rotate, past, chunk):
    """attend_tiers == float64 softmax attention over (dequantized cache + exact chunk), causal."""
    cache = make_cache(rotate=rotate)
    keys, values = random_states(past + chunk, seed=past)
    layer = cache.layers[0]
    if past:
        layer.update(keys[:, :, :past], values[:, :, :past])
    view, _ = layer.update(keys[:, :, past:], values[:, :, past:])
    query = torch.randn(2, 4, chunk, 16)
    out = attend_tiers(view, query, attention_mask=None, scaling=0.25).transpose(1, 2)  # (B, H_q, Q, D)

    _, cached_keys, cached_values = cached_tokens(layer)
    all_keys = torch.cat((cached_keys[:, :, :past], keys[:, :, past:]), 2).double()
    all_values = torch.cat((cached_values[:, :, :past], values[:, :, past:]), 2).double()
    grouped = query.double().view(2, 2, 2, chunk, 16) * 0.25
    scores = torch.einsum("bhgqd,bhtd->bhgqt", grouped, all_keys)
    causal = torch.arange(past + chunk)[None, :] <= (past + torch.arange(chunk))[:, None]
    weights = scores.masked_fill(~causal, -torch.inf).softmax(-1)
    expected = torch.einsum("bhgqt,bhtd->bhgqd", weights, all_values).reshape(2, 4, chunk, 16)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_stats_add_up():
    cache = make_cache()
    fill(cache, 50)
    stats = cache.stats()
    assert stats["tokens"] == 50 and stats["hot"]["tokens"] + stats["warm"]["tokens"] == 50
    assert stats["cache_bytes"] == (stats["hot"]["bytes"] + stats["warm"]["bytes"] + stats["scratch_bytes"]
                                    + stats["staging_bytes"])
    assert 0 < stats["budget_used"] <= 1


@pytest.mark.parametrize("warm_format", ["int4", "turboquant"])
@pytest.mark.parametrize("padded", [False, True])
def test_long_chunks_store_each_block_as_its_own_quantization(warm_format, padded):
    """Long chunks quantize many blocks per call (append_long); each page must hold exactly the fields that
    quantizing its block alone gives (padding masks included), and the hot tier must end as a token at a time
    leaves it."""
    padding = torch.ones(2, 300, dtype=torch.long)
    if padded:
        padding[1, :23] = 0
    config = TierConfig(budget_gb=0.05, **SMALL, warm_format=warm_format, key_group=4)
    caches = [TieredCache(config, MODEL, padding_mask=padding) for _ in range(2)]
    keys, values = random_states(300, seed=11)
    for first in range(300):  # one token at a time: one block per flush
        for layer in caches[0].layers:
            layer.update(keys[:, :, first:first + 1], values[:, :, first:first + 1])
    for first, length in ((0, 3), (3, 250), (253, 47)):  # the sinks, a long chunk, a shorter one
        for layer in caches[1].layers:
            layer.update(keys[:, :, first:first + length], values[:, :, first:first + length])
    for one, long in zip(*(cache.layers for cache in caches)):
        layout, block = long.warm.layout, config.block_size
        assert [entry.start for entry in one.warm.table] == [entry.start for entry in long.warm.table]
        signs = random_signs(long.rotation.shape[0], config.rotation_seed + long.layer_idx)  # the layer's seeded R
        for entry in long.warm.table:
            block_keys, block_values = (rotate(states[:, :, entry.start:entry.start + block].float(), signs)
                                        for states in (keys, values))
            valid = padding[:, entry.start:entry.start + block].bool()
            expected = layout.format.quantize(block_keys, block_values, valid if padded else None, long.sketch)
            stored = layout.views(long.warm.page(entry)[None])
            for name, field in expected.items():
                assert torch.equal(stored[name][0], field.to(stored[name].dtype)), (entry.start, name)
        assert (one.recent_count, one.recent_start, one.hot_pages) == (long.recent_count, long.recent_start,
                                                                       long.hot_pages)
        assert torch.equal(one.hot_keys[:, :, :one.hot_tokens()], long.hot_keys[:, :, :long.hot_tokens()])
        assert torch.equal(one.hot_table, long.hot_table)
