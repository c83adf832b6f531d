"""The one place where a tiered cache's knobs live and are validated."""

from __future__ import annotations

import importlib.util
import numbers
import os
from dataclasses import dataclass, fields, replace

from .policies import POLICIES, PagePolicy, policy_name

WARM_FORMATS = ("int4", "turboquant")
TURBOQUANT_BITS = (2, 3, 4)
QJL_ESTIMATORS = ("unbiased", "min_mse")
KEY_AXES = ("channel", "token")
ON_BUDGET_FULL = ("offload", "raise", "evict")
ON_HOST_FULL = ("raise", "evict", "disk")
ON_DISK_FULL = ("raise", "evict")
PREFETCH_MODES = ("all", "topk")
COLD_ATTENTION = ("stream", "host", "auto")
DECODE_KERNELS = ("auto", "triton", "torch")
CUDA_GRAPHS = ("auto", "off", "uncaptured")

BYTES_PER_GB = 1024**3
CHUNK_BYTES = 48 * 1024**2  # the default cold chunk: few launches per layer, a staging ring of a few such chunks
RING_BUDGET_SHARE = 1 / 16  # but the default staging ring takes at most this share of budget_gb


@dataclass(frozen=True)
class TierConfig:
    """How a :class:`~kvtier.cache.TieredCache` splits tokens between tiers.

    The hot tier (model dtype) holds the first ``sink_tokens`` tokens and the last ``recent_window`` tokens
    (up to ``block_size - 1`` more while a block fills). Older tokens are quantized once, a block of
    ``block_size`` tokens at a time, into the warm tier (``warm_format``: packed INT4, or TurboQuant at
    ``turboquant_bits`` per channel). When a layer's share of ``budget_gb`` is full, ``on_budget_full="offload"``
    moves warm pages, chosen by ``policy``, byte for byte to the cold tier in pinned host memory (at most
    ``host_budget_gb``), from where every decode step streams them back through a device staging ring of
    ``staging_chunks`` chunks of ``chunk_pages`` pages, one layer ahead (``prefetch="all"``: exact).
    With ``low_bits`` (the precision rule; ``on_budget_full`` "evict" or "raise"), the warm pages the policy scores
    lowest are re-quantized to TurboQuant at ``low_bits`` (values) and ``low_key_bits`` (keys; None: ``low_bits``)
    once full-precision pages fill ``1 - low_share`` of a layer's warm bytes.
    """

    budget_gb: float = 2.0
    sink_tokens: int = 4
    recent_window: int = 128
    block_size: int = 64
    warm_format: str = "int4"  # or "turboquant": rotation + Lloyd-Max codes (+ a QJL residual bit on keys)
    turboquant_bits: int = 3  # TurboQuant codebook bits per channel, keys and values
    turboquant_qjl: bool = True  # TurboQuant keys add a 1-bit QJL sketch of their residual
    turboquant_qjl_estimator: str = "min_mse"  # the sketch term's scale: "min_mse" minimizes the keys' expected squared
    # error (biased, less noisy), "unbiased" makes dot products unbiased (noisier); see kvtier.formats.turboquant
    turboquant_center_keys: bool = True  # TurboQuant keys: store the mean of each key_group tokens, quantize the rest
    key_axis: str = "channel"  # keys share a (scale, min) per channel over key_group tokens ("channel", KIVI) or per token
    key_group: int = 32  # tokens sharing one per-channel key (scale, min) pair (INT4) or key mean (TurboQuant)
    rotate: bool = True  # randomized Hadamard rotation of the head dim before quantizing
    rotation_seed: int = 0
    low_bits: int | None = None  # precision rule: the warm pages the policy scores lowest drop to TurboQuant at this
    # many bits (keys and values, no QJL bit) when the warm pages at full precision fill their share; None: off
    low_key_bits: int | None = None  # with low_bits: the low pages' key codebook bits, when keys should keep more
    # than values (decode error comes mostly from keys); None: low_bits
    low_share: float = 0.5  # with low_bits: the share of each layer's warm bytes that holds low-precision pages
    on_budget_full: str = "offload"  # move warm pages to the host tier; "raise"; or "evict": drop them (policy)
    host_budget_gb: float | None = None  # cold tier cap; None: the host's available memory less a safety margin
    on_host_full: str = "raise"  # when the host budget is full too; or "evict": drop cold pages (policy); or "disk":
    # spill cold pages (policy) to lz4-framed, checksummed segment files (kvtier.disk), read back every decode step
    disk_dir: str | None = None  # with on_host_full="disk": the files go into a fresh folder under it, removed
    # when the cache is released; None: under the system's temp folder
    disk_budget_gb: float | None = None  # the disk tier's hard cap (file bytes); None: the free space under disk_dir
    # less a margin, measured when the first states arrive
    on_disk_full: str = "raise"  # when the disk budget is full too; or "evict": drop disk pages (policy)
    prefetch: str = "all"  # every cold page streams through attention each decode step (exact); or "topk": only
    # the prefetch_share of the cold pages the policy ranks highest (approximate; benchmarks/results/policy-fidelity-*)
    prefetch_share: float = 0.25  # with prefetch="topk"
    cold_attention: str = "stream"  # decode over cold pages: stream them to the device, compute on the host, or
    # "auto": each decode step, whichever of the two measured faster (kvtier.cold_choice)
    chunk_pages: int | None = None  # cold pages move in chunks of this many pages (a host slab holds one chunk);
    # None: as many as fit in CHUNK_BYTES, or in RING_BUDGET_SHARE of the budget over the staging ring
    staging_chunks: int = 3  # device staging ring, in chunks, counted in budget_gb
    policy: str | PagePolicy = "sink_recent"  # or "attention_mass", or a PagePolicy object (see kvtier.policies)
    pages_per_slab: int = 16  # warm pages are allocated this many at a time (fewer near the budget)
    key_tile: int = 1024  # attention reads the cache this many tokens at a time (bounds scratch)
    query_tile: int = 256  # and handles this many query rows at a time (prefill)
    decode_kernel: str = "auto"  # "auto": the Triton kernel on CUDA, its torch reference elsewhere; or force one
    cuda_graph: str = "auto"  # generate()'s decode steps: "auto": replayed from a CUDA graph on CUDA where the cache
    # allows it (kvtier.graph), eager elsewhere; "off": always eager; "uncaptured": the graph's fixed-shape step run
    # eagerly, on any device (for tests and debugging)
    check_finite: bool = True  # refuse keys and values holding NaN or Inf (one reduction and host sync per layer and
    # update; see TieredCache.check_states)

    def __post_init__(self):
        for name in ("budget_gb", "host_budget_gb", "disk_budget_gb"):
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            _check(number or (value is None and name != "budget_gb"),
                   f"{name} must be a number of GB, got {value!r} ({type(value).__name__}).")
        _check(self.budget_gb > 0, f"budget_gb must be positive, got {self.budget_gb}.")
        _check(self.sink_tokens >= 0, f"sink_tokens must be >= 0, got {self.sink_tokens}.")
        _check(self.recent_window >= 1, f"recent_window must be >= 1, got {self.recent_window}.")
        _check(self.block_size >= 2 and self.block_size % 2 == 0,
               f"block_size must be an even number >= 2, got {self.block_size}.")
        _check(self.warm_format in WARM_FORMATS,
               f"unknown warm_format {self.warm_format!r}; choose one of {WARM_FORMATS}.")
        _check(self.turboquant_bits in TURBOQUANT_BITS,
               f"turboquant_bits must be one of {TURBOQUANT_BITS}, got {self.turboquant_bits}.")
        _check(self.turboquant_qjl_estimator in QJL_ESTIMATORS,
               f"unknown turboquant_qjl_estimator {self.turboquant_qjl_estimator!r}; choose one of {QJL_ESTIMATORS}.")
        _check(self.rotate or self.warm_format != "turboquant",
               "warm_format='turboquant' quantizes rotated vectors (its codebook assumes the rotation); "
               "keep rotate=True, or choose warm_format='int4'.")
        _check(self.key_axis in KEY_AXES, f"unknown key_axis {self.key_axis!r}; choose one of {KEY_AXES}.")
        _check(self.key_group >= 1 and self.block_size % self.key_group_size == 0,
               f"key_group must be >= 1 and divide block_size ({self.block_size}), got {self.key_group}.")
        _check(self.low_bits is None or self.low_bits in TURBOQUANT_BITS,
               f"low_bits must be one of {TURBOQUANT_BITS} (or None), got {self.low_bits}.")
        _check(self.low_key_bits is None or (self.low_bits is not None and self.low_key_bits in TURBOQUANT_BITS),
               f"low_key_bits must be one of {TURBOQUANT_BITS} (or None), with low_bits set; got low_key_bits="
               f"{self.low_key_bits}, low_bits={self.low_bits}.")
        _check(self.low_bits is None or self.rotate, "low_bits re-quantizes pages with TurboQuant, whose codebook "
               "assumes rotated vectors; keep rotate=True.")
        _check(self.low_bits is None or 0 < self.low_share < 1, f"low_share must be in (0, 1), got {self.low_share}.")
        _check(self.low_bits is None or self.on_budget_full != "offload",
               "low_bits (low-precision warm pages) does not combine with the host tier yet: attach with "
               "on_budget_full='evict' (the lowest-scored low-precision pages leave) or 'raise'.")
        _check(self.on_budget_full in ON_BUDGET_FULL,
               f"unknown on_budget_full {self.on_budget_full!r}; choose one of {ON_BUDGET_FULL}.")
        _check(self.host_budget_gb is None or self.host_budget_gb > 0,
               f"host_budget_gb must be positive (or None for the default), got {self.host_budget_gb}.")
        _check(self.on_host_full in ON_HOST_FULL,
               f"unknown on_host_full {self.on_host_full!r}; choose one of {ON_HOST_FULL}.")
        _check(self.on_host_full != "disk" or self.offloads,
               "on_host_full='disk' spills cold pages, which need on_budget_full='offload'.")
        _check(self.on_host_full != "disk" or (self.prefetch == "all" and self.cold_attention == "stream"),
               "on_host_full='disk' reads disk pages back through the staging ring: it needs prefetch='all' and "
               f"cold_attention='stream' (got prefetch={self.prefetch!r}, cold_attention={self.cold_attention!r}).")
        _check(not self.spills or importlib.util.find_spec("lz4") is not None,
               "on_host_full='disk' writes lz4-framed files: pip install 'kvtier[disk]' (or lz4).")
        _check(self.disk_budget_gb is None or self.disk_budget_gb > 0,
               f"disk_budget_gb must be positive (or None for the default), got {self.disk_budget_gb}.")
        _check(self.on_disk_full in ON_DISK_FULL,
               f"unknown on_disk_full {self.on_disk_full!r}; choose one of {ON_DISK_FULL}.")
        _check(self.disk_dir is None or os.path.isdir(self.disk_dir),
               f"disk_dir {self.disk_dir!r} is not an existing folder.")
        _check(self.prefetch in PREFETCH_MODES, f"unknown prefetch {self.prefetch!r}; choose one of {PREFETCH_MODES}.")
        _check(0 < self.prefetch_share <= 1, f"prefetch_share must be in (0, 1], got {self.prefetch_share}.")
        _check(self.prefetch == "all" or self.cold_attention == "stream",
               f"prefetch='topk' chooses which cold pages stream to the device; with cold_attention="
               f"'{self.cold_attention}' cold pages may be attended on the host instead. Choose one of the two.")
        _check(self.cold_attention in COLD_ATTENTION,
               f"unknown cold_attention {self.cold_attention!r}; choose one of {COLD_ATTENTION}.")
        _check(self.chunk_pages is None or self.chunk_pages >= 1,
               f"chunk_pages must be >= 1 (or None for the default), got {self.chunk_pages}.")
        _check(self.staging_chunks >= 2, f"staging_chunks must be >= 2 (one chunk in use, one arriving), "
                                         f"got {self.staging_chunks}.")
        _check(isinstance(self.policy, PagePolicy) or self.policy in POLICIES,
               f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}, or pass a PagePolicy object.")
        _check(self.pages_per_slab >= 1, f"pages_per_slab must be >= 1, got {self.pages_per_slab}.")
        _check(self.key_tile >= self.block_size,
               f"key_tile ({self.key_tile}) must be at least block_size ({self.block_size}).")
        _check(self.query_tile >= 1, f"query_tile must be >= 1, got {self.query_tile}.")
        _check(isinstance(self.check_finite, bool), f"check_finite must be True or False, got {self.check_finite!r}.")
        _check(self.cuda_graph in CUDA_GRAPHS,
               f"unknown cuda_graph {self.cuda_graph!r}; choose one of {CUDA_GRAPHS}.")
        _check(self.decode_kernel in DECODE_KERNELS,
               f"unknown decode_kernel {self.decode_kernel!r}; choose one of {DECODE_KERNELS}.")

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gb * BYTES_PER_GB)

    def with_budgets(self, budget_gb: float | None = None, host_budget_gb: float | None = None,
                     disk_budget_gb: float | None = None) -> "TierConfig":
        """This configuration with the budgets that are given (None: unchanged), validated like any TierConfig."""
        given = {"budget_gb": budget_gb, "host_budget_gb": host_budget_gb, "disk_budget_gb": disk_budget_gb}
        return replace(self, **{name: value for name, value in given.items() if value is not None})

    @property
    def offloads(self) -> bool:
        """Whether a full device budget sends warm pages to the host tier."""
        return self.on_budget_full == "offload"

    def pages_per_chunk(self, page_bytes: int) -> int:
        """Pages in one cold chunk (a host slab, a staging slot)."""
        chunk_bytes = min(CHUNK_BYTES, int(self.budget_bytes * RING_BUDGET_SHARE) // self.staging_chunks)
        return self.chunk_pages or max(1, chunk_bytes // page_bytes)

    @property
    def spills(self) -> bool:
        """Whether a full host budget sends cold pages to the disk tier."""
        return self.offloads and self.on_host_full == "disk"

    @property
    def key_group_size(self) -> int:
        """Tokens that share one per-channel key (scale, min) pair."""
        return min(self.key_group, self.block_size)

    @property
    def hot_capacity(self) -> int:
        """Tokens the hot tier holds at most: sinks, the recent window and one filling block."""
        return self.sink_tokens + self.recent_window + self.block_size

    def describe(self) -> str:
        """Each tier with its place, precision and the tokens it holds, one line each (the per-tier precision)."""
        from .formats import make_format, make_low_format  # the formats read their settings from a TierConfig

        policy = policy_name(self.policy)
        warm, low = make_format(self).label, make_low_format(self)
        lines = [f"hot  (device, model dtype): {self.sink_tokens} sink tokens and the last {self.recent_window} tokens",
                 f"warm (device, {warm}): older tokens, {self.block_size} a page, within budget_gb={self.budget_gb:g}"]
        if low is not None:
            lines.append(f"low  (device, {low.label}): the pages {policy} scores lowest, once the {warm} pages fill "
                         f"{1 - self.low_share:.0%} of a layer's warm bytes")
        if self.offloads:
            host = "available memory less a margin" if self.host_budget_gb is None else f"{self.host_budget_gb:g} GB"
            share = f" ({self.prefetch_share:.0%})" if self.prefetch == "topk" else ""
            where = {"host": "on the host", "stream": "on the device", "auto": "where it measured faster"}[
                self.cold_attention]
            lines.append(f"cold (host, {warm}): the pages {policy} demotes past the device budget, within {host}; "
                         f"prefetch={self.prefetch}{share}, attended {where}")
        if self.spills:
            where = self.disk_dir or "the system temp folder"
            cap = "the free space less a margin" if self.disk_budget_gb is None else f"{self.disk_budget_gb:g} GB"
            lines.append(f"disk (files under {where}, {warm}, lz4 + CRC-32 per page): the pages {policy} spills past "
                         f"the host budget, within {cap}; read back every decode step")
        full, action = (("disk", self.on_disk_full) if self.spills else ("host", self.on_host_full) if self.offloads
                        else ("device", self.on_budget_full))
        lines.append(f"full {full} budget: " + ("BudgetExceededError" if action == "raise" else f"{policy} evicts"))
        return "\n".join(lines)

    def __str__(self) -> str:
        """Every field; a policy object by its repr (its settings, not the per-layer state asdict would copy)."""
        shown = ", ".join(f"{each.name}={getattr(self, each.name)!r}" if each.name == "policy"
                          else f"{each.name}={getattr(self, each.name)}" for each in fields(self))
        return f"TierConfig({shown})"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
