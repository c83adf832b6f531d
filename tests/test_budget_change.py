"""Budgets changed on a live cache (TieredCache.set_budgets, KVTier.set_budgets): a shrink is met at once by the moves
a full budget makes (demotion, lower precision, spill, eviction; policy order), or refused with nothing changed; a
growth raises the limits; a failed allocation changes nothing. Host and "device" are both the CPU in most tests; every
code path of the moves runs. The key ones run on CUDA too (pinned slabs, the side stream's copies waited for, device
tiers repacked, the Triton kernel).

References: a warm-only cache fed the same states (the same codes byte for byte, so the same outputs to float32
rounding), float64 attention over every token read back from the tiers, and on the real model a cache that had the
smaller budget from the start.
"""

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtier
from kvtier.compat import with_cache
from conftest import cuda_only
from kvtier import AllocationError, BudgetExceededError, BudgetTooSmallError, TierConfig, TieredCache, cold, pages
from kvtier.attention import attend_tiers
from kvtier.config import BYTES_PER_GB
from kvtier.eval import reference_text
from test_cold_tier import (FP32_RELATIVE, HEADS, HEAD_DIM, KERNEL_RESPLIT_RELATIVE, SMALL, kvtier_test_model,
                            random_states, relative_error, step)
from test_disk import assert_every_token_once, dense_decode
from test_session import pages_of, smollm2_budget_for_warm_pages

CHUNK_PAGES = 2
MODES = {  # how each configuration meets a full budget
    "host-evict": dict(on_host_full="evict"),
    "host-raise": dict(on_host_full="raise"),
    "disk-evict": dict(on_host_full="disk", on_disk_full="evict"),
    "disk-raise": dict(on_host_full="disk", on_disk_full="raise"),
    "device-evict": dict(on_budget_full="evict"),
    "device-raise": dict(on_budget_full="raise"),
    "low-evict": dict(low_bits=2, on_budget_full="evict"),
}
FRAME_SLACK = 64  # an lz4 frame of an incompressible page is at most this much larger than the page
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only()])]
KERNEL_FLOAT64_RELATIVE = 1e-2  # the Triton kernel (CUDA) rounds softmax weights to float16 for its dot products


@functools.lru_cache(maxsize=None)
def model():
    torch.manual_seed(0)
    return kvtier_test_model()


@functools.lru_cache(maxsize=None)
def probe(mode, device="cpu"):
    """A cache of ``mode`` with a few pages, for its page, slab and fixed sizes (which do not depend on budgets; the
    scratch depends on the device)."""
    cache = make_cache(mode, budget_gb=0.05, host_budget_gb=0.05, disk_budget_gb=0.05)
    step(cache, *(states.to(device) for states in random_states(60, seed=0)))
    return cache


def make_cache(mode, **budgets):
    return TieredCache(TierConfig(**{**SMALL, "chunk_pages": CHUNK_PAGES, **MODES[mode], **budgets}), model().config)


def budget_gb(mode, warm_pages, device="cpu"):
    """A device budget that holds ``warm_pages`` warm pages a layer (and as many low-precision ones with low_bits);
    0 pages: one byte a layer short of one page."""
    layer, cache = probe(mode, device).layers[0], probe(mode, device)
    share = layer.warm.bytes_for_pages(warm_pages) + FRAME_SLACK if warm_pages else layer.warm.bytes_for_pages(1) - 1
    if layer.low is not None and warm_pages:  # low_share 0.5: the warm share splits in two halves
        share = 2 * max(share, layer.low.bytes_for_pages(warm_pages) + FRAME_SLACK)
    return (cache.fixed_bytes + cache.num_layers * share) / BYTES_PER_GB


def host_budget_gb(mode, slabs, device="cpu"):
    """A host budget of ``slabs`` slabs of cold pages a layer (besides the disk tier's read rows); 0: a byte short of
    one slab."""
    cache = probe(mode, device)
    tier = cache.layers[0].cold  # its slabs: CHUNK_PAGES rows and positions, in whole pages when pinned (CUDA)
    slab = tier.slab_bytes if tier is not None else cold.rows_bytes(CHUNK_PAGES, cache.layers[0].warm.page_bytes)
    per_layer = slabs * slab + FRAME_SLACK if slabs else slab - 1
    return (cache.host_reserved_bytes + cache.num_layers * per_layer) / BYTES_PER_GB


