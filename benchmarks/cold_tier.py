"""Decode with most of the context in host memory: kvtier's cold tier beside transformers' dense and offloaded caches.

A random-weight model of Llama-3.1-8B's shape (32 layers, 32 query heads, 8 KV heads, head dim 128, bf16) on the
GPU; weights do not matter for speed. Every cache is filled with the same kind of random keys and values through
its own update path (kvtier quantizes, demotes and pins; transformers' offloaded cache moves each layer to the
host), because prefilling 512K tokens through the model is not what is measured here. Then ``--steps`` decode steps
run through ``model()``; ms/token is the median synchronized step. Configurations, each where it fits:

- dense: DynamicCache
- offloaded: DynamicCache(offloading=True), which moves every layer's whole cache across PCIe each step
- kvtier: budget_gb=8, warm pages past the budget in pinned host memory, streamed back each step (prefetch "all")
- kvtier-cold: a budget that keeps only the hot tier and a few warm pages on the GPU (the cache mostly cold)
- kvtier-cold-ring2: kvtier-cold with a staging ring that holds two layers' cold pages (the default ring, a sixteenth
  of that small budget, holds less than one layer's, so a layer's copies wait for the one before to free its slots)
- kvtier-cold-ring2-nocopy: the same with the staging copies left out after one step (diagnostic: the step's host
  and compute work alone, against which the share of transfer hidden is also computed)
- kvtier-cold-light: a budget that keeps all but ``--light-cold-share`` of the pages warm (few cold bytes: the
  step's compute is long enough to hide their transfer, which the 70% hidden target is about)
- kvtier-cold-light-nocopy: kvtier-cold-light with the staging copies left out (as ring2-nocopy)
- kvtier-warm: a budget holding every page on the GPU (the compute-only time of the same step)
- kvtier-cold-mass: kvtier-cold under the attention_mass policy (the cost of feeding it the kernel's page mass)
- kvtier-cold-topk25: kvtier-cold under attention_mass with prefetch="topk" at 25% of the cold pages (approximate)
- kvtier-cold-host: kvtier-cold attending the cold pages on the host (numba) instead of streaming them
- kvtier-cold-auto: kvtier-cold choosing per decode step whichever of the two measured faster

From these: PCIe bytes moved per step, the transfer time of those bytes alone (the same staging copies, timed
without attention), the achieved bandwidth, and the share of the transfer hidden behind compute,
(warm step + transfer - cold step) / transfer, and the relative error of one decode attention (first and last
layer) through kvtier's path against the torch reference reading the same pages where they live. Prints a table last; writes JSON and markdown.

    python benchmarks/cold_tier.py --contexts 32768 131072 [--steps 8] [--name cold-tier-h100]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig

import kvtier

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FILL_CHUNK, GB, RESULTS, fill_dynamic, llama_8b_shape, random_model  # noqa: E402
from common import decode_steps_ms as decode_ms  # noqa: E402

import common  # noqa: E402


def fill_tiered(cache: kvtier.TieredCache, config: LlamaConfig, batch: int, context: int) -> None:
    progress = tqdm(total=context, unit="token", desc="fill", disable=context < 16 * FILL_CHUNK, mininterval=15)
    common.fill_chunked(cache, config, batch, context, FILL_CHUNK, progress=progress)  # long fills show progress
    progress.close()


class HostPageSet:
    """A layer's cold pages read straight from the host slabs (no staging ring, prefetcher or kernel): the page set
    the torch reference reads for the exactness check."""

    def __init__(self, layer):
        self.layer, self.layout, self.block_size = layer, layer.warm.layout, layer.warm.block_size
        self.table = list(layer.cold.entries)

    def read(self, entries):
        rows = [self.layer.cold.slabs[entry.slab].pages[entry.row] for entry in entries]
        return self.layout.views(torch.stack(rows).to(self.layer.device))


@torch.no_grad()
def exactness(cache: kvtier.TieredCache, layer_index: int) -> float:
    """Relative error of one decode attention through kvtier's path (staging, joined pages, the kernel) against the
    float32 torch reference over the same pages read from where they live (warm on the GPU, cold in host slabs)."""
    from kvtier.attention import _decode
    from kvtier.kernels.decode_attention import paged_attention_reference
    from kvtier.kernels.partial_attention import PartialAccumulator
    from kvtier.layer import TierView

    layer = cache.layers[layer_index]
    batch, kv_heads, _, head_dim = layer.hot_keys.shape
    query_heads = cache.query_heads
    device, dtype = layer.device, layer.dtype
    query = torch.randn(batch, query_heads, 1, head_dim, generator=torch.Generator(device).manual_seed(3),
                        device=device, dtype=dtype)
    start = torch.zeros(batch, dtype=torch.int32, device=device)
    end = torch.full_like(start, layer.total_tokens)
    got = _decode(TierView(layer, None, None, layer.total_tokens), query, head_dim ** -0.5, start, end)
    queries = (query.float() * head_dim ** -0.5).view(batch, kv_heads, query_heads // kv_heads, 1, head_dim)
    accumulator = PartialAccumulator()
    for pages in (layer.paged(), layer.paged(HostPageSet(layer), with_hot=False)):
        if pages.warm.table or pages.hot_pages:
            out, lse, _ = paged_attention_reference(queries, pages, start, end, key_tile=16384)
            accumulator.add(out, lse)
    expected = accumulator.out.view(batch, 1, query_heads, head_dim)
    return ((got.float() - expected).norm() / expected.norm()).item()


def transfer_ms(cache: kvtier.TieredCache, repeats: int = 3) -> float:
    """The staging copies of one decode step alone: every layer's cold chunks through the ring, no attention."""
    prefetcher = cache.prefetcher
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for layer in cache.layers:
            prefetcher.prefetch(layer)
            for _chunk in prefetcher.chunks(layer):
                pass
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pinned_bandwidth_gbs(nbytes: int = 2 * GB) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def budget_gb_for_warm_pages(model, pages_per_layer: int, batch: int, **config) -> float:
    """A budget that holds the hot tier, scratch, staging ring and ``pages_per_layer`` warm pages a layer."""
    handle = kvtier.attach(model, budget_gb=40.0, **config)
    try:
        probe = handle.new_cache()
        fill_tiered(probe, model.config, batch, 512)
        fixed = probe.hot_bytes + probe.scratch_bytes + probe.staging_bytes
        warm = probe.layers[0].warm
        return (fixed + model.config.num_hidden_layers * (pages_per_layer * warm.page_bytes + warm.table_bytes)) / GB
    finally:
        kvtier.detach(model)


