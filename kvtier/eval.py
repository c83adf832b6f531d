"""Fidelity harness: how far a cache moves a model's decode from the dense DynamicCache's, step by step.

For one context it prefills the dense cache and the cache under test, then feeds both the same tokens
(the dense model's greedy choices) for several decode steps and reports, at every step: the MSE of the
logits, the overlap of their top-10 tokens, whether the argmax agrees, and per layer the relative L2
distance of the attention block's output. Tests and benchmarks use it; thresholds are theirs. It also reads a
text through a cache in chunks for its perplexity, and builds passkey-retrieval cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .compat import with_cache


@dataclass
class StepFidelity:
    logit_mse: float
    top10_overlap: float
    argmax_agrees: bool
    attention_relative_l2: list[float]  # one per layer


@dataclass
class FidelityReport:
    steps: list[StepFidelity] = field(default_factory=list)

    @property
    def worst_mse(self) -> float:
        return max(step.logit_mse for step in self.steps)

    @property
    def worst_top10(self) -> float:
        return min(step.top10_overlap for step in self.steps)

    @property
    def argmax_agreement(self) -> float:
        return sum(step.argmax_agrees for step in self.steps) / len(self.steps)

    @property
    def worst_attention_l2(self) -> float:
        return max(max(step.attention_relative_l2) for step in self.steps)

    def summary(self) -> dict:
        return {"steps": len(self.steps), "worst_mse": self.worst_mse, "worst_top10": self.worst_top10,
                "argmax_agreement": self.argmax_agreement, "worst_attention_l2": self.worst_attention_l2}


@dataclass
class DenseReference:
    """The dense DynamicCache's side of :func:`compare_decode` for one context, computed once.

    The dense run does not depend on the cache under test (it only chooses the tokens both caches see), so one
    reference serves every cache compared on the same context: same prefill keys and values, same greedy
    tokens, same logits and attention outputs at every step.
    """

    context: torch.Tensor  # (1, L)
    prefill_states: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values after the prefill
    tokens: list[torch.Tensor] = field(default_factory=list)  # (1, 1) per step: the token both caches are fed
    logits: list[torch.Tensor] = field(default_factory=list)  # (1, V) per step: the dense logits after it
    attention: list[list[torch.Tensor]] = field(default_factory=list)  # per step, per layer: attention outputs

    @property
    def steps(self) -> int:
        return len(self.tokens)


@torch.no_grad()
def dense_reference(model, context: torch.Tensor, steps: int = 4) -> DenseReference:
    """Prefill ``context`` (1, L) into a DynamicCache and decode ``steps`` greedy tokens, recording each step."""
    dense = DynamicCache()
    logits = model(context, **with_cache(dense), use_cache=True, logits_to_keep=1).logits[:, -1]
    # DynamicCache appends by concatenation, so these tensors stay the prefill's as decoding goes on
    reference = DenseReference(context, [(layer.keys, layer.values) for layer in dense.layers])
    for _ in range(steps):
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1): both caches see the dense model's choice
        with _AttentionOutputs(model) as attention:
            logits = model(token, **with_cache(dense), use_cache=True).logits[:, -1]
        reference.tokens.append(token)
        reference.logits.append(logits)
        reference.attention.append(attention.outputs)
    return reference


@torch.no_grad()
def compare_decode(model, context: torch.Tensor, cache, steps: int = 4, shared_prefill: bool = False,
                   reference: DenseReference | None = None, prefill_chunk: int | None = None) -> FidelityReport:
    """Decode ``steps`` tokens after ``context`` (1, L) with a DynamicCache and with ``cache``; compare each step.

    With ``shared_prefill`` the cache under test is filled from the dense prefill's keys and values instead of
    running its own prefill: the same tokens reach the same tiers (a tiered prefill attends its own chunk
    exactly, as dense does), at half the cost. ``reference`` (from :func:`dense_reference` on the same
    context, at least ``steps`` steps) skips the dense run when several caches are compared on one context.
    ``prefill_chunk`` prefills the cache under test that many tokens per forward (chunked prefill), so that the
    pages of earlier chunks are attended, and scored by a mass-aware policy, before later chunks fill the budget.
    """
    if reference is None:
        reference = dense_reference(model, context, steps)
    elif reference.steps < steps or not torch.equal(reference.context, context):
        raise ValueError("compare_decode: the dense reference is for another context or has fewer steps.")
    if shared_prefill:  # copies: the reference may serve more caches
        fill_from_states(cache, reference.prefill_states)
    else:
        chunk = prefill_chunk or context.shape[1]
        for first in range(0, context.shape[1], chunk):
            model(context[:, first:first + chunk], **with_cache(cache), use_cache=True, logits_to_keep=1)
    report = FidelityReport()
    for step in range(steps):
        with _AttentionOutputs(model) as tested_attention:
            tested_logits = model(reference.tokens[step], **with_cache(cache), use_cache=True).logits[:, -1]
        report.steps.append(_step_fidelity(reference.logits[step], tested_logits, reference.attention[step],
                                           tested_attention.outputs))
    return report


def _step_fidelity(dense_logits, tested_logits, dense_attention, tested_attention) -> StepFidelity:
    dense_logits, tested_logits = dense_logits.double(), tested_logits.double()
    dense_top = set(dense_logits.topk(10, dim=-1).indices[0].tolist())
    tested_top = set(tested_logits.topk(10, dim=-1).indices[0].tolist())
    relative = [
        ((tested.double() - dense.double()).norm() / dense.double().norm().clamp_min(1e-30)).item()
        for dense, tested in zip(dense_attention, tested_attention)
    ]
    return StepFidelity(
        logit_mse=((tested_logits - dense_logits) ** 2).mean().item(),
        top10_overlap=len(dense_top & tested_top) / 10,
        argmax_agrees=bool(dense_logits.argmax() == tested_logits.argmax()),
        attention_relative_l2=relative,
    )


class _AttentionOutputs:
    """Records each decoder layer's attention-block output during one forward pass."""

    def __init__(self, model):
        self.modules = [module for name, module in model.named_modules() if name.endswith("self_attn")]
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self):
        hook = lambda module, inputs, output: self.outputs.append(output[0].detach())  # noqa: E731
        self.handles = [module.register_forward_hook(hook) for module in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def chunked_perplexity(model, ids: torch.Tensor, cache, chunk: int = 128, skip: int = 0) -> float:
    """Perplexity of ``ids`` (1, L) read ``chunk`` tokens per forward through ``cache``, so that every chunk attends
    the earlier ones as the cache holds them (quantized, for a quantizing cache); the first ``skip`` positions'
    predictions are left out (their context is mostly exact in any cache)."""
    total, count = 0.0, 0
    for first in range(0, ids.shape[1] - 1, chunk):
        inputs = ids[:, first:first + chunk]  # (1, C)
        logits = model(inputs, **with_cache(cache), use_cache=True).logits[0].double()  # (C, V)
        targets = ids[0, first + 1:first + 1 + chunk]  # the next token of each position, (C') with C' <= C
        positions = torch.arange(first, first + len(targets))
        keep = positions >= skip
        losses = torch.nn.functional.cross_entropy(logits[:len(targets)], targets, reduction="none")  # (C',)
        total += losses[keep].sum().item()
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1))))


