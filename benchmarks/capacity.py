"""Capacity: the longest context each cache prefills and then decodes 16 tokens with, under one fixed GPU memory cap.

A random-weight Llama-3.1-8B-shaped model (bf16) is loaded first; then the process's GPU memory is capped with
``torch.cuda.set_per_process_memory_fraction`` at the weights plus ``--extra-gb``, so the cap holds the weights, the
cache and every activation of the fill and of the decode steps. For each cache, contexts are probed by doubling from
``--start`` and then bisection to ``--resolution``: a probe fills a fresh cache through its own update path in chunks
of ``--chunk`` random keys and values (what a chunked prefill writes; not the model's forward, which is quadratic and
far too slow at these lengths), then runs ``--decode`` decode steps through ``model()``. It fits unless it raises
torch.OutOfMemoryError, or kvtier's BudgetExceededError / BudgetTooSmallError (kvtier cannot hold more). Everything is
freed between probes. A search stops at ``--max-tokens`` or at ``--time-limit`` seconds per cache and then reports "at
least N".

Caches: transformers DynamicCache; DynamicCache(offloading=True) (its host copy is bounded by host RAM: a context
whose dense bytes exceed ``--host-gb`` is counted as not fitting without running, so the process is not killed);
QuantizedCache (quanto, 4-bit; "not installed" when optimum-quanto is missing; see common.quanto_unpack); kvtier
warm-only INT4 (on_budget_full="raise"), INT4 + host tier and TurboQuant 3-bit + host tier, with budget_gb = extra -
margin (0.25 GB by default) and host_budget_gb = --host-gb. Memory settings (shared with capacity_probe.py): every
cache runs with the caching allocator's expandable segments (``--default-allocator``: without), and kvtier with
query_tile=16, its attention scratch sized for 16-row prefill tiles (``--kvtier FIELD=INT ...`` replaces that;
``--kvtier`` alone keeps TierConfig's defaults).

On the CPU (``--device cpu --tiny``: a 2-layer model of small shape) there is no memory fraction: the cap is a byte
count, ``--cpu-cache-mb``: kvtier's budget is that plus its attention scratch and staging ring (4-page chunks on the
CPU), its host tier 4 times that; any other cache fits when the bytes it holds after the probe are within it. This
checks the search and that every configuration's probe runs end to end, not GPU capacity.

    python benchmarks/capacity.py                      # GPU: cap = weights + 8 GB; 35 s of search a cache
    python benchmarks/capacity.py --caches dense kvtier-int4 --resolution 0.01 --time-limit 300
    python benchmarks/capacity.py --device cpu --tiny  # the CPU smoke run
    python benchmarks/capacity.py --plot-from A.json B.json --name N   # one plot of searches made in two calls
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import textwrap
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from search import ProbeTimeout, find_capacity  # noqa: E402

import kvtier  # noqa: E402
from kvtier.errors import BudgetExceededError, BudgetTooSmallError  # noqa: E402

DOES_NOT_FIT = (torch.OutOfMemoryError, BudgetExceededError, BudgetTooSmallError)
CPU_KVTIER = dict(chunk_pages=4)  # on the CPU: a staging ring of a few pages, not of the GPU's 48 MiB chunks


# ---------------------------------------------------------------- bytes a cache holds
def held_bytes(cache) -> int:
    """What a cache holds: kvtier's device bytes (its own account), or every layer's tensors."""
    if isinstance(cache, kvtier.TieredCache):
        return cache.stats()["cache_bytes"]
    return sum(common.tensor_bytes(getattr(layer, name, None)) for layer in cache.layers
               for name in ("keys", "values", "_quantized_keys", "_quantized_values"))


# ---------------------------------------------------------------- one probe
class Deadline:
    """Advanced by the fill like a progress bar; raises ProbeTimeout once the search's time is spent."""

    def __init__(self, ends_at: float):
        self.ends_at = ends_at

    def update(self, _tokens: int) -> None:
        if time.monotonic() > self.ends_at:
            raise ProbeTimeout


