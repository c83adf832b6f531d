"""Fidelity gates on the real model: SmolLM2-135M-Instruct, 2048-token pydoc windows, recent window 128.

Targets (issue 2, INT4 warm): on each of 8 evenly spaced windows and 4 decode steps, decode-logit MSE against
the dense cache at most 0.10, top-10 overlap at least 0.9, argmax agreement 100%. Warm bytes per token with
scales at most 0.3 of bf16's.
Targets (issue 6, TurboQuant warm): 3-bit keys and values with the QJL bit on keys, worst MSE at most 0.25 and
top-10 overlap at least 0.9; 4-bit, worst MSE at most 0.05 (window 6 misses both: see TURBOQUANT_SHORTFALLS).
"""

import pytest
import torch

import kvtier
from kvtier.eval import compare_decode, dense_reference, text_windows
from kvtier.gate import FidelityGate

CONTEXT = 2048
WINDOWS = 8
STEPS = 4
GATE = FidelityGate(max_logit_mse=0.10, min_top10_overlap=0.9, require_argmax=True)
MAX_WARM_BYTES_RATIO = 0.3

pytestmark = pytest.mark.slow

# One of the 8 windows misses a gate at the default configuration, measured with benchmarks/fidelity.py over
# rotation seeds (noise realizations); it stays in the sweep as a strict xfail so a fix shows up as XPASS.
# Window 6 passes at the default seed (worst MSE 0.060, top-10 0.9) since pages store one-byte key scale codes, but
# not at seeds 1 and 2 (MSE 0.322; 0.126 and top-10 0.8): benchmarks/results/fidelity-int4-scale-codes-seeds-cpu.md.
# With float16 scales it failed at all three (MSE 0.118, 0.180 at seeds 0, 1; top-10 0.8 at each; fidelity-cpu.md).
SHORTFALLS = {
    3: "argmax: the dense top-2 logits are ~0.003 apart at one step; the INT4 tier flips it at the default "
       "rotation seed (1 of 3 seeds in benchmarks/results/fidelity-int4-scale-codes-seeds-cpu.md, as with float16 "
       "scales in fidelity-cpu.md), and an FP8 (e4m3) warm tier flipped it too in an offline check: no lossy warm "
       "tier is sure to hold 100% here",
}


@pytest.fixture(scope="module")
def windows(smollm2):
    _, tokenizer = smollm2
    return text_windows(tokenizer, CONTEXT, WINDOWS)


@pytest.fixture(scope="module")
def dense_reference_of(smollm2, windows):
    """window index -> the dense cache's prefill and STEPS greedy decode steps on that window, computed on first
    use and shared by the window's INT4 and TurboQuant cases. The dense run never sees the cache under test
    (SDPA reads its DynamicCache whatever kvtier config is attached), so every case gets exactly the reference
    compare_decode would otherwise recompute: one dense 2048-token prefill per window instead of three."""
    model, _ = smollm2
    references = {}

    def reference(window):
        if window not in references:
            references[window] = dense_reference(model, windows[window], steps=STEPS)
        return references[window]

    return reference


@pytest.mark.parametrize("window", [
    pytest.param(index, marks=pytest.mark.xfail(strict=True, reason=SHORTFALLS[index])) if index in SHORTFALLS
    else index for index in range(WINDOWS)
])
def test_int4_warm_tier_stays_close_to_dense(smollm2, windows, dense_reference_of, window):
    model, _ = smollm2
    handle = kvtier.attach(model, budget_gb=1.0, recent_window=128)
    try:
        cache = handle.new_cache()
        report = compare_decode(model, windows[window], cache, steps=STEPS, shared_prefill=True,
                                reference=dense_reference_of(window))
    finally:
        kvtier.detach(model)
    stats = cache.stats()
    assert stats["warm"]["tokens"] >= CONTEXT - 128 - 64 - handle.config.sink_tokens  # the context is mostly warm
    summary = {name: round(value, 4) for name, value in report.summary().items()}
    assert GATE.passes(report), (GATE.failures(report), summary)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_warm_bytes_per_token_at_most_three_tenths_of_bf16(smollm2, head_dim):
    model, _ = smollm2
    config = kvtier.TierConfig()
    cache = kvtier.TieredCache(config, model.config)
    keys = torch.randn(1, cache.kv_heads, config.hot_capacity, head_dim, dtype=torch.bfloat16)
    for layer in cache.layers:
        layer.update(keys, keys.clone())  # one block leaves the hot tier: one warm page per layer
    stats = cache.stats()
    warm_per_head = stats["warm"]["bytes_per_token"] / (cache.num_layers * cache.kv_heads)  # stats: all layers, heads
    bf16_per_head = 2 * head_dim * torch.bfloat16.itemsize  # keys and values
    assert stats["warm"]["tokens"] == config.block_size
    assert warm_per_head / bf16_per_head <= MAX_WARM_BYTES_RATIO, (warm_per_head, bf16_per_head)


