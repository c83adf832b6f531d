"""Decode attention on the GPU: kvtier's decode kernels beside torch SDPA on a dense bf16 cache.

For each context and batch, one attention layer of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head
dim 128, bf16) is filled with the same random keys and values twice: as dense bf16 tensors for SDPA, and
through a real TieredCache layer (4 sinks, INT4 warm pages, recent window in bf16) for the kernel. It
times, as the median of many runs with the L2 cache flushed in between (triton.testing.do_bench):

- sdpa: torch SDPA (flash backend where it runs) on the dense cache, one query row
- int4: decode_attention over the tiered layer (sinks and recent bf16 pages, everything else INT4): the Gluon INT4
  kernel (kernels/int4_mma_decode.py)
- int4+mass: the same with the per-page attention mass output
- int4 page kernel: the Triton page kernel over the same pages (the Gluon kernel turned off)
- bf16: the page kernel over the dense bf16 cache described as bf16 pages

Bandwidth is on the bytes each one actually reads. Prints a table last; writes JSON and markdown.

    python benchmarks/kernel.py [--sweep]      # writes benchmarks/results/kernel-<gpu>.json and .md
    python benchmarks/kernel.py --split-sweep  # splits per (sequence, KV head) by batch: kernel-splits-<gpu>.*
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import transformers
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig

import common  # benchmarks/common.py (this script's directory is on the path)
from kvtier import TierConfig, TieredCache
from kvtier.kernels import decode_attention as kernel_module
from kvtier.kernels import int4_mma_decode
from kvtier.kernels.decode_attention import PagedKV, decode_attention, hot_table_rows, hot_table_tensor
from kvtier.formats import Int4Format
from kvtier.pages import PageLayout, WarmPages

QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CHUNK = 16384  # tokens per layer.update while filling


def filled(batch: int, tokens: int, seed: int, **config):
    """A one-layer TieredCache (TierConfig fields ``config``) and dense bf16 keys/values (B, H_kv, T, D) holding the
    same random tokens."""
    model = LlamaConfig(num_hidden_layers=1, num_attention_heads=QUERY_HEADS, num_key_value_heads=KV_HEADS,
                        head_dim=HEAD_DIM, hidden_size=QUERY_HEADS * HEAD_DIM)
    cache = TieredCache(TierConfig(budget_gb=40.0, **config), model)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, KV_HEADS, tokens, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    keys[..., :4] += 3  # a few outlier channels, as real keys have
    layer = cache.layers[0]
    for first in range(0, tokens, CHUNK):
        layer.update(keys[:, :, first:first + CHUNK], values[:, :, first:first + CHUNK])
    return layer, keys, values


def decode_query(batch: int, tokens: int):
    """A random bf16 decode query (B, H_q, D) and the (B,) int32 window [0, tokens) every row attends."""
    query = torch.randn(batch, QUERY_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    return query, kv_start, torch.full_like(kv_start, tokens)


def dense_as_pages(keys: torch.Tensor, values: torch.Tensor) -> PagedKV:
    """The dense cache as bf16 pages of the kernel's hot kind (no warm pages)."""
    batch, heads, tokens, dim = keys.shape
    layout = PageLayout(batch, heads, 64, dim, Int4Format(32))
    no_warm = WarmPages(layout, keys.device, pages_per_slab=1, budget=None)
    rows = hot_table_rows([(0, 0, tokens)])
    return PagedKV(no_warm, keys, values, rows, hot_table_tensor(rows, keys.device), rotation=None)


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")  # larger than any L2


def graph_ms(fn, repeats: int = 10) -> float:
    """Device time of one call with no host in the way: ``repeats`` calls, each after an L2 flush, replayed
    from a CUDA graph, minus the same graph's flushes alone; median of 20 replays."""
    flush_buffer = _l2_flush_buffer()

    def capture(with_call: bool) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm: workspaces allocated before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                flush_buffer.zero_()
                if with_call:
                    fn()
        return graph

    def replay_ms(graph) -> float:
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return (replay_ms(capture(True)) - replay_ms(capture(False))) / repeats


