"""Decode with no Python in the way: kvtier replayed from a CUDA graph, against the compiled StaticCache.

A random-weight Llama-3.1-8B-shaped model (bf16), batch 1 (``--batches``). For each context, each cache is filled
through its own update path with random keys and values (what a chunked prefill writes), then ``--warmup`` untimed and
``--steps`` timed decode steps run (synchronized wall time; ms/token is the median step):

- ``kvtier-graph``: kvtier INT4, warm only, its decode step replayed from a CUDA graph (kvtier.graph.DecodeGraph, what
  generate() uses on CUDA); the first step's time includes the capture;
- ``kvtier-eager``: the same cache with every step through the model's eager forward;
- ``static-compiled``: transformers' StaticCache sized to the context, the forward under
  ``torch.compile(mode="reduce-overhead")``; the first step's time includes the compilation;
- ``dynamic-eager``: transformers' DynamicCache, eager.

Time to first token (``--ttft-contexts``): ``generate(max_new_tokens=1)`` on a random prompt, the model's own prefill
(in ``--ttft-chunk`` token chunks, transformers' ``prefill_chunk_size``) then one token, for kvtier and the
DynamicCache; the first call at each size is untimed (Triton compiles then).

A cache whose bytes do not fit on the GPU beside the weights (less ``--margin-gb``) is skipped and the row says so.

``--page-kernel`` turns the Gluon INT4 kernel off, so that kvtier's steps read INT4 pages with the Triton page kernel
(a comparison of the two kernels inside the model).

    python benchmarks/graph_decode.py                                  # 8K, 32K, 128K, 512K on the GPU
    python benchmarks/graph_decode.py --device cpu --tiny --caches kvtier-graph kvtier-eager dynamic-eager  # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import kvtier  # noqa: E402
from kvtier.compat import with_cache  # noqa: E402
from kvtier.kernels import int4_mma_decode  # noqa: E402
from kvtier.graph import DecodeGraph  # noqa: E402

CACHES = ("kvtier-graph", "kvtier-eager", "static-compiled", "dynamic-eager")
LABELS = {"kvtier-graph": "kvtier INT4 (CUDA graph)", "kvtier-eager": "kvtier INT4 (eager)",
          "static-compiled": "StaticCache (compiled)", "dynamic-eager": "DynamicCache (eager)"}
CONTEXTS = (8192, 32768, 131072, 524288)
INT4_SHARE = 0.3  # kvtier INT4 bytes per token, of the dense cache's (an upper bound, for the fit check)


def cache_bytes(name: str, model, batch: int, context: int) -> float:
    dense = common.dense_bytes_per_token(model.config) * batch * context
    return dense * INT4_SHARE if name.startswith("kvtier") else dense * (2 if name == "dynamic-eager" else 1)


def new_cache(name: str, model, batch: int, context: int, args):
    """A filled cache and the step function that decodes one token with it: step(token (B, 1)) -> logits."""
    config = model.config
    if name.startswith("kvtier"):
        handle = kvtier.attach(model, budget_gb=args.kvtier_budget_gb, on_budget_full="raise",
                               cuda_graph="auto" if args.device.startswith("cuda") else "uncaptured")
        cache = handle.new_cache()
        common.fill_chunked(cache, config, batch, context, args.chunk, args.device)
        if name == "kvtier-eager":
            return cache, lambda token: model(input_ids=token, **with_cache(cache), use_cache=True,
                                              logits_to_keep=1).logits
        graph = cache.decode_graph = DecodeGraph(cache, captured=args.device.startswith("cuda"))
        return cache, lambda token: graph.forward(model.forward, input_ids=token, **with_cache(cache),
                                                  use_cache=True, logits_to_keep=1).logits
    if name == "dynamic-eager":
        cache = DynamicCache(config=config)
        common.fill_chunked(cache, config, batch, context, args.chunk, args.device)
        return cache, lambda token: model(input_ids=token, **with_cache(cache), use_cache=True,
                                          logits_to_keep=1).logits
    cache = StaticCache(config=config, max_cache_len=context + args.steps + args.warmup + 1)
    fill_static(cache, config, batch, context, args.chunk, args.device)
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    position = torch.tensor([context], device=args.device)

    def step(token):
        logits = compiled(input_ids=token, position_ids=position.view(1, 1).expand(batch, 1),
                          cache_position=position.clone(), **with_cache(cache), use_cache=True,
                          logits_to_keep=1).logits
        position.add_(1)
        return logits
    return cache, step


def fill_static(cache, config, batch: int, context: int, chunk: int, device: str) -> None:
    """A StaticCache filled as a chunked prefill writes it (cache_position given, as older transformers need)."""
    generator = torch.Generator(device=device).manual_seed(1)
    for first in range(0, context, chunk):
        length = min(chunk, context - first)
        positions = torch.arange(first, first + length, device=device)
        for index in range(config.num_hidden_layers):
            keys, values = common.random_states(config, batch, length, generator, device)
            cache.update(keys, values, index, {"cache_position": positions})


@torch.no_grad()
def measure(name: str, model, batch: int, context: int, args) -> dict:
    started = time.monotonic()
    cache, step = new_cache(name, model, batch, context, args)
    common.synchronize(args.device)
    row = {"fill_s": time.monotonic() - started}
    token = torch.full((batch, 1), 7, device=args.device)
    times = common.timed_steps(lambda: step(token), args.warmup + args.steps, args.device)
    row.update(first_step_ms=times[0], ms_per_token=common.median(times[args.warmup:]), steps_ms=times[args.warmup:])
    if isinstance(cache, kvtier.TieredCache) and cache.decode_graph is not None:
        row["graph"] = cache.decode_graph.stats()
    del cache, step
    return row


@torch.no_grad()
def time_to_first_token(model, context: int, args) -> list[dict]:
    """Seconds from a (1, context) prompt to its first generated token, kvtier and DynamicCache, each the second of
    two identical calls."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=args.device,
                           generator=torch.Generator(args.device).manual_seed(2))
    chunking = {"prefill_chunk_size": args.ttft_chunk} if args.ttft_chunk else {}
    rows = []
    for name in ("kvtier", "dynamic"):
        if name == "kvtier":
            kvtier.attach(model, budget_gb=args.kvtier_budget_gb, on_budget_full="raise")
        try:
            seconds = []
            for _ in range(2):
                common.synchronize(args.device)
                started = time.perf_counter()
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                               pad_token_id=0, **chunking)
                common.synchronize(args.device)
                seconds.append(time.perf_counter() - started)
            rows.append({"context": context, "cache": name, "ttft_s": seconds[1], "first_call_s": seconds[0],
                         "prefill_chunk": args.ttft_chunk})
        except Exception as error:  # noqa: BLE001 (a row that fails says why; the others still run)
            if not common.is_out_of_memory(error):
                raise
            rows.append({"context": context, "cache": name, "skipped": "out of memory"})
        finally:
            common.release(model)
        print(f"time to first token, {context:,} tokens, {name}: {rows[-1]}", flush=True)
    return rows


