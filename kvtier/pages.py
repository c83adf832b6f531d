"""The warm tier of one layer: fixed-size pages of packed codes in slabs, and the block table that orders them.

A page holds ``block_size`` consecutive tokens of every sequence in the batch and every KV head, as one
run of bytes laid out by :class:`PageLayout`. Pages live in slabs of several pages (one uint8 allocation
per slab, never one per page); a freed page's slot is reused before a new slab is asked for. Every slab
is paid for out of the cache's budget before it is allocated (but the one slab a budget change repacks a tier
into, allocated before any page moves and paid for when it replaces the tier's slabs; see kvtier.resize), and no
layer takes more than its equal share of the warm budget.

The block table exists twice: as Python rows (``table``) for the policies and the torch reference, and
as device tensors that the decode kernel walks without any host-to-device copy: ``offsets``, each page's
distance from ``base`` (the slab at the lowest address, so offsets are never negative) in ALIGNMENT-byte
units, which tells the kernel's compiler that every page start is aligned for wide loads; and
``positions``, each page's first token position.

A run of new pages (a long prefill's) is stored at once (``store_many``): the same slots, slabs and table rows as
storing them one by one, in a few copies rather than a few per page.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch

from .formats import WarmFormat

TABLE_ROW_BYTES = 8 + 4  # a device table row: an int64 page offset and an int32 position
ALIGNMENT = 16  # every field starts on a 16-byte boundary, so that the kernel can load it in wide words


@dataclass(frozen=True)
class PageLayout:
    """Where each field of a warm page sits in the page's bytes; the fields, their shapes (B, H, ...) and
    dtypes come from the warm format (see kvtier.formats), in byte order."""

    batch: int
    kv_heads: int
    block_size: int
    head_dim: int
    format: WarmFormat

    @cached_property
    def fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.format.fields(self.batch, self.kv_heads, self.block_size, self.head_dim)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (shape, _) in self.fields.items()}

    def field_bytes(self, name: str) -> int:
        shape, dtype = self.fields[name]
        return torch.Size(shape).numel() * dtype.itemsize

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Byte offset of each field inside a page."""
        offsets, position = {}, 0
        for name in self.fields:
            offsets[name] = position
            position += _aligned(self.field_bytes(name))
        return offsets

    @cached_property
    def page_bytes(self) -> int:
        """Bytes one page occupies in a slab (fields and their alignment padding)."""
        return sum(_aligned(self.field_bytes(name)) for name in self.fields)

    def pack(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fields with a leading page axis (n, *field shape) -> the pages' bytes, (n, page_bytes) uint8."""
        count = next(iter(fields.values())).shape[0]
        pages = torch.zeros(count, self.page_bytes, dtype=torch.uint8, device=next(iter(fields.values())).device)
        for name, view in self.views(pages).items():
            view.copy_(fields[name])
        return pages

    def views(self, pages: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (P, page_bytes) -> each field as a typed view (P, *field shape) of the same memory."""
        count = pages.shape[0]
        views = {}
        for name, (shape, dtype) in self.fields.items():
            start = self.offsets[name]
            views[name] = pages[:, start:start + self.field_bytes(name)].view(dtype).view(count, *shape)
        return views


def allocate_slab(pages: int, page_bytes: int, device) -> torch.Tensor:
    """One slab of ``pages`` pages: (pages, page_bytes) uint8 on ``device``, uninitialized."""
    return torch.empty((pages, page_bytes), dtype=torch.uint8, device=device)


def _placeholder(device) -> torch.Tensor:
    """A small uint8 tensor the kernel gets as its page base while no slab exists (it then reads no page)."""
    return torch.zeros(ALIGNMENT, dtype=torch.uint8, device=device)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def adjacent_runs(places: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(slab, position) pairs, in the order given, as runs of consecutive positions in one slab: (index of the run's
    first pair, slab, first position, length) each. Copies and table shifts go once a run, not once a page."""
    runs: list[list[int]] = []
    for index, (slab, position) in enumerate(places):
        if runs and runs[-1][1] == slab and runs[-1][2] + runs[-1][3] == position:
            runs[-1][3] += 1
        else:
            runs.append([index, slab, position, 1])
    return [tuple(run) for run in runs]


def _table_rows(pages: int, current_rows: int = 0) -> int:
    """Rows of a device table grown (doubling, from at least 16 rows) to twice ``pages``."""
    rows = max(current_rows, 16)
    while rows < 2 * pages:
        rows *= 2
    return rows


@dataclass
class PageEntry:
    """One row of the block table: which slab slot holds the tokens starting at ``start``."""

    page_id: int
    start: int  # position of the page's first token in the sequence


class NoRoomForPage(Exception):
    """Raised by :meth:`WarmPages.store` when the budget has no room for one more page."""


@dataclass
class Repack:
    """What a rebuilt tier holds its pages in, allocated before the tier changes (see :meth:`WarmPages.rebuild`)."""

    pages: int  # n
    slab: torch.Tensor  # (n, page_bytes) uint8: exactly its pages; for none, the placeholder base
    offsets: torch.Tensor  # (rows,) int64 zeros: the device table's page distances
    positions: torch.Tensor  # (rows,) int32 zeros: its first token positions


class WarmPages:
    def __init__(self, layout: PageLayout, device, pages_per_slab: int, budget, share_bytes: int = 0,
                 in_order: bool = True):
        self.layout = layout
        self.block_size = layout.block_size
        self.device = device
        self.pages_per_slab = pages_per_slab
        self.budget = budget  # has reserve(nbytes) -> bool and release(nbytes)
        self.share_bytes = share_bytes  # this layer's share of the warm budget, so that layers hold equal context
        self.in_order = in_order  # pages arrive in position order (else, as a policy sends them: any order)
        self.slabs: list[torch.Tensor] = []  # uint8 (pages, page_bytes) each
        self.slab_offsets: list[int] = []  # page id of each slab's first slot
        self.free_page_ids: list[int] = []
        self.table: list[PageEntry] = []  # in position order
        self.starts: list[int] = []  # their first positions (what policies rank)
        # the device table: row i describes table[i]; a dropped row's successors shift up on the device, so the table
        # stays where it is while pages come and go (a captured CUDA graph keeps reading it)
        self.offsets = torch.empty(0, dtype=torch.int64, device=device)  # (capacity,) page distances from base, in
        # ALIGNMENT units, table order
        self.positions = torch.empty(0, dtype=torch.int32, device=device)  # (capacity,) first token positions
        self.base = _placeholder(device)  # the slab at the lowest address
        self.row_count = torch.zeros(1, dtype=torch.int32, device=device)  # rows, on the device (a CUDA graph reads it)

    @property
    def page_bytes(self) -> int:
        return self.layout.page_bytes

    @property
    def rows(self) -> int:
        """Rows of the device page table in use: the pages the kernel reads."""
        return len(self.table)

    @property
    def capacity(self) -> int:
        """Page slots allocated (the slabs' rows)."""
        return self.slab_offsets[-1] + self.slabs[-1].shape[0] if self.slabs else 0

    @property
    def allocated_bytes(self) -> int:
        return self.capacity * self.page_bytes + self.table_bytes

    @property
    def table_bytes(self) -> int:
        return self.offsets.nbytes + self.positions.nbytes

    def store(self, start: int, page: torch.Tensor) -> None:
        """Write one quantized block, packed as the layout lays it out ((page_bytes,) uint8, see PageLayout.pack), at
        the end of the table (with ``in_order``, after every page it holds: a policy may have dropped the last);
        NoRoomForPage when the budget has no room for it."""
        if not self.store_many(range(start, start + 1), page.unsqueeze(0)):
            raise NoRoomForPage()

    def store_many(self, starts: range, pages: torch.Tensor) -> int:
        """Write ``pages`` ((n, page_bytes) uint8, each packed as :meth:`store` takes one) at first positions ``starts``
        (n, rising evenly) at the end of the table, as many as the budget has room for; return how many were stored
        (the first ones). A run takes the slots, slabs and budget that storing its pages one at a time would; its
        pages are copied and the device table written once a run of adjacent slots, not once a page."""
        assert len(starts) == pages.shape[0] and starts.step > 0, (starts, pages.shape)
        if not starts:
            return 0
        if self.in_order and self.table and starts[0] <= self.table[-1].start:
            raise AssertionError(f"warm pages out of order: {starts[0]} after {self.table[-1].start}")
        page_ids = self._claim_page_ids(len(starts))
        row, stride = len(self.table), self.page_bytes // ALIGNMENT
        for first, slab_index, slot, count in adjacent_runs([self._slab_slot(page_id) for page_id in page_ids]):
            slab = self.slabs[slab_index]
            slab[slot:slot + count].copy_(pages[first:first + count])  # (count, page_bytes)
            distance = (slab[slot].data_ptr() - self.base.data_ptr()) // ALIGNMENT
            rows = self.offsets[row + first:row + first + count]  # (count,) on the device: no host-to-device copy
            torch.arange(distance, distance + count * stride, stride, out=rows)
        stored = starts[:len(page_ids)]
        positions = self.positions[row:row + len(stored)]  # (stored,)
        torch.arange(stored.start, stored.stop, stored.step, out=positions)
        self.table.extend(PageEntry(page_id, start) for page_id, start in zip(page_ids, stored))
        self.starts.extend(stored)
        self.row_count.fill_(len(self.table))
        return len(stored)

    def _claim_page_ids(self, count: int) -> list[int]:
        """Take up to ``count`` free page ids, the last freed first, growing a slab whenever none is free; fewer once
        the budget has no room for another slab. If the allocator fails, the ids taken are free again (in their
        order) before its error is raised."""
        page_ids: list[int] = []
        while len(page_ids) < count:
            if not self.free_page_ids:
                try:
                    self._grow()
                except NoRoomForPage:
                    break
                except BaseException:
                    self.free_page_ids.extend(reversed(page_ids))
                    raise
            taken = self.free_page_ids[-(count - len(page_ids)):]  # from the end: the last freed first
            del self.free_page_ids[-len(taken):]
            page_ids.extend(reversed(taken))
        return page_ids

    def read(self, entries: list[PageEntry]) -> dict[str, torch.Tensor]:
        """Gather the pages of ``entries`` into field tensors with a leading page axis: (n, *field shape)."""
        return self.layout.views(self.gather(entries))

    def gather(self, entries: list[PageEntry]) -> torch.Tensor:
        """The bytes of ``entries``' pages, copied together: (n, page_bytes) uint8 on the device."""
        return torch.stack([self.page(entry) for entry in entries])

    def page(self, entry: PageEntry) -> torch.Tensor:
        """The bytes of one stored page: (page_bytes,) uint8, a view into its slab."""
        slab, slot = self._locate(entry.page_id)
        return slab[slot]

    def drop(self, index: int) -> PageEntry:
        """Free the page at ``index`` in the block table (its tokens leave the cache); return its row."""
        return self.drop_many([index])[0]

    def drop_many(self, indices: list[int]) -> list[PageEntry]:
        """Free the pages at ``indices`` (distinct) of the block table and return their rows, in that order. Their
        slots are taken again first to last, as if each page dropped in turn had made room for one new page: the
        first page's slot is the first the next store takes. The device table's later rows shift up,
        one copy a column for each run of adjacent dropped rows."""
        count = len(self.table)
        runs = adjacent_runs([(0, index) for index in sorted(indices)])
        for _, _, first, length in reversed(runs):  # from the last run: earlier rows keep their index
            for column in (self.offsets, self.positions):
                column[first:count - length] = column[first + length:count].clone()
            count -= length
        entries = [self.table[index] for index in indices]
        for index in sorted(indices, reverse=True):
            del self.table[index], self.starts[index]
        self.free_page_ids.extend(entry.page_id for entry in reversed(entries))  # taken from the end
        self.row_count.fill_(len(self.table))
        return entries

    def release_all(self) -> None:
        self.budget.release(self.allocated_bytes)
        self.slabs, self.slab_offsets, self.free_page_ids, self.table, self.starts = [], [], [], [], []
        self.offsets, self.positions = self.offsets[:0].clone(), self.positions[:0].clone()
        self.base = _placeholder(self.device)
        self.row_count.fill_(0)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis of every page field (beam reorder, batch selection), in place."""
        new_batch = fn(torch.empty(self.layout.batch, 0)).shape[0]
        if new_batch != self.layout.batch:
            if self.slabs:
                raise NotImplementedError("changing the batch size of a cache that holds warm pages")
            self.layout = dataclasses.replace(self.layout, batch=new_batch)
        for slab in self.slabs:
            for view in self.layout.views(slab).values():
                view.copy_(fn(view.transpose(0, 1)).transpose(0, 1))

    def _locate(self, page_id: int) -> tuple[torch.Tensor, int]:
        index, slot = self._slab_slot(page_id)
        return self.slabs[index], slot

    def _slab_slot(self, page_id: int) -> tuple[int, int]:
        index = bisect.bisect_right(self.slab_offsets, page_id) - 1  # slabs sit in page-id order
        if index < 0 or page_id >= self.capacity:
            raise KeyError(page_id)
        return index, page_id - self.slab_offsets[index]

    def _grow(self) -> None:
        """Allocate a slab of as many pages (up to pages_per_slab) as the budget allows, and room in the table.

        A bigger table is paid for in full before it is allocated (the old one is freed right after the copy).
        """
        for pages in range(self.pages_per_slab, 0, -1):
            table_bytes = self.table_bytes_for(self.capacity + pages)
            nbytes = pages * self.page_bytes + table_bytes
            after = (self.capacity + pages) * self.page_bytes + (table_bytes or self.table_bytes)
            if after <= self.share_bytes and self.budget.reserve(nbytes):
                break
        else:
            raise NoRoomForPage()
        if table_bytes:
            self._grow_table(self.capacity + pages)
        offset = self.capacity
        slab = allocate_slab(pages, self.page_bytes, self.device)
        assert slab.data_ptr() % ALIGNMENT == 0, "slabs come from the allocator aligned far beyond 16 bytes"
        if not self.slabs:
            self.base = slab
        elif slab.data_ptr() < self.base.data_ptr():  # rebase, so that offsets stay >= 0
            self.offsets[:len(self.table)] += (self.base.data_ptr() - slab.data_ptr()) // ALIGNMENT
            self.base = slab
        self.slabs.append(slab)
        self.slab_offsets.append(offset)
        self.free_page_ids.extend(range(offset + pages - 1, offset - 1, -1))

    def table_bytes_for(self, pages: int) -> int:
        """Bytes of the new device table that ``pages`` pages need, or 0 if the current one has room. The table keeps
        room for twice the pages."""
        if 2 * pages <= self.offsets.shape[0]:
            return 0
        return _table_rows(pages, self.offsets.shape[0]) * TABLE_ROW_BYTES

    def pages_within(self, share_bytes: int) -> int:
        """The most pages that :meth:`rebuild` can hold within ``share_bytes``: one slab of them and the table
        store() would have grown for them."""
        pages = share_bytes // self.page_bytes
        while pages and pages * self.page_bytes + _table_rows(pages) * TABLE_ROW_BYTES > share_bytes:
            pages -= 1
        return pages

    def bytes_for_pages(self, pages: int) -> int:
        """What :meth:`rebuild` allocates for ``pages`` pages (0 for none)."""
        return pages * self.page_bytes + _table_rows(pages) * TABLE_ROW_BYTES if pages else 0

    def host_copy(self, entries: list[PageEntry]) -> torch.Tensor:
        """The bytes of ``entries``' pages, (n, page_bytes) uint8 on the CPU, in order (one device-to-host copy a
        slab)."""
        pages = torch.empty(len(entries), self.page_bytes, dtype=torch.uint8)
        by_slab: dict[int, list[tuple[int, int]]] = {}
        for index, entry in enumerate(entries):
            slab_index = bisect.bisect_right(self.slab_offsets, entry.page_id) - 1
            by_slab.setdefault(slab_index, []).append((index, entry.page_id - self.slab_offsets[slab_index]))
        for slab_index, rows in by_slab.items():
            on_host = self.slabs[slab_index].cpu()  # (slab pages, page_bytes)
            pages[torch.tensor([index for index, _ in rows])] = on_host[torch.tensor([slot for _, slot in rows])]
        return pages

    def allocate_repack(self, pages: int) -> Repack:
        """Allocate (nothing else changes, and the budget is not charged) what :meth:`rebuild` holds ``pages`` pages
        in: one slab of exactly that many and a device table with room for twice as many. Raises what the allocator
        raises (torch.OutOfMemoryError, or RuntimeError for host memory)."""
        if not pages:
            offsets, positions = self.offsets[:0].clone(), self.positions[:0].clone()  # (0,) each
            return Repack(0, _placeholder(self.device), offsets, positions)
        rows = _table_rows(pages)
        return Repack(pages, allocate_slab(pages, self.page_bytes, self.device),
                      torch.zeros(rows, dtype=torch.int64, device=self.device),
                      torch.zeros(rows, dtype=torch.int32, device=self.device))

    def rebuild(self, starts: list[int], pages: torch.Tensor, repack: Repack | None = None) -> None:
        """Hold exactly ``pages`` (n, page_bytes) uint8 (on any device) at first positions ``starts``, in that table
        order, instead of what the tier held, in one slab of exactly n pages and a new table (so memory returns where
        pages left, and a half-empty slab shrinks): ``repack`` (from :meth:`allocate_repack`), else allocated here.
        Allocate, settle the budget, copy, and only then let the old slabs and table go: if the allocation fails (its
        error is raised) or the new bytes do not fit the budget (NoRoomForPage), nothing changed."""
        count = len(starts)
        repack = self.allocate_repack(count) if repack is None else repack
        assert repack.pages == count == len(pages), (repack.pages, count, len(pages))
        old_bytes, new_bytes = self.allocated_bytes, self.bytes_for_pages(count)
        self.budget.release(old_bytes)
        if not self.budget.reserve(new_bytes):
            self.budget.reserve(old_bytes)
            raise NoRoomForPage()
        if count:
            repack.slab.copy_(pages)
            repack.offsets[:count] = torch.arange(count, device=self.device) * (self.page_bytes // ALIGNMENT)
            repack.positions[:count] = torch.tensor(starts, dtype=torch.int32, device=self.device)
        self._take(repack, starts)

    def _take(self, repack: Repack, starts: list[int]) -> None:
        """Hold ``repack``'s filled slab and table, whose pages start at ``starts``; the old slabs and table go."""
        self.slabs, self.slab_offsets = ([repack.slab], [0]) if starts else ([], [])
        self.base = repack.slab
        self.free_page_ids = []
        self.offsets, self.positions = repack.offsets, repack.positions
        self.table = [PageEntry(page_id, start) for page_id, start in enumerate(starts)]
        self.starts = list(starts)
        self.row_count.fill_(len(starts))

    def _grow_table(self, pages: int) -> None:
        old_bytes, count = self.table_bytes, len(self.table)
        capacity = self.table_bytes_for(pages) // TABLE_ROW_BYTES
        offsets = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        positions = torch.zeros(capacity, dtype=torch.int32, device=self.device)
        offsets[:count], positions[:count] = self.offsets[:count], self.positions[:count]
        self.offsets, self.positions = offsets, positions
        self.budget.release(old_bytes)

