"""The docs' generated tables are up to date: a changed flag, preset, plugin or result file fails here until
`python docs/generate.py` is run; and the generator copes with whatever bench/results/ holds."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()


def test_the_committed_tables_are_what_the_generator_writes_now():
    made = generate.pages()
    pages = [*DOCS.glob("*.md"), generate.BENCH_README]
    stale = [page.name for page in pages if generate.inline(page.read_text(), made) != page.read_text()]
    assert not stale, f"stale generated tables in {stale}; run: python docs/generate.py"


def test_the_readme_combinations_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- combinations:begin -->" in readme
    assert generate.readme(readme) == readme, "run: python docs/generate.py"


def test_every_generated_table_is_inline_in_exactly_one_page_and_no_page_includes_a_file():
    pages = {p.name: p.read_text() for p in [*DOCS.glob("*.md"), generate.BENCH_README]}
    regions = [m for text in pages.values() for m in re.findall(r"<!-- generated:([\w.-]+):begin -->\n", text)]
    assert sorted(regions) == sorted(name.removesuffix(".md") for name in generate.pages())
    assert not [name for name, text in pages.items() if "--8<--" in text]  # GitHub shows an include as a bare line


def test_the_flag_table_lists_every_trainer_flag():
    from unisd.config import TrainConfig

    table = generate.flags("train")
    for name, f in TrainConfig.__dataclass_fields__.items():
        if "flag" in f.metadata:
            assert f"`--{name.replace('_', '-')}" in table, name


def test_every_config_file_key_is_a_flag_in_the_table():
    from unisd.config import TrainConfig

    flags = set(re.findall(r"--[\w-]+", generate.flags("train")))
    for name in TrainConfig.__dataclass_fields__:  # a --config file takes exactly these keys
        assert ("--option" if name == "options" else f"--{name.replace('_', '-')}") in flags, name


def test_the_combinations_table_says_what_the_config_checks(monkeypatch):
    from unisd.config import ConfigError, TrainConfig

    text = generate.combinations()
    assert "no (" not in text and text.count("yes") == 16  # today every pair combines, --fsdp included
    checks = TrainConfig.__post_init__

    def refusing(self):  # as if a pair were refused again: the table says so and quotes the reason
        checks(self)
        if self.fsdp and self.lora:
            raise ConfigError("--fsdp and --lora cannot be combined")

    monkeypatch.setattr(TrainConfig, "__post_init__", refusing)
    text = generate.combinations()
    row = next(line for line in text.splitlines() if line.startswith("| `--fsdp`"))
    assert row.startswith("| `--fsdp` | no (1)") and "1. --fsdp and --lora cannot be combined" in text


def test_results_render_whatever_files_are_there(tmp_path):
    assert "No result files" in generate.results(tmp_path / "absent")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(
        {"command": "python -m bench x", "git_sha": "abc", "scores": {"base": {"unisd_demo": 14.0}},
         "ci95": {"base": {"unisd_demo": [9.0, 19.0]}}}))
    (tmp_path / "step.json").write_text(json.dumps(  # the shape `python -m bench step` writes
        {"cells": [{"precision": "fp32", "batch": 4, "completion": 64, "medians": {"sd": {"step_time_s": 11.5}},
                    "ratios": {"unisd-star/sd step": 1.25}}], "table": "| case | step s |\n|---|---|\n| sd | 11.50 |",
         "rounds": 2}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(
        {"command": "python -m bench y", "git_sha": "def", "runs": {"x": {"deep": [1]}}, "seconds": 731.0,
         "training_s": {"sft": 58.7}, "truncated": [0.25, 0.5]}))
    (tmp_path / "b" / "table.md").write_text("# The report\n\n| run | score |\n|---|---|\n| x | 35.0 |\n")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "odd.json").write_text(json.dumps({"cells": "not a list", "n": 3}))
    text = generate.results(tmp_path)
    assert "14.0 [9.0, 19.0]" in text  # the score table, from unisd.report
    assert "| sd | 11.50 |" in text and "| fp32 | 4 | 64 | 1.25 |" in text and "| `rounds` | 2 |" in text
    assert "#### The report" in text and "| x | 35.0 |" in text  # the benchmark's own report, under the section
    assert "| `seconds` | 731 |" in text and "| `training_s.sft` | 58.7 |" in text and "| `truncated` | 0.25, 0.5 |" in text
    assert "deep" not in text
    assert "not readable as JSON" in text
    assert "`n` | 3" in text
    assert text.count("provenance incomplete: no command and no commit") == 2  # step.json, odd.json


def test_the_seeded_study_table_shows_each_seed_the_mean_and_both_paired_differences(tmp_path):
    assert "Not run yet" in generate.seeded_study(tmp_path / "absent.json")

    def test(diff, low, high):
        return {"Overall": {"difference": diff, "ci95": [low, high]}}

    items = lambda *scores: {"t": {str(i): s for i, s in enumerate(scores)}}  # noqa: E731
    result = {"command": "unisd ablate --seeds 2", "tasks": ["t"], "overall": {"base": 25.0, "sd": 62.5},
              "overall_ci95": {"base": [1.0, 70.0], "sd": [20.0, 90.0]},
              "items": {"base": items(0, 1, 0, 0)},
              "seeded_items": {"base": [items(0, 1, 0, 0)], "sd": [items(1, 1, 0, 0), items(1, 1, 1, 0)]},
              "paired": {"sd": {"base": test(37.5, 5.0, 70.0)}, "base": {"sd": test(-37.5, -70.0, -5.0)}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    rows = generate.seeded_study(path).splitlines()
    assert rows[2] == "| base |  | 25.0 [1.0, 70.0] |  | -37.5 [-70.0, -5.0] ↓ |"
    assert rows[3] == "| sd | 50.0, 75.0 | 62.5 [20.0, 90.0] | +37.5 [+5.0, +70.0] ↑ |  |"
    assert "(4 items)" in rows[5] and "`unisd ablate --seeds 2`" in rows[5]
