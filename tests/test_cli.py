"""The command line: bad input is refused with one line and exit status 2, and nothing is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd.cli import main

GOOD = '''
from dataclasses import dataclass
from unisd.plugin import Plugin

class Good(Plugin):
    @dataclass(frozen=True)
    class Config:
        steps: int = 2
'''


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")} if folder.exists() else {}


def _case(tmp_path: Path, tiny_model: Path, tiny_data: Path, case: str) -> tuple[list[str], str, Path]:
    """(arguments, expected message, output folder) for one bad input."""
    out = tmp_path / "out"
    base = ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out), "--max-steps", "1"]

    def data(text: str) -> str:
        p = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.jsonl"
        p.write_text(text)
        return str(p)

    def with_data(path: str) -> list[str]:
        return ["train", "--model", str(tiny_model), "--data", path, "--out", str(out)]

    if case == "finished":
        out.mkdir()
        (out / "unisd.json").write_text("{}")
    if case == "unfinished":
        (out / "checkpoints").mkdir(parents=True)
    if case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "out-is-file":
        out.write_text("a file")
    nomodel = tmp_path / "empty-model"
    nomodel.mkdir()
    cases = {
        "unknown-plugin": (base + ["--plugins", "nope"], "unknown plugin 'nope'"),
        "broken-plugin": (base + ["--plugins", "broken"], "plugin 'broken' from bad-dist failed to load"),
        "unknown-option": (base + ["--plugins", "good", "-o", "good.nope=1"], "unknown option good.nope"),
        "badly-typed-option": (base + ["--plugins", "good", "-o", "good.steps=two"], "expected int"),
        "option-syntax": (base + ["--plugins", "good", "-o", "good"], "expected plugin.option=value"),
        "option-unselected": (base + ["-o", "good.steps=3"], "not among the selected plugins"),
        "unknown-preset": (base + ["--preset", "nope"], "unknown preset 'nope'"),
        "missing-data": (with_data(str(tmp_path / "missing.jsonl")), "no such file"),
        "bad-json": (with_data(data('{"prompt": "a", "answer": "b"}\n{oops\n')), ":2: not valid JSON"),
        "missing-field": (with_data(data('{"prompt": "a"}\n')), ":1: missing field 'answer'"),
        "empty-file": (with_data(data("")), "no examples"),
        "not-an-object": (with_data(data('["a", "b"]\n')), "expected a JSON object"),
        "non-string-field": (with_data(data('{"prompt": "a", "answer": true}\n')), "field 'answer' must be"),
        "empty-prompt": (with_data(data('{"prompt": " ", "answer": "b"}\n')), "field 'prompt' is empty"),
        "model-folder-without-config": (["train", "--model", str(nomodel), "--data", str(tiny_data), "--out", str(out)],
                                        "without config.json"),
        "missing-gguf": (["train", "--model", str(tmp_path / "m.gguf"), "--data", str(tiny_data), "--out", str(out)],
                         "no such GGUF file"),
        "batch-size": (base + ["--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
        "jsd-alpha": (base + ["--divergence", "jsd", "--alpha", "1.5"], "'--alpha': 1.5 is not in the range 0<x<1"),
        "lr": (base + ["--lr", "-1"], "'--lr': -1.0 is not in the range x>0"),
        "max-new-tokens": (base + ["--max-new-tokens", "0"], "'--max-new-tokens': 0 is not in the range x>=1"),
        "prompts-too-long": (base + ["--max-prompt-tokens", "2"], "every prompt is longer than --max-prompt-tokens 2"),
        "out-is-file": (base, "is not a folder"),
        "finished": (base, "holds a finished run; pass --overwrite"),
        "unfinished": (base, "holds an unfinished run; pass --resume"),
        "foreign": (base, "holds no unisd run"),
        "resume-and-overwrite": (base + ["--resume", "--overwrite"],
                                 "error: --resume and --overwrite contradict each other; pick one"),
        "fsdp-one-process": (base + ["--fsdp"], "launch with torchrun"),
    }
    args, message = cases[case]
    return args, message, out


CASES = ["unknown-plugin", "broken-plugin", "unknown-option", "badly-typed-option", "option-syntax",
         "option-unselected", "unknown-preset", "missing-data", "bad-json", "missing-field", "empty-file",
         "not-an-object", "non-string-field", "empty-prompt", "model-folder-without-config", "missing-gguf",
         "batch-size", "jsd-alpha", "lr", "max-new-tokens", "prompts-too-long", "out-is-file", "finished",
         "unfinished", "foreign", "resume-and-overwrite", "fsdp-one-process"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tiny_model, tiny_data, plugin_dist):
    plugin_dist("bad-dist", {"good": "cli_good_mod:Good", "broken": "no_such_module:Plugin"}, {"cli_good_mod": GOOD})
    args, message, out = _case(tmp_path, tiny_model, tiny_data, case)
    before = _snapshot(out) if out.is_dir() else None
    existed = out.exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("warning:", "Loading"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert out.exists() == existed
    if before is not None:
        assert _snapshot(out) == before


def test_plugins_command_lists_broken_ones(plugin_dist):
    plugin_dist("bad-dist", {"good": "cli_good_mod:Good", "broken": "no_such_module:Plugin"}, {"cli_good_mod": GOOD})
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0
    listed = {p["name"]: p for p in json.loads(result.output)}
    assert listed["good"]["options"] == {"steps": 2} and listed["good"]["error"] is None
    assert listed["good"]["distribution"] == "bad-dist" and listed["good"]["version"] == "0.0.1"
    assert "ModuleNotFoundError" in listed["broken"]["error"]
    text = CliRunner().invoke(main, ["plugins"]).output
    assert "good  (bad-dist 0.0.1)" in text and "error: ModuleNotFoundError" in text


def test_train_cli_writes_a_model(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                       "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "unisd.json").is_file()
    again = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                      "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--overwrite"])
    assert again.exit_code == 0, again.output


def test_tasks_path_points_at_the_task_folder():
    result = CliRunner().invoke(main, ["tasks-path"])
    assert result.exit_code == 0
    assert (Path(result.output.strip()) / "__init__.py").is_file()
