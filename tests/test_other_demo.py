"""The other-demonstration control (`donor` plugin, `other-demo` preset): the teacher sees another example's
demonstration, never the example's own, and otherwise trains exactly as plain SD."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unisd import config as cfg
from unisd.data import Example
from unisd.data.prompts import demonstration, teacher_prompt
from unisd.train import make_batch, prepare, train
from unisd_plugins.donor import donors

ROWS = [
    {"prompt": "What is two plus two?", "answer": "4", "rationale": "two and two make four"},
    {"prompt": "What is two plus two, again?", "answer": "4", "rationale": "two and two make four"},  # duplicate demo
    {"prompt": "Name a colour of the sky.", "answer": "blue"},
    {"prompt": "Which animal barks?", "answer": "dog"},
    {"prompt": "What is one plus one?", "answer": "2", "rationale": "one and one make two"},
    {"prompt": "Where do fish live?", "answer": "in water"},
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path_factory.getbasetemp() / "unisd-cache"))


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _config(model: Path, data: Path, out: Path, preset: str, options: dict | None = None) -> cfg.TrainConfig:
    return cfg.resolve(preset, (), options or {}, model=str(model), data=str(data), out=str(out), batch_size=3,
                       max_new_tokens=6, max_steps=2, lr=1e-3, seed=3)


def test_a_donor_never_repeats_the_examples_own_demonstration() -> None:
    examples = [Example(r["prompt"], r["answer"], r.get("rationale", "")) for r in ROWS]
    ranked = [[1, 2], [0, 3], [3], [0], [1], [0]]  # 0 and 1 share a demonstration: each skips the other
    chosen = donors(examples, ranked, lambda e, d: True)
    assert chosen == [2, 3, 3, 0, 1, 0]
    assert donors(examples, [[1]] + ranked[1:], lambda e, d: True)[0] is None  # only a duplicate left: none
    assert donors(examples, ranked, lambda e, d: d.answer != "blue")[0] is None  # the one left does not fit


@pytest.mark.parametrize("pick", ["random", "retrieval"])
def test_the_teacher_prompt_holds_another_demonstration(tiny_model: Path, tmp_path: Path, pick: str) -> None:
    config = _config(tiny_model, _data(tmp_path), tmp_path / "run", "other-demo", {"donor": {"pick": pick}})
    run = prepare(config, echo=lambda m: None)  # runs the plugins' setup
    plugin = run.hooks.plugins[0]
    for i, e in enumerate(run.examples):
        d = plugin.donor[i]
        assert d is not None and d != i
        assert demonstration(run.examples[d]) != demonstration(e)
    batch = make_batch(run)
    shown = run.hooks.views(batch)["teacher"]
    for e, i, prompt in zip(batch.examples, batch.indices, shown):
        assert prompt != teacher_prompt(e, template=config.teacher_template)  # never the gold demonstration
        assert prompt == teacher_prompt(e, demonstration(run.examples[plugin.donor[i]]), template=config.teacher_template)


def test_the_control_trains_the_same_data_order_as_plain_sd(tiny_model: Path, tmp_path: Path) -> None:
    data = _data(tmp_path)
    runs = {p: train(_config(tiny_model, data, tmp_path / p, p), echo=lambda m: None) for p in ("sd", "other-demo")}
    records = {p: json.loads((out / "unisd.json").read_text()) for p, out in runs.items()}
    assert records["sd"]["data"]["order_sha256"] == records["other-demo"]["data"]["order_sha256"]
    assert records["other-demo"]["config"]["plugins"] == ["donor"]
    rows = {p: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for p, out in runs.items()}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows["other-demo"])
    assert rows["other-demo"][0]["donor/no_donor"] == 0.0
    # the same first sample (same seed, same student) scored by a teacher shown other demonstrations
    assert rows["sd"][0]["loss"] != rows["other-demo"][0]["loss"]


def test_an_example_without_a_donor_gets_no_weight(tiny_model: Path, tmp_path: Path) -> None:
    same = [{"prompt": f"Question {i}?", "answer": "4"} for i in range(4)]  # every demonstration is the same
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in same))
    run = prepare(_config(tiny_model, data, tmp_path / "run", "other-demo"), echo=lambda m: None)
    plugin = run.hooks.plugins[0]
    assert plugin.donor == [None] * 4
    batch = make_batch(run)
    assert run.hooks.views(batch)["teacher"] == batch.prompts["student"]  # scored without the gold answer


def test_ablate_adds_the_control_row_to_any_plan() -> None:
    from unisd.ablation_plan import plan

    runs = plan(("ema", "agree"), "pairs", [], ("other-demo",), {})
    assert [r.name for r in runs][-1] == "preset:other-demo"
    assert runs[-1].preset == "other-demo" and runs[0].name == "sd"
