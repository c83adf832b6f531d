"""One decoder layer's tiered cache: a hot tier in the model dtype and a warm tier of packed pages (INT4 or
TurboQuant, see kvtier.formats).

Positions 0 .. sink_tokens-1 stay hot as attention sinks. Later tokens enter the recent buffer; when it
holds ``recent_window + block_size`` tokens, its oldest ``block_size`` tokens are quantized once into a
warm page. When the layer's share of the device budget is full, the policy picks a warm page to re-quantize
at fewer bits (``low_bits``: a low-precision warm page), to move byte for byte to the cold tier in host memory
(``on_budget_full="offload"``, kvtier.cold), or to drop; when the host share is full too, the policy's cold page
spills to the disk tier (``on_host_full="disk"``, kvtier.disk). Every token is in exactly one place (sinks, a warm
page, a low-precision page, a cold page, a disk page or the recent buffer), unless a full budget made the policy
drop pages (counted in ``evicted_tokens``). A page moves transactionally: it leaves its tier only once it has
fully arrived in the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from kvtier.kernels.decode_attention import PagedKV, hot_table_rows, hot_table_tensor

from .cold import ColdPages
from .disk import DiskPages
from .errors import BudgetExceededError, KVTierError
from .formats.turboquant import qjl_sketch
from .pages import NoRoomForPage, PageLayout, WarmPages
from .policies import make_policy
from .rotation import random_signs, rotation_matrix


SKETCH_SEED_OFFSET = 1 << 20
SEGMENT_CHUNKS = 4  # a disk segment file takes this many cold chunks' worth of pages


def _hot_bytes(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keys, values (B, H_kv, count, D) -> their bytes, keys first, as one (n,) uint8 tensor on the CPU."""
    return torch.stack((keys, values)).cpu().contiguous().view(-1).view(torch.uint8)


@dataclass
class TierView:
    """What a layer's ``update`` hands to the attention function: the layer, and the new chunk exactly.

    The chunk's own keys and values are attended in full precision (as a dense cache would on that
    step); everything before ``past_length`` is read from the tiers.
    """

    layer: "TieredLayer"
    new_keys: torch.Tensor  # (B, H_kv, L, D)
    new_values: torch.Tensor  # (B, H_kv, L, D)
    past_length: int
    step: "StaticStep | None" = None  # a fixed-shape decode step (kvtier.graph): attention reads its device buffers


class TieredLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.config = cache.config
        self.layer_idx = layer_idx
        self.total_tokens = 0  # positions seen, evicted ones included
        self.evicted_tokens = 0

    # ---------------------------------------------------------------- transformers Cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        config = self.config
        self.dtype, self.device = key_states.dtype, key_states.device
        self.policy = self.new_policy()
        self.cache.check_layer_shape(batch, kv_heads, head_dim, key_states.dtype, key_states.device)
        seed = config.rotation_seed + self.layer_idx
        signs = random_signs(head_dim, seed).to(self.device) if config.rotate else None  # (D,) +-1
        self.rotation = rotation_matrix(signs) if config.rotate else None  # (D, D) diag(signs) H / sqrt(D)
        self.rotation_signs = signs
        warm_format = self.cache.warm_format
        # the TurboQuant keys' QJL sketch (D, D), seeded apart from the rotation
        self.sketch = qjl_sketch(head_dim, SKETCH_SEED_OFFSET + seed).to(self.device) if warm_format.qjl else None
        # sinks at [0, sink_tokens), the recent buffer after them; zeroed, because attention reads whole hot pages
        # and masks the slots not filled yet (a NaN there would survive a zero weight)
        self.hot_keys = torch.zeros(batch, kv_heads, config.hot_capacity, head_dim, dtype=self.dtype,
                                    device=self.device)
        self.hot_values = torch.zeros_like(self.hot_keys)
        self.sink_count = 0
        self.recent_count = 0
        self.recent_start = config.sink_tokens  # position of recent_keys[:, :, 0]
        self.hot_pages = self._hot_pages()
        self.hot_table = hot_table_tensor(self.hot_pages, self.device)  # (3, n_hot)
        layout = PageLayout(batch, kv_heads, config.block_size, head_dim, warm_format)
        full_share, low_share = self.cache.split_warm_share(self.cache.warm_share_bytes)
        low_format = self.cache.low_format
        self.warm = WarmPages(layout, self.device, config.pages_per_slab, self.cache, full_share)
        # low-precision warm pages (the precision rule, low_bits), in the order the policy sends them
        self.low = WarmPages(PageLayout(batch, kv_heads, config.block_size, head_dim, low_format), self.device,
                             config.pages_per_slab, self.cache, low_share, in_order=False) if low_format else None
        self.cold = ColdPages(layout, self.cache.chunk_pages, self.cache.host_budget, self.cache.host_share_bytes,
                              pin=self.device.type == "cuda") if config.offloads else None
        self.disk = DiskPages(layout, self.cache.disk_directory, self.layer_idx, self.cache.disk_budget,
                              self.cache.disk_share_bytes,
                              SEGMENT_CHUNKS * self.cache.chunk_pages) if config.spills else None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cache.check_states(key_states, value_states, self)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_length = self.total_tokens
        self.append(key_states, value_states)
        view = TierView(self, key_states, value_states, past_length)
        return view, view

    def update_static(self, keys: torch.Tensor, values: torch.Tensor, step):
        """A decode step that does not depend on host state (kvtier.graph): the new token (B, H_kv, 1, D) goes into
        the hot slot ``step.slot``; the counters advance afterwards, in :meth:`advance_static`."""
        self.hot_keys.index_copy_(2, step.slot, keys)
        self.hot_values.index_copy_(2, step.slot, values)
        if self.config.check_finite:  # read once per step, after the last layer (DecodeGraph.finish)
            step.nonfinite[self.layer_idx] = ~torch.isfinite(keys.sum(dtype=torch.float32)
                                                             + values.sum(dtype=torch.float32))
        view = TierView(self, keys, values, self.total_tokens, step)
        return view, view

    def make_room_static(self) -> None:
        """Before a static step: if its token will fill the recent buffer, send the buffer's oldest block to a warm
        page now, as :meth:`append` would have right after storing the token (so attention reads the same tiers)."""
        if self.recent_count + 1 == self.recent_keys.shape[2]:
            self.flush_oldest_block()

    def advance_static(self) -> None:
        """After a static step: count the token it wrote."""
        self.recent_count += 1
        self.total_tokens += 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.total_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.warm.release_all()
            if self.low is not None:
                self.low.release_all()
            if self.cold is not None:
                self.cold.release_all()
            if self.disk is not None:
                self.disk.release_all()
        self.total_tokens = self.evicted_tokens = 0
        self.sink_count = self.recent_count = 0
        if self.is_initialized:
            self.recent_start = self.config.sink_tokens
            self.policy = self.new_policy()
            self.hot_pages = self._hot_pages()
            self.hot_table = hot_table_tensor(self.hot_pages, self.device)

    def new_policy(self):
        """This layer's own copy of the configured policy, with no history."""
        return make_policy(self.config.policy).for_layer(self.config.block_size, self.device)

    # ---------------------------------------------------------------- every page, for saving and restoring
    def pages_in_order(self):
        """Every token the layer holds, tier by tier, as (tier, start position, bytes (n,) uint8 on the CPU), in
        position order: the sinks ("hot", 0), every "warm", "low", "cold" and "disk" page, then the recent buffer ("hot",
        recent_start; yielded even when empty, since it says where the next token goes). Hot bytes are the keys, then
        the values, (B, H_kv, count, D) in the model dtype; a page's bytes are its PageLayout bytes. Tokens the layer
        does not hold were evicted. A new tier adds its pages here and in :meth:`restore_pages`."""
        yield "hot", 0, _hot_bytes(self.sink_keys[:, :, :self.sink_count], self.sink_values[:, :, :self.sink_count])
        tiers = [("warm", self.warm, self.warm.table), ("low", self.low, self.low.table if self.low else []),
                 ("cold", self.cold, self.cold.entries if self.cold else []),
                 ("disk", self.disk, self.disk.entries if self.disk else [])]
        rows = sorted((entry.start, name, tier, entry) for name, tier, entries in tiers for entry in entries)
        for start, name, tier, entry in rows:
            yield name, start, tier.page(entry).cpu()
        recent = slice(0, self.recent_count)
        yield "hot", self.recent_start, _hot_bytes(self.recent_keys[:, :, recent], self.recent_values[:, :, recent])

    def restore_pages(self, pages) -> None:
        """Put back what :meth:`pages_in_order` yielded into this initialized, empty layer; the token counters follow
        from the pages (tokens between them were evicted). Raises KVTierError (BudgetExceededError when a tier's
        share is full) if the pages do not fit this layer; the caller then releases the cache."""
        block, sinks = self.config.block_size, self.config.sink_tokens
        hot, next_free = [], sinks  # the first position a page may start at
        for name, start, data in pages:
            if name == "hot":
                hot.append((start, self._hot_states(data)))  # (2, B, H, count, D)
                continue
            tier = {"warm": self.warm, "low": self.low, "cold": self.cold, "disk": self.disk}.get(name)
            if tier is None or data.numel() != tier.layout.page_bytes or start < next_free or (start - sinks) % block:
                raise KVTierError(
                    f"kvtier: layer {self.layer_idx} cannot hold a {name} page of {data.numel():,} bytes at position "
                    f"{start} (expected {tier.layout.page_bytes if tier else 'no'} bytes at a position >= {next_free} "
                    f"on the {block}-token grid after {sinks} sinks). Load with the TierConfig the cache was saved "
                    "with (on_budget_full, low_bits and the page format).")
            try:
                tier.store(start, data.to("cpu" if name in ("cold", "disk") else self.device))
            except NoRoomForPage:
                raise BudgetExceededError(f"kvtier: layer {self.layer_idx}'s share of the {name} budget is full after "
                                          f"{len(tier.starts)} pages; raise budget_gb (or host_budget_gb for cold "
                                          "pages) to restore this cache.") from None
            next_free = start + block
        if len(hot) != 2 or hot[0][0] != 0 or hot[1][0] < next_free:
            raise KVTierError(f"kvtier: layer {self.layer_idx} got hot segments at {[start for start, _ in hot]}; "
                              "expected the sinks at 0 and the recent buffer after every page.")
        (_, sink_states), (self.recent_start, recent_states) = hot
        self.sink_count, self.recent_count = sink_states.shape[3], recent_states.shape[3]
        self.hot_keys[:, :, :self.sink_count], self.hot_values[:, :, :self.sink_count] = sink_states
        self.recent_keys[:, :, :self.recent_count], self.recent_values[:, :, :self.recent_count] = recent_states
        self.total_tokens = self.recent_start + self.recent_count if self.sink_count == sinks else self.sink_count
        held = self.hot_tokens() + self.warm_tokens() + self.low_tokens() + self.cold_tokens() + self.disk_tokens()
        self.evicted_tokens = self.total_tokens - held
        self.hot_pages = self._hot_pages()
        self.hot_table = hot_table_tensor(self.hot_pages, self.device)

    def _hot_states(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 bytes of hot keys then values -> (2, B, H_kv, count, D) in the layer's dtype on its device."""
        batch, heads, capacity, dim = self.hot_keys.shape
        per_token = 2 * batch * heads * dim * self.dtype.itemsize
        if data.numel() % per_token or data.numel() // per_token > capacity:
            raise KVTierError(f"kvtier: layer {self.layer_idx} got {data.numel():,} hot bytes, not a whole number of "
                              f"tokens of {per_token:,} bytes (batch {batch}, {heads} KV heads, head dim {dim}, "
                              f"{self.dtype}) up to {capacity}.")
        return data.view(self.dtype).view(2, batch, heads, data.numel() // per_token, dim).to(self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda tensor: tensor[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "kvtier's TieredCache cannot crop: quantized warm pages cannot be rolled back. Assisted or speculative "
            "decoding needs a croppable cache; run it after kvtier.detach(model)."
        )

    # ---------------------------------------------------------------- tiers
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place new tokens (B, H_kv, L, D): sinks first, then the recent buffer, flushing full blocks warm.

        A long chunk whose tokens would flush more than a block past the recent buffer's goes through
        :meth:`append_long` instead: the same pages, quantized several blocks at a time."""
        count = keys.shape[2]
        taken = min(self.config.sink_tokens - self.sink_count, count)
        if taken > 0:
            self.sink_keys[:, :, self.sink_count:self.sink_count + taken] = keys[:, :, :taken]
            self.sink_values[:, :, self.sink_count:self.sink_count + taken] = values[:, :, :taken]
            self.sink_count += taken
            self.total_tokens += taken
        capacity = self.recent_keys.shape[2]
        if self._flushed_tokens(count - taken) - self.recent_count >= self.config.block_size:
            self.append_long(keys[:, :, taken:], values[:, :, taken:])
            return
        while taken < count:
            room = min(capacity - self.recent_count, count - taken)
            end = self.recent_count + room
            self.recent_keys[:, :, self.recent_count:end] = keys[:, :, taken:taken + room]
            self.recent_values[:, :, self.recent_count:end] = values[:, :, taken:taken + room]
            self.recent_count = end
            self.total_tokens += room
            taken += room
            if self.recent_count == capacity:
                self.flush_oldest_block()

    def _flushed_tokens(self, arriving: int) -> int:
        """How many of the recent buffer's tokens followed by ``arriving`` new ones leave for warm pages: a block
        each time the buffer fills, until it holds fewer than its capacity."""
        capacity, block = self.recent_keys.shape[2], self.config.block_size
        waiting = self.recent_count + arriving
        if waiting < capacity:
            return 0
        return waiting - (capacity - block + (waiting - capacity) % block)

    def append_long(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (B, H_kv, L, D) after the sinks: the recent buffer's tokens and the first new ones leave in
        whole blocks, quantized up to key_tile tokens at a time straight from ``keys``; the last ones become the
        buffer."""
        block, held = self.config.block_size, self.recent_count
        flushed = self._flushed_tokens(keys.shape[2])
        lead = -held % block  # new tokens that complete the buffer's last block
        if held:
            self.store_blocks(torch.cat((self.recent_keys[:, :, :held], keys[:, :, :lead]), 2),
                              torch.cat((self.recent_values[:, :, :held], values[:, :, :lead]), 2), self.recent_start)
        self.store_blocks(keys[:, :, lead:flushed - held], values[:, :, lead:flushed - held],
                          self.recent_start + held + lead)
        kept = keys.shape[2] - (flushed - held)
        self.recent_keys[:, :, :kept] = keys[:, :, flushed - held:]
        self.recent_values[:, :, :kept] = values[:, :, flushed - held:]
        self.recent_count = kept
        self.total_tokens += keys.shape[2]
        self._advance_recent(flushed)

    def store_blocks(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Quantize whole blocks (B, H_kv, n * block, D) starting at position ``start`` into warm pages, at most
        key_tile tokens per quantization (the scratch estimate's bound), and store each quantization's pages in order,
        at once where the share has room (:meth:`store_pages`)."""
        block = self.config.block_size
        run = max(block, self.config.key_tile // block * block)
        for first in range(0, keys.shape[2], run):
            chunk_keys, chunk_values = keys[:, :, first:first + run], values[:, :, first:first + run]
            pages = self.quantize_blocks(chunk_keys, chunk_values,
                                         self.cache.valid_tokens(start + first, chunk_keys.shape[2]))
            self.store_pages(start + first, pages)

    def flush_oldest_block(self) -> None:
        """Quantize the recent buffer's oldest block into a warm page and shift the buffer."""
        block = self.config.block_size
        self.store_blocks(self.recent_keys[:, :, :block], self.recent_values[:, :, :block], self.recent_start)
        kept = self.recent_count - block
        self.recent_keys[:, :, :kept] = self.recent_keys[:, :, block:self.recent_count].clone()
        self.recent_values[:, :, :kept] = self.recent_values[:, :, block:self.recent_count].clone()
        self.recent_count = kept
        self._advance_recent(block)

    def _advance_recent(self, tokens: int) -> None:
        """The recent buffer now starts ``tokens`` positions later."""
        self.recent_start += tokens
        self.hot_pages = self._hot_pages()
        self.hot_table[1, self._sink_rows:] += tokens  # on the device: no host-to-device copy

    # the hot buffer's two parts, as views
    @property
    def sink_keys(self) -> torch.Tensor:
        return self.hot_keys[:, :, :self.config.sink_tokens]

    @property
    def sink_values(self) -> torch.Tensor:
        return self.hot_values[:, :, :self.config.sink_tokens]

    @property
    def recent_keys(self) -> torch.Tensor:
        return self.hot_keys[:, :, self.config.sink_tokens:]

    @property
    def recent_values(self) -> torch.Tensor:
        return self.hot_values[:, :, self.config.sink_tokens:]

    def _hot_pages(self) -> list[tuple[int, int, int]]:
        """(offset, position, count) rows of the hot buffer: the sinks, then the recent buffer's whole capacity.
        Slots not yet filled hold positions at or past the sequence's end, which attention masks out."""
        sinks = self.config.sink_tokens
        recent = (sinks, self.recent_start, self.hot_keys.shape[2] - sinks)
        segments = [(0, 0, sinks), recent] if sinks else [recent]
        return hot_table_rows(segments)

    @property
    def _sink_rows(self) -> int:
        return len(hot_table_rows([(0, 0, self.config.sink_tokens)])) if self.config.sink_tokens else 0

    def quantize_blocks(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """keys, values (B, H_kv, n * block, D); valid (B, n * block) bool or None -> n packed pages (n, page_bytes)
        uint8. The n blocks are quantized in one call, as a batch of n * B sequences, each block on its own as a
        page requires, and packed in one pass per field."""
        batch, heads, tokens, dim = keys.shape
        count, block = tokens // self.config.block_size, self.config.block_size

        def as_batch(states):  # (B, H, n * block, D) -> (n * B, H, block, D)
            return states.float().view(batch, heads, count, block, dim).transpose(0, 2).transpose(1, 2).reshape(
                count * batch, heads, block, dim)

        keys, values = as_batch(keys), as_batch(values)
        if valid is not None:  # (B, n * block) -> (n * B, block)
            valid = valid.view(batch, count, block).transpose(0, 1).reshape(count * batch, block)
        if self.rotation is not None:
            keys, values = keys @ self.rotation, values @ self.rotation  # what rotation.rotate computes, R at hand
        fields = self.warm.layout.format.quantize(keys, values, valid, self.sketch)  # (n * B, ...) each
        return self.warm.layout.pack({name: field.view(count, batch, *field.shape[1:]) for name, field in fields.items()})

    def store_pages(self, start: int, pages: torch.Tensor) -> None:
        """Store new warm pages (n, page_bytes) of consecutive blocks from position ``start`` as n calls of
        :meth:`store_page` would, in runs: as many at once as the layer's share has room for (WarmPages.store_many);
        when it is full and pages go cold or leave the cache, the pages the policy would pick for the next new pages
        move at once (:meth:`make_room`) and those new pages are stored at once again. A page for which no such run
        exists (the policy would move a new page, or pages drop to fewer bits, or the budget error is due) goes
        through store_page."""
        starts = range(start, start + pages.shape[0] * self.config.block_size, self.config.block_size)
        stored = 0
        while stored < len(starts):
            stored += self.warm.store_many(starts[stored:], pages[stored:])
            if stored == len(starts):
                return
            try:
                freed = self.make_room(starts[stored:])
            except BudgetExceededError:  # the slots freed before the error take their new pages, as one by one
                self.warm.store_many(starts[stored:], pages[stored:])
                raise
            if not freed:
                self.store_page(starts[stored], pages[stored])
                stored += 1

    def make_room(self, arriving: range) -> int:
        """Free warm slots at once for new pages at first positions ``arriving`` (the share being full): the pages
        the policy picks for them (PagePolicy.pick_demotions) move to the cold tier, or leave the cache when there is
        none. Returns how many slots were freed; 0 where only store_page can make room (pages drop to fewer bits, the
        budget error is due, or the policy picks a new page first)."""
        if self.low is not None or self.config.on_budget_full == "raise" or not self.warm.table:
            return 0
        if self.cold is None:
            picks = self.policy.pick_evictions(self.warm.starts, arriving)
            self.warm.drop_many(picks)
            self.evicted_tokens += len(picks) * self.config.block_size
            return len(picks)
        picks = self.policy.pick_demotions(self.warm.starts, arriving)
        if picks:
            self.demote_many(picks)
        return len(picks)

    def store_page(self, start: int, page: torch.Tensor) -> None:
        """Store a new warm page, making room first when the layer's share is full: the policy's choice drops to low
        precision (with ``low_bits``), moves to the cold tier (``on_budget_full="offload"``) or leaves the cache."""
        while True:
            try:
                self.warm.store(start, page)
                return
            except NoRoomForPage:
                if (self.config.on_budget_full == "raise" and self.low is None) or not self.warm.table:
                    raise BudgetExceededError(self.cache.budget_message(self.total_tokens)) from None
                if self.low is not None:
                    self.lower_precision(self.policy.pick_demotion(self.warm.starts))
                elif self.cold is not None:
                    self.demote(self.policy.pick_demotion(self.warm.starts))
                else:
                    self.warm.drop(self.policy.pick_eviction(self.warm.starts))
                    self.evicted_tokens += self.config.block_size

    def lower_precision(self, index: int) -> None:
        """Re-quantize the warm page at ``index`` of the block table into a low-precision page (TurboQuant at
        ``low_bits``); when those fill their share, the policy's lowest low-precision page leaves the cache first
        (``on_budget_full="evict"``), or the budget error is raised."""
        entry = self.warm.table[index]
        self.store_evicting(self.low, entry.start, self.requantize(entry), self.config.on_budget_full == "evict",
                            lambda: self.cache.budget_message(self.total_tokens))
        self.warm.drop(index)

    def store_evicting(self, pages, start: int, page: torch.Tensor, may_evict: bool, message) -> None:
        """Store ``page`` among ``pages`` (the low-precision or the cold ones); while they have no room, drop the page
        the policy picks among them if ``may_evict``, else raise BudgetExceededError with ``message()``."""
        while True:
            try:
                pages.store(start, page)
                return
            except NoRoomForPage:
                if not may_evict or not pages.starts:
                    raise BudgetExceededError(message()) from None
                pages.drop(self.policy.pick_eviction(pages.starts))
                self.evicted_tokens += self.config.block_size

    def requantize(self, entry) -> torch.Tensor:
        """One warm page's tokens, dequantized (rotated basis) and quantized again in the low format: (page_bytes,)"""
        keys, values = self.warm.layout.format.dequantize(self.warm.read([entry]), torch.float32, self.sketch)
        valid = self.cache.valid_tokens(entry.start, self.config.block_size)  # (B, block) or None
        fields = self.low.layout.format.quantize(keys[0], values[0], valid, None)  # keys, values (B, H, block, D)
        return self.low.layout.pack({name: field.unsqueeze(0) for name, field in fields.items()})[0]

    def demote(self, index: int) -> None:
        """Move the warm page at ``index`` of the block table to the cold tier (:meth:`demote_many`)."""
        self.demote_many([index])

    def demote_many(self, indices: list[int]) -> None:
        """Move the warm pages at ``indices`` of the block table to the cold tier, in that order: as many at once as
        the host share has room for, then each of the rest making room in the host budget first if ``on_host_full``
        allows it ("evict": drop a cold page; "disk": spill one). A warm page leaves only once its copy is stored."""
        entries = [self.warm.table[index] for index in indices]
        moved = self.cold.store_many([entry.start for entry in entries], self.warm.gather(entries))
        try:
            if moved:
                self.cache.prefetcher.host_write_done()  # copies out of host memory wait for these
            for entry in entries[moved:]:
                if self.disk is not None:
                    self.store_cold_spilling(entry.start, self.warm.page(entry))
                else:
                    self.store_evicting(self.cold, entry.start, self.warm.page(entry),
                                        self.config.on_host_full == "evict",
                                        lambda: self.cache.host_budget_message(self.total_tokens))
                self.cache.prefetcher.host_write_done()
                moved += 1
        finally:
            self.warm.drop_many(indices[:moved])

    def store_cold_spilling(self, start: int, page: torch.Tensor) -> None:
        """Store ``page`` among the cold pages; while they have no room, spill the cold page the policy picks to
        disk."""
        while True:
            try:
                self.cold.store(start, page)
                return
            except NoRoomForPage:
                if not self.cold.starts:  # the host share cannot hold one slab
                    raise BudgetExceededError(self.cache.host_budget_message(self.total_tokens)) from None
                self.spill(self.policy.pick_demotion(self.cold.starts))

    def spill(self, index: int) -> None:
        """Move the cold page at ``index`` of ``cold.entries`` to the disk tier, making room in the disk budget first
        if ``on_disk_full="evict"`` allows it; the cold row is freed only once the page is written."""
        entry = self.cold.entries[index]
        self.cache.prefetcher.wait_for_host_writes()  # the row may still be landing from the device
        page = self.cold.slabs[entry.slab].pages[entry.row]  # (page_bytes,) uint8, host
        self.store_evicting(self.disk, entry.start, page, self.config.on_disk_full == "evict",
                            lambda: self.cache.disk_budget_message(self.total_tokens))
        self.cold.drop(index)

    def paged(self, pages=None, with_hot: bool = True) -> PagedKV:
        """Cached tokens as the decode kernel and its reference read them: the warm pages (or another page set,
        such as warm pages joined with a staged cold chunk) and the hot tier (or no hot page)."""
        hot_pages, hot_table = (self.hot_pages, self.hot_table) if with_hot else ([], self.hot_table[:, :0])
        return PagedKV(self.warm if pages is None else pages, self.hot_keys, self.hot_values, hot_pages, hot_table,
                       self.rotation, self.sketch, self.rotation_signs)

    def low_pages(self):
        """The low-precision warm pages, as one page set, or None when the layer holds none."""
        return self.low if self.low is not None and self.low.table else None

    def cold_chunks(self):
        """This layer's cold and disk pages, staged on the device a chunk at a time (see Prefetcher.chunks)."""
        if not self.offloaded_pages():
            return iter(())
        return self.cache.prefetcher.chunks(self)

    def offloaded_pages(self) -> int:
        """Pages in host memory or on disk (what the staging ring brings back)."""
        if not self.is_initialized or self.cold is None:
            return 0
        return len(self.cold.entries) + (len(self.disk.entries) if self.disk is not None else 0)

    def offloaded_version(self) -> tuple[int, int]:
        """Changes whenever a cold or disk page arrives or leaves (a staging plan made before is stale)."""
        return self.cold.version, self.disk.version if self.disk is not None else 0

    def map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.hot_keys, self.hot_values = fn(self.hot_keys), fn(self.hot_values)
        self.warm.map_batch(fn)
        if self.low is not None:
            self.low.map_batch(fn)
        if self.cold is not None:
            self.cold.map_batch(fn)
        if self.disk is not None and self.disk.entries:  # its pages would have to be rewritten
            raise NotImplementedError("reordering or resizing the batch of a cache that holds disk pages")

    # ---------------------------------------------------------------- accounting
    def hot_tokens(self) -> int:
        return self.sink_count + self.recent_count if self.is_initialized else 0

    def warm_tokens(self) -> int:
        return len(self.warm.table) * self.config.block_size if self.is_initialized else 0

    def low_tokens(self) -> int:
        return len(self.low.table) * self.config.block_size if self.is_initialized and self.low is not None else 0

    def cold_tokens(self) -> int:
        return self.cold.tokens if self.is_initialized and self.cold is not None else 0

    def disk_tokens(self) -> int:
        return self.disk.tokens if self.is_initialized and self.disk is not None else 0
