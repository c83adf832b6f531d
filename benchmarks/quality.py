"""Quality: bits per token vs fidelity for every kvtier warm format and the quanto baseline, on the real model.

SmolLM2-135M-Instruct (float32, the CPU) reads ``--windows`` evenly spaced pydoc_data.topics windows of ``--context``
tokens. Each cache prefills a window in chunks of ``--prefill-chunk`` tokens and decodes ``--steps`` steps fed the
dense model's greedy tokens (kvtier.eval.compare_decode): worst decode-logit MSE, worst top-10 overlap, argmax
agreement. Perplexity: each window read through the cache ``--ppl-chunk`` tokens per forward, predictions from
position ``--ppl-skip`` on (kvtier.eval.chunked_perplexity). Passkey: ``--passkeys`` retrieval prompts of about
``--passkey-tokens`` tokens (kvtier.eval), answered by greedy generation; parity means every case the dense cache
answers is answered too, as tests/test_passkey.py asks (a case only the compressed cache answers is no loss). Bytes
per token (all layers, keys and values) come from kvtier's own stats() (the warm pages' format; the precision rule's
mix of INT4 and 2-bit pages), from quanto's packed tensors, and bf16 for the dense cache.

Caches: dense DynamicCache; kvtier INT4 (the default), TurboQuant 3-bit and 4-bit (QJL keys, keys centered: the
defaults), the precision rule (low_bits=2, attention_mass, a budget whose INT4 share holds half a context's warm pages;
its low pages' keys at 2 bits, and at 3 with low_key_bits=3); QuantizedCache with quanto at 4 and 2 bits (skipped,
saying so, without optimum-quanto). Gate (the issue's target): decode-logit MSE <= 0.1 at every step of every window,
and passkey parity with dense.

    python benchmarks/quality.py [--windows 2] [--context 1024] [--steps 4] [--passkeys 2] [--passkey-tokens 1000]
                                 [--caches ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from policy_fidelity import precision_configs  # noqa: E402

import kvtier  # noqa: E402
from kvtier.eval import (answer_passkey, chunked_perplexity, compare_decode, dense_reference,  # noqa: E402
                         passkey_cases, text_windows)
from kvtier.gate import FidelityGate  # noqa: E402
from kvtier.models import load_smollm2  # noqa: E402

GATE = FidelityGate(max_logit_mse=0.1, min_top10_overlap=0.0, require_argmax=False)
KVTIER = {  # TierConfig fields; "rule" also gets a budget sized for the context (precision_configs)
    "kvtier-int4": dict(budget_gb=1.0),
    "kvtier-tq3": dict(budget_gb=1.0, warm_format="turboquant", turboquant_bits=3),
    "kvtier-tq4": dict(budget_gb=1.0, warm_format="turboquant", turboquant_bits=4),
    "kvtier-rule-low2": None,
    "kvtier-rule-k3v2": None,
}
QUANTO_BITS = {"quanto-int4": 4, "quanto-int2": 2}
CACHES = ("dense", "kvtier-int4", "quanto-int4", "kvtier-tq3", "kvtier-tq4", "kvtier-rule-low2", "kvtier-rule-k3v2",
          "quanto-int2")
RULE_LOW_KEY_BITS = {"kvtier-rule-low2": None, "kvtier-rule-k3v2": 3}  # the precision rule's low pages' key bits
LABELS = {"dense": "dense DynamicCache (bf16 equivalent)", "kvtier-int4": "kvtier INT4 (default)",
          "kvtier-tq3": "kvtier TurboQuant 3-bit +QJL", "kvtier-tq4": "kvtier TurboQuant 4-bit +QJL",
          "kvtier-rule-low2": "kvtier precision rule (INT4 + TurboQuant 2-bit, attention_mass)",
          "kvtier-rule-k3v2": "kvtier precision rule (INT4 + TurboQuant 3-bit keys, 2-bit values, attention_mass)",
          "quanto-int4": "QuantizedCache quanto 4-bit", "quanto-int2": "QuantizedCache quanto 2-bit"}
HIGH_SHARE = 0.5  # under the precision rule, this share of a context's warm pages stays INT4, the rest drops to 2 bits


class CacheMaker:
    """A fresh cache of one configuration for a context of ``tokens`` (kvtier stays attached until :meth:`done`)."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def kvtier_config(self, tokens: int) -> dict:
        if self.name in RULE_LOW_KEY_BITS:
            defaults = kvtier.TierConfig()
            warm_pages = (tokens - defaults.sink_tokens - defaults.recent_window) // defaults.block_size
            high_pages = max(1, int(HIGH_SHARE * warm_pages))
            configs = precision_configs(self.model, high_pages, tokens, RULE_LOW_KEY_BITS[self.name])
            config, _ = configs["rule-attention_mass"]
            return config
        return KVTIER[self.name]

    def __call__(self, tokens: int):
        if self.name == "dense":
            return DynamicCache()
        if self.name in QUANTO_BITS:
            return common.quantized_cache(self.model.config, QUANTO_BITS[self.name])
        return kvtier.attach(self.model, **self.kvtier_config(tokens)).new_cache()

    def done(self) -> None:
        if getattr(self.model, "_kvtier", None) is not None:
            kvtier.detach(self.model)


