"""H2O-style heavy hitters: pages that drew the most attention stay; those that drew the least leave first.

The score of a page is its decayed average attention mass per observation. At each attention call every page's
two sums decay (``mass *= decay``, ``observed *= decay``); each page the call read then adds the mass it drew to
``mass`` and 1 to ``observed``; the score is ``mass / observed``. Averaging, rather than summing as H2O does, keeps a
page that just became warm from looking cold next to pages that have been scored for thousands of steps. A page
never observed yet scores +inf: it stays until attention has seen it once. The mass comes from the decode
kernel's own per-page output (and the prefill's reference), never from a second attention pass.

Observations wait in a short list and are folded into the sums together (the same arithmetic, in a few tensor
operations instead of several per layer and step) when a decision needs the scores or the list grows long. A saved
session keeps ``history`` (folded first), so a loaded cache ranks its pages as the saved one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import PagePolicy

PENDING_ROWS = 16384  # observed page rows a layer keeps before folding them in


@dataclass
class AttentionMass(PagePolicy):
    decay: float = 0.3  # per attention call: the last few calls decide (measured best of 0.1-0.95, benchmarks/policy_fidelity.py)
    recent_share: float = 0.0  # the newest share of the candidates kept by age, as H2O keeps a recent window
    wants_mass: ClassVar[bool] = True
    state_names: ClassVar[tuple[str, ...]] = ("history",)
    block_size: int = field(default=0, repr=False)  # set per layer
    history: torch.Tensor | None = field(default=None, repr=False)  # (2, pages) by start // block_size: decayed
    # mass (row 0) and decayed observation count (row 1)
    pending: list = field(default_factory=list, repr=False)  # (starts, mass, ignore_from) not folded in yet
    pending_rows: int = field(default=0, repr=False)

    def __post_init__(self):
        if not 0 < self.decay <= 1 or not 0 <= self.recent_share < 1:
            raise ValueError(f"AttentionMass needs 0 < decay <= 1 and 0 <= recent_share < 1, got {self}.")

    def for_layer(self, block_size: int, device) -> "AttentionMass":
        policy = AttentionMass(self.decay, self.recent_share, block_size=block_size)
        policy.history = torch.zeros(2, 64, device=device)
        return policy

    def observe(self, starts: torch.Tensor, mass: torch.Tensor, ignore_from: int) -> None:
        self.pending.append((starts.clone(), mass, ignore_from))  # starts may view a page table that moves on
        self.pending_rows += starts.numel()
        if self.pending_rows >= PENDING_ROWS:
            self._fold()

    def state(self) -> dict[str, torch.Tensor]:
        self._fold()  # the pending observations are part of the history
        return super().state()

    def _fold(self) -> None:
        """Fold the pending observations in, oldest first: after k of them the sums have decayed by decay^k, and the
        i-th observation's mass by decay^(k-1-i)."""
        if not self.pending:
            return
        count = len(self.pending)
        starts = torch.cat([observed[0] for observed in self.pending]).long()  # (n,)
        mass = torch.cat([observed[1] for observed in self.pending]).float()  # (n,)
        lengths = torch.tensor([observed[0].numel() for observed in self.pending])
        limits = torch.tensor([observed[2] for observed in self.pending]).repeat_interleave(lengths)  # (n,)
        weights = (self.decay ** torch.arange(count - 1, -1, -1, dtype=torch.float64)).float().repeat_interleave(lengths)
        real = (starts < limits.to(starts.device)).float() * weights.to(starts.device)  # (n,): 0 for empty rows
        index = starts // self.block_size * (real > 0)  # 0 where not real (and adds nothing)
        self._grow(max(observed[2] for observed in self.pending) // self.block_size + 1)
        self.history.mul_(self.decay ** count).index_add_(1, index, torch.stack((mass, torch.ones_like(mass))) * real)
        self.pending, self.pending_rows = [], 0

    def score(self, starts: torch.Tensor) -> torch.Tensor:
        self._fold()
        index = starts.long().to(self.history.device) // self.block_size
        seen = index < self.history.shape[1]
        mass, observed = self.history[:, torch.where(seen, index, 0)] * seen  # (n,) each; 0 where never seen
        average = torch.where(observed > 0, mass / observed.clamp_min(1e-30), torch.inf)
        protected = int(self.recent_share * starts.numel())  # the newest candidates
        if protected:
            newest = starts.to(average.device).topk(protected).indices
            average[newest] = torch.inf
        return average

    def _grow(self, pages: int) -> None:
        """Room for ``pages`` page indices (doubling, so that growing costs O(1) per page)."""
        if pages <= self.history.shape[1]:
            return
        grown = self.history.new_zeros(2, max(pages, 2 * self.history.shape[1]))
        grown[:, :self.history.shape[1]] = self.history
        self.history = grown
