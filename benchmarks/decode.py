"""Decode speed: ms per token against context length for each cache, batch 1 and 8, on one GPU in one run.

A random-weight Llama-3.1-8B-shaped model (bf16). For each batch, context and cache, a fresh cache is filled through
its own update path in chunks of random keys and values (what a chunked prefill writes; prefilling 1M tokens through
the model's forward is quadratic and far too slow), then ``--warmup`` untimed and ``--steps`` timed decode steps run
as generate() runs them (synchronized wall time; ms/token is the median step): the transformers caches through the
model's eager forward, kvtier on CUDA through its DecodeGraph (a CUDA graph replay while the cache holds no cold
pages, the eager forward otherwise; kvtier.graph). A configuration that cannot fit
(predicted from its bytes per token before filling: the GPU less the weights and ``--margin-gb``, or the host's
``--host-gb``) or whose fill passes ``--time-limit`` seconds is skipped, and the row says why.

Caches: transformers DynamicCache; DynamicCache(offloading=True) (filled one update a layer, since each update moves
the whole layer across PCIe; fewer timed steps: each moves the whole cache; skipped past half of ``--host-gb``, since
a 64 GB fill of 75 GB allowed was killed on the H200); QuantizedCache (quanto, 4-bit; "not
installed" without optimum-quanto; on CUDA its codes are unpacked by quanto's own torch code unless quanto's CUDA
extension is already built, see common.quanto_unpack); kvtier INT4 warm only (budget: the GPU less the weights and the
margin), and INT4 + host tier and TurboQuant 3-bit + host tier under ``--budget-gb`` (default 8: past about 400K
tokens at batch 1 most of the context is in pinned host memory and streams back every step).

    python benchmarks/decode.py --quick                 # 8K-128K, batch 1 and 8 (sized for ~4 min on an H200; not timed there yet)
    python benchmarks/decode.py --contexts 524288 1048576 --batches 1 --name decode-h200-long
    python benchmarks/decode.py --device cpu --tiny     # the CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from search import ProbeTimeout  # noqa: E402

import kvtier  # noqa: E402
from kvtier.errors import BudgetExceededError  # noqa: E402
from kvtier.formats import make_format  # noqa: E402
from kvtier.pages import PageLayout  # noqa: E402

CONTEXTS = (8192, 32768, 131072, 524288, 1048576)
QUICK_CONTEXTS = (8192, 32768, 131072)
TINY_CONTEXTS = (512, 2048)
CPU_KVTIER = dict(chunk_pages=4)  # on the CPU: a staging ring of a few pages, not of the GPU's 48 MiB chunks
CPU_WARM_PAGES = 8  # on the CPU: kvtier's host-tier budget holds its scratch and this many warm pages a layer, so
# pages go cold
QUANTO_SHARE = 0.3  # quanto 4-bit: packed codes plus group scales and shifts, of the dense bytes (estimate)


class FillDeadline:
    def __init__(self, seconds: float):
        self.ends_at = time.monotonic() + seconds

    def update(self, _tokens: int) -> None:
        if time.monotonic() > self.ends_at:
            raise ProbeTimeout


def kvtier_bytes_per_token(model, name: str, batch: int) -> float:
    """Device or host bytes a token takes in kvtier's warm/cold pages, all layers (from the page layout)."""
    settings = {key: value for key, value in common.KVTIER_CONFIGS[name].items() if key != "on_budget_full"}
    config = kvtier.TierConfig(**settings)
    layout = PageLayout(batch, model.config.num_key_value_heads, config.block_size, model.config.head_dim,
                        make_format(config))
    return model.config.num_hidden_layers * layout.page_bytes / config.block_size


def why_not(name: str, model, batch: int, context: int, args) -> str | None:
    """Why this cache cannot hold ``context`` tokens at ``batch`` here (None: try it)."""
    reason = common.unavailable_reason(name, args.device)
    if reason:
        return reason
    dense = common.dense_bytes_per_token(model.config) * batch * context
    per_layer = dense / model.config.num_hidden_layers
    room = args.gpu_room_gb * common.GB
    if name == "dense" and dense + 2 * per_layer > room:
        return f"does not fit: {dense / common.GB:.0f} GB of bf16 cache, {room / common.GB:.0f} GB free"
    if name == "offloaded":
        # on the H200 (128 GB of host memory, 75 GB allowed) the host killed the process while this cache filled
        # 64 GB at 512K tokens, twice: half the allowance is its limit here (decode-h200-long.md)
        if 2 * dense > args.host_gb * common.GB:
            return f"does not fit: {dense / common.GB:.0f} GB on the host, at most half of the {args.host_gb:.0f} GB " \
                   "allowed (a 64 GB fill of 75 GB allowed was killed for lack of host memory)"
        if 4 * per_layer > room:
            return f"does not fit: a layer in flight takes {4 * per_layer / common.GB:.0f} GB"
    if name == "quanto-int4" and QUANTO_SHARE * dense + 3 * per_layer > room:
        return f"does not fit: about {(QUANTO_SHARE * dense + 3 * per_layer) / common.GB:.0f} GB (quantized + " \
               f"one layer dequantized), {room / common.GB:.0f} GB free"
    if name.startswith("kvtier"):
        tiered = kvtier_bytes_per_token(model, name, batch) * context
        if name == "kvtier-int4" and tiered > args.warm_budget_gb * common.GB:
            return f"does not fit: {tiered / common.GB:.0f} GB of pages, budget {args.warm_budget_gb:.0f} GB"
        if name != "kvtier-int4" and tiered - args.budget_gb * common.GB > args.host_gb * common.GB:
            return f"does not fit: {tiered / common.GB:.0f} GB of pages, {args.host_gb:.0f} GB of host allowed"
    return None


