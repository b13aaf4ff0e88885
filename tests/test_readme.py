"""Every command and option the README and the docs pages show exists and parses; the README's plugin example works."""
from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.doc_examples import PAGE_PATHS, ROOT, blocks, shell_lines
from unisd import config as cfg
from unisd import plugin
from unisd.cli import main

README = (ROOT / "README.md").read_text()
PAGES = [path.read_text() for path in PAGE_PATHS]  # the hand-written pages


def _blocks(language: str, text: str = README) -> list[str]:
    return blocks(text, language)


def _commands(pages: list[str]) -> list[list[str]]:
    """Shell commands of the pages' sh blocks, continuation lines joined, env assignments dropped."""
    out = []
    for line in (line for page in pages for b in blocks(page, "sh") for line in shell_lines(b)):
        words = shlex.split(line.replace('"$(unisd tasks-path)"', "TASKS"))
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words.pop(0)
        out.append(words)
    return out


COMMANDS = _commands(PAGES)


def _unisd_args(words: list[str]) -> list[str] | None:
    if words[0] == "unisd":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "unisd":  # torchrun ... -m unisd train ...
        return words[words.index("-m") + 2:]
    return None


UNISD = [args for w in COMMANDS if (args := _unisd_args(w)) is not None]


def test_the_readme_shows_the_main_commands():
    shown = {args[0] for w in _commands([README]) if (args := _unisd_args(w)) is not None}
    assert {"train", "eval", "compare", "ablate"} <= shown


def test_quickstart_is_the_demo_then_the_tests_and_ci_runs_the_second():
    quickstart = README.split("## Quickstart", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert quickstart.splitlines() == ["python3 dev.py demo", "python3 dev.py tests"]
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert "python3 dev.py tests" in ci  # the README's test command, whatever else CI runs around it


@pytest.mark.parametrize("args", UNISD, ids=[" ".join(a)[:60] for a in UNISD])
def test_unisd_command_parses_with_every_option(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for word in args:  # inputs the command checks for existence (compare's saved results)
        if word.endswith(".json"):
            Path(word).parent.mkdir(parents=True, exist_ok=True)
            Path(word).write_text("{}")
    with main.make_context("unisd", list(args)) as ctx:
        name, command, rest = main.resolve_command(ctx, list(args))
        params = command.make_context(name, rest, parent=ctx).params
    if name == "train":  # the preset, the plugins and every -o option resolve and type-check
        names = tuple(n for n in params["plugins"].split(",") if n)
        run_only = ("plugins", "preset", "options", "resume", "overwrite", "extend", "report_to", "dry_run",
                    "device_memory_gb", "world_size")
        settings = {k: v for k, v in params.items() if k not in run_only}
        config = cfg.resolve(params["preset"], names, plugin.parse_overrides(params["options"]), **settings)
        plugin.load(list(config.plugins), config.options)


def test_lm_eval_commands_use_real_flags_and_tasks():
    from lm_eval.tasks import TaskManager

    from unisd.evaluate import tasks_path

    help_text = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--help"], capture_output=True,
                               text=True).stdout
    manager = TaskManager(include_path=str(tasks_path()), include_defaults=False)
    shown = [w for w in COMMANDS if w[0] == "lm_eval"]
    assert shown
    for words in shown:
        for flag in (w for w in words if w.startswith("--")):
            assert flag in help_text, flag
        for task in words[words.index("--tasks") + 1].split(","):
            assert task in manager.all_tasks, task


def test_install_and_tox_lines_point_at_real_things():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    for words in COMMANDS:
        if words[:2] == ["pip", "install"]:
            for target in words[2:]:
                if target.startswith("-e"):
                    continue
                extras = re.match(r"^\.\[(.*)\]$", target)
                if extras:
                    assert set(extras.group(1).split(",")) <= set(project["optional-dependencies"])
                elif target.startswith("./"):
                    assert (ROOT / target / "pyproject.toml").is_file()
        if words[0] == "tox" or words[:2] == ["python3", "dev.py"]:
            assert f"testenv:{words[2]}" in tox.sections()


def test_the_plugin_example_is_a_working_plugin():
    [example] = [b for b in _blocks("python") if "class SurprisalGate" in b]
    namespace: dict = {}
    exec(example, namespace)
    gate = namespace["SurprisalGate"](namespace["SurprisalGate"].Config(keep=0.5))
    assert isinstance(gate, plugin.Plugin)

    class Out:
        logps = {"student": torch.tensor([[-0.1, -2.0, -0.5, -3.0]])}
        mask = torch.ones(1, 4)

    assert gate.weights(Out()).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    Out.mask = torch.zeros(1, 4)  # --mask-truncated left every completion out: no quantile of nothing
    assert gate.weights(Out()).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    hook = example[example.index("    def weights"):]
    assert hook in (ROOT / "docs" / "plugins.md").read_text()  # the docs' copy has the same guard
