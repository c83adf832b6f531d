"""Fidelity gates: thresholds a cache configuration must meet at every decode step of a fidelity report.

A configuration passes only if each step passes: a pass at one step and a failure at the next is a
failure. Tests and benchmarks state their thresholds by building a gate; the gate names what failed, and
:func:`run_gate` runs a configuration through it on several contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attach import attach, detach
from .eval import FidelityReport, compare_decode


@dataclass(frozen=True)
class FidelityGate:
    max_logit_mse: float = 0.1
    min_top10_overlap: float = 0.9
    require_argmax: bool = True  # the argmax must agree at every step
    max_attention_l2: float | None = None  # per-layer relative L2 of the attention output, if gated

    def __post_init__(self):
        if self.max_logit_mse < 0 or not 0 <= self.min_top10_overlap <= 1:
            raise ValueError(f"a gate needs max_logit_mse >= 0 and 0 <= min_top10_overlap <= 1, got {self}.")

    def failures(self, report: FidelityReport) -> list[str]:
        """One line per failed check and step, e.g. 'step 2: logit MSE 0.131 > 0.1'; empty when it passes."""
        if not report.steps:
            return ["no decode steps were measured"]
        found = []
        for index, step in enumerate(report.steps):
            if step.logit_mse > self.max_logit_mse:
                found.append(f"step {index}: logit MSE {step.logit_mse:.4g} > {self.max_logit_mse:g}")
            if step.top10_overlap < self.min_top10_overlap:
                found.append(f"step {index}: top-10 overlap {step.top10_overlap:.2f} < {self.min_top10_overlap:g}")
            if self.require_argmax and not step.argmax_agrees:
                found.append(f"step {index}: argmax differs from the dense cache's")
            worst_layer = max(step.attention_relative_l2, default=0.0)
            if self.max_attention_l2 is not None and worst_layer > self.max_attention_l2:
                found.append(f"step {index}: attention relative L2 {worst_layer:.4g} > {self.max_attention_l2:g}")
        return found

    def passes(self, report: FidelityReport) -> bool:
        return not self.failures(report)


@dataclass
class GateRun:
    """One configuration through a gate on several contexts: a report per context, and what failed where."""

    gate: FidelityGate
    reports: list[FidelityReport]
    stats: list[dict]  # the cache's stats after each context

    @property
    def failures(self) -> list[str]:
        return [f"context {index}, {line}" for index, report in enumerate(self.reports)
                for line in self.gate.failures(report)]

    @property
    def passes(self) -> bool:
        return not self.failures

    @property
    def worst_mse(self) -> float:
        return max(report.worst_mse for report in self.reports)

    @property
    def worst_top10(self) -> float:
        return min(report.worst_top10 for report in self.reports)


def run_gate(model, contexts, gate: FidelityGate, steps: int = 4, references=None, prefill_chunk: int | None = None,
             **config) -> GateRun:
    """Attach kvtier with ``config`` (TierConfig fields, budget_gb included), compare ``steps`` decode steps with the
    dense cache on each context (1, L) and judge every step with ``gate``. ``references`` (one DenseReference per
    context, see kvtier.eval.dense_reference) spare the dense runs when several configurations share contexts;
    ``prefill_chunk`` prefills in chunks, so that a mass-aware policy scores pages while the budget fills."""
    reports, stats = [], []
    for index, context in enumerate(contexts):
        handle = attach(model, **{"budget_gb": 1.0, **config})
        try:
            cache = handle.new_cache()
            reference = None if references is None else references[index]
            reports.append(compare_decode(model, context, cache, steps=steps, reference=reference,
                                          prefill_chunk=prefill_chunk))
        finally:
            detach(model)
        stats.append(cache.stats())
    return GateRun(gate, reports, stats)
