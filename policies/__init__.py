"""Page policies: which warm page leaves the GPU first, which page leaves the cache, which cold pages come back.

A policy is one small class behind :class:`PagePolicy`; :func:`make_policy` builds one by name, or takes a
policy object as it is.
"""

from __future__ import annotations

from .attention_mass import AttentionMass
from .base import PagePolicy
from .sink_recent import SinkRecent

POLICIES: dict[str, type[PagePolicy]] = {"sink_recent": SinkRecent, "attention_mass": AttentionMass}


def make_policy(policy: "str | PagePolicy") -> PagePolicy:
    """A policy by name (see POLICIES) with its default settings, or the given policy object."""
    return POLICIES[policy]() if isinstance(policy, str) else policy


def policy_name(policy: "str | PagePolicy") -> str:
    """How messages and descriptions name a policy given by name or by object."""
    return policy if isinstance(policy, str) else type(policy).__name__


__all__ = ["POLICIES", "AttentionMass", "PagePolicy", "SinkRecent", "make_policy", "policy_name"]
