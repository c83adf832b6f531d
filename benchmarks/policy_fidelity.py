"""Policies on the real SmolLM2-135M-Instruct: what each keeps for the same bytes, measured against the dense cache.

    python benchmarks/policy_fidelity.py [--parts eviction topk precision passkey] [--windows 8] [--context 2048]
                                         [--between] [--pick 0 2 ...] [--steps 4] [--passkeys 12]
                                         [--prefill-chunk 256] [--high-pages 15] [--only NAME ...]
                                         [--low-key-bits 3] [--rotation-seed 0 ...] [--name policy-fidelity-cpu]

eviction   sink_recent vs attention_mass, both dropping pages (on_budget_full="evict") under one budget whose warm
           share holds --evict-pages pages a layer: worst decode-logit MSE and top-10 per pydoc window, and the
           difference.
precision  every page INT4; every page TurboQuant 2-bit; and the precision rule (low_bits=2, low_key_bits=
           --low-key-bits: the pages the policy scores lowest drop to 2-bit values and 3-bit keys), under a budget
           whose INT4 share holds --high-pages pages a layer and whose low-precision share holds the rest of the
           context: gate MSE <= 0.25, top-10 >= 0.8 on every step; warm bytes per token.
topk       sink_recent vs attention_mass with the pages past a budget of --evict-pages warm pages a layer demoted to
           the host tier, and prefetch="topk" streaming 25% of them back each decode step.
passkey    passkey retrieval at about 3000 tokens with most of the context cold: prefetch="all" (exact) and
           prefetch="topk" at 25% of the cold pages under each policy, against the dense cache.

Every configuration prefills in chunks of --prefill-chunk tokens, so that attention_mass scores pages while the
budget fills. With several --rotation-seed values every run repeats at each (the rotation decides INT4's rounding
errors, not which text is read), and the eviction and topk tables add a row per window over the seeds.
Writes benchmarks/results/<name>.json and .md; prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

import kvtier
from kvtier import TierConfig, TieredCache
from kvtier.config import BYTES_PER_GB
from kvtier.eval import answer_passkey, dense_reference, passkey_cases, text_windows
from kvtier.formats import make_format, make_low_format
from kvtier.gate import FidelityGate, run_gate
from kvtier.models import load_smollm2
from kvtier.pages import TABLE_ROW_BYTES, PageLayout

RESULTS = Path(__file__).resolve().parent / "results"
RECENT_WINDOW = 128
PRECISION_GATE = FidelityGate(max_logit_mse=0.25, min_top10_overlap=0.8, require_argmax=False)
NO_GATE = FidelityGate(max_logit_mse=float("inf"), min_top10_overlap=0.0, require_argmax=False)


def page_bytes(model, config: TierConfig, low: bool = False) -> int:
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    warm_format = make_low_format(config) if low else make_format(config)
    return PageLayout(1, kv_heads, config.block_size, head_dim, warm_format).page_bytes


def budget_gb(model, config: TierConfig, warm_bytes_per_layer: int) -> float:
    """The budget whose warm share gives each layer ``warm_bytes_per_layer`` (and room for its page table)."""
    cache = TieredCache(config, model.config)
    cache.check_layer_shape(1, model.config.num_key_value_heads, model.config.head_dim, model.dtype, model.device)
    table_bytes = 256 * TABLE_ROW_BYTES  # room for the page tables of both warm pools
    return (cache.reserved_bytes + model.config.num_hidden_layers * (warm_bytes_per_layer + table_bytes)) / BYTES_PER_GB


def gate_row(part: str, name: str, window: int, run, bytes_per_token: float | None = None, seed: int = 0) -> dict:
    stats = run.stats[0]
    return {"part": part, "config": name, "window": window, "seed": seed, "worst_mse": run.worst_mse,
            "worst_top10": run.worst_top10,
            "argmax_agreement": run.reports[0].argmax_agreement, "failures": run.failures,
            "evicted_tokens": stats["evicted_tokens"], "cold_tokens": stats["cold"]["tokens"],
            "warm_tokens": stats["warm"]["tokens"],
            "low_tokens": stats["low"]["tokens"], "warm_bytes_per_token": bytes_per_token,
            "per_step": [vars(step) for step in run.reports[0].steps]}


def eviction_configs(model, pages: int) -> dict:
    base = dict(recent_window=RECENT_WINDOW, on_budget_full="evict")
    budget = budget_gb(model, TierConfig(**base), pages * page_bytes(model, TierConfig()))
    return {policy: dict(base, budget_gb=budget, policy=policy) for policy in ("sink_recent", "attention_mass")}


def topk_configs(model, pages: int) -> dict:
    base = dict(recent_window=RECENT_WINDOW, prefetch="topk", prefetch_share=0.25, chunk_pages=4)
    budget = budget_gb(model, TierConfig(**base), pages * page_bytes(model, TierConfig()))
    return {policy: dict(base, budget_gb=budget, policy=policy) for policy in ("sink_recent", "attention_mass")}


def precision_configs(model, high_pages: int, context: int, low_key_bits: int | None = None) -> dict:
    """Every page INT4, every page 2-bit, and the precision rule holding the context (and 4 decode steps) at 4 and 2
    bits (its low pages' keys at ``low_key_bits``; None: 2, as benchmarks/quality.py's rule-low2 measures it)."""
    base = dict(recent_window=RECENT_WINDOW)
    rule = TierConfig(**base, low_bits=2, low_key_bits=low_key_bits, on_budget_full="evict")
    warm_pages = (context + 4 - rule.sink_tokens - RECENT_WINDOW) // rule.block_size
    high, low = page_bytes(model, rule), page_bytes(model, rule, low=True)
    share = 2 * max(high_pages * high, (warm_pages - high_pages) * low)  # low_share 0.5
    mixed = dict(base, low_bits=2, low_key_bits=low_key_bits, low_share=0.5, on_budget_full="evict",
                 budget_gb=budget_gb(model, rule, share))
    two_bits = dict(warm_format="turboquant", turboquant_bits=2, turboquant_qjl=False)
    return {
        "int4": (dict(base, budget_gb=1.0), high),
        "tq2-all": (dict(base, budget_gb=1.0, **two_bits), page_bytes(model, TierConfig(**two_bits))),
        "rule-attention_mass": (dict(mixed, policy="attention_mass"),
                                (high_pages * high + (warm_pages - high_pages) * low) / warm_pages),
        "rule-sink_recent": (dict(mixed, policy="sink_recent"),
                             (high_pages * high + (warm_pages - high_pages) * low) / warm_pages),
    }


def passkey_rows(model, tokenizer, count: int, prefill_chunk: int, progress) -> list[dict]:
    cases = passkey_cases(tokenizer, count, target_tokens=3000, seed=0)
    base = dict(recent_window=RECENT_WINDOW, chunk_pages=4)
    budget = budget_gb(model, TierConfig(**base), 4 * page_bytes(model, TierConfig()))  # 4 warm pages a layer
    configs = {"all": dict(base, budget_gb=budget)}
    for policy in ("attention_mass", "sink_recent"):
        configs[f"topk25-{policy}"] = dict(base, budget_gb=budget, prefetch="topk", prefetch_share=0.25, policy=policy)
    rows = []
    for index, case in enumerate(cases):
        row = {"case": index, "depth": case.depth, "tokens": case.prompt_ids.shape[1],
               "dense": answer_passkey(model, tokenizer, case, DynamicCache())}
        for name, config in configs.items():
            handle = kvtier.attach(model, **config)
            try:
                row[name] = answer_passkey(model, tokenizer, case, prefill_chunk_size=prefill_chunk)
                row[f"{name}_cold_tokens"] = handle.stats()["cold"]["tokens"]
            finally:
                kvtier.detach(model)
        rows.append(row)
        progress.update(1)
    return rows


def paired(compared: list[dict]) -> list[tuple[dict, dict]]:
    """(sink_recent row, attention_mass row) of each window and rotation seed, in window order, then seed order."""
    keys = sorted({(row["window"], row.get("seed", 0)) for row in compared})
    return [tuple(next(row for row in compared if (row["window"], row.get("seed", 0)) == key and row["config"] == name)
                  for name in ("sink_recent", "attention_mass")) for key in keys]


def over_seeds(pairs: list[tuple[dict, dict]]) -> list[str]:
    """A table row per window of ``pairs`` (:func:`paired`): over the rotation seeds, how often attention_mass is at or
    below sink_recent."""
    lines = ["| window | seeds | attention_mass at or below | mean difference | lowest, highest difference | "
             "mean MSE (sr / am) |", "|---:|---:|---:|---:|---|---|"]
    for window in sorted({recent["window"] for recent, _ in pairs}):
        of_window = [pair for pair in pairs if pair[0]["window"] == window]
        differences = [mass["worst_mse"] - recent["worst_mse"] for recent, mass in of_window]
        count = len(of_window)
        lines.append(f"| {window} | {count} | {sum(d <= 0 for d in differences)} | "
                     f"{sum(differences) / count:+.4f} | {min(differences):+.4f}, {max(differences):+.4f} | "
                     f"{sum(r['worst_mse'] for r, _ in of_window) / count:.4f} / "
                     f"{sum(m['worst_mse'] for _, m in of_window) / count:.4f} |")
    return lines


def markdown(rows: list[dict], passkeys: list[dict], settings: dict, env: dict) -> str:
    lines = [f"# Policies on {settings['model']}, {settings['context']} tokens, {settings['steps']} decode steps", "",
             f"{env}", "", f"settings: {settings}", ""]
    titles = {"eviction": "Eviction: the same budget, sink_recent vs attention_mass",
              "topk": "Demotion to the host tier with prefetch=\"topk\" (25%): sink_recent vs attention_mass"}
    for part, title in titles.items():
        compared = [row for row in rows if row["part"] == part]
        if not compared:
            continue
        lines += [f"## {title}", "",
                  "| window | seed | sink_recent MSE | attention_mass MSE | difference | top-10 (sr / am) | "
                  "tokens off the GPU |", "|---:|---:|---:|---:|---:|---|---:|"]
        pairs = paired(compared)
        for recent, mass in pairs:
            lines.append(f"| {mass['window']} | {mass.get('seed', 0)} | {recent['worst_mse']:.4f} | "
                         f"{mass['worst_mse']:.4f} | {mass['worst_mse'] - recent['worst_mse']:+.4f} | "
                         f"{recent['worst_top10']:.1f} / {mass['worst_top10']:.1f} | "
                         f"{mass['evicted_tokens'] + mass['cold_tokens']} |")
        differences = [mass["worst_mse"] - recent["worst_mse"] for recent, mass in pairs]
        lines += ["", f"attention_mass at or below sink_recent on {sum(d <= 0 for d in differences)} of "
                      f"{len(differences)} runs; mean difference {sum(differences) / len(differences):+.4f}, "
                      f"largest excess {max(differences):+.4f}.", ""]
        if len({row.get("seed", 0) for row in compared}) > 1:
            lines += ["Over the rotation seeds, per window:", ""] + over_seeds(pairs) + [""]
    precision = [row for row in rows if row["part"] == "precision"]
    if precision:
        lines += ["## Precision: gate MSE <= 0.25 and top-10 >= 0.8 at every step", "",
                  "| config | warm B/token/layer | worst MSE | worst top-10 | windows passing | evicted tokens (max) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in dict.fromkeys(row["config"] for row in precision):
            runs = [row for row in precision if row["config"] == name]
            lines.append(f"| {name} | {runs[0]['warm_bytes_per_token']:.0f} | "
                         f"{max(row['worst_mse'] for row in runs):.4f} | {min(row['worst_top10'] for row in runs):.1f} | "
                         f"{sum(not row['failures'] for row in runs)} of {len(runs)} | "
                         f"{max(row['evicted_tokens'] for row in runs)} |")
        lines.append("")
    if passkeys:
        names = [key for key in passkeys[0] if key not in ("case", "depth", "tokens") and not key.endswith("_tokens")]
        lines += ["## Passkey retrieval, most of the context cold", "",
                  "| config | answered | of the dense model's | cold tokens (min) |", "|---|---:|---:|---:|"]
        dense = [row for row in passkeys if row["dense"]]
        for name in names:
            cold = min((row.get(f"{name}_cold_tokens", 0) for row in passkeys), default=0)
            lines.append(f"| {name} | {sum(row[name] for row in passkeys)} of {len(passkeys)} | "
                         f"{sum(row[name] for row in dense)} of {len(dense)} | {cold} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["eviction", "topk", "precision", "passkey"],
                        choices=["eviction", "topk", "precision", "passkey"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--between", action="store_true",
                        help="the windows - 1 windows midway between the default ones (held-out text)")
    parser.add_argument("--pick", type=int, nargs="+", help="run only these windows of the set (indices)")
    parser.add_argument("--only", nargs="+", help="run only the configurations of these names (e.g. rule-attention_mass)")
    parser.add_argument("--rotation-seed", type=int, nargs="+", default=[0],
                        help="TierConfig.rotation_seed of every configuration; several: each run at each")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--passkeys", type=int, default=12)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--evict-pages", type=int, default=16, help="warm pages a layer under eviction")
    parser.add_argument("--high-pages", type=int, default=15, help="INT4 pages a layer under the precision rule")
    parser.add_argument("--low-key-bits", type=int, default=3, help="the precision rule's low pages' key bits")
    parser.add_argument("--name", default="policy-fidelity-cpu")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    windows = text_windows(tokenizer, args.context, args.windows, between=args.between)
    picked = args.pick if args.pick is not None else range(len(windows))
    configs = {}
    if "eviction" in args.parts:
        configs["eviction"] = {name: (config, None) for name, config in eviction_configs(model, args.evict_pages).items()}
    if "topk" in args.parts:
        configs["topk"] = {name: (config, None) for name, config in topk_configs(model, args.evict_pages).items()}
    if "precision" in args.parts:
        configs["precision"] = precision_configs(model, args.high_pages, args.context, args.low_key_bits)
    for part, named in configs.items():
        configs[part] = {name: (config, bytes_per_token)
                         for name, (config, bytes_per_token) in named.items() if not args.only or name in args.only}
    runs = (len(picked) * len(args.rotation_seed) * sum(len(part) for part in configs.values())
            + args.passkeys * ("passkey" in args.parts))
    rows, passkeys = [], []
    started = time.perf_counter()
    with tqdm(total=runs, desc="policies") as progress:
        for index in picked:
            window = windows[index]
            reference = [dense_reference(model, window, steps=args.steps)]
            for seed in args.rotation_seed:
                for part, named in configs.items():
                    for name, (config, bytes_per_token) in named.items():
                        gate = PRECISION_GATE if part == "precision" else NO_GATE
                        run = run_gate(model, [window], gate, steps=args.steps, references=reference,
                                       prefill_chunk=args.prefill_chunk, **dict(config, rotation_seed=seed))
                        rows.append(gate_row(part, name, index, run, bytes_per_token and bytes_per_token / 64, seed))
                        progress.update(1)
        if "passkey" in args.parts:
            passkeys = passkey_rows(model, tokenizer, args.passkeys, args.prefill_chunk, progress)

    env = {"device": f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "kvtier": kvtier.__version__,
           "seconds": round(time.perf_counter() - started)}
    settings = {"model": "SmolLM2-135M-Instruct (float32)", "context": args.context, "steps": args.steps,
                "windows": f"{list(picked)} of {len(windows)} "
                           f"{'midway between ' if args.between else ''}{args.windows} evenly spaced",
                "recent_window": RECENT_WINDOW, "prefill_chunk": args.prefill_chunk, "evict_pages": args.evict_pages,
                "high_pages": args.high_pages, "low_key_bits": args.low_key_bits, "rotation_seeds": args.rotation_seed,
                "configs": {part: {name: config for name, (config, _) in named.items()} for part, named in configs.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"environment": env, "settings": settings, "runs": rows, "passkeys": passkeys}, indent=1, default=str))
    table = markdown(rows, passkeys, settings, env)
    (RESULTS / f"{args.name}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