def measure(name: str, model, batch: int, context: int, args) -> dict:
    budget = args.warm_budget_gb if name == "kvtier-int4" else args.budget_gb
    extra = {}
    if not args.device.startswith("cuda") and name.endswith("-host"):  # the CPU smoke run: a tight budget
        extra = CPU_KVTIER
        warm = CPU_WARM_PAGES * kvtier.TierConfig().block_size * kvtier_bytes_per_token(model, name, batch)
        budget = (common.kvtier_overhead_bytes(name, model, batch, args.device, with_hot=True, **extra) + warm) / common.GB
    cache = common.new_cache(name, model, budget, args.host_gb, **extra)
    started = time.monotonic()
    # the offloaded cache moves a whole layer across PCIe at every update: one update a layer, as cold_tier.py fills it
    chunk = context if name == "offloaded" else args.chunk
    common.fill_chunked(cache, model.config, batch, context, chunk, args.device, FillDeadline(args.time_limit))
    common.synchronize(args.device)
    row = {"fill_s": time.monotonic() - started}
    steps = max(3, args.steps // 4) if name == "offloaded" else args.steps
    moved = cache.prefetcher.moved_bytes if isinstance(cache, kvtier.TieredCache) and cache.prefetcher else 0
    times = common.decode_steps_ms(model, cache, batch, steps, args.warmup)
    row.update(ms_per_token=common.median(times), steps_ms=times)
    if isinstance(cache, kvtier.TieredCache):
        stats = cache.stats()
        row.update(budget_gb=budget, device_cache_gb=stats["cache_bytes"] / common.GB, warm_tokens=stats["warm"]["tokens"],
                   cold_tokens=stats["cold"]["tokens"], host_gb=stats["cold"]["bytes"] / common.GB)
        if cache.prefetcher is not None:
            row["moved_gb_per_step"] = (cache.prefetcher.moved_bytes - moved) / (steps + args.warmup) / common.GB
    return row


def run_row(name: str, model, batch: int, context: int, args) -> dict:
    row = {"batch": batch, "context": context, "cache": name}
    reason = why_not(name, model, batch, context, args)
    if reason:
        return {**row, "skipped": reason}
    try:
        row.update(measure(name, model, batch, context, args))
    except ProbeTimeout:
        row["skipped"] = f"the fill passed the time limit ({args.time_limit:g} s)"
    except (torch.OutOfMemoryError, BudgetExceededError) as error:
        row["skipped"] = f"out of memory: {str(error).splitlines()[0][:160]}"
    except Exception as error:  # say what failed and go on with the next row
        if common.is_out_of_memory(error):
            row["skipped"] = f"out of memory: {str(error).splitlines()[0][:160]}"
            return row
        row["failed"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        common.release(model)
    return row


def add_speedups(rows: list[dict]) -> None:
    """Each kvtier row's speedup over each baseline measured at the same batch and context (baseline ms / kvtier ms)."""
    measured = {(row["batch"], row["context"], row["cache"]): row for row in rows if "ms_per_token" in row}
    for (batch, context, name), row in measured.items():
        if name.startswith("kvtier"):
            row["speedup"] = {base: measured[(batch, context, base)]["ms_per_token"] / row["ms_per_token"]
                              for base in common.BASELINES if (batch, context, base) in measured}


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "ms_per_token" in row:
        return f"{row['ms_per_token']:.1f}"
    text = "skipped: " + row["skipped"] if "skipped" in row else "failed: " + row["failed"]
    return text if len(text) <= 90 else text[:87] + "..."


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    caches = settings["caches"]
    lines = [f"# Decode ms/token vs context ({env['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}"
             + (f", triton {env['triton']}" if "triton" in env else "")
             + (f", optimum-quanto {env['optimum-quanto']}" if "optimum-quanto" in env else "")
             + f"; {settings['model']}; transformers caches eager, kvtier as generate() runs it (on CUDA: a CUDA graph "
             "replay while no page is cold, else eager); "
             f"median of {settings['steps']} steps after {settings['warmup']} "
             f"(offloaded: {max(3, settings['steps'] // 4)}); kvtier warm-only budget {settings['warm_budget_gb']:.3g} GB, "
             f"host-tier configurations {settings['budget_gb']:.3g} GB on the GPU (CPU smoke: scratch + 8 warm pages a layer) and up to {settings['host_gb']:.3g} GB "
             "on the host.", "",
             "| batch | context | " + " | ".join(common.LABELS[name] for name in caches) + " |",
             "|---:|---:|" + "---:|" * len(caches)]
    by_key = {(row["batch"], row["context"], row["cache"]): row for row in result["rows"]}
    points = sorted({(row["batch"], row["context"]) for row in result["rows"]})
    for batch, context in points:
        lines.append(f"| {batch} | {context:,} | " + " | ".join(cell(by_key.get((batch, context, name)))
                                                           for name in caches) + " |")
    speed_rows = [row for row in result["rows"] if row.get("speedup")]
    if speed_rows:
        lines += ["", "Speedup of kvtier over each baseline (baseline ms / kvtier ms; above 1: kvtier is faster):", "",
                  "| batch | context | kvtier | x dense | x offloaded | x quanto 4-bit | cold tokens | PCIe GB/step |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for row in speed_rows:
            speed = row["speedup"]
            lines.append(f"| {row['batch']} | {row['context']:,} | {row['cache']} | "
                         + " | ".join(f"{speed[base]:.2f}" if base in speed else "" for base in common.BASELINES)
                         + f" | {row.get('cold_tokens', 0):,} | {row.get('moved_gb_per_step', 0):.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path, name: str) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    batches = sorted({row["batch"] for row in result["rows"]})
    figure, axes_list = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for axes, batch in zip(axes_list[0], batches):
        common.latency_axes(axes, [row for row in result["rows"] if row["batch"] == batch],
                            result["settings"]["caches"], common.LABELS)
        axes.set_title(f"batch {batch}", fontsize=10)
    figure.suptitle(f"Decode latency vs context ({result['environment']['device']})", fontsize=10)
    return common.save_figure(figure, out, name)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model (CPU smoke run)")
    parser.add_argument("--layers", type=int, help="shorten the 8B-shaped model to this many layers")
    parser.add_argument("--quick", action="store_true", help="contexts 8K-128K and 8 timed steps")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--caches", nargs="+", default=list(common.CACHES), choices=common.CACHES)
    parser.add_argument("--steps", type=int, help="timed decode steps (default 16; quick 8; tiny 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="kvtier's device budget with the host tier")
    parser.add_argument("--warm-budget-gb", type=float, help="kvtier warm-only budget (default: GPU room)")
    parser.add_argument("--margin-gb", type=float, default=6.0, help="GPU memory left for activations")
    parser.add_argument("--host-gb", type=float, help="host memory allowed (default 60%% of the available)")
    parser.add_argument("--chunk", type=int, help="fill chunk (default 16384; tiny 256)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds a fill may take")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file stem (default decode-<device>)")
    args = parser.parse_args(argv)
    args.contexts = args.contexts or list(TINY_CONTEXTS if args.tiny else QUICK_CONTEXTS if args.quick else CONTEXTS)
    args.steps = args.steps or (3 if args.tiny else 8 if args.quick else 16)
    args.chunk = args.chunk or (256 if args.tiny else common.FILL_CHUNK)
    if args.host_gb is None:
        args.host_gb = 0.6 * psutil.virtual_memory().available / common.GB
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    config = common.tiny_shape() if args.tiny else common.llama_8b_shape(args.layers or 32)
    model = common.random_model(config, args.device)
    if args.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        args.gpu_room_gb = (total - common.weight_bytes(model)) / common.GB - args.margin_gb
    else:
        args.gpu_room_gb = min(args.host_gb, 2.0)  # the CPU smoke run: a small pretend device
        args.host_gb = min(args.host_gb, 0.05)
    args.warm_budget_gb = args.warm_budget_gb or args.gpu_room_gb
    model_text = ("tiny 2-layer Llama-shaped model" if args.tiny else
                  f"random-weight Llama-3.1-8B shape, {config.num_hidden_layers} layers") + ", bf16"
    name = args.name or f"decode-{common.device_tag(args.device)}"
    result = {"environment": common.environment(args.device),
              "settings": {"model": model_text, "caches": args.caches, "contexts": args.contexts,
                           "batches": args.batches, "steps": args.steps, "warmup": args.warmup,
                           "budget_gb": args.budget_gb, "warm_budget_gb": args.warm_budget_gb, "host_gb": args.host_gb,
                           "chunk": args.chunk, "time_limit_s": args.time_limit,
                           "kvtier_configs": common.KVTIER_CONFIGS},
              "rows": []}
    plan = [(batch, context, cache) for batch in args.batches for context in args.contexts for cache in args.caches]
    common.run_plan(plan, lambda cache, batch, context: run_row(cache, model, batch, context, args), result, markdown,
                    args.out, name, cell, add_speedups)
    common.finish_results(result, markdown, plot, args.out, name)
    return result


if __name__ == "__main__":
    main()
