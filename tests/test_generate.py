"""kvtier through model.generate() on the real SmolLM2-135M-Instruct, against the dense cache."""

import pytest
import torch
from transformers import DynamicCache

import kvtier
from kvtier.compat import with_cache
from kvtier.eval import compare_decode, reference_text

# a config whose warm tier fills quickly, so short prompts exercise every tier
SMALL_WINDOW = dict(sink_tokens=4, recent_window=32, block_size=16)


def prompt(tokenizer, characters, offset=0):
    return tokenizer(reference_text()[offset:offset + characters], return_tensors="pt").input_ids


@torch.no_grad()
def test_within_hot_window_logits_equal_dense_every_step(attached):
    model, tokenizer, handle = attached
    ids = prompt(tokenizer, 300)  # well under sink + recent window
    assert ids.shape[1] + 8 < handle.config.sink_tokens + handle.config.recent_window
    dense, tiered = DynamicCache(), handle.new_cache()
    token = ids
    for _ in range(8):
        dense_logits = model(token, **with_cache(dense)).logits
        tiered_logits = model(token, **with_cache(tiered)).logits
        torch.testing.assert_close(tiered_logits, dense_logits, rtol=1e-5, atol=1e-4)
        token = dense_logits[:, -1:].argmax(-1)
    assert tiered.stats()["warm"]["tokens"] == 0


@torch.no_grad()
def test_generate_greedy_matches_dense_within_hot_window_and_detach_restores(smollm2):
    model, tokenizer = smollm2
    ids = prompt(tokenizer, 200)
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    handle = kvtier.attach(model, budget_gb=0.5)
    try:
        assert model.config._attn_implementation == "kvtier"
        tiered = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert isinstance(handle.cache, kvtier.TieredCache) and handle.stats()["tokens"] == ids.shape[1] + 11
    finally:
        kvtier.detach(model)
    assert torch.equal(tiered, dense)
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), dense)


@torch.no_grad()
def test_sampling_with_a_seed_matches_dense_within_hot_window(attached):
    model, tokenizer, handle = attached
    ids = prompt(tokenizer, 200, offset=5000)
    torch.manual_seed(7)
    tiered = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=50)
    torch.manual_seed(7)
    dense = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=50,
                           **with_cache(DynamicCache()))
    assert torch.equal(tiered, dense)


@torch.no_grad()
def test_warm_tier_decode_stays_close_to_dense(smollm2):
    model, tokenizer = smollm2
    handle = kvtier.attach(model, budget_gb=0.5, **SMALL_WINDOW)
    try:
        ids = prompt(tokenizer, 1500, offset=20000)
        report = compare_decode(model, ids, handle.new_cache(), steps=4)
        stats = handle.cache.stats()
    finally:
        kvtier.detach(model)
    assert stats["warm"]["tokens"] > 5 * stats["hot"]["tokens"]
    assert report.worst_mse < 0.1 and report.worst_top10 >= 0.8, report.summary()


@torch.no_grad()
def test_batch_with_left_padding_matches_each_row_alone(smollm2):
    """Two prompts of different lengths, left-padded into one batch: each row decodes as it does alone."""
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    texts = [reference_text()[30000:30900], reference_text()[60000:60400]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    handle = kvtier.attach(model, budget_gb=0.5, **SMALL_WINDOW)
    try:
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)
        assert handle.stats()["batch"] == 2 and handle.stats()["warm"]["tokens"] > 0
        alone = [model.generate(tokenizer(text, return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)
                 for text in texts]
    finally:
        kvtier.detach(model)
    dense = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, single in enumerate(alone):
        # the padded row's blocks sit at other offsets, so its codes differ; its greedy tokens must not drift far
        agree = (together[row, -8:] == single[0, -8:]).float().mean().item()
        dense_agree = (together[row, -8:] == dense[row, -8:]).float().mean().item()
        assert agree >= 0.75 and dense_agree >= 0.75, (row, agree, dense_agree)


@torch.no_grad()
def test_chunked_prefill_through_generate(smollm2):
    model, tokenizer = smollm2
    ids = prompt(tokenizer, 1200, offset=90000)
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    handle = kvtier.attach(model, budget_gb=0.5, **SMALL_WINDOW)
    try:
        chunked = model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=100)
        stats = handle.stats()
        # within the hot window chunking is exact
        short = ids[:, :30]
        assert torch.equal(model.generate(short, max_new_tokens=4, do_sample=False, prefill_chunk_size=7),
                           model.generate(short, max_new_tokens=4, do_sample=False))
    finally:
        kvtier.detach(model)
    assert stats["tokens"] == ids.shape[1] + 5 and stats["warm"]["tokens"] > 0
    assert (chunked[0, -6:] == dense[0, -6:]).float().mean() >= 0.8
