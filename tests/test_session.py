"""Session save and restore: a saved cache comes back page for page, continues generation token for token, and a
session that does not fit the model, dtype, configuration or its own checksums is refused with nothing left loaded.

References: the unsaved cache itself (its pages' bytes, its counters, its policy's state, its attention and its
continuation), a run that never saved, and float64 attention over every token read back from the restored tiers.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtier
from kvtier import BudgetExceededError, KVTierError, SessionCorruptError, SessionMismatchError, TierConfig, TieredCache
from kvtier import session
from kvtier.attention import attend_tiers
from kvtier.compat import with_cache
from kvtier.eval import reference_text
from kvtier.policies import AttentionMass, PagePolicy
from conftest import cuda_only
from test_disk import host_budget_gb as disk_host_budget_gb
from test_cold_tier import (FP32_RELATIVE, HEADS, HEAD_DIM, SMALL, budget_for_warm_pages, dense_decode,
                            every_cached_token, host_budget_for_slabs, kvtier_test_model, random_states,
                            relative_error, step)


def filled_cache(model, tokens=300, **overrides):
    """A cache of ``model``'s shape holding ``tokens`` random states: hot, 2 warm pages a layer (of its own warm
    format), the rest cold (or as ``overrides`` say), with the token ids it holds."""
    page_format = {name: overrides[name] for name in ("warm_format",) if name in overrides}
    config = {**SMALL, "budget_gb": budget_for_warm_pages(2, chunk_pages=2, **page_format), "chunk_pages": 2,
              **overrides}
    cache = TieredCache(TierConfig(**config), model.config)
    keys, values = random_states(tokens, seed=tokens)
    for first in range(0, tokens, 37):
        step(cache, keys[:, :, first:first + 37], values[:, :, first:first + 37])
    cache.token_ids = torch.randint(0, 128, (2, tokens))
    return cache


def assert_same_generation(unsaved, loaded):
    """Two generate() outputs (return_dict_in_generate, output_logits): the same tokens, logits within float32."""
    assert torch.equal(loaded.sequences, unsaved.sequences)
    for got, expected in zip(loaded.logits, unsaved.logits):
        assert relative_error(got, expected) < FP32_RELATIVE


def pages_of(cache):
    return [[(tier, start, data.clone()) for tier, start, data in layer.pages_in_order()] for layer in cache.layers]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return kvtier_test_model()


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("overrides", [
    {},  # hot, warm and cold pages
    {"on_host_full": "evict", "host_budget_gb": host_budget_for_slabs(1, 2)},  # and evicted tokens
    {"low_bits": 2, "on_budget_full": "evict",
     "budget_gb": budget_for_warm_pages(4, low_bits=2, on_budget_full="evict")},  # low-precision pages
    {"warm_format": "turboquant"},
    {"on_host_full": "disk", "host_budget_gb": disk_host_budget_gb(1, 2)},  # pages on disk too
])
def test_a_restored_cache_holds_the_same_pages_counters_and_attention(model, tmp_path, overrides):
    cache = filled_cache(model, **overrides)
    cache.save(tmp_path / "s")
    loaded = kvtier.load(tmp_path / "s", model, config=cache.config)
    tiers = {tier for layer in pages_of(cache) for tier, _, _ in layer}
    assert tiers >= {"hot", "warm"} and len(tiers) == 3 + (overrides.get("on_host_full") == "disk")  # and cold or
    # low pages (and disk pages)
    for original, restored in zip(pages_of(cache), pages_of(loaded)):
        assert [(tier, start) for tier, start, _ in original] == [(tier, start) for tier, start, _ in restored]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(original, restored))
    assert loaded.stats()["evicted_tokens"] == cache.stats()["evicted_tokens"]
    assert (cache.stats()["evicted_tokens"] > 0) == (overrides.get("on_host_full") == "evict" or "low_bits" in overrides)
    for name in ("tokens", "hot", "warm", "low"):
        assert loaded.stats()[name] == cache.stats()[name]
    for tier in ("cold", "disk"):
        assert loaded.stats()[tier]["tokens"] == cache.stats()[tier]["tokens"]
    assert loaded.reserved_bytes <= loaded.budget_bytes and torch.equal(loaded.token_ids, cache.token_ids)
    keys, values = random_states(1, seed=99)
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    for before, after in zip(step(cache, keys, values), step(loaded, keys, values)):
        got, expected = attend_tiers(after, query, None, 0.25), attend_tiers(before, query, None, 0.25)
        assert relative_error(got, expected) < FP32_RELATIVE
        assert after.layer.total_tokens == 301
        if after.layer.low is None and after.layer.disk is None:  # the float64 reference reads hot, warm, cold
            reference = dense_decode(query[:, :, 0], after.layer, 0.25, torch.zeros(2, dtype=torch.long))
            assert relative_error(got[:, 0], reference) < FP32_RELATIVE
            positions, _, _ = every_cached_token(after.layer)
            assert len(positions) + after.layer.evicted_tokens == 301


def test_save_needs_the_token_ids_the_cache_holds(model, tmp_path):
    cache = filled_cache(model)
    cache.token_ids = None
    with pytest.raises(KVTierError, match=r"needs the token ids the cache holds, \(batch 2, 300 tokens\); found none"):
        cache.save(tmp_path / "s")
    with pytest.raises(KVTierError, match=r"found shape \(2, 299\)"):
        cache.save(tmp_path / "s", token_ids=torch.zeros(2, 299, dtype=torch.long))
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    """A session saved through the attached handle after a generate() on a left-padded batch: (path, its config)."""
    torch.manual_seed(0)
    model = kvtier_test_model()  # the same weights as the model fixture's
    handle = kvtier.attach(model, **{**SMALL, "budget_gb": budget_for_warm_pages(2, chunk_pages=2), "chunk_pages": 2})
    ids = torch.randint(0, 128, (2, 200))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    path = tmp_path_factory.mktemp("saved") / "s"
    handle.save(path)
    kvtier.detach(model)
    assert json.loads((path / "manifest.json").read_text())["token_ids"] == out[:, :202].tolist()
    return path, handle.config


@pytest.fixture
def saved(saved_once, tmp_path):
    """A copy of the saved session, for a test to damage."""
    path, config = saved_once
    shutil.copytree(path, tmp_path / "s")
    return tmp_path / "s", config


def test_another_model_config_is_refused_naming_what_differs(saved):
    other = kvtier_test_model()
    other.config.rms_norm_eps = 1e-5
    with pytest.raises(SessionMismatchError, match=r"another model .*rms_norm_eps: saved 1e-06, this model 1e-05"):
        kvtier.load(saved[0], other)


def test_another_checkpoint_of_the_same_architecture_is_refused(saved):
    torch.manual_seed(1)
    with pytest.raises(SessionMismatchError, match=r"other weights \(embedding fingerprint"):
        kvtier.load(saved[0], kvtier_test_model())


def test_another_dtype_is_refused(saved, model):
    model.to(torch.bfloat16)
    with pytest.raises(SessionMismatchError, match=r"saved from a float32 model; this model is bfloat16.*float32"):
        kvtier.load(saved[0], model)


@pytest.mark.parametrize("field,value", [("warm_format", "turboquant"), ("block_size", 32), ("rotation_seed", 1),
                                         ("recent_window", 16)])
def test_a_config_that_changes_the_pages_is_refused(saved, model, field, value):
    path, saved_config = saved
    config = TierConfig(**{**SMALL, "budget_gb": saved_config.budget_gb, field: value})
    with pytest.raises(SessionMismatchError, match=rf"{field}: saved .*, now {value!r}.*saved values"):
        kvtier.load(path, model, config=config)


def test_another_format_version_is_refused(saved, model):
    path = saved[0]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 2  # a session saved before INT4 pages had one-byte key scale codes
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SessionMismatchError, match=r"session format version 2; this kvtier reads version 3.*Save the "
                                                   r"session again"):
        kvtier.load(path, model)


@pytest.mark.parametrize("damage,message", [
    ("flip", r"layer-001.bin does not match its checksum \(expected SHA-256 \w+, found \w+\)"),
    ("truncate", r"layer-001.bin holds [\d,]+ bytes, expected [\d,]+ \(truncated"),
    ("remove", r"layer-001.bin is missing"),
    ("manifest", r"manifest.json does not match its checksum"),
    ("json", r"manifest.json is not valid JSON"),
])
def test_a_damaged_session_is_refused(saved, model, damage, message):
    path = saved[0]
    layer_file, manifest_file = path / "layer-001.bin", path / "manifest.json"
    data = bytearray(layer_file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
        layer_file.write_bytes(bytes(data))
    elif damage == "truncate":
        layer_file.write_bytes(bytes(data[:-100]))
    elif damage == "remove":
        layer_file.unlink()
    elif damage == "manifest":  # a token id changed, the checksum not
        manifest_file.write_text(manifest_file.read_text().replace('"token_ids": [[', '"token_ids": [[1', 1))
    else:
        manifest_file.write_text(manifest_file.read_text()[:-10])
    with pytest.raises(SessionCorruptError, match=message):
        kvtier.load(path, model)


def test_a_load_that_does_not_fit_leaves_nothing_reserved(saved, model, monkeypatch):
    path = saved[0]
    built = []
    monkeypatch.setattr(session, "TieredCache", lambda *args, **kwargs: built.append(TieredCache(*args, **kwargs))
                        or built[-1])
    small = TierConfig(**{**SMALL, "budget_gb": budget_for_warm_pages(1, chunk_pages=2), "chunk_pages": 2})
    with pytest.raises(BudgetExceededError, match=r"layer 0's share of the warm budget is full after 1 pages"):
        kvtier.load(path, model, config=small)
    cache, = built
    assert cache.reserved_bytes == 0 and cache.host_budget.used_bytes == 0
    assert all(not layer.warm.slabs and not layer.cold.slabs for layer in cache.layers if layer.is_initialized)


def test_continuing_other_tokens_is_refused(saved, model):
    path, config = saved
    cache = kvtier.load(path, model)
    other = torch.cat((cache.token_ids, torch.ones(2, 3, dtype=torch.long)), 1)  # (2, 205)
    other[1, 150] = (other[1, 150] + 1) % 128
    kvtier.attach(model, config=config, budget_gb=config.budget_gb)
    try:
        with pytest.raises(KVTierError, match=r"holds \(2, 202\) tokens that input_ids \(2, 205\) do not start "
                                              r"with, first at row 1 position 150.*followed by the new tokens"):
            model.generate(other, **with_cache(cache), max_new_tokens=1)
    finally:
        kvtier.detach(model)


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only()])])
def test_continuation_after_a_load_matches_on_the_device(tmp_path, device):
    """The tiny model with most of a left-padded batch cold: on CUDA the pages go back to device slabs and pinned host
    slabs, and the continuation runs the Triton kernel over them."""
    torch.manual_seed(0)
    model = kvtier_test_model().to(device)
    ids = torch.randint(0, 128, (2, 300), device=device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    handle = kvtier.attach(model, **{**SMALL, "budget_gb": budget_for_warm_pages(2, device, chunk_pages=2),
                                     "chunk_pages": 2})
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert handle.stats()["cold"]["tokens"] > 150
        handle.save(tmp_path / "s")
        mask = torch.cat((mask, mask.new_ones(2, 3)), 1)
        results = [model.generate(out, attention_mask=mask, **with_cache(cache), max_new_tokens=10, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
                   for cache in (handle.cache, kvtier.load(tmp_path / "s", model))]
    finally:
        kvtier.detach(model)
    assert torch.equal(results[1].sequences, results[0].sequences)
    for got, expected in zip(results[1].logits, results[0].logits):
        assert relative_error(got, expected) < FP32_RELATIVE


# ------------------------------------------------------------------------------------------------ policy state
@torch.no_grad()
@pytest.mark.parametrize("policy", ["attention_mass", AttentionMass(decay=0.9)])
def test_continuation_after_a_load_evicts_as_a_run_that_never_saved(tmp_path, policy):
    """attention_mass with 3 warm pages a layer and on_budget_full="evict": the recent buffer is one token short of
    full at the save, so the first step after the load evicts the warm page its restored history scores lowest (a
    fresh history would pick another: the continuation's logits differ by 140%, and its tokens too). The
    continuation equals that of a run that never saved, token for token and logit for logit."""
    budget = budget_for_warm_pages(3, on_budget_full="evict")
    results = []
    for save in (False, True):
        torch.manual_seed(0)
        model = kvtier_test_model()
        ids = torch.randint(0, 128, (2, 200))
        handle = kvtier.attach(model, **{**SMALL, "budget_gb": budget, "on_budget_full": "evict", "policy": policy})
        try:
            out = model.generate(ids, max_new_tokens=2, do_sample=False)
            cache = handle.cache
            assert all(layer.recent_count == layer.recent_keys.shape[2] - 1 for layer in cache.layers)
            if save:
                handle.save(tmp_path / "s")
                cache = kvtier.load(tmp_path / "s", model)
                for saved, loaded in zip(handle.cache.layers, cache.layers):
                    assert torch.equal(loaded.policy.history, saved.policy.history)
            evicted = cache.stats()["evicted_tokens"]
            results.append(model.generate(out, **with_cache(cache), max_new_tokens=24, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True))
            assert cache.stats()["evicted_tokens"] > evicted  # the policy chose pages to drop after the load
        finally:
            kvtier.detach(model)
    assert_same_generation(*results)


class NewestFirstCounting(PagePolicy):
    """A policy of one's own that keeps state: how many page rows it has been shown, by page."""

    wants_mass = True
    state_names = ("shown",)

    def for_layer(self, block_size, device):
        policy = NewestFirstCounting()
        policy.block_size, policy.shown = block_size, torch.zeros(64, dtype=torch.int64, device=device)  # (pages,)
        return policy

    def observe(self, starts, mass, ignore_from):
        real = starts[starts < ignore_from].long() // self.block_size
        self.shown.index_add_(0, real, torch.ones_like(real))

    def score(self, starts):
        return -starts.double()


def test_a_policy_of_ones_own_gets_its_state_back_and_another_policy_starts_afresh(model, tmp_path):
    cache = filled_cache(model, policy=NewestFirstCounting())
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    for view in step(cache, *random_states(1, seed=5)):  # a decode step: attention shows the policy its pages
        attend_tiers(view, query, None, 0.25)
    cache.token_ids = torch.randint(0, 128, (2, 301))
    assert all(layer.policy.shown.sum() > 0 for layer in cache.layers)
    cache.save(tmp_path / "s")
    assert sorted(path.name for path in (tmp_path / "s").iterdir()) == [
        "layer-000.bin", "layer-001.bin", "manifest.json", "policy-000.bin", "policy-001.bin"]
    loaded = kvtier.load(tmp_path / "s", model, config=cache.config)
    for saved, restored in zip(cache.layers, loaded.layers):
        assert restored.policy.shown.dtype == torch.int64 and torch.equal(restored.policy.shown, saved.policy.shown)
    other = TierConfig(**{**dataclasses.asdict(cache.config), "policy": "attention_mass"})
    afresh = kvtier.load(tmp_path / "s", model, config=other)
    assert all(not layer.policy.history.any() for layer in afresh.layers)


def test_a_policy_state_of_other_tensors_is_refused_naming_them(model, tmp_path):
    cache = filled_cache(model, policy=NewestFirstCounting())
    cache.save(tmp_path / "s")
    NewestFirstCounting.state_names = ("shown", "kept")
    try:
        with pytest.raises(SessionMismatchError, match=r"NewestFirstCounting state of layer 0 holds \['shown'\]; "
                                                       r"this NewestFirstCounting keeps \['kept', 'shown'\]"):
            kvtier.load(tmp_path / "s", model, config=cache.config)
    finally:
        NewestFirstCounting.state_names = ("shown",)


# ------------------------------------------------------------------------------------------------ the real model
@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_generation_continued_after_a_load_matches_the_unsaved_cache(smollm2, tmp_path, batch):
    """SmolLM2 over 400 pydoc tokens with most warm pages cold: greedy continuation from the loaded cache
    equals continuation from the cache that was saved, token for token (batch 2: the second row left-padded)."""
    model, tokenizer = smollm2
    text = tokenizer(reference_text()[:40000], return_tensors="pt").input_ids[0]
    ids = torch.stack([text[:400], text[1000:1400]])[:batch]
    mask = torch.ones_like(ids)
    if batch == 2:
        ids[1, :70], mask[1, :70] = tokenizer.eos_token_id, 0  # left padding
    budget = smollm2_budget_for_warm_pages(model, 1, batch)
    handle = kvtier.attach(model, budget_gb=budget, chunk_pages=2)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        stats = handle.stats()
        assert stats["cold"]["tokens"] == 3 * 64 and stats["warm"]["tokens"] == 64
        handle.save(tmp_path / "s")
        mask = torch.cat((mask, mask.new_ones(batch, 2)), 1)
        results = []
        for cache in (handle.cache, kvtier.load(tmp_path / "s", model)):  # the saved one first, then its copy
            results.append(model.generate(out, attention_mask=mask, **with_cache(cache), max_new_tokens=4,
                                          do_sample=False, output_logits=True, return_dict_in_generate=True))
    finally:
        kvtier.detach(model)
    assert_same_generation(*results)


def smollm2_budget_for_warm_pages(model, pages, batch):
    """A budget_gb for SmolLM2 that holds the hot tiers, scratch, staging ring and ``pages`` warm pages a layer."""
    probe = kvtier.attach(model, budget_gb=1.0, chunk_pages=2)
    try:
        model.generate(torch.tensor([[1, 2, 3]] * batch), max_new_tokens=1, do_sample=False)
        cache = probe.cache
        warm = cache.layers[0].warm
        fixed = cache.hot_bytes + cache.scratch_bytes + cache.staging_bytes
        return (fixed + cache.num_layers * (pages * warm.page_bytes + warm.table_bytes_for(pages))) / 1024**3
    finally:
        kvtier.detach(model)


# ------------------------------------------------------------------------------------------------ properties
ROUND_TRIP = 0  # an operation: save the cache and continue with the loaded copy


@settings(max_examples=8, deadline=None)
@given(operations=st.lists(st.one_of(st.integers(1, 40), st.just(ROUND_TRIP)), min_size=2, max_size=10),
       warm_pages=st.integers(1, 3), host_slabs=st.integers(1, 3), seed=st.integers(0, 99))
def test_no_token_lost_or_changed_across_steps_evictions_and_save_load_round_trips(tmp_path_factory, operations,
                                                                                   warm_pages, host_slabs, seed):
    """Random prefill chunks (each followed by a decode step) and save/load round trips: after every operation each
    token is in exactly one tier or counted evicted, the budgets hold, attention equals float64 attention over the
    tiers' tokens, and a round trip changes no page's bytes and no counter."""
    model = kvtier_test_model()
    config = TierConfig(**{**SMALL, "budget_gb": budget_for_warm_pages(warm_pages, chunk_pages=2), "chunk_pages": 2,
                           "on_host_full": "evict", "host_budget_gb": host_budget_for_slabs(host_slabs, 2)})
    cache = TieredCache(config, model.config)
    keys, values = random_states(sum(operations) + len(operations), seed)
    query = torch.randn(2, HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    total, views = 0, []
    for operation in operations:
        if operation == ROUND_TRIP:
            if total == 0:
                continue
            path = tmp_path_factory.mktemp("session")
            cache.token_ids = torch.arange(2 * total).view(2, total)
            before = pages_of(cache)
            cache = kvtier.load(cache.save(path / "s"), model, config=config)
            for original, restored in zip(before, pages_of(cache)):
                assert [(tier, start) for tier, start, _ in original] == [(tier, start) for tier, start, _ in restored]
                assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(original, restored))
            assert torch.equal(cache.token_ids, torch.arange(2 * total).view(2, total))
        else:  # a prefill chunk, then one decode step
            step(cache, keys[:, :, total:total + operation], values[:, :, total:total + operation])
            total += operation
        views = step(cache, keys[:, :, total:total + 1], values[:, :, total:total + 1])
        total += 1
        for layer, view in zip(cache.layers, views):
            positions = every_cached_token(layer)[0].tolist()
            assert len(positions) == len(set(positions)) == total - layer.evicted_tokens  # each token once, or evicted
            assert layer.hot_tokens() + layer.warm_tokens() + layer.cold_tokens() + layer.evicted_tokens == total
            got = attend_tiers(view, query, None, 0.25)[:, 0]
            expected = dense_decode(query[:, :, 0], layer, 0.25, torch.zeros(2, dtype=torch.long))
            assert relative_error(got, expected) < FP32_RELATIVE
        assert cache.reserved_bytes <= cache.budget_bytes
        assert cache.host_budget.used_bytes <= cache.host_budget.limit_bytes
