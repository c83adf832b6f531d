"""Policies on the real model: SmolLM2-135M-Instruct, 2048-token pydoc windows, recent window 128, 4 decode steps,
prefilled 256 tokens at a time (so that attention_mass scores pages while the budget fills).

Targets (issue 5):
- with a warm budget that forces demotion (16 warm pages a layer of about 29; the rest demoted to the host tier,
  prefetch="topk" streaming back the 25% of them the policy ranks highest each decode step), attention_mass keeps the
  worst decode-logit MSE at or below sink_recent's for the same bytes; and, a stricter case, when the pages past
  the budget are dropped (on_budget_full="evict") while the prompt is prefilled;
- the precision rule (once the INT4 pages fill their share, the pages attention_mass scores lowest drop to TurboQuant
  2-bit values and low_key_bits keys) passes MSE <= 0.25 and top-10 >= 0.8 at every step, where TurboQuant 2-bit on
  every page fails it: as a 4/2-bit split (2-bit keys, 20 of 30 pages a layer at INT4, 188 bytes a token and layer)
  and with 3-bit keys in the low pages (decode error comes mostly from keys; 15 of 30 at INT4, 183 bytes), against
  INT4's 222 on every page and 2-bit's 120.
benchmarks/policy_fidelity.py measures all 8 windows and passkey retrieval with topk prefetch
(results/policy-fidelity-cpu.md), and the comparisons over rotation seeds (results/policy-fidelity-seeds-cpu.md).
"""

import functools
import sys
from pathlib import Path

import pytest

from kvtier import TierConfig
from kvtier.eval import dense_reference, text_windows
from kvtier.gate import FidelityGate, run_gate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_fidelity import PRECISION_GATE, eviction_configs, precision_configs, topk_configs  # noqa: E402

CONTEXT, WINDOWS, STEPS, PREFILL_CHUNK = 2048, 8, 4, 256
COMPARED_WINDOWS = [0, 2, 4, 6]
SAME_BYTES = {"demotion": topk_configs, "eviction": eviction_configs}  # the pages past 16 a layer: to the host, or out
# Over rotation seeds 0-4 (results/policy-fidelity-seeds-cpu.md) attention_mass is at or below sink_recent on average
# on all 8 windows when demoting (38 of 40 runs); when evicting, on 6 of 8, with window 6 even (3 of 5 seeds, mean
# +0.0003: its seed-0 pass here is one draw) and window 4 above (the strict xfail below)
PRECISION_WINDOWS = [4, 6]  # the two hardest for the rule in the runs below and earlier ones
RULES = {"4-2-bit": (20, 2), "keys-3-bit": (15, 3)}  # INT4 pages a layer (of 30), the low pages' key bits
# Over rotation seeds 0-2 on all 8 windows each rule passes 23 of 24 runs (results/policy-fidelity-4-2-seeds-cpu.md,
# policy-fidelity-lowkeys-seeds-cpu.md): the 4/2-bit split misses window 6 at seed 2 (0.4066), the 3-bit-key rule
# window 4 at seed 2 (0.2527); INT4 on every page reads 0.1297 and 0.0027 there (policy-fidelity-int4-seeds-cpu.md)
NO_GATE = FidelityGate(max_logit_mse=float("inf"), min_top10_overlap=0.0, require_argmax=False)

pytestmark = pytest.mark.slow

# measured with benchmarks/policy_fidelity.py (results/policy-fidelity-cpu.md); strict xfails, so a fix shows as XPASS
SHORTFALLS = {
    ("eviction", 4): "attention_mass's worst MSE 0.563 against sink_recent's 0.450 (0.542 against 0.526 on another "
       "CPU); above it at 9 of 10 rotation seeds, by +0.085 on average (policy-fidelity-seeds-window4-cpu.md), so not "
       "a rounding accident. Decays 0.1 to 1, recent shares 0 to 0.5, mass as the max over KV heads or query heads, or "
       "from a chunk's last 32 rows measured 0.54 to 1.08, while choices that knew the decode's own attention reached "
       "0.18 to 0.31: prefill attention does not foretell what this window's decode reads (README, Policies)",
}


@pytest.fixture(scope="module")
def windows(smollm2):
    return text_windows(smollm2[1], CONTEXT, WINDOWS)


@pytest.fixture(scope="module")
def reference_of(smollm2, windows):
    return functools.cache(lambda window: dense_reference(smollm2[0], windows[window], steps=STEPS))


@pytest.mark.parametrize("part, window", [
    pytest.param(part, index, marks=pytest.mark.xfail(strict=True, reason=SHORTFALLS[part, index]))
    if (part, index) in SHORTFALLS else (part, index) for part in SAME_BYTES for index in COMPARED_WINDOWS
])
def test_attention_mass_keeps_mse_at_or_below_sink_recent_for_the_same_bytes(smollm2, windows, reference_of, part,
                                                                             window):
    model = smollm2[0]
    runs = {name: run_gate(model, [windows[window]], NO_GATE, steps=STEPS, references=[reference_of(window)],
                           prefill_chunk=PREFILL_CHUNK, **config)
            for name, config in SAME_BYTES[part](model, pages=16).items()}
    recent, mass = runs["sink_recent"], runs["attention_mass"]
    off_device = [run.stats[0]["evicted_tokens"] + run.stats[0]["cold"]["tokens"] for run in (recent, mass)]
    assert off_device[0] == off_device[1] > 512  # the same bytes on the device, the rest forced off it
    assert mass.worst_mse <= recent.worst_mse, (
        f"attention_mass worst MSE {mass.worst_mse:.4f} > sink_recent's {recent.worst_mse:.4f} "
        f"(by {mass.worst_mse - recent.worst_mse:+.4f})")


@pytest.fixture(scope="module")
def two_bits_everywhere(smollm2, windows, reference_of):
    config, _ = precision_configs(smollm2[0], high_pages=15, context=CONTEXT)["tq2-all"]
    return functools.cache(lambda window: run_gate(smollm2[0], [windows[window]], PRECISION_GATE, steps=STEPS,
                                                   references=[reference_of(window)], prefill_chunk=PREFILL_CHUNK,
                                                   **config))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("window", PRECISION_WINDOWS)
def test_precision_rule_passes_where_two_bits_everywhere_fail(smollm2, windows, reference_of, two_bits_everywhere,
                                                              window, rule):
    model = smollm2[0]
    high_pages, low_key_bits = RULES[rule]
    config, _ = precision_configs(model, high_pages, context=CONTEXT, low_key_bits=low_key_bits)["rule-attention_mass"]
    run = run_gate(model, [windows[window]], PRECISION_GATE, steps=STEPS, references=[reference_of(window)],
                   prefill_chunk=PREFILL_CHUNK, **config)
    stats = run.stats[0]
    assert stats["warm"]["tokens"] == high_pages * TierConfig().block_size  # the rest at low bits, nothing evicted
    assert stats["low"]["tokens"] > 0 and stats["evicted_tokens"] == 0
    assert run.passes, run.failures
    everywhere = two_bits_everywhere(window)
    assert not everywhere.passes, f"2-bit everywhere passed (worst MSE {everywhere.worst_mse:.4f})"