class Prober:
    """Whether ``tokens`` of context fit for one cache configuration under the cap (see the module docstring)."""

    def __init__(self, name: str, model, args, budget_gb: float, host_gb: float, cpu_cap_bytes: int | None):
        self.name, self.model, self.args = name, model, args
        self.budget_gb, self.host_gb, self.cpu_cap_bytes = budget_gb, host_gb, cpu_cap_bytes
        if cpu_cap_bytes is not None and name.startswith("kvtier"):  # the byte cap counts what holds tokens
            self.budget_gb += common.kvtier_overhead_bytes(name, model, args.batch, args.device,
                                                          **{**CPU_KVTIER, **args.kvtier_overrides}) / common.GB
        self.ends_at = float("inf")
        self.last: dict = {}  # what the last fitting probe measured

    def host_bytes_needed(self, tokens: int) -> int:
        return common.dense_bytes_per_token(self.model.config) * tokens * self.args.batch

    def __call__(self, tokens: int) -> bool:
        if self.name == "offloaded" and self.host_bytes_needed(tokens) > self.host_gb * common.GB:
            return False  # its host copy would not fit in host RAM (checked, not run)
        try:
            fitted, measured = self.run(tokens)
        finally:  # a probe cut short by the time limit detaches kvtier too, so the next cache can attach
            common.release(self.model)
        print(f"  {self.name}: {tokens:,} tokens {'fit' if fitted else 'do not fit'}"
              + (f" ({measured['seconds']:.1f} s)" if fitted else ""), flush=True)
        if fitted:
            self.last = measured
        return fitted

    def run(self, tokens: int) -> tuple[bool, dict]:
        """Whether ``tokens`` fit, and what the probe measured: on a failure, why (``error``) and the peak so far."""
        config, args = self.model.config, self.args
        started = time.monotonic()
        cache = None
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def memory() -> dict:
            measured = {"seconds": time.monotonic() - started}
            if args.device.startswith("cuda"):
                measured["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / common.GB
            return measured

        try:
            extra = {**(CPU_KVTIER if self.cpu_cap_bytes is not None else {}), **args.kvtier_overrides} \
                if self.name.startswith("kvtier") else {}
            cache = common.new_cache(self.name, self.model, self.budget_gb, self.host_gb, **extra)
            common.fill_chunked(cache, config, args.batch, tokens, args.chunk, args.device, Deadline(self.ends_at))
            steps_ms = common.decode_steps_ms(self.model, cache, args.batch, args.decode, warmup=0)
            held = held_bytes(cache)
            tiered = isinstance(cache, kvtier.TieredCache)  # kvtier's own budget is its cap
            if self.cpu_cap_bytes is not None and not tiered and held > self.cpu_cap_bytes:
                return False, {"error": f"holds {held:,} bytes, over the {self.cpu_cap_bytes:,}-byte cap", **memory()}
            measured = {"tokens": tokens, "held_gb": held / common.GB, "median_step_ms": common.median(steps_ms),
                        "steps_ms": steps_ms, **memory()}
            if tiered:
                stats = cache.stats()
                measured.update(warm_tokens=stats["warm"]["tokens"], cold_tokens=stats["cold"]["tokens"],
                                host_gb=stats["cold"]["bytes"] / common.GB, scratch_gb=cache.scratch_bytes / common.GB)
            return True, measured
        except DOES_NOT_FIT as error:
            return False, {"error": f"{type(error).__name__}: {str(error)[:160]}", **memory()}
        except RuntimeError as error:  # cuBLAS or a kernel launch that could not allocate under the cap
            if common.is_out_of_memory(error):
                return False, {"error": f"{type(error).__name__}: {str(error)[:160]}", **memory()}
            raise
        finally:
            del cache
            gc.collect()


# ---------------------------------------------------------------- the run
def cap_memory(model, extra_gb: float) -> float:
    """Cap this process's GPU memory at the weights plus ``extra_gb``; returns the cap in GB."""
    cap_bytes = common.weight_bytes(model) + extra_gb * common.GB
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    return cap_bytes / common.GB


def search_cache(name: str, model, args, budget_gb: float, host_gb: float, cpu_cap_bytes: int | None) -> dict:
    row = {"cache": name, "label": common.LABELS[name]}
    reason = common.unavailable_reason(name, args.device)
    if reason:
        return {**row, "skipped": reason}
    prober = Prober(name, model, args, budget_gb, host_gb, cpu_cap_bytes)
    prober.ends_at = time.monotonic() + args.time_limit
    started = time.monotonic()
    try:
        result = find_capacity(prober, args.start, args.max_tokens, args.resolution, args.granule, args.time_limit)
    except Exception as error:  # a failure that is not "does not fit": say what it was, go on with the next cache
        common.release(model)
        return {**row, "failed": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {**row, **result.summary(), "seconds": time.monotonic() - started, "at_max": prober.last}


def add_ratios(rows: list[dict]) -> None:
    dense = next((row for row in rows if row["cache"] == "dense" and row.get("max_tokens")), None)
    for row in rows:
        if dense and row.get("max_tokens") is not None:
            row["x_dense"] = row["max_tokens"] / dense["max_tokens"]


def context_text(row: dict) -> str:
    if "skipped" in row:
        return f"not run: {row['skipped']}"
    if "failed" in row:
        return f"failed: {row['failed']}"
    if row["status"] == "none fit":
        return f"none (not even {row['first_failure']:,})"
    prefix = "at least " if row["at_least"] else ""
    return f"{prefix}{row['max_tokens']:,}" + (f" ({row['status']})" if row["at_least"] else "")


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [f"# Capacity under one GPU memory cap ({env['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}"
             + (f", triton {env['triton']}" if "triton" in env else "")
             + (f", optimum-quanto {env['optimum-quanto']}" if "optimum-quanto" in env else "") + f"; {settings['model']}.",
             "", f"Cap: {settings['cap']}; kvtier budget_gb {settings['kvtier_budget_gb']:.3g}, host_budget_gb "
             f"{settings['host_gb']:.3g}"
             + (f", TierConfig {settings['kvtier_overrides']}" if settings.get("kvtier_overrides") else "")
             + (f"; PYTORCH_CUDA_ALLOC_CONF: {settings['allocator']}" if settings.get("allocator", "n/a") != "n/a" else "")
             + f"; batch {settings['batch']}; fill in chunks of {settings['chunk']:,} random "
             f"states, then {settings['decode']} decode steps; doubling from {settings['start']:,}, bisection to "
             f"{settings['resolution']:.0%}; at most {settings['max_tokens']:,} tokens and {settings['time_limit_s']:g} s "
             "a cache.", "",
             "| cache | longest context | x dense | cache GB held (kvtier: its reservation) | decode ms/step there | probes | "
             "search s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        at_max = row.get("at_max") or {}
        lines.append(f"| {row['label']} | {context_text(row)} | "
                     + (f"{row['x_dense']:.1f}x" if "x_dense" in row else "") + " | "
                     + (f"{at_max['held_gb']:.3g}" if at_max else "") + " | "
                     + (f"{at_max['median_step_ms']:.1f}" if at_max else "") + " | "
                     + (str(len(row["probes"])) if "probes" in row else "") + " | "
                     + (f"{row['seconds']:.0f}" if "seconds" in row else "") + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path, name: str) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [row for row in result["rows"] if row.get("max_tokens") is not None]
    figure, axes = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.6))
    labels = [row["label"] for row in rows]
    bars = axes.barh(labels, [row["max_tokens"] for row in rows], color="tab:blue")
    for bar, row in zip(bars, rows):
        if row["at_least"]:
            bar.set_hatch("//")
            bar.set_facecolor("tab:cyan")
            bar.set_edgecolor("tab:blue")
        ratio = (f", {'at least ' if row['at_least'] else ''}{row['x_dense']:.2f}x dense"
                 if row.get("x_dense") and row["cache"] != "dense" else "")
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + context_text(row) + ratio, va="center",
                  fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log", base=2)
    axes.set_xlabel("longest context that fits (tokens, log scale; hatched: at least)")
    cap = textwrap.fill(f"cap: {result['settings']['cap']}", 60)
    axes.set_title(f"Capacity, {result['environment']['device']}\n{cap}", fontsize=9)
    axes.set_xlim(right=max((row["max_tokens"] for row in rows), default=1) * 16)
    return common.save_figure(figure, out, name)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model (CPU smoke run)")
    parser.add_argument("--layers", type=int, help="shorten the 8B-shaped model to this many layers")
    parser.add_argument("--caches", nargs="+", default=list(common.CACHES), choices=common.CACHES)
    parser.add_argument("--extra-gb", type=float, default=8.0, help="GPU cap = model weights + this")
    parser.add_argument("--margin-gb", type=float, default=0.25,
                        help="of the extra, left for activations: kvtier's budget_gb = extra - margin")
    parser.add_argument("--host-gb", type=float, help="host budget (kvtier's host tier, the offloaded cache's "
                        "limit); default 60%% of the available host memory")
    parser.add_argument("--cpu-cache-mb", type=float, default=1.0, help="the byte cap of a cache on the CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--start", type=int, help="first context probed (default 8192; tiny: 256)")
    parser.add_argument("--max-tokens", type=int, help="upper limit (default 2M; tiny: 65536)")
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--granule", type=int, help="bisection step in tokens (default 1024; tiny: 64)")
    parser.add_argument("--chunk", type=int, help="fill chunk (default 16384; tiny: 512)")
    parser.add_argument("--decode", type=int, default=16, help="decode steps after the fill")
    parser.add_argument("--time-limit", type=float, default=35.0, help="seconds of search per cache")
    common.add_memory_options(parser)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file stem (default capacity-<device>)")
    parser.add_argument("--plot-from", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: draw one plot of the caches in these saved results (searches split over "
                             "several calls under the same cap), as --out/--name .png")
    args = parser.parse_args(argv)
    args.kvtier_overrides = common.apply_memory_options(args)
    tiny = args.tiny
    args.start = args.start or (256 if tiny else 8192)
    args.max_tokens = args.max_tokens or (65536 if tiny else 2 * 1024 * 1024)
    args.granule = args.granule or (64 if tiny else 1024)
    args.chunk = args.chunk or (512 if tiny else common.FILL_CHUNK)
    return args


def plot_saved(paths: list[Path], out: Path, name: str) -> dict:
    """One capacity plot of every cache in saved results (the first file's device and cap title it; each cache
    once, its first row); returns the joined result."""
    saved = [json.loads(path.read_text()) for path in paths]
    caps = {result["settings"]["cap"] for result in saved}
    if len(caps) > 1:
        raise SystemExit(f"--plot-from joins results measured under one cap; these name {sorted(caps)}")
    rows = {}
    for result in saved:
        for row in result["rows"]:
            rows.setdefault(row["cache"], row)
    joined = {"environment": saved[0]["environment"], "settings": saved[0]["settings"], "rows": list(rows.values())}
    add_ratios(joined["rows"])
    print(f"plot: {plot(joined, out, name)}")
    return joined


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.plot_from:
        return plot_saved(args.plot_from, args.out, args.name or "capacity-joined")
    on_gpu = args.device.startswith("cuda")
    config = common.tiny_shape() if args.tiny else common.llama_8b_shape(args.layers or 32)
    model = common.random_model(config, args.device)
    if args.host_gb is None:
        args.host_gb = 0.6 * psutil.virtual_memory().available / common.GB
    if on_gpu:
        cap = f"weights {common.weight_bytes(model) / common.GB:.1f} GB + {args.extra_gb:g} GB = " \
              f"{cap_memory(model, args.extra_gb):.1f} GB of GPU memory (set_per_process_memory_fraction)"
        budget_gb, cpu_cap_bytes = args.extra_gb - args.margin_gb, None
    else:
        cpu_cap_bytes = int(args.cpu_cache_mb * 2**20)
        cap = f"{args.cpu_cache_mb:g} MB of cache bytes (CPU byte count, no memory fraction)"
        budget_gb = cpu_cap_bytes / common.GB
        args.host_gb = min(args.host_gb, 4 * budget_gb)
    model_text = ("tiny 2-layer Llama-shaped model" if args.tiny else
                  f"random-weight Llama-3.1-8B shape, {config.num_hidden_layers} layers") + ", bf16"
    name = args.name or f"capacity-{common.device_tag(args.device)}"
    result = {"environment": common.environment(args.device),
              "settings": {"model": model_text, "cap": cap, "kvtier_budget_gb": budget_gb, "host_gb": args.host_gb,
                           "batch": args.batch, "chunk": args.chunk, "decode": args.decode, "start": args.start,
                           "max_tokens": args.max_tokens, "resolution": args.resolution, "granule": args.granule,
                           "time_limit_s": args.time_limit, "kvtier_configs": common.KVTIER_CONFIGS,
                           "kvtier_overrides": args.kvtier_overrides, "allocator": args.allocator},
              "rows": []}
    print(f"{model_text}; cap {cap}; kvtier budget {budget_gb:.3g} GB, host {args.host_gb:.3g} GB", flush=True)
    bar = common.progress_bar(len(args.caches), "caches", "cache")
    for cache_name in args.caches:
        print(f"{cache_name}:", flush=True)
        result["rows"].append(search_cache(cache_name, model, args, budget_gb, args.host_gb, cpu_cap_bytes))
        add_ratios(result["rows"])
        common.write_results(result, markdown(result), args.out, name)
        bar.update(1)
    bar.close()
    common.finish_results(result, markdown, plot, args.out, name)
    return result


if __name__ == "__main__":
    main()
