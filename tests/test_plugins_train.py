"""The five mechanisms end to end on the tiny model: discovery, training combinations, EMA, errors, presets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unisd import config as cfg
from unisd import models
from unisd.plugin import PluginError, discover
from unisd.policy import Model
from unisd.train import prepare, step, train

FIVE = ("ema", "agree", "contrast", "match", "clip")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path_factory.getbasetemp() / "unisd-cache"))


def _config(model: Path, data: Path, out: Path, plugins: tuple[str, ...] = (), preset: str = "",
            options: dict | None = None, **settings) -> cfg.TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=2, max_new_tokens=8, max_steps=2,
                lr=1e-3)
    base.update(settings)
    return cfg.resolve(preset, plugins, options or {}, **base)


def test_unisd_plugins_lists_the_five_through_entry_points() -> None:
    found = discover()
    for name in FIVE:
        assert name in found and found[name].cls is not None, found.get(name)
        assert found[name].distribution == "unisd"
    listing = subprocess.run([sys.executable, "-m", "unisd", "plugins", "--json"], capture_output=True, text=True,
                             check=True).stdout
    names = {row["name"] for row in json.loads(listing)}
    assert set(FIVE) <= names


@pytest.mark.parametrize("plugins", [
    ("clip",), ("match",), ("agree",), ("contrast",), ("ema",),
    ("clip", "agree", "match"),
    FIVE,
])
def test_any_combination_trains(tiny_model: Path, tiny_data: Path, tmp_path: Path, plugins: tuple[str, ...]) -> None:
    options = {"ema": {"every": "1"}, "contrast": {"max_new_tokens": "8"}, "agree": {"k": "2"}}
    options = {k: v for k, v in options.items() if k in plugins}
    out = train(_config(tiny_model, tiny_data, tmp_path / "run", plugins, options=options), echo=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if "match" in plugins:
        assert "match" in rows[0]
    if "contrast" in plugins:
        assert "contrast" in rows[0] and "contrast/no_negative" in rows[0]
    if "agree" in plugins:
        assert 0 < rows[0]["agree/weight_mean"] < 1  # contexts disagree somewhere: weights below 1
    if "clip" in plugins:
        assert "clip/rate" in rows[0]


def test_unisd_star_preset_trains(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    c = _config(tiny_model, tiny_data, tmp_path / "star", preset="unisd-star",
                options={"contrast": {"max_new_tokens": "8", "tries": "1"}}, max_steps=1)
    assert c.plugins == FIVE and c.options["agree"]["gamma"] == 0.001 and c.options["clip"]["max"] == 10.0
    train(c, echo=lambda m: None)


@pytest.mark.parametrize("contexts", ["random", "retrieval", "induction"])
def test_agree_contexts_never_show_the_current_gold(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                    contexts: str) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "r", ("agree",),
                          options={"agree": {"contexts": contexts, "induction_tokens": "8"}}))
    agree = run.plugins[0]
    assert len(agree.contexts) == len(run.examples)
    for e, views in zip(run.examples, agree.contexts):
        assert len(views) == 3
        for v in views:
            assert v.endswith(e.prompt)
            if contexts != "induction":
                assert f"{e.prompt}\n\nSolved answer:" not in v   # its own solved copy is never a reference
    again = prepare(_config(tiny_model, tiny_data, tmp_path / "r2", ("agree",),
                            options={"agree": {"contexts": contexts, "induction_tokens": "8"}}))
    assert again.plugins[0].contexts == agree.contexts   # seeded (and cached)


def test_retrieval_finds_the_nearest_other_example() -> None:
    from unisd_plugins._contexts import retrieval_donors

    texts = ["what is two plus two", "what is two plus three", "name a dog breed", "name a cat breed"]
    assert [d[0] for d in retrieval_donors(texts, 1)] == [1, 0, 3, 2]


def test_agree_k1_is_a_clear_error() -> None:
    with pytest.raises(PluginError, match="agree.k must be at least 2"):
        cfg_plugins = discover()
        from unisd.plugin import load

        load(["agree"], {"agree": {"k": "1"}}, cfg_plugins)


def test_cli_reports_bad_options_in_one_line(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "unisd", "train", "--model", str(tiny_model), "--data", str(tiny_data),
                        "--out", str(tmp_path / "x"), "--plugins", "agree,clip", "-o", "agree.k=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "agree.k must be at least 2" in r.stderr and "Traceback" not in r.stderr


def _max_diff(a: Model, weights: dict[str, torch.Tensor]) -> float:
    return max(float((p - weights[n]).abs().max()) for n, p in a.weights())


def _effective(run) -> dict[str, torch.Tensor]:
    return {n: w.clone() for n, w in run.policy.student.weights()}


def _followed(run) -> dict[str, torch.Tensor]:
    """What an EMA average follows: the student's adapter factors under LoRA, else its effective weights."""
    if run.config.lora:
        return {n: p.detach().clone() for n, p in models.adapter_factors(run.policy.model, "default").items()}
    return _effective(run)


