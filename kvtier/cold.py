"""The cold tier of one layer: warm pages moved byte for byte into host memory.

A cold page keeps its :class:`~kvtier.pages.PageLayout` bytes, so PCIe moves packed codes, never dense
ones. Host memory comes in slabs of ``chunk_pages`` rows (pinned when a CUDA device is present, so that copies
run asynchronously), never one allocation per page, and is paid for out of the host budget first. Beside each
slab's pages lies an int32 array of each row's first token position, ``FREE_POSITION`` for an empty row: a
whole slab moves to the device in two copies, and attention masks its empty rows by position.

Pinned slabs come from :mod:`kvtier.pinned`, not from torch's caching host allocator: each slab is one mapping of
whole pages (its rows, then its positions) that the host budget pays for exactly, and that goes back to the system
when the slab is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import ByteBudget
from .errors import AllocationError
from .pages import NoRoomForPage, PageLayout, adjacent_runs
from .pinned import host_zeros, mapped_bytes

FREE_POSITION = 1 << 30  # past every real position; a page's last token (+ block) still fits in int32


def rows_bytes(rows: int, page_bytes: int) -> int:
    """Bytes of ``rows`` host rows of ``page_bytes`` and their int32 positions."""
    return rows * (page_bytes + 4)


def host_rows(rows: int, page_bytes: int, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` zeroed host rows (rows, page_bytes) uint8 and their (rows,) int32 positions, in one allocation
    (pinned by kvtier.pinned when ``pin``)."""
    memory = host_zeros(rows_bytes(rows, page_bytes), pin)
    return memory[:rows * page_bytes].view(rows, page_bytes), memory[rows * page_bytes:].view(torch.int32)


class HostSlab:
    def __init__(self, rows: int, page_bytes: int, pin: bool):
        # zeroed rows: rows never written may be copied (masked by position) and must hold no NaN
        self.pages, self.positions = host_rows(rows, page_bytes, pin)  # (rows, page_bytes), (rows,)
        self.positions.fill_(FREE_POSITION)
        self.used_rows = 0  # rows below this were written at least once; a copy of the slab covers them
        self.free_rows: list[int] = []  # freed rows below used_rows
        self.entries: list[ColdEntry] = []  # the pages it holds

    def take_row(self) -> int | None:
        if self.free_rows:
            return self.free_rows.pop()
        if self.used_rows < self.pages.shape[0]:
            self.used_rows += 1
            return self.used_rows - 1
        return None


@dataclass
class ColdEntry:
    """One cold page: the tokens starting at ``start`` live in row ``row`` of slab ``slab``."""

    start: int
    slab: int
    row: int


