"""The README's plugin and preset tables say what `unisd plugins --json` and `unisd presets` say.

The tables restate options, defaults and preset settings for readers; these checks make a change to a
plugin's Config or to a preset fail here until the README follows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd import config as cfg
from unisd.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_after(heading: str, first_column: str) -> list[list[str]]:
    """Rows (cells, stripped) of the first table under `heading` whose header starts with `first_column`."""
    section = README.split(f"\n{heading}\n", 1)[1]
    for block in re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M):
        header, _, *rows = block.strip().splitlines()
        if header.strip("| ").startswith(first_column):
            return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    raise AssertionError(f"no table starting with {first_column!r} under {heading!r}")


def _same(readme_value: str, default: object) -> bool:
    first = readme_value.split("\\|")[0].strip()
    if default is None:
        return first == "none"
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(first) == pytest.approx(float(default))
    return first == str(default)


def test_plugin_table_lists_every_option_with_its_default():
    found = {p["name"]: p for p in json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)}
    rows = _table_after("## Plugins", "plugin")
    assert rows, "the plugin table is empty"
    for name_cell, _, options_cell in rows:
        name = name_cell.strip("`")
        assert name in found and not found[name]["error"], name
        shown = dict(re.findall(r"`(\w+)` ([^,]+?)(?:,|$)", options_cell))
        assert set(shown) == set(found[name]["options"]), name
        for option, value in shown.items():
            assert _same(value, found[name]["options"][option]), f"{name}.{option}: README {value}"


def test_preset_tables_name_every_preset_and_its_settings():
    listed = [line.split(":", 1)[0] for line in CliRunner().invoke(main, ["presets"]).output.splitlines()
              if line and not line.startswith(" ")]
    assert listed == list(cfg.PRESETS)
    rows = _table_after("## Presets", "preset")
    named = [n for row in rows for n in re.findall(r"`([\w-]+)`", row[0])]
    assert sorted(named) == sorted(listed)
    star = next(row for row in rows if row[0] == "`unisd-star`")
    values = {float(v) for opts in cfg.PRESETS["unisd-star"].options.values() for v in opts.values()
              if isinstance(v, (int, float))}
    assert {float(x) for x in re.findall(r"\d+(?:\.\d+)?", star[1])} <= values


def test_baseline_table_gives_each_baselines_sampling_and_loss_temperature():
    for row in _table_after("## Presets", "preset | teacher"):
        config = cfg.resolve(row[0].strip("`"), (), {}, model="m", data="d", out="o")
        loss_temperature, sampling = row[3], row[4]
        if loss_temperature != "–":
            assert float(loss_temperature) == config.loss_temperature, row[0]
        if sampling != "none":
            t, top_p, top_k = (x.strip() for x in sampling.split("/"))
            assert (float(t), float(top_p), 0 if top_k == "none" else int(top_k)) == \
                (config.temperature, config.top_p, config.top_k), row[0]
