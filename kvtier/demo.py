"""The main job: attach kvtier to the real SmolLM2-135M-Instruct, generate from a long prompt, show the tiers.

    python -m kvtier.demo [--context-tokens 3000] [--max-new-tokens 48] [--budget-gb 0.25] [--policy sink_recent]

With a smaller budget (``--budget-gb 0.08``) the older warm pages move to the host tier and stream back each step.

It builds a long prompt from ``pydoc_data.topics``, generates greedily twice (the dense DynamicCache, then
kvtier), and prints both answers and a table of the tiers beside the dense cache's bytes.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import kvtier
from kvtier.compat import with_cache
from kvtier.eval import reference_text
from kvtier.models import load_smollm2

QUESTION = "In two sentences: what does the documentation above say about these topics?"


def long_prompt(tokenizer, context_tokens: int) -> torch.Tensor:
    """(1, L) chat prompt: about ``context_tokens`` tokens of pydoc topic help, then a question."""
    ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
    document = tokenizer.decode(ids[:context_tokens])
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def dense_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def tier_table(stats: dict, dense_bytes: int, policy: str = "sink_recent") -> str:
    def row(name, tokens, nbytes, note=""):
        return f"{name:<10}{tokens:>10,}{nbytes / 2**20:>12.2f}{note:>28}"

    warm = stats["warm"]
    lines = [
        f"{'tier':<10}{'tokens':>10}{'MiB':>12}{'':>28}",
        row("hot", stats["hot"]["tokens"], stats["hot"]["bytes"], f"{stats['hot']['dtype']} (sinks + recent)"),
        row("warm", warm["tokens"], warm["bytes"], f"{warm['format']}, {warm['bytes_per_token']:,.0f} B/token"),
        row("scratch", 0, stats["scratch_bytes"], "attention temporaries"),
        row("staging", 0, stats["staging_bytes"], "device ring for cold pages"),
        row("kvtier", stats["tokens"], stats["cache_bytes"],
            f"{stats['budget_used']:.1%} of {stats['budget_bytes'] / 2**30:g} GiB"),
        row("dense", stats["tokens"], dense_bytes, f"{stats['dense_bytes_per_token']:,} B/token"),
    ]
    low, cold = stats["low"], stats["cold"]
    if low["enabled"]:
        note = f"{low['format']}, {low['bytes_per_token']:,.0f} B/token"
        lines.insert(3, row("low", low["tokens"], low["bytes"], note))
    if cold["enabled"]:
        lines.insert(3 + low["enabled"], row("cold", cold["tokens"], cold["bytes"],
                            f"host; {cold['moved_bytes'] / 2**20:,.0f} MiB moved back"))
    if stats["evicted_tokens"]:
        lines.append(f"evicted by the {policy} policy: {stats['evicted_tokens']:,} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=3000)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--budget-gb", type=float, default=0.25)
    parser.add_argument("--policy", default="sink_recent", choices=sorted(kvtier.policies.POLICIES))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"loading SmolLM2-135M-Instruct ({dtype}, {device}) ...", flush=True)
    model, tokenizer = load_smollm2(dtype=dtype, device=device)
    prompt = long_prompt(tokenizer, args.context_tokens).to(device)
    prompt_length = prompt["input_ids"].shape[1]
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    def generate(name: str, **cache) -> None:
        print(f"generating with the {name} cache from a {prompt_length:,}-token prompt ...", flush=True)
        started = time.perf_counter()
        output = model.generate(**prompt, **settings, **cache)
        seconds[name] = time.perf_counter() - started
        answers[name] = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)

    answers, seconds = {}, {}
    dense = DynamicCache()
    generate("dense", **with_cache(dense))
    handle = kvtier.attach(model, budget_gb=args.budget_gb, policy=args.policy)
    generate("kvtier")  # generate() now builds a TieredCache
    stats = handle.stats()
    kvtier.detach(model)

    for name, answer in answers.items():
        print(f"\n--- {name} ({seconds[name]:.1f} s) ---\n{answer.strip()}")
    print(f"\nanswers identical: {answers['dense'] == answers['kvtier']}\n")
    print(handle.config.describe() + "\n")
    print(tier_table(stats, dense_cache_bytes(dense), args.policy))


if __name__ == "__main__":
    main()
