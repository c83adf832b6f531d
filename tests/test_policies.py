"""Page policies: their scores and choices against hand-computed references, the attention mass they are fed against
float64 attention, a policy written in a few lines, and the precision rule (low-precision warm pages)."""

from dataclasses import dataclass, field

import pytest
import torch
from test_cold_tier import (FP32_RELATIVE, HEAD_DIM, KERNEL_RESPLIT_RELATIVE, KV_HEADS, SMALL, budget_for_warm_pages,
                            every_cached_token, kvtier_test_model, random_states, relative_error, step)
from transformers import LlamaConfig

import kvtier
from kvtier import TierConfig, TieredCache
from kvtier.attention import attend_tiers
from kvtier.policies import AttentionMass, PagePolicy, SinkRecent

BLOCK = SMALL["block_size"]


@dataclass
class NewestFirst(PagePolicy):
    """A third policy, as a user would write it: the newest warm page leaves first."""

    def score(self, starts):
        return -starts.double()


@dataclass
class Recording(SinkRecent):
    """Sink+recent choices, and a record of every observation the attention feeds it."""

    wants_mass = True
    seen: list = field(default_factory=list)

    def observe(self, starts, mass, ignore_from):
        real = starts < ignore_from
        self.seen.append(dict(zip(starts[real].tolist(), mass[real].double().tolist())))


def cache_for(query_heads=4, budget_gb=0.5, **overrides):
    model = LlamaConfig(num_hidden_layers=2, num_attention_heads=query_heads, num_key_value_heads=KV_HEADS,
                        head_dim=HEAD_DIM, hidden_size=128)
    return TieredCache(TierConfig(budget_gb=budget_gb, **{**SMALL, **overrides}), model)


# ------------------------------------------------------------------------------------------------ scores
def test_sink_recent_demotes_and_evicts_the_oldest_and_prefetches_the_newest():
    policy = SinkRecent()
    starts = [50, 18, 34, 66, 2]
    assert policy.pick_demotion(starts) == 4 and policy.pick_eviction(starts) == 4
    assert policy.pick_prefetches(starts, 2) == [0, 3]
    assert policy.pick_prefetches(starts, 9) == [0, 1, 2, 3, 4]


def test_attention_mass_scores_the_decayed_average_mass():
    """Against a float64 reference: after each observation every page's sums decay; a page's score is its decayed
    mass over its decayed observation count; never observed scores +inf; empty rows count for nothing."""
    decay = 0.8
    policy = AttentionMass(decay=decay, recent_share=0.0).for_layer(BLOCK, "cpu")
    generator = torch.Generator().manual_seed(0)
    mass_sum, observed = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for call in range(6):
        pages = torch.randperm(6, generator=generator)[:4] + (call >= 3)  # pages 0..6; page 7 never observed
        starts = torch.cat((pages * BLOCK + 2, torch.tensor([1 << 30])))  # an empty staging row at the end
        mass = torch.rand(5, generator=generator)
        policy.observe(starts.int(), mass, ignore_from=7 * BLOCK)
        mass_sum *= decay
        observed *= decay
        mass_sum[pages] += mass[:4].double()
        observed[pages] += 1
    scores = policy.score(torch.arange(8) * BLOCK + 2)
    expected = torch.where(observed > 0, mass_sum / observed.clamp_min(1e-300), torch.inf)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
    assert scores[7] == torch.inf


def test_attention_mass_keeps_the_newest_share_by_age():
    policy = AttentionMass(recent_share=0.5).for_layer(BLOCK, "cpu")
    starts = torch.arange(6) * BLOCK + 2
    policy.observe(starts.int(), torch.tensor([0.9, 0.5, 0.1, 0.2, 0.05, 0.01]), ignore_from=1000)
    assert policy.pick_eviction(starts.tolist()) == 2  # the three newest are kept by age; then the least mass
    assert policy.pick_prefetches(starts.tolist(), 4) == [0, 3, 4, 5]


def test_a_policy_written_in_a_few_lines_drives_eviction():
    cache = cache_for(budget_gb=budget_for_pages(3, on_budget_full="evict"), on_budget_full="evict", policy=NewestFirst())
    keys, values = random_states(200, seed=1)
    for first in range(0, 200, 25):
        step(cache, keys[:, :, first:first + 25], values[:, :, first:first + 25])
    for layer in cache.layers:
        # each new page took the place of the newest one held: the two oldest stayed, beside the latest
        assert layer.warm.starts == [2, 2 + BLOCK, layer.recent_start - BLOCK]
        assert layer.evicted_tokens == 200 - 2 - layer.recent_count - 3 * BLOCK
    assert cache.stats()["evicted_tokens"] == cache.layers[0].evicted_tokens