# Issue 6: TurboQuant warm pages (rotation, Lloyd-Max codes, keys centered per key group, QJL bit on keys at its
# min-MSE scale, the default).
TURBOQUANT = {  # name: (TierConfig fields, gate)
    "3bit+qjl": (dict(turboquant_bits=3, turboquant_qjl=True, turboquant_qjl_estimator="min_mse"),
                 FidelityGate(max_logit_mse=0.25, min_top10_overlap=0.9, require_argmax=False)),
    "4bit+qjl": (dict(turboquant_bits=4, turboquant_qjl=True, turboquant_qjl_estimator="min_mse"),
                 FidelityGate(max_logit_mse=0.05, min_top10_overlap=0.0, require_argmax=False)),
}
# The sweep runs the default rotation seed (0). Over seeds 0-2 (benchmarks/results/fidelity-turboquant-minmse-cpu.md)
# window 6 fails both gates at every seed, and the 4-bit gate also fails window 1 at seed 2 (MSE 0.0504); the other
# windows pass at every seed. Why window 6 fails: benchmarks/results/turboquant-diagnosis-cpu-window6.md.
TURBOQUANT_SHORTFALLS = {
    ("3bit+qjl", 6): "MSE: window 6 reaches worst decode-logit MSE 0.29/0.67/0.42 (top-10 0.9) at rotation seeds "
                     "0/1/2 (benchmarks/results/fidelity-turboquant-minmse-cpu.md), over the bar at 9 of 10 seeds "
                     "(turboquant-seeds-cpu-window6.md); window 6 tolerates key errors of about 0.08 of the centered "
                     "key norm, 3-bit codes and the sign bit leave 0.143 (turboquant-diagnosis-cpu-window6.md)",
    ("4bit+qjl", 6): "MSE: window 6 reaches worst decode-logit MSE 0.13/0.27/0.15 at rotation seeds 0/1/2 "
                     "(benchmarks/results/fidelity-turboquant-minmse-cpu.md); the keys alone, values exact, read "
                     "0.055-0.508 over 10 seeds (turboquant-seeds-cpu-window6.md); INT4 (4.63 bits) reaches "
                     "0.060/0.322/0.126 there at seeds 0/1/2 (fidelity-int4-scale-codes-seeds-cpu.md)",
}


@pytest.mark.parametrize("name, window", [
    pytest.param(name, index, marks=pytest.mark.xfail(strict=True, reason=TURBOQUANT_SHORTFALLS[name, index]))
    if (name, index) in TURBOQUANT_SHORTFALLS else (name, index)
    for name in TURBOQUANT for index in range(WINDOWS)
])
def test_turboquant_warm_tier_stays_close_to_dense(smollm2, windows, dense_reference_of, name, window):
    model, _ = smollm2
    settings, gate = TURBOQUANT[name]
    handle = kvtier.attach(model, budget_gb=1.0, recent_window=128, warm_format="turboquant", **settings)
    try:
        cache = handle.new_cache()
        report = compare_decode(model, windows[window], cache, steps=STEPS, shared_prefill=True,
                                reference=dense_reference_of(window))
    finally:
        kvtier.detach(model)
    assert cache.stats()["warm"]["tokens"] >= CONTEXT - 128 - 64 - handle.config.sink_tokens
    summary = {key: round(value, 4) for key, value in report.summary().items()}
    assert gate.passes(report), (gate.failures(report), summary)
