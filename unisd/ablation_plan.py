"""Which runs an ablation makes, and what each costs: plain SD, each component, combinations, grids, baselines.

Runs are named `sd` (plain self-distillation, no plugin), `ema`, `ema+clip` (plugins in --plugins
order), `agree[k=5]` (a --grid value) and `preset:sft` (a baseline).

Cost model (printed before anything starts), in units of one plain-SD optimizer step:
    step cost = 1 + TEACHER_FORWARD * (extra no-grad teacher forwards per micro-batch)
A plain SD step is ~5 forward-equivalents (rollout ~2, student forward+backward ~2, one teacher forward),
so one extra teacher forward costs TEACHER_FORWARD = 0.2. Each plugin says how many it adds
(`Plugin.extra_forwards`: agree K views, contrast one negative view, ema a weight average every
`ema.every` steps); one that does not say is assumed to add one view. Seconds per unit come from
--sec-per-step or from the step times of runs already finished in DIR.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from unisd import config as cfg
from unisd.config import ConfigError, TrainConfig
from unisd.hooks import Hooks
from unisd.plugin import PluginInfo, load, settle_objective

PLAIN_SD = "sd"
TEACHER_FORWARD = 0.2


@dataclass(frozen=True)
class Planned:
    """One run of the ablation: which plugins, with which options (or a preset)."""

    name: str                                   # sd | ema | ema+clip | agree[k=5] | preset:sft
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    preset: str = ""
    grid: tuple[str, str, str] | None = None    # (plugin, key, value) of a sensitivity run

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", self.name).strip("_")


def parse_grid(specs: tuple[str, ...] | list[str]) -> list[tuple[str, str, list[str]]]:
    """["agree.k=1,3,5"] -> [("agree", "k", ["1", "3", "5"])]."""
    out = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        plugin, dot, option = key.partition(".")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not (sep and dot and plugin and option and listed):
            raise ConfigError(f"--grid {spec!r}: expected plugin.key=v1,v2,..., e.g. --grid agree.k=1,3,5")
        out.append((plugin.strip(), option.strip(), listed))
    return out


def _combo(names: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]]) -> Planned:
    return Planned("+".join(names) or PLAIN_SD, names, {p: dict(overrides[p]) for p in names if p in overrides})


def _combinations(plugins: tuple[str, ...], keyword: str) -> list[tuple[str, ...]]:
    """Subsets of two or more plugins for a --combos keyword (singles adds none)."""
    top = {"singles": 1, "pairs": 2, "all": len(plugins)}[keyword]
    return [c for n in range(2, top + 1) for c in itertools.combinations(plugins, n)]


def plan(plugins: tuple[str, ...], combos: str, grid: list[tuple[str, str, list[str]]],
         baselines: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]]) -> list[Planned]:
    """Plain SD (no plugin), each plugin alone, the --combos runs, grid runs, baselines; in that order, no repeats.

    --combos is a comma list of: singles | pairs | all | a preset name | a+b (plugins from --plugins).
    """
    stray = [p for p in overrides if p not in plugins]
    if stray:
        raise ConfigError(f"-o given for '{stray[0]}', which is not in --plugins ({','.join(plugins) or 'none'})")
    runs = [_combo((), overrides), *(_combo((p,), overrides) for p in plugins)]
    for item in (i.strip() for i in combos.split(",") if i.strip()):
        if item in ("singles", "pairs", "all"):
            runs += [_combo(c, overrides) for c in _combinations(plugins, item)]
        else:
            runs.append(_listed(item, plugins, overrides))
    for plugin, key, values in grid:
        for v in values:
            opts = {**overrides.get(plugin, {}), key: v}
            runs.append(Planned(f"{plugin}[{key}={v}]", (plugin,), {plugin: opts}, grid=(plugin, key, v)))
    runs += [Planned(f"preset:{b}", preset=b) for b in baselines]
    return _unique(runs)


def _listed(item: str, plugins: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]]) -> Planned:
    """A --combos item other than a keyword: a preset name, or `a+b` (named in --plugins order)."""
    if "+" in item:
        parts = [p.strip() for p in item.split("+")]
        missing = [p for p in parts if p not in plugins]
        if missing:
            raise ConfigError(f"--combos {item!r}: '{missing[0]}' is not in --plugins ({','.join(plugins)})")
        return _combo(tuple(p for p in plugins if p in parts), overrides)
    if item not in cfg.PRESETS:
        raise ConfigError(f"--combos {item!r}: expected singles, pairs, all, a preset or a+b "
                          f"(presets: {', '.join(cfg.PRESETS)})")
    return Planned(f"preset:{item}", preset=item)


def _unique(runs: list[Planned]) -> list[Planned]:
    """Drop repeated runs (same name); refuse two names that would share a folder."""
    kept: list[Planned] = []
    for r in runs:
        if r.name not in {k.name for k in kept}:
            kept.append(r)
    folders: dict[str, str] = {}
    for r in kept:
        if r.folder in folders:
            raise ConfigError(f"runs '{folders[r.folder]}' and '{r.name}' would share the folder runs/{r.folder}")
        folders[r.folder] = r.name
    return kept


def configs(runs: list[Planned], out: Path, available: Mapping[str, PluginInfo],
            **settings: Any) -> dict[str, TrainConfig]:
    """The TrainConfig of every run: the same settings, its own plugins, options, objective and folder."""
    found = {}
    for r in runs:
        config = cfg.resolve(r.preset, r.plugins, r.options, out=str(out / "runs" / r.folder), **settings)
        if config.plugins:  # as `unisd train` does: a plugin may stand for the objective (nll: ce)
            config = settle_objective(config, load(list(config.plugins), config.options, available),
                                      cfg.divergence_given(r.preset, settings))
        found[r.name] = config
    return found


def seeded(configs_: Mapping[str, TrainConfig], seeds: int) -> list[dict[str, TrainConfig]]:
    """The configurations of each of `seeds` seeds (--seed, --seed + 1, ...): every run of every seed trains on the
    same data order (that of --seed: --data-seed), so seeds differ in their samples and plugins' draws alone;
    with several seeds each run's folder is DIR/runs/<run>/seed-<seed>."""
    if seeds == 1:
        return [dict(configs_)]
    return [{name: dataclasses.replace(c, seed=c.seed + k, data_seed=c.order_seed,
                                       out=str(Path(c.out) / f"seed-{c.seed + k}"))
             for name, c in configs_.items()} for k in range(seeds)]