def dense_bytes_per_token(model) -> int:
    """bf16 keys and values of all layers (the CPU run keeps float32, twice this)."""
    config = model.config
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2


def bytes_per_token(cache) -> float:
    """Keys and values of all layers, per token, as the cache stores its compressed tokens."""
    if isinstance(cache, kvtier.TieredCache):
        stats = cache.stats()
        warm, low = stats["warm"], stats["low"]
        tokens = warm["tokens"] + low["tokens"]
        return (warm["tokens"] * warm["bytes_per_token"] + low["tokens"] * low.get("bytes_per_token", 0)) / tokens
    total = 0.0
    for layer in cache.layers:  # quanto: packed codes, scales and shifts of the quantized tokens
        packed = common.tensor_bytes(layer._quantized_keys) + common.tensor_bytes(layer._quantized_values)
        quantized = layer._quantized_keys.shape[-2]
        total += packed / quantized
    return total


def fidelity_rows(model, windows, maker: CacheMaker, args, references) -> tuple[list[dict], float]:
    rows, per_token = [], 0.0
    for index, window in enumerate(windows):
        cache = maker(window.shape[1] + args.steps)
        try:
            report = compare_decode(model, window, cache, steps=args.steps, reference=references[index],
                                    prefill_chunk=args.prefill_chunk)
        finally:
            maker.done()
        per_token = bytes_per_token(cache)
        rows.append({"window": index, **report.summary(), "gate_failures": GATE.failures(report)})
    return rows, per_token


def perplexities(model, windows, maker: CacheMaker, args) -> list[float]:
    values = []
    for window in windows:
        cache = maker(window.shape[1])
        try:
            values.append(chunked_perplexity(model, window, cache, chunk=args.ppl_chunk, skip=args.ppl_skip))
        finally:
            maker.done()
    return values


def passkey_answers(model, tokenizer, cases, maker: CacheMaker, args) -> list[bool]:
    answers = []
    for case in cases:
        cache = maker(case.prompt_ids.shape[1] + 8)
        try:
            answers.append(answer_passkey(model, tokenizer, case, cache=cache, prefill_chunk_size=args.prefill_chunk))
        finally:
            maker.done()
    return answers