# ---------------------------------------------------------------- real text and passkeys
def reference_text() -> str:
    """About 465k characters of English prose that every Python ships: pydoc's topic help."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))


def text_windows(tokenizer, length: int, count: int, between: bool = False) -> list[torch.Tensor]:
    """``count`` windows (1, length) of token ids, evenly spaced over the reference text; with ``between``, the
    ``count - 1`` windows midway between those (held-out text for checking a choice made on the first set)."""
    ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
    stride = (len(ids) - length) // max(count - 1, 1)
    starts = [index * stride + stride // 2 for index in range(count - 1)] if between else [
        index * stride for index in range(count)]
    return [ids[start:start + length].unsqueeze(0) for start in starts]


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class PasskeyCase:
    passkey: str
    depth: float  # where the passkey sits, as a fraction of the filler
    prompt_ids: torch.Tensor  # (1, L)


def passkey_cases(tokenizer, count: int, target_tokens: int = 3000, seed: int = 0) -> list[PasskeyCase]:
    """Passkey retrieval prompts: a 5-digit key hidden at a random depth in about ``target_tokens`` of filler."""
    rng = random.Random(seed)
    repeats = target_tokens // len(tokenizer(FILLER).input_ids)
    cases = []
    for _ in range(count):
        passkey, depth = str(rng.randint(10000, 99999)), rng.random()
        before = int(repeats * depth)
        text = (
            "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
            + FILLER * before
            + f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
            + FILLER * (repeats - before)
            + "\nWhat is the pass key? The pass key is"
        )
        cases.append(PasskeyCase(passkey, depth, tokenizer(text, return_tensors="pt").input_ids))
    return cases


@torch.no_grad()
def prompt_prefix_states(model, case: PasskeyCase) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values (1, H_kv, L - 1, D) of a dense prefill of all but the prompt's last token.

    Filled into several caches (:func:`fill_from_states`), they let each answer the passkey from one prefill, as
    compare_decode's ``shared_prefill`` does: a first prefill chunk attends only its own tokens, exactly, in every
    cache, so each would have computed these same states. generate() then feeds the last prompt token through the
    cache under test and decodes.
    """
    dense = DynamicCache()
    model(case.prompt_ids[:, :-1], **with_cache(dense), use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in dense.layers]


def fill_from_states(cache, states: list[tuple[torch.Tensor, torch.Tensor]]):
    """``cache`` (empty) holding copies of ``states``, per layer (B, H_kv, L, D) keys and values; returns it."""
    for index, (keys, values) in enumerate(states):
        cache.update(keys.clone(), values.clone(), index)
    return cache


@torch.no_grad()
def answer_passkey(model, tokenizer, case: PasskeyCase, cache=None, max_new_tokens: int = 8, **generate_kwargs) -> bool:
    """Greedy-decode after the prompt; True if the key is in the answer.

    ``cache`` None lets ``generate`` pick its cache (a TieredCache when kvtier is attached, else dynamic);
    ``generate_kwargs`` go to ``generate`` (``prefill_chunk_size=256``, say).
    """
    extra = {} if cache is None else with_cache(cache)
    output = model.generate(case.prompt_ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id, **extra, **generate_kwargs)
    return case.passkey in tokenizer.decode(output[0, case.prompt_ids.shape[1]:])