@torch.no_grad()
def test_a_user_written_policy_object_drives_generate_through_attach():
    """The few-line policy passed to attach(policy=obj): every layer gets its own copy, its choices decide which pages
    generate() keeps, and what it evicts shows in stats()."""
    torch.manual_seed(0)
    model = kvtier_test_model()
    ids = torch.randint(0, 128, (2, 200))  # batch 2, as the budget's probe
    budget = budget_for_warm_pages(3, on_budget_full="evict")
    user_policy = NewestFirst()
    handle = kvtier.attach(model, **SMALL, budget_gb=budget, on_budget_full="evict", policy=user_policy)
    try:
        output = model.generate(ids, max_new_tokens=6, do_sample=False)
        layers, stats = handle.cache.layers, handle.stats()
    finally:
        kvtier.detach(model)
    assert output.shape[1] == 206
    for layer in layers:
        assert type(layer.policy) is NewestFirst and layer.policy is not user_policy
        # each new page took the place of the newest one held: the two oldest stayed, beside the latest
        assert layer.warm.starts == [2, 2 + BLOCK, layer.recent_start - BLOCK]
        assert layer.total_tokens == 205  # the last new token is not fed back
        assert layer.evicted_tokens == layer.total_tokens - 2 - layer.recent_count - 3 * BLOCK
    assert stats["evicted_tokens"] == layers[0].evicted_tokens > 0


def budget_for_pages(pages_per_layer, **overrides):
    probe = cache_for(**overrides)
    step(probe, *random_states(40, seed=0))
    warm = probe.layers[0].warm
    fixed = probe.hot_bytes + probe.scratch_bytes + probe.staging_bytes
    return (fixed + 2 * (pages_per_layer * warm.page_bytes + warm.table_bytes)) / 1024**3


# ------------------------------------------------------------------------------------------------ attention mass
def dense_page_mass(query, layer, scale, past_end, new_keys=None):
    """float64 reference: per warm page (by start) wholly before ``past_end``, the softmax weight of query
    (B, H_q, Q, D) over every cached token before ``past_end`` (and ``new_keys`` (B, H_kv, L, D) after them,
    causally), averaged over the query heads of each KV head and the query rows, summed over the batch and KV heads."""
    positions, keys, _ = every_cached_token(layer)
    keys = keys[:, :, positions < past_end].double()
    positions = positions[positions < past_end]
    past = keys.shape[2]
    rows = query.shape[2]
    mask = torch.ones(rows, past, dtype=torch.bool)
    if new_keys is not None:
        keys = torch.cat((keys, new_keys.double()), 2)
        mask = torch.cat((mask, torch.ones(rows, rows).tril().bool()), 1)
    group = query.shape[1] // keys.shape[1]
    scores = torch.einsum("bhqd,bhtd->bhqt", query.double() * scale, keys.repeat_interleave(group, 1))
    weights = scores.masked_fill(~mask, -torch.inf).softmax(-1)[..., :past]  # (B, H_q, Q, past)
    per_kv_head = weights.unflatten(1, (-1, group)).mean((2, 3))  # (B, H_kv, past)
    return {entry.start: per_kv_head[..., (positions >= entry.start) & (positions < entry.start + BLOCK)].sum().item()
            for entry in layer.warm.table if entry.start + BLOCK <= past_end}