def host_us(fn, calls: int = 200) -> float:
    """Wall time per call when calls are issued back to back (host-bound when the GPU work is small)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def sdpa_call(query4, keys, values):
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def call(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(query4, keys, values, enable_gqa=True)
        try:
            call()
            return call, backend.name
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend ran")


def page_kernel(call):
    """``call`` with the Gluon INT4 kernel turned off, so that the Triton page kernel reads the pages."""
    def run():
        int4_mma_decode.ENABLED = False
        try:
            return call()
        finally:
            int4_mma_decode.ENABLED = True
    return run


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def measure(batch: int, tokens: int, turboquant_bits: tuple[int, ...] = ()) -> dict:
    layer, keys, values = filled(batch, tokens, seed=tokens + batch)
    query, kv_start, kv_end = decode_query(batch, tokens)
    scale = HEAD_DIM**-0.5
    tiered, dense = layer.paged(), dense_as_pages(keys, values)
    workspace = layer.cache.workspace
    sdpa, backend = sdpa_call(query.unsqueeze(2), keys, values)

    reference = sdpa()[:, :, 0]
    int4_out, _ = decode_attention(query, tiered, kv_start, kv_end, scale, workspace=workspace)
    bf16_out, _ = decode_attention(query, dense, kv_start, kv_end, scale, workspace=workspace)
    _, mass = decode_attention(query, tiered, kv_start, kv_end, scale, with_mass=True, workspace=workspace)

    calls = {
        "sdpa": sdpa,
        "int4": lambda: decode_attention(query, tiered, kv_start, kv_end, scale, workspace=workspace),
        "int4_mass": lambda: decode_attention(query, tiered, kv_start, kv_end, scale, with_mass=True,
                                              workspace=workspace),
        "bf16": lambda: decode_attention(query, dense, kv_start, kv_end, scale, workspace=workspace),
    }
    calls["int4_page_kernel"] = page_kernel(calls["int4"])
    times = {name: median_ms(call) for name, call in calls.items()}
    graph_times = {f"{name}_graph": graph_ms(call) for name, call in calls.items()}
    host = {f"{name}_host_us": host_us(calls[name]) for name in ("sdpa", "int4", "int4_page_kernel")}
    dense_bytes = keys.nbytes + values.nbytes
    int4_bytes = tiered.warm_pages * tiered.warm.page_bytes + tiered.hot_keys.nbytes + tiered.hot_values.nbytes
    row = {
        "batch": batch, "tokens": tokens, "sdpa_backend": backend,
        "warm_pages": tiered.warm_pages, "dense_bytes": dense_bytes, "int4_bytes": int4_bytes,
        **{f"{name}_ms": value for name, value in {**times, **graph_times}.items()}, **host,
        "sdpa_tb_per_s": dense_bytes / times["sdpa"] / 1e9,
        "int4_tb_per_s": int4_bytes / times["int4"] / 1e9,
        "bf16_tb_per_s": dense_bytes / times["bf16"] / 1e9,
        "int4_speedup": times["sdpa"] / times["int4"],
        "int4_graph_speedup": graph_times["sdpa_graph"] / graph_times["int4_graph"],
        "int4_graph_tb_per_s": int4_bytes / graph_times["int4_graph"] / 1e9,
        "int4_page_kernel_graph_speedup": graph_times["sdpa_graph"] / graph_times["int4_page_kernel_graph"],
        "int4_page_kernel_error_vs_dense": relative_error(calls["int4_page_kernel"]()[0], reference),
        "bf16_graph_time_ratio": graph_times["bf16_graph"] / graph_times["sdpa_graph"],
        "bf16_time_ratio": times["bf16"] / times["sdpa"],
        "mass_overhead": times["int4_mass"] / times["int4"] - 1,  # eager: host work included
        "mass_graph_overhead": graph_times["int4_mass_graph"] / graph_times["int4_graph"] - 1,  # device time
        "int4_error_vs_dense": relative_error(int4_out, reference),  # INT4 quantization error
        "bf16_error_vs_sdpa": relative_error(bf16_out, reference),
        "mass_total_min": mass.sum(-1).min().item(),  # warm pages' share of the softmax
    }
    del layer
    for bits in turboquant_bits:  # the same tokens in TurboQuant pages (QJL keys, centered), timed alike
        name = f"turboquant{bits}"
        tq_layer, _, _ = filled(batch, tokens, seed=tokens + batch, warm_format="turboquant", turboquant_bits=bits)
        tq = tq_layer.paged()
        call = lambda tq=tq: decode_attention(query, tq, kv_start, kv_end, scale, workspace=workspace)  # noqa: E731
        tq_bytes = tq.warm_pages * tq.warm.page_bytes + tq.hot_keys.nbytes + tq.hot_values.nbytes
        row.update({f"{name}_bytes": tq_bytes, f"{name}_ms": median_ms(call), f"{name}_graph_ms": graph_ms(call),
                    f"{name}_error_vs_dense": relative_error(call()[0], reference)})
        row[f"{name}_graph_speedup"] = graph_times["sdpa_graph"] / row[f"{name}_graph_ms"]
        row[f"{name}_graph_tb_per_s"] = tq_bytes / row[f"{name}_graph_ms"] / 1e9
        del tq_layer, tq, call
    del keys, values, tiered, dense
    torch.cuda.empty_cache()
    return row


SWEEP_WARPS, SWEEP_STAGES, SWEEP_TILES = (2, 4, 8), (2, 3, 4, 5), (64, 128, 256)


def sweep(batch: int, tokens: int) -> list[dict]:
    """Time the page kernel over launch settings on one filled layer; returns a row per setting and format."""
    layer, keys, values = filled(batch, tokens, seed=1)
    query, kv_start, kv_end = decode_query(batch, tokens)
    int4 = layer.paged()
    rows = []
    workspace = layer.cache.workspace
    for warps, stages, tile in itertools.product(SWEEP_WARPS, SWEEP_STAGES, SWEEP_TILES):
        # INT4 pages: ``tile`` is the warm tile; bf16 pages: the hot tile (64 or 128 tokens a step)
        kernel_module.WARM_TILE, kernel_module.HOT_TILE = tile, min(tile, 128)
        kernel_module.LAUNCH["int4"] = kernel_module.LAUNCH["dense"] = (warps, stages)
        pages = {"int4": int4, "dense": dense_as_pages(keys, values) if tile in (64, 128) else None}
        for kind, paged in pages.items():
            if paged is None:
                continue
            ms = graph_ms(lambda: decode_attention(query, paged, kv_start, kv_end, 0.1, workspace=workspace))
            rows.append({"batch": batch, "tokens": tokens, "kind": kind, "num_warps": warps, "num_stages": stages,
                         "tile": tile, "graph_ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    del layer, keys, values, pages, int4
    torch.cuda.empty_cache()
    return rows


SPLIT_SHAPES = ((1, 32768), (1, 131072), (1, 524288), (2, 131072), (4, 32768), (4, 131072), (8, 32768),
                (8, 131072), (8, 524288))
SPLIT_COUNTS = (2, 4, 8, 16, 32, 64, 128)


def split_sweep(batch: int, tokens: int) -> dict:
    """Graph-replay ms of INT4 pages (without and with per-page mass) and bf16 pages at each of SPLIT_COUNTS splits
    per (sequence, KV head), beside SDPA and the count the launcher's rule picks; outputs and mass must agree."""
    layer, keys, values = filled(batch, tokens, seed=1)
    query, kv_start, kv_end = decode_query(batch, tokens)
    workspace = layer.cache.workspace
    tiered, dense = layer.paged(), dense_as_pages(keys, values)
    sdpa, _ = sdpa_call(query.unsqueeze(2), keys, values)

    def call(paged, splits, with_mass=False):
        return decode_attention(query, paged, kv_start, kv_end, 0.1, with_mass=with_mass, workspace=workspace,
                                splits=splits)

    row = {"batch": batch, "tokens": tokens, "sdpa_ms": graph_ms(sdpa),
           "rule_splits": kernel_module.max_splits(batch, KV_HEADS, "cuda", one_warp=True), "int4": {}, "int4_mass": {},
           "bf16": {}}
    reference, reference_mass = call(tiered, SPLIT_COUNTS[0], with_mass=True)
    worst = 0.0
    for splits in SPLIT_COUNTS:
        out, mass = call(tiered, splits, with_mass=True)
        worst = max(worst, relative_error(out, reference), (mass - reference_mass).abs().max().item())
        row["int4"][splits] = graph_ms(lambda: call(tiered, splits))
        row["int4_mass"][splits] = graph_ms(lambda: call(tiered, splits, with_mass=True))
        row["bf16"][splits] = graph_ms(lambda: call(dense, splits))
    row["largest_difference_across_splits"] = worst  # output (relative) or mass (absolute)
    del layer, keys, values, tiered, dense, sdpa
    torch.cuda.empty_cache()
    return row


