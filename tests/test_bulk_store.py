"""Storing many warm pages at once (WarmPages.store_many, TieredLayer.store_pages) leaves a cache exactly as storing
them one at a time (WarmPages.store through TieredLayer.store_page) does: the same slots, slabs, block tables, budget
use, page bytes in every tier, stats, errors and decode outputs, also when the budget fills mid-chunk and the policy
lowers, demotes, spills or evicts pages.

The per-page reference is the cache filled with TieredLayer.store_pages storing each page through store_page, as
store_blocks stored them before runs were stored at once.
"""

import contextlib

import pytest
import torch

from kvtier import BudgetExceededError, TierConfig, TieredCache, cold
from kvtier.attention import attend_tiers
from kvtier.budget import ByteBudget
from kvtier.config import BYTES_PER_GB
from kvtier.formats import make_format
from kvtier.layer import TieredLayer
from kvtier.pages import ALIGNMENT, NoRoomForPage, PageLayout, WarmPages
from test_cold_tier import HEADS, HEAD_DIM, MODEL, SMALL, decode_mask, random_states, step
from test_policies import NewestFirst
from test_session import pages_of

BULK = {**SMALL, "key_tile": 64, "pages_per_slab": 3, "chunk_pages": 2}  # 4 pages a quantization, 3 a slab
CHUNKS = (37, 300, 5, 256, 1, 190)  # the sinks and a partial block, long chunks, a flush of one block
CONFIGS = {  # TierConfig fields, and the warm pages a layer's device budget holds (None: room for every page)
    "int4": (dict(on_budget_full="raise"), None),
    "turboquant": (dict(on_budget_full="raise", warm_format="turboquant"), None),
    "int4-host": (dict(on_budget_full="offload"), 5),
    "turboquant-host": (dict(on_budget_full="offload", warm_format="turboquant"), 7),
    "int4-evict": (dict(on_budget_full="evict"), 5),
    "low-bits": (dict(low_bits=2, on_budget_full="evict"), 8),
    "host-evict": (dict(on_budget_full="offload", on_host_full="evict", host_slabs=3), 4),
    "disk": (dict(on_budget_full="offload", on_host_full="disk", host_slabs=3, disk_budget_gb=1.0), 4),
    "raise-when-full": (dict(on_budget_full="raise"), 9),
    "host-full": (dict(on_budget_full="offload", host_slabs=2), 4),  # the host budget error, mid-run
    "mass-host": (dict(on_budget_full="offload", policy="attention_mass"), 5),  # decode steps rank the pages
    "mass-evict": (dict(on_budget_full="evict", policy="attention_mass"), 5),
    "newest-first": (dict(on_budget_full="offload", policy=NewestFirst()), 5),  # would move a new page: one by one
}
RUNS_OUT = ("raise-when-full", "host-full")  # the fill ends in BudgetExceededError


def budget_gb(settings, warm_pages):
    """A device budget whose layers each hold about ``warm_pages`` warm pages (in slabs of 3, the last ones
    smaller)."""
    probe = TieredCache(TierConfig(budget_gb=0.5, **settings), MODEL)
    step(probe, *random_states(40, seed=0))
    share = probe.layers[0].warm.bytes_for_pages(warm_pages) + ALIGNMENT
    if probe.low_format is not None:  # low_share 0.5: half of it holds low-precision pages
        share *= 2
    return (probe.fixed_bytes + probe.num_layers * share) / BYTES_PER_GB


def host_budget_gb(settings, slabs):
    """A host budget of ``slabs`` cold slabs a layer."""
    probe = TieredCache(TierConfig(**settings), MODEL)
    step(probe, *random_states(40, seed=0))
    slab = cold.rows_bytes(BULK["chunk_pages"], probe.layers[0].warm.page_bytes)
    return (probe.host_reserved_bytes + probe.num_layers * (slabs * slab + ALIGNMENT)) / BYTES_PER_GB


