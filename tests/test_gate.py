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
