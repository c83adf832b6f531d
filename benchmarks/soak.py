"""Soak: many generate() calls of varied prompt lengths and new-token counts on one attached model; memory after each
call must come back to its baseline.

    python benchmarks/soak.py [--device cpu|cuda] [--calls 40] [--max-prompt 600] [--max-new 16] [--warm-pages 2]
                              [--recent-window 128] [--chunk-pages 2] [--session-every 5] [--rss-tolerance-mb 64]
                              [--seed 0]

CPU (default): the real SmolLM2-135M-Instruct (float32). CUDA: a random-weight model of Llama-3.1-8B's shape (bf16,
benchmarks/cold_tier.py). The budget holds the hot tiers, scratch, staging ring and --warm-pages warm pages a layer,
so longer prompts send pages to the cold tier. Calls alternate batch 1 and batch 2 (the second row left-padded);
every --session-every calls the cache is saved, loaded back and continued for a few tokens (then deleted).

First come the warm-up calls (part of --calls): one of every kind of call the soak makes, at the longest prompt and
the most new tokens (batch 1 and 2, each plain and with a save/load/continue round trip; batch 2 at that length sends
pages to the cold tier), and a short batch-2 call (no cold pages), so that one-time costs (Triton compiling each
path's kernels, CUDA graph pools) land before the baseline. After each call (and a gc.collect()) it records the host
RSS (psutil), what the C heap has handed out and holds free (glibc's mallinfo2) and how many Triton kernel variants
are compiled, and, on CUDA, torch.cuda.memory_allocated and the bytes torch's pinned host allocator holds (in use and
cached) and has in use (torch.cuda.host_memory_stats, where torch has it; kvtier's own pinned rows come from
kvtier.pinned, not from it), with the handle's latest cache dropped. The baseline is the value
after the warm-up; a call passes when its memory is within the tolerance of the baseline (RSS: --rss-tolerance-mb;
CUDA allocated: exactly the baseline); the other columns are shown, not judged. Writes
benchmarks/results/soak-<device>.json and .md; prints the table last.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import transformers
from tqdm import tqdm

import kvtier
from kvtier.compat import with_cache
from kvtier.config import BYTES_PER_GB

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


@dataclass(frozen=True)
class Call:
    """One generate() call of the soak: its batch, prompt length, new tokens, and whether a save/load/continue
    round trip follows."""

    batch: int
    length: int
    new_tokens: int
    session: bool
    warmup: bool = False


def warmup_calls(args) -> list[Call]:
    """One call of every kind the soak makes, the longest of each (so with cold pages where the budget sends pages
    there), and a short batch-2 one."""
    longest = [Call(batch, args.max_prompt, args.max_new, session, warmup=True) for session in (False, True)
               for batch in (1, 2)]
    return longest + [Call(2, args.min_prompt, args.max_new, False, warmup=True)]


def soak_calls(args, count: int, rng: random.Random) -> list[Call]:
    """``count`` calls alternating batch 1 and 2, of random lengths, a round trip every --session-every calls."""
    return [Call(1 + call % 2, rng.randint(args.min_prompt, args.max_prompt), rng.randint(1, args.max_new),
                 bool(args.session_every) and call % args.session_every == 1) for call in range(count)]


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
    sample = {"rss_mib": psutil.Process().memory_info().rss / MIB, **heap_memory(), "kernels": compiled_kernels()}
    if device == "cuda":
        torch.cuda.synchronize()
        sample["cuda_allocated_mib"] = torch.cuda.memory_allocated() / MIB
        sample.update(pinned_host_memory())
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host_cache is not None:  # shown, not judged: RSS once torch's pinned cache gave back what it keeps
            empty_host_cache()
            sample["rss_after_empty_host_cache_mib"] = psutil.Process().memory_info().rss / MIB
    return sample


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_memory() -> dict:
    """MiB the C heap (glibc malloc: Python objects, pageable tensors) has handed out and holds free, from mallinfo2();
    nothing where the C library has no mallinfo2. Shown, not judged: they tell a leak (in use grows) from memory the
    heap keeps after frees (free grows)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {"heap_in_use_mib": (info.uordblks + info.hblkhd) / MIB, "heap_free_mib": info.fordblks / MIB}


def compiled_kernels() -> int | None:
    """How many compiled variants kvtier's Triton kernels hold (each compile keeps its module in the process);
    None where Triton or its cache layout differ."""
    try:
        from kvtier.kernels import decode_attention
        functions = [value for value in vars(decode_attention).values() if hasattr(value, "device_caches")]
        return sum(len(caches[0]) for function in functions for caches in function.device_caches.values())
    except Exception:  # noqa: BLE001 -- a diagnostic column only
        return None


