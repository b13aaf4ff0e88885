"""Baseline presets: each trains on the tiny model and shows the property that defines it."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from unisd import config as cfg
from unisd import train as tr
from unisd.data.prompts import demonstration


def _run(tiny_model, tiny_data, tmp_path, preset: str, **kw):
    settings = dict(max_steps=2, batch_size=2, max_new_tokens=8, lr=1e-3)
    settings.update(kw)
    return cfg.resolve(preset, (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / preset),
                       **settings)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_never_samples_and_minimises_nll_of_the_gold_demonstration(tiny_model, tiny_data, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("sft must not call generate")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", forbidden)
    config = _run(tiny_model, tiny_data, tmp_path, "sft")
    run = tr.prepare(config, echo=lambda m: None)
    batch = tr.make_batch(run)
    rollout = run.plugins[0].completions(batch, run)
    first = batch.examples[0]
    expected = run.tokenizer(demonstration(first), add_special_tokens=False)["input_ids"] + [run.tokenizer.eos_token_id]
    n = int(rollout.mask[0].sum())
    assert rollout.tokens[0, :n].tolist() == expected[:8]
    out = tr.train(config, echo=lambda m: None)
    m = _metrics(out)
    assert len(m) == 2 and all(x["loss"] > 0 for x in m)


def test_sft_loss_is_the_cross_entropy(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_run(tiny_model, tiny_data, tmp_path, "sft", max_new_tokens=64), echo=lambda m: None)
    batch = tr.make_batch(run)
    rollout = run.plugins[0].completions(batch, run)
    batch.tokens, batch.mask, batch.truncated = rollout.tokens, rollout.mask, rollout.truncated
    out = tr.forward(run, batch, run.teacher)
    nll = run.plugins[1].token_loss(out.divergence, out)
    # reference: the model's own cross-entropy on [student prompt ; demonstration]
    ex = batch.examples[0]
    prompt = tr.render(run.tokenizer, ex.prompt)
    target = rollout.tokens[0, : int(rollout.mask[0].sum())].tolist()
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    ref = run.student(input_ids=ids, labels=labels).loss
    n = len(target)
    torch.testing.assert_close(nll[0, :n].mean(), ref, rtol=1e-4, atol=1e-5)


def test_ssd_targets_come_from_the_frozen_base_model(tiny_model, tiny_data, tmp_path, monkeypatch):
    import unisd_plugins.mix as mix

    used = []
    real = mix.sample

    def spy(model, *a, **k):
        used.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(mix, "sample", spy)
    monkeypatch.setattr(tr, "sample", lambda *a, **k: pytest.fail("ssd must not sample from the student"))
    config = _run(tiny_model, tiny_data, tmp_path, "ssd")
    run = tr.prepare(config, echo=lambda m: None)
    for _ in range(2):
        tr.step(run)
    assert used and all(m is run.teacher for m in used)  # the frozen copy, never the trained student
    assert all(not p.requires_grad for p in run.teacher.parameters())
    assert run.config.plugins == ("mix", "nll")


def test_gkd_uses_dataset_completions_with_probability_one_minus_lambda(tiny_model, tiny_data, tmp_path):
    config = _run(tiny_model, tiny_data, tmp_path, "gkd")
    assert (config.divergence, config.alpha, config.temperature, config.loss_temperature) == ("jsd", 0.5, 0.9, 1.0)
    run = tr.prepare(config, echo=lambda m: None)
    mix = run.plugins[0]
    draws = [mix.completions(tr.make_batch(run), run) is not None for _ in range(400)]
    assert 0.42 < sum(draws) / len(draws) < 0.58  # 1 - lambda = 0.5
    out = tr.train(_run(tiny_model, tiny_data, tmp_path / "g", "gkd"), echo=lambda m: None)
    assert len(_metrics(out)) == 2


def test_sdft_and_sd_settings(tiny_model, tiny_data, tmp_path):
    sdft = _run(tiny_model, tiny_data, tmp_path, "sdft")
    assert (sdft.divergence, sdft.alpha, sdft.temperature, sdft.plugins) == ("jsd", 0.5, 1.0, ())
    sd = _run(tiny_model, tiny_data, tmp_path, "sd")
    assert (sd.divergence, sd.plugins) == ("fkl", ())
    for config in (sdft, sd):
        assert len(_metrics(tr.train(config, echo=lambda m: None))) == 2


def test_opsd_teacher_is_the_current_student(tiny_model, tiny_data, tmp_path):
    config = _run(tiny_model, tiny_data, tmp_path, "opsd")
    assert config.divergence == "rkl"
    run = tr.prepare(config, echo=lambda m: None)
    tr.step(run)
    teacher = run.plugins[0].teacher(run)
    student = dict(run.student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, student[name]), name


def test_flags_override_preset_settings(tiny_model, tiny_data, tmp_path):
    config = _run(tiny_model, tiny_data, tmp_path, "gkd", alpha=0.2)
    assert config.alpha == 0.2 and config.divergence == "jsd"
