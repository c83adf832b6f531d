"""The cold tier: warm pages moved byte for byte to host memory when the device budget is full, and streamed back
through the staging ring for every decode step (prefetch "all": exact).

On the CPU the host and the "device" are the same memory, but every code path runs: demotion, host slabs,
planning, staging copies, joined page tables, stale plans, the kernel (interpreted) and its reference.
References: a warm-only cache fed the same states (same codes, so outputs agree to float32 rounding), and
float64 attention over every cached token read back from the tiers independently of attention.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

import kvtier
from kvtier import BudgetExceededError, KVTierError, TierConfig, TieredCache, cold
from kvtier.attention import attend_tiers
from kvtier.config import BYTES_PER_GB
from kvtier.kernels.decode_attention import dequantize_pages

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32  # the kernel reads head dims of 32 and up
MODEL = LlamaConfig(num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                    hidden_size=128)
SMALL = dict(sink_tokens=2, recent_window=8, block_size=16, key_group=16, key_tile=32, query_tile=4,
             pages_per_slab=1)
FP32_RELATIVE = 1e-5
KERNEL_RESPLIT_RELATIVE = 1e-3


def make_cache(budget_gb=0.05, **overrides):
    return TieredCache(TierConfig(budget_gb=budget_gb, **{**SMALL, **overrides}), MODEL)


def offloading_cache(warm_pages, device="cpu", **overrides):
    """A cache whose device budget holds the hot tier, scratch, staging ring and ``warm_pages`` warm pages a layer."""
    return make_cache(budget_gb=budget_for_warm_pages(warm_pages, device, **overrides), **overrides)


def budget_for_warm_pages(pages_per_layer, device="cpu", **overrides):
    probe = make_cache(**overrides)
    step(probe, *(states.to(device) for states in random_states(40, seed=0)))  # the scratch depends on the device
    warm = probe.layers[0].warm
    fixed = probe.hot_bytes + probe.scratch_bytes + probe.staging_bytes
    return (fixed + MODEL.num_hidden_layers * (pages_per_layer * warm.page_bytes + warm.table_bytes)) / BYTES_PER_GB


def host_budget_for_slabs(slabs_per_layer, chunk_pages, device="cpu"):
    probe = make_cache(chunk_pages=chunk_pages)
    step(probe, *(states.to(device) for states in random_states(40, seed=0)))
    slab_bytes = probe.layers[0].cold.slab_bytes  # chunk_pages rows and positions; whole pages when pinned (CUDA)
    return MODEL.num_hidden_layers * slabs_per_layer * slab_bytes / BYTES_PER_GB


def random_states(length, seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator) * 2
    keys[..., :2] += 3  # outlier channels, as real keys have
    return keys, torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator)


def step(cache, keys, values):
    """Every layer takes the chunk in model order through TieredCache.update (so the next layer is prefetched);
    returns each layer's view."""
    return [cache.update(keys, values, index)[0] for index in range(cache.num_layers)]


def every_cached_token(layer):
    """positions (N,), keys and values (B, H, N, D) float32 on the CPU in the model basis, in position order, read
    from the hot buffer, the warm pages and the host slabs directly (not through attention or staging)."""
    paged = layer.paged()
    positions, keys, values = [], [], []
    block = layer.config.block_size
    warm = [dequantize_pages(paged, paged.warm.table)] if paged.warm.table else []
    positions += [torch.arange(entry.start, entry.start + block) for entry in paged.warm.table]
    layout = layer.warm.layout
    for entry in layer.cold.entries if layer.cold is not None else ():
        fields = layout.views(layer.cold.slabs[entry.slab].pages[entry.row:entry.row + 1])
        cold_keys, cold_values = layout.format.dequantize(fields, torch.float32, layer.sketch)  # (1, B, H, block, D)
        warm.append((cold_keys[0], cold_values[0]))
        positions.append(torch.arange(entry.start, entry.start + block))
    for part_keys, part_values in warm:
        part_keys, part_values = part_keys.cpu(), part_values.cpu()
        if layer.rotation is not None:
            part_keys, part_values = part_keys @ layer.rotation.cpu().T, part_values @ layer.rotation.cpu().T
        keys.append(part_keys)
        values.append(part_values)
    for offset, position, count in paged.hot_pages:
        positions.append(torch.arange(position, position + count))
        keys.append(paged.hot_keys[:, :, offset:offset + count].float().cpu())
        values.append(paged.hot_values[:, :, offset:offset + count].float().cpu())
    positions = torch.cat(positions)
    order = positions.argsort()
    order = order[positions[order] < layer.total_tokens]  # unfilled hot slots lie past the end
    return positions[order], torch.cat(keys, 2)[:, :, order], torch.cat(values, 2)[:, :, order]


