"""The disk tier: cold pages past the host budget spill to lz4-framed, checksummed segment files and come back through
the staging ring every step (on_host_full="disk"); and the faults a page move can meet on the way.

References: the same cache with enough host memory that nothing spills, or a warm-only cache, fed the same states
(same codes, so outputs agree to float32 rounding), and float64 attention over every cached token read back from
the tiers (disk pages from their files) independently of attention and staging.
"""

import collections
import errno
import gc
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cold_tier import (FP32_RELATIVE, assert_decode_matches, HEAD_DIM, HEADS, KERNEL_RESPLIT_RELATIVE, MODEL, budget_for_warm_pages,
                            decode_mask, host_budget_for_slabs, make_cache, offloading_cache, random_states,
                            relative_error, step)

from conftest import cuda_only
from kvtier import BudgetExceededError, DiskReadError, DiskWriteError, KVTierError, TierConfig, disk, prefetch
from kvtier.attention import attend_tiers
from kvtier.config import BYTES_PER_GB
from kvtier.kernels.decode_attention import dequantize_pages
from kvtier.prefetch import Prefetcher

BLOCK = 16  # SMALL's block_size


def host_budget_gb(slabs_per_layer, chunk_pages, staging_chunks=3, device="cpu"):
    """A host budget of ``slabs_per_layer`` cold slabs a layer, plus the rows disk pages are read into."""
    page_bytes = make_probe(chunk_pages).layers[0].warm.page_bytes
    rows = Prefetcher.read_rows_bytes(staging_chunks, chunk_pages, page_bytes) / BYTES_PER_GB
    return host_budget_for_slabs(slabs_per_layer, chunk_pages, device) + rows


def make_probe(chunk_pages):
    probe = make_cache(chunk_pages=chunk_pages)
    step(probe, *random_states(40, seed=0))
    return probe


def spilling_cache(warm_pages=2, host_slabs=1, chunk_pages=2, device="cpu", **overrides):
    """``warm_pages`` warm pages and ``host_slabs`` slabs of ``chunk_pages`` cold pages a layer; the rest spills."""
    return offloading_cache(warm_pages, device, chunk_pages=chunk_pages, on_host_full="disk",
                            host_budget_gb=host_budget_gb(host_slabs, chunk_pages, device=device), **overrides)


def every_cached_token(layer):
    """positions (N,), keys and values (B, H, N, D) float32 on the CPU in the model basis, in position order, read
    from the hot buffer, the warm and low-precision pages, the host slabs and the disk files directly (through
    DiskPages.read, which checks each page's CRC), not through attention or staging; tiers the layer lacks are
    skipped."""
    layout, block = layer.warm.layout, layer.config.block_size
    paged = layer.paged()
    parts, positions = [], []
    for pages in (layer.warm, layer.low):
        if pages is not None and pages.table:
            parts.append(dequantize_pages(layer.paged(pages), pages.table))
            positions += [torch.arange(entry.start, entry.start + block) for entry in pages.table]
    offloaded = [(entry.start, layer.cold.slabs[entry.slab].pages[entry.row])
                 for entry in (layer.cold.entries if layer.cold is not None else [])]
    offloaded += [(entry.start, torch.frombuffer(bytearray(layer.disk.read(entry)), dtype=torch.uint8))
                  for entry in (layer.disk.entries if layer.disk is not None else [])]
    for start, page in offloaded:  # page (page_bytes,) uint8
        page = page.to(layer.device)  # dequantized beside the layer's rotation and sketch
        page_keys, page_values = layout.format.dequantize(layout.views(page[None]), torch.float32, layer.sketch)
        parts.append((page_keys[0], page_values[0]))  # (B, H, block, D) each
        positions.append(torch.arange(start, start + block))
    keys, values = [], []
    for part_keys, part_values in parts:
        if layer.rotation is not None:
            part_keys, part_values = part_keys @ layer.rotation.T, part_values @ layer.rotation.T
        keys.append(part_keys.cpu())
        values.append(part_values.cpu())
    for offset, position, count in paged.hot_pages:
        positions.append(torch.arange(position, position + count))
        keys.append(paged.hot_keys[:, :, offset:offset + count].float().cpu())
        values.append(paged.hot_values[:, :, offset:offset + count].float().cpu())
    positions = torch.cat(positions)
    order = positions.argsort(stable=True)
    order = order[positions[order] < layer.total_tokens]  # unfilled hot slots lie past the end
    return positions[order], torch.cat(keys, 2)[:, :, order], torch.cat(values, 2)[:, :, order]


