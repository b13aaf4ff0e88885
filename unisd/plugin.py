"""The plugin protocol and its host: how a mechanism plugs into the training step.

A plugin is a class registered under the entry-point group `unisd.plugins`; the entry-point name is
the name users type (`--plugins ema,agree,clip`). Every hook defaults to doing nothing, and each is
called at exactly one visible line of `unisd.train.step`. Built-in mechanisms are registered through
the same entry points a third party uses.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # torch only for annotations: the CLI refuses bad flags before importing it
    import torch

    from unisd.rollout import Rollout
    from unisd.train import Batch, Outputs, Run

API_VERSION = 1
GROUP = "unisd.plugins"
HOOKS = ("setup", "completions", "views", "teacher", "token_loss", "weights", "aux_losses", "after_step",
         "state_dict", "load_state_dict")
EXCLUSIVE = ("teacher", "completions")  # hooks whose answer replaces, not chains: one provider per run


class PluginError(ValueError):
    """A plugin cannot be selected or configured; the message says which and why."""


class Plugin:
    """Base class: override any hook. `Config` holds the plugin's options and their defaults.

    Hooks, in the order the step calls them:
      setup(run)               once, after model and data are loaded
      completions(batch, run)  -> Rollout or None: completions to train on instead of a student sample
      views(batch)             -> {view name: [prompt per example]}: extra no-grad teacher views
      teacher(run)             -> module or None: replaces the primary teacher model
      token_loss(D, out)       -> D': transforms the per-token divergence [B, T] (chained in CLI order)
      weights(out)             -> w: reliability weights broadcastable to [B, T] (multiplied together)
      aux_losses(out)          -> {name: scalar}: weighted auxiliary terms, added and logged by name
      after_step(run)          after each optimizer step
      state_dict() / load_state_dict(state)   checkpoint and exact resume
    """

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = API_VERSION
    # exclusive hooks (teacher, completions) this plugin answers only sometimes and lets others answer
    # otherwise; without it, selecting two providers of the same exclusive hook is an error
    composes: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def setup(self, run: Run) -> None:
        pass

    def completions(self, batch: Batch, run: Run) -> Rollout | None:
        return None

    def views(self, batch: Batch) -> dict[str, list[str]]:
        return {}

    def teacher(self, run: Run) -> torch.nn.Module | None:
        return None

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        return D

    def weights(self, out: Outputs) -> torch.Tensor | None:
        return None

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, run: Run) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
        return [h for h in HOOKS if getattr(self.cls, h) is not getattr(Plugin, h)]

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
        values[key] = raw if not isinstance(raw, str) else parse_value(raw, _default(f), f"{name}.{key}", optional)
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
            raise PluginError(f"options given for '{owner}', which is not among the selected plugins ({', '.join(names) or 'none'})")
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
    for hook in EXCLUSIVE:
        providers = [p.name for p in plugins if _overrides(p, hook) and hook not in p.composes]
        if len(providers) > 1:
            raise PluginError(f"plugins {' and '.join(repr(n) for n in providers)} both provide the {hook} hook, "
                              "and only one can answer it; select one of them")
    return plugins


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)
