"""unisd.rollout.sample: the same samples as transformers `generate`, EOS/mask/truncation, padding."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd import rollout
from unisd.sequences import left_pad, render

GREEDY = 1e-6  # a temperature this low makes sampling the argmax


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return model, tokenizer


def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is two plus two?", "Which animal barks? A. cat B. dog C. cow", "Name a colour of the sky."]
    return [render(tokenizer, t) for t in texts]


def reference(model, tokenizer, rows, max_new_tokens, **kw):
    """Plain model.generate on the same left-padded batch; completion part only."""
    ids, attn = left_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(rollout.eos_ids(model, tokenizer)),
                             pad_token_id=tokenizer.pad_token_id, **kw)
    return out[:, ids.shape[1]:]


def test_greedy_matches_generate_token_for_token(model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    r = rollout.sample(model, tok, rows, 12, GREEDY, 1.0)
    ref = reference(model, tok, rows, 12, do_sample=False)
    for i in range(len(rows)):
        n = int(r.mask[i].sum())
        assert r.tokens[i, :n].tolist() == ref[i, :n].tolist()


def test_seeded_sampling_matches_generate(model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    torch.manual_seed(7)
    r = rollout.sample(model, tok, rows, 10, 0.9, 0.95)
    torch.manual_seed(7)
    ref = reference(model, tok, rows, 10, do_sample=True, temperature=0.9, top_p=0.95, top_k=0)
    for i in range(len(rows)):
        n = int(r.mask[i].sum())
        assert r.tokens[i, :n].tolist() == ref[i, :n].tolist()
    torch.manual_seed(7)
    again = rollout.sample(model, tok, rows, 10, 0.9, 0.95)
    assert torch.equal(again.tokens, r.tokens) and torch.equal(again.mask, r.mask)


def test_left_padding_invariance_of_greedy(model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    together = rollout.sample(model, tok, rows, 10, GREEDY, 1.0)
    for i, row in enumerate(rows):
        alone = rollout.sample(model, tok, [row], 10, GREEDY, 1.0)
        n = int(alone.mask[0].sum())
        assert int(together.mask[i].sum()) == n
        assert together.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist()


def test_eos_mask_padding_and_truncation(model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    free = rollout.sample(model, tok, rows, 8, GREEDY, 1.0)
    stop = int(free.tokens[0, 2])  # make the token row 0 emits third an extra end-of-turn id
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        r = rollout.sample(model, tok, rows, 8, GREEDY, 1.0)
    finally:
        model.generation_config.eos_token_id = saved
    first = int((r.tokens[0] == stop).nonzero()[0])
    assert first <= 2
    assert r.mask[0, :first + 1].eq(1).all() and r.mask[0, first + 1:].eq(0).all()
    assert r.tokens[0, first + 1:].eq(tok.pad_token_id).all()   # after EOS: padding
    assert not bool(r.truncated[0])
    for i in range(len(rows)):   # a row without any end id ran to the limit and is truncated
        ends = any(int(t) in (tok.eos_token_id, stop) for t in r.tokens[i, :int(r.mask[i].sum())])
        assert bool(r.truncated[i]) == (not ends)
    assert r.tokens.shape[1] == int(r.mask.sum(-1).max())     # trimmed to the longest completion


def test_min_new_tokens_fixes_length_and_training_mode_is_restored(model_tok):
    model, tok = model_tok
    model.train()
    saved = model.generation_config.eos_token_id
    # every token but one ends the turn: without min_new_tokens each completion is 1 token long
    model.generation_config.eos_token_id = [i for i in range(len(tok)) if i != 5]
    try:
        short = rollout.sample(model, tok, prompts(tok), 6, 1.0, 1.0)
        fixed = rollout.sample(model, tok, prompts(tok), 6, 1.0, 1.0, min_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = saved
    assert model.training
    model.eval()
    assert short.mask.sum(-1).eq(1).all()
    assert fixed.tokens.shape == (3, 6) and fixed.mask.eq(1).all()
    assert fixed.tokens.eq(5).all() and fixed.truncated.all()   # the only id that is not an end id
    assert not fixed.tokens.is_inference()
