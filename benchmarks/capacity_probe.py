"""Capacity probes: whether given contexts fit, each in a fresh cache, under capacity.py's GPU memory cap, and why not.

capacity.py searches (doubling, then bisection) in one process and keeps only whether each probe fitted. This script
probes chosen contexts of chosen caches, prints and records each one's outcome (the error's type and first words when it
does not fit) and its peak GPU memory. It shares capacity.py's memory settings: the caching allocator's expandable
segments (``--default-allocator`` turns them off) and TierConfig fields for kvtier (``--kvtier``; by default
query_tile=16, the attention scratch sized for 16-row prefill tiles instead of 256; decode needs one row).

    python benchmarks/capacity_probe.py --probe dense 61440 63488 65536 --probe kvtier-int4 215040 222208 --budget-gb 7.9
    python benchmarks/capacity_probe.py --device cpu --tiny --probe dense 512 --probe kvtier-int4 512   # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from capacity import Prober, cap_memory  # noqa: E402


def probe(name: str, tokens: int, model, args) -> dict:
    """Fill a fresh cache ``name`` with ``tokens`` and decode ``args.decode`` steps (capacity.Prober.run, under no
    byte cap): the outcome, as a row."""
    prober = Prober(name, model, args, args.budget_gb, args.host_gb, None)
    try:
        fitted, measured = prober.run(tokens)
    finally:  # detach kvtier, give back the freed memory
        common.release(model)
    return {**measured, "cache": name, "tokens": tokens, "fit": fitted}


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [f"# Capacity probes under one GPU memory cap ({result['environment']['device']})", "",
             ", ".join(f"{key} {value}" for key, value in result["environment"].items() if key != "device") + ".", "",
             f"Cap: {settings['cap']}; kvtier budget_gb {settings['budget_gb']}, TierConfig {settings['kvtier']}; "
             f"PYTORCH_CUDA_ALLOC_CONF: {settings['allocator']}; each probe a fresh cache, then "
             f"{settings['decode']} decode steps.", "",
             "| cache | tokens | x first dense | outcome | peak GPU GB |", "|---|---:|---:|---|---:|"]
    dense = next((row["tokens"] for row in result["rows"] if row["cache"] == "dense"), None)
    for row in result["rows"]:
        ratio = f"{row['tokens'] / dense:.2f}x" if dense else ""
        outcome = "fits" if row["fit"] else f"does not fit ({row['error']})"
        lines.append(f"| {common.LABELS[row['cache']]} | {row['tokens']:,} | {ratio} | {outcome} | "
                     f"{row.get('peak_gpu_gb', 0):.2f} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs="+", action="append", required=True, metavar="CACHE TOKENS",
                        help="a cache name and the contexts to probe it at (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model (CPU smoke run)")
    parser.add_argument("--extra-gb", type=float, default=8.0, help="GPU cap = model weights + this")
    parser.add_argument("--budget-gb", type=float, default=7.75, help="kvtier's budget_gb (capacity.py's: "
                        "the extra less its 0.25 GB margin)")
    parser.add_argument("--host-gb", type=float, default=60.0, help="kvtier's host budget (host-tier caches)")
    common.add_memory_options(parser)
    parser.add_argument("--chunk", type=int, default=common.FILL_CHUNK)
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file stem (default capacity-probe-<device>)")
    args = parser.parse_args(argv)
    args.batch, args.kvtier_overrides = 1, common.apply_memory_options(args)
    for cache, *contexts in args.probe:
        if cache not in common.CACHES or not contexts:
            parser.error(f"--probe takes one of {', '.join(common.CACHES)} and at least one context, got {cache}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    model = common.random_model(common.tiny_shape() if args.tiny else common.llama_8b_shape(), args.device)
    cap = f"weights {common.weight_bytes(model) / common.GB:.1f} GB + {args.extra_gb:g} GB"
    if args.device.startswith("cuda"):
        cap += f" = {cap_memory(model, args.extra_gb):.1f} GB"
    result = {"environment": common.environment(args.device),
              "settings": {"cap": cap, "budget_gb": args.budget_gb, "kvtier": args.kvtier_overrides, "decode": args.decode,
                           "allocator": args.allocator, "chunk": args.chunk},
              "rows": []}
    name = args.name or f"capacity-probe-{common.device_tag(args.device)}"
    for cache, *contexts in args.probe:
        for tokens in map(int, contexts):
            row = probe(cache, tokens, model, args)
            print(f"{cache} {tokens:,}: {'fits' if row['fit'] else row['error']}", flush=True)
            result["rows"].append(row)
            common.write_results(result, markdown(result), args.out, name)
    print("\n" + markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
