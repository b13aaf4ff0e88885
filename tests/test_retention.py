"""PPL_ret and PPL_fit against a hand computation with two different models.

PPL_ret is the *base* model's perplexity on the checkpoint's completions; PPL_fit is the *checkpoint's*
perplexity on the gold demonstrations. The two tiny models here differ (different seeds), so a
retention that used the wrong model for either number gives a different value.
"""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from unisd import evaluate as ev
from unisd.data import Example
from unisd.data.prompts import demonstration

DOCS = [{"prompt": "Which animal barks? A. cat B. dog", "answer": "B", "rationale": "dogs bark"},
        {"prompt": "Where do fish live?", "answer": "in water"},
        {"prompt": "What is two plus two?", "answer": "4", "rationale": "two and two make four"}]
COMPLETIONS = ["B because dogs bark", "in the sea", "four"]


def _samples(tokenizer) -> dict[str, list[dict]]:
    """lm-eval's logged generate_until samples: the chat-rendered context, the reply, the document."""
    contexts = [tokenizer.apply_chat_template([{"role": "user", "content": d["prompt"]}], tokenize=False,
                                              add_generation_prompt=True) for d in DOCS]
    return {"t": [{"doc_id": i, "doc": d, "arguments": {"gen_args_0": {"arg_0": c, "arg_1": {}}}, "resps": [[y]]}
                  for i, (c, y, d) in enumerate(zip(contexts, COMPLETIONS, DOCS))]}


def test_ppl_ret_uses_the_base_and_ppl_fit_the_checkpoint(tiny_model, other_tiny_model, hand_perplexity):
    base, checkpoint = tiny_model, other_tiny_model
    samples = _samples(AutoTokenizer.from_pretrained(checkpoint))
    contexts = [ev._context_of(r) for r in samples["t"]]
    gold = [demonstration(Example(d["prompt"], d["answer"], d.get("rationale", ""))) for d in DOCS]
    ret_pairs, fit_pairs = list(zip(contexts, COMPLETIONS)), list(zip(contexts, gold))
    expected = {"ppl_ret": hand_perplexity(base, ret_pairs), "ppl_fit": hand_perplexity(checkpoint, fit_pairs)}
    swapped = {"ppl_ret": hand_perplexity(checkpoint, ret_pairs), "ppl_fit": hand_perplexity(base, fit_pairs)}
    for key in expected:  # the two models really disagree, so a swap cannot pass unnoticed
        assert abs(expected[key] - swapped[key]) > 0.05 * expected[key], key

    got = ev.retention(samples, str(checkpoint), str(base))["t"]
    assert got["ppl_ret"] == pytest.approx(expected["ppl_ret"], rel=1e-5)
    assert got["ppl_fit"] == pytest.approx(expected["ppl_fit"], rel=1e-5)


def test_a_checkpoint_against_itself_is_its_own_perplexity(other_tiny_model, hand_perplexity):
    """With the checkpoint as its own base, PPL_ret is the checkpoint's own perplexity on its replies."""
    samples = _samples(AutoTokenizer.from_pretrained(other_tiny_model))
    pairs = [(ev._context_of(r), y) for r, y in zip(samples["t"], COMPLETIONS)]
    got = ev.retention(samples, str(other_tiny_model), str(other_tiny_model))["t"]["ppl_ret"]
    assert got == pytest.approx(hand_perplexity(other_tiny_model, pairs), rel=1e-5)
