"""What kvtier refuses, and that each refusal says what it found and what to do."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import kvtier
from kvtier import BudgetExceededError, BudgetTooSmallError, KVTierError, NonFiniteStatesError, UnsupportedModelError
from kvtier.compat import with_cache


def tiny_llama(head_dim=16, **overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("field,value,message", [
    ("budget_gb", -1.0, "budget_gb must be positive"),
    ("warm_format", "int3", "unknown warm_format 'int3'"),
    ("on_budget_full", "ignore", "unknown on_budget_full"),
    ("policy", "lru", "unknown policy 'lru'"),
    ("block_size", 7, "block_size must be an even number"),
    ("key_axis", "head", "unknown key_axis"),
    ("key_group", 24, r"key_group must be >= 1 and divide block_size \(64\)"),
    ("turboquant_bits", 5, r"turboquant_bits must be one of \(2, 3, 4\), got 5"),
    ("host_budget_gb", -2.0, "host_budget_gb must be positive"),
    ("on_host_full", "spill", "unknown on_host_full 'spill'"),
    ("prefetch", "top", r"unknown prefetch 'top'; choose one of \('all', 'topk'\)"),
    ("prefetch_share", 0.0, r"prefetch_share must be in \(0, 1\]"),
    ("low_bits", 1, r"low_bits must be one of \(2, 3, 4\) \(or None\), got 1"),
    ("chunk_pages", 0, "chunk_pages must be >= 1"),
    ("cold_attention", "disk", "unknown cold_attention 'disk'"),
    ("staging_chunks", 1, r"staging_chunks must be >= 2"),
])
def test_bad_configuration_is_refused(field, value, message):
    overrides = {field: value}
    budget = overrides.pop("budget_gb", 1.0)
    with pytest.raises(ValueError, match=message):
        kvtier.attach(tiny_llama(), budget_gb=budget, **overrides)


@pytest.mark.parametrize("overrides,message", [
    ({"prefetch": "topk", "cold_attention": "host"}, r"prefetch='topk' chooses which cold pages stream.*Choose one"),
    ({"prefetch": "topk", "cold_attention": "auto"}, r"with cold_attention='auto' cold pages may be attended on"),
    ({"low_bits": 2}, r"low_bits .* does not combine with the host tier yet: attach with on_budget_full='evict'"),
    ({"low_bits": 2, "on_budget_full": "evict", "rotate": False}, r"low_bits re-quantizes.*keep rotate=True"),
    ({"low_bits": 2, "on_budget_full": "evict", "low_share": 1.0}, r"low_share must be in \(0, 1\), got 1.0"),
    ({"low_bits": 2, "on_budget_full": "evict", "low_key_bits": 5},
     r"low_key_bits must be one of \(2, 3, 4\) \(or None\), with low_bits set; got low_key_bits=5, low_bits=2"),
    ({"low_key_bits": 3}, r"low_key_bits must be .* with low_bits set; got low_key_bits=3, low_bits=None"),
])
def test_conflicting_options_are_refused_with_advice(overrides, message):
    with pytest.raises(ValueError, match=message):
        kvtier.attach(tiny_llama(), budget_gb=1.0, **overrides)


def test_turboquant_without_rotation_is_refused_with_advice():
    with pytest.raises(ValueError, match=r"turboquant.*keep rotate=True, or choose warm_format='int4'"):
        kvtier.attach(tiny_llama(), budget_gb=1.0, warm_format="turboquant", rotate=False)


def test_turboquant_needs_a_head_dim_of_whole_bytes():
    model = tiny_llama(head_dim=20)  # 20 channels do not fill whole bytes of bit planes
    kvtier.attach(model, budget_gb=1.0, warm_format="turboquant")
    try:
        with pytest.raises(KVTierError, match=r"head dim 20 is not a multiple of 8.*warm_format='int4'"):
            model.generate(torch.randint(0, 128, (1, 8)), max_new_tokens=1, do_sample=False)
    finally:
        kvtier.detach(model)


def test_sliding_window_model_is_refused():
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(UnsupportedModelError, match=r"sliding_attention.*full-attention layers only"):
        kvtier.attach(MistralForCausalLM(config), budget_gb=1.0)


def test_model_without_attention_interface_is_refused():
    class OwnAttention(LlamaForCausalLM):
        _supports_attention_backend = False

    model = OwnAttention(tiny_llama().config)
    with pytest.raises(UnsupportedModelError, match="does not route attention through transformers' AttentionInterface"):
        kvtier.attach(model, budget_gb=1.0)


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        kvtier.attach(model, budget_gb=1.0)


def test_odd_head_dim_is_refused():
    # RoPE models cannot have odd head dims, so the states are fed to the cache directly
    config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    cache = kvtier.TieredCache(kvtier.TierConfig(budget_gb=0.1, rotate=False), config)
    states = torch.randn(1, 2, 3, 15)
    with pytest.raises(KVTierError, match="head dim 15 is odd"):
        cache.update(states, states, 0)


def test_rotation_needs_a_power_of_two_head_dim():
    model = tiny_llama(head_dim=24)
    kvtier.attach(model, budget_gb=0.1)
    with pytest.raises(ValueError, match="rotate=False"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_non_power_of_two_head_dim_works_without_rotation():
    model = tiny_llama(head_dim=24)
    ids = torch.randint(0, 128, (1, 60))
    dense = model.generate(ids, max_new_tokens=3, do_sample=False)
    kvtier.attach(model, budget_gb=0.1, rotate=False, sink_tokens=2, recent_window=4, block_size=4)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == dense.shape


def test_budget_smaller_than_the_hot_window():
    model = tiny_llama()
    kvtier.attach(model, budget_gb=1e-5)
    with pytest.raises(BudgetTooSmallError, match=r"budget_gb=1e-05 .* cannot hold the hot window"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_full_budget_raises_during_generate_naming_budget_and_context():
    model = tiny_llama()
    small = dict(sink_tokens=2, recent_window=8, block_size=4, key_tile=8, query_tile=4, pages_per_slab=1,
                 on_budget_full="raise")
    probe = kvtier.attach(model, budget_gb=0.1, **small)
    model.generate(torch.randint(0, 128, (1, 20)), max_new_tokens=1)
    warm = probe.cache.layers[0].warm
    fixed = probe.cache.hot_bytes + probe.cache.scratch_bytes
    table_bytes = warm.table_bytes_for(10) or warm.table_bytes  # the device table that ten pages need
    room_for_ten_pages = fixed + 2 * (10 * warm.page_bytes + table_bytes)
    kvtier.detach(model)
    budget_gb = room_for_ten_pages / 1024**3
    handle = kvtier.attach(model, budget_gb=budget_gb, **small)
    with pytest.raises(BudgetExceededError, match=r"budget of .* GB .* is full at \d+ tokens of context"):
        model.generate(torch.randint(0, 128, (1, 40)), max_new_tokens=30, min_new_tokens=30)
    assert handle.cache.reserved_bytes <= handle.cache.budget_bytes
    assert handle.stats()["warm"]["tokens"] == 40  # ten pages of four tokens, all the budget holds


def test_attach_twice_and_detach_unattached():
    model = tiny_llama()
    kvtier.attach(model, budget_gb=1.0)
    with pytest.raises(ValueError, match="already attached"):
        kvtier.attach(model, budget_gb=1.0)
    kvtier.detach(model)
    with pytest.raises(ValueError, match="not attached"):
        kvtier.detach(model)


def test_crop_is_refused_with_advice():
    model = tiny_llama()
    handle = kvtier.attach(model, budget_gb=0.1)
    cache = handle.new_cache()
    model(torch.tensor([[1, 2, 3]]), **with_cache(cache))
    with pytest.raises(NotImplementedError, match="kvtier.detach"):
        cache.crop(1)


# ------------------------------------------------------------------------------------------------ bad states
def states_cache(**overrides):
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return kvtier.TieredCache(kvtier.TierConfig(budget_gb=0.1, sink_tokens=2, recent_window=8, block_size=16,
                                                **overrides), config)


@pytest.mark.parametrize("which,bad", [("keys", float("nan")), ("values", float("inf")), ("keys", -float("inf"))])
def test_non_finite_states_are_refused_naming_layer_and_positions(which, bad):
    cache = states_cache()
    states = torch.randn(2, 2, 10, 16)
    cache.update(states, states, 1)
    keys, values = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    (keys if which == "keys" else values)[1, 0, 5:9, 3] = bad
    with pytest.raises(NonFiniteStatesError, match=rf"layer 1 got {which} with NaN or Inf at positions 15..18 \(batch "
                                                   r"rows \[1\]\); nothing was stored.*bfloat16 or float32"):
        cache.update(keys, values, 1)
    layer = cache.layers[1]
    assert layer.total_tokens == layer.hot_tokens() == 10 and not layer.warm.table  # the chunk left no trace


def test_nan_weights_are_refused_during_generate_and_the_check_can_be_turned_off():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[3, 0] = float("nan")
    kvtier.attach(model, budget_gb=0.1)
    with pytest.raises(NonFiniteStatesError, match=r"layer 1 got values with NaN or Inf at positions 0..5 \(batch "
                                                   r"rows \[0\]\)"):
        model.generate(torch.randint(0, 128, (1, 6)), max_new_tokens=2)
    kvtier.detach(model)
    kvtier.attach(model, budget_gb=0.1, check_finite=False)
    model.generate(torch.randint(0, 128, (1, 6)), max_new_tokens=2)  # NaN logits, but no refusal
    kvtier.detach(model)


@pytest.mark.parametrize("keys,values,message", [
    (torch.randn(2, 10, 16), torch.randn(2, 10, 16), r"got keys \(2, 10, 16\).*one shape \(batch, kv_heads, tokens"),
    (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 6, 16), r"values \(1, 2, 6, 16\).*one floating dtype and one shape"),
    (torch.ones(1, 2, 5, 16, dtype=torch.int32), torch.ones(1, 2, 5, 16, dtype=torch.int32), r"torch.int32.*floating"),
    (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16, dtype=torch.float64), r"torch.float32.*torch.float64.*one "),
])
def test_malformed_states_are_refused(keys, values, message):
    with pytest.raises(KVTierError, match=message):
        states_cache().update(keys, values, 0)


@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 2, 3, 8), torch.float32, r"keys \(1, 2, 3, 8\).*it holds batch 1, 2 KV heads, head dim 16, torch.float32"),
    ((3, 2, 3, 16), torch.float32, r"keys \(3, 2, 3, 16\).*holds batch 1.*Start a new cache"),
    ((1, 2, 3, 16), torch.bfloat16, r"torch.bfloat16.*it holds .*torch.float32"),
])
def test_states_unlike_the_layers_are_refused(shape, dtype, message):
    cache = states_cache()
    cache.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0)
    states = torch.randn(shape).to(dtype)
    with pytest.raises(KVTierError, match=message):
        cache.update(states, states, 0)
    assert cache.layers[0].total_tokens == 4


def test_check_finite_must_be_a_bool():
    with pytest.raises(ValueError, match="check_finite must be True or False, got 'yes'"):
        kvtier.TierConfig(check_finite="yes")


def test_huge_finite_states_whose_sum_overflows_are_not_refused():
    cache = states_cache()
    states = torch.full((1, 2, 4, 16), 3e38)  # finite, but their float32 sum is inf
    cache.update(states, states, 0)
    assert cache.layers[0].total_tokens == 4

