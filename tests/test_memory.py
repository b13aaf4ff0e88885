"""`unisd train --dry-run`: the memory estimate from a model's config alone, checked against counts made by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from unisd import config as cfg
from unisd import memory
from unisd.cli import main

# Qwen2.5-7B-Instruct's config.json sizes (no weights: the estimate reads the config only)
QWEN_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
           "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


@pytest.fixture
def qwen_7b_config(tmp_path: Path) -> Path:
    folder = tmp_path / "qwen-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_7B))
    return folder


def _config(model: Path, **kw) -> cfg.TrainConfig:
    return cfg.resolve(kw.pop("preset", ""), tuple(kw.pop("plugins", ())), {}, model=str(model), data="x.jsonl",
                       out="unused", **kw)


def test_counts_match_the_loaded_model_and_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = memory.shape_of(_config(tiny_model, lora=True))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.linear == sum(m.weight.numel() for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert 8 * shape.lora == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_each_part_is_the_closed_form(tiny_model):
    shape = memory.shape_of(_config(tiny_model))
    P = shape.params
    sd = memory.estimate(_config(tiny_model), shape, 1)
    assert (sd["student weights (fp32)"], sd["gradients (fp32)"], sd["AdamW state (fp32)"], sd["frozen teacher"]) == \
        (4 * P, 4 * P, 8 * P, 4 * P)
    fast = memory.estimate(_config(tiny_model, bf16=True), shape, 1)
    assert fast["frozen teacher"] == 2 * shape.linear + 4 * (P - shape.linear)   # bf16 linear layers
    assert fast["bf16 sampling copy"] == 2 * P
    sharded = memory.estimate(_config(tiny_model, fsdp=True), shape, 4)
    assert sharded["AdamW state (fp32)"] == 2 * P and sharded["frozen teacher"] == P   # 1/4 of each per rank
    sft = memory.estimate(_config(tiny_model, preset="sft"), shape, 1)
    assert "frozen teacher" not in sft                           # cross-entropy on gold completions: no teacher
    star = memory.estimate(_config(tiny_model, preset="unisd-star"), shape, 1)
    assert "frozen teacher" not in star and star["EMA teacher"] == 4 * P
    lora = memory.estimate(_config(tiny_model, lora=True, lora_r=8), shape, 1)
    assert lora["AdamW state (fp32)"] == 8 * 8 * shape.lora and "frozen teacher" not in lora  # the adapter off


def test_dry_run_prints_the_estimate_and_the_flag_that_makes_it_fit(qwen_7b_config, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "missing.jsonl", "--out",
                                       str(out), "--dry-run", "--device-memory-gb", "80", "--bf16"])
    assert result.exit_code == 0, result.output
    assert "7.62 B parameters" in result.output
    assert "does not fit in 80 GB per device: add --lora" in result.output
    assert not out.exists()  # nothing loaded, nothing written
    fits = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", str(out),
                                     "--dry-run", "--device-memory-gb", "80", "--bf16", "--lora"])
    assert "fits in 80 GB per device" in fits.output


@pytest.mark.parametrize("args, message", [
    (["--device-memory-gb", "-3"], "error: Invalid value for '--device-memory-gb'"),
    (["--device-memory-gb", "nan"], "error: Invalid value for '--device-memory-gb'"),
    (["--world-size", "0"], "error: Invalid value for '--world-size'"),
])
def test_bad_dry_run_values_are_one_line(qwen_7b_config, args, message):
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", "o",
                                       "--dry-run", *args])
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1


def test_planning_flags_need_dry_run(qwen_7b_config):
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", "o",
                                       "--world-size", "8"])
    assert result.exit_code == 2 and "use them with --dry-run" in result.output