def dense_decode(query, layer, scale, kv_start, skipped_pages=()):
    """float64 attention of query (B, H_q, D) over every cached token at positions >= kv_start[b], except the pages
    that start at ``skipped_pages``."""
    positions, keys, values = every_cached_token(layer)
    kept = torch.ones_like(positions, dtype=torch.bool)
    for start in skipped_pages:
        kept &= (positions < start) | (positions >= start + layer.config.block_size)
    positions, keys, values = positions[kept], keys[:, :, kept], values[:, :, kept]
    query, kv_start = query.cpu(), kv_start.cpu()
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", query.double() * scale, keys)
    scores = scores.masked_fill(~(positions[None, None, :] >= kv_start[:, None, None]), -torch.inf)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)


def decode_mask(kv_start, total):
    """transformers' (B, 1, 1, K) bool mask of a decode step for left-padded rows starting at kv_start."""
    return (torch.arange(total, device=kv_start.device)[None, :] >= kv_start[:, None])[:, None, None, :]


def relative_error(got, expected):
    got, expected = got.double().cpu(), expected.double().cpu()
    return ((got - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------------------------------------ demotion
def test_demoted_pages_keep_their_bytes_and_every_token_stays_once():
    keys, values = random_states(300, seed=1)
    warm_only = make_cache(budget_gb=0.5, on_budget_full="raise")
    offloading = offloading_cache(3, chunk_pages=4)
    for first in range(0, 300, 23):
        step(warm_only, keys[:, :, first:first + 23], values[:, :, first:first + 23])
        step(offloading, keys[:, :, first:first + 23], values[:, :, first:first + 23])
    for reference, layer in zip(warm_only.layers, offloading.layers):
        assert len(layer.warm.table) == 3 and layer.cold.entries and layer.evicted_tokens == 0
        reference_pages = {entry.start: reference.warm.page(entry) for entry in reference.warm.table}
        starts = [entry.start for entry in layer.warm.table] + [entry.start for entry in layer.cold.entries]
        assert sorted(starts) == sorted(reference_pages)  # every page once, in exactly one tier
        for entry in layer.cold.entries:  # the policy (sink+recent) sent the oldest pages
            assert entry.start < min(warm.start for warm in layer.warm.table)
            assert torch.equal(layer.cold.slabs[entry.slab].pages[entry.row], reference_pages[entry.start])
    stats = offloading.stats()
    assert stats["hot"]["tokens"] + stats["warm"]["tokens"] + stats["cold"]["tokens"] == 300
    assert stats["cold"]["bytes"] == sum(layer.cold.allocated_bytes for layer in offloading.layers) > 0
    assert offloading.reserved_bytes <= offloading.budget_bytes


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("decode_kernel", ["torch", "triton"])
@pytest.mark.parametrize("chunk_pages", [1, 3, 64])  # many chunks (and slot reuse), a few, one joined with warm
def test_decode_over_cold_pages_equals_the_warm_only_cache(decode_kernel, chunk_pages):
    """The kernel runs compiled where CUDA is (pinned slabs, side stream), interpreted on the CPU elsewhere."""
    device = "cuda" if decode_kernel == "triton" and torch.cuda.is_available() else "cpu"
    keys, values = (states.to(device) for states in random_states(330, seed=chunk_pages))
    kv_start = torch.tensor([0, 37], device=device)  # the second row is left-padded: whole pages fall outside it
    caches = [make_cache(budget_gb=0.5, on_budget_full="raise", decode_kernel=decode_kernel),
              offloading_cache(2, device, chunk_pages=chunk_pages, decode_kernel=decode_kernel)]
    outputs = []
    for cache in caches:
        step(cache, keys[:, :, :320], values[:, :, :320])
        views = step(cache, keys[:, :, 320:321], values[:, :, 320:321])
        query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(5)).to(device)
        outputs.append([attend_tiers(view, query, decode_mask(kv_start, 321), 0.25)[:, 0] for view in views])
    warm_only, offloading = caches
    assert offloading.stats()["cold"]["tokens"] >= 320 - 2 * 16 - 8 - 16 - 2
    assert_decode_matches(outputs, offloading, query, kv_start, decode_kernel)


def assert_decode_matches(outputs, cache, query, kv_start, decode_kernel, reference=None):
    """Each layer's decode output through ``cache`` (outputs[1]) equals the one over the same codes kept elsewhere
    (outputs[0]) and float64 attention over the tokens ``cache`` holds (``reference``, default dense_decode)."""
    reference = reference or dense_decode
    # the kernel rounds softmax weights to float16 for its dot products, relative to each launch's running maximum:
    # the same codes split over more launches round differently (2^-11 per weight)
    same_codes = FP32_RELATIVE if decode_kernel == "torch" else KERNEL_RESPLIT_RELATIVE
    for index in range(MODEL.num_hidden_layers):
        assert relative_error(outputs[1][index], outputs[0][index]) < same_codes
        expected = reference(query[:, :, 0], cache.layers[index], 0.25, kv_start)
        assert relative_error(outputs[1][index], expected) < (FP32_RELATIVE if decode_kernel == "torch" else 1e-2)


def test_decode_with_cold_pages_attended_on_the_host_equals_the_warm_only_cache():
    """cold_attention="host": the numba kernel reads the host slabs in place; merged with the device partials."""
    keys, values = random_states(330, seed=8)
    kv_start = torch.tensor([0, 37])
    outputs = []
    for cache in (make_cache(budget_gb=0.5, on_budget_full="raise"),
                  offloading_cache(2, chunk_pages=3, cold_attention="host")):
        step(cache, keys[:, :, :320], values[:, :, :320])
        views = step(cache, keys[:, :, 320:321], values[:, :, 320:321])
        query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(5))
        outputs.append([attend_tiers(view, query, decode_mask(kv_start, 321), 0.25)[:, 0] for view in views])
    assert cache.stats()["cold"]["tokens"] > 200 and cache.prefetcher.moved_chunks == 0  # nothing was streamed
    for index in range(MODEL.num_hidden_layers):
        assert relative_error(outputs[1][index], outputs[0][index]) < FP32_RELATIVE


