"""The fidelity gate checks every step: one bad step fails the configuration, and the gate says which."""

import re

import pytest

from kvtier.eval import FidelityReport, StepFidelity
from kvtier.gate import FidelityGate


def report(*steps):
    return FidelityReport([StepFidelity(mse, top10, argmax, [l2]) for mse, top10, argmax, l2 in steps])


GOOD = (0.02, 1.0, True, 0.05)


def test_every_step_within_thresholds_passes():
    assert FidelityGate().passes(report(GOOD, GOOD, GOOD))


@pytest.mark.parametrize("bad, reason", [
    ((0.2, 1.0, True, 0.05), r"step 1: logit MSE 0\.2 > 0\.1"),
    ((0.02, 0.8, True, 0.05), r"step 1: top-10 overlap 0\.80 < 0\.9"),
    ((0.02, 1.0, False, 0.05), r"step 1: argmax differs"),
])
def test_one_failing_step_between_passing_ones_fails_and_is_named(bad, reason):
    gate = FidelityGate()
    failures = gate.failures(report(GOOD, bad, GOOD))
    assert not gate.passes(report(GOOD, bad, GOOD))
    assert len(failures) == 1
    assert re.search(reason, failures[0]), failures


def test_thresholds_are_arguments():
    loose = FidelityGate(max_logit_mse=0.25, min_top10_overlap=0.8, require_argmax=False)
    assert loose.passes(report((0.2, 0.8, False, 0.05)))
    assert not FidelityGate(max_attention_l2=0.01).passes(report(GOOD))


def test_an_empty_report_fails_and_bad_thresholds_are_refused():
    assert FidelityGate().failures(FidelityReport()) == ["no decode steps were measured"]
    with pytest.raises(ValueError, match="min_top10_overlap"):
        FidelityGate(min_top10_overlap=1.5)


def test_run_gate_judges_every_context_and_names_the_failing_one():
    """On a tiny random Llama: the hot window holds every token of the first context (dense-exact), while the
    second context's oldest tokens are evicted; a strict gate fails only the second, and says so."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtier.gate import run_gate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    contexts = [torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 300))]
    strict = FidelityGate(max_logit_mse=1e-8, min_top10_overlap=1.0, require_argmax=True)
    run = run_gate(model, contexts, strict, steps=2, prefill_chunk=64, budget_gb=0.000224, recent_window=32,
                   block_size=16, key_tile=64, query_tile=16, on_budget_full="evict", policy="attention_mass")
    assert len(run.reports) == 2 and all(len(report.steps) == 2 for report in run.reports)
    assert run.stats[0]["evicted_tokens"] == 0 < run.stats[1]["evicted_tokens"]
    assert not run.passes and all(line.startswith("context 1, step") for line in run.failures), run.failures
    assert run.worst_mse == run.reports[1].worst_mse > 1e-8


def test_run_gate_fails_a_configuration_that_passes_one_step_and_fails_the_next():
    """A context two tokens short of the hot tier's capacity: the first decode step attends only hot tokens (the
    dense cache's own values: it passes a strict gate), the second completes a page that goes to INT4 (it does not).
    One passing step does not make the configuration pass."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtier import TierConfig
    from kvtier.gate import run_gate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    config = dict(recent_window=32, block_size=16, key_tile=64, query_tile=16)
    context = torch.randint(0, 128, (1, TierConfig(**config).hot_capacity - 2))
    strict = FidelityGate(max_logit_mse=1e-8, min_top10_overlap=1.0, require_argmax=True)
    run = run_gate(model, [context], strict, steps=3, **config)
    first, *later = run.reports[0].steps
    assert strict.passes(FidelityReport([first])) and not strict.passes(FidelityReport(later))
    assert run.stats[0]["warm"]["tokens"] == 16  # the page the second step completed
    assert not run.passes and run.failures[0].startswith("context 0, step 1: logit MSE")
