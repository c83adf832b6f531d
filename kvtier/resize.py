"""Changing the budgets of a live cache (TieredCache.set_budgets): check first, then move.

A change first works out, layer by layer and without touching anything, where every page goes. The new shares come
from the new budgets as at the start (TieredCache.warm_share_for, split_warm_share, host_share_for; a layer's disk
share is the disk budget over the layers). A tier over its new share sends pages on by the moves a full budget makes,
each chosen by the layer's policy among the pages the tier holds at that moment (a page arriving in a full tier first
pushes the tier's lowest one on, as when a budget fills during a step). Only if every layer's plan can be met (no page
would have to leave a tier whose action is "raise", and the disk files fit) is anything allocated: every slab the moves
fill (the one slab each warm or low-precision tier over its share is repacked into, and the host slabs its demoted
pages need beyond those it keeps), for every layer before any page moves, so that a failed allocation (CUDA out of
memory, a failed pinned host allocation) raises AllocationError with nothing changed. Until a repacked tier lets its
old slabs go, the device holds its new slab beside them (at most the new budget's page shares on top of what the cache
held; the budget counts a new slab when it replaces the old ones). Then the pages move, bottom-up, so that each arrives
where there is room: the disk tier evicts down to its share; the host tier sends its excess on and frees the slabs it
will not need (compaction moves rows into slabs it keeps, allocating nothing); then warm pages leave the device, and
each repacked tier takes its new slab and lets the old ones go. Each budget's limit is set once its tier is within it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cold import HostSlab
from .config import BYTES_PER_GB, TierConfig
from .errors import AllocationError, BudgetExceededError, BudgetTooSmallError
from .pages import Repack


@dataclass(frozen=True)
class Shares:
    """The new budgets in bytes, and each layer's share of them."""

    device_bytes: int
    host_bytes: int
    disk_bytes: int | None  # None: no disk tier is open
    warm: int  # a layer's device bytes for pages: full-precision ones (``full``) and low-precision ones (``low``)
    full: int
    low: int
    cold: int  # a layer's host bytes for cold pages
    disk: int  # a layer's bytes of disk files


@dataclass
class LayerPlan:
    """One layer's moves, (kind, first position) in order: those that make room in the host tier before any page
    arrives there (``host_moves``), then the rest (``device_moves``); what is rebuilt; and what would block it."""

    host_moves: list[tuple[str, int]] = field(default_factory=list)
    device_moves: list[tuple[str, int]] = field(default_factory=list)
    spilled: list[int] = field(default_factory=list)  # the pages that reach the disk tier, in order
    warm_starts: list[int] | None = None  # the warm pages after the change, in table order, when rebuilt
    low_starts: list[int] | None = None  # the low-precision pages after the change, in table order, when rebuilt
    cold_peak: int = 0  # the most cold pages the layer holds at once after its host moves
    blocked: str | None = None  # the tier ("device", "low", "host") whose "raise" action a page would overrule
    host_pages: int = 0  # cold pages the layer's new host share holds
    low_pages: int = 0  # low-precision pages its new share holds


@dataclass
class NewSlabs:
    """What one layer's moves will put pages into, allocated before any page of any layer moves."""

    warm: Repack | None = None  # the warm tier's new slab and table, when rebuilt
    low: Repack | None = None  # the low-precision tier's, when rebuilt
    host_slabs: list[HostSlab] = field(default_factory=list)  # slabs for demoted pages, beyond those the tier keeps


def change_budgets(cache, budget_gb, host_budget_gb, disk_budget_gb) -> None:
    config = cache.config.with_budgets(budget_gb, host_budget_gb, disk_budget_gb)  # TierConfig validates them
    host_bytes = cache.host_budget.limit_bytes if host_budget_gb is None else int(host_budget_gb * BYTES_PER_GB)
    if cache.layer_shape is None:  # nothing stored yet: the first states size every tier from the new config
        cache.device_budget.limit_bytes = config.budget_bytes
        cache.host_budget.limit_bytes = host_bytes
        cache.host_share_bytes = cache.host_share_for(host_bytes)
        _install(cache, config)
        return
    shares = new_shares(cache, config, host_bytes, disk_budget_gb)
    layers = [layer for layer in cache.layers if layer.is_initialized]
    check_sizes(cache, config, shares, layers[0])
    if cache.prefetcher is not None:
        cache.prefetcher.wait_for_host_writes()  # the plans read cold rows that demotions may still be writing
    plans = [plan_layer(layer, shares) for layer in layers]
    for layer, plan in zip(layers, plans):
        if plan.blocked:
            raise blocked_error(cache, config, shares, layer, plan)
    check_disk(cache, config, shares, layers, plans)
    new_slabs = [allocate_layer(layer, plan) for layer, plan in zip(layers, plans)]
    apply(cache, config, shares, layers, plans, new_slabs)


