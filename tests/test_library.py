"""The library API: `from unisd import TrainConfig, train, evaluate`; the docs' example (docs/training.md) runs as written."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import unisd
import unisd.evaluate
import unisd.train
from unisd.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "training.md").read_text()
SECTION = PAGE[PAGE.index("## Config files and the Python API"):]
[YAML_EXAMPLE] = re.findall(r"```yaml\n(.*?)```", SECTION[:SECTION.index("\n### ", 5)], flags=re.S)
[PYTHON_EXAMPLE] = re.findall(r"```python\n(.*?)```", SECTION[:SECTION.index("\n### ", 5)], flags=re.S)


def test_the_names_are_the_trainer_and_the_evaluator() -> None:
    assert unisd.TrainConfig is TrainConfig
    from unisd import evaluate, train

    assert train is unisd.train and evaluate is unisd.evaluate  # the modules, callable as their functions
    assert unisd.train.prepare is not None  # still the module: `from unisd import train as tr; tr.prepare`
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        unisd.nope  # noqa: B018


def test_importing_unisd_and_its_config_names_loads_no_torch() -> None:
    code = "import sys, unisd; from unisd import TrainConfig, load_config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_calling_the_modules_calls_their_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unisd.train, "train", lambda config, **kw: ("trained", config, kw))
    monkeypatch.setattr(unisd.evaluate, "evaluate", lambda *a, **kw: ("scored", a, kw))
    assert unisd.train("c", resume=True) == ("trained", "c", {"resume": True})
    assert unisd.evaluate({"x": "m"}, ["t"], "o") == ("scored", ({"x": "m"}, ["t"], "o"), {})


def test_the_readme_example_runs_as_written(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNISD_DATA_DIR", str(ROOT / "tests" / "fixtures"))
    settings = yaml.safe_load(YAML_EXAMPLE)
    assert settings["model"] == "smollm2-135m"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**settings, "model": str(tiny_model)}))  # the tiny model
    (tmp_path / "train.jsonl").write_text(tiny_data.read_text())
    printed: list = []
    exec(PYTHON_EXAMPLE, {"print": printed.append})
    run = json.loads((tmp_path / "runs" / "y" / "unisd.json").read_text())["config"]
    assert (run["plugins"], run["options"], run["seed"], run["max_steps"]) == (["ema", "clip"], {"clip": {"max": 5.0}},
                                                                             1, 2)
    again = json.loads((tmp_path / "runs" / "again" / "unisd.json").read_text())
    assert again["config"]["model"] == "runs/y" and again["steps"] == 1
    [scores] = printed
    assert set(scores) == {"y", "again"} and all("unisd_demo" in s for s in scores.values())
    assert (tmp_path / "eval" / "table.md").is_file()
