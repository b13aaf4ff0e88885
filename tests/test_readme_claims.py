"""README claims about training, each checked so that breaking the feature breaks the test.

Gradient accumulation equals a larger batch; --mask-truncated leaves truncated completions out of the
loss; prompts over --max-prompt-tokens are dropped with the right count; --lora saves a merged model
that differs from the base where the adapter sat, equals it elsewhere, and loads in lm-eval.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd import config as cfg
from unisd.train import prepare, train

GOLD = {"mix": {"source": "gold", "prob": "1.0"}}  # a fixed rollout: the gold demonstrations


def _config(model: Path, data: Path, out: Path, plugins: tuple[str, ...] = (), options: dict | None = None,
            **settings) -> cfg.TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=2, max_new_tokens=8, max_steps=2,
                lr=1e-3)
    return cfg.resolve("", plugins, options or {}, **(base | settings))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_equals_a_larger_batch(tiny_model, tiny_data, tmp_path):
    big = train(_config(tiny_model, tiny_data, tmp_path / "big", ("mix",), GOLD, batch_size=4, grad_accum=1),
                echo=lambda m: None)
    accum = train(_config(tiny_model, tiny_data, tmp_path / "accum", ("mix",), GOLD, batch_size=1, grad_accum=4),
                  echo=lambda m: None)
    keys = ("loss", "distill", "grad_norm")
    for got, want in zip(_metrics(accum), _metrics(big), strict=True):
        assert {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, rel=1e-5)
        assert 4 * got["completion_tokens"] == pytest.approx(want["completion_tokens"])  # a mean over micro-batches
    one, initial = load_file(str(big / "model.safetensors")), load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(one[k], initial[k]) for k in one)
    other = load_file(str(accum / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(other[k], one[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_mask_truncated_leaves_completions_at_the_length_limit_out(tiny_model, tiny_data, tmp_path, mask_truncated):
    # one new token: every completion that is not a lone end-of-turn token hits the limit
    out = train(_config(tiny_model, tiny_data, tmp_path / "run", max_new_tokens=1, batch_size=4,
                        mask_truncated=mask_truncated), echo=lambda m: None)
    rows = _metrics(out)
    assert sum(r["truncated"] for r in rows) > 0  # the length limit was hit, so the flag has work to do
    for r in rows:
        counted = 4 * (1 - r["truncated"]) if mask_truncated else 4
        assert r["completion_tokens"] == pytest.approx(counted)


def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_over_max_prompt_tokens_are_dropped_with_the_right_count(tiny_model, tmp_path):
    long_text = " ".join(["the sky scatters blue light"] * 40)  # hundreds of tokens
    rows = [{"prompt": "What is two plus two?", "answer": "4"},                                # fits
            {"prompt": f"Explain: {long_text}", "answer": "blue"},                           # student prompt too long
            {"prompt": "Name a colour of the sky.", "answer": "blue", "rationale": long_text},  # teacher prompt too long
            {"prompt": "Where do fish live?", "answer": "in water", "rationale": "gills"},     # fits
            {"prompt": long_text, "answer": "x", "rationale": long_text}]                      # both too long
    tok = AutoTokenizer.from_pretrained(tiny_model)
    header = len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True))
    # short prompts take ~15 tokens and ~125 with the demonstration and instruction; long_text alone ~640
    limit = header + 300
    said: list[str] = []
    run = prepare(_config(tiny_model, _rows(tmp_path, rows), tmp_path / "run", max_prompt_tokens=limit), echo=said.append)
    assert run.kept == [0, 3]
    assert said == [f"warning: dropped 3 of 5 examples whose prompts exceed {limit} tokens"]
    none_dropped: list[str] = []
    assert prepare(_config(tiny_model, _rows(tmp_path, rows), tmp_path / "run2", max_prompt_tokens=100_000),
                   echo=none_dropped.append).kept == [0, 1, 2, 3, 4]
    assert none_dropped == []


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    data = folder / "train.jsonl"
    data.write_text(json.dumps({"prompt": "What is two plus two?", "answer": "4"}) + "\n")
    return train(_config(tiny_model, data, folder / "run", ("mix",), GOLD, batch_size=1, lora=True, lora_r=4,
                         lora_alpha=8, lr=5e-2), echo=lambda m: None)


def test_lora_saves_a_merged_model_that_differs_from_the_base_where_the_adapter_sat(lora_run, tiny_model):
    saved, base = load_file(str(lora_run / "model.safetensors")), load_file(str(tiny_model / "model.safetensors"))
    assert sorted(saved) == sorted(base)  # a plain model: no lora_A / lora_B / base_layer keys
    projections = [k for k in base if k.endswith("_proj.weight")]
    assert len(projections) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers: all-linear
    changed = sorted(k for k in base if not torch.equal(saved[k], base[k]))
    assert changed == sorted(projections)  # embeddings and norms were frozen


def test_lora_output_loads_in_lm_eval_with_the_merged_weights(lora_run):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    context, continuation = "What is two plus two?", " The answer is 4"
    lm = HFLM(pretrained=str(lora_run), dtype="float32", device="cpu", batch_size=1)
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    (got, _), = lm.loglikelihood([request])
    tok = AutoTokenizer.from_pretrained(lora_run)
    model = AutoModelForCausalLM.from_pretrained(lora_run, dtype=torch.float32).eval()
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
    want = float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())
    assert got == pytest.approx(want, abs=1e-4)