def new_shares(cache, config: TierConfig, host_bytes: int, disk_budget_gb) -> Shares:
    warm = cache.warm_share_for(config.budget_bytes)
    full, low = cache.split_warm_share(warm)
    disk_bytes = None
    if cache.disk_budget is not None:
        disk_bytes = cache.disk_budget.limit_bytes if disk_budget_gb is None else int(disk_budget_gb * BYTES_PER_GB)
    return Shares(config.budget_bytes, host_bytes, disk_bytes, warm, full, low, cache.host_share_for(host_bytes),
                  (disk_bytes or 0) // cache.num_layers)


# ------------------------------------------------------------------------------------------------ checks
def check_sizes(cache, config: TierConfig, shares: Shares, layer) -> None:
    """The device budget must hold the fixed bytes and a page of each warm tier a layer, the host budget a slab of
    cold pages a layer (with less, the next block that leaves the recent window would find no room)."""
    if layer.warm.pages_within(shares.full) < 1 or (layer.low is not None and layer.low.pages_within(shares.low) < 1):
        least = cache.fixed_bytes + cache.num_layers * least_warm_share(cache, layer)
        raise BudgetTooSmallError(
            f"kvtier: budget_gb={config.budget_gb:g} ({config.budget_bytes:,} bytes) cannot hold this cache's hot "
            f"tiers, scratch and staging ring ({cache.fixed_bytes:,} bytes) and one warm page for each of its "
            f"{cache.num_layers} layers; nothing changed. Choose budget_gb of at least {least / BYTES_PER_GB:.6g} "
            f"({least:,} bytes).")
    if layer.cold is not None and layer.cold.slabs_within(shares.cold) < 1:
        least = cache.host_reserved_bytes + cache.num_layers * layer.cold.slab_bytes
        rows = f" besides the {cache.host_reserved_bytes:,} bytes disk pages are read into" \
            if cache.host_reserved_bytes else ""
        raise BudgetTooSmallError(
            f"kvtier: host_budget_gb={shares.host_bytes / BYTES_PER_GB:g} ({shares.host_bytes:,} bytes) cannot hold "
            f"one slab of {layer.cold.chunk_pages} cold pages ({layer.cold.slab_bytes:,} bytes) for each of "
            f"{cache.num_layers} layers{rows}; nothing changed. Choose host_budget_gb of at least "
            f"{least / BYTES_PER_GB:.6g} ({least:,} bytes).")


def least_warm_share(cache, layer) -> int:
    """The smallest warm share that gives each warm tier of ``layer`` room for one page."""
    full = layer.warm.bytes_for_pages(1)
    if layer.low is None:
        return full
    low = layer.low.bytes_for_pages(1)
    share = max(full + low, int(full / (1 - cache.config.low_share)), int(low / cache.config.low_share))
    while any(part < need for part, need in zip(cache.split_warm_share(share), (full, low))):
        share += 1
    return share


def check_disk(cache, config: TierConfig, shares: Shares, layers, plans) -> None:
    """The disk tier must take the pages the plans spill: under on_disk_full="raise" within its share as the files
    stand; under "evict", each page's frame within a share (the files make room by evicting)."""
    if cache.disk_budget is None:
        return
    for layer, plan in zip(layers, plans):
        frames = [layer.disk.frame_bytes(page_on_host(layer, start)) for start in plan.spilled]
        if config.on_disk_full == "raise" and layer.disk.file_bytes + sum(frames) > shares.disk:
            raise BudgetExceededError(
                f"kvtier: disk_budget_gb={shares.disk_bytes / BYTES_PER_GB:g} leaves each of {cache.num_layers} layers "
                f"{shares.disk:,} bytes of files, but layer {layer.layer_idx}'s files take {layer.disk.file_bytes:,} "
                f"bytes and the pages this change spills {sum(frames):,} more; on_disk_full='raise' evicts none, so "
                f"nothing changed. Choose a larger disk_budget_gb, or attach with on_disk_full='evict'.")
        if frames and max(frames) > shares.disk:
            raise BudgetExceededError(
                f"kvtier: disk_budget_gb={shares.disk_bytes / BYTES_PER_GB:g} leaves each layer {shares.disk:,} bytes "
                f"of files, less than one spilled page of layer {layer.layer_idx} ({max(frames):,} bytes); nothing "
                "changed. Choose a larger disk_budget_gb.")


def page_on_host(layer, start: int) -> torch.Tensor:
    """The bytes (page_bytes,) uint8 on the CPU of the cold or warm page of ``layer`` that starts at ``start``."""
    for entry in layer.cold.entries:
        if entry.start == start:
            return layer.cold.page(entry)
    return layer.warm.page(layer.warm.table[layer.warm.starts.index(start)]).cpu()


def blocked_error(cache, config: TierConfig, shares: Shares, layer, plan: LayerPlan) -> BudgetExceededError:
    if plan.blocked == "host":
        return BudgetExceededError(
            f"kvtier: host_budget_gb={shares.host_bytes / BYTES_PER_GB:g} leaves layer {layer.layer_idx} room for "
            f"{plan.host_pages} cold pages, fewer than it would hold ({len(layer.cold.entries)} now, and the warm "
            "pages the device budget sends it); on_host_full='raise' drops none, so nothing changed. Choose a larger "
            "host_budget_gb (or budget_gb), or attach with on_host_full='evict' or 'disk'.")
    if plan.blocked == "low":
        return BudgetExceededError(
            f"kvtier: budget_gb={config.budget_gb:g} leaves layer {layer.layer_idx} room for {plan.low_pages} "
            f"low-precision pages, fewer than it would hold with the warm pages that drop to low precision; "
            "on_budget_full='raise' evicts none, so nothing changed. Choose a larger budget_gb, or attach with "
            "on_budget_full='evict'.")
    least = cache.fixed_bytes + cache.num_layers * max(
        min(each.warm.allocated_bytes, each.warm.bytes_for_pages(len(each.warm.table))) for each in cache.layers
        if each.is_initialized)
    return BudgetExceededError(
        f"kvtier: budget_gb={config.budget_gb:g} leaves layer {layer.layer_idx} room for "
        f"{layer.warm.pages_within(shares.full)} of its {len(layer.warm.table)} warm pages, and "
        "on_budget_full='raise' moves no page off the device, so nothing changed. Keep budget_gb at least "
        f"{least / BYTES_PER_GB:.6g} ({least:,} bytes), or attach with on_budget_full='offload' or 'evict'.")


# ------------------------------------------------------------------------------------------------ the plan
def plan_layer(layer, shares: Shares) -> LayerPlan:
    """Where ``layer``'s pages go under ``shares``, worked out on lists of first positions (nothing moves)."""
    plan = LayerPlan()
    cold = None
    if layer.cold is not None:
        cold = list(layer.cold.starts)
        plan.host_pages = layer.cold.slabs_within(shares.cold) * layer.cold.chunk_pages
        while len(cold) > plan.host_pages and not plan.blocked:
            leave_host(layer, cold, plan, plan.host_moves)
        plan.cold_peak = len(cold)
    low = None
    if layer.low is not None:
        low = list(layer.low.starts)
        plan.low_pages = layer.low.pages_within(shares.low)
        if layer.low.allocated_bytes > shares.low:
            plan.low_starts = low
            while len(low) > plan.low_pages and not plan.blocked:
                leave_low(layer, low, plan)
    if layer.warm.allocated_bytes > shares.full:
        warm, keep = list(layer.warm.starts), layer.warm.pages_within(shares.full)
        while len(warm) > keep and not plan.blocked:
            leave_device(layer, warm, cold, low, plan)
        plan.warm_starts = warm
    return plan


def leave_device(layer, warm: list[int], cold: list[int] | None, low: list[int] | None, plan: LayerPlan) -> None:
    """The policy's warm page leaves: to low precision (``low_bits``), to the host tier, or out of the cache."""
    config, policy = layer.config, layer.policy
    if low is not None:
        start = warm.pop(policy.pick_demotion(warm))
        while len(low) >= plan.low_pages and not plan.blocked:
            leave_low(layer, low, plan)
        plan.device_moves.append(("lower", start))
        low.append(start)
        plan.low_starts = low
    elif cold is not None:
        start = warm.pop(policy.pick_demotion(warm))
        while len(cold) >= plan.host_pages and not plan.blocked:
            leave_host(layer, cold, plan, plan.device_moves)
        plan.device_moves.append(("demote", start))
        cold.append(start)
        plan.cold_peak = max(plan.cold_peak, len(cold))
    elif config.on_budget_full == "evict":
        plan.device_moves.append(("evict_warm", warm.pop(policy.pick_eviction(warm))))
    else:
        plan.blocked = "device"


def leave_host(layer, cold: list[int], plan: LayerPlan, moves: list) -> None:
    """The policy's cold page leaves: to the disk tier, or out of the cache (``on_host_full``)."""
    action = layer.config.on_host_full
    if action == "raise":
        plan.blocked = "host"
    elif action == "disk":
        start = cold.pop(layer.policy.pick_demotion(cold))
        moves.append(("spill", start))
        plan.spilled.append(start)
    else:
        moves.append(("evict_cold", cold.pop(layer.policy.pick_eviction(cold))))


def leave_low(layer, low: list[int], plan: LayerPlan) -> None:
    """The policy's low-precision page leaves the cache (``on_budget_full="evict"``)."""
    if layer.config.on_budget_full != "evict":
        plan.blocked = "low"
    else:
        plan.device_moves.append(("evict_low", low.pop(layer.policy.pick_eviction(low))))


# ------------------------------------------------------------------------------------------------ the new slabs
def allocate_layer(layer, plan: LayerPlan) -> NewSlabs:
    """Allocate what ``layer``'s moves put pages into (nothing is paid for or held yet); raises AllocationError,
    saying what failed, if an allocation does."""
    new = NewSlabs()
    if plan.warm_starts is not None:
        count = len(plan.warm_starts)
        new.warm = allocated(layer, f"warm tier, repacked into a slab of {count} page(s)",
                             layer.warm.bytes_for_pages(count), True, lambda: layer.warm.allocate_repack(count))
    if plan.low_starts is not None:
        count = len(plan.low_starts)
        new.low = allocated(layer, f"low-precision tier, repacked into a slab of {count} page(s)",
                            layer.low.bytes_for_pages(count), True, lambda: layer.low.allocate_repack(count))
    if layer.cold is not None:
        count = max(0, layer.cold.slabs_for(plan.cold_peak) - len(layer.cold.slabs))
        new.host_slabs = allocated(layer, f"cold tier, {count} more host slab(s) for the pages the device sends it",
                                   count * layer.cold.slab_bytes, False, lambda: layer.cold.allocate_slabs(count))
    return new


def allocated(layer, what: str, nbytes: int, on_device: bool, allocate):
    """``allocate()``, or AllocationError naming ``what`` of ``layer`` and its ``nbytes`` if the allocator fails."""
    try:
        return allocate()
    except (RuntimeError, MemoryError) as error:
        raise AllocationError(allocation_message(layer, what, nbytes, on_device, error)) from error


def allocation_message(layer, what: str, nbytes: int, on_device: bool, error: BaseException) -> str:
    where = f"memory on {layer.device}" if on_device else f"{'pinned ' if layer.cold.pin else ''}host memory"
    return (f"kvtier: set_budgets could not allocate {nbytes:,} bytes of {where} for layer {layer.layer_idx}'s {what} "
            f"({error}); nothing changed: every page is where it was, and the budgets are as before. A budget change "
            "allocates what pages move into before it frees what they leave, so it needs that memory free beside the "
            f"cache for a moment: free {where} (other tensors, other processes), then call set_budgets again.")


# ------------------------------------------------------------------------------------------------ the moves
def apply(cache, config: TierConfig, shares: Shares, layers, plans, new_slabs: list[NewSlabs]) -> None:
    """Carry the checked plans out, bottom-up; each budget's limit is set once its tier is within it."""
    if cache.prefetcher is not None:
        cache.prefetcher.quiesce()
        if not config.spills:
            cache.prefetcher.release_gather_rows(cache.host_budget)
    if cache.disk_budget is not None:
        for layer in layers:
            evict_disk_to_share(layer, shares.disk)
        cache.disk_budget.limit_bytes, cache.disk_share_bytes = shares.disk_bytes, shares.disk
    for layer, plan in zip(layers, plans):
        run(layer, plan.host_moves, {})
        if layer.cold is not None:
            layer.cold.share_bytes = shares.cold
            if layer.cold.allocated_bytes > shares.cold:
                layer.cold.compact(keep_slabs=layer.cold.slabs_for(plan.cold_peak))
    cache.host_budget.limit_bytes, cache.host_share_bytes = shares.host_bytes, shares.cold
    for layer, plan, new in zip(layers, plans, new_slabs):
        lowered: dict[int, torch.Tensor] = {}
        run_device_moves(layer, plan, new, lowered)
        if plan.warm_starts is not None:
            layer.warm.rebuild(list(layer.warm.starts), layer.warm.host_copy(layer.warm.table), new.warm)
        layer.warm.share_bytes = shares.full
        if layer.low is not None:
            if plan.low_starts is not None:
                rebuild_low(layer, plan.low_starts, lowered, new.low)
            layer.low.share_bytes = shares.low
    cache.device_budget.limit_bytes, cache.warm_share_bytes = shares.device_bytes, shares.warm
    _install(cache, config)


def evict_disk_to_share(layer, share: int) -> None:
    """Evict the disk pages the policy scores lowest until the layer's files fit ``share`` (on_disk_full="evict")."""
    layer.disk.share_bytes = share
    while layer.disk.file_bytes > share:
        layer.disk.drop(layer.policy.pick_eviction(layer.disk.starts))
        layer.evicted_tokens += layer.config.block_size


def run_device_moves(layer, plan: LayerPlan, new: NewSlabs, lowered: dict[int, torch.Tensor]) -> None:
    """The moves off the device; pages demoted past the host slabs the layer kept go into ``new.host_slabs``."""
    if layer.cold is not None:
        layer.cold.spare_slabs = new.host_slabs
    try:
        run(layer, plan.device_moves, lowered)
    finally:
        if layer.cold is not None:
            layer.cold.spare_slabs = []


def rebuild_low(layer, starts: list[int], lowered: dict[int, torch.Tensor], repack: Repack) -> None:
    """The low-precision tier holds ``starts``, in ``repack``: its pages that stayed, then those this change lowered."""
    low = layer.low
    kept = {entry.start: row for row, entry in enumerate(low.table)}
    copies = low.host_copy(low.table)  # (n, page_bytes)
    pages = [lowered[start] if start in lowered else copies[kept[start]] for start in starts]
    low.rebuild(starts, torch.stack(pages) if pages else copies[:0], repack)


def run(layer, moves: list[tuple[str, int]], lowered: dict[int, torch.Tensor]) -> None:
    for kind, start in moves:
        MOVES[kind](layer, start, lowered)


def _spill(layer, start, lowered) -> None:
    layer.spill(layer.cold.starts.index(start))


def _evict_cold(layer, start, lowered) -> None:
    layer.cold.drop(layer.cold.starts.index(start))
    layer.evicted_tokens += layer.config.block_size


def _demote(layer, start, lowered) -> None:
    layer.demote(layer.warm.starts.index(start))


def _evict_warm(layer, start, lowered) -> None:
    layer.warm.drop(layer.warm.starts.index(start))
    layer.evicted_tokens += layer.config.block_size


def _lower(layer, start, lowered) -> None:
    """Re-quantize the warm page at ``start`` to low precision, held on the host until the low tier is rebuilt."""
    index = layer.warm.starts.index(start)
    lowered[start] = layer.requantize(layer.warm.table[index]).cpu()
    layer.warm.drop(index)


def _evict_low(layer, start, lowered) -> None:
    if lowered.pop(start, None) is None:
        layer.low.drop(layer.low.starts.index(start))
    layer.evicted_tokens += layer.config.block_size


MOVES = {"spill": _spill, "evict_cold": _evict_cold, "demote": _demote, "evict_warm": _evict_warm, "lower": _lower,
         "evict_low": _evict_low}


def _install(cache, config: TierConfig) -> None:
    cache.config = config
    for layer in cache.layers:
        layer.config = config
