"""Fidelity of the INT4 warm tier against the dense cache on the real SmolLM2-135M-Instruct.

    python benchmarks/fidelity.py [--windows 8] [--context 2048] [--steps 4] [--seeds 1] [--key-group 32]

For each of ``--windows`` evenly spaced pydoc windows and each rotation seed: decode-logit MSE, top-10
overlap, argmax agreement and worst per-layer attention relative L2 over ``--steps`` decode steps.
Writes benchmarks/results/fidelity-<device>.json and .md; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import kvtier
from kvtier.eval import compare_decode, text_windows
from kvtier.gate import FidelityGate
from kvtier.models import load_smollm2

GATE = FidelityGate(max_logit_mse=0.10, min_top10_overlap=0.9, require_argmax=True)  # issue 2's targets
RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "kvtier": kvtier.__version__}


def passes(row: dict) -> bool:
    return not row["gate_failures"]


def markdown(rows: list[dict], settings: dict, env: dict) -> str:
    lines = [f"# Fidelity: {settings['model']}, {settings['context']} tokens, {settings['steps']} decode steps",
             "", f"{env}", "", f"settings: {settings}", "",
             "| window | seed | worst MSE | worst top-10 | argmax | worst attn L2 | gates |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['window']} | {row['seed']} | {row['worst_mse']:.4f} | {row['worst_top10']:.1f} | "
                     f"{row['argmax_agreement']:.2f} | {row['worst_attention_l2']:.3f} | "
                     f"{'pass' if passes(row) else 'FAIL'} |")
    failed = sum(not passes(row) for row in rows)
    lines += ["", f"{len(rows) - failed} of {len(rows)} runs pass the gate at every step (MSE <= "
                  f"{GATE.max_logit_mse}, top-10 >= {GATE.min_top10_overlap}, argmax agreeing)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, help="rotation seeds per window (noise realizations)")
    parser.add_argument("--key-group", type=int, default=kvtier.TierConfig.key_group)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_smollm2(device=device)
    windows = text_windows(tokenizer, args.context, args.windows)
    settings = {"model": "SmolLM2-135M-Instruct (float32)", "context": args.context, "steps": args.steps,
                "recent_window": 128, "key_group": args.key_group, "seeds": args.seeds}
    rows = []
    for index, window in enumerate(windows):
        for seed in range(args.seeds):
            started = time.perf_counter()
            handle = kvtier.attach(model, budget_gb=1.0, recent_window=128, key_group=args.key_group,
                                   rotation_seed=seed)
            try:
                cache = handle.new_cache()
                report = compare_decode(model, window.to(device), cache, steps=args.steps, shared_prefill=True)
            finally:
                kvtier.detach(model)
            stats = cache.stats()
            row = {"window": index, "seed": seed, **report.summary(), "gate_failures": GATE.failures(report),
                   "warm_bytes_per_token": stats["warm"]["bytes_per_token"],
                   "dense_bytes_per_token": stats["dense_bytes_per_token"],
                   "per_step": [vars(step) for step in report.steps]}
            rows.append(row)
            print(f"window {index} seed {seed}: worst MSE {row['worst_mse']:.4f}, top-10 {row['worst_top10']:.1f}, "
                  f"argmax {row['argmax_agreement']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)

    env = environment(device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"fidelity-{device}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "settings": settings, "gate": vars(GATE),
                                                     "runs": rows}, indent=1))
    table = markdown(rows, settings, env)
    stem.with_suffix(".md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