class ColdPages:
    """One layer's cold pages, in host slabs, with at most ``share_bytes`` of the host budget."""

    def __init__(self, layout: PageLayout, chunk_pages: int, budget: ByteBudget, share_bytes: int, pin: bool):
        self.layout = layout
        self.block_size = layout.block_size
        self.chunk_pages = chunk_pages
        self.budget = budget
        self.share_bytes = share_bytes
        self.pin = pin
        self.slabs: list[HostSlab] = []
        self.spare_slabs: list[HostSlab] = []  # allocated ahead of need (a budget change); used before new ones
        self.entries: list[ColdEntry] = []  # in the order they arrived
        self.starts: list[int] = []  # their first positions, in the same order (what policies rank)
        self.version = 0  # changes whenever a page arrives or leaves, so that staged copies know they are stale

    @property
    def allocated_bytes(self) -> int:
        return len(self.slabs) * self.slab_bytes

    @property
    def tokens(self) -> int:
        return len(self.entries) * self.block_size

    def store(self, start: int, page: torch.Tensor) -> None:
        """Copy one page's bytes (page_bytes,) uint8 from the device into a host row; raises NoRoomForPage when the
        host budget has no room for another slab. The copy is asynchronous from a CUDA device (pinned rows)."""
        if not self.store_many([start], page.unsqueeze(0)):
            raise NoRoomForPage()

    def store_many(self, starts: list[int], pages: torch.Tensor) -> int:
        """Copy ``pages`` ((n, page_bytes) uint8, on the device) into host rows for first positions ``starts``, as
        many as the host budget has room for; return how many (the first ones). They take the rows and slabs that
        storing them one at a time would, in one copy a run of adjacent rows. If allocating a slab fails, the rows
        taken are free again and its error is raised."""
        rows: list[tuple[int, int]] = []  # (slab index, row) of each page stored
        try:
            for _ in starts:
                rows.append(self._free_row())
        except NoRoomForPage:
            pass
        except BaseException:
            for slab_index, row in rows:
                self.slabs[slab_index].free_rows.append(row)
            raise
        for first, slab_index, row, count in adjacent_runs(rows):
            slab = self.slabs[slab_index]
            slab.pages[row:row + count].copy_(pages[first:first + count], non_blocking=self.pin)
            slab.positions[row:row + count] = torch.tensor(starts[first:first + count], dtype=torch.int32)
        for start, (slab_index, row) in zip(starts, rows):
            entry = ColdEntry(start, slab_index, row)
            self.entries.append(entry)
            self.starts.append(start)
            self.slabs[slab_index].entries.append(entry)
        if rows:
            self.version += 1
        return len(rows)

    def page(self, entry: ColdEntry) -> torch.Tensor:
        """The bytes of one cold page: (page_bytes,) uint8, a view into its host slab."""
        return self.slabs[entry.slab].pages[entry.row]

    def drop(self, index: int) -> ColdEntry:
        """Free the page at ``index`` of ``entries`` (its tokens leave the cache); return its row."""
        entry = self.entries.pop(index)
        self.starts.pop(index)
        slab = self.slabs[entry.slab]
        slab.positions[entry.row] = FREE_POSITION
        slab.free_rows.append(entry.row)
        slab.entries.remove(entry)
        self.version += 1
        return entry

    def chunks(self, row_granule: int = 1) -> list[tuple[HostSlab, int, list[ColdEntry]]]:
        """Each slab that holds pages, as (slab, rows to move, its entries): what one staging chunk receives."""
        return [(slab, rows, list(slab.entries)) for slab, rows in self.chunk_rows(row_granule)]

    def chunk_rows(self, row_granule: int = 1) -> list[tuple[HostSlab, int]]:
        """Each slab that holds pages, with the rows a chunk moves: rounded up to a multiple of ``row_granule`` (within
        the slab), so that the chunks stay the same while that many pages arrive (a CUDA graph copying them is
        captured again only then)."""
        return [(slab, min(slab.pages.shape[0], -(-slab.used_rows // row_granule) * row_granule))
                for slab in self.slabs if slab.entries]

    def slabs_within(self, share_bytes: int) -> int:
        """How many slabs ``share_bytes`` of the host budget pays for."""
        return share_bytes // self.slab_bytes

    @property
    def slab_bytes(self) -> int:
        """Host bytes a slab takes: its rows and positions, in whole pages when pinned."""
        return mapped_bytes(rows_bytes(self.chunk_pages, self.layout.page_bytes), self.pin)

    def slabs_for(self, pages: int) -> int:
        """How many slabs ``pages`` pages fill."""
        return -(-pages // self.chunk_pages)

    def compact(self, keep_slabs: int = 0) -> None:
        """Free every slab the pages do not need (keeping at least ``keep_slabs``, which pages about to arrive will
        fill): the pages of the emptiest slabs move (host row to host row) into free rows of the fullest, and slabs
        left empty go back to the host budget. Nothing is allocated. Positions and arrival order stay."""
        needed = max(self.slabs_for(len(self.entries)), keep_slabs)
        ranked = sorted(range(len(self.slabs)), key=lambda index: -len(self.slabs[index].entries))
        kept, emptied = sorted(ranked[:needed]), ranked[needed:]
        for index in emptied:
            for entry in list(self.slabs[index].entries):
                self._move(entry, next(target for target in kept if self._has_room(self.slabs[target])))
        self.budget.release(len(emptied) * self.slab_bytes)
        self.slabs = [self.slabs[index] for index in kept]
        for new_index, slab in enumerate(self.slabs):
            for entry in slab.entries:
                entry.slab = new_index
        self.version += 1

    def _has_room(self, slab: HostSlab) -> bool:
        return bool(slab.free_rows) or slab.used_rows < slab.pages.shape[0]

    def _move(self, entry: ColdEntry, target_index: int) -> None:
        """Copy one page's row into a free row of slab ``target_index``; its old row becomes free."""
        source, target = self.slabs[entry.slab], self.slabs[target_index]
        row = target.take_row()
        target.pages[row].copy_(source.pages[entry.row])
        target.positions[row] = entry.start
        source.positions[entry.row] = FREE_POSITION
        source.free_rows.append(entry.row)
        source.entries.remove(entry)
        target.entries.append(entry)
        entry.slab, entry.row = target_index, row

    def release_all(self) -> None:
        self.budget.release(self.allocated_bytes)
        self.slabs, self.entries, self.starts = [], [], []
        self.version += 1

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis of every cold page field, in place (as WarmPages.map_batch)."""
        if self.slabs and fn(torch.empty(self.layout.batch, 0)).shape[0] != self.layout.batch:
            raise NotImplementedError("changing the batch size of a cache that holds cold pages")
        for slab in self.slabs:
            for view in self.layout.views(slab.pages).values():
                view.copy_(fn(view.transpose(0, 1)).transpose(0, 1))
        self.version += 1

    def _free_row(self) -> tuple[int, int]:
        for index in range(len(self.slabs) - 1, -1, -1):
            row = self.slabs[index].take_row()
            if row is not None:
                return index, row
        self.slabs.append(self._new_slab())
        return len(self.slabs) - 1, self.slabs[-1].take_row()

    def allocate_slabs(self, count: int) -> list[HostSlab]:
        """``count`` empty slabs, allocated (not paid for, not held): raises what the allocator raises."""
        return [HostSlab(self.chunk_pages, self.layout.page_bytes, self.pin) for _ in range(count)]

    def _new_slab(self) -> HostSlab:
        """A slab paid for out of the share and the host budget: a spare one, else one allocated now."""
        nbytes = self.slab_bytes
        if self.allocated_bytes + nbytes > self.share_bytes or not self.budget.reserve(nbytes):
            raise NoRoomForPage()
        if self.spare_slabs:
            return self.spare_slabs.pop()
        try:
            return self.allocate_slabs(1)[0]
        except RuntimeError as error:  # the pinned allocation itself failed
            self.budget.release(nbytes)
            raise AllocationError(
                f"kvtier: could not allocate {nbytes:,} bytes of {'pinned ' if self.pin else ''}host memory for the "
                f"cold tier ({error}). Lower host_budget_gb (now {self.budget.limit_bytes:,} bytes), or free host "
                "memory."
            ) from error