def split_table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | SDPA ms | " + " | ".join(f"INT4 ms, {count} splits" for count in SPLIT_COUNTS)
             + " | rule | fastest | mass cost at the rule | bf16 pages ms at the rule |",
             "|---:|---:|---:|" + "---:|" * len(SPLIT_COUNTS) + "---:|---:|---:|---:|"]
    for row in rows:
        times, rule = row["int4"], row["rule_splits"]
        rule_ms = times.get(rule)
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_ms']:.3f} | "
                     + " | ".join(f"{times[count]:.3f}" for count in SPLIT_COUNTS)
                     + f" | {rule} | {min(times, key=times.get)} | "
                     + (f"{row['int4_mass'][rule] / rule_ms - 1:+.1%} | {row['bf16'][rule]:.3f} |" if rule_ms
                        else "| |"))
    return "\n".join(lines)


def best_settings(rows: list[dict]) -> dict:
    """Per format, the launch setting with the least summed time over the swept shapes."""
    totals = {}
    for row in rows:
        key = (row["kind"], row["num_warps"], row["num_stages"], row["tile"])
        totals[key] = totals.get(key, 0.0) + row["graph_ms"]
    best = {}
    for (kind, warps, stages, tile), total in sorted(totals.items(), key=lambda item: item[1]):
        best.setdefault(kind, {"num_warps": warps, "num_stages": stages, "tile": tile, "sum_ms": total})
    return best


