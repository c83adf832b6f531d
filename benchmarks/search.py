"""The longest context that fits: doubling, then bisection, over a probe that says whether n tokens fit.

The probe is assumed monotone (if n tokens fit, fewer do too). The search stops early at an upper limit of tokens
or a time limit, and says so: the answer is then "at least" the longest context that fitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


class ProbeTimeout(Exception):
    """A probe ran past the search's time limit before it could say whether its context fits."""


@dataclass
class CapacityResult:
    max_tokens: int  # the longest context that fitted (0: not even the first one)
    first_failure: int | None  # the shortest context that did not fit (None: none failed)
    status: str  # "bisected", "upper limit" (everything up to it fitted), "time limit", or "none fit"
    probes: list[tuple[int, bool, float]] = field(default_factory=list)  # (tokens, fitted, seconds)

    @property
    def at_least(self) -> bool:
        """The search stopped before it found where the cache stops fitting."""
        return self.status in ("upper limit", "time limit")

    def summary(self) -> dict:
        return {"max_tokens": self.max_tokens, "first_failure": self.first_failure, "status": self.status,
                "at_least": self.at_least, "probes": [list(probe) for probe in self.probes]}


def find_capacity(fits: Callable[[int], bool], start: int, limit: int, resolution: float = 0.05, granule: int = 1,
                  time_limit_s: float = float("inf"), clock: Callable[[], float] = time.monotonic) -> CapacityResult:
    """Double from ``start`` until ``fits`` says no (or ``limit`` is reached), then bisect until the gap between the
    longest context that fitted and the shortest that did not is at most ``resolution`` of the former (and at most
    ``granule`` tokens, the step bisection midpoints are rounded to). ``fits`` may raise :class:`ProbeTimeout`."""
    began = clock()
    probes: list[tuple[int, bool, float]] = []

    def probe(tokens: int) -> bool | None:
        """True/False, or None when the time limit is spent (before or during the probe)."""
        if clock() - began > time_limit_s:
            return None
        started = clock()
        try:
            fitted = fits(tokens)
        except ProbeTimeout:
            return None
        probes.append((tokens, fitted, clock() - started))
        return fitted

    fitted_most, failed_least = 0, None
    tokens = start
    while failed_least is None:  # doubling
        fitted = probe(tokens)
        if fitted is None:
            return CapacityResult(fitted_most, None, "time limit", probes)
        if not fitted:
            failed_least = tokens
            break
        fitted_most = tokens
        if tokens >= limit:
            return CapacityResult(fitted_most, None, "upper limit", probes)
        tokens = min(2 * tokens, limit)
    if fitted_most == 0:
        return CapacityResult(0, failed_least, "none fit", probes)
    while failed_least - fitted_most > max(granule, resolution * fitted_most):  # bisection
        middle = (fitted_most + failed_least) // 2 // granule * granule
        if middle <= fitted_most:
            break
        fitted = probe(middle)
        if fitted is None:
            return CapacityResult(fitted_most, failed_least, "time limit", probes)
        if fitted:
            fitted_most = middle
        else:
            failed_least = middle
    return CapacityResult(fitted_most, failed_least, "bisected", probes)
