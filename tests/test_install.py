"""A plain `pip install unisd` (no extra) into a fresh virtual environment runs the promised commands.

`unisd train` (one LoRA step on a tiny model), `unisd eval --backend hf` and lm-eval's own
`lm_eval --model hf --model_args pretrained=<run>` (and `peft=<run>/adapter`) on the result: every package
they import must come with the install (lm-eval's HF backend needs accelerate and peft, its `hf` extra).
Marker `install`, not in the default run: `tox -e install` (`python3 dev.py install`), a few minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk: pip must never fetch a CUDA one


def _run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with unisd installed from this checkout, no extras, no editable link."""
    folder = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
    (folder / "constraints.txt").write_text(TORCH + "\n")
    pip = [str(folder / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(folder / "constraints.txt")]
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([*pip, str(ROOT)], environ, folder)
    return folder / "venv"


def test_train_eval_and_lm_eval_run_from_a_bare_install(venv: Path, tiny_model: Path, tiny_data: Path,
                                                        tiny_task_writer, tmp_path: Path) -> None:
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               UNISD_DATA_DIR=str(FIXTURES), UNISD_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    where = _run([str(bin_ / "python"), "-c", "import unisd, torch; print(unisd.__file__, torch.__version__)"], env, tmp_path)
    assert str(venv) in where and "+cpu" in where  # the installed copy, not this checkout; the CPU torch
    run = tmp_path / "run"
    _run([str(bin_ / "unisd"), "train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(run),
          "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "8", "--lora", "--lora-r", "4"], env, tmp_path)
    assert json.loads((run / "unisd.json").read_text())["steps"] == 1
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4

    _run([str(bin_ / "unisd"), "eval", "--backend", "hf", "--model", f"run={run}", "--tasks", "unisd_cose",
          "--limit", "2", "--max-gen-toks", "8", "--out", str(tmp_path / "eval")], env, tmp_path)
    assert "unisd_cose" in json.loads((tmp_path / "eval" / "results.json").read_text())["scores"]["run"]

    rows = [{"question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1, "prompt": "Hi", "answer": "4"}]
    (tmp_path / "tasks").mkdir()
    tasks = tiny_task_writer(tmp_path / "tasks", rows, "tiny")
    for name, model_args in [("merged", f"pretrained={run},dtype=float32"),
                             ("adapter", f"pretrained={tiny_model},peft={run / 'adapter'},dtype=float32")]:
        _run([str(bin_ / "lm_eval"), "--model", "hf", "--model_args", model_args, "--tasks", "tiny_mc",
              "--include_path", str(tasks), "--device", "cpu", "--output_path", str(tmp_path / name)], env, tmp_path)
        [result] = (tmp_path / name).rglob("results_*.json")
        assert "acc,none" in json.loads(result.read_text())["results"]["tiny_mc"]