def environment() -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "shape": {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
    }


def table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | SDPA ms | INT4 ms | INT4 speedup | INT4 TB/s | bf16 / SDPA | "
             "graph: SDPA ms | INT4 ms | speedup | INT4 TB/s | bf16 / SDPA | mass cost | INT4 error | "
             "page kernel INT4 ms | speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_ms']:.3f} | {row['int4_ms']:.3f} | "
            f"{row['int4_speedup']:.2f}x | {row['int4_tb_per_s']:.2f} | {row['bf16_time_ratio']:.2f} | "
            f"{row['sdpa_graph_ms']:.3f} | {row['int4_graph_ms']:.3f} | "
            f"{row['int4_graph_speedup']:.2f}x | {row['int4_graph_tb_per_s']:.2f} | "
            f"{row['bf16_graph_time_ratio']:.2f} | {row['mass_graph_overhead'] * 100:+.1f}% | "
            f"{row['int4_error_vs_dense']:.3f} | {row['int4_page_kernel_graph_ms']:.3f} | "
            f"{row['int4_page_kernel_graph_speedup']:.2f}x |")
    return "\n".join(lines)


def turboquant_table(rows: list[dict], bits: int) -> str:
    name = f"turboquant{bits}"
    lines = [f"TurboQuant {bits}-bit pages (QJL keys, keys centered per key group), graph replay:", "",
             "| batch | tokens | SDPA ms | INT4 ms | TurboQuant ms | TurboQuant speedup | TurboQuant TB/s | "
             "bytes vs INT4 | TurboQuant error |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_graph_ms']:.3f} | {row['int4_graph_ms']:.3f} | "
                     f"{row[name + '_graph_ms']:.3f} | {row[name + '_graph_speedup']:.2f}x | "
                     f"{row[name + '_graph_tb_per_s']:.2f} | {row[name + '_bytes'] / row['int4_bytes']:.2f} | "
                     f"{row[name + '_error_vs_dense']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file name (default: kernel-<gpu>, e.g. kernel-h100)")
    parser.add_argument("--sweep", action="store_true",
                        help="first time launch settings (warps, stages, warm and hot tiles) and use the best")
    parser.add_argument("--turboquant", type=int, nargs="*", default=[], metavar="BITS",
                        help="also time TurboQuant pages (QJL keys, centered) at these codebook bits")
    parser.add_argument("--split-sweep", action="store_true",
                        help="only time splits per (sequence, KV head) at several batches: kernel-splits-<gpu>.*")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel.py times GPU kernels: it needs a CUDA device.")
    env = environment()
    gpu = common.device_tag("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.split_sweep:
        name = args.name or f"kernel-splits-{gpu}"
        rows = []
        for batch, tokens in SPLIT_SHAPES:
            rows.append(split_sweep(batch, tokens))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        text = split_table(rows)
        (args.out / f"{name}.md").write_text(
            f"Decode kernel by splits per (sequence, KV head), graph replay, one layer of Llama-3.1-8B shape on "
            f"{env['device']}; torch {env['torch']}, triton {env['triton']}. rule: the launcher's choice "
            f"for INT4 pages (the Gluon kernel: {int4_mma_decode.PROGRAMS_PER_MULTIPROCESSOR} one-warp programs per "
            f"multiprocessor, not rounded to a power of two).\n\n"
            + text + "\n")
        print(text)
        return
    swept, chosen = [], None
    if args.sweep:
        for batch, tokens in ((1, 131072), (8, 131072)):
            swept += sweep(batch, tokens)
        chosen = best_settings(swept)
        for kind, setting in chosen.items():
            kernel_module.LAUNCH[kind] = (setting["num_warps"], setting["num_stages"])
        kernel_module.WARM_TILE, kernel_module.HOT_TILE = chosen["int4"]["tile"], chosen["dense"]["tile"]
        print(json.dumps(chosen), flush=True)
    launch = {"launch": dict(kernel_module.LAUNCH), "splits_per_head": kernel_module.SPLITS_PER_HEAD or "rule",
              "split_programs_per_multiprocessor": kernel_module.SPLIT_PROGRAMS_PER_MULTIPROCESSOR,
              "warm_tile": kernel_module.WARM_TILE, "hot_tile": kernel_module.HOT_TILE}
    rows = []
    for batch in args.batches:
        for tokens in args.contexts:
            rows.append(measure(batch, tokens, tuple(args.turboquant)))
            print(json.dumps(rows[-1]), flush=True)
    args.name = args.name or f"kernel-{gpu}"
    result = {"environment": env, "launch": launch, "rows": rows, "sweep": swept, "sweep_best": chosen}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    header = (f"Decode attention, one layer of Llama-3.1-8B shape ({QUERY_HEADS} query heads, {KV_HEADS} KV heads, "
              f"dim {HEAD_DIM}, bf16) on {env['device']}; torch {env['torch']}, triton {env['triton']}. "
              "Median of do_bench runs with L2 flushed. INT4 = kvtier's tiered layer (4 sinks + 128-191 recent "
              "bf16, the rest INT4 pages) through decode_attention (the Gluon INT4 kernel); page kernel INT4 = the "
              "Triton page kernel over the same pages; bf16 = the page kernel over the dense cache as bf16 pages. "
              "Speedup and ratio are against SDPA on the dense bf16 cache; bandwidth is on bytes actually read. "
              "The first columns time eager calls (host launch overhead included); the graph columns replay the "
              "calls from a CUDA graph (device time alone); mass cost: the INT4 call with per-page mass against "
              "without, graph replay. INT4 error: relative L2 distance of the INT4 output "
              "from SDPA's on the exact cache (random keys and values, the quantization error alone).\n\n")
    text = table(rows) + "".join("\n\n" + turboquant_table(rows, bits) for bits in args.turboquant)
    (args.out / f"{args.name}.md").write_text(header + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
