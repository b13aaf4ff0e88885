"""Work a run does not need is not done, and sampling is exactly what the flags say.

- objectives without a teacher (ce, none) load no teacher model and run no teacher forward;
- a model's generation_config.json (repetition penalty, suppressed tokens...) does not change the samples.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from unisd import config as cfg
from unisd import train as tr
from unisd.rollout import ignored_settings
from unisd.sequences import render


def _config(model: Path, data: Path, out: Path, preset: str = "", **kw) -> cfg.TrainConfig:
    plugins = tuple(kw.pop("plugins", ()))
    settings = dict(max_steps=1, batch_size=2, max_new_tokens=6, lr=1e-3) | kw
    return cfg.resolve(preset, plugins, {}, model=str(model), data=str(data), out=str(out), **settings)


def _teachers_seen(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []
    real = tr.forward
    monkeypatch.setattr(tr, "forward", lambda run, batch, teacher: seen.append(teacher) or real(run, batch, teacher))
    return seen


@pytest.mark.parametrize("preset", ["sft", "ssd"])
def test_ce_baselines_run_no_teacher_forward(tiny_model, tiny_data, tmp_path, monkeypatch, preset):
    seen = _teachers_seen(monkeypatch)
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", preset))
    assert not run.needs_teacher
    metrics = tr.step(run)
    assert seen == [None]
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0
    # SFT never loads the frozen initial model; SSD samples its targets from it, but scores nothing with it
    assert run.policy.loaded_initial == (preset == "ssd")


def test_ce_without_a_teacher_is_the_student_cross_entropy(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", "sft"))
    batch = tr.make_batch(run)
    tokens = torch.tensor([[40, 41, 42], [50, 51, 0]])
    batch.tokens, batch.mask = tokens, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = tr.forward(run, batch, None)
    assert set(out.logps) == {"student"} and set(out.hidden) == {"student"}
    for i, prompt in enumerate(batch.prompts["student"]):  # by hand: the model's logits on prompt + completion
        ids = render(run.tokenizer, prompt)
        n = int(batch.mask[i].sum())
        logits = run.policy.model(input_ids=torch.tensor([ids + tokens[i, :n].tolist()])).logits[0]
        logp = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + n].float(), -1)
        want = -logp.gather(-1, tokens[i, :n, None]).squeeze(-1)
        torch.testing.assert_close(out.divergence[i, :n], want, rtol=1e-4, atol=1e-5)
        assert out.divergence[i, n:].abs().sum() == 0


def test_a_plugin_that_reads_the_teacher_keeps_it_in_a_ce_run(tiny_model, tiny_data, tmp_path, monkeypatch):
    seen = _teachers_seen(monkeypatch)
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", plugins=("mix", "nll", "match")))
    assert run.config.divergence == "ce" and run.needs_teacher
    tr.step(run)
    assert seen and seen[0] is not None


def _with_generation_options(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    path = folder / "generation_config.json"
    stored = json.loads(path.read_text())
    stored |= {"repetition_penalty": 1.5, "suppress_tokens": list(range(40, 120)), "no_repeat_ngram_size": 2}
    path.write_text(json.dumps(stored))
    return folder


def test_sampling_ignores_the_models_generation_config(tiny_model, tiny_data, tmp_path, capsys):
    """Same seed, same samples and same step-1 loss with and without sampling options in generation_config.json."""
    odd = _with_generation_options(tiny_model, tmp_path / "odd")
    results = []
    for model in (tiny_model, odd):
        torch.manual_seed(0)
        run = tr.prepare(_config(model, tiny_data, tmp_path / f"out-{model.name}", max_new_tokens=12))
        prompts = [render(run.tokenizer, p) for p in ("What is two plus two?", "Name a colour.")]
        torch.manual_seed(1)
        drawn = run.policy.sample(prompts, 12, 0.7, 1.0)
        torch.manual_seed(2)
        results.append((drawn.tokens, tr.step(run)["loss"]))
    (plain_tokens, plain_loss), (odd_tokens, odd_loss) = results
    assert torch.equal(plain_tokens, odd_tokens)
    assert odd_loss == plain_loss
    told = [line for line in capsys.readouterr().out.splitlines() if "generation_config.json" in line]
    assert len(told) == 1  # said once, by the run on the odd model, naming what it ignores
    assert "repetition_penalty=1.5" in told[0] and "no_repeat_ngram_size=2" in told[0]


def test_ignored_settings_name_only_what_the_file_adds(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    assert ignored_settings(AutoModelForCausalLM.from_pretrained(tiny_model)) == {}
    odd = AutoModelForCausalLM.from_pretrained(_with_generation_options(tiny_model, tmp_path / "odd"))
    assert set(ignored_settings(odd)) == {"repetition_penalty", "suppress_tokens", "no_repeat_ngram_size"}
