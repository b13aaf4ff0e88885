"""`unisd inspect RUN`: the divergence report from what a run logged, checked by hand on written files and on a
tiny UniSD-style run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd import config as cfg
from unisd import divergence_report as dr
from unisd.cli import main
from unisd.train import train


def _write(run: Path, metrics: list[dict], samples: list[dict]) -> Path:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


def _sample(step: int, tokens: list[str], divergence: list[float | None], truncated: bool = False) -> dict:
    n = len(tokens)
    return {"step": step, "truncated": truncated, "length": n, "tokens": tokens, "token_divergence": divergence,
            "logp_student": [math.log(0.5)] * n, "logp_teacher": [math.log(0.25)] * n}


def test_shares_positions_and_end_probability_by_hand(tmp_path: Path) -> None:
    samples = [_sample(2, ["Wait", ",", "4", "<end>"], [3.0, 1.0, None, 2.0]),
               _sample(2, ["Wait", "4"], [1.0, 1.0], truncated=True)]
    shares = {r["token"]: r for r in dr.token_shares(samples)}
    assert shares["Wait"]["share"] == pytest.approx(4 / 8) and shares["Wait"]["count"] == 2
    assert shares["Wait"]["mean"] == pytest.approx(2.0) and "4" in shares and shares["4"]["count"] == 1
    positions = dr.by_position(samples)
    assert positions == [{"positions": "0-3", "tokens": 5, "mean": pytest.approx(8 / 5), "share": pytest.approx(1.0)}]
    ends = dr.end_probability(samples)  # the truncated sample did not end
    assert ends == [{"step": 2, "ended": 1, "student": pytest.approx(0.5), "teacher": pytest.approx(0.25)}]


def test_verdicts_say_when_a_mechanism_barely_acted(tmp_path: Path) -> None:
    metrics = [{"step": s, "loss": 1.0, "agree/removed": 0.0003, "clip/rate": 0.0, "contrast/share": 0.01,
                "ema/distance": 0.0 if s < 10 else 0.2} for s in range(1, 13)]
    verdicts = {r["metric"]: r["verdict"] for r in dr.mechanisms(metrics)}
    assert verdicts["agree/removed"].startswith("barely acted")
    assert verdicts["clip/rate"] == "never fired"
    assert verdicts["contrast/share"].endswith("barely acted")
    assert verdicts["ema/distance"] == "first moved at step 10 of 12"


def test_inspect_writes_the_report_of_a_tiny_run(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path / "cache"))
    config = cfg.resolve("", ("ema", "clip"), {"ema": {"every": "1"}}, model=str(tiny_model), data=str(tiny_data),
                         out=str(tmp_path / "run"), batch_size=2, max_new_tokens=6, max_steps=2, lr=1e-3, log_samples=1)
    run = train(config, echo=lambda m: None)
    shown = CliRunner().invoke(main, ["inspect", str(run)])
    assert shown.exit_code == 0, shown.output
    assert (run / "inspect.md").read_text() == shown.output.rstrip("\n") + "\n"
    assert (run / "inspect.png").stat().st_size > 0
    assert "| clip/rate |" in shown.output and "| ema/distance |" in shown.output
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    top = dr.token_shares(samples)[0]
    assert f"| {json.dumps(top['token'])} | {top['share']:.1%} |" in shown.output


def test_a_folder_without_metrics_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "empty")])
    assert shown.exit_code == 2 and shown.output.startswith("error:") and shown.output.count("\n") == 1


def test_the_summary_line_names_each_verdict(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", [{"step": 1, "loss": 1.0, "agree/removed": 0.0003, "clip/rate": 0.0}], [])
    line = dr.summary(run, "UniSD*")
    assert line.startswith("What UniSD*'s mechanisms did in this run: agree/removed barely acted")
    assert "clip/rate never fired" in line and line.count("\n") == 0
    assert dr.summary(_write(tmp_path / "plain", [{"step": 1, "loss": 1.0}], []), "SD") == \
        "SD: no mechanism metrics were logged."
