"""--teacher MODEL: a separate frozen teacher of another size, with the student's tokenizer, shown the teacher
prompt; a tokenizer that differs is refused before anything loads, and so is a combination that would ignore it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd import config as cfg
from unisd import memory
from unisd.cli import main
from unisd.train import prepare, train


@pytest.fixture(scope="module")
def wide_teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model_builder) -> Path:
    """Twice the student's width, the student's tokenizer, its embeddings padded by 16 rows (as Qwen2.5's sizes
    differ while their tokenizer is one)."""
    folder = tiny_model_builder(tmp_path_factory.mktemp("wide-teacher"), seed=5, hidden=64,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(model.config.vocab_size + 16)
    model.save_pretrained(folder)
    return folder


def _config(model: Path, data: Path, out: Path, teacher: Path, **settings) -> cfg.TrainConfig:
    return cfg.resolve("", tuple(settings.pop("plugins", ())), {}, model=str(model), data=str(data), out=str(out),
                       batch_size=2, max_new_tokens=5, max_steps=2, lr=1e-3, teacher=str(teacher), **settings)


@pytest.mark.parametrize("lora", [False, True])
def test_a_teacher_of_another_size_teaches(tiny_model: Path, wide_teacher: Path, tiny_data: Path, tmp_path: Path,
                                           lora: bool) -> None:
    config = _config(tiny_model, tiny_data, tmp_path / "run", wide_teacher, lora=lora, plugins=("clip",))
    run = prepare(config, echo=lambda m: None)
    teacher = run.policy.initial
    assert teacher.model.config.hidden_size == 64 and teacher.model is not run.policy.model
    assert not any(p.requires_grad for p in teacher.parameters())
    out = train(config, echo=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in rows)
    assert json.loads((out / "unisd.json").read_text())["config"]["teacher"] == str(wide_teacher)


def test_a_teacher_with_another_tokenizer_is_one_line(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                      tiny_model_builder) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(["<extra-token>"])
    other = tiny_model_builder(tmp_path / "other", tokenizer=tokenizer)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                       "--teacher", str(other), "--max-steps", "1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: --teacher {other}: its tokenizer differs") and "vocabulary" in result.output
    assert not out.exists()


def test_combinations_that_would_ignore_the_teacher_are_refused(tiny_model: Path, wide_teacher: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="ema's teacher is an average of the student"):
        _config(tiny_model, tiny_data, tmp_path / "a", wide_teacher, plugins=("ema",))
    with pytest.raises(cfg.ConfigError, match="the match plugin compares them"):
        prepare(_config(tiny_model, tiny_data, tmp_path / "b", wide_teacher, plugins=("match",)), echo=lambda m: None)


def test_the_dry_run_counts_the_teacher_model(tiny_model: Path, wide_teacher: Path) -> None:
    plain = cfg.resolve("", (), {}, model=str(tiny_model), data="x.jsonl", out="unused")
    taught = cfg.resolve("", (), {}, model=str(tiny_model), data="x.jsonl", out="unused", teacher=str(wide_teacher))
    shape, teacher = memory.shape_of(plain), memory.shape_of(cfg.resolve("", (), {}, model=str(wide_teacher),
                                                                          data="x.jsonl", out="unused"))
    assert memory.estimate(plain, shape, 1, "cpu")["frozen teacher"] == 4 * shape.params
    assert memory.estimate(taught, shape, 1, "cpu")["frozen teacher"] == 4 * teacher.params > 4 * shape.params
    lora = cfg.resolve("", (), {}, model=str(tiny_model), data="x.jsonl", out="unused", teacher=str(wide_teacher),
                       lora=True)
    assert memory.estimate(lora, shape, 1, "cpu")["frozen teacher"] == 4 * teacher.params  # not the adapter-off student