def run_row(name: str, model, batch: int, context: int, args) -> dict:
    row = {"batch": batch, "context": context, "cache": name}
    need = cache_bytes(name, model, batch, context) / common.GB
    if need > args.gpu_room_gb:
        row["skipped"] = f"needs about {need:.0f} GB of cache; {args.gpu_room_gb:.0f} GB free beside the weights"
        return row
    try:
        row.update(measure(name, model, batch, context, args))
    except Exception as error:  # noqa: BLE001 (a row that fails says why; the others still run)
        if not common.is_out_of_memory(error):
            raise
        row["skipped"] = "out of memory"
    finally:
        common.release(model)
        torch._dynamo.reset()
    return row


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    caches = settings["caches"]
    lines = [f"# Decode ms/token: kvtier with a CUDA graph vs the compiled StaticCache ({env['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}"
             + (f", triton {env['triton']}" if "triton" in env else "")
             + f"; {settings['model']}; median of {settings['steps']} steps after {settings['warmup']}; kvtier INT4 "
             f"warm only, budget {settings['kvtier_budget_gb']:.3g} GB"
             + (f", pages read by the {settings['int4_kernel']}" if "int4_kernel" in settings else "") + ".", "",
             "| batch | context | " + " | ".join(LABELS[name] for name in caches) + " |",
             "|---:|---:|" + "---:|" * len(caches)]
    by_key = {(row["batch"], row["context"], row["cache"]): row for row in result["rows"]}
    for batch, context in sorted({(row["batch"], row["context"]) for row in result["rows"]}):
        cells = []
        for name in caches:
            row = by_key.get((batch, context, name), {})
            cells.append(f"{row['ms_per_token']:.2f}" if "ms_per_token" in row else row.get("skipped", ""))
        lines.append(f"| {batch} | {context:,} | " + " | ".join(cells) + " |")
    lines += ["", "First step (capture or compilation included), ms; fill, s:", "",
              "| batch | context | cache | first step ms | fill s | graph captures | replays |", "|---:|---:|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if "ms_per_token" in row:
            graph = row.get("graph") or {}
            lines.append(f"| {row['batch']} | {row['context']:,} | {LABELS[row['cache']]} | {row['first_step_ms']:.0f} | "
                         f"{row['fill_s']:.1f} | {graph.get('captures', '')} | {graph.get('replays', '')} |")
    if result.get("ttft"):
        lines += ["", "Time to first token (generate(max_new_tokens=1), batch 1, the second of two calls), s:", "",
                  "| context | cache | prefill chunk | seconds |", "|---:|---|---:|---:|"]
        lines += [f"| {row['context']:,} | {row['cache']} | {row.get('prefill_chunk') or 'whole'} | "
                  f"{row['ttft_s']:.2f} |" if "ttft_s" in row else f"| {row['context']:,} | {row['cache']} | | "
                  f"{row['skipped']} |" for row in result["ttft"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path, name: str) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(6, 4.2))
    common.latency_axes(axes, [row for row in result["rows"] if row["batch"] == 1], result["settings"]["caches"],
                        LABELS)
    axes.set_title("batch 1", fontsize=10)
    figure.suptitle(f"Decode latency, graphs vs compiled ({result['environment']['device']})", fontsize=10)
    return common.save_figure(figure, out, name)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model (CPU smoke run)")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--margin-gb", type=float, default=8.0, help="GPU memory left for activations")
    parser.add_argument("--chunk", type=int, default=common.FILL_CHUNK)
    parser.add_argument("--ttft-contexts", type=int, nargs="*", default=[8192, 32768],
                        help="prompt lengths for the time-to-first-token rows (none: skip them)")
    parser.add_argument("--ttft-chunk", type=int, default=2048, help="prefill chunk, tokens (0: the whole prompt)")
    parser.add_argument("--page-kernel", action="store_true",
                        help="kvtier's INT4 pages through the Triton page kernel (the Gluon INT4 kernel off)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file stem (default graph-decode-<device>)")
    args = parser.parse_args(argv)
    args.contexts = args.contexts or ([512, 2048] if args.tiny else list(CONTEXTS))
    if args.tiny:
        args.ttft_contexts = [min(context, 512) for context in args.ttft_contexts[:1]]
    if args.tiny:
        args.steps, args.warmup, args.chunk = min(args.steps, 3), min(args.warmup, 1), 256
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    int4_mma_decode.ENABLED = not args.page_kernel
    config = common.tiny_shape() if args.tiny else common.llama_8b_shape()
    model = common.random_model(config, args.device)
    if args.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        args.gpu_room_gb = (total - common.weight_bytes(model)) / common.GB - args.margin_gb
    else:
        args.gpu_room_gb = 2.0
    args.kvtier_budget_gb = args.gpu_room_gb
    name = args.name or f"graph-decode-{common.device_tag(args.device)}"
    result = {"environment": common.environment(args.device),
              "settings": {"model": ("tiny 2-layer Llama-shaped model" if args.tiny else
                                     "random-weight Llama-3.1-8B shape") + ", bf16",
                           "caches": args.caches, "contexts": args.contexts, "batches": args.batches,
                           "steps": args.steps, "warmup": args.warmup, "kvtier_budget_gb": args.kvtier_budget_gb,
                           "int4_kernel": "Triton page kernel" if args.page_kernel else "Gluon INT4 kernel"},
              "rows": []}
    plan = [(batch, context, cache) for batch in args.batches for context in args.contexts for cache in args.caches]
    common.run_plan(plan, lambda cache, batch, context: run_row(cache, model, batch, context, args), result, markdown,
                    args.out, name, lambda row: f"{row.get('ms_per_token', row.get('skipped'))} ms/token")
    result["ttft"] = [row for context in args.ttft_contexts for row in time_to_first_token(model, context, args)]
    common.finish_results(result, markdown, plot, args.out, name)
    return result


if __name__ == "__main__":
    main()
