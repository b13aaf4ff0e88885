"""--resume recognises the same run whatever the spelling of its plugin options (their typed values decide) and
of its model folder (where it is decides)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from unisd import config as cfg
from unisd.train import train


def _config(model: Path, data: Path, out: Path, overrides=None, file=None) -> cfg.TrainConfig:
    return cfg.resolve("", ("clip",), overrides or {}, file, model=str(model), data=str(data), out=str(out),
                       max_steps=2, batch_size=2, max_new_tokens=4, save_every=1)


def test_an_option_written_differently_resumes_the_same_run(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model, tiny_data, out, {"clip": {"max": "10"}}), echo=lambda m: None)  # -o clip.max=10
    for same in ({"overrides": {"clip": {"max": "10.0"}}},            # -o clip.max=10.0
                 {"file": {"options": {"clip": {"max": 10}}}},         # a YAML file's `max: 10`
                 {}):                                                  # the option's default, 10.0
        (out / "unisd.json").unlink()
        said: list[str] = []
        train(_config(tiny_model, tiny_data, out, **same), resume=True, echo=said.append)
        assert "resumed at step 2 of 2" in said, same


def test_the_model_folder_written_another_way_resumes_the_same_run(tiny_model, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(out), max_steps=1,
                         batch_size=2, max_new_tokens=4, save_every=1)
    train(config, echo=lambda m: None)
    (out / "unisd.json").unlink()
    monkeypatch.chdir(tiny_model.parent)
    said: list[str] = []
    train(dataclasses.replace(config, model=f"./{tiny_model.name}/"), resume=True, echo=said.append)
    assert "resumed at step 1 of 1" in said