def disk_budget_gb(mode, pages):
    return probe(mode).num_layers * pages * (probe(mode).layers[0].warm.page_bytes + FRAME_SLACK) / BYTES_PER_GB


def filled(mode, tokens, warm_pages=3, host_slabs=3, disk_pages=20, device="cpu"):
    cache = make_cache(mode, budget_gb=budget_gb(mode, warm_pages, device),
                       host_budget_gb=host_budget_gb(mode, host_slabs, device),
                       disk_budget_gb=disk_budget_gb(mode, disk_pages))
    reference = make_cache("device-raise", budget_gb=0.5)
    keys, values = (states.to(device) for states in random_states(tokens + 40, seed=tokens))
    for cache_ in (cache, reference):
        for first in range(0, tokens, 37):
            step(cache_, keys[:, :, first:min(first + 37, tokens)], values[:, :, first:min(first + 37, tokens)])
    return cache, reference, keys, values


def state(cache):
    """Everything a refused change must leave as it was: every page's tier, position and bytes, the counters, and
    each budget's use, limit and per-layer share."""
    budgets = [(budget.used_bytes, budget.limit_bytes) for budget in (cache.device_budget, cache.host_budget,
                                                                        cache.disk_budget) if budget is not None]
    if cache.layer_shape is None:
        return [], budgets, [], cache.config
    shares = [(layer.warm.share_bytes, layer.low and layer.low.share_bytes, layer.cold and layer.cold.share_bytes,
               layer.disk and layer.disk.share_bytes, layer.evicted_tokens, layer.total_tokens)
              for layer in cache.layers]
    return pages_of(cache), budgets, shares, cache.config


def assert_same_state(before, after):
    (pages, budgets, shares, config), (pages_after, budgets_after, shares_after, config_after) = before, after
    for layer, layer_after in zip(pages, pages_after):
        assert [(tier, start) for tier, start, _ in layer] == [(tier, start) for tier, start, _ in layer_after]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(layer, layer_after))
    assert (budgets, shares, config) == (budgets_after, shares_after, config_after)


def assert_within_budgets(cache):
    """Every budget and every layer's share holds, and each budget's use is exactly what its tier allocated."""
    assert cache.device_budget.limit_bytes == cache.config.budget_bytes
    assert cache.reserved_bytes <= cache.budget_bytes
    device, host = cache.fixed_bytes, cache.host_reserved_bytes  # (no mode here gathers topk rows)
    for layer in cache.layers:
        assert layer.warm.allocated_bytes <= layer.warm.share_bytes
        device += layer.warm.allocated_bytes
        if layer.low is not None:
            assert layer.low.allocated_bytes <= layer.low.share_bytes
            device += layer.low.allocated_bytes
        if layer.cold is not None:
            assert layer.cold.allocated_bytes <= layer.cold.share_bytes
            host += layer.cold.allocated_bytes
        if layer.disk is not None:
            assert layer.disk.file_bytes <= layer.disk.share_bytes
            assert all(os.path.getsize(segment.path) == segment.size for segment in layer.disk.segments)
    assert cache.reserved_bytes == device
    assert cache.host_budget.used_bytes == host <= cache.host_budget.limit_bytes
    if cache.disk_budget is not None:
        files = sum(layer.disk.file_bytes for layer in cache.layers)
        assert cache.disk_budget.used_bytes == files <= cache.disk_budget.limit_bytes


def assert_same_codes(cache, reference):
    """Every full-precision page the cache holds, in any tier, has the warm-only cache's bytes at its position."""
    for layer, reference_layer in zip(cache.layers, reference.layers):
        pages = {entry.start: reference_layer.warm.page(entry).cpu() for entry in reference_layer.warm.table}
        for tier, start, data in layer.pages_in_order():
            if tier in ("warm", "cold", "disk"):
                assert torch.equal(data, pages[start]), (tier, start)


