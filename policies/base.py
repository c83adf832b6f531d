"""The protocol every placement policy follows."""

from __future__ import annotations

from typing import Protocol, Sequence


class PlacementPolicy(Protocol):
    def victim(self, page_starts: Sequence[int]) -> int:
        """Index (into ``page_starts``, the warm block table in position order) of the page to leave first.

        Sinks and the recent window are hot and never appear here: only warm pages are candidates.
        """
        ...
