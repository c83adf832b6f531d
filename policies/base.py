"""The protocol every page policy follows, and the base class that owns its plumbing.

A policy scores pages; the base class turns scores into the cache's decisions: which warm page leaves the GPU
(``pick_demotion``; ``pick_demotions`` for a run of new pages), which page leaves the cache when every budget is full
(``pick_eviction``, ``pick_evictions``), which cold pages a ``prefetch="topk"`` step streams back
(``pick_prefetches``) and, under a precision rule, which warm pages drop to fewer bits (the lowest scores, like
demotions). A new policy is a subclass whose body is one ``score()``:

    @dataclass
    class NewestFirst(PagePolicy):
        def score(self, starts):
            return -starts.double()  # the oldest pages score highest, so the newest leave first

Every layer gets its own copy (``for_layer``), so a policy may keep per-layer state. A policy that sets
``wants_mass`` is fed, through ``observe``, the attention mass the decode kernel (and the prefill's reference)
measured for each page it read. A policy whose state should survive a saved session (kvtier.session) names its
tensor attributes in ``state_names``; ``state()`` and ``load_state()`` here carry them to the files and back.
"""

from __future__ import annotations

import copy
import itertools
from typing import ClassVar, Sequence

import torch


class PagePolicy:
    wants_mass: ClassVar[bool] = False  # True: attention computes per-page mass and calls observe()
    state_names: ClassVar[tuple[str, ...]] = ()  # tensor attributes a saved session keeps (none: it restarts)

    def score(self, starts: torch.Tensor) -> torch.Tensor:
        """starts (n,) integer first positions of candidate pages -> (n,) float: higher is more worth keeping."""
        raise NotImplementedError(f"{type(self).__name__} must define score(starts)")

    def observe(self, starts: torch.Tensor, mass: torch.Tensor, ignore_from: int) -> None:
        """starts (n,) pages one attention call read, mass (n,) float32 the softmax weight each received (summed
        over batch rows and KV heads). Rows whose start is ``ignore_from`` or beyond carry no page that attention saw
        whole (empty staging rows; pages a prefill chunk filled with its own tokens), and no mass."""

    def for_layer(self, block_size: int, device) -> "PagePolicy":
        """A fresh copy for one layer of a cache whose pages hold ``block_size`` tokens on ``device``."""
        return copy.deepcopy(self)

    # ---------------------------------------------------------------- state, for saved sessions
    def state(self) -> dict[str, torch.Tensor]:
        """This layer's copy's state: each attribute ``state_names`` lists, as a tensor on the CPU ({} for a policy
        that keeps none). A policy that defers work (observations not folded in yet) finishes it first."""
        return {name: getattr(self, name).detach().cpu() for name in self.state_names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`state` returned, into a copy ``for_layer`` made: each tensor replaces its attribute,
        copied to that attribute's device and dtype."""
        if sorted(state) != sorted(self.state_names):
            raise ValueError(f"{type(self).__name__} keeps the state {sorted(self.state_names)}; got "
                             f"{sorted(state)}. Restore it from what state() of the same policy returned.")
        for name in self.state_names:
            current = getattr(self, name)
            setattr(self, name, state[name].to(current.device, current.dtype, copy=True)
                    if isinstance(current, torch.Tensor) else state[name].clone())

    # ---------------------------------------------------------------- decisions, from the scores
    def pick_demotion(self, starts: Sequence[int]) -> int:
        """Index into ``starts`` (the warm pages) of the page to move off the GPU (or to fewer bits) first."""
        return self._lowest(starts)

    def pick_eviction(self, starts: Sequence[int]) -> int:
        """Index into ``starts`` (warm or cold pages) of the page to drop from the cache first."""
        return self._lowest(starts)

    def pick_demotions(self, starts: Sequence[int], arriving: Sequence[int]) -> list[int]:
        """Indices into ``starts`` (the warm pages) of pages to move off the GPU at once to make room for the new
        pages at ``arriving``, the first to leave first: the ones that storing the new pages one by one, each after
        a :meth:`pick_demotion`, would move, up to the first of those calls that would pick a new page (none, if
        the first would; the cache then stores that page alone)."""
        return self._picks_before_arrivals(starts, arriving, PagePolicy.pick_demotion, "pick_demotion")

    def pick_evictions(self, starts: Sequence[int], arriving: Sequence[int]) -> list[int]:
        """Indices into ``starts`` of pages to drop from the cache at once for the new pages at ``arriving``, as
        :meth:`pick_demotions` picks with :meth:`pick_eviction`."""
        return self._picks_before_arrivals(starts, arriving, PagePolicy.pick_eviction, "pick_eviction")

    def pick_prefetches(self, starts: Sequence[int], count: int) -> list[int]:
        """Indices into ``starts`` (the cold pages) of the ``count`` pages worth streaming back, in index order."""
        if count >= len(starts):
            return list(range(len(starts)))
        chosen = self.score(torch.tensor(starts)).topk(count).indices
        return sorted(chosen.tolist())

    def _lowest(self, starts: Sequence[int]) -> int:
        if not starts:
            raise ValueError("no page to choose from")
        return int(self.score(torch.tensor(starts)).argmin())

    def _picks_before_arrivals(self, starts: Sequence[int], arriving: Sequence[int], one_pick, name: str) -> list[int]:
        """The lowest scores of ``starts`` and ``arriving`` scored together (equal scores in index order, as argmin
        breaks ties), lowest first, up to the first that is an arriving page, at most ``len(arriving)``. While the
        pages leave one by one and the new ones come in, each one-at-a-time pick is then the next of these, for a
        score that does not depend on the other candidates. A subclass that decides one pick its own way (overrides
        ``name`` alone) gets none: its pages are stored one by one."""
        if getattr(type(self), name) is not one_pick:
            return []
        order = torch.sort(self.score(torch.tensor([*starts, *arriving])), stable=True).indices[:len(arriving)]
        return list(itertools.takewhile(lambda index: index < len(starts), order.tolist()))


__all__ = ["PagePolicy"]
