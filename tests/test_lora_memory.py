"""`--dry-run` under --lora: the frozen base held in bf16 with --bf16 (only the adapter in fp32) and an EMA teacher the
size of the adapter (a second adapter on the same base), so 7B UniSD* fits one 80 GB GPU with room to spare."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd import config as cfg
from unisd import memory
from unisd.cli import main

@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_7b_unisd_star_with_lora_and_bf16_needs_at_most_48_gb(qwen_7b_config: Path, tmp_path: Path, rollout: str) -> None:
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "demo", "--preset", "unisd-star",
                                       "--lora", "--bf16", "--batch-size", "4", "--max-new-tokens", "1024",
                                       "--rollout", rollout, "--dry-run", "--device-memory-gb", "80",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    total = float(re.search(r"peak\s+([\d.]+) GB", result.output).group(1))
    assert total <= 48.0, result.output
    assert "fits in 80 GB per device" in result.output


def test_under_lora_the_base_is_bf16_and_the_ema_teacher_is_adapter_sized(tiny_model: Path) -> None:
    config = cfg.resolve("unisd-star", (), {}, model=str(tiny_model), data="x.jsonl", out="unused", lora=True, lora_r=8,
                         bf16=True)
    shape = memory.shape_of(config)
    P, adapter = shape.params, 8 * shape.lora
    parts = memory.estimate(config, shape, 1)
    base = 2 * shape.linear + 4 * (P - shape.linear)  # models.bf16_linears: linear layers bf16, the rest fp32
    assert parts["student weights (bf16 base, fp32 adapter)"] == base + 4 * adapter
    assert parts["EMA teacher"] == 4 * adapter       # its own factors only, in fp32
    assert "bf16 sampling copy" not in parts         # the bf16 base samples itself
    fp32 = memory.estimate(cfg.resolve("unisd-star", (), {}, model=str(tiny_model), data="x.jsonl", out="unused",
                                       lora=True, lora_r=8), shape, 1, device="cpu")
    assert fp32["student weights (fp32)"] == 4 * P + 4 * adapter and fp32["EMA teacher"] == 4 * adapter


def test_the_adapter_of_a_multimodal_checkpoint_is_counted_on_its_language_model(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

    from unisd import models

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).save_pretrained(tmp_path)
    config = cfg.resolve("", (), {}, model=str(tmp_path), data="x.jsonl", out="unused", lora=True, lora_r=8)
    wrapped = models.add_lora(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)), 8, 16, 0.0)
    assert 8 * memory.shape_of(config).lora == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
