"""`--config FILE`: a run's settings in YAML or JSON, each key checked before anything loads.

A file holds any TrainConfig field by name (a flag's name with underscores: `batch_size: 8`), `model`,
`data`, `out`, `plugins` (a list or a comma-separated string), `preset` and `options` (plugin -> option ->
value). A run's own unisd.json is one too: its "config" is the resolved configuration of that run, so
`unisd train --config runs/a/unisd.json --out runs/b` repeats run a. A key's value is checked as its flag
checks it (type, range, choices); plugin options are checked by the plugin when it is configured.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import click
import yaml

from unisd import config as cfg
from unisd.flags import click_type

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 and JSON do: `lr: 1e-5` (no dot) is a float, not text."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))

RUN_RECORD = "unisd_version"  # a key only the unisd.json of a finished run has
FIELDS = {f.name: f for f in dataclasses.fields(cfg.TrainConfig)}
SCALARS = (str, int, float, bool, type(None))


def load(path: str | Path) -> dict[str, Any]:
    """The checked settings of a config file, by TrainConfig field name; ConfigError names the key at fault."""
    path = Path(path)
    data = _parse(path)
    if isinstance(data, dict) and RUN_RECORD in data and isinstance(data.get("config"), dict):
        data = data["config"]
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise cfg.ConfigError(f"{path}: expected a mapping of settings (key: value), found a {type(data).__name__}")
    return {key: _checked(path, str(key), value) for key, value in data.items()}


def load_config(path: str | Path, **overrides: Any) -> cfg.TrainConfig:
    """The TrainConfig a config file holds (YAML or JSON; a run's unisd.json repeats that run), keyword arguments
    winning over it as flags do: `load_config("run.yaml", max_steps=10)`."""
    preset, plugins = overrides.pop("preset", ""), tuple(overrides.pop("plugins", ()))
    return cfg.resolve(preset, plugins, overrides.pop("options", {}), load(path), **overrides)


def _parse(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise cfg.ConfigError(f"--config {path}: no such file") from None
    except OSError as e:
        raise cfg.ConfigError(f"--config {path}: {e.strerror}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise cfg.ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_Loader)  # a SafeLoader
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise cfg.ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    raise cfg.ConfigError(f"--config {path}: expected a .yaml, .yml or .json file")


def _checked(path: Path, key: str, value: Any) -> Any:
    def bad(expected: str) -> cfg.ConfigError:
        return cfg.ConfigError(f"{path}: {key}: expected {expected}, found {value!r}")

    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (keys: {', '.join(FIELDS)})"
        raise cfg.ConfigError(f"{path}: unknown key '{key}'{hint}")
    if key == "plugins":
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad("a list of plugin names")
        return tuple(n.strip() for n in names if n.strip())
    if key == "options":
        if not isinstance(value, dict) or not all(isinstance(o, dict) and all(isinstance(v, SCALARS) for v in o.values())
                                                  for o in value.values()):
            raise bad("a mapping plugin -> option -> value")
        return {str(plugin): {str(k): v for k, v in opts.items()} for plugin, opts in value.items()}
    kind = str(FIELDS[key].type)
    if kind.endswith(" | None"):  # an optional setting: None is its "off"
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad("an integer")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    if kind == "str" and not isinstance(value, str):
        raise bad("a string")
    spec = FIELDS[key].metadata.get("flag")
    if spec is not None:  # the flag's own range and choices
        try:
            click_type(kind, spec).convert(value, None, None)
        except click.BadParameter as e:
            raise cfg.ConfigError(f"{path}: {key}: {e.message}") from None
    return value
