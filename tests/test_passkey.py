"""Passkey retrieval on the real model: kvtier (INT4 warm tier) answers every case the dense cache answers."""

import pytest
from transformers import DynamicCache

import kvtier
from kvtier.eval import answer_passkey, fill_from_states, passkey_cases, prompt_prefix_states

CASES = 12
PROMPT_TOKENS = 3000
DENSE_MUST_ANSWER = 10  # the cases that carry the comparison: fewer would make "kvtier answers them all" weak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cases(smollm2):
    """The CASES passkey prompts (seed 0), tokenized once: the prompts whose length is checked are the ones
    answered below (passkey_cases is deterministic in its seed, so this is what each test built on its own)."""
    _, tokenizer = smollm2
    return passkey_cases(tokenizer, CASES, target_tokens=PROMPT_TOKENS, seed=0)


@pytest.fixture(scope="module")
def answers(smollm2, cases):
    """{case index: (dense answered, kvtier answered)} over the same prompts, both continuing one dense prefill of
    all but each prompt's last token (kvtier quantizes its copy into its tiers, as its own first chunk would)."""
    model, tokenizer = smollm2
    results = {}
    for index, case in enumerate(cases):
        prefix = prompt_prefix_states(model, case)
        dense = answer_passkey(model, tokenizer, case, fill_from_states(DynamicCache(), prefix))
        handle = kvtier.attach(model, budget_gb=1.0)
        try:
            tiered = answer_passkey(model, tokenizer, case, fill_from_states(handle.new_cache(), prefix))
            warm_tokens = handle.stats()["warm"]["tokens"]
        finally:
            kvtier.detach(model)
        assert warm_tokens > 0.9 * case.prompt_ids.shape[1], "the passkey prompt must live mostly in the warm tier"
        results[index] = (dense, tiered)
    return results


def test_prompts_are_long_enough(cases):
    lengths = [case.prompt_ids.shape[1] for case in cases]
    assert min(lengths) >= 0.9 * PROMPT_TOKENS and max(lengths) <= 1.1 * PROMPT_TOKENS


def test_dense_model_answers(answers):
    answered = sum(dense for dense, _ in answers.values())
    assert answered >= DENSE_MUST_ANSWER, f"the dense cache answered only {answered} of {CASES} passkey cases"


def test_kvtier_answers_every_case_dense_answers(answers):
    missed = [index for index, (dense, tiered) in answers.items() if dense and not tiered]
    assert not missed, f"kvtier missed passkey cases {missed} that the dense cache answered"
