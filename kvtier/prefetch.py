"""Cold pages on their way back: a device staging ring, filled one layer ahead on a side stream.

Each decode step attends every cold page (``prefetch="all"``, exact). A cold chunk (one host slab) moves into
a slot of the :class:`StagingRing` in two asynchronous copies (page bytes and positions) on the
:class:`Prefetcher`'s side stream, while the layers before it compute; the decode kernel then reads the slot in
place, like warm pages. Events order everything without host synchronization: a copy waits for the kernel that
last read its slot and for the latest device-to-host demotion; the kernel waits for its copy.

A layer's chunks are planned from its cold pages as they are when the layer ahead updates; a page that moves
after that (a demotion while this layer appends) makes the plan stale, and the layer replans before it attends.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
import itertools
import math
from collections import deque
from dataclasses import dataclass

import torch

from .cold import ColdEntry, HostSlab, host_rows, rows_bytes
from .disk import DiskEntry, DiskPages
from .errors import KVTierError
from .pages import ALIGNMENT, PageLayout, adjacent_runs
from .pinned import mapped_bytes


STATIC_ROW_GRANULE = 16  # a fixed-shape step copies slab rows in multiples of this: a few more bytes a step, and a
# new capture every 16 demotions a layer instead of every one


class StagingRing:
    """``slots`` device slots of ``chunk_pages`` pages each, and each page's position."""

    def __init__(self, slots: int, chunk_pages: int, page_bytes: int, device):
        self.pages = torch.empty(slots, chunk_pages, page_bytes, dtype=torch.uint8, device=device)
        self.positions = torch.empty(slots, chunk_pages, dtype=torch.int32, device=device)
        # each row's distance from the ring's first byte, in ALIGNMENT units, as the kernel's page table wants it
        rows = torch.arange(slots * chunk_pages, dtype=torch.int64, device=device)
        self.offsets = (rows * (page_bytes // ALIGNMENT)).view(slots, chunk_pages)
        self.base = self.pages.view(-1)

    @staticmethod
    def bytes_for(slots: int, chunk_pages: int, page_bytes: int) -> int:
        return slots * chunk_pages * (page_bytes + 4 + 8)

    @property
    def nbytes(self) -> int:
        return self.pages.nbytes + self.positions.nbytes + self.offsets.nbytes


class GatherRows:
    """Pinned host rows, a slot's worth for each ring slot, where a ``prefetch="topk"`` job's scattered cold pages are
    gathered (one copy a slab) before one host-to-device copy, instead of one copy per run of neighbouring rows."""

    def __init__(self, slots: int, chunk_pages: int, page_bytes: int, pin: bool):
        pages, positions = host_rows(slots * chunk_pages, page_bytes, pin)
        self.pages = pages.view(slots, chunk_pages, page_bytes)
        self.positions = positions.view(slots, chunk_pages)
        self.copied: list[object] = [None] * slots  # event after the latest copy out of each slot's rows

    @staticmethod
    def bytes_for(slots: int, chunk_pages: int, page_bytes: int) -> int:
        """Host bytes the rows take, in whole pages as pinned rows take them (on the CPU too: a few bytes high)."""
        return mapped_bytes(rows_bytes(slots * chunk_pages, page_bytes), pin=True)


class ReadAheadRows:
    """Host rows the reader thread reads disk pages into ahead of need, a slot's worth for each ring slot: the second
    half of what :meth:`Prefetcher.read_rows_bytes` reserves, so the reader never holds a byte the host budget did not
    pay for. A read takes one slot's rows when it is submitted and gives them back only once it can no longer write
    into them: cancelled before it ran, or finished. A read that is already running when its plan is forgotten cannot
    be cancelled; its rows stay taken ("retired") until it finishes, so no later read is given them meanwhile."""

    def __init__(self, slots: int, chunk_pages: int, page_bytes: int):
        self.pages = torch.empty(slots, chunk_pages, page_bytes, dtype=torch.uint8)  # (slots, chunk_pages, page_bytes)
        self.free = deque(range(slots))
        self.retired: list[tuple[Future, int]] = []  # (a forgotten read still running, the slot it writes into)

    @property
    def taken(self) -> int:
        """Slots whose rows a read holds or writes into (retired ones included)."""
        return self.pages.shape[0] - len(self.free)

    def take(self) -> int | None:
        """A free slot (once the retired reads that have finished give theirs back), or None if every slot is taken."""
        self.reclaim()
        return self.free.popleft() if self.free else None

    def reclaim(self) -> None:
        """The slots of retired reads that have finished are free again."""
        for retired in [retired for retired in self.retired if retired[0].done()]:
            self.retired.remove(retired)
            self.free.append(retired[1])

    def give_back(self, slot: int, read: Future) -> None:
        """``read``, which writes into ``slot``'s rows, is no longer wanted: the rows are free now, unless it runs."""
        if read.cancel() or read.done():
            self.free.append(slot)
        else:
            self.retired.append((read, slot))


@dataclass(frozen=True)
class StagedEntry:
    """A staged cold page: the tokens starting at ``start`` sit in row ``row`` of the whole ring."""

    start: int
    row: int


class StagedChunk:
    """The staged pages of one or more slots as one page set that the decode kernel and its reference read (see
    PagedKV.warm): ``rows`` device rows (empty ones at FREE_POSITION); ``table``, built only when the reference
    asks, the cold pages among them."""

    def __init__(self, ring: StagingRing, layout: PageLayout, jobs: list):
        self.ring, self.layout, self.jobs = ring, layout, jobs
        self.block_size = layout.block_size
        self.base = ring.base  # the ring's first byte, which ``offsets`` count from
        self.rows = sum(job.rows for job in jobs)
        if len(jobs) == 1:
            self.offsets = ring.offsets[jobs[0].slot, :jobs[0].rows]  # (rows,) int64
            self.positions = ring.positions[jobs[0].slot, :jobs[0].rows]  # (rows,) int32
        else:
            self.offsets = torch.cat([ring.offsets[job.slot, :job.rows] for job in jobs])
            self.positions = torch.cat([ring.positions[job.slot, :job.rows] for job in jobs])

    @functools.cached_property
    def table(self) -> list[StagedEntry]:
        chunk_pages = self.ring.pages.shape[1]
        return [StagedEntry(entry.start, job.slot * chunk_pages + row) for job in self.jobs
                for entry, row in zip(job.entries, job.slot_rows)]

    def read(self, entries) -> dict[str, torch.Tensor]:
        rows = torch.tensor([entry.row for entry in entries], device=self.ring.pages.device)
        return self.layout.views(self.ring.pages.view(-1, self.ring.pages.shape[2]).index_select(0, rows))


class JoinedPages:
    """The warm pages and staged cold pages as one page set, so that one kernel launch reads both: the device
    tables are concatenated, with offsets counted from whichever of the two allocations lies lower."""

    def __init__(self, warm, chunk: StagedChunk):
        self.warm, self.chunk = warm, chunk
        self.layout = warm.layout
        self.block_size = warm.block_size
        self.rows = warm.rows + chunk.rows
        self.base = min(warm.base, chunk.base, key=lambda tensor: tensor.data_ptr())
        self.offsets = torch.cat((self._from_base(warm.offsets[:warm.rows], warm.base),
                                  self._from_base(chunk.offsets, chunk.base)))
        self.positions = torch.cat((warm.positions[:warm.rows], chunk.positions))

    @functools.cached_property
    def table(self) -> list:
        return self.warm.table + self.chunk.table

    def _from_base(self, offsets: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        shift = (base.data_ptr() - self.base.data_ptr()) // ALIGNMENT
        return offsets + shift if shift else offsets

    def read(self, entries) -> dict[str, torch.Tensor]:
        """Entries in table order: warm ones, then staged ones."""
        warm = [entry for entry in entries if not isinstance(entry, StagedEntry)]
        staged = entries[len(warm):]
        parts = [part.read(chosen) for part, chosen in ((self.warm, warm), (self.chunk, staged)) if chosen]
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat((parts[0][name], parts[1][name])) for name in parts[0]}


@dataclass
class Job:
    """One slot's worth of one layer's cold pages on their way: runs of host rows, copied one after another into the
    slot, and the pages they hold (``entries``, with each one's row in the slot)."""

    runs: list[tuple[HostSlab, int, int]]  # (slab, first row, rows)
    entries: list[ColdEntry]
    slot_rows: list[int]
    slot: int | None = None
    ready: object = None  # CUDA event recorded after the copies, or None off CUDA
    disk: DiskPages | None = None  # the disk pages whose ``entries`` these are (read into pinned rows, then copied)
    read_ahead: Future | None = None  # their bytes, read and checked on the reader thread: (rows, page_bytes) uint8
    read_slot: int | None = None  # the ReadAheadRows slot ``read_ahead`` writes into
    error: BaseException | None = None  # why its copy failed when it was issued ahead (retried when consumed)

    @property
    def rows(self) -> int:
        if self.disk is not None:
            return len(self.entries)
        return sum(count for _, _, count in self.runs)

    @classmethod
    def from_disk(cls, disk: DiskPages, entries: list[DiskEntry]) -> "Job":
        """Disk pages, read and checked into the slot's pinned rows when the job is issued, packed at their start."""
        return cls([], entries, list(range(len(entries))), disk=disk)

    @classmethod
    def whole_slab(cls, slab: HostSlab, rows: int, entries: list[ColdEntry]) -> "Job":
        """A slab's first ``rows`` rows, empty ones included (attention masks them by position)."""
        return cls([(slab, 0, rows)], entries, [entry.row for entry in entries])

    @classmethod
    def chosen(cls, slabs: list[HostSlab], entries: list[ColdEntry]) -> "Job":
        """The rows of ``entries`` only, in runs of neighbouring rows, packed at the start of the slot."""
        entries = sorted(entries, key=lambda entry: (entry.slab, entry.row))
        runs = adjacent_runs([(entry.slab, entry.row) for entry in entries])
        return cls([(slabs[slab], row, count) for _, slab, row, count in runs], entries, list(range(len(entries))))


class Prefetcher:
    """Plans each layer's cold chunks, copies them into free ring slots ahead of use, and hands them to attention."""

    def __init__(self, ring: StagingRing, layout: PageLayout, device, host_budget=None):
        self.ring = ring
        self.layout = layout
        self.host_budget = host_budget  # pays for the gather rows, if topk asks for them
        self.gather: GatherRows | None = None  # allocated at the first job of scattered rows (topk)
        self.read_rows: ReadAheadRows | None = None  # allocated with the gather rows, with the disk tier
        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self.free_slots = deque(range(ring.pages.shape[0]))
        self.slot_released: list[object] = [None] * ring.pages.shape[0]  # event after the last read of each slot
        self.host_written = None  # event after the latest device-to-host demotion
        self.jobs: dict[int, list[Job]] = {}  # layer index -> its planned chunks, in order
        self.versions: dict[int, int] = {}  # layer index -> its cold version when planned
        self.moved_bytes = 0
        self.moved_chunks = 0
        self.replans = 0  # plans made stale by a demotion after them
        self.failed_copies = 0  # copies that failed when issued ahead; each is retried once when its chunk is needed
        self.reader: ThreadPoolExecutor | None = None  # reads disk pages ahead of need (with the disk tier)
        self.read_ahead_pages = 0  # pages that reached their slot through the reader (the rest were read in line)
        self.every_page = True  # the current step streams every cold page (prefill), whatever the prefetch mode
        self.planned_every_page: dict[int, bool] = {}  # layer index -> the every_page its plan was made for
        self.row_granule = 1  # slab rows a chunk copies, rounded up to a multiple of this (STATIC_ROW_GRANULE in a
        # fixed-shape step, so that its captured copies stay valid while pages arrive)

    # ---------------------------------------------------------------- what layers call
    def prefetch(self, layer) -> None:
        """Plan ``layer``'s cold chunks for the current step and start copying as many as there are free slots."""
        self.cancel(layer.layer_idx)
        self.jobs[layer.layer_idx] = self.plan(layer)
        self._read_ahead(self.jobs[layer.layer_idx])
        self.planned_every_page[layer.layer_idx] = self.every_page
        self.versions[layer.layer_idx] = layer.offloaded_version()
        self._issue_waiting(layer.layer_idx)

    def plan(self, layer) -> list[Job]:
        """``prefetch="all"``, or a prefill step: every slab that holds pages, whole. ``"topk"``: the ``prefetch_share``
        of the cold pages the policy ranks highest, packed a slot at a time."""
        cold, config = layer.cold, layer.config
        if config.prefetch == "all" or self.every_page:
            return [Job.whole_slab(slab, rows, entries) for slab, rows, entries in cold.chunks(self.row_granule)
                    ] + self.plan_disk(layer)
        count = math.ceil(len(cold.entries) * config.prefetch_share)  # at least one page of a non-empty tier
        chosen = [cold.entries[index] for index in layer.policy.pick_prefetches(cold.starts, count)]
        slot_pages = self.ring.pages.shape[1]
        return [Job.chosen(cold.slabs, chosen[first:first + slot_pages]) for first in range(0, len(chosen), slot_pages)]

    def plan_disk(self, layer) -> list[Job]:
        """Every disk page of ``layer``, a slot's worth per job (the disk tier needs prefetch="all")."""
        if layer.disk is None:
            return []
        entries, slot_pages = layer.disk.entries, self.ring.pages.shape[1]
        return [Job.from_disk(layer.disk, entries[first:first + slot_pages])
                for first in range(0, len(entries), slot_pages)]

    def chunks(self, layer):
        """Yield ``layer``'s cold pages as staged chunks, every one of them, each chunk holding every slot of the
        layer that is already on its way (so one launch reads them all); the consumer launches its attention over
        each before asking for the next, and the slots are recycled after that attention."""
        index = layer.layer_idx
        if (index not in self.jobs or self.versions[index] != layer.offloaded_version()
                or self.planned_every_page[index] != self.every_page):
            self.replans += index in self.jobs
            self.prefetch(layer)
        jobs = self.jobs[index]
        while jobs:
            if jobs[0].slot is None:
                self._issue_now(index, jobs[0])
            group = list(itertools.takewhile(lambda job: job.slot is not None, jobs))  # every slot already coming
            for job in group:
                if job.ready is not None:
                    torch.cuda.current_stream(self.ring.pages.device).wait_event(job.ready)
            yield StagedChunk(self.ring, self.layout, group)
            del jobs[:len(group)]
            for job in group:
                self._release(job)
            self._issue_waiting(index)
        del self.jobs[index]
        for other in list(self.jobs):  # the next layer's chunks take the freed slots (and the reader, its freed rows)
            self._read_ahead(self.jobs[other])
            self._issue_waiting(other)

    def start_static_step(self) -> None:
        """Before a fixed-shape decode step (kvtier.graph), outside any capture: forget the plans an eager step made
        ahead, and order the device stream after every copy already issued, so that the step (or the graph replaying
        it) copies each layer's cold chunks itself, after whatever read the slots before."""
        for layer_index in list(self.jobs):
            self.cancel(layer_index)
        if self.stream is not None:
            torch.cuda.current_stream(self.ring.pages.device).wait_stream(self.stream)
        self.slot_released = [None] * len(self.slot_released)
        self.host_written = None
        self.row_granule = STATIC_ROW_GRANULE

    def static_plan(self, layer) -> tuple:
        """What a fixed-shape step copies for ``layer``: each chunk's slab and rows (a captured step must be captured
        again when this changes)."""
        return tuple((slab.pages.data_ptr(), rows) for slab, rows in layer.cold.chunk_rows(STATIC_ROW_GRANULE))

    def end_static_step(self) -> None:
        """After a fixed-shape step (or its replay), outside any capture: later copies into any slot wait for it, and
        no event recorded inside a capture is waited on outside it."""
        self.host_written = None
        self.row_granule = 1
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.ring.pages.device))
            self.slot_released = [done] * len(self.slot_released)

    def host_write_done(self) -> None:
        """Call after queueing device-to-host demotions: later copies out of host memory wait for them."""
        if self.stream is not None:
            self.host_written = torch.cuda.Event()
            self.host_written.record(torch.cuda.current_stream(self.ring.pages.device))

    def wait_for_host_writes(self) -> None:
        """Block the host until the queued device-to-host demotions have landed (before the host reads cold pages)."""
        if self.host_written is not None:
            self.host_written.synchronize()

    def cancel(self, layer_index: int) -> None:
        """Forget a layer's plan; its slots go back to the ring (a copy still in flight is ordered before the next
        copy into the slot, both on the side stream)."""
        for job in self.jobs.pop(layer_index, []):
            if job.slot is not None:
                self.free_slots.append(job.slot)
            self._forget_read_ahead(job)

    def quiesce(self) -> None:
        """Forget every layer's plan and wait until no copy into or out of host memory is in flight, so that pages
        may move between host rows, slabs and files (a budget change); the next step plans afresh."""
        for layer_index in list(self.jobs):
            self.cancel(layer_index)
        if self.reader is not None:  # one thread, in order: reads submitted before are done once this one is
            self.reader.submit(lambda: None).result()
            self.read_rows.reclaim()
        if self.stream is not None:
            self.stream.synchronize()
        self.wait_for_host_writes()

    def release_gather_rows(self, host_budget) -> None:
        """Give ``prefetch="topk"``'s gather rows back to ``host_budget`` (after :meth:`quiesce`); they are paid for
        again at the next job of scattered rows, if they fit then."""
        if self.gather is not None and self.host_budget is not None:
            self.host_budget.release(GatherRows.bytes_for(*self.ring.pages.shape))
            self.gather = None
        self.host_budget = host_budget

    # ---------------------------------------------------------------- slots and copies
    def _issue_waiting(self, layer_index: int) -> None:
        """Start the copies of the layer's jobs that have no slot yet, while slots are free. A copy that fails here
        (ahead of need, maybe inside another layer's update) leaves its job waiting, to be retried when needed."""
        for job in self.jobs.get(layer_index, []):
            if job.slot is None and job.error is None and self.free_slots:
                try:
                    self._issue(job, self.free_slots.popleft())
                except Exception as error:  # noqa: BLE001 -- deferred: _issue_now retries it, then raises
                    job.error = error
                    self.failed_copies += 1

    def _issue_now(self, layer_index: int, job: Job) -> None:
        """Issue a job attention needs now (again, if its copy failed ahead); a second failure forgets the layer's
        plan (its slots go back) and raises: kvtier's own errors as they are, others as a KVTierError."""
        try:
            self._issue(job, self._take_slot(layer_index))
        except Exception as error:
            self.cancel(layer_index)
            if isinstance(error, KVTierError):
                raise
            first = f" (and when issued ahead: {job.error})" if job.error is not None else ""
            raise KVTierError(
                f"kvtier: copying layer {layer_index}'s cold pages to the device failed: {error}{first}. Every page "
                "is still where it was (host rows, disk files); retrying the step replans the copies. If it keeps "
                "failing, check the device (memory, driver) or attach with cold_attention='host'."
            ) from error
        job.error = None

    def _take_slot(self, layer_index: int) -> int:
        """A free slot, or else one taken back from another layer's chunk that is not consumed yet, or else from one of
        this layer's later chunks (when its first chunk's copy failed ahead, the later ones may hold every slot)."""
        if self.free_slots:
            return self.free_slots.popleft()
        owners = [other for other in self.jobs if other != layer_index] + [layer_index]
        for other in owners:
            for job in reversed(self.jobs.get(other, [])[1 if other == layer_index else 0:]):
                if job.slot is not None:
                    slot, job.slot, job.ready = job.slot, None, None
                    return slot
        raise RuntimeError("the staging ring has no slot to give")  # staging_chunks >= 2 prevents this

    def _issue(self, job: Job, slot: int) -> None:
        """Copy the job into ``slot``; if a copy raises, the slot goes back to the ring and the job has none."""
        job.slot = slot
        try:
            if self.stream is None:  # off CUDA: plain synchronous copies
                self._copy_runs(job, slot)
            else:
                with torch.cuda.stream(self.stream):
                    for event in (self.slot_released[slot], self.host_written):
                        if event is not None:
                            self.stream.wait_event(event)
                    self._copy_runs(job, slot)
                    job.ready = torch.cuda.Event()
                    job.ready.record(self.stream)
        except BaseException:
            job.slot, job.ready = None, None
            self.free_slots.appendleft(slot)
            raise
        self.moved_chunks += 1

    def _copy_runs(self, job: Job, slot: int) -> None:
        """Each run of host rows (page bytes and positions) into the slot, one after another (asynchronous on the
        side stream from pinned host memory); several runs are gathered into pinned rows first, when those could be
        paid for out of the host budget; disk pages are read into those rows first."""
        if job.disk is not None:
            return self._load_and_copy(job, slot)
        if len(job.runs) > 1 and self._gather_rows() is not None:
            return self._gather_and_copy(job, slot)
        row = 0
        for slab, first, count in job.runs:
            pages, positions = self.ring.pages[slot, row:row + count], self.ring.positions[slot, row:row + count]
            pages.copy_(slab.pages[first:first + count], non_blocking=True)
            positions.copy_(slab.positions[first:first + count], non_blocking=True)
            self.moved_bytes += pages.nbytes + positions.nbytes
            row += count

    def _gather_rows(self) -> GatherRows | None:
        if self.gather is None and self.host_budget is not None:
            slots, chunk_pages, page_bytes = self.ring.pages.shape
            if self.host_budget.reserve(GatherRows.bytes_for(slots, chunk_pages, page_bytes)):
                self.gather = GatherRows(slots, chunk_pages, page_bytes, pin=self.stream is not None)
            else:
                self.host_budget = None  # no room: runs are copied one by one from now on
        return self.gather

    def _gather_and_copy(self, job: Job, slot: int) -> None:
        """The job's rows gathered from each slab into the slot's pinned rows (on the host, once the previous copy
        out of them and the queued demotions into the slabs are done), then one copy of pages and one of positions into
        the ring slot."""
        gather, count = self.gather, job.rows
        if gather.copied[slot] is not None:
            gather.copied[slot].synchronize()
        self.wait_for_host_writes()  # the host reads the slabs itself here, so it waits for pages still landing
        by_slab: dict[int, tuple[HostSlab, list[int]]] = {}
        for slab, first, rows in job.runs:  # runs are in (slab, row) order, so each slab's rows stay together
            by_slab.setdefault(id(slab), (slab, []))[1].extend(range(first, first + rows))
        row = 0
        for slab, rows in by_slab.values():
            index = torch.tensor(rows)
            torch.index_select(slab.pages, 0, index, out=gather.pages[slot, row:row + len(rows)])
            torch.index_select(slab.positions, 0, index, out=gather.positions[slot, row:row + len(rows)])
            row += len(rows)
        self._send_gathered(slot, count)

    def _send_gathered(self, slot: int, count: int) -> None:
        """The first ``count`` gathered rows of ``slot`` (pages and positions) into the ring slot, in two copies; the
        next gather into those rows waits for them."""
        gather = self.gather
        pages, positions = self.ring.pages[slot, :count], self.ring.positions[slot, :count]
        pages.copy_(gather.pages[slot, :count], non_blocking=True)
        positions.copy_(gather.positions[slot, :count], non_blocking=True)
        if self.stream is not None:
            gather.copied[slot] = torch.cuda.Event()
            gather.copied[slot].record(self.stream)
        self.moved_bytes += pages.nbytes + positions.nbytes

    @property
    def read_ahead_jobs(self) -> int:
        """Disk jobs whose pages the reader holds or reads (forgotten reads still running included): at most the
        ring's slots, the read-ahead rows the host budget paid for."""
        return 0 if self.read_rows is None else self.read_rows.taken

    def _read_ahead(self, jobs: list[Job]) -> None:
        """Start reading the planned disk jobs' pages on the reader thread, each into a free slot of the read-ahead
        rows (none free: the rest are read in line when needed), while this thread goes on with the layers before."""
        for job in jobs:
            if job.disk is None or job.read_ahead is not None:
                continue
            slot = self.read_rows.take() if self.read_rows is not None else None
            if slot is None:
                return
            if self.reader is None:
                self.reader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-disk")
            rows = self.read_rows.pages[slot, :job.rows]  # (rows, page_bytes)
            job.read_ahead, job.read_slot = self.reader.submit(job.disk.read_rows, list(job.entries), rows), slot

    def _forget_read_ahead(self, job: Job) -> None:
        """The job's read ahead is no longer wanted: its rows go back once it cannot write into them any more."""
        if job.read_ahead is not None:
            self.read_rows.give_back(job.read_slot, job.read_ahead)
            job.read_ahead, job.read_slot = None, None

    def _load_and_copy(self, job: Job, slot: int) -> None:
        """The job's disk pages (read ahead on the reader thread, or else read here), checked and decompressed, into the
        slot's pinned rows (once the previous copy out of them is done), then one copy of pages and one of positions
        into the ring slot."""
        gather, count = self.gather, job.rows
        if gather.copied[slot] is not None:
            gather.copied[slot].synchronize()
        future = job.read_ahead
        if future is not None:
            try:
                gather.pages[slot, :count].copy_(future.result())  # (count, page_bytes): a reader error raises here
            except Exception:  # noqa: BLE001 -- read it again here: a bad page raises its DiskReadError from this thread
                future = None
            else:
                gather.positions[slot, :count].copy_(torch.tensor([entry.start for entry in job.entries]))
                self.read_ahead_pages += count
                job.disk.read_pages += count
            self._forget_read_ahead(job)  # the read is done (copied out, or failed): its rows are free again
        if future is None:
            job.disk.load_into(job.entries, gather.pages[slot, :count], gather.positions[slot, :count])
        self._send_gathered(slot, count)

    @staticmethod
    def read_rows_bytes(slots: int, chunk_pages: int, page_bytes: int) -> int:
        """Host bytes the disk tier's reads take: the pinned rows a slot's pages land in before their copy, and as many
        rows again that the reader thread fills ahead of need (:class:`ReadAheadRows`)."""
        return 2 * GatherRows.bytes_for(slots, chunk_pages, page_bytes)

    def reserve_read_rows(self) -> bool:
        """Pay for the rows disk pages are read into, out of the host budget, now; False if they do not fit."""
        slots, chunk_pages, page_bytes = self.ring.pages.shape
        if self.gather is None:
            if self.host_budget is None or not self.host_budget.reserve(self.read_rows_bytes(slots, chunk_pages,
                                                                                             page_bytes)):
                return False
            self.gather = GatherRows(slots, chunk_pages, page_bytes, pin=self.stream is not None)
            self.read_rows = ReadAheadRows(slots, chunk_pages, page_bytes)
        return True

    def _release(self, job: Job) -> None:
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.ring.pages.device))
            self.slot_released[job.slot] = event
        self.free_slots.append(job.slot)
        job.slot = None
