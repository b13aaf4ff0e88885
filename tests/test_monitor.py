"""Collapse seen while training: rollout statistics per step, the truncation warning, samples.jsonl."""
from __future__ import annotations

import json

import pytest
import torch

from unisd import config as cfg
from unisd import monitor, train as tr


def _config(tiny_model, tiny_data, out, **kw) -> cfg.TrainConfig:
    settings = dict(max_steps=4, batch_size=2, max_new_tokens=6, lr=1e-3)
    settings.update(kw)
    return cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(out), **settings)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_repeated_share_is_one_minus_distinct_over_total_ngrams():
    assert monitor.repeated_share([1, 2, 3, 4, 5, 6, 7]) == 0.0           # 4 four-grams, all distinct
    assert monitor.repeated_share([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)  # 9 four-grams, 4 distinct
    assert monitor.repeated_share([7] * 10) == pytest.approx(1 - 1 / 7)   # 7 four-grams, one distinct
    assert monitor.repeated_share([1, 2, 3]) == 0.0                       # no four-gram at all
    assert monitor.repeated_share([1, 1, 2, 1, 1], n=2) == pytest.approx(1 - 3 / 4)


def test_rollout_stats_average_over_the_samples_up_to_each_length():
    tokens = torch.tensor([[5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 9, 9]])
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])  # the 9s of row 2 are padding
    stats = monitor.rollout_stats(tokens, mask)
    assert stats == {"completion_length": 5.0, "repeated_ngrams": pytest.approx((1 - 1 / 3 + 0.0) / 2)}


def test_truncation_watch_warns_once_after_three_steps_in_a_row():
    watch = monitor.TruncationWatch(max_new_tokens=96)
    said = [watch.update(share) for share in (0.5, 1.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0)]
    assert [i for i, line in enumerate(said) if line] == [5]
    line = said[5]
    assert line.startswith("warning: 100% of this step's completions hit the 96-token limit")
    for hint in ("--max-new-tokens", "--lr", "--skip-first-tokens", "--mask-truncated", "ema"):
        assert hint in line


def test_a_model_that_never_ends_its_samples_triggers_the_warning_once(tiny_model, tiny_data, tmp_path):
    said: list[str] = []
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run"), echo=said.append)
    metrics = _rows(out / "metrics.jsonl")
    assert [m["truncated"] for m in metrics] == [1.0] * 4  # random weights: no EOS within 6 tokens
    assert all(m["completion_length"] == 6.0 for m in metrics)
    assert all(0.0 <= m["repeated_ngrams"] < 1.0 for m in metrics)
    warnings = [line for line in said if line.startswith("warning:") and "limit" in line]
    assert len(warnings) == 1 and "100%" in warnings[0]