def decode_and_check(cache, reference, keys, values, position, query):
    """One decode step in both caches: each layer's output equals float64 attention over the tokens the cache holds,
    and the warm-only cache's output while the layer has lost no token and holds no low-precision page."""
    views = step(cache, keys[:, :, position:position + 1], values[:, :, position:position + 1])
    reference_views = step(reference, keys[:, :, position:position + 1], values[:, :, position:position + 1])
    query = query.to(keys.device)
    float64, same_codes = tolerances(keys.device)
    for layer, view, reference_view in zip(cache.layers, views, reference_views):
        got = attend_tiers(view, query, None, 0.25)[:, 0]
        expected = dense_decode(query[:, :, 0], layer, 0.25, torch.zeros(2, dtype=torch.long))
        assert relative_error(got, expected) < float64
        if layer.evicted_tokens == 0 and layer.low_tokens() == 0:
            assert relative_error(got, attend_tiers(reference_view, query, None, 0.25)[:, 0]) < same_codes


def assert_kept_and_decodes(cache, reference, keys, values, total):
    """After a change: each of the ``total`` tokens in exactly one tier (or counted evicted), every full-precision page
    with the warm-only cache's codes, every budget held, and the next two decode steps right."""
    for layer in cache.layers:
        assert_every_token_once(layer, total)
    assert_within_budgets(cache)
    assert_same_codes(cache, reference)
    for position in range(total, total + 2):
        decode_and_check(cache, reference, keys, values, position, query_for(position))


def tolerances(device) -> tuple[float, float]:
    """Relative errors allowed against float64 attention and against the warm-only cache (the same codes, which the
    Triton kernel on CUDA rounds differently when they are split over more launches)."""
    if device.type == "cuda":
        return KERNEL_FLOAT64_RELATIVE, KERNEL_RESPLIT_RELATIVE
    return FP32_RELATIVE, FP32_RELATIVE


def query_for(seed):
    return torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ shrinking
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["host-evict", "disk-evict", "low-evict"])
def test_a_smaller_device_budget_moves_the_oldest_warm_pages_down_and_frees_their_memory(mode, device):
    """300 tokens: 18 pages a layer, 4 of them warm; one stays warm. The host tier has room for the other three.
    On CUDA: the device warm (and low-precision) tiers are repacked, demotions land in pinned slabs."""
    cache, reference, keys, values = filled(mode, 300, warm_pages=4, host_slabs=10, device=device)
    evicted = cache.stats()["evicted_tokens"]
    warm_bytes = [layer.warm.allocated_bytes for layer in cache.layers]
    hot = [(layer.hot_tokens(), layer.recent_start) for layer in cache.layers]
    cache.set_budgets(budget_gb=budget_gb(mode, 1, device))
    block = SMALL["block_size"]
    for layer, allocated, (hot_tokens, recent_start) in zip(cache.layers, warm_bytes, hot):
        assert len(layer.warm.table) == 1 and layer.warm.allocated_bytes == layer.warm.bytes_for_pages(1) < allocated
        assert (layer.hot_tokens(), layer.recent_start) == (hot_tokens, recent_start)  # sinks and recent window stay
        assert layer.warm.starts == [layer.recent_start - block]  # sink_recent kept the newest page warm
        assert_every_token_once(layer, 300)
    if mode == "low-evict":
        assert cache.stats()["low"]["tokens"] > 0
    else:  # nothing left the cache
        assert cache.stats()["evicted_tokens"] == evicted == 0
        assert cache.stats()["cold"]["tokens"] + cache.stats()["disk"]["tokens"] == 17 * block
        assert_same_codes(cache, reference)
    assert_within_budgets(cache)
    for position in range(300, 304):
        decode_and_check(cache, reference, keys, values, position, query_for(position))
    assert_within_budgets(cache)