@pytest.mark.parametrize("lora", [False, True])
def test_ema_teacher_moves_toward_the_student(tiny_model: Path, tiny_data: Path, tmp_path: Path, lora: bool) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "e", ("ema",), options={"ema": {"every": "1", "beta": "0.5"}},
                          lora=lora, **({"lora_r": 4, "lora_alpha": 8} if lora else {}), lr=5e-2))
    ema = run.plugins[0]
    initial = {n: p.clone() for n, p in ema.average.own()}
    assert _max_diff(ema.average, _effective(run)) == 0.0       # θ̄ ← θ at setup
    assert step(run)["skipped"] is False
    student = _followed(run)
    held = dict(ema.average.own())
    assert max(float((held[n] - initial[n]).abs().max()) for n in held) > 0, \
        "the EMA teacher did not move (the official no-op under LoRA)"
    # θ̄ is exactly halfway between the initial and the current student (β = 0.5): weights, or factors under LoRA
    assert held.keys() == student.keys()
    for n, p in held.items():
        torch.testing.assert_close(p, 0.5 * initial[n] + 0.5 * student[n])
    assert step(run)["skipped"] is False
    before = _max_diff(ema.average, _effective(run))
    ema.update(run.policy, beta=0.0)
    assert before > 0 and _max_diff(ema.average, _effective(run)) == 0.0   # β = 0: teacher = student
    assert ema.teacher(run) is ema.average and not any(p.requires_grad for p in ema.average.parameters())


def test_ema_under_lora_resumes_exactly_from_its_saved_factors(tiny_model: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = lambda out: _config(tiny_model, tiny_data, out, ("ema",),  # noqa: E731
                                 options={"ema": {"every": "1", "beta": "0.5"}}, lora=True, lora_r=4, lora_alpha=8,
                                 lr=5e-2, max_steps=3, save_every=1, keep_checkpoints=5)
    reference = tmp_path / "reference"
    train(config(reference), echo=lambda m: None)
    cut = tmp_path / "cut"
    shutil.copytree(reference, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000003")
    for name in ("unisd.json", "model.safetensors"):
        (cut / name).unlink()
    train(config(cut), resume=True, echo=lambda m: None)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # step 3 scored by the restored teacher
    losses = [[json.loads(x)["loss"] for x in (f / "metrics.jsonl").read_text().splitlines()] for f in (reference, cut)]
    assert losses[0] == losses[1]
    assert sorted(p.name for p in (reference / "adapter").iterdir() if p.is_dir()) == []  # the student's adapter alone
    state = prepare(config(tmp_path / "fresh")).plugins[0].state_dict()["weights"]
    assert state and all("lora_" in n for n in state)  # the adapter's factors only, not a copy of the base


def test_ema_under_bf16_averages_in_fp32_and_scores_with_bf16_linear_layers(tiny_model: Path, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "e", ("ema",), options={"ema": {"every": "1", "beta": "0.5"}},
                          lr=5e-2, bf16=True))
    ema = run.plugins[0]
    initial = {n: p.detach().clone() for n, p in ema.average.model.named_parameters()}
    assert step(run)["skipped"] is False
    student = _effective(run)
    scorer = ema.teacher(run)
    assert scorer is not ema.average
    for n, p in ema.average.model.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, 0.5 * initial[n] + 0.5 * student[n])  # the average, unrounded
        held = dict(scorer.model.named_parameters())[n]  # linear layers in bf16, as autocast computes them; the rest fp32
        assert held.dtype == (torch.bfloat16 if n.endswith("proj.weight") else torch.float32)
        assert torch.equal(held, p.to(held.dtype))  # refreshed after the update