@pytest.mark.parametrize("prefetch", ["all", "topk"])  # a prefill chunk attends every cold page in either mode
def test_prefill_over_cold_pages_equals_the_warm_only_cache(prefetch):
    keys, values = random_states(260, seed=3)
    out = []
    for cache in (make_cache(budget_gb=0.5, on_budget_full="raise"),
                  offloading_cache(2, chunk_pages=2, prefetch=prefetch)):
        step(cache, keys[:, :, :200], values[:, :, :200])
        views = step(cache, keys[:, :, 200:], values[:, :, 200:])  # a 60-token chunk: query tiles over cold chunks
        query = torch.randn(2, HEADS, 60, HEAD_DIM, generator=torch.Generator().manual_seed(9))
        out.append(attend_tiers(views[1], query, None, 0.25))
    assert relative_error(out[1], out[0]) < FP32_RELATIVE


@pytest.mark.parametrize("decode_kernel", ["torch", "triton"])
def test_topk_prefetch_attends_exactly_the_cold_pages_the_policy_ranks_highest(decode_kernel):
    """prefetch="topk": a quarter of the cold pages (rounded up) stream back, the newest under sink+recent; attention
    equals float64 attention over every cached token but the cold pages left on the host."""
    device = "cuda" if decode_kernel == "triton" and torch.cuda.is_available() else "cpu"
    keys, values = (states.to(device) for states in random_states(330, seed=11))
    kv_start = torch.tensor([0, 37], device=device)
    cache = offloading_cache(2, device, chunk_pages=2, prefetch="topk", prefetch_share=0.25, decode_kernel=decode_kernel)
    step(cache, keys[:, :, :320], values[:, :, :320])
    moved_before = cache.prefetcher.moved_bytes
    views = step(cache, keys[:, :, 320:321], values[:, :, 320:321])
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(5)).to(device)
    outputs = [attend_tiers(view, query, decode_mask(kv_start, 321), 0.25)[:, 0] for view in views]
    page_bytes = cache.layers[0].warm.page_bytes
    for index, layer in enumerate(cache.layers):
        cold_starts = sorted(layer.cold.starts)
        streamed = -(-len(cold_starts) // 4)
        assert len(cold_starts) >= 12
        expected = dense_decode(query[:, :, 0], layer, 0.25, kv_start, skipped_pages=cold_starts[:-streamed])
        assert relative_error(outputs[index], expected) < (FP32_RELATIVE if decode_kernel == "torch" else 1e-2)
    streamed_bytes = sum(-(-len(layer.cold.starts) // 4) * (page_bytes + 4) for layer in cache.layers)
    assert cache.prefetcher.moved_bytes - moved_before == streamed_bytes  # only the chosen pages moved


def test_topk_prefetch_of_every_cold_page_equals_prefetching_all():
    keys, values = random_states(330, seed=12)
    outputs = []
    for mode in ("all", "topk"):
        cache = offloading_cache(2, chunk_pages=3, prefetch=mode, prefetch_share=1.0, policy="attention_mass")
        step(cache, keys[:, :, :320], values[:, :, :320])
        views = step(cache, keys[:, :, 320:321], values[:, :, 320:321])
        query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(5))
        outputs.append([attend_tiers(view, query, None, 0.25)[:, 0] for view in views])
    for every, topk in zip(*outputs):
        assert relative_error(topk, every) < FP32_RELATIVE


def test_a_demotion_after_the_plan_makes_the_layer_replan():
    """The next layer is planned while this one updates; its own update then demotes a page (every block_size
    steps), so its plan is stale and it must replan rather than miss the page."""
    cache = offloading_cache(2, chunk_pages=2)
    keys, values = random_states(200, seed=4)
    step(cache, keys[:, :, :150], values[:, :, :150])
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    for position in range(150, 200):
        views = step(cache, keys[:, :, position:position + 1], values[:, :, position:position + 1])
        got = attend_tiers(views[1], query, None, 0.25)[:, 0]
        expected = dense_decode(query[:, :, 0], cache.layers[1], 0.25, torch.zeros(2, dtype=torch.long))
        assert relative_error(got, expected) < FP32_RELATIVE, position
    assert cache.prefetcher.replans > 0 and cache.prefetcher.moved_chunks > 0


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=10), warm_pages=st.integers(1, 3),
       chunk_pages=st.integers(1, 3), host_slabs=st.integers(1, 3), seed=st.integers(0, 99))