def ring_for_layers(context: int, layers: int = 2, slots_per_layer: int = 2) -> dict:
    """Staging settings whose ring holds ``layers`` layers' cold pages at ``context`` tokens (``slots_per_layer`` slots
    a layer): the next layer's copies then never wait for this layer's attention to free a slot."""
    pages_per_layer = -(-context // kvtier.TierConfig().block_size)
    return dict(staging_chunks=layers * slots_per_layer, chunk_pages=-(-pages_per_layer // slots_per_layer))


def run_dynamic(model, batch: int, context: int, steps: int, offloading: bool) -> dict:
    cache = DynamicCache(config=model.config, offloading=offloading)
    start = time.perf_counter()
    fill_dynamic(cache, model.config, batch, context)
    fill_s = time.perf_counter() - start
    times = decode_ms(model, cache, batch, steps)
    return {"ms_per_token": statistics.median(times), "steps_ms": times, "fill_s": fill_s}


def run_tiered(model, batch: int, context: int, steps: int, budget_gb: float, with_transfer: bool,
               skip_copies: bool = False, **config) -> dict:
    """``skip_copies``: after one real step, the staging copies are left out (slots keep the pages they hold), so
    that the step's time is its host and compute work alone: a diagnostic, not a way to decode."""
    handle = kvtier.attach(model, budget_gb=budget_gb, **config)
    try:
        cache = handle.new_cache()
        start = time.perf_counter()
        fill_tiered(cache, model.config, batch, context)
        torch.cuda.synchronize()
        fill_s = time.perf_counter() - start
        if skip_copies:
            decode_ms(model, cache, batch, 0)
            cache.prefetcher._copy_runs = lambda job, slot: None
            with_transfer = False
        moved_before = cache.prefetcher.moved_bytes
        times = decode_ms(model, cache, batch, steps)
        moved_per_step = (cache.prefetcher.moved_bytes - moved_before) / (steps + 2)
        stats = cache.stats()
        row = {"ms_per_token": statistics.median(times), "mean_ms": statistics.mean(times), "steps_ms": times,
               "fill_s": fill_s,
               "budget_gb": budget_gb, "device_cache_gb": stats["cache_bytes"] / GB,
               "warm_tokens": stats["warm"]["tokens"], "cold_tokens": stats["cold"]["tokens"],
               "host_gb": stats["cold"]["bytes"] / GB, "moved_gb_per_step": moved_per_step / GB,
               "replans": stats["cold"]["replans"], "within_budget": stats["cache_bytes"] <= stats["budget_bytes"]}
        if stats["cold"]["enabled"]:
            row["cold_attention"] = stats["cold"]["attention"]
        if stats["graph"] is not None:  # replayed steps, captures (one more each time a cold page arrives), why eager
            row["graph"] = stats["graph"]
        if with_transfer and stats["cold"]["tokens"]:
            row["transfer_ms"] = transfer_ms(cache)
            row["transfer_gbs"] = moved_per_step / 1e9 / (row["transfer_ms"] / 1e3)
            if handle.config.prefetch == "all":  # topk attends a subset of the pages on purpose
                row["relative_error_vs_reference"] = max(exactness(cache, index) for index in (0, len(cache.layers) - 1))
        return row
    finally:
        kvtier.detach(model)


def profile(model, batch: int, context: int, settings: dict, out: Path) -> None:
    """Where a decode step of one kvtier configuration spends host and device time: torch.profiler tables of three
    steps and of a fill chunk, and Python's own profile of three steps (the host work between the launches)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    handle = kvtier.attach(model, **settings)
    try:
        cache = handle.new_cache()
        fill_tiered(cache, model.config, batch, context)
        decode_ms(model, cache, batch, 1)
        tables = []
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as step_profile:
            decode_ms(model, cache, batch, 1)
        python_profile = cProfile.Profile()
        python_profile.runcall(decode_ms, model, cache, batch, 1)
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as fill_profile:
            fill_tiered(cache, model.config, batch, 2048)
            torch.cuda.synchronize()
        for name, result in (("decode (3 steps)", step_profile), ("fill 2048 tokens", fill_profile)):
            for key in ("self_cpu_time_total", "self_cuda_time_total"):
                tables.append(f"## {name}, by {key}\n" + result.key_averages().table(sort_by=key, row_limit=30))
        text = io.StringIO()
        pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(40)
        tables.append("## decode (3 steps), Python profile by own time\n" + text.getvalue())
        (out / "profile.txt").write_text("\n\n".join(tables))
        print(tables[0][:5000])
        print(tables[-1][:6000])
    finally:
        kvtier.detach(model)


def fits_dense(config: LlamaConfig, batch: int, context: int) -> bool:
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * batch * context
    free, _ = torch.cuda.mem_get_info()
    return kv_bytes * 1.15 < free


def environment() -> dict:
    return {**common.environment("cuda"), "model": "random-weight Llama-3.1-8B shape, bf16"}


def graph_cell(graph: dict | None) -> str:
    """Replayed steps and captures, or why the steps ran eagerly."""
    if not graph:
        return ""
    if graph["replays"]:
        return f"{graph['replays']} ({graph['captures']})"
    return f"eager: {graph['eager_reason']}"


def markdown(result: dict) -> str:
    lines = [f"# Cold tier: decode with most of the context in host memory ({result['environment']['device']})", "",
             f"torch {result['environment']['torch']}, transformers {result['environment']['transformers']}; "
             f"{result['environment']['model']}; pinned host-to-device copy {result['pinned_gbs']:.1f} GB/s.", "",
             "| context | batch | cache | ms/token | on GPU GB | in host GB | PCIe GB/step | transfer ms | GB/s | "
             "hidden | rel. error | x offloaded | graph replays (captures) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['context']:,} | {row['batch']} | {row['cache']} | skipped: {row['skipped']} |"
                         " | | | | | | | | |")
            continue
        hidden = f"{row['hidden_share']:.0%}" if "hidden_share" in row else ""
        if "hidden_share_vs_no_copies" in row:
            hidden += f" ({row['hidden_share_vs_no_copies']:.0%} vs no copies)"
        lines.append(
            f"| {row['context']:,} | {row['batch']} | {row['cache']} | {row['ms_per_token']:.1f} | "
            f"{row.get('device_cache_gb', float('nan')):.2f} | {row.get('host_gb', 0):.2f} | "
            f"{row.get('moved_gb_per_step', 0):.2f} | {row.get('transfer_ms', float('nan')):.1f} | "
            f"{row.get('transfer_gbs', float('nan')):.1f} | {hidden} | {row.get('relative_error_vs_reference', '')} | "
            + (f"{row['speedup_vs_offloaded']:.1f}x |" if "speedup_vs_offloaded" in row else " |")
            + f" {graph_cell(row.get('graph'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--cold-at", type=int, nargs="*", default=[32768],
                        help="contexts at which to also run kvtier mostly cold, all warm and the offloaded cache")
    parser.add_argument("--light-cold-share", type=float, default=0.25,
                        help="kvtier-cold-light: the share of the pages that are cold")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as in the table)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the first kvtier configuration (after --only) at the first context")
    parser.add_argument("--name", default="cold-tier")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = llama_8b_shape()
    model = random_model(config)
    result = {"environment": environment(), "pinned_gbs": pinned_bandwidth_gbs(), "rows": []}
    cold_budget = budget_gb_for_warm_pages(model, 4, args.batch)
    for context in args.contexts:
        plans = [("kvtier", dict(budget_gb=args.budget_gb))]
        if context in args.cold_at:
            ring = ring_for_layers(context)
            ring_budget = budget_gb_for_warm_pages(model, 4, args.batch, **ring)
            pages = -(-context // kvtier.TierConfig().block_size)  # a layer's pages, about
            light_budget = budget_gb_for_warm_pages(model, round(pages * (1 - args.light_cold_share)), args.batch)
            plans += [("kvtier-cold", dict(budget_gb=cold_budget)), ("kvtier-warm", dict(budget_gb=60.0)),
                      ("kvtier-cold-light", dict(budget_gb=light_budget)),
                      ("kvtier-cold-light-nocopy", dict(budget_gb=light_budget, skip_copies=True)),
                      ("kvtier-cold-ring2", dict(budget_gb=ring_budget, **ring)),
                      ("kvtier-cold-ring2-nocopy", dict(budget_gb=ring_budget, skip_copies=True, **ring)),
                      ("kvtier-cold-mass", dict(budget_gb=cold_budget, policy="attention_mass")),
                      ("kvtier-cold-topk25", dict(budget_gb=cold_budget, policy="attention_mass", prefetch="topk",
                                                  prefetch_share=0.25)),
                      ("kvtier-cold-host", dict(budget_gb=cold_budget, cold_attention="host")),
                      ("kvtier-cold-auto", dict(budget_gb=cold_budget, cold_attention="auto")),
                      ("offloaded", None)]
        plans.append(("dense", None))
        if args.only:
            plans = [plan for plan in plans if plan[0] in args.only]
        if args.profile:  # the first kvtier configuration left, at the first context
            args.out.mkdir(parents=True, exist_ok=True)
            return profile(model, args.batch, context, next(settings for _, settings in plans if settings), args.out)
        for name, settings in plans:
            row = {"context": context, "batch": args.batch, "cache": name}
            try:
                if name == "dense" and not fits_dense(config, args.batch, context):
                    row["skipped"] = "the dense cache does not fit beside the weights"
                elif settings is None:
                    row.update(run_dynamic(model, args.batch, context, max(3, args.steps // 2), name == "offloaded"))
                else:
                    row.update(run_tiered(model, args.batch, context, args.steps,
                                          with_transfer=name.startswith("kvtier-cold") or name == "kvtier", **settings))
            except torch.OutOfMemoryError as error:
                row["skipped"] = f"out of memory: {str(error).splitlines()[0][:120]}"
            gc.collect()
            torch.cuda.empty_cache()
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "steps_ms"}), flush=True)
            write(result, args.out, args.name)  # after every row, so that a run cut short keeps what it measured
        by_cache = {row["cache"]: row for row in result["rows"] if row["context"] == context and "skipped" not in row}
        all_warm = [row["ms_per_token"] for row in by_cache.values() if row["cache"].startswith("kvtier")
                    and row["cold_tokens"] == 0]  # the same tokens all on the GPU: the step without transfers
        for name in ("kvtier-cold", "kvtier-cold-ring2", "kvtier-cold-light"):
            cold = by_cache.get(name)
            if all_warm and cold is not None and "transfer_ms" in cold:
                hidden = (min(all_warm) + cold["transfer_ms"] - cold["ms_per_token"]) / cold["transfer_ms"]
                cold["hidden_share"] = max(0.0, min(1.0, hidden))
        for name in ("kvtier-cold-ring2", "kvtier-cold-light"):  # against the same step minus its copies
            cold, no_copies = by_cache.get(name), by_cache.get(f"{name}-nocopy")
            if cold is not None and no_copies is not None and "transfer_ms" in cold:
                hidden = (no_copies["ms_per_token"] + cold["transfer_ms"] - cold["ms_per_token"]) / cold["transfer_ms"]
                cold["hidden_share_vs_no_copies"] = max(0.0, min(1.0, hidden))
        if "offloaded" in by_cache:
            for name, row in by_cache.items():
                if name.startswith("kvtier-cold"):
                    row["speedup_vs_offloaded"] = by_cache["offloaded"]["ms_per_token"] / row["ms_per_token"]
    write(result, args.out, args.name)
    print(markdown(result))


def write(result: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
