"""Soak: many generate() calls of varied prompt lengths and new-token counts on one attached model; memory after each
call must come back to its baseline.

    python benchmarks/soak.py [--device cpu|cuda] [--calls 40] [--max-prompt 600] [--max-new 16] [--warm-pages 2]
                              [--recent-window 128] [--chunk-pages 2] [--session-every 5] [--rss-tolerance-mb 64]
                              [--seed 0]

CPU (default): the real SmolLM2-135M-Instruct (float32). CUDA: a random-weight model of Llama-3.1-8B's shape (bf16,
benchmarks/cold_tier.py). The budget holds the hot tiers, scratch, staging ring and --warm-pages warm pages a layer,
so longer prompts send pages to the cold tier. Calls alternate batch 1 and batch 2 (the second row left-padded);
every --session-every calls the cache is saved, loaded back and continued for a few tokens (then deleted).

After each call (and a gc.collect()) it records the host RSS (psutil) and, on CUDA, torch.cuda.memory_allocated with
the handle's latest cache dropped. The baseline is the value after the warm-up calls; a call passes when its memory is
within the tolerance of the baseline (RSS: --rss-tolerance-mb; CUDA allocated: exactly the baseline). Writes
benchmarks/results/soak-<device>.json and .md; prints the table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers
from tqdm import tqdm

import kvtier
from kvtier.config import BYTES_PER_GB

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
WARMUP_CALLS = 3


def load_model(device: str):
    """(model, token source (n,) long ids to cut prompts from, pad id)."""
    if device == "cpu":
        from kvtier.eval import reference_text
        from kvtier.models import load_smollm2

        model, tokenizer = load_smollm2()
        return model, tokenizer(reference_text()[:60000], return_tensors="pt").input_ids[0], tokenizer.eos_token_id
    from cold_tier import llama_8b_shape, random_model  # benchmarks/cold_tier.py, beside this script

    config = llama_8b_shape()
    return random_model(config), torch.randint(0, config.vocab_size, (60000,), generator=torch.Generator()), 0


def budget_for_warm_pages(model, pages: int, batch: int = 2, **config) -> float:
    """budget_gb holding the hot tiers, scratch, staging ring and ``pages`` warm pages a layer at ``batch``."""
    device = next(model.parameters()).device
    probe = kvtier.attach(model, budget_gb=8.0, **config)
    try:
        ids = torch.ones(batch, 3, dtype=torch.long, device=device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        cache = probe.cache
        warm = cache.layers[0].warm
        fixed = cache.hot_bytes + cache.scratch_bytes + cache.staging_bytes
        return (fixed + cache.num_layers * (pages * warm.page_bytes + warm.table_bytes_for(pages))) / BYTES_PER_GB
    finally:
        kvtier.detach(model)


def prompt(source: torch.Tensor, batch: int, length: int, pad_id: int, rng: random.Random, device):
    """(B, L) ids and attention mask: row 0 a window of ``source``, row 1 a shorter one, left-padded."""
    ids, mask = torch.empty(batch, length, dtype=torch.long), torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        start = rng.randrange(0, source.numel() - length)
        ids[row] = source[start:start + length]
    if batch > 1:
        padding = rng.randrange(1, max(2, length // 4))
        ids[1, :padding], mask[1, :padding] = pad_id, 0
    return ids.to(device), mask.to(device)


def memory(device: str) -> dict:
    gc.collect()
    sample = {"rss_mib": psutil.Process().memory_info().rss / MIB}
    if device == "cuda":
        torch.cuda.synchronize()
        sample["cuda_allocated_mib"] = torch.cuda.memory_allocated() / MIB
    return sample


def run_call(model, handle, ids, mask, new_tokens: int, session_dir: Path | None) -> dict:
    """One generate() call (and, with ``session_dir``, a save, a load and a continuation); returns what it did."""
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    stats = handle.stats()
    record = {"cold_tokens": stats["cold"]["tokens"], "warm_tokens": stats["warm"]["tokens"],
              "budget_used": round(stats["budget_used"], 4)}
    if session_dir is not None:
        handle.save(session_dir)
        loaded = kvtier.load(session_dir, model)
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], out.shape[1] - mask.shape[1])), 1)
        model.generate(out, attention_mask=mask, past_key_values=loaded, max_new_tokens=2, min_new_tokens=2,
                       do_sample=False)
        record["session_mib"] = sum(file.stat().st_size for file in session_dir.iterdir()) / MIB
        shutil.rmtree(session_dir)
        del loaded
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=600)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--warm-pages", type=int, default=2, help="warm pages a layer the budget holds")
    parser.add_argument("--recent-window", type=int, default=128, help="hot recent tokens (smaller: more pages)")
    parser.add_argument("--chunk-pages", type=int, default=2, help="cold pages a chunk (fixes the staging ring's size)")
    parser.add_argument("--session-every", type=int, default=5, help="save/load/continue every n calls (0: never)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    model, source, pad_id = load_model(args.device)
    device = next(model.parameters()).device
    knobs = {"recent_window": args.recent_window, "chunk_pages": args.chunk_pages}
    budget = budget_for_warm_pages(model, args.warm_pages, **knobs)
    handle = kvtier.attach(model, budget_gb=budget, **knobs)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-soak-"))
    rows, baseline = [], None
    started = time.perf_counter()
    try:
        with torch.no_grad(), tqdm(total=args.calls, desc="soak") as progress:
            for call in range(args.calls):
                batch = 1 + call % 2
                length = rng.randint(args.min_prompt, args.max_prompt)
                new_tokens = rng.randint(1, args.max_new)
                ids, mask = prompt(source, batch, length, pad_id, rng, device)
                session = scratch / f"call-{call}" if args.session_every and call % args.session_every == 1 else None
                record = run_call(model, handle, ids, mask, new_tokens, session)
                handle.cache = None  # what the handle keeps between calls is one cache; drop it to see the floor
                del ids, mask
                sample = memory(args.device)
                if call == WARMUP_CALLS - 1:
                    baseline = sample
                rows.append({"call": call, "batch": batch, "prompt": length, "new_tokens": new_tokens,
                             "session": session is not None, **record, **sample})
                progress.update(1)
    finally:
        kvtier.detach(model)
        shutil.rmtree(scratch, ignore_errors=True)

    summary = summarize(rows, baseline, args)
    env = {"device": device_name(args.device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "kvtier": kvtier.__version__, "psutil": psutil.__version__,
           "seconds": round(time.perf_counter() - started)}
    settings = {**vars(args), "budget_gb": budget, "warmup_calls": WARMUP_CALLS,
                "model": "SmolLM2-135M-Instruct (float32)" if args.device == "cpu"
                else "random-weight Llama-3.1-8B shape (bf16)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"soak-{args.device}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "settings": settings, "summary": summary,
                                                      "calls": rows}, indent=1))
    table = markdown(rows, summary, settings, env)
    (RESULTS / f"{name}.md").write_text(table)
    print("\n" + table)
    if not summary["passed"]:
        raise SystemExit(f"soak: memory did not return to its baseline: {summary['failures']}")


def summarize(rows: list[dict], baseline: dict, args) -> dict:
    after = rows[WARMUP_CALLS:]
    rss = [row["rss_mib"] - baseline["rss_mib"] for row in after]
    slope = _slope([row["call"] for row in after], [row["rss_mib"] for row in after])
    summary = {"baseline_rss_mib": round(baseline["rss_mib"], 1), "max_rss_over_baseline_mib": round(max(rss), 1),
               "last_rss_over_baseline_mib": round(rss[-1], 1), "rss_slope_mib_per_call": round(slope, 3),
               "calls_with_cold_pages": sum(row["cold_tokens"] > 0 for row in rows),
               "session_round_trips": sum(row["session"] for row in rows), "failures": []}
    summary["failures"] += [f"call {row['call']}: RSS +{row['rss_mib'] - baseline['rss_mib']:.1f} MiB" for row in after
                            if row["rss_mib"] - baseline["rss_mib"] > args.rss_tolerance_mb]
    if "cuda_allocated_mib" in baseline:
        summary["baseline_cuda_allocated_mib"] = round(baseline["cuda_allocated_mib"], 3)
        cuda = [row["cuda_allocated_mib"] - baseline["cuda_allocated_mib"] for row in after]
        summary["max_cuda_allocated_over_baseline_mib"] = round(max(cuda), 3)
        summary["failures"] += [f"call {row['call']}: CUDA allocated +{excess:.3f} MiB" for row, excess
                                in zip(after, cuda) if excess > 0]
    summary["passed"] = not summary["failures"]
    return summary


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)"


def markdown(rows: list[dict], summary: dict, settings: dict, env: dict) -> str:
    lines = [f"# Soak: {len(rows)} generate() calls, {settings['model']}", "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
             f"kvtier {env['kvtier']}; {env['seconds']} s.", "",
             f"budget_gb {settings['budget_gb']:.4f} ({settings['warm_pages']} warm pages a layer at batch 2), "
             f"recent_window {settings['recent_window']}, prompts "
             f"{settings['min_prompt']}-{settings['max_prompt']} tokens, 1-{settings['max_new']} new tokens, batch 1 "
             f"and 2 alternating (row 2 left-padded), a save/load/continue every {settings['session_every']} calls. "
             f"Baseline: after call {WARMUP_CALLS - 1}; memory read after each call with the handle's cache dropped.",
             "", "| call | batch | prompt | new | session | cold tokens | seconds | RSS MiB | RSS - baseline |"
             + (" CUDA alloc MiB |" if "cuda_allocated_mib" in rows[0] else ""),
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if "cuda_allocated_mib" in rows[0] else "")]
    for row in rows:
        line = (f"| {row['call']} | {row['batch']} | {row['prompt']} | {row['new_tokens']} | "
                f"{'yes' if row['session'] else ''} | {row['cold_tokens']} | {row['seconds']:.2f} | {row['rss_mib']:.1f} "
                f"| {row['rss_mib'] - summary['baseline_rss_mib']:+.1f} |")
        if "cuda_allocated_mib" in row:
            line += f" {row['cuda_allocated_mib']:.1f} |"
        lines.append(line)
    tolerance = f"RSS within {settings['rss_tolerance_mb']:g} MiB" + (
        ", CUDA allocated exactly" if "baseline_cuda_allocated_mib" in summary else "")
    lines += ["", "| summary | value |", "|---|---:|",
              f"| baseline RSS MiB | {summary['baseline_rss_mib']} |",
              f"| max RSS over baseline MiB | {summary['max_rss_over_baseline_mib']} |",
              f"| last RSS over baseline MiB | {summary['last_rss_over_baseline_mib']} |",
              f"| RSS slope MiB/call (least squares) | {summary['rss_slope_mib_per_call']} |"]
    if "baseline_cuda_allocated_mib" in summary:
        lines += [f"| baseline CUDA allocated MiB | {summary['baseline_cuda_allocated_mib']} |",
                  f"| max CUDA allocated over baseline MiB | {summary['max_cuda_allocated_over_baseline_mib']} |"]
    lines += [f"| calls with cold pages | {summary['calls_with_cold_pages']} of {len(rows)} |",
              f"| session round trips | {summary['session_round_trips']} |",
              f"| memory back to baseline ({tolerance}) | {'yes' if summary['passed'] else 'NO'} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
