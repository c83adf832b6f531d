"""Policies on the real model: SmolLM2-135M-Instruct, 2048-token pydoc windows, recent window 128, 4 decode steps,
prefilled 256 tokens at a time (so that attention_mass scores pages while the budget fills).

Targets (issue 5):
- with a warm budget that forces pages out (16 pages a layer of about 29: on_budget_full="evict"),
  attention_mass keeps the worst decode-logit MSE at or below sink_recent's for the same bytes;
- the precision rule (the pages attention_mass scores lowest drop to TurboQuant 2-bit values with 3-bit keys,
  low_key_bits=3: decode error comes mostly from keys; half of the pages keep INT4, 186 bytes a token and layer
  against INT4's 228, the 2-bit-keys rule's 174 and 2-bit's 120) passes MSE <= 0.25 and top-10 >= 0.8 at every
  step, where TurboQuant 2-bit on every page fails it.
benchmarks/policy_fidelity.py measures all 8 windows and passkey retrieval with topk prefetch
(results/policy-fidelity-cpu.md).
"""

import sys
from pathlib import Path

import pytest

from kvtier.eval import dense_reference, text_windows
from kvtier.gate import FidelityGate, run_gate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_fidelity import PRECISION_GATE, eviction_configs, precision_configs  # noqa: E402

CONTEXT, WINDOWS, STEPS, PREFILL_CHUNK = 2048, 8, 4, 256
EVICTION_WINDOWS = [0, 2, 4, 6]
PRECISION_WINDOWS = [4, 6]  # the two hardest: 4 came closest to the bound, 6 fails it with every page at INT4
LOW_KEY_BITS = 3  # the rule's low pages: 3-bit keys, 2-bit values (with 2-bit keys window 4 measured 0.2672)
NO_GATE = FidelityGate(max_logit_mse=float("inf"), min_top10_overlap=0.0, require_argmax=False)

pytestmark = pytest.mark.slow

# measured with benchmarks/policy_fidelity.py (results/policy-fidelity-cpu.md); kept as strict xfails so a fix shows up as XPASS
EVICTION_SHORTFALLS = {
    4: "attention_mass's worst MSE 0.542 against sink_recent's 0.526 (0.531 against 0.530 with one thread; 0.563 "
       "against 0.450 on another CPU); "
       "decays 0.1 to 1, recent shares 0 to 0.5, mass taken as the max over KV heads or over query heads, or from a "
       "chunk's last 32 rows measured 0.54 to 1.08 here, while choices that knew the decode's own attention reached "
       "0.18 to 0.31: prefill attention does not foretell what this window's decode reads (README, Policies)",
}

PRECISION_SHORTFALLS: dict[int, str] = {}  # none: window 4 failed with 2-bit keys in the low pages (worst MSE 0.2672 at
# rotation seed 0, 0.3089 at seed 1); with 3-bit keys it reads 0.0835 and 0.0345 (README, Policies)
# Passes on some CPUs and fails on others, with the same code and package versions (torch 2.13.0+cpu, transformers
# 5.24.0): window 6 read 0.1947 at worst when the rule got 3-bit keys (results/policy-fidelity-lowkeys-cpu.md) and
# passed CI at commit 58cd51f, but 0.2834 at step 1 on a 2-core Xeon with AVX-512 and AMX at that same commit (0.2667
# with MKL and oneDNN held to AVX2), and 0.2043 there once the rotation became one matrix product (other rounding):
# not strict, so that either outcome is reported, not hidden (README, Policies)
PRECISION_BY_MACHINE = {6: "window 6: worst MSE 0.1947 on one CPU, 0.2834 on another, same code (see above)"}


@pytest.fixture(scope="module")
def windows(smollm2):
    return text_windows(smollm2[1], CONTEXT, WINDOWS)


@pytest.fixture(scope="module")
def reference_of(smollm2, windows):
    references = {}

    def reference(window):
        if window not in references:
            references[window] = dense_reference(smollm2[0], windows[window], steps=STEPS)
        return references[window]

    return reference


@pytest.mark.parametrize("window", [
    pytest.param(index, marks=pytest.mark.xfail(strict=True, reason=EVICTION_SHORTFALLS[index]))
    if index in EVICTION_SHORTFALLS else index for index in EVICTION_WINDOWS
])
def test_attention_mass_keeps_mse_at_or_below_sink_recent_for_the_same_bytes(smollm2, windows, reference_of, window):
    model = smollm2[0]
    runs = {name: run_gate(model, [windows[window]], NO_GATE, steps=STEPS, references=[reference_of(window)],
                           prefill_chunk=PREFILL_CHUNK, **config)
            for name, config in eviction_configs(model, pages=16).items()}
    recent, mass = runs["sink_recent"], runs["attention_mass"]
    assert recent.stats[0]["evicted_tokens"] == mass.stats[0]["evicted_tokens"] > 512  # the same bytes, forced out
    assert mass.worst_mse <= recent.worst_mse, (
        f"attention_mass worst MSE {mass.worst_mse:.4f} > sink_recent's {recent.worst_mse:.4f} "
        f"(by {mass.worst_mse - recent.worst_mse:+.4f})")


@pytest.mark.parametrize("window", [
    pytest.param(index, marks=pytest.mark.xfail(strict=True, reason=PRECISION_SHORTFALLS[index]))
    if index in PRECISION_SHORTFALLS else
    pytest.param(index, marks=pytest.mark.xfail(strict=False, reason=PRECISION_BY_MACHINE[index]))
    if index in PRECISION_BY_MACHINE else index for index in PRECISION_WINDOWS
])
def test_precision_rule_passes_where_two_bits_everywhere_fail(smollm2, windows, reference_of, window):
    model = smollm2[0]
    configs = precision_configs(model, high_pages=15, context=CONTEXT, low_key_bits=LOW_KEY_BITS)
    results = {}
    for name in ("tq2-all", "rule-attention_mass"):
        config, _ = configs[name]
        results[name] = run_gate(model, [windows[window]], PRECISION_GATE, steps=STEPS,
                                 references=[reference_of(window)], prefill_chunk=PREFILL_CHUNK, **config)
    rule, everywhere = results["rule-attention_mass"], results["tq2-all"]
    stats = rule.stats[0]
    assert stats["low"]["tokens"] >= stats["warm"]["tokens"] > 0 and stats["evicted_tokens"] == 0  # half at 2 bits
    assert rule.passes, rule.failures
    assert not everywhere.passes, f"2-bit everywhere passed (worst MSE {everywhere.worst_mse:.4f})"