def pinned_host_memory() -> dict:
    """MiB that torch's caching pinned host allocator holds from CUDA (in use and cached: part of RSS) and has handed
    out (None where its statistics lack the keys below), and its raw ".current" statistics; nothing where this torch
    has no torch.cuda.host_memory_stats. The keys changed between versions: older ones count held bytes as "reserved_bytes"
    and handed-out ones as "allocated_bytes", newer ones held as "allocated_bytes" and handed-out as "active_bytes"."""
    if not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    stats = torch.cuda.host_memory_stats()  # {} before the first pinned block
    current = {"host_memory_stats": {key: value for key, value in stats.items() if key.endswith(".current")}}  # raw
    newer = "active_bytes.current" in stats
    held_key, in_use_key = ("allocated_bytes.current", "active_bytes.current") if newer else \
        ("reserved_bytes.current", "allocated_bytes.current")
    if stats and held_key not in stats:
        return {"pinned_held_mib": None, "pinned_in_use_mib": None, **current}
    return {"pinned_held_mib": stats.get(held_key, 0) / MIB, "pinned_in_use_mib": stats.get(in_use_key, 0) / MIB,
            **current}


def run_call(model, handle, ids, mask, new_tokens: int, session_dir: Path | None) -> dict:
    """One generate() call (and, with ``session_dir``, a save, a load and a continuation); returns what it did.
    Without a handle (``--control``), the model's own DynamicCache serves the call and there is no round trip."""
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    if handle is None:
        return {"cold_tokens": 0, "seconds": round(time.perf_counter() - started, 3)}
    stats = handle.stats()
    record = {"cold_tokens": stats["cold"]["tokens"], "warm_tokens": stats["warm"]["tokens"],
              "budget_used": round(stats["budget_used"], 4)}
    if session_dir is not None:
        handle.save(session_dir)
        loaded = kvtier.load(session_dir, model)
        mask = torch.cat((mask, mask.new_ones(mask.shape[0], out.shape[1] - mask.shape[1])), 1)
        model.generate(out, attention_mask=mask, **with_cache(loaded), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False)
        record["session_mib"] = sum(file.stat().st_size for file in session_dir.iterdir()) / MIB
        shutil.rmtree(session_dir)
        del loaded
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def run_plan(model, handle, calls: list[Call], prompt_for, device: str) -> list[dict]:
    """Make ``calls`` in order (``prompt_for(call)``: its ids and mask), each followed by a memory sample taken with the
    handle's cache dropped; one row a call."""
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-soak-"))
    rows = []
    try:
        with torch.no_grad(), tqdm(total=len(calls), desc="soak") as progress:
            for index, call in enumerate(calls):
                ids, mask = prompt_for(call)
                session = scratch / f"call-{index}" if call.session else None
                record = run_call(model, handle, ids, mask, call.new_tokens, session if handle else None)
                if handle is not None:
                    handle.cache = None  # what the handle keeps between calls is one cache; drop it to see the floor
                del ids, mask
                rows.append({"call": index, "warmup": call.warmup, "batch": call.batch, "prompt": call.length,
                             "new_tokens": call.new_tokens, "session": call.session and handle is not None, **record,
                             **memory(device)})
                progress.update(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=40, help="generate() calls, the warm-up's included")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=600)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--warm-pages", type=int, default=2, help="warm pages a layer the budget holds")
    parser.add_argument("--recent-window", type=int, default=128, help="hot recent tokens (smaller: more pages)")
    parser.add_argument("--chunk-pages", type=int, default=2, help="cold pages a chunk (fixes the staging ring's size)")
    parser.add_argument("--session-every", type=int, default=5, help="save/load/continue every n calls (0: never)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", action="store_true", help="the same calls without kvtier (transformers' "
                        "DynamicCache, no round trips): what the model and torch alone leave in memory")
    args = parser.parse_args(argv)
    warmup = warmup_calls(args)
    if args.calls <= len(warmup):
        parser.error(f"--calls {args.calls} leaves no call after the {len(warmup)} warm-up calls (one of each kind); "
                     f"ask for at least {len(warmup) + 1}.")

    rng = random.Random(args.seed)
    model, source, pad_id = load_model(args.device)
    knobs = {"recent_window": args.recent_window, "chunk_pages": args.chunk_pages}
    budget = budget_for_warm_pages(model, args.warm_pages, **knobs)
    handle = None if args.control else kvtier.attach(model, budget_gb=budget, **knobs)
    device = next(model.parameters()).device
    started = time.perf_counter()
    try:
        rows = run_plan(model, handle, warmup + soak_calls(args, args.calls - len(warmup), rng),
                        lambda call: prompt(source, call.batch, call.length, pad_id, rng, device), args.device)
    finally:
        if handle is not None:
            kvtier.detach(model)

    summary = summarize(rows, args)
    env = {"device": device_name(args.device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "kvtier": kvtier.__version__, "psutil": psutil.__version__,
           "seconds": round(time.perf_counter() - started)}
    settings = {**vars(args), "budget_gb": budget, "warmup_calls": len(warmup),
                "model": "SmolLM2-135M-Instruct (float32)" if args.device == "cpu"
                else "random-weight Llama-3.1-8B shape (bf16)",
                "cache": "transformers DynamicCache (control: kvtier not attached)" if args.control else "kvtier"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"soak-{args.device}" + ("-control" if args.control else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "settings": settings, "summary": summary,
                                                      "calls": rows}, indent=1))
    table = markdown(rows, summary, settings, env)
    (RESULTS / f"{name}.md").write_text(table)
    print("\n" + table)
    if not summary["passed"]:
        raise SystemExit(f"soak: memory did not return to its baseline: {summary['failures']}")


