"""On a CUDA device: the budget bounds the device bytes the allocator really hands out (tiers and scratch).

A random-weight model with Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head dim 128) in
bf16, two layers. Skipped without CUDA; run through the GPU machine.
"""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvtier
from kvtier import attention, layer
from kvtier.compat import with_cache

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ALLOCATOR_ROUNDING = 512  # the caching allocator rounds every block up to a multiple of this


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


class PeakRecorder:
    """Largest allocator growth inside the wrapped functions, over what was allocated on entry and beyond
    the tensor they return (the attention output, an activation the model needs whatever the cache)."""

    def __init__(self, monkeypatch):
        self.peak_growth = 0
        for owner, name in ((attention, "attend_tiers"), (layer.TieredLayer, "append")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, function):
        def measured(*args, **kwargs):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = function(*args, **kwargs)
            torch.cuda.synchronize()
            returned = result.nbytes if torch.is_tensor(result) else 0
            self.peak_growth = max(self.peak_growth, torch.cuda.max_memory_allocated() - before - returned)
            return result

        return measured


@torch.no_grad()
@pytest.mark.parametrize("batch,context,chunk,budget_gb", [(1, 6000, 2048, 0.04), (4, 3000, 1024, 0.14)])
def test_device_bytes_stay_within_budget(model, monkeypatch, batch, context, chunk, budget_gb):
    handle = kvtier.attach(model, budget_gb=budget_gb, on_budget_full="evict", key_tile=256, query_tile=64)
    try:
        ids = torch.randint(0, 1000, (batch, context), device="cuda")
        model(ids[:, :64], **with_cache(handle.new_cache()))  # cuBLAS takes its 32 MiB workspace on first use
        recorder = PeakRecorder(monkeypatch)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache = handle.new_cache()
        for first in range(0, context, chunk):  # chunked prefill, then decode
            model(ids[:, first:first + chunk], **with_cache(cache), logits_to_keep=1)
        for _ in range(80):
            model(ids[:, :1], **with_cache(cache), logits_to_keep=1)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
    finally:
        kvtier.detach(model)
    stats = cache.stats()
    print(f"batch {batch}: held {held:,} B, peak scratch {recorder.peak_growth:,} B of {cache.scratch_bytes:,} estimated")
    assert stats["evicted_tokens"] > 0  # the budget was the limit
    # per layer: hot keys, values and page table, rotation and its signs, warm offsets, positions and base
    # placeholder, slabs
    tensors = sum(8 + len(each.warm.slabs) for each in cache.layers) + len(cache.workspace.buffers)
    kept_scratch = cache.workspace.nbytes  # the decode kernel's workspace stays allocated between steps
    assert held <= cache.reserved_bytes - cache.scratch_bytes + kept_scratch + tensors * ALLOCATOR_ROUNDING
    assert recorder.peak_growth <= cache.scratch_bytes, (recorder.peak_growth, cache.scratch_bytes)
    assert cache.reserved_bytes <= cache.budget_bytes


@torch.no_grad()
def test_bf16_logits_match_dense_within_hot_window(model):
    ids = torch.randint(0, 1000, (2, 100), device="cuda")
    handle = kvtier.attach(model, budget_gb=0.5)
    try:
        tiered_cache, dense_cache = handle.new_cache(), DynamicCache()
        tiered = model(ids, **with_cache(tiered_cache)).logits.float()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            dense = model(ids, **with_cache(dense_cache)).logits.float()
    finally:
        kvtier.detach(model)
    relative = (tiered - dense).norm() / dense.norm()
    assert relative < 1e-2, relative.item()
