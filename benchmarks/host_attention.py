"""Attention over host-resident INT4 pages on the CPU: the numba kernel beside its torch reference.

One layer of Llama-3.1-8B's shape (8 KV heads, 4 query heads per KV head, head dim 128) with INT4 pages of 64 tokens
(keys per channel over 32-token groups, values per token), as the cold tier keeps them: one uint8 host slab, the
attended rows in a shuffled order. The pages hold real quantized random keys and values (a few distinct pages,
repeated over the slab: the arithmetic does not depend on the values). For each context and batch it times, as the
median of several calls after warm-up:

- numba: kvtier.kernels.host_attention.host_attention, with one numba thread and with all of them (numba's
  default; ``--threads`` picks others)
- torch: host_attention_reference in float32 (dequantize 4096 tokens at a time, torch's own threads)

and checks both against the reference in float64 ("numba error": relative L2 distance of the outputs). Bandwidth
is on the packed page bytes the call reads. Cases whose slab and reference scratch do not fit the host's available
memory are skipped, and said so. The load average before and after is recorded: on a shared host, other work
slows the multi-threaded timings most. Prints a table last; writes JSON with the CPU, threads and versions.

    python benchmarks/host_attention.py      # writes benchmarks/results/host-attention-<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import psutil
import torch

from kvtier.formats import Int4Format
from kvtier.kernels import host_attention as host_module
from kvtier.kernels.host_attention import host_attention, host_attention_reference
from kvtier.pages import PageLayout

KV_HEADS, GROUPS, HEAD_DIM, BLOCK, KEY_GROUP = 8, 4, 128, 64, 32
DISTINCT_PAGES = 8
TARGET_SECONDS = 3.0  # time spent on the timed calls of one implementation and case, at most about


def filled_slab(layout: PageLayout, pages: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (pages, page_bytes): DISTINCT_PAGES pages of quantized random keys and values, repeated."""
    shape = (layout.batch, layout.kv_heads, layout.block_size, layout.head_dim)
    distinct = torch.empty(DISTINCT_PAGES, layout.page_bytes, dtype=torch.uint8)
    for row in range(DISTINCT_PAGES):
        keys = torch.randn(shape, generator=generator) * 2
        keys[..., :4] += 3  # a few outlier channels, as real keys have
        page = layout.format.quantize(keys, torch.randn(shape, generator=generator), None, None)
        for name, view in layout.views(distinct[row:row + 1]).items():
            view[0].copy_(page[name])
    return distinct.repeat(-(-pages // DISTINCT_PAGES), 1)[:pages].contiguous()


def reference_scratch_bytes(batch: int) -> int:
    """Rough peak of the float64 reference's temporaries: a tile of keys and values and their copies."""
    return 8 * batch * KV_HEADS * host_module.REFERENCE_TILE_TOKENS * HEAD_DIM * 8


def median_ms(fn, warmup: int, max_runs: int, min_runs: int = 3) -> tuple[float, int]:
    """Median wall time of ``fn`` in ms after ``warmup`` calls, over as many runs as fit TARGET_SECONDS."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < min_runs or (len(times) < max_runs and sum(times) < TARGET_SECONDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, len(times)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def measure(batch: int, tokens: int, thread_counts: list[int], seed: int) -> dict:
    layout = PageLayout(batch, KV_HEADS, BLOCK, HEAD_DIM, Int4Format(KEY_GROUP))
    pages = tokens // BLOCK
    generator = torch.Generator().manual_seed(seed)
    slab = filled_slab(layout, pages, generator)
    rows = torch.randperm(pages, generator=generator)  # the cold tier's rows, in no particular order
    positions = torch.arange(pages) * BLOCK
    kv_start, kv_end = torch.zeros(batch, dtype=torch.int64), torch.full((batch,), tokens, dtype=torch.int64)
    queries = torch.randn(batch, KV_HEADS, GROUPS, HEAD_DIM, generator=generator) / HEAD_DIM**0.5
    arguments = (queries, slab, rows, positions, kv_start, kv_end, layout)
    read = pages * layout.page_bytes
    row = {"batch": batch, "tokens": tokens, "pages": pages, "page_bytes": layout.page_bytes, "bytes_read": read,
           "numba": {}}
    default_threads = numba.get_num_threads()
    for threads in thread_counts:
        numba.set_num_threads(threads)
        milliseconds, runs = median_ms(lambda: host_attention(*arguments, with_page_lse=True), warmup=2, max_runs=50)
        row["numba"][threads] = {"ms": milliseconds, "runs": runs, "gb_per_s": read / milliseconds / 1e6}
    numba.set_num_threads(default_threads)
    numba_out, numba_lse, _ = host_attention(*arguments, with_page_lse=True)
    torch_ms, torch_runs = median_ms(lambda: host_attention_reference(*arguments, with_page_lse=True), warmup=1,
                                     max_runs=10)
    torch_out, torch_lse, _ = host_attention_reference(*arguments, with_page_lse=True)
    exact_out, exact_lse, _ = host_attention_reference(queries.double(), *arguments[1:])
    return dict(row, torch_ms=torch_ms, torch_runs=torch_runs, torch_gb_per_s=read / torch_ms / 1e6,
                speedup=torch_ms / min(timing["ms"] for timing in row["numba"].values()),
                numba_out_relative_error=relative_error(numba_out, exact_out),
                torch_out_relative_error=relative_error(torch_out, exact_out),
                numba_lse_max_abs_error=(numba_lse.double() - exact_lse).abs().max().item(),
                load_average_1min=os.getloadavg()[0])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_slug(model: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8480+ @ 2.0GHz' -> 'intel-xeon-platinum-8480'."""
    words = re.sub(r"\((r|tm)\)|@.*|\bcpu\b|\bprocessor\b|\d+-core", " ", model.lower())
    return "-".join(re.findall(r"[a-z0-9]+", words)) or "cpu"


def environment() -> dict:
    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": numba.threading_layer(), "torch_threads": torch.get_num_threads(),
        "numba": numba.__version__, "numpy": np.__version__, "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"kv_heads": KV_HEADS, "query_heads_per_kv_head": GROUPS, "head_dim": HEAD_DIM, "block": BLOCK,
                  "key_group": KEY_GROUP, "format": "int4, keys per channel"},
    }