def summarize(rows: list[dict], args) -> dict:
    """Memory after each call past the warm-up against the baseline (the sample after the last warm-up call)."""
    warmup = [row for row in rows if row["warmup"]]
    baseline, after = warmup[-1], rows[len(warmup):]
    rss = [row["rss_mib"] - baseline["rss_mib"] for row in after]
    slope = _slope([row["call"] for row in after], [row["rss_mib"] for row in after])
    summary = {"baseline_rss_mib": round(baseline["rss_mib"], 1), "max_rss_over_baseline_mib": round(max(rss), 1),
               "last_rss_over_baseline_mib": round(rss[-1], 1), "rss_slope_mib_per_call": round(slope, 3),
               "calls_with_cold_pages": sum(row["cold_tokens"] > 0 for row in rows),
               "warmup_calls_with_cold_pages": sum(row["cold_tokens"] > 0 for row in warmup),
               "session_round_trips": sum(row["session"] for row in rows), "failures": []}
    if after[0].get("heap_in_use_mib") is not None:  # shown, not judged
        summary["heap_in_use_slope_mib_per_call"] = round(
            _slope([row["call"] for row in after], [row["heap_in_use_mib"] for row in after]), 3)
    summary["failures"] += [f"call {row['call']}: RSS +{row['rss_mib'] - baseline['rss_mib']:.1f} MiB" for row in after
                            if row["rss_mib"] - baseline["rss_mib"] > args.rss_tolerance_mb]
    if "cuda_allocated_mib" in baseline:
        summary["baseline_cuda_allocated_mib"] = round(baseline["cuda_allocated_mib"], 3)
        cuda = [row["cuda_allocated_mib"] - baseline["cuda_allocated_mib"] for row in after]
        summary["max_cuda_allocated_over_baseline_mib"] = round(max(cuda), 3)
        summary["failures"] += [f"call {row['call']}: CUDA allocated +{excess:.3f} MiB" for row, excess
                                in zip(after, cuda) if excess > 0]
    if baseline.get("pinned_held_mib") is not None:  # shown, not judged: part of RSS
        summary["baseline_pinned_held_mib"] = round(baseline["pinned_held_mib"], 1)
        summary["max_pinned_held_over_baseline_mib"] = round(max(row["pinned_held_mib"] - baseline["pinned_held_mib"]
                                                                 for row in after), 1)
    if "rss_after_empty_host_cache_mib" in baseline:  # shown, not judged
        summary["max_rss_after_empty_host_cache_over_baseline_mib"] = round(max(
            row["rss_after_empty_host_cache_mib"] - baseline["rss_after_empty_host_cache_mib"] for row in after), 1)
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
    cuda, pinned = "cuda_allocated_mib" in rows[0], "pinned_held_mib" in rows[0]
    warmup = settings["warmup_calls"]
    lines = [f"# Soak: {len(rows)} generate() calls, {settings['model']}, {settings['cache']}", "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
             f"kvtier {env['kvtier']}; {env['seconds']} s.", "",
             f"budget_gb {settings['budget_gb']:.4f} ({settings['warm_pages']} warm pages a layer at batch 2), "
             f"recent_window {settings['recent_window']}, prompts "
             f"{settings['min_prompt']}-{settings['max_prompt']} tokens, 1-{settings['max_new']} new tokens, batch 1 "
             f"and 2 alternating (row 2 left-padded), a save/load/continue every {settings['session_every']} calls. "
             f"Warm-up: calls 0-{warmup - 1}, one of each kind at {settings['max_prompt']} tokens and "
             f"{settings['max_new']} new (batch 1 and 2, each plain and with a round trip) and a batch-2 call at "
             f"{settings['min_prompt']}. Baseline: after call {warmup - 1}; memory read after each call with the "
             "handle's cache dropped. Heap: what glibc's malloc has handed out / holds free (mallinfo2); kernels: "
             "compiled variants of kvtier's Triton kernels."
             + (" Pinned: what torch's caching pinned host allocator holds (in use and "
                                         "cached; part of RSS) / has in use." if pinned else ""), ""]
    lines += table_head(cuda, pinned) + [table_row(row, summary) for row in rows]
    tolerance = f"RSS within {settings['rss_tolerance_mb']:g} MiB" + (
        ", CUDA allocated exactly" if "baseline_cuda_allocated_mib" in summary else "")
    lines += ["", "| summary | value |", "|---|---:|",
              f"| baseline RSS MiB | {summary['baseline_rss_mib']} |",
              f"| max RSS over baseline MiB | {summary['max_rss_over_baseline_mib']} |",
              f"| last RSS over baseline MiB | {summary['last_rss_over_baseline_mib']} |",
              f"| RSS slope MiB/call (least squares) | {summary['rss_slope_mib_per_call']} |"]
    if "heap_in_use_slope_mib_per_call" in summary:
        slope = summary["heap_in_use_slope_mib_per_call"]
        lines += [f"| C heap in use, slope MiB/call (shown, not judged) | {slope} |"]
    if "baseline_cuda_allocated_mib" in summary:
        lines += [f"| baseline CUDA allocated MiB | {summary['baseline_cuda_allocated_mib']} |",
                  f"| max CUDA allocated over baseline MiB | {summary['max_cuda_allocated_over_baseline_mib']} |"]
    if "max_rss_after_empty_host_cache_over_baseline_mib" in summary:
        lines += ["| max RSS over baseline after torch.accelerator.empty_host_cache() MiB (shown, not judged) | "
                  f"{summary['max_rss_after_empty_host_cache_over_baseline_mib']} |"]
    if "baseline_pinned_held_mib" in summary:
        lines += [f"| baseline pinned held MiB (shown, not judged) | {summary['baseline_pinned_held_mib']} |",
                  f"| max pinned held over baseline MiB | {summary['max_pinned_held_over_baseline_mib']} |"]
    lines += [f"| calls with cold pages | {summary['calls_with_cold_pages']} of {len(rows)} "
              f"({summary['warmup_calls_with_cold_pages']} in the warm-up) |",
              f"| session round trips | {summary['session_round_trips']} |",
              f"| memory back to baseline ({tolerance}) | {'yes' if summary['passed'] else 'NO'} |"]
    return "\n".join(lines) + "\n"


