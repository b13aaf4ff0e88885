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



def test_samples_jsonl_agrees_with_the_metrics_of_its_step(tiny_model, tiny_data, tmp_path):
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", log_samples=2), echo=lambda m: None)
    samples, metrics = _rows(out / "samples.jsonl"), {m["step"]: m for m in _rows(out / "metrics.jsonl")}
    assert [s["step"] for s in samples] == [2, 2, 4, 4]  # every 2nd step, both prompts of the micro-batch
    for s in samples:
        assert set(s) == {"step", "prompt", "completion", "truncated", "length", "divergence_mean", "divergence_max",
                          "tokens", "token_divergence", "logp_student", "logp_teacher"}
        assert s["prompt"] and s["completion"] and s["truncated"] is True and s["length"] == 6
        assert 0.0 <= s["divergence_mean"] <= s["divergence_max"]
        assert len(s["tokens"]) == len(s["token_divergence"]) == len(s["logp_teacher"]) == s["length"]
        assert sum(s["token_divergence"]) / s["length"] == pytest.approx(s["divergence_mean"], rel=1e-5)
        assert max(s["token_divergence"]) == pytest.approx(s["divergence_max"])
        assert all(lp <= 0 for lp in s["logp_student"] + s["logp_teacher"])
    for step in (2, 4):  # no plugin, one micro-batch of 2: the loss is the mean of the two samples' token means
        rows = [s for s in samples if s["step"] == step]
        assert sum(s["divergence_mean"] for s in rows) / 2 == pytest.approx(metrics[step]["distill"], rel=1e-5)
        assert sum(s["length"] for s in rows) / 2 == metrics[step]["completion_length"]
        assert sum(s["truncated"] for s in rows) / 2 == metrics[step]["truncated"]


def test_at_most_four_samples_a_step_and_none_with_zero(tiny_model, tiny_data, tmp_path):
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "six", batch_size=6, max_steps=1, log_samples=1),
                   echo=lambda m: None)
    assert len(_rows(out / "samples.jsonl")) == 4
    off = tr.train(_config(tiny_model, tiny_data, tmp_path / "off", max_steps=2, log_samples=0), echo=lambda m: None)
    assert not (off / "samples.jsonl").exists()


def test_masked_completions_have_no_divergence_to_report(tiny_model, tiny_data, tmp_path):
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", max_steps=1, log_samples=1, mask_truncated=True),
                   echo=lambda m: None)
    samples = _rows(out / "samples.jsonl")
    assert samples and all(s["divergence_mean"] is None and s["divergence_max"] is None for s in samples)


def test_resume_drops_the_samples_of_steps_run_again_and_may_change_log_samples(tiny_model, tiny_data, tmp_path):
    import shutil

    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", save_every=2, log_samples=1), echo=lambda m: None)
    first = _rows(out / "samples.jsonl")
    assert [s["step"] for s in first] == [1, 1, 2, 2, 3, 3, 4, 4]
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if stopped after the checkpoint of step 2
    (out / "unisd.json").unlink()
    tr.train(_config(tiny_model, tiny_data, out, save_every=2, log_samples=2), resume=True, echo=lambda m: None)
    again = _rows(out / "samples.jsonl")
    assert [s["step"] for s in again] == [1, 1, 2, 2, 4, 4]  # steps 3-4 rerun once, now every 2nd step logged
    assert again[4:] == first[6:]  # an exact resume samples the same completions


def test_plot_puts_length_and_truncated_share_beside_the_loss(tmp_path):
    from unisd import report

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "distill": 0.9 / s, "truncated": s / 4, "completion_length": 10.0 * s,
             "repeated_ngrams": 0.1, "step_time_s": 1.0} for s in range(1, 5)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = report.training_curves(metrics, tmp_path / "curves.png")
    assert keys[:3] == ["loss", "completion_length", "truncated"] and "repeated_ngrams" in keys
