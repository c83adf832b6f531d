"""The decode step a CUDA graph replays (kvtier.graph) against the eager kvtier path, through generate().

On the CPU the graph's fixed-shape step runs uncaptured (``cuda_graph="uncaptured"``): the same static update, the
same device buffers, the same attention over them, and the same flushes between steps; it must give the eager path's
tokens and logits (float32: to 1e-5). On a GPU the captured graph is replayed and compared the same way (bf16, with
the kernel on both sides), with recaptures forced by a slab per page.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvtier
from kvtier.compat import with_cache
from kvtier.errors import NonFiniteStatesError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GROWING_PROMPT = 1050  # ~63 warm pages a layer after the prefill; the 65th, 40 steps later, doubles the page table
SMALL = dict(recent_window=32, block_size=16, key_group=16)


def small_model(device="cpu", dtype=torch.float32):
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         hidden_size=256, intermediate_size=512, vocab_size=500)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def padded_prompt(device="cpu", length=120):
    ids = torch.randint(1, 500, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    return ids, mask


@torch.no_grad()
def generate(model, ids, mask, cuda_graph, sample=False, **config):
    handle = kvtier.attach(model, cuda_graph=cuda_graph, **{"budget_gb": 0.5, **SMALL, **config})
    try:
        if sample:
            torch.manual_seed(3)
        result = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=sample, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
    finally:
        kvtier.detach(model)
    return result, handle.stats()


@pytest.mark.parametrize("warm_format", ["int4", "turboquant"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_static_step_matches_eager_generate(warm_format, sample):
    """40 decode steps (two block flushes each layer), batch 2 with left padding: the same tokens and logits."""
    model = small_model()
    ids, mask = padded_prompt()
    eager, _ = generate(model, ids, mask, "off", sample, warm_format=warm_format)
    static, stats = generate(model, ids, mask, "uncaptured", sample, warm_format=warm_format)
    graph = stats["graph"]
    assert graph["eager_steps"] == 1 and graph["eager_reason"] == "not a one-token decode step"  # the prefill only
    assert stats["warm"]["tokens"] > 120 - 4 - SMALL["recent_window"]  # more than the prefill stored: pages were
    # stored between static steps
    assert torch.equal(eager.sequences, static.sequences)
    for expected, got in zip(eager.logits, static.logits):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


COLD = dict(budget_gb=0.00178, host_budget_gb=0.1, chunk_pages=2, query_tile=16, key_tile=64)  # cold from the prefill
SMALL_RING = dict(COLD, chunk_pages=1, staging_chunks=2)  # fewer slots than a layer's cold chunks


@pytest.mark.parametrize("config, reason", [
    (dict(policy="attention_mass"), "attention mass"),
    (dict(COLD, prefetch="topk"), "prefetch='topk'"),
    (dict(COLD, cold_attention="host"), "cold_attention='host'"),
])
def test_steps_the_graph_cannot_serve_run_eagerly_and_say_why(config, reason):
    model = small_model()
    ids, mask = padded_prompt()
    eager, _ = generate(model, ids, mask, "off", **config)
    static, stats = generate(model, ids, mask, "uncaptured", **config)
    assert stats["graph"]["eager_steps"] == 40 and reason in stats["graph"]["eager_reason"]
    assert torch.equal(eager.sequences, static.sequences)


def test_static_step_over_cold_pages_matches_eager_generate():
    """Most pages cold, in more chunks a layer than the two-slot staging ring holds: the static step copies every
    layer's chunks within itself (no plan carried over from the step before) and gives the eager tokens and logits;
    pages demoted between static steps are copied from then on."""
    model = small_model()
    ids, mask = padded_prompt(length=200)
    eager, eager_stats = generate(model, ids, mask, "off", **SMALL_RING)
    static, stats = generate(model, ids, mask, "uncaptured", **SMALL_RING)
    assert stats["graph"]["eager_steps"] == 1  # the prefill only
    assert stats["cold"]["tokens"] == eager_stats["cold"]["tokens"] > 2 * SMALL["block_size"]  # more than the ring
    assert stats["cold"]["replans"] == 0 and 0 < stats["cold"]["moved_bytes"] <= eager_stats["cold"]["moved_bytes"]
    assert torch.equal(eager.sequences, static.sequences)
    for expected, got in zip(eager.logits, static.logits):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cold_pages_arriving_in_a_slab_keep_the_static_plan(monkeypatch):
    """A static step copies slab rows in multiples of 16, rows never written included (zeros, masked by position):
    pages demoted into the same slab during the decode leave what a captured step copies unchanged (no new capture),
    and the step still gives the eager tokens and logits."""
    from kvtier.graph import DecodeGraph

    plans, cold_tokens = [], []
    prepare = DecodeGraph.prepare

    def recording(graph, *args):
        prepare(graph, *args)
        plans.append(graph.buffers()[2])
        cold_tokens.append(graph.cache.layers[0].cold_tokens())
    monkeypatch.setattr(DecodeGraph, "prepare", recording)
    model = small_model()
    ids, mask = padded_prompt(length=200)
    config = dict(COLD, chunk_pages=64, staging_chunks=2)
    config["budget_gb"] = budget_for_warm_pages(model, 2, **config)
    eager, _ = generate(model, ids, mask, "off", **config)
    static, _ = generate(model, ids, mask, "uncaptured", **config)
    assert 0 < cold_tokens[0] < cold_tokens[-1]  # cold pages from the prefill, and more arrived during the decode
    assert len(set(plans)) == 1
    assert torch.equal(eager.sequences, static.sequences)
    for expected, got in zip(eager.logits, static.logits):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_nan_in_a_static_step_is_refused_and_the_cache_stays_usable():
    model = small_model()
    ids, mask = padded_prompt()
    handle = kvtier.attach(model, budget_gb=0.5, cuda_graph="uncaptured", **SMALL)
    poison = {"on": False}

    def inject(_module, _inputs, output):  # NaN keys in layer 1, in decode steps only, while switched on
        return output.fill_(float("nan")) if poison["on"] and output.shape[1] == 1 else output

    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(inject)
    try:
        first = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        cache = handle.cache
        held = cache.get_seq_length()
        poison["on"] = True
        with pytest.raises(NonFiniteStatesError, match=r"layers \[1\].*CUDA graph"):
            model.generate(first, attention_mask=torch.cat((mask, mask.new_ones(2, 3)), 1), **with_cache(cache),
                           max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert cache.get_seq_length() == held  # the refused step's token was not counted
        assert all(torch.isfinite(layer.hot_keys).all() for layer in cache.layers)
        poison["on"] = False
        model.generate(first, attention_mask=torch.cat((mask, mask.new_ones(2, 3)), 1), **with_cache(cache),
                       max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert cache.get_seq_length() == held + 2
    finally:
        hook.remove()
        kvtier.detach(model)


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("pages_per_slab", [16, 1])
def test_captured_graph_matches_eager_generate_on_cuda(pages_per_slab):
    """bf16 on the GPU, the Triton kernel on both sides; the page table grows during the decode (and with one slab a
    page, the slab base may move), so the graph is captured again, and every capture must read the moved buffers."""
    model = small_model("cuda", torch.bfloat16)
    ids, mask = padded_prompt("cuda", length=GROWING_PROMPT)
    eager, _ = generate(model, ids, mask, "off", pages_per_slab=pages_per_slab)
    graphed, stats = generate(model, ids, mask, "auto", pages_per_slab=pages_per_slab)
    graph = stats["graph"]
    assert graph["captured"] and graph["replays"] == 39 and graph["captures"] > 1  # the page table grew
    assert torch.equal(eager.sequences, graphed.sequences)
    for expected, got in zip(eager.logits, graphed.logits):
        assert (got - expected).norm() / expected.norm() < 1e-2


@pytest.mark.cuda
@NO_CUDA
def test_captured_graph_over_cold_pages_matches_eager_generate_on_cuda():
    """The graph copies each layer's cold chunks from pinned host slabs into the staging ring on the side stream, in
    more chunks than the ring holds; pages demoted during the decode fill new (one-page) slabs, so it captures again."""
    model = small_model("cuda", torch.bfloat16)
    ids, mask = padded_prompt("cuda", length=200)
    config = dict(SMALL_RING, budget_gb=budget_for_warm_pages(model, 2, **SMALL_RING))
    eager, eager_stats = generate(model, ids, mask, "off", **config)
    graphed, stats = generate(model, ids, mask, "auto", **config)
    graph = stats["graph"]
    assert graph["captured"] and graph["replays"] == 39 and graph["captures"] > 1, graph  # one-page slabs arrived
    assert stats["cold"]["tokens"] == eager_stats["cold"]["tokens"] > 2 * SMALL["block_size"], stats["cold"]
    assert stats["cold"]["moved_bytes"] > 0, stats["cold"]  # the replays count their copies
    assert_same_tokens_but_near_ties(eager, graphed)


def assert_same_tokens_but_near_ties(eager, graphed, rtol: float = 1e-2) -> None:
    """bf16 logits within ``rtol`` (relative norm) at every step up to and including the first token that differs, if
    any (greedy decoding then stood at a near-tie; the sequences part there, so later steps are not comparable). A
    replayed step attends cold chunks in launches of their own, an eager one joins the first to the warm pages: the
    same attention, rounded differently in bf16."""
    prompt = eager.sequences.shape[1] - len(eager.logits)
    for step, (expected, got) in enumerate(zip(eager.logits, graphed.logits)):
        assert (got - expected).norm() / expected.norm() < rtol, step
        if not torch.equal(eager.sequences[:, prompt + step], graphed.sequences[:, prompt + step]):
            return


def budget_for_warm_pages(model, pages: int, **config) -> float:
    """budget_gb for ``config`` (its own budget_gb aside) on this file's small pages: the cache's fixed bytes and
    ``pages`` warm pages a layer, at batch 2 (soak.budget_for_warm_pages)."""
    knobs = {name: value for name, value in {**SMALL, **config}.items() if name != "budget_gb"}
    return soak.budget_for_warm_pages(model, pages, **knobs)



def test_a_mask_with_a_hole_runs_eagerly():
    from kvtier.graph import attends_one_range

    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    assert attends_one_range(mask, 10) and attends_one_range(None, 10)
    mask[0, 5] = 0  # a hole in row 0: not a range, so the eager path (which reads the mask) must serve it
    assert not attends_one_range(mask, 10)
    assert not attends_one_range(torch.ones(2, 1, 1, 10), 10)  # a 4D mask


def test_a_growing_page_table_moves_what_the_graph_reads(monkeypatch):
    """The buffers a captured step reads (DecodeGraph.buffers) change when the page table grows between steps, so
    the graph is captured again there (the CUDA test above replays across it)."""
    from kvtier.graph import DecodeGraph

    seen = []
    prepare = DecodeGraph.prepare

    def recording(graph, *args):
        prepare(graph, *args)
        seen.append(graph.buffers())
    monkeypatch.setattr(DecodeGraph, "prepare", recording)
    model = small_model()
    ids, mask = padded_prompt(length=GROWING_PROMPT)
    _, stats = generate(model, ids, mask, "uncaptured", pages_per_slab=16)
    assert len(seen) == 39 and len(set(seen)) > 1
