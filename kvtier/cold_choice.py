"""The per-step choice between streaming cold pages to the device and attending them on the host
(``cold_attention="auto"``).

The chooser times whole decode steps, in wall-clock time from the start of one to the start of the next (generate()
reads each step's logits before it starts the next, so that is the step's time), in either mode, and runs the
faster. Each mode is first tried ``trials`` times (the first host step also compiles the numba kernel, so a mode's
time is the least of its recent steps). Every ``recheck_every`` steps the other mode runs once more, because the
cold tier grows and the host's and the link's load change. What it chose and measured is in
``stats()["cold"]["attention"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("stream", "host")


@dataclass
class ColdAttentionChooser:
    trials: int = 2  # steps of each mode before the first choice; also the recent steps a mode's time is taken over
    recheck_every: int = 32  # steps on the faster mode between two runs of the other
    mode: str = "stream"  # the current step's
    step_started: float | None = None  # when the current decode step started (None: not timing)
    seconds: dict = field(default_factory=lambda: {mode: [] for mode in MODES})  # recent step times per mode
    steps: dict = field(default_factory=lambda: {mode: 0 for mode in MODES})  # decode steps run in each mode
    since_recheck: int = 0

    def start_step(self, now: float) -> str:
        """A decode step starts at ``now`` (seconds): time the one before it, and return this one's mode."""
        if self.step_started is not None:
            recent = self.seconds[self.mode]
            recent.append(now - self.step_started)
            del recent[:-self.trials]
        self.step_started = now
        self.mode = self._next_mode()
        self.steps[self.mode] += 1
        return self.mode

    def pause(self) -> None:
        """A step that is not a decode step (a prefill chunk) runs: the step before it is not timed."""
        self.step_started = None

    def step_seconds(self, mode: str) -> float | None:
        """The mode's time a step: the least of its recent steps, or None before its first."""
        return min(self.seconds[mode], default=None)

    def _next_mode(self) -> str:
        untried = [mode for mode in MODES if len(self.seconds[mode]) < self.trials]
        if untried:
            return untried[0]
        faster = min(MODES, key=self.step_seconds)
        self.since_recheck += 1
        if self.since_recheck > self.recheck_every:
            self.since_recheck = 0
            return MODES[1 - MODES.index(faster)]
        return faster

    def summary(self) -> dict:
        return {"current": self.mode, "steps": dict(self.steps),
                "step_ms": {mode: None if self.step_seconds(mode) is None else self.step_seconds(mode) * 1e3
                            for mode in MODES}}