def test_a_shrink_under_evict_reports_the_evicted_tokens_in_stats():
    cache, reference, keys, values = filled("device-evict", 300, warm_pages=4)
    assert cache.stats()["evicted_tokens"] > 0
    evicted = cache.stats()["evicted_tokens"]
    newest = [layer.warm.starts[-1:] for layer in cache.layers]
    cache.set_budgets(budget_gb=budget_gb("device-evict", 1))
    assert cache.stats()["evicted_tokens"] == evicted + 3 * SMALL["block_size"]
    assert [layer.warm.starts for layer in cache.layers] == newest  # the oldest pages left
    for layer in cache.layers:
        assert_every_token_once(layer, 300)
    assert_within_budgets(cache)
    assert_same_codes(cache, reference)
    decode_and_check(cache, reference, keys, values, 300, query_for(1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_smaller_host_budget_spills_the_oldest_cold_pages_and_frees_whole_slabs(device):
    """400 tokens: 24 pages a layer, 2 warm, 8 cold in 4 slabs, 14 on disk; the host keeps one slab. On CUDA: pinned
    slabs compacted and spilled, the disk tier's pinned read rows and reader thread."""
    cache, reference, keys, values = filled("disk-evict", 400, warm_pages=2, host_slabs=4, disk_pages=30,
                                            device=device)
    slabs = [len(layer.cold.slabs) for layer in cache.layers]
    disk = cache.stats()["disk"]["tokens"]
    cache.set_budgets(host_budget_gb=host_budget_gb("disk-evict", 1, device))
    for layer, count in zip(cache.layers, slabs):
        assert count == 4 and len(layer.cold.slabs) == 1 and len(layer.cold.entries) <= CHUNK_PAGES
        assert max(layer.disk.starts) < min(layer.cold.starts)  # the oldest went to disk
    assert cache.stats()["disk"]["tokens"] == disk + 6 * SMALL["block_size"]
    assert_kept_and_decodes(cache, reference, keys, values, 400)


@pytest.mark.parametrize("device", DEVICES)
def test_a_shrink_while_cold_pages_are_in_flight_waits_for_them_and_cancels_their_plan(device):
    """300 tokens: 18 pages a layer, 3 warm, 6 cold, 9 on disk. A step leaves the next step's first layer with its
    cold chunks planned and their copies issued (on CUDA, on the side stream); a change that spills cold pages to disk,
    compacts their slabs and demotes warm pages into them first cancels that plan and waits for the copies."""
    cache, reference, keys, values = filled("disk-evict", 300, warm_pages=3, host_slabs=3, disk_pages=30,
                                            device=device)
    for each in (cache, reference):
        step(each, keys[:, :, 300:301], values[:, :, 300:301])
    prefetcher = cache.prefetcher
    issued = [job for job in prefetcher.jobs[0] if job.slot is not None]  # layer 0's copies for the next step
    assert issued and all((job.ready is not None) == (device == "cuda") for job in issued)  # CUDA: on the side stream
    cache.set_budgets(budget_gb=budget_gb("disk-evict", 1, device),
                      host_budget_gb=host_budget_gb("disk-evict", 1, device))
    assert not prefetcher.jobs and sorted(prefetcher.free_slots) == list(range(len(prefetcher.slot_released)))
    assert all(len(layer.warm.table) == 1 and len(layer.cold.slabs) == 1 for layer in cache.layers)
    assert_kept_and_decodes(cache, reference, keys, values, 301)


@pytest.mark.parametrize("device", DEVICES)
def test_a_larger_budget_raises_the_limits_and_new_pages_use_the_room(device):
    """200 tokens: 11 pages a layer, 1 warm; 40 more tokens bring 3 pages, which the larger budget keeps warm."""
    cache, reference, keys, values = filled("host-evict", 200, warm_pages=1, host_slabs=6, device=device)
    cold = [list(layer.cold.starts) for layer in cache.layers]
    cache.set_budgets(budget_gb=budget_gb("host-evict", 4, device),
                      host_budget_gb=host_budget_gb("host-evict", 8, device))
    assert [list(layer.cold.starts) for layer in cache.layers] == cold  # nothing is promoted back
    assert cache.host_budget.limit_bytes == int(host_budget_gb("host-evict", 8, device) * BYTES_PER_GB)
    for each in (cache, reference):
        step(each, keys[:, :, 200:239], values[:, :, 200:239])
    decode_and_check(cache, reference, keys, values, 239, query_for(1))
    for layer, starts in zip(cache.layers, cold):
        assert len(layer.warm.table) == 4 and list(layer.cold.starts) == starts  # the new pages stayed warm
    assert_within_budgets(cache)


# ------------------------------------------------------------------------------------------------ failed allocations
ALLOCATION_FAULTS = [  # mode, what fails (pages.allocate_slab: device slabs; cold.HostSlab: host slabs), at which
    # call (the last one the change makes: layer 1's, after layer 0's succeeded), and what the error says
    ("host-evict", "allocate_slab", 2, r"[\d,]+ bytes of memory on cpu for layer 1's warm tier, repacked into a slab "
                                       r"of 1 page\(s\)"),
    ("low-evict", "allocate_slab", 4, r"[\d,]+ bytes of memory on cpu for layer 1's low-precision tier, repacked "
                                      r"into a slab of \d+ page\(s\)"),
    ("host-evict", "HostSlab", 4, r"[\d,]+ bytes of host memory for layer 1's cold tier, 2 more host slab\(s\) for "
                                  r"the pages the device sends it"),
]


@pytest.mark.parametrize("mode,allocator,failing_call,message", ALLOCATION_FAULTS, ids=["warm", "low", "host"])
def test_a_failed_allocation_changes_nothing_and_says_so(monkeypatch, mode, allocator, failing_call, message):
    """The shrink of test_a_smaller_device_budget_moves_the_oldest_warm_pages_down_and_frees_their_memory, with the
    allocator failing (as CUDA out of memory, or a failed pinned host allocation would): every page stays where it was
    with its bytes, the budgets and shares stay, the cache decodes on; the same change succeeds once memory is there."""
    cache, reference, keys, values = filled(mode, 300, warm_pages=4, host_slabs=10)
    owner = pages if allocator == "allocate_slab" else cold
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == failing_call:
            raise RuntimeError("CUDA error: out of memory")
        return original(*args, **kwargs)

    original = getattr(owner, allocator)
    monkeypatch.setattr(owner, allocator, failing)
    before = state(cache)
    with pytest.raises(AllocationError, match=rf"set_budgets could not allocate {message} \(CUDA error: out of "
                                              r"memory\); nothing changed.*free .* then call set_budgets again"):
        cache.set_budgets(budget_gb=budget_gb(mode, 1))
    assert len(calls) == failing_call
    assert_same_state(before, state(cache))
    assert all(layer.cold is None or layer.cold.spare_slabs == [] for layer in cache.layers)
    monkeypatch.undo()
    decode_and_check(cache, reference, keys, values, 300, query_for(300))
    cache.set_budgets(budget_gb=budget_gb(mode, 1))
    for layer in cache.layers:
        assert len(layer.warm.table) == 1
        assert_every_token_once(layer, 301)
    assert_within_budgets(cache)
    decode_and_check(cache, reference, keys, values, 301, query_for(301))


# ------------------------------------------------------------------------------------------------ refusals
FILL = dict(warm_pages=3, host_slabs=3, disk_pages=10)  # 300 tokens: 18 pages a layer
REFUSALS = [
    ("host-evict", FILL, dict(budget_gb=0.0001), BudgetTooSmallError,
     r"budget_gb=0.0001 \([\d,]+ bytes\) cannot hold this cache's hot tiers, scratch and staging ring \([\d,]+ bytes\) "
     r"and one warm page .*nothing changed\. Choose budget_gb of at least"),
    ("host-evict", FILL, dict(host_budget_gb=0), BudgetTooSmallError,
     r"host_budget_gb=[\d.e-]+ \([\d,]+ bytes\) cannot hold one slab of 2 cold pages .*nothing changed"),
    ("low-evict", FILL, dict(budget_gb=0), BudgetTooSmallError, r"one warm page for each of its 2 layers"),
    ("device-raise", dict(warm_pages=20), dict(budget_gb=1), BudgetExceededError,
     r"leaves layer 0 room for 1 of its 18 warm pages, and on_budget_full='raise' moves no page off the device, so "
     r"nothing changed\. Keep budget_gb at least [\d.e-]+ \([\d,]+ bytes\), or attach with on_budget_full='offload'"),
    ("host-raise", dict(warm_pages=3, host_slabs=8), dict(host_budget_gb=1), BudgetExceededError,
     r"room for 2 cold pages, fewer than it would hold \(15 now.*on_host_full='raise' drops none, so nothing changed"),
    ("host-raise", dict(warm_pages=3, host_slabs=8), dict(budget_gb=1), BudgetExceededError,
     r"room for 16 cold pages, .*on_host_full='raise' drops none"),  # the 2 pages the device sends find 1 free row
    ("disk-raise", FILL, dict(disk_budget_gb=2), BudgetExceededError,
     r"layer 0's files take [\d,]+ bytes .*on_disk_full='raise' evicts none, so nothing changed"),
    ("disk-raise", FILL, dict(host_budget_gb=1), BudgetExceededError, r"the pages this change spills [\d,]+ more"),
    ("host-evict", FILL, dict(budget_gb=-1), ValueError, r"budget_gb must be positive, got -1"),
    ("host-evict", FILL, dict(host_budget_gb="2"), ValueError,
     r"host_budget_gb must be a number of GB, got '2' \(str\)"),
]


@pytest.mark.parametrize("mode,fill,change,error,message", REFUSALS)
def test_a_shrink_that_cannot_be_met_raises_and_changes_nothing(mode, fill, change, error, message):
    """Sizes: 1 stands for one page (device), one slab (host) or two pages (disk) a layer, 0 for less than one."""
    sizes = {"budget_gb": functools.partial(budget_gb, mode), "host_budget_gb": functools.partial(host_budget_gb, mode),
             "disk_budget_gb": lambda pages: disk_budget_gb(mode, 2 * pages)}
    change = {name: sizes[name](value) if isinstance(value, int) and value >= 0 else value
              for name, value in change.items()}
    cache, reference, keys, values = filled(mode, 300, **fill)
    before = state(cache)
    with pytest.raises(error, match=message):
        cache.set_budgets(**change)
    assert_same_state(before, state(cache))
    for position in range(300, 302):  # and the cache goes on
        decode_and_check(cache, reference, keys, values, position, query_for(position))


def test_the_attach_handle_changes_the_latest_cache_and_the_next_ones():
    torch.manual_seed(0)
    test_model = kvtier_test_model()
    handle = kvtier.attach(test_model, **{**SMALL, "budget_gb": 0.5, "chunk_pages": CHUNK_PAGES})
    try:
        with pytest.raises(ValueError, match="budget_gb must be positive"):
            handle.set_budgets(budget_gb=0)
        handle.set_budgets(host_budget_gb=0.25)  # before any generate(): the next cache takes it
        test_model.generate(torch.randint(0, 128, (1, 200)), max_new_tokens=2, do_sample=False)
        assert handle.cache.host_budget.limit_bytes == int(0.25 * BYTES_PER_GB)
        handle.set_budgets(budget_gb=0.25)
        assert handle.config.budget_gb == handle.cache.config.budget_gb == handle.stats()["budget_bytes"] / BYTES_PER_GB
    finally:
        kvtier.detach(test_model)


# ------------------------------------------------------------------------------------------------ properties
PREFILL, DECODE, CHANGE, ROUND_TRIP = "prefill", "decode", "change", "round trip"
BUDGET_CHANGE = st.tuples(st.just(CHANGE), st.one_of(st.none(), st.integers(0, 4)),
                          st.one_of(st.none(), st.integers(0, 4)), st.one_of(st.none(), st.integers(1, 12)))
OPERATIONS = st.one_of(  # budget changes twice as often as the others
    st.tuples(st.just(PREFILL), st.integers(1, 40)), st.tuples(st.just(DECODE), st.integers(1, 3)), BUDGET_CHANGE,
    BUDGET_CHANGE, st.tuples(st.just(ROUND_TRIP)))


@settings(max_examples=14, deadline=None)
@given(mode=st.sampled_from(sorted(MODES)), operations=st.lists(OPERATIONS, min_size=3, max_size=8),
       start=st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(2, 24)), first=st.integers(0, 200),
       seed=st.integers(0, 99))
def test_no_token_lost_and_no_budget_exceeded_across_steps_budget_changes_and_round_trips(tmp_path_factory, mode,
                                                                                            operations, start, first,
                                                                                            seed):
    """A first prefill chunk, then random prefill chunks, decode steps, budget changes (device in warm pages, host in
    slabs, disk in pages a layer; 0: too small) and save/load round trips: after every operation each token is in
    exactly one tier or counted evicted, in order, with the warm-only cache's codes; every budget and share holds;
    decode attention equals float64 attention and the warm-only cache's. A change is refused only when it cannot be
    met, and then changes nothing."""
    cache = make_cache(mode, budget_gb=budget_gb(mode, start[0]), host_budget_gb=host_budget_gb(mode, start[1]),
                       disk_budget_gb=disk_budget_gb(mode, start[2]))
    reference = make_cache("device-raise", budget_gb=0.5)
    keys, values = random_states(first + 40 * len(operations), seed)
    query, total = query_for(seed), 0
    for operation in [(PREFILL, first)] * (first > 0) + operations:
        try:
            if operation[0] == PREFILL:
                for each in (cache, reference):
                    step(each, keys[:, :, total:total + operation[1]], values[:, :, total:total + operation[1]])
                total += operation[1]
            elif operation[0] == DECODE:
                for _ in range(operation[1]):
                    decode_and_check(cache, reference, keys, values, total, query)
                    total += 1
            elif operation[0] == CHANGE:
                change_budgets(cache, mode, *operation[1:])
            elif total:
                cache = round_trip(cache, tmp_path_factory.mktemp("session") / "s", total)
        except BudgetExceededError as error:  # a step found a full budget whose action is "raise": the run ends
            assert "raise" in mode and "kvtier: the" in str(error)
            return
        for layer in cache.layers:
            if layer.is_initialized:
                assert_every_token_once(layer, total)
        if total:
            assert_within_budgets(cache)
            assert_same_codes(cache, reference)


def change_budgets(cache, mode, warm_pages, host_slabs, disk_pages):
    change = {"budget_gb": None if warm_pages is None else budget_gb(mode, warm_pages),
              "host_budget_gb": None if host_slabs is None else host_budget_gb(mode, host_slabs),
              "disk_budget_gb": None if disk_pages is None else disk_budget_gb(mode, disk_pages)}
    too_small = warm_pages == 0 or (host_slabs == 0 and "device" not in mode and "low" not in mode)
    if too_small and cache.layer_shape is None:  # unchecked before the first states, which would find it so
        return
    before = state(cache)
    hot = [(layer.hot_tokens(), layer.recent_start) for layer in cache.layers if layer.is_initialized]
    try:
        cache.set_budgets(**change)
    except (BudgetTooSmallError, BudgetExceededError) as error:
        assert too_small or "raise" in mode, error
        assert isinstance(error, BudgetTooSmallError) == too_small
        assert_same_state(before, state(cache))
        return
    assert not too_small
    assert hot == [(layer.hot_tokens(), layer.recent_start) for layer in cache.layers if layer.is_initialized]
    for name, value in change.items():
        assert value is None or getattr(cache.config, name) == value


def round_trip(cache, path, total):
    cache.token_ids = torch.arange(2 * total).view(2, total)
    before = pages_of(cache)
    loaded = kvtier.load(cache.save(path), model(), config=cache.config)
    for original, restored in zip(before, pages_of(loaded)):
        assert [(tier, start) for tier, start, _ in original] == [(tier, start) for tier, start, _ in restored]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(original, restored))
    return loaded