def table_head(cuda: bool, pinned: bool) -> list[str]:
    names = ["call", "warm-up", "batch", "prompt", "new", "session", "cold tokens", "seconds", "RSS MiB",
             "RSS - baseline", "heap MiB in use / free", "kernels"] + ["CUDA alloc MiB"] * cuda + \
        ["pinned MiB held / in use"] * pinned
    aligns = ["---:", "---", "---:", "---:", "---:", "---"] + ["---:"] * (len(names) - 6)
    return ["| " + " | ".join(names) + " |", "|" + "|".join(aligns) + "|"]


def table_row(row: dict, summary: dict) -> str:
    line = (f"| {row['call']} | {'yes' if row['warmup'] else ''} | {row['batch']} | {row['prompt']} | "
            f"{row['new_tokens']} | {'yes' if row['session'] else ''} | {row['cold_tokens']} | {row['seconds']:.2f} | "
            f"{row['rss_mib']:.1f} | {row['rss_mib'] - summary['baseline_rss_mib']:+.1f} | "
            f"{_mib(row.get('heap_in_use_mib'))} / {_mib(row.get('heap_free_mib'))} | {row.get('kernels', '?')} |")
    if "cuda_allocated_mib" in row:
        line += f" {row['cuda_allocated_mib']:.1f} |"
    if "pinned_held_mib" in row:
        line += f" {_mib(row['pinned_held_mib'])} / {_mib(row['pinned_in_use_mib'])} |"
    return line


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
