"""The warm tier of one layer: fixed-size INT4 pages in slabs, and the block table that orders them.

A page holds ``block_size`` consecutive tokens of every sequence in the batch and every KV head.
Pages live in slabs of several pages (one allocation per slab, never one per page); a freed page's
slot is reused before a new slab is asked for. Every slab is paid for out of the cache's budget
before it is allocated, and no layer takes more than its equal share of the warm budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import int4

# the tensors of one page, in slab order; the slab tensors carry a leading page axis
PAGE_FIELDS = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min")


@dataclass
class PageEntry:
    """One row of the block table: which slab slot holds the tokens starting at ``start``."""

    page_id: int
    start: int  # position of the page's first token in the sequence


class NoRoomForPage(Exception):
    """Raised by :meth:`WarmPages.store` when the budget has no room for one more page."""


class WarmPages:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, block_size: int, device, pages_per_slab: int,
                 budget, share_bytes: int = 0, key_axis: str = "channel", key_group: int | None = None):
        key_group = key_group or block_size
        if key_axis == "channel":  # one (scale, min) per channel and group of key_group tokens
            key_params = (batch, kv_heads, block_size // key_group, head_dim)
        else:  # one per token
            key_params = (batch, kv_heads, block_size, 1)
        self.channel_param_fields = ("key_scale", "key_min") if key_axis == "channel" else ()
        self.shapes = {  # per page
            "key_codes": (batch, kv_heads, block_size, head_dim // 2),
            "key_scale": key_params,
            "key_min": key_params,
            "value_codes": (batch, kv_heads, block_size, head_dim // 2),
            "value_scale": (batch, kv_heads, block_size, 1),
            "value_min": (batch, kv_heads, block_size, 1),
        }
        self.block_size = block_size
        self.device = device
        self.pages_per_slab = pages_per_slab
        self.budget = budget  # has reserve(nbytes) -> bool and release(nbytes)
        self.share_bytes = share_bytes  # this layer's share of the warm budget, so that layers hold equal context
        self.slabs: list[dict[str, torch.Tensor]] = []
        self.slab_offsets: list[int] = []  # page id of each slab's first slot
        self.free_page_ids: list[int] = []
        self.table: list[PageEntry] = []  # in position order

    @property
    def page_bytes(self) -> int:
        total = 0
        for name, shape in self.shapes.items():
            dtype = torch.uint8 if name.endswith("codes") else int4.PARAM_DTYPE
            total += torch.Size(shape).numel() * dtype.itemsize
        return total

    @property
    def capacity(self) -> int:
        return sum(slab["key_codes"].shape[0] for slab in self.slabs)

    @property
    def allocated_bytes(self) -> int:
        return self.capacity * self.page_bytes

    def store(self, start: int, page: dict[str, torch.Tensor]) -> None:
        """Write one quantized block (tensors named by PAGE_FIELDS, page shapes) at the end of the table."""
        if self.table and start != self.table[-1].start + self.block_size:
            raise AssertionError(f"warm pages out of order: {start} after {self.table[-1].start}")
        if not self.free_page_ids:
            self._grow()
        page_id = self.free_page_ids.pop()
        slab, slot = self._locate(page_id)
        for name in PAGE_FIELDS:
            slab[name][slot].copy_(page[name])
        self.table.append(PageEntry(page_id, start))

    def read(self, entries: list[PageEntry]) -> dict[str, torch.Tensor]:
        """Gather the pages of ``entries`` (consecutive in the table) into tensors with a token axis:
        codes (B, H, n * block, D // 2); per-token params (B, H, n * block, 1); per-channel key params (n, B, H, groups, D)."""
        located = [self._locate(entry.page_id) for entry in entries]
        gathered = {name: torch.stack([slab[name][slot] for slab, slot in located]) for name in PAGE_FIELDS}
        batch, heads = self.shapes["key_codes"][:2]
        for name in PAGE_FIELDS:
            tensor = gathered[name]  # (n, B, H, block or groups, X)
            if name in self.channel_param_fields:
                continue  # per-channel key params stay per page: (n, B, H, groups, D)
            gathered[name] = tensor.permute(1, 2, 0, 3, 4).reshape(batch, heads, -1, tensor.shape[-1])
        return gathered

    def drop(self, index: int) -> PageEntry:
        """Free the page at ``index`` in the block table (its tokens leave the cache); return its row."""
        entry = self.table.pop(index)
        self.free_page_ids.append(entry.page_id)
        return entry

    def release_all(self) -> None:
        self.budget.release(self.allocated_bytes)
        self.slabs, self.slab_offsets, self.free_page_ids, self.table = [], [], [], []

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis of every slab tensor (beam reorder, batch selection)."""
        for slab in self.slabs:
            for name in PAGE_FIELDS:
                slab[name] = fn(slab[name].transpose(0, 1)).transpose(0, 1).contiguous()
        new_batch = fn(torch.empty(self.shapes["key_codes"][0], 0)).shape[0]
        if new_batch != self.shapes["key_codes"][0]:
            if self.slabs:
                raise NotImplementedError("changing the batch size of a cache that holds warm pages")
            self.shapes = {name: (new_batch, *shape[1:]) for name, shape in self.shapes.items()}

    def _locate(self, page_id: int) -> tuple[dict[str, torch.Tensor], int]:
        for slab, offset in zip(reversed(self.slabs), reversed(self.slab_offsets)):
            if page_id >= offset:
                return slab, page_id - offset
        raise KeyError(page_id)

    def _grow(self) -> None:
        """Allocate a slab of as many pages (up to pages_per_slab) as the budget allows."""
        for pages in range(self.pages_per_slab, 0, -1):
            nbytes = pages * self.page_bytes
            if self.allocated_bytes + nbytes <= self.share_bytes and self.budget.reserve(nbytes):
                break
        else:
            raise NoRoomForPage()
        slab = {}
        for name, shape in self.shapes.items():
            dtype = torch.uint8 if name.endswith("codes") else int4.PARAM_DTYPE
            slab[name] = torch.empty((pages, *shape), dtype=dtype, device=self.device)
        offset = self.capacity
        self.slabs.append(slab)
        self.slab_offsets.append(offset)
        self.free_page_ids.extend(range(offset + pages - 1, offset - 1, -1))