def make_cache(name, padded):
    fields, warm_pages = CONFIGS[name]
    settings = {**BULK, **fields}
    host_slabs = settings.pop("host_slabs", None)
    settings["budget_gb"] = 0.5 if warm_pages is None else budget_gb(settings, warm_pages)
    # the default host budget is the host's available memory at the time, which differs between two caches
    settings["host_budget_gb"] = 1.0 if host_slabs is None else host_budget_gb(settings, host_slabs)
    padding = torch.ones(2, sum(CHUNKS), dtype=torch.long)
    padding[1, :45] = 0  # the second row is left-padded over the sinks and into the first pages
    return TieredCache(TierConfig(**settings), MODEL, padding_mask=padding if padded else None)


@contextlib.contextmanager
def page_by_page():
    """Every page goes through TieredLayer.store_page and WarmPages.store, one at a time."""
    def store_each(layer, start, pages):
        for index in range(pages.shape[0]):
            layer.store_page(start + index * layer.config.block_size, pages[index])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TieredLayer, "store_pages", store_each)
        yield


def fill(cache, keys, values, kv_start=None):
    """Every chunk of CHUNKS into every layer; the BudgetExceededError's message if the budget ran out. With
    ``kv_start`` (B,), each one-token chunk is a decode step: attention reads every layer (and an attention-mass
    policy observes what each page drew), so that the pages that leave after it are ranked by mass."""
    first = 0
    try:
        for length in CHUNKS:
            views = step(cache, keys[:, :, first:first + length], values[:, :, first:first + length])
            first += length
            if kv_start is not None and length == 1:
                query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(first))
                for view in views:
                    attend_tiers(view, query, decode_mask(kv_start, first), 0.25)
    except BudgetExceededError as error:
        return str(error)
    return None


