"""The disk tier of one layer: cold pages spilled past the host budget into segment files, lz4-framed, checksummed.

A disk page keeps its :class:`~kvtier.pages.PageLayout` bytes (the same packed codes as a warm or cold page), each
compressed on its own as one ``lz4.frame`` and appended to the layer's current segment file; an in-memory index
keeps, for each page, its first position, its segment, offset, compressed length and the CRC-32 of its uncompressed
bytes, which every read checks. A segment takes ``segment_pages`` pages, then the next one opens. Free space is
reused simply: a segment's bytes count against the disk budget until every page in it has left (read back for good,
or evicted); then its file is deleted and its bytes return. Pages come back to the host a staging slot at a time
(see kvtier.prefetch), decompressed into pinned rows that the host budget paid for up front.
"""

from __future__ import annotations

import errno
import os
import weakref
import zlib
from dataclasses import dataclass

import numpy
import torch

from .budget import ByteBudget
from .errors import DiskReadError, DiskWriteError
from .pages import NoRoomForPage, PageLayout


class DiskSegment:
    """One append-only segment file of a layer's disk pages."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.close = weakref.finalize(self, os.close, self.fd)  # closes it once, here or when the segment is collected
        self.size = 0  # bytes written (dead pages included, until the file goes)
        self.pages = 0  # pages ever appended
        self.live = 0  # pages still indexed

    def write(self, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def read(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def delete(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class DiskEntry:
    """One disk page: the tokens starting at ``start``, ``length`` compressed bytes at ``offset`` of ``segment``."""

    start: int
    segment: DiskSegment
    offset: int
    length: int
    checksum: int  # CRC-32 of the uncompressed page bytes
    row: int = 0  # its row in the staging slot it is read into (set when a read is planned)


class DiskPages:
    """One layer's disk pages, in segment files under ``directory``, with at most ``share_bytes`` of ``budget``."""

    def __init__(self, layout: PageLayout, directory: str, layer_idx: int, budget: ByteBudget, share_bytes: int,
                 segment_pages: int):
        self.layout = layout
        self.block_size = layout.block_size
        self.directory = directory
        self.layer_idx = layer_idx
        self.budget = budget
        self.share_bytes = share_bytes
        self.segment_pages = segment_pages
        self.segments: list[DiskSegment] = []  # the files holding live pages; the last one takes appends
        self.entries: list[DiskEntry] = []  # in the order they arrived
        self.starts: list[int] = []  # their first positions, in the same order (what policies rank)
        self.version = 0  # changes whenever a page arrives or leaves
        self.written_bytes = 0  # uncompressed page bytes ever written (with file_bytes: the compression ratio)
        self.compressed_bytes = 0  # and what they took in the files
        self.read_pages = 0
        self.opened_segments = 0

    @property
    def tokens(self) -> int:
        return len(self.entries) * self.block_size

    @property
    def file_bytes(self) -> int:
        return sum(segment.size for segment in self.segments)

    def store(self, start: int, page: torch.Tensor) -> None:
        """Append one page's bytes (page_bytes,) uint8 on the CPU to the current segment. Raises NoRoomForPage when
        the disk budget has no room, DiskWriteError when the write fails; either way nothing changed."""
        raw = page.numpy().tobytes()
        frame = _lz4_frame().compress(raw)
        if self.file_bytes + len(frame) > self.share_bytes or not self.budget.reserve(len(frame)):
            raise NoRoomForPage()
        segment = self._segment_for_append()
        offset = segment.size
        try:
            segment.write(frame, offset)
        except OSError as error:
            self.budget.release(len(frame))
            self._undo_append(segment, offset)
            raise DiskWriteError(self._write_message(segment, start, error)) from error
        segment.size += len(frame)
        segment.pages += 1
        segment.live += 1
        self.entries.append(DiskEntry(start, segment, offset, len(frame), zlib.crc32(raw)))
        self.starts.append(start)
        self.written_bytes += len(raw)
        self.compressed_bytes += len(frame)
        self.version += 1

    def frame_bytes(self, page: torch.Tensor) -> int:
        """What :meth:`store` would append for ``page`` (page_bytes,) uint8 on the CPU: its lz4 frame's length."""
        return len(_lz4_frame().compress(page.numpy().tobytes()))

    def load_into(self, entries: list[DiskEntry], pages: torch.Tensor, positions: torch.Tensor) -> None:
        """Read ``entries`` into host rows: pages (n, page_bytes) uint8 and positions (n,) int32, in order; every
        page's checksum is verified."""
        for row, entry in enumerate(entries):
            pages[row].numpy()[:] = numpy.frombuffer(self.read(entry), dtype=numpy.uint8)
            positions[row] = entry.start
        self.read_pages += len(entries)

    def read_rows(self, entries: list[DiskEntry], rows: torch.Tensor) -> torch.Tensor:
        """``entries``' pages read and checked into ``rows`` (n, page_bytes) uint8 on the CPU, host rows the caller
        paid for (kvtier.prefetch.ReadAheadRows), which it returns: what the reader thread runs (it touches no shared
        state but ``rows``; a segment deleted meanwhile makes the read fail, and its plan is stale anyway)."""
        for row, entry in enumerate(entries):
            rows[row].numpy()[:] = numpy.frombuffer(self.read(entry), dtype=numpy.uint8)
        return rows

    def page(self, entry: DiskEntry) -> torch.Tensor:
        """One page's bytes (page_bytes,) uint8 on the CPU, checked against its CRC-32 (as ColdPages.page)."""
        return torch.frombuffer(bytearray(self.read(entry)), dtype=torch.uint8)

    def read(self, entry: DiskEntry) -> bytes:
        """One page's uncompressed bytes, checked against its CRC-32."""
        try:
            frame = entry.segment.read(entry.length, entry.offset)
            raw = _lz4_frame().decompress(frame)
        except (OSError, RuntimeError) as error:
            raise DiskReadError(self._read_message(entry, f"could not be read back ({error})")) from error
        if len(raw) != self.layout.page_bytes or zlib.crc32(raw) != entry.checksum:
            raise DiskReadError(self._read_message(entry, "failed its checksum (CRC-32 of the page bytes)"))
        return raw

    def drop(self, index: int) -> DiskEntry:
        """Forget the page at ``index`` of ``entries`` (its tokens leave the cache); a segment left without pages is
        deleted and its bytes return to the budget."""
        entry = self.entries.pop(index)
        self.starts.pop(index)
        entry.segment.live -= 1
        if entry.segment.live == 0:
            self._delete(entry.segment)
        self.version += 1
        return entry

    def release_all(self) -> None:
        for segment in list(self.segments):
            self._delete(segment)
        self.entries, self.starts = [], []
        self.version += 1

    # ---------------------------------------------------------------- segments
    def _segment_for_append(self) -> DiskSegment:
        if not self.segments or self.segments[-1].pages >= self.segment_pages:
            path = os.path.join(self.directory, f"layer{self.layer_idx:03d}-segment{self.opened_segments:06d}.lz4")
            self.segments.append(DiskSegment(path))
            self.opened_segments += 1
        return self.segments[-1]

    def _undo_append(self, segment: DiskSegment, offset: int) -> None:
        """After a failed write: cut the segment back to what it held (a new empty segment goes)."""
        if segment.pages == 0:
            self.segments.remove(segment)
            segment.delete()
            return
        try:
            segment.truncate(offset)
        except OSError:
            pass  # the bytes past ``offset`` are never indexed, and the next append writes over them

    def _delete(self, segment: DiskSegment) -> None:
        self.segments.remove(segment)
        self.budget.release(segment.size)
        segment.delete()

    # ---------------------------------------------------------------- messages
    def _write_message(self, segment: DiskSegment, start: int, error: OSError) -> str:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        cause = "the disk is full" if full else "the write failed"
        return (
            f"kvtier: spilling layer {self.layer_idx}'s page at position {start:,} to {segment.path} failed: {cause} "
            f"({error}). The page stayed in host memory and nothing was lost. "
            + ("Free disk space, lower disk_budget_gb below the free space, or point disk_dir at a larger disk."
               if full else "Check the disk behind disk_dir, or point disk_dir at another disk.")
        )

    def _read_message(self, entry: DiskEntry, what: str) -> str:
        return (
            f"kvtier: layer {self.layer_idx}'s disk page at position {entry.start:,} ({entry.length:,} bytes at offset "
            f"{entry.offset:,} of {entry.segment.path}) {what}: the file was changed or the disk returned bad data. "
            "This cache's tokens cannot be trusted; start a new generate() (a new cache), and check the disk behind "
            "disk_dir, or point disk_dir at another disk."
        )


def _lz4_frame():
    """lz4.frame, imported when the disk tier is used (the optional extra ``kvtier[disk]``; TierConfig checks it)."""
    import lz4.frame

    return lz4.frame
