"""A run that says what it is doing where no progress bar shows: step lines, setup phases, bounded negatives."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from unisd import config as cfg
from unisd import progress
from unisd import train as tr
from unisd.data.prompts import TEACHER_TEMPLATE


def test_durations_read_as_seconds_minutes_or_hours():
    assert [progress.duration(s) for s in (0.4, 42, 59.6, 307, 3599, 7380)] == \
        ["0 s", "42 s", "1 min 00 s", "5 min 07 s", "59 min 59 s", "2 h 03 min"]


def test_a_line_every_n_steps_and_at_the_last_with_the_time_left_from_the_mean_step():
    log = progress.StepLog(every=2, total=5)
    rows = [{"step": s, "loss": 0.5 / s, "lr": 1e-3, "step_time_s": t} for s, t in zip(range(1, 6), (4, 2, 3, 3, 1))]
    lines = [log.line(row) for row in rows]
    assert lines == [None,
                     "step 2/5: loss 0.2500, lr 0.001, 2.00 s/step, 9 s left",   # mean 3 s x 3 steps to go
                     None,
                     "step 4/5: loss 0.1250, lr 0.001, 3.00 s/step, 3 s left",
                     "step 5/5: loss 0.1000, lr 0.001, 1.00 s/step, 0 s left"]  # the last, though 5 % 2
    assert progress.StepLog(every=0, total=5).line(rows[-1]) is None


def test_a_phase_says_what_it_starts_and_how_long_it_took(monkeypatch):
    readings = iter([10.0, 153.4])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(readings))
    said: list[str] = []
    with progress.phase("contrast: negatives for 96 examples", say=said.append):
        said.append("working")
    assert said == ["contrast: negatives for 96 examples ...", "working",
                    "contrast: negatives for 96 examples: done in 2 min 23 s"]


def _contrast_tokens(options: dict[str, str], run_tokens: int, monkeypatch) -> list[int]:
    """The token budget contrast's setup gives its negatives, for a run whose --max-new-tokens is `run_tokens`."""
    import unisd.generation as G
    import unisd_plugins.contrast as contrast
    from unisd.data import Example
    from unisd.plugin import configure

    asked: list[int] = []

    def build(policy, examples, seed, max_new_tokens, tries):
        asked.append(max_new_tokens)
        return contrast.Negatives([None] * len(examples))

    monkeypatch.setattr(contrast, "build_negatives", build)
    monkeypatch.setattr(G, "cached", lambda kind, key, make: make())
    monkeypatch.setattr(G, "model_digest", lambda policy: "w")
    plugin = contrast.Contrast(configure(contrast.Contrast, options, "contrast"))
    examples = [Example("What is 2 + 2?", "4", "two and two")]
    plugin.setup(SimpleNamespace(examples=examples, scheduled=lambda: [0], policy=None, tokenizer=None,
                                 config=SimpleNamespace(seed=0, model="m", max_prompt_tokens=64, max_new_tokens=run_tokens,
                                                        teacher_template=TEACHER_TEMPLATE)))
    return asked


def test_contrast_negatives_are_bounded_by_the_runs_own_length_unless_asked_otherwise(monkeypatch):
    assert _contrast_tokens({}, 96, monkeypatch) == [96]
    assert _contrast_tokens({"max_new_tokens": "1024"}, 96, monkeypatch) == [1024]


def _config(model, data, out, **kw) -> cfg.TrainConfig:
    return cfg.resolve("", (), {}, model=str(model), data=str(data), out=str(out), max_steps=2, batch_size=2,
                       max_new_tokens=8, lr=1e-3, **kw)


@pytest.mark.parametrize("terminal", [False, True])
def test_off_a_terminal_a_run_prints_its_steps_with_the_lr_each_step_used(tiny_model, tiny_data, tmp_path, monkeypatch,
                                                                          terminal):
    monkeypatch.setattr(progress, "bar_shows", lambda: terminal)
    said: list[str] = []
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", log_every=1), echo=said.append)
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-3, 5e-4])  # no warm-up in 2 steps: the cosine's start, then its midpoint
    steps = [line for line in said if line.startswith("step ")]
    if terminal:
        assert steps == []  # the bar shows it
    else:
        pattern = r"step {}/2: loss \d+\.\d{{4}}, lr {}, \d+\.\d\d s/step, \d+ s left"
        assert [bool(re.fullmatch(pattern.format(s, lr), line)) for s, lr, line in zip((1, 2), ("0.001", "0.0005"), steps)] \
            == [True, True] and len(steps) == 2