def tier_rows(tier):
    """What a WarmPages holds besides its bytes: its table, slots, slabs, free slots and device table."""
    if tier is None:
        return None
    rows = tier.rows
    distances = [tier.page(entry).data_ptr() - tier.base.data_ptr() for entry in tier.table]
    assert tier.offsets[:rows].tolist() == [distance // ALIGNMENT for distance in distances]  # each page's own
    assert tier.positions[:rows].tolist() == tier.starts == [entry.start for entry in tier.table]
    assert tier.row_count.item() == rows
    return ([(entry.page_id, entry.start) for entry in tier.table], tier.slab_offsets,
            [slab.shape[0] for slab in tier.slabs], tier.free_page_ids, tier.offsets.shape[0], tier.allocated_bytes)


def cache_state(cache):
    """Every page's tier, position and bytes, each device tier's rows, the counters, budgets and stats."""
    layers = [(tier_rows(layer.warm), tier_rows(layer.low), layer.total_tokens, layer.evicted_tokens,
               layer.recent_start, layer.recent_count) for layer in cache.layers]
    budgets = [budget.used_bytes for budget in (cache.device_budget, cache.host_budget, cache.disk_budget)
               if budget is not None]
    stats = cache.stats()
    stats["disk"].pop("directory", None)  # each cache's own new folder
    return pages_of(cache), layers, budgets, stats


def assert_same_pages(pages, reference):
    for layer, reference_layer in zip(pages, reference):
        assert [(tier, start) for tier, start, _ in layer] == [(tier, start) for tier, start, _ in reference_layer]
        for (tier, start, data), (_, _, expected) in zip(layer, reference_layer):
            assert torch.equal(data, expected), (tier, start)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_storing_pages_at_once_leaves_the_cache_as_storing_them_one_by_one(name, padded):
    keys, values = random_states(sum(CHUNKS) + 1, seed=len(name))
    bulk, single = make_cache(name, padded), make_cache(name, padded)
    kv_start = torch.tensor([0, 45 if padded else 0])
    attending = kv_start if name.startswith("mass") else None
    error = fill(bulk, keys, values, attending)
    with page_by_page():
        assert fill(single, keys, values, attending) == error
    assert (error is not None) == (name in RUNS_OUT)
    stats = bulk.stats()
    if name.endswith(("host", "evict", "disk", "bits")) or name == "host-full":  # the budget filled mid-chunk
        assert stats["cold"]["tokens"] + stats["evicted_tokens"] + stats["low"]["tokens"] > 0
    (pages, layers, budgets, stats), (pages_single, layers_single, budgets_single, stats_single) = (
        cache_state(bulk), cache_state(single))
    assert_same_pages(pages, pages_single)
    assert (layers, budgets, stats) == (layers_single, budgets_single, stats_single)
    if error is not None:
        return
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    total = sum(CHUNKS) + 1
    outputs = []
    for cache in (bulk, single):
        views = step(cache, keys[:, :, total - 1:total], values[:, :, total - 1:total])
        outputs.append([attend_tiers(view, query, decode_mask(kv_start, total), 0.25) for view in views])
    for output, output_single in zip(*outputs):
        assert torch.equal(output, output_single)


# ------------------------------------------------------------------------------------------------ WarmPages alone
def warm_pages(budget_pages, pages_per_slab=3):
    """A WarmPages of INT4 pages (batch 1, 2 KV heads, 16 tokens, head dim 32) under a budget of about
    ``budget_pages`` pages and their table."""
    layout = PageLayout(1, 2, 16, 32, make_format(TierConfig(block_size=16, key_group=16)))
    share = budget_pages * layout.page_bytes + 64 * 12
    return WarmPages(layout, "cpu", pages_per_slab, ByteBudget(share), share)


@pytest.mark.parametrize("budget_pages", [4, 7, 40])
@pytest.mark.parametrize("dropped", [(), (1,), (0, 2, 1)])
def test_store_many_takes_the_slots_store_would_take(budget_pages, dropped):
    """Free slots left by dropped pages first (last freed first), then new slabs, as far as the budget goes."""
    tiers = [warm_pages(budget_pages), warm_pages(budget_pages)]
    generator = torch.Generator().manual_seed(3)
    pages = torch.randint(0, 256, (12, tiers[0].page_bytes), dtype=torch.uint8, generator=generator)
    stored = []
    for tier in tiers:
        tier.store_many(range(0, 64, 16), pages[:4])
        for index in dropped:
            tier.drop(index)
    stored.append(tiers[0].store_many(range(64, 64 + 8 * 16, 16), pages[4:]))
    stored.append(0)
    for index in range(8):
        try:
            tiers[1].store(64 + index * 16, pages[4 + index])
        except NoRoomForPage:
            break
        stored[1] += 1
    assert stored[0] == stored[1] and (stored[0] == 8) == (budget_pages == 40)
    assert tier_rows(tiers[0]) == tier_rows(tiers[1])
    assert tiers[0].budget.used_bytes == tiers[1].budget.used_bytes
    for entry, entry_single in zip(tiers[0].table, tiers[1].table):
        assert torch.equal(tiers[0].page(entry), tiers[1].page(entry_single))


def test_store_many_refuses_pages_out_of_order():
    tier = warm_pages(40)
    pages = torch.zeros(3, tier.page_bytes, dtype=torch.uint8)
    tier.store_many(range(32, 80, 16), pages)
    with pytest.raises(AssertionError, match="out of order"):
        tier.store_many(range(64, 112, 16), pages)
    assert tier.starts == [32, 48, 64] and tier.budget.used_bytes == tier.allocated_bytes


def test_a_failed_slab_allocation_frees_the_slots_taken(monkeypatch):
    """The allocator's error leaves the free slots as they were, in their order."""
    tier = warm_pages(40)
    pages = torch.zeros(5, tier.page_bytes, dtype=torch.uint8)
    tier.store_many(range(0, 80, 16), pages)
    tier.drop(1)
    free = list(tier.free_page_ids)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr("kvtier.pages.allocate_slab", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        tier.store_many(range(80, 80 + 3 * 16, 16), pages[:3])
    assert tier.free_page_ids == free and tier.starts == [0, 32, 48, 64]
