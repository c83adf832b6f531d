"""Placement policies: which warm page leaves the GPU first when the budget is full.

A policy is one small class behind :class:`PlacementPolicy`; :func:`make_policy` builds one by name.
"""

from __future__ import annotations

from .base import PlacementPolicy
from .sink_recent import SinkRecent

POLICIES: dict[str, type[PlacementPolicy]] = {"sink_recent": SinkRecent}


def make_policy(name: str) -> PlacementPolicy:
    return POLICIES[name]()


__all__ = ["POLICIES", "PlacementPolicy", "SinkRecent", "make_policy"]
