"""Plugin discovery and configuration: from entry-point names and `-o` strings to plugin objects.

A plugin is a class registered under the entry-point group `unisd.plugins`; the entry-point name is
the name users type (`--plugins ema,agree,clip`). Built-in mechanisms are registered through the same
entry points a third party uses. The contract itself (`Plugin`, its hooks) is `unisd.api`; it is
importable from here too, as the README shows.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from unisd.api import API_VERSION, HOOKS, Plugin, PluginError, overrides
from unisd.config import ConfigError, TrainConfig

__all__ = ["GROUP", "Plugin", "PluginError", "PluginInfo", "configure", "discover", "load", "parse_overrides", "parse_value",
           "settle_objective"]

GROUP = "unisd.plugins"


@dataclass(frozen=True)
class PluginInfo:
    """What discovery found under one entry-point name: the class, or why it could not be loaded."""

    name: str
    distribution: str
    version: str
    cls: type[Plugin] | None = None
    error: str = ""

    @property
    def hooks(self) -> list[str]:
        if self.cls is None:
            return []
        return [h for h in HOOKS if overrides(self.cls, h)]

    @property
    def options(self) -> dict[str, Any]:
        if self.cls is None:
            return {}
        return {f.name: _default(f) for f in dataclasses.fields(self.cls.Config)}

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "hooks": self.hooks, "options": self.options, "error": self.error or None}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def discover() -> dict[str, PluginInfo]:
    """Every plugin registered under `unisd.plugins`; one that fails to import is recorded, not raised."""
    found: dict[str, PluginInfo] = {}
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in found:
            prev = found[ep.name]
            found[ep.name] = PluginInfo(ep.name, f"{prev.distribution}, {dist}", version,
                                        error=f"registered twice (by {prev.distribution} and {dist})")
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must never break the others
            found[ep.name] = PluginInfo(ep.name, dist, version, error=f"{type(e).__name__}: {e}")
            continue
        error = _check(ep.name, cls)
        found[ep.name] = PluginInfo(ep.name, dist, version, None if error else cls, error)
    return found


def _check(name: str, cls: Any) -> str:
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        return f"{cls!r} is not a unisd.plugin.Plugin subclass"
    if cls.api_version != API_VERSION:
        return f"plugin API version {cls.api_version}, this unisd speaks {API_VERSION}"
    if not dataclasses.is_dataclass(cls.Config):
        return "its Config is not a dataclass"
    return ""


def parse_value(raw: str, default: Any, where: str, optional: bool = False) -> Any:
    """Convert an override string to the type of the option's default, or raise PluginError."""
    kind = type(default)
    if optional and raw.lower() == "none":
        return None
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if default is None:  # an optional number that is off by default
            return float(raw)
        return raw
    except ValueError:
        expected = "a number" if default is None else kind.__name__
        raise PluginError(f"{where}={raw!r}: expected {expected}{' or none' if optional else ''}") from None


def typed_value(value: Any, default: Any, where: str, optional: bool = False) -> Any:
    """Check a value given as such (not as text) against the type of the option's default, or raise PluginError."""
    kind = type(default)
    if value is None and optional:
        return None
    numeric = default is None or kind is float
    if kind is bool and isinstance(value, bool) or kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind not in (bool, int, float) and default is not None and isinstance(value, kind):
        return value
    expected = "a number" if default is None else kind.__name__
    raise PluginError(f"{where}={value!r}: expected {expected}{' or none' if optional else ''}")


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """`["agree.k=3", "ema.beta=0.9"]` -> {"agree": {"k": "3"}, "ema": {"beta": "0.9"}}."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        plugin, dot, option = key.partition(".")
        if not sep or not dot or not plugin or not option:
            raise PluginError(f"-o {item!r}: expected plugin.option=value, e.g. -o agree.k=5")
        parsed.setdefault(plugin.strip(), {})[option.strip()] = value.strip()
    return parsed


def configure(cls: type[Plugin], options: Mapping[str, Any], name: str = "") -> Any:
    """Build `cls.Config` from string overrides, checking each name and type against the defaults."""
    name = name or cls.name
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PluginError(f"unknown option {name}.{key} (options of {cls.name}: {known})")
        f = fields[key]
        optional = "None" in str(f.type)
        parse = parse_value if isinstance(raw, str) else typed_value  # -o gives text; a preset or --config file, values
        values[key] = parse(raw, _default(f), f"{name}.{key}", optional)
    try:
        return cls.Config(**values)
    except (TypeError, ValueError) as e:
        raise PluginError(f"{name}: {e}") from None


def load(names: list[str], options: Mapping[str, Mapping[str, str]],
         available: Mapping[str, PluginInfo] | None = None) -> list[Plugin]:
    """Instantiate the selected plugins in the given order (the order hooks are chained in)."""
    available = discover() if available is None else available
    for owner in options:
        if owner not in names:
            raise PluginError(f"options given for '{owner}', which is not among the selected plugins "
                              f"({', '.join(names) or 'none'})")
    plugins: list[Plugin] = []
    for name in names:
        info = available.get(name)
        if info is None:
            raise PluginError(f"unknown plugin '{name}' (available: {', '.join(sorted(available)) or 'none'})")
        if info.cls is None:
            raise PluginError(f"plugin '{name}' from {info.distribution} failed to load: {info.error}")
        plugin = info.cls(configure(info.cls, options.get(name, {}), name))
        plugin.name = name  # the name users typed is the one errors and logs use
        plugins.append(plugin)
    if len(set(names)) != len(names):
        raise PluginError(f"a plugin is selected twice: {','.join(names)}")
    return plugins


def settle_objective(config: TrainConfig, plugins: Sequence[Plugin], given: bool = False) -> TrainConfig:
    """The config with the per-token objective its plugins stand for (`Plugin.objective`, e.g. nll: ce).

    A declaration replaces only the default objective: a --divergence that was `given` (on the command
    line or by the preset) and differs is an error, and so is any value other than the default.
    """
    declared = {p.name: p.objective for p in plugins if p.objective}
    if len(set(declared.values())) > 1:
        found = ", ".join(f"{n} ({o})" for n, o in declared.items())
        raise ConfigError(f"plugins set different per-token objectives: {found}; select one of them")
    if not declared or config.divergence in declared.values():
        return config
    name, objective = next(iter(declared.items()))
    default = TrainConfig.__dataclass_fields__["divergence"].default
    if given or config.divergence != default:
        raise ConfigError(f"--divergence {config.divergence} conflicts with plugin '{name}', which trains on "
                          f"--divergence {objective}; drop one of them")
    return dataclasses.replace(config, divergence=objective)