def test_no_token_lost_or_duplicated_across_demotions_evictions_and_staging(chunks, warm_pages, chunk_pages,
                                                                           host_slabs, seed):
    cache = offloading_cache(warm_pages, chunk_pages=chunk_pages, on_host_full="evict",
                             host_budget_gb=host_budget_for_slabs(host_slabs, chunk_pages))
    keys, values = random_states(sum(chunks) + len(chunks), seed)
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    total = 0
    for length in chunks:  # a prefill chunk, then one decode step
        step(cache, keys[:, :, total:total + length], values[:, :, total:total + length])
        total += length + 1
        decode = step(cache, keys[:, :, total - 1:total], values[:, :, total - 1:total])
        for layer, view in zip(cache.layers, decode):
            positions, _, _ = every_cached_token(layer)
            kept = positions.tolist()
            assert len(kept) == len(set(kept)) == total - layer.evicted_tokens  # each token once, or evicted
            assert kept[:2] == [0, 1]  # the sinks stay
            assert kept[len(kept) - layer.recent_count:] == list(range(total - layer.recent_count, total))
            assert layer.hot_tokens() + layer.warm_tokens() + layer.cold_tokens() + layer.evicted_tokens == total
            got = attend_tiers(view, query, None, 0.25)[:, 0]
            expected = dense_decode(query[:, :, 0], layer, 0.25, torch.zeros(2, dtype=torch.long))
            assert relative_error(got, expected) < FP32_RELATIVE
        assert cache.reserved_bytes <= cache.budget_bytes
        assert cache.host_budget.used_bytes <= cache.host_budget.limit_bytes


