"""StreamingLLM-style static window: keep the sinks and the recent window, drop the oldest warm page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class SinkRecent:
    def victim(self, page_starts: Sequence[int]) -> int:
        if not page_starts:
            raise ValueError("no warm page to choose from")
        return page_starts.index(min(page_starts))  # the oldest page (min and index run in C)