@pytest.mark.parametrize("decode_kernel", ["torch", "triton"])
def test_decode_feeds_the_policy_the_pages_attention_mass(decode_kernel):
    """The kernel runs compiled where CUDA is, interpreted on the CPU elsewhere."""
    device = "cuda" if decode_kernel == "triton" and torch.cuda.is_available() else "cpu"
    cache = cache_for(policy=Recording(), on_budget_full="raise", decode_kernel=decode_kernel)
    keys, values = (states.to(device) for states in random_states(150, seed=2))
    step(cache, keys[:, :, :149], values[:, :, :149])
    for layer in cache.layers:
        layer.policy.seen.clear()
    views = step(cache, keys[:, :, 149:], values[:, :, 149:])
    query = torch.randn(2, 4, 1, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    for view in views:
        attend_tiers(view, query.to(device), None, 0.25)
        (seen,) = view.layer.policy.seen
        expected = dense_page_mass(query, view.layer, 0.25, past_end=150)
        assert seen.keys() == expected.keys() and len(seen) >= 7
        tolerance = 1e-5 if decode_kernel == "torch" else 2e-3  # the kernel rounds weights to float16
        for start, mass in seen.items():
            assert mass == pytest.approx(expected[start], rel=tolerance, abs=tolerance / 10)


def test_prefill_feeds_the_policy_mass_as_shares_of_the_whole_softmax():
    """A prefill chunk's queries attend the past pages and their own tokens: the pages' mass is their share of that
    whole softmax, not of the past alone."""
    cache = cache_for(policy=Recording(), on_budget_full="raise", query_tile=64)
    keys, values = random_states(170, seed=3)
    step(cache, keys[:, :, :150], values[:, :, :150])
    layer = cache.layers[0]
    layer.policy.seen.clear()
    view = cache.update(keys[:, :, 150:], values[:, :, 150:], 0)[0]
    query = torch.randn(2, 4, 20, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    attend_tiers(view, query, None, 0.25)
    expected = dense_page_mass(query, layer, 0.25, past_end=150, new_keys=keys[:, :, 150:])
    (seen,) = layer.policy.seen
    assert seen.keys() == expected.keys()
    for start, mass in seen.items():
        assert mass == pytest.approx(expected[start], rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------ precision rule
@pytest.mark.parametrize("low_key_bits, label", [(None, "turboquant-2bit"), (3, "turboquant-k3v2bit")])
def test_low_precision_pages_hold_the_lowest_scored_pages_and_attention_reads_them(low_key_bits, label):
    """With low_bits, a full warm share sends the policy's lowest page to TurboQuant at low_bits (keys at low_key_bits);
    attention over warm, low-precision and hot pages equals float64 attention over the same dequantized tokens."""
    budget = budget_for_pages(4, on_budget_full="evict")
    cache = cache_for(budget_gb=budget, low_bits=2, low_key_bits=low_key_bits, low_share=0.5, on_budget_full="evict")
    keys, values = random_states(261, seed=5)
    step(cache, keys[:, :, :260], values[:, :, :260])
    views = step(cache, keys[:, :, 260:], values[:, :, 260:])
    query = torch.randn(2, 4, 1, HEAD_DIM, generator=torch.Generator().manual_seed(6))
    stats = cache.stats()
    assert stats["low"]["tokens"] > 0 and stats["low"]["format"].startswith(label)
    for view in views:
        layer = view.layer
        assert min(layer.warm.starts) > max(layer.low.starts)  # sink+recent: the oldest pages went low
        positions = every_cached_token_with_low(layer)
        assert positions.tolist() == sorted(set(positions.tolist()))  # no token twice
        got = attend_tiers(view, query, None, 0.25)[:, 0]
        expected = dense_decode_with_low(query[:, :, 0], layer, 0.25)
        assert relative_error(got, expected) < FP32_RELATIVE
    assert cache.reserved_bytes <= cache.budget_bytes


@pytest.mark.parametrize("low_key_bits", [None, 3, 4])
def test_low_page_bytes_per_token_are_exactly_its_packed_fields(low_key_bits):
    """Low pages' bytes per token (every layer) against a hand count of their fields per KV head: key codes at
    low_key_bits (None: low_bits) and value codes at low_bits per channel, a float16 norm each, a float16 key mean per
    key group."""
    cache = cache_for(budget_gb=budget_for_pages(4, on_budget_full="evict"), low_bits=2, low_key_bits=low_key_bits,
                      on_budget_full="evict")
    step(cache, *random_states(40, seed=0))
    key_bits = low_key_bits or 2
    per_head = (key_bits + 2) * HEAD_DIM / 8 + 2 * 2 + 2 * HEAD_DIM / SMALL["key_group"]
    assert cache.stats()["low"]["bytes_per_token"] == len(cache.layers) * KV_HEADS * per_head  # a sequence's token


def every_cached_token_with_low(layer):
    positions, _, _ = every_cached_token(layer)
    low = [torch.arange(entry.start, entry.start + BLOCK) for entry in layer.low.table]
    return torch.cat([positions, *low]).sort().values


def dense_decode_with_low(query, layer, scale):
    """float64 attention over the hot and warm tokens (as test_cold_tier reads them) and the low-precision pages,
    dequantized independently of attention."""
    expected_positions, keys, values = every_cached_token(layer)
    fields = layer.low.read(layer.low.table)
    low_keys, low_values = layer.low.layout.format.dequantize(fields, torch.float32, None)  # (n, B, H, block, D)
    low_keys = low_keys.permute(1, 2, 0, 3, 4).flatten(2, 3) @ layer.rotation.T
    low_values = low_values.permute(1, 2, 0, 3, 4).flatten(2, 3) @ layer.rotation.T
    keys, values = torch.cat((keys, low_keys), 2).double(), torch.cat((values, low_values), 2).double()
    group = query.shape[1] // keys.shape[1]
    scores = torch.einsum("bhd,bhtd->bht", query.double() * scale, keys.repeat_interleave(group, 1))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values.repeat_interleave(group, 1))


def test_low_precision_pages_are_evicted_by_score_when_their_share_is_full():
    cache = cache_for(budget_gb=budget_for_pages(4, on_budget_full="evict"), low_bits=2, low_share=0.5, on_budget_full="evict")
    keys, values = random_states(600, seed=7)
    for first in range(0, 600, 50):
        step(cache, keys[:, :, first:first + 50], values[:, :, first:first + 50])
    for layer in cache.layers:
        held = len(layer.warm.table) + len(layer.low.table)
        assert layer.evicted_tokens > 0 and held * BLOCK + layer.evicted_tokens + layer.hot_tokens() == 600
        assert min(layer.low.starts) > 2 + layer.evicted_tokens - BLOCK  # the oldest pages left first
    assert cache.reserved_bytes <= cache.budget_bytes


# ------------------------------------------------------------------------------------------------ generate()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


def generate(model, ids, mask, new_tokens=20, **config):
    handle = kvtier.attach(model, **{**SMALL, **config})
    try:
        output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, prefill_chunk_size=64)
        return output, handle.stats()
    finally:
        kvtier.detach(model)


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_generate_with_topk_prefetch_of_every_page_matches_prefetching_all(device):
    """attention_mass scoring pages through a chunked prefill and decode, cold pages chosen by topk (all of them)."""
    torch.manual_seed(0)
    model = kvtier_test_model().to(device)
    ids = torch.randint(0, 128, (2, 300), device=device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    offload = dict(budget_gb=budget_for_warm_pages(2, device, chunk_pages=2), chunk_pages=2, policy="attention_mass")
    every, every_stats = generate(model, ids, mask, **offload)
    topk, topk_stats = generate(model, ids, mask, **offload, prefetch="topk", prefetch_share=1.0)
    assert topk_stats["cold"]["tokens"] > 200 and topk_stats["cold"]["prefetch"] == "topk"
    assert torch.equal(topk.sequences, every.sequences)
    same_codes = FP32_RELATIVE if device == "cpu" else KERNEL_RESPLIT_RELATIVE
    for got, expected in zip(topk.logits, every.logits):
        assert relative_error(got, expected) < same_codes


@torch.no_grad()
@pytest.mark.parametrize("low_key_bits", [None, 3])
def test_generate_with_low_precision_pages_matches_the_torch_reference(low_key_bits):
    """The precision rule through generate(): the Triton kernel (compiled on CUDA, interpreted on the CPU) reads the
    INT4 and TurboQuant 2-bit pages (keys at low_key_bits: two codebooks; two launches merged by log-sum-exp),
    against the torch reference reading the same pages."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = kvtier_test_model().to(device)
    ids = torch.randint(0, 128, (2, 200), device=device)
    mask = torch.ones_like(ids)
    config = dict(budget_gb=budget_for_warm_pages(4, device, on_budget_full="evict"), low_bits=2,
                  low_key_bits=low_key_bits, on_budget_full="evict", policy="attention_mass")
    kernel, stats = generate(model, ids, mask, 8, **config, decode_kernel="triton")
    reference, _ = generate(model, ids, mask, 8, **config, decode_kernel="torch")
    assert stats["low"]["tokens"] > 0 and stats["warm"]["tokens"] > 0
    for got, expected in zip(kernel.logits, reference.logits):
        assert relative_error(got, expected) < 1e-2  # the kernel rounds softmax weights to float16


def test_describe_names_each_tier_its_precision_and_the_policy():
    offloading = TierConfig(policy="attention_mass", prefetch="topk").describe().splitlines()
    assert offloading[0].startswith("hot  (device, model dtype): 4 sink tokens and the last 128 tokens")
    assert offloading[1].startswith("warm (device, int4)")
    assert offloading[2].startswith("cold (host, int4): the pages attention_mass demotes") and "topk (25%)" in offloading[2]
    rule = TierConfig(policy=NewestFirst(), low_bits=2, on_budget_full="evict").describe().splitlines()
    assert rule[2].startswith("low  (device, turboquant-2bit") and "NewestFirst scores lowest" in rule[2]
    assert rule[-1] == "full device budget: NewestFirst evicts" and not any(line.startswith("cold") for line in rule)


def test_a_config_prints_every_field_and_a_policy_object_by_its_settings():
    printed = str(TierConfig(policy=AttentionMass(decay=0.5), low_bits=2, low_share=0.25, on_budget_full="evict"))
    assert printed.startswith("TierConfig(budget_gb=2.0, sink_tokens=4, recent_window=128, block_size=64, warm_format=int4")
    assert "low_bits=2, low_key_bits=None, low_share=0.25, on_budget_full=evict" in printed
    assert "policy=AttentionMass(decay=0.5, recent_share=0.0)," in printed and "history" not in printed
    assert "policy='sink_recent'" in str(TierConfig())
