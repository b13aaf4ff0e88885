"""One data set per comparison: which examples a run trains on, and in what order, never depends on its plugins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unisd import config as cfg
from unisd.train import prepare, train
from unisd_plugins._contexts import pick_fitting

FILLER = "Background: fish live in water and the sky scatters blue light. " * 6


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path_factory.getbasetemp() / "unisd-cache"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _long_rows() -> list[dict]:
    # on the tiny tokenizer: student prompt ~285 tokens, teacher ~400, an agree context ~765
    return [{"prompt": f"{FILLER}Question {i}: what is {i} plus {i}?", "answer": str(2 * i),
             "rationale": f"{i} and {i} make {2 * i}", "task_id": f"q{i}"} for i in range(6)]


def _config(model: Path, data: Path, out: Path, preset: str, **settings) -> cfg.TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=2, max_new_tokens=4, lr=1e-3,
                max_prompt_tokens=450)
    base.update(settings)
    options = {"contrast": {"max_new_tokens": "4", "tries": "1"}} if preset == "unisd-star" else {}
    return cfg.resolve(preset, (), options, **base)


def test_sd_and_unisd_star_train_on_the_same_order_when_agree_contexts_would_not_fit(tiny_model, tmp_path):
    data = _write(tmp_path / "long.jsonl", _long_rows())
    records = {}
    for preset in ("sd", "unisd-star"):
        out = train(_config(tiny_model, data, tmp_path / preset, preset), echo=lambda m: None)
        records[preset] = json.loads((out / "unisd.json").read_text())
    sd, star = records["sd"], records["unisd-star"]
    assert sd["steps"] == star["steps"] == 3                       # one pass over all 6 examples, batch 2
    assert sd["data"] == star["data"]
    assert sd["data"]["order_count"] == 6 and sd["data"]["examples"] == 6
    rows = [json.loads(x) for x in (tmp_path / "unisd-star" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["agree/no_context"] == 1.0 and r["agree/removed"] == 0.0 for r in rows)  # handled inside agree


def test_order_sha256_depends_on_seed_and_schedule_not_plugins(tiny_model, tiny_data, tmp_path):
    from unisd.train import data_order

    def order(preset: str, **kw):
        run = prepare(_config(tiny_model, tiny_data, tmp_path / f"{preset}-{kw}", preset, max_steps=5, **kw),
                      echo=lambda m: None)
        return data_order(run)

    plain = order("sd")
    assert order("gkd") == plain and order("clip") == plain and order("agree-tok") == plain
    assert plain["order_count"] == 5 * 2
    assert order("sd", seed=7)["order_sha256"] != plain["order_sha256"]
    assert order("sd", grad_accum=2)["order_count"] == 20


def test_pick_fitting_takes_the_next_nearest_that_fits() -> None:
    fits = lambda text: len(text) <= 3  # noqa: E731
    assert pick_fitting(["aaaa", "b", "cccc", "d", "e"], 2, fits) == ["b", "d"]
    assert pick_fitting(["aaaa", "b"], 3, fits) == ["b", "b", "b"]      # fewer fit than k: cycled
    assert pick_fitting(["aaaa", "bbbb"], 2, fits) == []                # none fits: the plugin decides


def test_agree_contexts_are_compact_and_fit(tiny_model, tmp_path):
    # five short examples and one whose solved answer is too long to show as a reference
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(5)]
    rows.append({"prompt": "What is 4 plus 4 plus a long story?", "answer": "8 " + FILLER * 3})
    data = _write(tmp_path / "mixed.jsonl", rows)
    run = prepare(cfg.resolve("", ("agree",), {"agree": {"contexts": "retrieval", "k": "2"}}, model=str(tiny_model),
                              data=str(data), out=str(tmp_path / "a"), max_prompt_tokens=300), echo=lambda m: None)
    agree = run.plugins[0]
    assert run.kept == [0, 1, 2, 3, 4]                           # the long one is dropped by its own prompts only
    from unisd.sequences import render
    for i in run.kept:
        assert len(agree.contexts[i]) == 2
        for context in agree.contexts[i]:
            assert len(render(run.tokenizer, context)) <= 300
            assert "long story" not in context                   # the too-long donor gave way to the next one


def test_a_contrast_negative_too_long_for_the_limit_is_unused_not_the_example(tiny_model, tmp_path, monkeypatch):
    import unisd_plugins.contrast as contrast

    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(4)]
    data = _write(tmp_path / "short.jsonl", rows)
    demos = ["5", FILLER * 2, "7", None]   # the second would push its teacher view past the limit
    monkeypatch.setattr(contrast, "build_negatives", lambda *a, **k: contrast.Negatives(demos, cut_off=1))
    run = prepare(cfg.resolve("", ("contrast",), {"contrast": {"tries": "1"}}, model=str(tiny_model), data=str(data),
                              out=str(tmp_path / "c"), max_prompt_tokens=300), echo=lambda m: None)
    assert run.kept == [0, 1, 2, 3]
    assert run.plugins[0].negatives == ["5", None, "7", None]