# ------------------------------------------------------------------------------------------------ budgets and faults
def test_full_host_budget_raises_naming_it():
    cache = offloading_cache(2, chunk_pages=2, host_budget_gb=host_budget_for_slabs(1, 2))
    keys, values = random_states(300, seed=6)
    with pytest.raises(BudgetExceededError, match=r"host budget of [\d,]+ bytes for cold pages is full at \d+ "
                                                  r"tokens.*host_budget_gb.*on_host_full='evict'"):
        step(cache, keys, values)
    assert cache.host_budget.used_bytes <= cache.host_budget.limit_bytes


def test_full_host_budget_evicts_the_oldest_cold_pages():
    cache = offloading_cache(2, chunk_pages=2, on_host_full="evict", host_budget_gb=host_budget_for_slabs(1, 2))
    step(cache, *random_states(300, seed=6))
    for layer in cache.layers:
        assert len(layer.cold.entries) == 2 and layer.evicted_tokens > 0
        starts = sorted(entry.start for entry in layer.cold.entries + layer.warm.table)
        assert starts == list(range(starts[0], starts[0] + 16 * len(starts), 16))  # the newest pages, contiguous
    assert cache.stats()["evicted_tokens"] == cache.layers[0].evicted_tokens


def test_a_failed_host_allocation_is_a_clear_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    cache = offloading_cache(2, chunk_pages=4)
    monkeypatch.setattr(cold.HostSlab, "__init__", refuse)
    with pytest.raises(KVTierError, match=r"could not allocate [\d,]+ bytes of host memory.*Lower host_budget_gb"):
        step(cache, *random_states(200, seed=7))
    assert cache.host_budget.used_bytes == 0  # the failed slab was refunded


# ------------------------------------------------------------------------------------------------ generate()
@torch.no_grad()
@pytest.mark.parametrize("device,cold_attention", [("cpu", "stream"), ("cpu", "host"), ("cpu", "auto"), pytest.param(
    "cuda", "stream", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA device")])])
def test_generate_with_most_of_the_context_cold_matches_the_warm_only_cache(device, cold_attention):
    """On CUDA: pinned slabs, the side stream and its events, and the Triton kernel over joined page tables."""
    torch.manual_seed(0)
    model = kvtier_test_model().to(device)
    ids = torch.randint(0, 128, (2, 300), device=device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    outputs = []
    for config in (dict(budget_gb=0.5, on_budget_full="raise"),
                   dict(budget_gb=budget_for_warm_pages(2, device, chunk_pages=2), chunk_pages=2,
                        cold_attention=cold_attention)):
        handle = kvtier.attach(model, **{**SMALL, **config})
        try:
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True))
            stats = handle.stats()
        finally:
            kvtier.detach(model)
    warm_only, offloading = outputs
    assert stats["cold"]["tokens"] > 200 and (stats["cold"]["moved_chunks"] > 0) == (cold_attention != "host")
    if cold_attention == "auto":  # both modes ran (each is tried twice before the first choice)
        assert min(stats["cold"]["attention"]["steps"].values()) >= 2
    assert torch.equal(offloading.sequences, warm_only.sequences)
    same_codes = FP32_RELATIVE if device == "cpu" else KERNEL_RESPLIT_RELATIVE  # the kernel on CUDA, see above
    for got, expected in zip(offloading.logits, warm_only.logits):
        assert relative_error(got, expected) < same_codes


def kvtier_test_model():
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    return LlamaForCausalLM(config).eval()
