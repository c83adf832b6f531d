"""Fidelity gates: thresholds a cache configuration must meet at every decode step of a fidelity report.

A configuration passes only if each step passes: a pass at one step and a failure at the next is a
failure. Tests and benchmarks state their thresholds by building a gate; the gate names what failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .eval import FidelityReport


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