def test_ema_every_counts_optimizer_steps(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "e", ("ema",), options={"ema": {"every": "2"}}, lr=5e-2))
    ema = run.plugins[0]
    initial = {n: p.detach().clone() for n, p in ema.average.model.named_parameters()}
    step(run)
    assert _max_diff(ema.average, initial) == 0.0 and ema.updates == 0
    step(run)
    assert _max_diff(ema.average, initial) > 0 and ema.updates == 1


def test_ema_state_dict_round_trip(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "e", ("ema",), options={"ema": {"every": "1"}}, lr=5e-2))
    step(run)
    step(run)
    state = run.plugins[0].state_dict()
    saved = {k: v.clone() for k, v in state["weights"].items()}
    fresh = prepare(_config(tiny_model, tiny_data, tmp_path / "f", ("ema",), options={"ema": {"every": "1"}}))
    fresh.plugins[0].load_state_dict(state)
    for n, p in fresh.plugins[0].average.model.named_parameters():
        assert torch.equal(p, saved[n])
    assert fresh.plugins[0].updates == 2
    step(run)   # the saved state is a copy, not a view of the live teacher
    assert all(torch.equal(saved[k], v) for k, v in state["weights"].items())


def test_ema_resume_restores_the_teacher(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    options = {"ema": {"every": "1"}}
    out = tmp_path / "resume"
    train(_config(tiny_model, tiny_data, out, ("ema",), options=options, max_steps=1), echo=lambda m: None)
    from unisd import checkpoint

    run = prepare(_config(tiny_model, tiny_data, out, ("ema",), options=options, max_steps=2))
    teacher_before = {n: p.clone() for n, p in run.plugins[0].average.model.named_parameters()}
    assert checkpoint.restore(run, lambda m: None, extend=True)  # the schedule grows from 1 to 2 steps
    assert any(not torch.equal(p, teacher_before[n]) for n, p in run.plugins[0].average.model.named_parameters())


def test_contrast_counts_examples_without_negative(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "c", ("contrast",),
                          options={"contrast": {"max_new_tokens": "6", "tries": "1"}}))
    negatives, drawn = run.plugins[0].negatives, run.scheduled()
    assert len(negatives) == len(run.examples)
    assert all(negatives[i] is None for i in range(len(negatives)) if i not in drawn)  # never drawn: none made
    missing = sum(negatives[i] is None for i in drawn)
    warned = f"{missing} of {len(drawn)} examples have no verified-wrong negative" in capsys.readouterr().err
    assert warned == (missing > 0)  # a count when some are missing, silence otherwise
    assert all(neg is None or neg.strip().lower() != e.answer.strip().lower()
               for e, neg in zip(run.examples, negatives))


def test_match_repr_sets_the_objective_to_none_whatever_the_order(tiny_model: Path, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    # repr is a declared objective (--divergence none), not a token_loss that zeroes D behind clip's back:
    # clip sees the same all-zero objective in either order, and the loss is the feature term alone
    def run_of(plugins: tuple[str, ...]) -> tuple[str, dict[str, float]]:
        run = prepare(_config(tiny_model, tiny_data, tmp_path / "-".join(plugins), plugins,
                              options={"match": {"mode": "repr"}, "clip": {"quantile": "0.5"}}))
        return run.config.divergence, step(run)

    for plugins in (("match", "clip"), ("clip", "match")):
        divergence, metrics = run_of(plugins)
        assert divergence == "none"
        assert metrics["clip/rate"] == 0.0 and metrics["distill"] == 0.0
        assert metrics["loss"] == pytest.approx(metrics["match"]) and metrics["match"] > 0.0