def dense_decode(query, layer, scale, kv_start):
    """float64 attention of query (B, H_q, D) over every cached token at positions >= kv_start[b]."""
    positions, keys, values = every_cached_token(layer)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", query.cpu().double() * scale, keys)
    scores = scores.masked_fill(~(positions[None, None, :] >= kv_start.cpu()[:, None, None]), -torch.inf)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)


def page_starts(layer):
    return {"warm": [entry.start for entry in layer.warm.table], "cold": list(layer.cold.starts),
            "disk": list(layer.disk.starts)}


def assert_every_token_once(layer, total):
    """Every token of positions 0 .. total-1 is in exactly one tier, or counted evicted; in order."""
    positions, _, _ = every_cached_token(layer)
    kept = positions.tolist()
    assert len(kept) == len(set(kept)) == total - layer.evicted_tokens
    assert layer.hot_tokens() + layer.warm_tokens() + layer.low_tokens() + layer.cold_tokens() + layer.disk_tokens() \
        + layer.evicted_tokens == total
    assert kept[len(kept) - layer.recent_count:] == list(range(total - layer.recent_count, total))
    for pages in (layer.warm, layer.low):  # the page count a CUDA graph's kernel reads follows the table
        assert pages is None or int(pages.row_count) == len(pages.table)


def query_for(seed, device="cpu"):
    return torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------------------------------------ spilling
def test_spilled_pages_keep_their_bytes_and_every_token_stays_once():
    keys, values = random_states(400, seed=1)
    warm_only = make_cache(budget_gb=0.5, on_budget_full="raise")
    spilling = spilling_cache(chunk_pages=2)
    for first in range(0, 400, 37):
        step(warm_only, keys[:, :, first:first + 37], values[:, :, first:first + 37])
        step(spilling, keys[:, :, first:first + 37], values[:, :, first:first + 37])
    for reference, layer in zip(warm_only.layers, spilling.layers):
        tiers = page_starts(layer)
        assert len(tiers["warm"]) == 2 and len(tiers["cold"]) == 2 and len(tiers["disk"]) >= 15
        reference_pages = {entry.start: reference.warm.page(entry) for entry in reference.warm.table}
        assert sorted(sum(tiers.values(), [])) == sorted(reference_pages)  # every page once, in exactly one tier
        assert max(tiers["disk"]) < min(tiers["cold"]) and max(tiers["cold"]) < min(tiers["warm"])  # oldest first
        for entry in layer.disk.entries:  # the same packed bytes, byte for byte, checked by their CRC
            assert torch.equal(torch.frombuffer(bytearray(layer.disk.read(entry)), dtype=torch.uint8),
                               reference_pages[entry.start])
        assert_every_token_once(layer, 400)
    stats = spilling.stats()
    files = [os.path.join(spilling.disk_directory, name) for name in os.listdir(spilling.disk_directory)]
    assert stats["disk"]["files"] == len(files) < stats["disk"]["pages"]  # segments, not a file per page
    assert stats["disk"]["bytes"] == sum(os.path.getsize(path) for path in files) == spilling.disk_budget.used_bytes
    assert stats["hot"]["tokens"] + stats["warm"]["tokens"] + stats["cold"]["tokens"] + stats["disk"]["tokens"] == 400
    assert spilling.host_budget.used_bytes <= spilling.host_budget.limit_bytes
    assert spilling.reserved_bytes <= spilling.budget_bytes


