"""TieredCache: a transformers ``Cache`` whose layers keep tokens in tiers, under one hard byte budget."""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref

import psutil
import torch
from transformers.cache_utils import Cache

from kvtier.kernels.decode_attention import HOT_TILE, DecodeWorkspace, launch_bytes, max_splits, workspace_bytes

from .budget import ByteBudget
from .cold_choice import ColdAttentionChooser
from .config import BYTES_PER_GB, TierConfig
from .errors import BudgetTooSmallError, KVTierError, NonFiniteStatesError
from .formats import make_format, make_low_format
from .layer import TieredLayer
from .pages import PageLayout
from .policies import policy_name
from .prefetch import Prefetcher, StagingRing

HOST_MARGIN_BYTES = 4 * BYTES_PER_GB  # the default host budget leaves this much of the available memory free
HOST_MARGIN_SHARE = 0.2  # or this share of it, whichever is more
DISK_MARGIN_BYTES = 1 * BYTES_PER_GB  # the default disk budget leaves this much of the free space free
DISK_MARGIN_SHARE = 0.1  # or this share of it, whichever is more


class TieredCache(Cache):
    """One :class:`TieredLayer` per decoder layer; owns the device byte budget that every device tier, the staging
    ring and the scratch share, and the host byte budget of the cold tier.

    ``padding_mask`` (B, L) marks the real tokens of a left-padded prompt (1) and its padding (0), so that
    padding never widens the quantization ranges of a block.
    """

    def __init__(self, config: TierConfig, model_config, padding_mask: torch.Tensor | None = None):
        self.config = config
        self.model_config = model_config
        self.num_layers = model_config.num_hidden_layers
        self.query_heads = model_config.num_attention_heads
        self.kv_heads = getattr(model_config, "num_key_value_heads", None) or self.query_heads
        self.padding_mask = None if padding_mask is None else padding_mask.bool()
        self.token_ids: torch.Tensor | None = None  # (B, N) the tokens the cache holds, when generate() recorded them
        self.warm_format = make_format(config)  # every layer's warm pages
        self.low_format = make_low_format(config)  # its low-precision warm pages (low_bits), or None
        self.device_budget = ByteBudget(config.budget_bytes)  # everything the cache holds on its device
        self.host_budget = ByteBudget(default_host_budget_bytes() if config.host_budget_gb is None
                                      else int(config.host_budget_gb * BYTES_PER_GB))
        self.hot_bytes = 0
        self.scratch_bytes = 0
        self.staging_bytes = 0
        self.warm_share_bytes = 0  # each layer's share of what the hot tier, staging ring and scratch leave
        self.host_reserved_bytes = 0  # host bytes outside the layers' shares: the rows disk pages are read into
        self.host_share_bytes = self.host_share_for(self.host_budget.limit_bytes)  # each layer's cold share
        self.disk_directory: str | None = None  # with the disk tier: this cache's own folder of segment files
        self.disk_budget: ByteBudget | None = None  # and the bytes its files may take
        self.disk_share_bytes = 0  # each layer's share of them
        self.layer_shape = None  # (batch, kv_heads, head_dim, dtype) once the first layer saw its states
        self.chunk_pages = 0  # pages in a cold chunk, once the page size is known
        self.workspace = DecodeWorkspace()  # the decode kernel's scratch, shared by the layers
        self.prefetcher: Prefetcher | None = None  # moves cold chunks to the device (with offloading)
        self.decode_ranges_key = self.decode_ranges = None  # what attention derived from this step's mask
        # how this step attends cold pages: streamed to the device or on the host; "auto" picks per decode step
        self.chooser = ColdAttentionChooser() if config.cold_attention == "auto" else None
        self.cold_mode = "stream" if self.chooser else config.cold_attention
        self.static_step = None  # set while a fixed-shape decode step runs (kvtier.graph.DecodeGraph)
        self.decode_graph = None  # the DecodeGraph serving this cache's decode steps in generate(), if any
        super().__init__(layers=[TieredLayer(self, index) for index in range(self.num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' per-layer entry: start moving the next layer's cold pages, then update this layer. A prefill
        chunk (more than one token) attends every cold page, even under prefetch="topk", and so scores them all."""
        if self.static_step is not None:  # a decode step being captured (or run as it will be replayed)
            if self.prefetcher is not None:
                self._prefetch_static(layer_idx)
            return self.layers[layer_idx].update_static(key_states, value_states, self.static_step)
        if self.chooser is not None and layer_idx == 0:  # a step starts: cold_attention="auto" picks its mode
            if key_states.shape[2] == 1:
                self.cold_mode = self.chooser.start_step(time.perf_counter())
            else:  # a prefill chunk streams (the host kernel serves decode steps)
                self.chooser.pause()
                self.cold_mode = "stream"
        if self.prefetcher is not None and self.cold_mode == "stream":
            self.prefetcher.every_page = key_states.shape[2] > 1  # a plan made for another kind of step is replanned
            upcoming = self.layers[(layer_idx + 1) % self.num_layers]  # after the last layer, the next step's first
            if upcoming.offloaded_pages():
                self.prefetcher.prefetch(upcoming)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _prefetch_static(self, layer_idx: int) -> None:
        """A fixed-shape step copies every layer's cold chunks within itself: the first layer forks the side stream
        from the step's start (inside a capture, this brings the copies into the graph) and plans its own chunks; each
        layer starts the next one's, but not the next step's first layer's (the next replay copies those)."""
        prefetcher, upcoming = self.prefetcher, layer_idx + 1
        prefetcher.every_page = False
        if layer_idx == 0:
            prefetcher.host_write_done()
            if self.layers[0].offloaded_pages():
                prefetcher.prefetch(self.layers[0])
        if upcoming < self.num_layers and self.layers[upcoming].offloaded_pages():
            prefetcher.prefetch(self.layers[upcoming])

    def save(self, path, token_ids: torch.Tensor | None = None, model=None):
        """Write the whole cache to the directory ``path`` (see kvtier.session); ``token_ids`` (B, N) are the tokens
        it holds (default: those generate() recorded); ``model`` adds its weights' fingerprint."""
        from .session import save_cache

        return save_cache(self, path, token_ids, model)

    # ---------------------------------------------------------------- budget
    @property
    def budget_bytes(self) -> int:
        return self.config.budget_bytes

    @property
    def fixed_bytes(self) -> int:
        """What the cache holds on its device besides pages: hot tiers, scratch and the staging ring."""
        return self.hot_bytes + self.scratch_bytes + self.staging_bytes

    def warm_share_for(self, budget_bytes: int) -> int:
        """Each layer's share of a device budget: what the hot tiers, staging ring and scratch leave."""
        return (budget_bytes - self.fixed_bytes) // self.num_layers

    def split_warm_share(self, warm_share: int) -> tuple[int, int]:
        """A layer's warm share -> its bytes for full-precision pages and for low-precision ones (``low_bits``)."""
        low = int(warm_share * self.config.low_share) if self.low_format is not None else 0
        return warm_share - low, low

    def host_share_for(self, host_budget_bytes: int) -> int:
        """Each layer's share of a host budget for cold pages: what the rows disk pages are read into leave."""
        return (host_budget_bytes - self.host_reserved_bytes) // self.num_layers

    def set_budgets(self, budget_gb: float | None = None, host_budget_gb: float | None = None,
                    disk_budget_gb: float | None = None) -> None:
        """Change the device, host and disk budgets of this live cache (None: unchanged); see kvtier.resize.

        Each layer's shares are recomputed as at the start. A smaller budget is met at once by the moves a full
        budget makes, the pages the policy scores lowest first: warm pages leave the device (to the host tier,
        to fewer bits with ``low_bits``, or evicted, per ``on_budget_full``), cold pages leave the host (to disk,
        or evicted, per ``on_host_full``), disk pages are evicted (``on_disk_full="evict"``); sinks and the recent
        window stay. Tiers that emptied or shrank give their memory back: a layer's warm pages are repacked into one
        slab, cold pages into as few host slabs as they fill. A larger budget raises the limits and shares, and new
        pages use the room; pages already moved down stay where they are (no promotion). The staging ring and
        chunk size stay as sized at the first states.

        All or nothing: if the new budgets cannot be met (the device budget holds less than the hot tiers, scratch,
        staging ring and one warm page a layer; the host budget less than one slab a layer; or pages would have to
        leave a tier whose action is "raise"), BudgetTooSmallError or BudgetExceededError says why and nothing has
        changed; so does AllocationError if memory for the slabs pages move into (allocated before any page moves)
        cannot be had. Invalid values raise TierConfig's ValueError."""
        from .resize import change_budgets

        change_budgets(self, budget_gb, host_budget_gb, disk_budget_gb)

    @property
    def reserved_bytes(self) -> int:
        """Everything the cache holds on its device, reservations included."""
        return self.device_budget.used_bytes

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` out of the device budget if they fit; the caller allocates only after True."""
        return self.device_budget.reserve(nbytes)

    def release(self, nbytes: int) -> None:
        self.device_budget.release(nbytes)

    def budget_message(self, context: int) -> str:
        return (
            f"kvtier: the GPU budget of {self.config.budget_gb:g} GB ({self.budget_bytes:,} bytes) is full at "
            f"{context:,} tokens of context ({self.reserved_bytes:,} bytes in use, batch {self.layer_shape[0]}). "
            "Raise budget_gb, attach with on_budget_full='offload' to move warm blocks to host memory, or with "
            f"on_budget_full='evict' to drop the warm blocks the policy ({policy_name(self.config.policy)}) scores "
            "lowest and keep going."
        )

    def host_budget_message(self, context: int) -> str:
        return (
            f"kvtier: the host budget of {self.host_budget.limit_bytes:,} bytes for cold pages is full at {context:,} "
            f"tokens of context (each of {self.num_layers} layers may hold {self.host_share_bytes:,} bytes; "
            f"{self.host_budget.used_bytes:,} in use, batch {self.layer_shape[0]}). Raise host_budget_gb, or attach "
            f"with on_host_full='evict' to drop the cold blocks the policy ({policy_name(self.config.policy)}) scores "
            "lowest and keep going."
        )

    def check_layer_shape(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """On the first layer's first states: validate the shapes and reserve hot tiers and scratch for all layers."""
        shape = (batch, kv_heads, head_dim, dtype)
        if self.layer_shape is not None:
            if shape != self.layer_shape:
                raise KVTierError(f"kvtier: a layer got states of shape/dtype {shape}, others {self.layer_shape}.")
            return
        if head_dim % 2:
            raise KVTierError(
                f"kvtier: head dim {head_dim} is odd, and INT4 packs two channels per byte; "
                "kvtier serves models with an even head dim."
            )
        if (self.config.warm_format == "turboquant" or self.low_format is not None) and head_dim % 8:
            raise KVTierError(
                f"kvtier: head dim {head_dim} is not a multiple of 8, and TurboQuant packs codes in bit planes of "
                "8 channels per byte; choose warm_format='int4' (and low_bits=None) for this model."
            )
        if kv_heads != self.kv_heads:
            raise KVTierError(f"kvtier: the model config says {self.kv_heads} KV heads, but a layer produced {kv_heads}.")
        self.layer_shape = shape
        hot_per_layer = 2 * batch * kv_heads * self.config.hot_capacity * head_dim * dtype.itemsize
        # float32 (D, D) rotation; TurboQuant's (D, D) sketch
        rotation_per_layer = head_dim * head_dim * 4 if self.config.rotate else 0
        if self.warm_format.qjl:
            rotation_per_layer += head_dim * head_dim * 4
        self.hot_bytes = self.num_layers * (hot_per_layer + rotation_per_layer)
        self.scratch_bytes = self.estimate_scratch_bytes(batch, kv_heads, head_dim, dtype, device)
        layout = PageLayout(batch, kv_heads, self.config.block_size, head_dim, self.warm_format)
        self.chunk_pages = self.config.pages_per_chunk(layout.page_bytes)
        if self.config.offloads:
            self.staging_bytes = StagingRing.bytes_for(self.config.staging_chunks, self.chunk_pages, layout.page_bytes)
        fixed_bytes = self.fixed_bytes
        if not self.reserve(fixed_bytes):
            raise BudgetTooSmallError(
                f"kvtier: budget_gb={self.config.budget_gb:g} ({self.budget_bytes:,} bytes) cannot hold the hot window: "
                f"{self.hot_bytes:,} bytes for {self.config.sink_tokens} sinks + {self.config.recent_window} recent + "
                f"{self.config.block_size} filling tokens x {self.num_layers} layers x batch {batch}, plus "
                f"{self.scratch_bytes:,} bytes of attention scratch and {self.staging_bytes:,} bytes of cold-page "
                f"staging. Raise budget_gb to at least {fixed_bytes / BYTES_PER_GB:.4g}, or shrink recent_window, "
                "key_tile, query_tile, or chunk_pages and staging_chunks."
            )
        if self.config.offloads:
            ring = StagingRing(self.config.staging_chunks, self.chunk_pages, layout.page_bytes, device)
            self.prefetcher = Prefetcher(ring, layout, device, self.host_budget)
        if self.config.spills:
            self.open_disk_tier()
        self.warm_share_bytes = self.warm_share_for(self.budget_bytes)

    def open_disk_tier(self) -> None:
        """Reserve the pinned rows disk pages are read into out of the host budget (the cold pages share the rest),
        create this cache's folder of segment files (removed when the cache is garbage-collected) and its budget."""
        if not self.prefetcher.reserve_read_rows():
            raise BudgetTooSmallError(
                f"kvtier: the host budget of {self.host_budget.limit_bytes:,} bytes cannot hold the rows that disk pages "
                f"are read into (twice {self.config.staging_chunks} x {self.chunk_pages} pages). Raise host_budget_gb, or "
                "lower chunk_pages or staging_chunks."
            )
        self.host_reserved_bytes = self.host_budget.used_bytes
        self.host_share_bytes = self.host_share_for(self.host_budget.limit_bytes)
        self.disk_directory = tempfile.mkdtemp(prefix="kvtier-", dir=self.config.disk_dir)
        weakref.finalize(self, shutil.rmtree, self.disk_directory, ignore_errors=True)
        if self.config.disk_budget_gb is not None:
            limit = int(self.config.disk_budget_gb * BYTES_PER_GB)
        else:
            free = shutil.disk_usage(self.disk_directory).free
            limit = max(0, int(free - max(DISK_MARGIN_BYTES, DISK_MARGIN_SHARE * free)))
        self.disk_budget = ByteBudget(limit)
        self.disk_share_bytes = limit // self.num_layers

    def disk_budget_message(self, context: int) -> str:
        return (
            f"kvtier: the disk budget of {self.disk_budget.limit_bytes:,} bytes (disk_budget_gb) for spilled pages is "
            f"full at {context:,} tokens of context (each of {self.num_layers} layers may hold "
            f"{self.disk_share_bytes:,} bytes of files under {self.disk_directory}; {self.disk_budget.used_bytes:,} in "
            f"use). Raise disk_budget_gb, or attach with on_disk_full='evict' to drop the disk pages the policy "
            f"({policy_name(self.config.policy)}) scores lowest and keep going."
        )

    def estimate_scratch_bytes(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> int:
        """Upper bound of the temporaries one attention call holds (one layer at a time), plus the decode
        kernel's workspace, which is kept between calls."""
        key_tile, query_tile = self.config.key_tile, self.config.query_tile
        gathered_codes = 2 * kv_heads * key_tile * (head_dim // 2 + 4)  # packed codes and value params
        # keys: unpacked codes, float codes, per-token scale and minimum, the copy into (B, H, T, D); values alike
        dequantized = 32 * kv_heads * key_tile * head_dim
        scores = 5 * self.query_heads * query_tile * key_tile * 4  # scores, masked copy, log-sum-exp, weights
        # query tile, rotated query, two accumulators, a partial output and its normalized copy, three merge temporaries
        queries = 9 * self.query_heads * query_tile * head_dim * 4
        block = self.config.block_size
        flush = 4 * kv_heads * block * head_dim * 4 + 2 * kv_heads * self.config.recent_window * head_dim * dtype.itemsize
        # either kernel's splits; the Gluon kernel's also a split per hot page (at most 128 tokens, per segment)
        hot_pages = -(-self.config.hot_capacity // HOT_TILE) + 2
        splits = max(max_splits(batch, kv_heads, device), max_splits(batch, kv_heads, device, True) + hot_pages)
        kernel = workspace_bytes(batch, self.query_heads, head_dim, splits)
        # a prefill tile's past pages go either through the torch reference (the gathered and dequantized key tiles)
        # or through one kernel launch whose rows are every query head x position of the tile
        past_by_kernel = launch_bytes(batch, self.query_heads * query_tile, head_dim, splits=1)
        past = max(batch * (gathered_codes + dequantized), past_by_kernel)
        return batch * (scores + queries + flush) + kernel + past

    def check_states(self, keys: torch.Tensor, values: torch.Tensor, layer: TieredLayer) -> None:
        """Refuse new states (B, H_kv, L, D) that the layer cannot hold, before anything is stored: other shapes,
        dtypes or devices than the layer's, and (``check_finite``) NaN or Inf."""
        found = f"keys {tuple(keys.shape)} {keys.dtype} on {keys.device} and values {tuple(values.shape)} {values.dtype}"
        if keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype or not keys.is_floating_point():
            raise KVTierError(f"kvtier: layer {layer.layer_idx} got {found}; it takes keys and values of one floating "
                              "dtype and one shape (batch, kv_heads, tokens, head_dim), as transformers' attention "
                              "passes them to Cache.update.")
        if layer.is_initialized:
            batch, heads, _, dim = layer.hot_keys.shape
            if (keys.shape[0], keys.shape[1], keys.shape[3]) != (batch, heads, dim) or keys.dtype != layer.dtype \
                    or keys.device != layer.device:
                raise KVTierError(f"kvtier: layer {layer.layer_idx} got {found}; it holds batch {batch}, {heads} KV "
                                  f"heads, head dim {dim}, {layer.dtype} on {layer.device}. Start a new cache "
                                  "(generate() without past_key_values) for another batch, model or dtype.")
        if self.config.check_finite:
            check_finite(keys, values, layer.layer_idx, layer.total_tokens)

    def valid_tokens(self, start: int, count: int) -> torch.Tensor | None:
        """(B, count) bool: which tokens at positions start.. are real (not padding), or None if all are."""
        if self.padding_mask is None or start >= self.padding_mask.shape[1]:
            return None
        batch = self.layer_shape[0]
        mask = self.padding_mask
        if mask.shape[0] != batch:
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        window = mask[:, start:start + count].to(self.layers[0].device)
        if window.shape[1] < count:  # the block runs past the prompt: generated tokens are real
            window = torch.cat((window, window.new_ones(batch, count - window.shape[1])), dim=1)
        return window

    # ---------------------------------------------------------------- report
    def stats(self) -> dict:
        """Tokens and bytes per tier, bytes per token, and how much of the budget is in use."""
        layer = self.layers[0]
        tokens = layer.total_tokens
        if self.layer_shape is None:
            return {"tokens": 0, "budget_bytes": self.budget_bytes, "cache_bytes": 0, "budget_used": 0.0}
        batch, kv_heads, head_dim, dtype = self.layer_shape
        warm_allocated = sum(each.warm.allocated_bytes for each in self.layers)
        page_bytes = layer.warm.page_bytes
        dense_bytes_per_token = self.num_layers * 2 * kv_heads * head_dim * dtype.itemsize
        held = layer.hot_tokens() + layer.warm_tokens() + layer.low_tokens()
        return {
            "tokens": tokens,
            "batch": batch,
            "hot": {"tokens": layer.hot_tokens(), "bytes": self.hot_bytes, "dtype": str(dtype).replace("torch.", "")},
            "warm": {
                "tokens": layer.warm_tokens(),
                "pages": sum(len(each.warm.table) for each in self.layers),
                "bytes": warm_allocated,
                "format": layer.warm.layout.format.label,
                "bytes_per_token": self.num_layers * page_bytes / (self.config.block_size * batch),
            },
            "low": self._low_stats(),
            "cold": self._cold_stats(page_bytes),
            "disk": self._disk_stats(),
            "evicted_tokens": layer.evicted_tokens,
            "scratch_bytes": self.scratch_bytes,
            "staging_bytes": self.staging_bytes,
            "cache_bytes": self.reserved_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_used": self.reserved_bytes / self.budget_bytes,
            "bytes_per_token": self.reserved_bytes / max(held * batch, 1),
            "dense_bytes_per_token": dense_bytes_per_token,
            "dense_bytes": dense_bytes_per_token * tokens * batch,
            "graph": self.decode_graph.stats() if self.decode_graph is not None else None,
        }

    def _low_stats(self) -> dict:
        """The low-precision warm pages (the precision rule, ``low_bits``)."""
        if self.low_format is None:
            return {"tokens": 0, "pages": 0, "bytes": 0, "enabled": False}
        layers = [each for each in self.layers if each.is_initialized]
        return {
            "enabled": True,
            "tokens": self.layers[0].low_tokens(),
            "pages": sum(len(each.low.table) for each in layers),
            "bytes": sum(each.low.allocated_bytes for each in layers),
            "format": self.low_format.label,
            "bytes_per_token": self.num_layers * layers[0].low.page_bytes
            / (self.config.block_size * self.layer_shape[0]),
        }

    def _cold_stats(self, page_bytes: int) -> dict:
        """The host tier's tokens and bytes, and what prefetching moved back to the device so far."""
        if self.prefetcher is None:
            return {"tokens": 0, "pages": 0, "bytes": 0, "enabled": False}
        prefetcher = self.prefetcher
        return {
            "enabled": True,
            "tokens": self.layers[0].cold_tokens(),
            "pages": sum(len(each.cold.entries) for each in self.layers if each.is_initialized),
            "bytes": self.host_budget.used_bytes,
            "host_budget_bytes": self.host_budget.limit_bytes,
            "page_bytes": page_bytes,
            "prefetch": self.config.prefetch,
            "prefetch_share": self.config.prefetch_share if self.config.prefetch == "topk" else 1.0,
            "attention": {"mode": self.config.cold_attention, "current": self.cold_mode,
                          **(self.chooser.summary() if self.chooser else {})},
            "moved_bytes": prefetcher.moved_bytes,
            "moved_chunks": prefetcher.moved_chunks,
            "replans": prefetcher.replans,
            "failed_copies": prefetcher.failed_copies,
        }

    def _disk_stats(self) -> dict:
        """The disk tier's tokens, pages, files and bytes (compressed, in files), and what was read back."""
        if self.disk_budget is None:
            return {"tokens": 0, "pages": 0, "bytes": 0, "files": 0, "enabled": False}
        disks = [each.disk for each in self.layers if each.is_initialized]
        written = sum(disk.written_bytes for disk in disks)
        return {
            "enabled": True,
            "tokens": self.layers[0].disk_tokens(),
            "pages": sum(len(disk.entries) for disk in disks),
            "bytes": self.disk_budget.used_bytes,
            "files": sum(len(disk.segments) for disk in disks),
            "directory": self.disk_directory,
            "disk_budget_bytes": self.disk_budget.limit_bytes,
            "compression_ratio": written / max(sum(disk.compressed_bytes for disk in disks), 1),
            "read_pages": sum(disk.read_pages for disk in disks),
            "read_ahead_pages": self.prefetcher.read_ahead_pages,  # of those, read on the reader thread
        }


def check_finite(keys: torch.Tensor, values: torch.Tensor, layer_idx: int, start: int) -> None:
    """Raise NonFiniteStatesError if keys or values (B, H_kv, L, D) of positions start.. hold NaN or Inf.

    The check every update pays is one float32 sum over the new keys and one over the new values, and one host sync
    per layer and update to read the flag (on CUDA the host then waits for the layer's projections before it queues
    more work): a NaN or an Inf anywhere makes the sum non-finite. Only a non-finite sum pays for the exact search,
    which also tells a real NaN or Inf from a sum of huge finite values that overflowed (not refused)."""
    if bool(torch.isfinite(keys.sum(dtype=torch.float32) + values.sum(dtype=torch.float32))):
        return
    bad = {name: ~torch.isfinite(states).all(dim=3).all(dim=1) for name, states in (("keys", keys), ("values", values))}
    if not (bad["keys"].any() or bad["values"].any()):
        return
    rows, offsets = (bad["keys"] | bad["values"]).nonzero(as_tuple=True)  # (B, L) -> where
    which = " and ".join(name for name, mask in bad.items() if mask.any())
    raise NonFiniteStatesError(
        f"kvtier: layer {layer_idx} got {which} with NaN or Inf at positions {start + int(offsets.min())}.."
        f"{start + int(offsets.max())} (batch rows {sorted(set(rows.tolist()))}); nothing was stored. The model "
        "produced non-finite attention states: in float16 this is usually an overflow (run the model in bfloat16 or "
        "float32); otherwise check its weights and inputs. TierConfig(check_finite=False) skips this check.")


def default_host_budget_bytes() -> int:
    """The host's available memory less a safety margin (the larger of HOST_MARGIN_BYTES and HOST_MARGIN_SHARE)."""
    available = psutil.virtual_memory().available
    return max(0, int(available - max(HOST_MARGIN_BYTES, HOST_MARGIN_SHARE * available)))
