"""Baseline presets: each trains on the tiny model and shows the property that defines it."""
from __future__ import annotations

import json

import torch
import transformers

from unisd import config as cfg
from unisd import policy as P
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
    out = tr.forward(run, batch, run.policy.initial)
    nll = run.plugins[1].token_loss(out.divergence, out)
    # reference: the model's own cross-entropy on [student prompt ; demonstration]
    ex = batch.examples[0]
    prompt = tr.render(run.tokenizer, ex.prompt)
    target = rollout.tokens[0, : int(rollout.mask[0].sum())].tolist()
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    ref = run.policy.model(input_ids=ids, labels=labels).loss
    n = len(target)
    torch.testing.assert_close(nll[0, :n].mean(), ref, rtol=1e-4, atol=1e-5)


def test_ssd_targets_come_from_the_frozen_base_model(tiny_model, tiny_data, tmp_path, monkeypatch):
    used, forms = [], []
    real_draw, real_sample = P.rollout.sample, P.Policy.sample
    monkeypatch.setattr(P.rollout, "sample", lambda model, *a, **k: used.append(model) or real_draw(model, *a, **k))
    monkeypatch.setattr(P.Policy, "sample", lambda self, *a, **k: forms.append(k.get("initial", False))
                        or real_sample(self, *a, **k))
    config = _run(tiny_model, tiny_data, tmp_path, "ssd")
    run = tr.prepare(config, echo=lambda m: None)
    for _ in range(2):
        tr.step(run)
    assert forms and all(forms)  # every draw from the initial model, never from the trained student
    assert used and all(m is run.policy.initial.model for m in used)  # the frozen copy
    assert all(not p.requires_grad for p in run.policy.initial.parameters())
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


def test_sdft_teacher_is_an_ema_of_the_student_updated_every_step(tiny_model, tiny_data, tmp_path):
    config = _run(tiny_model, tiny_data, tmp_path, "sdft")
    # forward KL (the authors, SDFT issue 5) with the reference main.py's 3 skipped completion tokens
    assert (config.divergence, config.temperature, config.top_p, config.top_k, config.loss_temperature,
            config.skip_first_tokens) == ("fkl", 1.0, 1.0, 0, 1.0, 3)
    run = tr.prepare(config, echo=lambda m: None)
    before = {n: p.detach().clone() for n, p in run.policy.model.named_parameters()}
    tr.step(run)
    ema = run.plugins[0]
    assert ema.teacher(run) is ema.average and ema.updates == 1
    after = dict(run.policy.model.named_parameters())
    moved = False
    for name, p in ema.average.model.named_parameters():  # phi <- 0.01 * theta + 0.99 * phi, phi starting at theta_0
        torch.testing.assert_close(p, 0.99 * before[name] + 0.01 * after[name].detach(), rtol=0, atol=1e-6)
        moved = moved or not torch.equal(p, before[name])
    assert moved


def test_sd_is_plain_forward_kl_to_the_frozen_initial_model(tiny_model, tiny_data, tmp_path):
    sd = _run(tiny_model, tiny_data, tmp_path, "sd")
    assert (sd.divergence, sd.plugins, sd.temperature, sd.top_k) == ("fkl", (), 0.7, 0)
    assert len(_metrics(tr.train(sd, echo=lambda m: None))) == 2


def _spy_on_sampling(module, monkeypatch) -> list[tuple]:
    """Record (temperature, top_p, top_k) of every `sample` call made through `module`."""
    calls: list[tuple] = []
    real = module.sample

    def spy(model, tokenizer, prompts, max_new_tokens, temperature, top_p, **kw):
        calls.append((temperature, top_p, kw.get("top_k")))
        return real(model, tokenizer, prompts, max_new_tokens, temperature, top_p, **kw)

    monkeypatch.setattr(module, "sample", spy)
    return calls