@pytest.mark.parametrize("decode_kernel", ["torch", pytest.param("triton", marks=[pytest.mark.cuda, cuda_only()])])
@pytest.mark.parametrize("chunk_pages", [1, 3])  # many staged chunks (slot reuse) and disk jobs, or a few
def test_decode_over_disk_pages_equals_the_cache_that_keeps_them_in_host_memory(decode_kernel, chunk_pages):
    """On CUDA: pinned read rows, the side stream and its events, and the Triton kernel over the staged disk pages."""
    device = "cuda" if decode_kernel == "triton" else "cpu"
    keys, values = (states.to(device) for states in random_states(330, seed=chunk_pages))
    kv_start = torch.tensor([0, 37], device=device)  # the second row is left-padded
    caches = [offloading_cache(2, device, chunk_pages=chunk_pages, decode_kernel=decode_kernel),
              spilling_cache(2, 1, chunk_pages, device, decode_kernel=decode_kernel)]
    query = query_for(5, device)
    outputs = []
    for cache in caches:
        step(cache, keys[:, :, :320], values[:, :, :320])
        views = step(cache, keys[:, :, 320:321], values[:, :, 320:321])
        outputs.append([attend_tiers(view, query, decode_mask(kv_start, 321), 0.25)[:, 0] for view in views])
    in_host_memory, spilling = caches
    assert spilling.stats()["disk"]["tokens"] >= 320 - 2 * BLOCK - chunk_pages * BLOCK - 8 - BLOCK - 2 - BLOCK
    assert in_host_memory.stats()["disk"]["tokens"] == 0
    assert_decode_matches(outputs, spilling, query, kv_start, decode_kernel, reference=dense_decode)


def test_prefill_over_disk_pages_equals_the_warm_only_cache():
    keys, values = random_states(260, seed=3)
    out = []
    for cache in (make_cache(budget_gb=0.5, on_budget_full="raise"), spilling_cache(2, 1, 2)):
        step(cache, keys[:, :, :200], values[:, :, :200])
        views = step(cache, keys[:, :, 200:], values[:, :, 200:])  # a 60-token chunk: query tiles over disk chunks
        query = torch.randn(2, HEADS, 60, HEAD_DIM, generator=torch.Generator().manual_seed(9))
        out.append(attend_tiers(views[1], query, None, 0.25))
    assert cache.stats()["disk"]["tokens"] > 0
    assert relative_error(out[1], out[0]) < FP32_RELATIVE