def validate(configs_: Mapping[str, TrainConfig], available: Mapping[str, PluginInfo]) -> None:
    """Instantiate every run's plugins (names, option names and types, conflicts) before anything is written."""
    for config in configs_.values():
        Hooks(load(list(config.plugins), config.options, available))


def step_cost(config: TrainConfig, available: Mapping[str, PluginInfo]) -> float:
    """Relative cost of one optimizer step of this run; plain SD = 1 (see the module docstring)."""
    extra = 0.0
    for name in config.plugins:
        info = available[name]
        options = {**info.options, **config.options.get(name, {})}
        assert info.cls is not None, "validate() refuses a plugin that failed to load"
        extra += info.cls.extra_forwards(options)
    return (1.0 + TEACHER_FORWARD * extra) * config.grad_accum


def measured_sec_per_unit(runs: list[Planned], configs_: Mapping[str, TrainConfig],
                          available: Mapping[str, PluginInfo]) -> float | None:
    """Mean seconds per cost unit over the steps already logged in DIR (None before the first step)."""
    rates = []
    for r in runs:
        metrics = Path(configs_[r.name].out) / "metrics.jsonl"
        if metrics.is_file():
            times = [json.loads(ln)["step_time_s"] for ln in metrics.read_text().splitlines() if ln.strip()]
            rates += [t / step_cost(configs_[r.name], available) for t in times]
    return sum(rates) / len(rates) if rates else None


def describe_plan(runs: list[Planned], configs_: Mapping[str, TrainConfig], available: Mapping[str, PluginInfo],
                  steps: int, evals: int, sec_per_unit: float | None) -> str:
    """The plan as printed: one line per run, then the total cost and, when known, the time."""
    lines = [f"{'run':<24} {'plugins':<28} {'options':<30} {'cost/step':>9}  folder"]
    total = 0.0
    for r in runs:
        c = configs_[r.name]
        cost = step_cost(c, available)
        total += cost * steps
        opts = "; ".join(f"{p}.{k}={v}" for p, o in c.options.items() for k, v in o.items()) or "-"
        opts = opts if len(opts) <= 30 else opts[:29] + "…"
        done = "  (finished)" if finished(Path(c.out)) else ""
        lines.append(f"{r.name:<24} {','.join(c.plugins) or '-':<28} {opts:<30} {cost:>9.2f}  runs/{r.folder}{done}")
    if not steps:
        lines.append(f"{len(runs)} runs, one pass over the data each (pass --max-steps for an estimate); "
                     f"{evals} evaluations")
        return "\n".join(lines)
    lines.append(f"{len(runs)} runs x {steps} steps = {len(runs) * steps} steps, {total:.1f} plain-SD step units; "
                 f"{evals} evaluations")
    if sec_per_unit is not None:
        lines.append(f"estimated training time: {total * sec_per_unit / 60:.1f} min "
                     f"at {sec_per_unit:.2f} s per plain-SD step (evaluation not included)")
    else:
        lines.append("estimated training time: unknown until a step is measured (pass --sec-per-step)")
    return "\n".join(lines)


def finished(folder: Path) -> bool:
    return (folder / "unisd.json").is_file()
