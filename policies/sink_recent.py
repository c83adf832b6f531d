"""StreamingLLM-style static window: keep the sinks and the recent window; of the rest, the oldest page goes first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import PagePolicy


@dataclass
class SinkRecent(PagePolicy):
    def score(self, starts: torch.Tensor) -> torch.Tensor:
        return starts.double()  # newer pages score higher

    def _lowest(self, starts: Sequence[int]) -> int:  # the same choice as the scores', without building a tensor
        if not starts:
            raise ValueError("no page to choose from")
        return starts.index(min(starts))  # min and index run in C