def test_a_corrupted_disk_page_fails_its_checksum_naming_the_file_and_position():
    cache = spilling_cache(2, 1, 2)
    step(cache, *random_states(200, seed=4))
    entry = cache.layers[1].disk.entries[3]
    with open(entry.segment.path, "r+b") as file:  # flip one byte inside the page's frame
        file.seek(entry.offset + entry.length // 2)
        byte = file.read(1)
        file.seek(entry.offset + entry.length // 2)
        file.write(bytes([byte[0] ^ 0x5A]))
    keys, values = random_states(1, seed=5)
    views = step(cache, keys, values)
    attend_tiers(views[0], query_for(1), None, 0.25)  # layer 0's pages are intact
    message = (rf"layer 1's disk page at position {entry.start:,} .*{entry.segment.path}\) failed its checksum.*"
               r"start a new generate\(\)")
    with pytest.raises(DiskReadError, match=message):
        attend_tiers(views[1], query_for(1), None, 0.25)


def test_the_cache_folder_goes_with_the_cache(tmp_path):
    cache = spilling_cache(2, 1, 2, disk_dir=str(tmp_path))
    step(cache, *random_states(200, seed=4))
    folder = cache.disk_directory
    assert os.path.dirname(folder) == str(tmp_path) and os.listdir(folder)
    cache.layers[0].reset()  # a reset layer's files go at once
    assert all(name.startswith("layer001") for name in os.listdir(folder))
    del cache
    gc.collect()
    assert not os.path.exists(folder)


def test_describe_names_the_disk_tier_and_what_a_full_disk_does():
    text = TierConfig(on_host_full="disk", disk_budget_gb=4, on_disk_full="evict").describe()
    assert "disk (files under the system temp folder, int4, lz4 + CRC-32 per page)" in text
    assert "within 4 GB" in text and text.endswith("full disk budget: sink_recent evicts")
    with pytest.raises(ValueError, match="prefetch='all' and cold_attention='stream'"):
        TierConfig(on_host_full="disk", prefetch="topk")
    with pytest.raises(ValueError, match="on_budget_full='offload'"):
        TierConfig(on_host_full="disk", on_budget_full="evict")


# ------------------------------------------------------------------------------------------------ a full disk budget
def disk_budget_gb(pages_per_layer, cache_kwargs):
    """A disk budget that holds about ``pages_per_layer`` pages a layer (pages compress to about their size)."""
    probe = spilling_cache(**cache_kwargs)
    step(probe, *random_states(200, seed=6))
    frame = max(entry.length for entry in probe.layers[0].disk.entries)
    return MODEL.num_hidden_layers * pages_per_layer * frame / BYTES_PER_GB


def test_full_disk_budget_raises_naming_it_and_nothing_is_lost():
    cache = spilling_cache(2, 1, 2, disk_budget_gb=disk_budget_gb(4, dict(chunk_pages=2)))
    keys, values = random_states(300, seed=6)
    step(cache, keys[:, :, :150], values[:, :, :150])
    with pytest.raises(BudgetExceededError, match=r"disk budget of [\d,]+ bytes \(disk_budget_gb\) for spilled pages is"
                                                  r" full at \d+ tokens.*Raise disk_budget_gb.*on_disk_full='evict'"):
        for position in range(150, 300):
            step(cache, keys[:, :, position:position + 1], values[:, :, position:position + 1])
    assert cache.disk_budget.used_bytes <= cache.disk_budget.limit_bytes
    assert_every_token_once(cache.layers[0], position + 1)  # the page that found no room stayed in the recent buffer


def test_full_disk_budget_evicts_the_oldest_disk_pages():
    cache = spilling_cache(2, 1, 2, on_disk_full="evict", disk_budget_gb=disk_budget_gb(4, dict(chunk_pages=2)))
    keys, values = random_states(400, seed=6)
    for first in range(0, 400, 50):
        step(cache, keys[:, :, first:first + 50], values[:, :, first:first + 50])
        assert cache.disk_budget.used_bytes <= cache.disk_budget.limit_bytes
    for layer in cache.layers:
        assert layer.evicted_tokens > 0 and layer.disk.entries
        starts = sorted(sum(page_starts(layer).values(), []))
        assert starts == list(range(starts[0], starts[0] + BLOCK * len(starts), BLOCK))  # the newest, contiguous
        assert_every_token_once(layer, 400)
    assert cache.stats()["evicted_tokens"] == cache.layers[0].evicted_tokens


# ------------------------------------------------------------------------------------------------ faults
def budgets(cache):
    return cache.reserved_bytes, cache.host_budget.used_bytes, cache.disk_budget.used_bytes


def decode_and_compare(cache, reference, keys, values, first, last, query):
    """Decode positions first .. last-1 one token at a time in both caches; each layer's output must agree."""
    for position in range(first, last):
        for each in (cache, reference):
            each.views = step(each, keys[:, :, position:position + 1], values[:, :, position:position + 1])
        for got, expected in zip(cache.views, reference.views):
            assert relative_error(attend_tiers(got, query, None, 0.25), attend_tiers(expected, query, None, 0.25)) \
                < FP32_RELATIVE


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_failed_disk_write_leaves_the_page_where_it_was_and_the_cache_usable(monkeypatch, error):
    """The write fails while a decode step flushes a block (warm -> cold -> disk): a clear error; the page stays in
    host memory, the warm page in its slab, the block in the recent buffer; no budget leaks; the step then goes on."""
    keys, values = random_states(240, seed=7)
    cache, reference = spilling_cache(2, 1, 2), spilling_cache(2, 1, 2)
    for each in (cache, reference):
        step(each, keys[:, :, :200], values[:, :, :200])
    query = query_for(3)
    position = 200
    while cache.layers[0].recent_count < cache.layers[0].recent_keys.shape[2] - 1:  # the next token flushes a block
        decode_and_compare(cache, reference, keys, values, position, position + 1, query)
        position += 1
    before = [page_starts(layer) for layer in cache.layers], budgets(cache)
    segment_sizes = [[segment.size for segment in layer.disk.segments] for layer in cache.layers]

    def fail(self, data, offset):
        os.pwrite(self.fd, bytes(data[:len(data) // 2]), offset)  # half a frame lands, then the disk fails
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(disk.DiskSegment, "write", fail)
    expected = "the disk is full" if error == errno.ENOSPC else "the write failed"
    with pytest.raises(DiskWriteError, match=rf"layer 0's page at position \d+ to .*segment\d+\.lz4 failed: "
                                                   rf"{expected}.*stayed in host memory"):
        cache.update(keys[:, :, position:position + 1], values[:, :, position:position + 1], 0)
    monkeypatch.undo()
    assert ([page_starts(layer) for layer in cache.layers], budgets(cache)) == before
    assert [[segment.size for segment in layer.disk.segments] for layer in cache.layers] == segment_sizes
    assert all(os.path.getsize(segment.path) == segment.size for segment in cache.layers[0].disk.segments)
    assert_every_token_once(cache.layers[0], position + 1)  # the new token is in the recent buffer
    # the rest of the step (layer 1) and the next steps go on; layer 0 flushes its block at its next token
    finish_the_step_and_go_on(cache, reference, keys, values, position, query)


def finish_the_step_and_go_on(cache, reference, keys, values, position, query):
    """After layer 0's update of ``position`` raised: the other layers take the token, the reference takes the whole
    step, and 20 more decode steps agree with the reference, which held every token and every budget alike."""
    view = cache.update(keys[:, :, position:position + 1], values[:, :, position:position + 1], 1)[0]
    reference_view = step(reference, keys[:, :, position:position + 1], values[:, :, position:position + 1])[1]
    assert relative_error(attend_tiers(view, query, None, 0.25), attend_tiers(reference_view, query, None, 0.25)) \
        < FP32_RELATIVE
    decode_and_compare(cache, reference, keys, values, position + 1, position + 20, query)
    for layer, reference_layer in zip(cache.layers, reference.layers):
        assert_every_token_once(layer, position + 20)
        assert page_starts(layer) == page_starts(reference_layer)
    assert budgets(cache) == budgets(reference)


def test_a_prefetch_copy_that_fails_once_is_retried_and_the_step_is_exact(monkeypatch):
    keys, values = random_states(240, seed=8)
    cache, reference = spilling_cache(2, 1, 2), spilling_cache(2, 1, 2)
    for each in (cache, reference):
        step(each, keys[:, :, :220], values[:, :, :220])
    copy, failed = prefetch.Prefetcher._copy_runs, []

    def fail_each_job_once(self, job, slot):  # a transient fault: each job's first copy fails
        if not getattr(job, "faulted", False):
            job.faulted = True
            failed.append(job)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        copy(self, job, slot)

    monkeypatch.setattr(prefetch.Prefetcher, "_copy_runs", fail_each_job_once)
    decode_and_compare(cache, reference, keys, values, 220, 224, query_for(4))
    assert cache.prefetcher.failed_copies >= 4 * len(cache.layers) and len(failed) >= 4 * len(cache.layers)


def test_a_prefetch_copy_that_keeps_failing_is_a_clear_error_and_the_next_step_works(monkeypatch):
    keys, values = random_states(240, seed=8)
    cache, reference = spilling_cache(2, 1, 2), spilling_cache(2, 1, 2)
    for each in (cache, reference):
        step(each, keys[:, :, :220], values[:, :, :220])

    def fail(self, job, slot):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(prefetch.Prefetcher, "_copy_runs", fail)
    views = step(cache, keys[:, :, 220:221], values[:, :, 220:221])  # copies issued ahead fail quietly here
    with pytest.raises(KVTierError, match=r"copying layer 0's cold pages to the device failed: CUDA error.*Every page "
                                          r"is still where it was"):
        attend_tiers(views[0], query_for(4), None, 0.25)
    monkeypatch.undo()
    assert len(cache.prefetcher.free_slots) == cache.config.staging_chunks  # no slot leaked
    reference_views = step(reference, keys[:, :, 220:221], values[:, :, 220:221])
    for got, expected in zip(views, reference_views):  # the same step, attended again, now works
        assert relative_error(attend_tiers(got, query_for(4), None, 0.25),
                              attend_tiers(expected, query_for(4), None, 0.25)) < FP32_RELATIVE
    decode_and_compare(cache, reference, keys, values, 221, 224, query_for(4))


def test_a_read_ahead_running_when_its_plan_is_forgotten_is_counted_until_it_ends(monkeypatch):
    """The reader thread reads disk pages ahead into host rows the host budget paid for, one ring slot's worth a
    read. A read already running when its plan is forgotten (a replan) cannot be cancelled: it keeps its rows until it
    ends, so the next plan never has more reads in flight than those rows (nor a read the prefetcher does not count),
    and the steps after are exact."""
    keys, values = random_states(240, seed=9)
    cache, reference = spilling_cache(2, 1, 2), spilling_cache(2, 1, 2)
    for each in (cache, reference):
        step(each, keys[:, :, :220], values[:, :, :220])
    prefetcher, layer = cache.prefetcher, cache.layers[1]
    prefetcher.quiesce()
    slots, slot_pages, _ = prefetcher.ring.pages.shape
    assert prefetcher.reader is not None and len(layer.disk.entries) > slots * slot_pages  # more disk jobs than slots
    started, release, submitted = threading.Event(), threading.Event(), []
    read, submit = disk.DiskPages.read, prefetcher.reader.submit

    def read_when_released(self, entry):  # the reader thread's reads wait for the test
        if threading.current_thread().name.startswith("kvtier-disk"):
            started.set()
            assert release.wait(timeout=60)
        return read(self, entry)

    def recorded_submit(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(disk.DiskPages, "read", read_when_released)
    monkeypatch.setattr(prefetcher.reader, "submit", recorded_submit)
    ring_slots, prefetcher.free_slots = prefetcher.free_slots, collections.deque()  # nothing copied: reads stay ahead
    try:
        prefetcher.prefetch(layer)  # reads ahead: the first read runs (and waits), the others queue
        assert started.wait(timeout=60) and len(submitted) == slots
        prefetcher.cancel(layer.layer_idx)  # a replan: the running read cannot be cancelled
        prefetcher.prefetch(layer)
        in_flight = [future for future in submitted if not future.done()]
        assert submitted[0] in in_flight and len(in_flight) <= slots
        assert prefetcher.read_ahead_jobs >= len(in_flight)  # every read in flight is counted in the paid-for rows
    finally:
        release.set()
        prefetcher.free_slots = ring_slots
    monkeypatch.undo()
    prefetcher.quiesce()
    assert prefetcher.read_ahead_jobs == 0
    read_ahead = prefetcher.read_ahead_pages
    decode_and_compare(cache, reference, keys, values, 220, 224, query_for(5))
    assert prefetcher.read_ahead_pages > read_ahead and budgets(cache) == budgets(reference)


def test_a_failed_host_allocation_while_demoting_is_a_clear_error_and_the_cache_goes_on(monkeypatch):
    """The host pool refuses a new slab while a decode step demotes a page (warm -> cold): a clear error; the warm
    page stays warm, the host budget is refunded, and the cache goes on like one that never failed."""
    from kvtier import cold

    keys, values = random_states(300, seed=9)
    cache, reference = spilling_cache(2, 3, 2), spilling_cache(2, 3, 2)
    for each in (cache, reference):
        step(each, keys[:, :, :70], values[:, :, :70])
    assert len(cache.layers[0].cold.slabs) == 1

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(cold.HostSlab, "__init__", refuse)
    for position in range(70, 200):
        before = [page_starts(layer) for layer in cache.layers], budgets(cache)
        try:
            step(cache, keys[:, :, position:position + 1], values[:, :, position:position + 1])
        except KVTierError as error:
            assert "could not allocate" in str(error) and "Lower host_budget_gb" in str(error)
            break
        step(reference, keys[:, :, position:position + 1], values[:, :, position:position + 1])
    monkeypatch.undo()
    assert ([page_starts(layer) for layer in cache.layers], budgets(cache)) == before  # the refused slab refunded
    assert len(cache.layers[0].cold.slabs) == 1 and not cache.layers[0].disk.entries
    assert_every_token_once(cache.layers[0], position + 1)
    finish_the_step_and_go_on(cache, reference, keys, values, position, query_for(6))


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=8, deadline=None)
@given(chunks=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 3)), min_size=3, max_size=6),
       warm_pages=st.integers(1, 3), chunk_pages=st.integers(1, 3), host_slabs=st.integers(1, 2),
       disk_pages=st.integers(2, 8), evict=st.booleans(), seed=st.integers(0, 99))
def test_no_token_lost_or_duplicated_across_spills_evictions_and_staging(chunks, warm_pages, chunk_pages, host_slabs,
                                                                        disk_pages, evict, seed):
    """Prefill chunks, each followed by a few decode steps; every token in exactly one tier (hot, warm, cold, disk) or
    counted evicted, in order; device, host and disk budgets never exceeded; attention equal to float64."""
    frame = make_probe(chunk_pages).layers[0].warm.page_bytes + 64  # an lz4 frame of an incompressible page, at most
    cache = spilling_cache(warm_pages, host_slabs, chunk_pages, on_disk_full="evict" if evict else "raise",
                           disk_budget_gb=MODEL.num_hidden_layers * disk_pages * frame / BYTES_PER_GB)
    keys, values = random_states(sum(length + decodes for length, decodes in chunks), seed)
    query = query_for(seed)
    total = 0
    try:
        for length, decodes in chunks:
            for size in [length] + [1] * decodes:
                views = step(cache, keys[:, :, total:total + size], values[:, :, total:total + size])
                total += size
                for layer, view in zip(cache.layers, views):
                    assert_every_token_once(layer, total)
                    if size == 1:
                        got = attend_tiers(view, query, None, 0.25)[:, 0]
                        expected = dense_decode(query[:, :, 0], layer, 0.25, torch.zeros(2, dtype=torch.long))
                        assert relative_error(got, expected) < FP32_RELATIVE
                assert cache.reserved_bytes <= cache.budget_bytes
                assert cache.host_budget.used_bytes <= cache.host_budget.limit_bytes
                assert cache.disk_budget.used_bytes <= cache.disk_budget.limit_bytes
                for layer in cache.layers:
                    assert layer.disk.file_bytes <= layer.disk.share_bytes
    except BudgetExceededError:
        assert not evict  # only a disk budget that may not evict fills up


# ------------------------------------------------------------------------------------------------ generate()
@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only()])])
def test_generate_with_most_of_the_context_on_disk_matches_the_warm_only_cache(device):
    """On CUDA: pinned read rows, the side stream and the Triton kernel over staged disk pages."""
    import kvtier
    from test_cold_tier import SMALL, kvtier_test_model

    torch.manual_seed(0)
    model = kvtier_test_model().to(device)
    ids = torch.randint(0, 128, (2, 300), device=device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    outputs = []
    for config in (dict(budget_gb=0.5, on_budget_full="raise"),
                   dict(budget_gb=budget_for_warm_pages(2, device, chunk_pages=2), chunk_pages=2, on_host_full="disk",
                        host_budget_gb=host_budget_gb(1, 2, device=device))):
        handle = kvtier.attach(model, **{**SMALL, **config})
        try:
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True))
            stats = handle.stats()
        finally:
            kvtier.detach(model)
    warm_only, spilling = outputs
    assert stats["disk"]["tokens"] > 200 and stats["disk"]["read_ahead_pages"] > 0  # most read on the reader thread
    assert torch.equal(spilling.sequences, warm_only.sequences)
    same_codes = FP32_RELATIVE if device == "cpu" else KERNEL_RESPLIT_RELATIVE
    for got, expected in zip(spilling.logits, warm_only.logits):
        assert relative_error(got, expected) < same_codes
