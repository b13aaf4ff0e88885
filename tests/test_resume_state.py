"""What the collapse warning and the EMA metric remember survives a resume; gold completions are no collapse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from unisd import config as cfg
from unisd import monitor
from unisd.train import train


def _config(model: Path, data: Path, out: Path, max_steps: int, **kw) -> cfg.TrainConfig:
    preset, plugins, options = kw.pop("preset", ""), kw.pop("plugins", ()), kw.pop("options", {})
    return cfg.resolve(preset, plugins, options, model=str(model), data=str(data), out=str(out), max_steps=max_steps,
                       batch_size=2, max_new_tokens=6, save_every=1, keep_checkpoints=5, lr=1e-2, **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cut_back_to(out: Path, step: int) -> None:
    """As if the run had been killed just after the checkpoint of `step`."""
    for folder in (out / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > step:
            shutil.rmtree(folder)
    (out / "unisd.json").unlink()


def test_the_truncation_streak_continues_after_a_resume(tiny_model, tiny_data, tmp_path):
    # random weights never end within 6 tokens: every step is fully truncated, the warning is due at step 3
    out = tmp_path / "run"
    train(_config(tiny_model, tiny_data, out, 2), echo=lambda m: None)
    (out / "unisd.json").unlink()
    said: list[str] = []
    train(_config(tiny_model, tiny_data, out, 3), resume=True, extend=True, echo=said.append)
    assert [m["truncated"] for m in _rows(out / "metrics.jsonl")] == [1.0] * 3
    assert sum(line.startswith("warning:") and "limit" in line for line in said) == 1


def test_the_ema_distance_is_logged_alike_after_a_resume(tiny_model, tiny_data, tmp_path):
    kw = {"plugins": ("ema",), "options": {"ema": {"every": "1"}}}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(_config(tiny_model, tiny_data, whole, 3, **kw), echo=lambda m: None)
    shutil.copytree(whole, cut)
    _cut_back_to(cut, 2)
    train(_config(tiny_model, tiny_data, cut, 3, **kw), resume=True, echo=lambda m: None)
    expected = [m["ema/distance"] for m in _rows(whole / "metrics.jsonl")]
    assert expected[2] > 0
    assert [m["ema/distance"] for m in _rows(cut / "metrics.jsonl")] == expected


def test_cut_gold_demonstrations_do_not_warn_of_collapse(tiny_model, tmp_path):
    data = tmp_path / "long.jsonl"  # demonstrations far longer than --max-new-tokens: every one is cut
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "answer": " ".join(map(str, range(40)))}) + "\n"
                            for i in range(4)))
    said: list[str] = []
    out = train(_config(tiny_model, data, tmp_path / "sft", 4, preset="sft"), echo=said.append)
    metrics = _rows(out / "metrics.jsonl")
    assert [m["truncated"] for m in metrics] == [1.0] * 4 and [m["student_sampled"] for m in metrics] == [0.0] * 4
    assert not [line for line in said if "collapsing" in line]


def test_the_watch_counts_the_students_own_samples_only():
    watch = monitor.TruncationWatch(max_new_tokens=8)
    steps = [{"student_sampled": s, "student_truncated": t} for s, t in
             [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5), (0.0, 0.0), (1.0, 0.75)]]  # gold steps in between
    said = [watch.update(monitor.own_truncated_share(m)) for m in steps]
    assert [i for i, line in enumerate(said) if line] == [4]
    assert watch.state_dict() == {"streak": 3, "warned": True}