def test_opsd_samples_with_its_truncation_and_keeps_the_initial_model_as_teacher(tiny_model, tiny_data, tmp_path,
                                                                                monkeypatch):
    config = _run(tiny_model, tiny_data, tmp_path, "opsd")
    # forward KL after the authors' ablation (OPSD issue 14) and the gradient-norm cap of OPSD issue 17
    assert (config.divergence, config.loss_temperature, config.max_grad_norm, config.plugins) == ("fkl", 1.1, 0.1, ())
    calls = _spy_on_sampling(P.rollout, monkeypatch)
    run = tr.prepare(config, echo=lambda m: None)
    initial = {n: p.detach().clone() for n, p in run.policy.model.named_parameters()}
    tr.step(run)
    assert calls == [(1.1, 0.95, 20)]
    teacher = dict(run.policy.initial.model.named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in initial.items())                  # frozen
    assert any(not torch.equal(p, initial[n]) for n, p in run.policy.model.named_parameters())  # the student moved


def test_ssd_samples_at_its_training_temperature_and_truncation(tiny_model, tiny_data, tmp_path, monkeypatch):
    calls = _spy_on_sampling(P.rollout, monkeypatch)
    run = tr.prepare(_run(tiny_model, tiny_data, tmp_path, "ssd"), echo=lambda m: None)
    tr.step(run)
    assert calls == [(0.6, 0.95, 20)]


def test_top_k_one_samples_the_greedy_continuation(tiny_model):
    from unisd import models
    from unisd.rollout import sample

    model = models.load_model(str(tiny_model)).eval()
    tok = models.load_tokenizer(str(tiny_model))
    prompts = [tr.render(tok, "What is two plus two?"), tr.render(tok, "Name a colour of the sky.")]
    torch.manual_seed(0)
    sampled = sample(model, tok, prompts, 6, temperature=5.0, top_p=1.0, top_k=1)   # hot, but only one candidate
    for row, prompt in enumerate(prompts):
        greedy = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=6,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):]
        n = int(sampled.mask[row].sum())
        assert sampled.tokens[row, :n].tolist() == greedy[:n].tolist()


BASELINES = ("sft", "sdft", "gkd", "ssd", "opsd", "sd")
SOURCE_OF = {"divergence": "divergence", "alpha": "divergence", "temperature": "sampling", "top_p": "sampling",
             "top_k": "sampling", "loss_temperature": "loss temperature", "skip_first_tokens": "skipped tokens",
             "max_grad_norm": "gradient-norm cap"}


def test_every_baseline_cites_a_source_for_each_defining_setting():
    for name in BASELINES:
        preset = cfg.PRESETS[name]
        assert {"teacher", "divergence", "sampling", "on-policy fraction"} <= set(preset.sources), name
        for setting in preset.settings:  # every trainer setting a baseline changes says where it comes from
            assert SOURCE_OF[setting] in preset.sources, f"{name}.{setting}"
    for name, preset in cfg.PRESETS.items():  # Raw is the untrained base model, never a preset
        assert "Raw" not in preset.description + preset.source + "".join(preset.sources.values()), name


def test_presets_command_prints_each_setting_with_its_source():
    from click.testing import CliRunner

    from unisd.cli import main

    out = CliRunner().invoke(main, ["presets"]).output
    assert "ref_model_mixup_alpha 0.01" in out and "--fixed_teacher" in out and "deviation:" in out
    for cited in ("Self-Distillation/issues/5", "num_loss_tokens_to_skip=3", "OPSD/issues/14", "--max_grad_norm 0.1"):
        assert cited in out, cited
    blocks: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            blocks[line.split(":", 1)[0]] = []
        elif line:
            blocks[next(reversed(blocks))].append(line.strip().split(":", 1)[0])
    for name in BASELINES:  # each baseline's block gives every source it has, by setting
        assert {"source", *cfg.PRESETS[name].sources} <= set(blocks[name]), name


def test_flags_override_preset_settings(tiny_model, tiny_data, tmp_path):
    config = _run(tiny_model, tiny_data, tmp_path, "gkd", alpha=0.2)
    assert config.alpha == 0.2 and config.divergence == "jsd"