def table(rows: list[dict], env: dict, thread_counts: list[int]) -> str:
    numba_columns = "".join(f" numba ms ({n} thr) | GB/s |" for n in thread_counts)
    lines = [f"{env['cpu']}: numba {env['numba_threads']} threads ({env['numba_threading_layer']}), torch "
             f"{env['torch_threads']} threads; load average before {env['load_average_before'][0]:.2f}, after "
             f"{env['load_average_after'][0]:.2f}",
             f"| batch | tokens | MB read |{numba_columns} torch ms | torch GB/s | speedup (best numba) | "
             "numba error | load |",
             "|---:|---:|---:|" + "---:|---:|" * len(thread_counts) + "---:|---:|---:|---:|---:|"]
    for row in rows:
        numba_cells = "".join(f" {row['numba'][n]['ms']:.2f} | {row['numba'][n]['gb_per_s']:.2f} |"
                              for n in thread_counts)
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['bytes_read'] / 1e6:.1f} |{numba_cells} "
                     f"{row['torch_ms']:.1f} | {row['torch_gb_per_s']:.2f} | {row['speedup']:.1f}x | "
                     f"{row['numba_out_relative_error']:.1e} | {row['load_average_1min']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file name (default: host-attention-<cpu>)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="numba thread counts to time (default: 1 and all of numba's threads)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    start = time.perf_counter()
    host_attention(*_tiny_case())  # compile once, apart from the timings
    env = dict(environment(), compile_s=time.perf_counter() - start, load_average_before=load_before)
    thread_counts = args.threads or sorted({1, numba.get_num_threads()})
    rows, skipped = [], []
    for batch in args.batches:
        for tokens in args.contexts:
            layout = PageLayout(batch, KV_HEADS, BLOCK, HEAD_DIM, Int4Format(KEY_GROUP))
            needed = tokens // BLOCK * layout.page_bytes + reference_scratch_bytes(batch)
            available = psutil.virtual_memory().available
            if needed > 0.8 * available:
                skipped.append({"batch": batch, "tokens": tokens, "needed_bytes": needed, "available": available})
                print(f"skipped batch {batch}, {tokens} tokens: needs about {needed / 1e9:.1f} GB, "
                      f"{available / 1e9:.1f} GB available", flush=True)
                continue
            rows.append(measure(batch, tokens, thread_counts, seed=len(rows)))
            print(json.dumps(rows[-1]), flush=True)
    env["load_average_after"] = os.getloadavg()
    name = args.name or f"host-attention-{cpu_slug(env['cpu'])}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows, "skipped": skipped},
                                                      indent=2))
    print(table(rows, env, thread_counts))


def _tiny_case():
    layout = PageLayout(1, KV_HEADS, BLOCK, HEAD_DIM, Int4Format(KEY_GROUP))
    slab = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    two = torch.arange(2)
    return (torch.zeros(1, KV_HEADS, GROUPS, HEAD_DIM), slab, two, two * BLOCK, torch.zeros(1, dtype=torch.int64),
            torch.full((1,), 2 * BLOCK), layout)


if __name__ == "__main__":
    main()