# ------------------------------------------------------------------------------------------------ the real model
@torch.no_grad()
def test_generate_continues_after_a_budget_change_like_a_cache_that_had_the_smaller_budget(smollm2):
    """SmolLM2 over 400 pydoc tokens: prefilled with every page warm, then shrunk between two generate() calls to one
    warm page a layer, the cache continues greedy decoding token for token like the cache that had that budget from
    the start (the same codes in the same tiers)."""
    model_, tokenizer = smollm2
    ids = tokenizer(reference_text()[:40000], return_tensors="pt").input_ids[:, :400]
    small = smollm2_budget_for_warm_pages(model_, 1, 1)
    results, stats = [], []
    for first_budget in (small, 1.0):
        handle = kvtier.attach(model_, budget_gb=first_budget, chunk_pages=2)
        try:
            out = model_.generate(ids, max_new_tokens=1, do_sample=False)
            stats.append(handle.stats()["cold"]["tokens"])
            handle.set_budgets(budget_gb=small)
            assert handle.stats()["cold"]["tokens"] == 3 * 64 and handle.stats()["warm"]["tokens"] == 64
            results.append(model_.generate(out, **with_cache(handle.cache), max_new_tokens=4, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True))
        finally:
            kvtier.detach(model_)
    assert stats == [3 * 64, 0]  # the second cache held every page warm before the change
    from_start, shrunk = results
    assert torch.equal(shrunk.sequences, from_start.sequences)
    for got, expected in zip(shrunk.logits, from_start.logits):
        assert relative_error(got, expected) < FP32_RELATIVE
