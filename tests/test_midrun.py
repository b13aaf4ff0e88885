"""--eval-every: the run scores itself while it trains (lm-eval, as unisd eval does) without changing what it
trains: the same weights as a run without evaluation, an exact resume, and --keep-best's copy in DIR/best."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from unisd import config as cfg
from unisd.cli import main
from unisd.train import train


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path_factory.getbasetemp() / "unisd-cache"))


def _config(model: Path, data: Path, out: Path, **settings) -> cfg.TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=2, max_new_tokens=4, max_steps=3, lr=1e-2,
                seed=4, save_every=1, keep_checkpoints=2)
    return cfg.resolve("", ("clip",), {}, **{**base, **settings})


EVAL = dict(eval_every=2, eval_tasks="unisd_demo", eval_limit=2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_evaluating_changes_nothing_the_run_trains(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    plain = train(_config(tiny_model, tiny_data, tmp_path / "plain"), echo=lambda m: None)
    said: list[str] = []
    scored = train(_config(tiny_model, tiny_data, tmp_path / "scored", keep_best="unisd_demo", **EVAL), echo=said.append)
    a, b = _weights(plain), _weights(scored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _rows(scored)
    assert [("eval/unisd_demo" in r) for r in rows] == [False, True, True]  # every 2nd step and the last
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(plain)]
    assert any(line.startswith("step 2: eval/unisd_demo ") for line in said)
    best = json.loads((scored / "best" / "unisd.json").read_text())
    assert best["best"]["task"] == "unisd_demo" and best["best"]["step"] in (2, 3)
    assert (scored / "best" / "model.safetensors").is_file()


def test_a_run_that_scores_itself_resumes_exactly(tiny_model: Path, tiny_data: Path, tmp_path: Path, cut_back) -> None:
    whole = train(_config(tiny_model, tiny_data, tmp_path / "whole", **EVAL), echo=lambda m: None)
    cut_back(whole, tmp_path / "cut")
    resumed = train(_config(tiny_model, tiny_data, tmp_path / "cut", **EVAL), resume=True, echo=lambda m: None)
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("eval/unisd_demo") for r in _rows(whole)] == [r.get("eval/unisd_demo") for r in _rows(resumed)]


@pytest.mark.parametrize("args, message", [
    (["--eval-every", "2"], "--eval-every needs --eval-tasks"),
    (["--eval-every", "2", "--eval-tasks", "unisd_demo", "--keep-best", "unisd_mbpp"], "--keep-best unisd_mbpp needs"),
])
def test_incomplete_evaluation_flags_are_one_line(tiny_data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["train", "--model", "smollm2-135m", "--data", str(tiny_data), "--out",
                                       str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and result.output.startswith(f"error: {message}") and result.output.count("\n") == 1