def summarize(name: str, rows: list[dict], per_token: float, ppl: list[float], answers: list[bool],
              dense_answers: list[bool] | None, channels: int) -> dict:
    summary = {"cache": name, "label": LABELS[name], "bytes_per_token": per_token,
               "bits_per_channel": per_token * 8 / channels, "perplexity": sum(ppl) / len(ppl) if ppl else None,
               "perplexity_per_window": ppl, "passkeys_answered": sum(answers), "passkeys": len(answers),
               "passkey_answers": answers}
    if rows:
        summary.update(worst_mse=max(row["worst_mse"] for row in rows), worst_top10=min(row["worst_top10"] for row in rows),
                       argmax_agreement=sum(row["argmax_agreement"] for row in rows) / len(rows),
                       windows_passing=sum(not row["gate_failures"] for row in rows), windows=len(rows))
    if dense_answers is not None:
        summary["passkeys_lost"] = [case for case, (answered, dense) in enumerate(zip(answers, dense_answers))
                                    if dense and not answered]  # cases the dense cache answers and this one does not
        summary["passkey_parity"] = not summary["passkeys_lost"]
    if rows and dense_answers is not None:
        summary["passes"] = summary["windows_passing"] == len(rows) and summary["passkey_parity"]
    return summary


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [f"# Quality: bits per token vs fidelity, {settings['model']}", "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}"
             + (f", optimum-quanto {env['optimum-quanto']}" if "optimum-quanto" in env else "") + ".", "",
             f"{settings['windows']} pydoc windows of {settings['context']} tokens prefilled {settings['prefill_chunk']} "
             f"at a time, {settings['steps']} decode steps; perplexity read {settings['ppl_chunk']} tokens a forward "
             f"from position {settings['ppl_skip']}; {settings['passkeys']} passkey prompts of about "
             f"{settings['passkey_tokens']:,} tokens. "
             "Gate: decode-logit MSE <= 0.1 at every step of every window, and passkey parity with dense (every case "
             "the dense cache answers is answered).", "",
             *([settings["note"], ""] if "note" in settings else []),
             "| cache | B/token (all layers) | bits/channel | worst MSE | worst top-10 | argmax | perplexity | "
             "passkeys | gate |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["summary"]:
        if "skipped" in row:
            lines.append(f"| {row['label']} | not run: {row['skipped']} | | | | | | | |")
            continue
        mse = f"{row['worst_mse']:.4f}" if "worst_mse" in row else "(reference)"
        top = f"{row['worst_top10']:.1f}" if "worst_top10" in row else ""
        argmax = f"{row['argmax_agreement']:.2f}" if "argmax_agreement" in row else ""
        ppl = f"{row['perplexity']:.3f}" if row.get("perplexity") else ""
        gate = "" if "passes" not in row else ("pass" if row["passes"] else
                                               f"FAIL ({row['windows_passing']} of {row['windows']} windows, "
                                               f"passkey parity {'yes' if row['passkey_parity'] else 'no'})")
        if row.get("passkeys_lost"):
            gate += f"; lost passkey cases {row['passkeys_lost']}"
        lines.append(f"| {row['label']} | {row['bytes_per_token']:,.0f} | {row['bits_per_channel']:.2f} | {mse} | {top} "
                     f"| {argmax} | {ppl} | {row['passkeys_answered']} of {row['passkeys']} | {gate} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path, name: str) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [row for row in result["summary"] if "skipped" not in row]
    dense = next((row["perplexity"] for row in rows if row["cache"] == "dense"), None)
    figure, (mse_axes, ppl_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        kvtier_row = row["cache"].startswith("kvtier")
        style = dict(marker="o" if kvtier_row else "s", color="tab:blue" if kvtier_row else "tab:orange")
        label = dict(fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "worst_mse" in row:
            mse_axes.scatter(row["bits_per_channel"], row["worst_mse"], **style)
            mse_axes.annotate(row["cache"], (row["bits_per_channel"], row["worst_mse"]), **label)
        if dense and row.get("perplexity") and row["cache"] != "dense":
            increase = max(row["perplexity"] / dense - 1, 1e-5)  # log axis: a perplexity at or below dense sits at 1e-5
            ppl_axes.scatter(row["bits_per_channel"], increase, **style)
            ppl_axes.annotate(row["cache"], (row["bits_per_channel"], increase), **label)
    mse_axes.axhline(GATE.max_logit_mse, color="gray", linestyle="--", linewidth=1)
    mse_axes.set_yscale("log")
    mse_axes.set_xlabel("bits per channel (keys and values, all fields)")
    mse_axes.set_ylabel("worst decode-logit MSE vs dense (log; dashed: gate 0.1)")
    ppl_axes.set_yscale("log")
    ppl_axes.set_xlabel("bits per channel")
    ppl_axes.set_ylabel(f"perplexity / dense perplexity ({dense:.2f}) - 1 (log)" if dense else "perplexity")
    figure.suptitle(f"Fidelity vs bytes: {result['settings']['model']} ({result['environment']['device']})", fontsize=10)
    return common.save_figure(figure, out, name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--ppl-chunk", type=int, default=256)
    parser.add_argument("--ppl-skip", type=int, default=256)
    parser.add_argument("--passkeys", type=int, default=2)
    parser.add_argument("--passkey-tokens", type=int, default=1000, help="about this many tokens a passkey prompt")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="quality-cpu")
    args = parser.parse_args(argv)
    if "dense" not in args.caches:
        args.caches.insert(0, "dense")  # passkey parity needs its answers

    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    config = model.config
    channels = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    windows = text_windows(tokenizer, args.context, args.windows)
    cases = passkey_cases(tokenizer, args.passkeys, target_tokens=args.passkey_tokens, seed=0)
    references = [dense_reference(model, window, steps=args.steps) for window in windows]
    result = {"environment": common.environment("cpu"),
              "settings": {"model": "SmolLM2-135M-Instruct (float32)", **{k: v for k, v in vars(args).items()
                                                                           if k not in ("out", "caches")},
                           "kvtier": {name: str(config_) for name, config_ in KVTIER.items()},
                           "rule_high_share": HIGH_SHARE, "gate": vars(GATE)},
              "summary": [], "windows": {}}
    dense_answers = None
    bar = common.progress_bar(len(args.caches), "caches", "cache")
    for name in args.caches:
        if name in QUANTO_BITS and not common.quanto_available():
            result["summary"].append({"cache": name, "label": LABELS[name], "skipped": common.QUANTO_MISSING})
            bar.update(1)
            continue
        maker = CacheMaker(name, model)
        try:
            rows, per_token = ([], dense_bytes_per_token(model)) if name == "dense" else \
                fidelity_rows(model, windows, maker, args, references)
            ppl = perplexities(model, windows, maker, args)
            answers = passkey_answers(model, tokenizer, cases, maker, args)
        except Exception as error:  # say what failed and go on with the next cache
            maker.done()
            failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            result["summary"].append({"cache": name, "label": LABELS[name], "skipped": f"failed: {failure}"})
            print(f"{name}: failed: {failure}", flush=True)
            bar.update(1)
            continue
        if name == "dense":
            dense_answers = answers
        summary = summarize(name, rows, per_token, ppl, answers, None if name == "dense" else dense_answers, channels)
        result["summary"].append(summary)
        result["windows"][name] = rows
        result["environment"]["seconds"] = round(time.perf_counter() - started)
        common.write_results(result, markdown(result), args.out, args.name)
        print(f"{name}: {per_token:.0f} B/token, worst MSE {summary.get('worst_mse', 0):.4f}, perplexity "
              f"{summary['perplexity']:.3f}, passkeys {summary['passkeys_answered']} of {len(answers)}", flush=True)
        bar.update(1)
    bar.close()
    plot(result, args.out, args.name)
    table = markdown(result)
    common.write_results(result, table, args.out, args.name)
    print("\n" + table, flush=True)
    return result


if __name__ == "__main__":
    main()
