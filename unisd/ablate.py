"""Ablations: train component combinations under identical settings, score them, map their interactions.

    unisd ablate --model smollm2-135m --data train.jsonl --plugins ema,clip --combos pairs \\
        --eval-tasks unisd_cose --eval-limit 30 --out ablation/

Every run shares the model, data, seed (so the data order), every trainer flag and the lm-eval settings;
only plugins and their options differ. Runs are named `sd` (plain self-distillation, no plugin), `ema`,
`ema+clip` (plugins in --plugins order), `agree[k=5]` (a --grid value) and `preset:sft` (a baseline).
DIR/runs/<run>/ holds each trained model and DIR/evals/<run>.json its scores: a finished run (its
unisd.json exists) is not trained again, an unfinished one is resumed from its newest checkpoint, and a
done evaluation is not repeated, so rerunning a killed ablation finishes only what is missing.

Cost model (printed before anything starts), in units of one plain-SD optimizer step:
    step cost = 1 + TEACHER_FORWARD * (extra no-grad teacher forwards per micro-batch)
A plain SD step is ~5 forward-equivalents (rollout ~2, student forward+backward ~2, one teacher forward),
so one extra teacher forward costs TEACHER_FORWARD = 0.2. agree adds K views, contrast one negative view,
ema a weight average every `ema.every` steps (~1 forward), match and clip nothing; a plugin this table
does not know (third party) is assumed to add one view. Seconds per unit come from --sec-per-step or
from the step times of runs already finished in DIR.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from unisd import config as cfg, tracking
from unisd.config import ConfigError, TrainConfig
from unisd.plugin import PluginInfo

PLAIN_SD = "sd"
TEACHER_FORWARD = 0.2
EXTRA_FORWARDS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "agree": lambda o: float(o["k"]),
    "contrast": lambda o: 1.0,
    "ema": lambda o: 1.0 / float(o["every"]),
    "match": lambda o: 0.0, "clip": lambda o: 0.0, "mix": lambda o: 0.0, "nll": lambda o: 0.0,
}
UNKNOWN_PLUGIN_FORWARDS = 1.0


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


# ---- planning ---------------------------------------------------------------------------------------

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


def configs(runs: list[Planned], out: Path, **settings: Any) -> dict[str, TrainConfig]:
    """The TrainConfig of every run: the same settings, its own plugins, options and folder."""
    return {r.name: cfg.resolve(r.preset, r.plugins, r.options, out=str(out / "runs" / r.folder), **settings)
            for r in runs}


def validate(configs_: Mapping[str, TrainConfig], available: Mapping[str, PluginInfo]) -> None:
    """Instantiate every run's plugins (names, option names and types) before anything is written."""
    from unisd.plugin import load

    for config in configs_.values():
        load(list(config.plugins), config.options, available)


# ---- cost -------------------------------------------------------------------------------------------

def step_cost(config: TrainConfig, available: Mapping[str, PluginInfo]) -> float:
    """Relative cost of one optimizer step of this run; plain SD = 1 (see the module docstring)."""
    extra = 0.0
    for name in config.plugins:
        info = available[name]
        options = {**info.options, **config.options.get(name, {})}
        rule = EXTRA_FORWARDS.get(name)
        extra += rule(options) if rule else UNKNOWN_PLUGIN_FORWARDS
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


# ---- running ----------------------------------------------------------------------------------------

def finished(folder: Path) -> bool:
    return (folder / "unisd.json").is_file()


def _check_same_settings(name: str, config: TrainConfig) -> None:
    """A finished run is reused only if it was trained with exactly this run's configuration."""
    stored = json.loads((Path(config.out) / "unisd.json").read_text())["config"]
    wanted = json.loads(json.dumps(config.to_json()))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # a setting added to unisd after that run was trained counts as its default value
    changed = [k for k in wanted if k != "out" and stored.get(k, defaults.get(k)) != wanted[k]]
    if changed:
        raise ConfigError(f"runs/{Path(config.out).name} ({name}) was trained with other settings "
                          f"({', '.join(changed)}); use another --out or delete that run")


def train_all(runs: list[Planned], configs_: Mapping[str, TrainConfig], echo: Callable[[str], None],
              report_to: tuple[str, ...] = ()) -> None:
    """Train every run in order: skip finished ones, resume unfinished ones."""
    from unisd.train import train

    for i, r in enumerate(runs, 1):
        config = configs_[r.name]
        if finished(Path(config.out)):
            _check_same_settings(r.name, config)
            echo(f"[{i}/{len(runs)}] {r.name}: finished earlier, not retrained")
            continue
        started = Path(config.out).is_dir()  # a killed run left its folder: continue from its checkpoint
        echo(f"[{i}/{len(runs)}] {r.name}: {'resuming' if started else 'training'}")
        train(config, resume=started, echo=echo, report_to=report_to)


def evaluate_one(name: str, model: str, record: Path, tasks: list[str], limit: int | None,
                 include: list[str], batch_size: int, echo: Callable[[str], None],
                 max_gen_toks: int | None = None) -> dict[str, Any]:
    """{scores, items (per-item scores), answers (answer spread), gen_toks} of one model, from record when it
    holds these settings and is newer than the model."""
    from unisd.evaluate import answer_spread, generation_limits, item_scores, run_lm_eval, scores

    settings = {"tasks": tasks, "limit": limit, "max_gen_toks": max_gen_toks}
    marker = Path(model) / "unisd.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        fresh = not marker.is_file() or record.stat().st_mtime >= marker.stat().st_mtime
        kept = ("scores", "items", "answers", "gen_toks")  # a record from an older unisd lacks some: redo it
        if fresh and saved["settings"] == settings and all(k in saved for k in kept):
            echo(f"{name}: evaluated earlier, not repeated")
            return {k: saved[k] for k in kept}
    echo(f"{name}: evaluating on {', '.join(tasks)}")
    result = run_lm_eval(model, tasks, limit, include, batch_size, max_gen_toks)
    samples = result.pop("samples", {})
    found = {"scores": scores(result), "items": item_scores(samples, result), "answers": answer_spread(samples),
             "gen_toks": generation_limits(result)}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": settings, **found, "results": result}, indent=1, default=str))
    return found


# ---- analysis (pure) --------------------------------------------------------------------------------

def overall_scores(table: Mapping[str, Mapping[str, float]], tasks: list[str]) -> dict[str, float]:
    from unisd.report import overall

    return {name: overall(dict(row), tasks) for name, row in table.items()}


def gains(overall: Mapping[str, float]) -> dict[str, float]:
    """Overall of each run minus plain SD's."""
    return {name: value - overall[PLAIN_SD] for name, value in overall.items() if name != PLAIN_SD}


def interactions(overall: Mapping[str, float], plugins: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """interaction(A, B) = gain(A+B) - gain(A) - gain(B), for each pair whose three runs were scored."""
    g = gains(overall)
    out = {}
    for a, b in itertools.combinations(plugins, 2):
        if f"{a}+{b}" in g and a in g and b in g:
            out[(a, b)] = g[f"{a}+{b}"] - g[a] - g[b]
    return out


def _matrix(pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
            diagonal: Mapping[str, float]) -> list[list[float]]:
    value = {**{(a, b): v for (a, b), v in pairs.items()}, **{(b, a): v for (a, b), v in pairs.items()}}
    return [[diagonal.get(a, math.nan) if a == b else value.get((a, b), math.nan) for b in plugins] for a in plugins]


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.1f}"


def effect_intervals(items: Mapping[str, Mapping[str, Mapping[str, float]]],
                     plugins: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """95% intervals (points) of every gain and interaction on Overall: one paired bootstrap that draws the
    same items of each task for every run, so shared item difficulty cancels as it does in the estimates."""
    import numpy as np

    from unisd import stats

    tasks = list(dict.fromkeys(t for per_task in items.values() for t in per_task))
    docs = {t: [d for d in next(iter(v[t] for v in items.values() if t in v))
                if all(d in v[t] for v in items.values() if t in v)] for t in tasks}
    arrays = {(run, t): np.array([per_task[t][d] for d in docs[t]]) for run, per_task in items.items()
              for t in per_task if docs[t]}

    def effects(idx: Mapping[str, np.ndarray]) -> dict[str, float]:
        ov = {run: 100.0 * float(np.mean([a[idx[t]].mean() for (r, t), a in arrays.items() if r == run]))
              for run in items if any(r == run for r, _ in arrays)}
        return {**{f"gain:{n}": v for n, v in gains(ov).items()},
                **{f"interaction:{a}+{b}": v for (a, b), v in interactions(ov, plugins).items()}}

    if PLAIN_SD not in items or not arrays:
        return {"gains": {}, "interactions": {}}
    found = stats.bootstrap_intervals(effects, {t: len(d) for t, d in docs.items() if d})
    return {kind: {k.split(":", 1)[1]: list(v) for k, v in found.items() if k.startswith(kind[:-1] + ":")}
            for kind in ("gains", "interactions")}


def _with_ci(x: float, ci: list[float] | None) -> str:
    """`+1.2 [-3.0, +5.4]`, with ↑ / ↓ when the interval excludes 0."""
    if ci is None:
        return _fmt(x)
    mark = " ↑" if ci[0] > 0 else " ↓" if ci[1] < 0 else ""
    return f"{_fmt(x)} [{ci[0]:+.1f}, {ci[1]:+.1f}]{mark}"


def markdown(table: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
             pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
             uncertainty: Mapping[str, Any] | None = None, gen_toks: Mapping[str, int] | None = None,
             max_gen_toks: int | None = None) -> str:
    """table.md: scores ± 95% interval (paper layout), gains over plain SD and the interaction matrix, each
    with its 95% interval (paired bootstrap over items), and the generation limit."""
    from unisd.report import generation_note, score_table

    u = uncertainty or {}
    gain_ci, pair_ci = u.get("gains", {}), u.get("interactions", {})
    text = score_table({k: dict(v) for k, v in table.items()}, u.get("ci95"), None, u.get("overall_ci95"))
    text += "\n" + generation_note(dict(gen_toks or {}), max_gen_toks)
    text += (f"\nGain over plain SD ({PLAIN_SD}), Overall, points [95% interval; ↑ / ↓: excludes 0]:\n\n"
             "| run | Overall | gain |\n|---|---|---|\n")
    text += "".join(f"| {n} | {overall[n]:.1f} | {_with_ci(v, gain_ci.get(n))} |\n" for n, v in gains(overall).items())
    if pairs:
        shown = tuple(p for p in plugins if any(p in pair for pair in pairs))
        cell = {**{(a, b): _with_ci(v, pair_ci.get(f"{a}+{b}")) for (a, b), v in pairs.items()},
                **{(b, a): _with_ci(v, pair_ci.get(f"{a}+{b}")) for (a, b), v in pairs.items()}}
        text += ("\nInteraction(A, B) = gain(A+B) - gain(A) - gain(B), Overall, points [95% interval]:\n\n"
                 f"| | {' | '.join(shown)} |\n|---|" + "---|" * len(shown) + "\n")
        text += "".join(f"| {a} | " + " | ".join(cell.get((a, b), "–") for b in shown) + " |\n" for a in shown)
    return text


def interaction_png(pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
                    single_gains: Mapping[str, float], path: Path) -> None:
    """Heatmap: off-diagonal cells the pairwise interaction, the diagonal each component's own gain."""
    from unisd.report import plt

    shown = tuple(p for p in plugins if any(p in pair for pair in pairs))
    matrix = _matrix(pairs, shown, single_gains)
    finite = [abs(x) for row in matrix for x in row if not math.isnan(x)]
    bound = max(finite + [1e-6])
    fig, ax = plt.subplots(figsize=(1.2 * len(shown) + 2.5, 1.0 * len(shown) + 1.8))
    image = ax.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound)
    for i, row in enumerate(matrix):
        for j, x in enumerate(row):
            ax.text(j, i, _fmt(x), ha="center", va="center", fontsize="small",
                    color="white" if abs(x) > 0.6 * bound else "black", fontstyle="italic" if i == j else "normal")
    ax.set_xticks(range(len(shown)), shown)
    ax.set_yticks(range(len(shown)), shown)
    ax.set_title("interaction on Overall (points)\ndiagonal, italic: gain alone over plain SD", fontsize="small")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def sensitivity_png(points: list[tuple[str, Mapping[str, float], float]], plain: float, label: str,
                    path: Path) -> None:
    """Score vs option value: Overall (bold) and each task, plain SD dashed. points: (value, row, overall)."""
    from unisd.report import _label, plt

    numeric = all(_as_number(v) is not None for v, _, _ in points)
    points = sorted(points, key=lambda p: _as_number(p[0]) if numeric else 0.0)
    xs = [_as_number(v) if numeric else i for i, (v, _, _) in enumerate(points)]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    tasks = list(dict.fromkeys(t for _, row, _ in points for t in row))
    if len(tasks) > 1:
        for t in tasks:
            ax.plot(xs, [row.get(t, math.nan) for _, row, _ in points], marker=".", alpha=0.6, label=_label(t))
    ax.plot(xs, [o for _, _, o in points], marker="o", linewidth=2, color="black", label="Overall")
    ax.axhline(plain, linestyle="--", color="grey", label=f"plain SD ({plain:.1f})")
    ax.set_xticks(xs, [v for v, _, _ in points])
    ax.set_xlabel(label)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the whole ablation -----------------------------------------------------------------------------

def write_outputs(out: Path, runs: list[Planned], table: dict[str, dict[str, float]],
                  plugins: tuple[str, ...], settings: dict[str, Any],
                  items: dict[str, dict[str, dict[str, float]]] | None = None,
                  answers: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """results.json, table.md, interactions.png and sensitivity_<plugin>.<key>.png.

    items (run -> task -> doc_id -> score) give every score, gain and interaction its 95% interval;
    answers (unisd.evaluate.answer_spread per run) add the constant-answer baseline and collapse flags.
    """
    from unisd.evaluate import add_uncertainty
    from unisd.report import answers_table

    tasks = list(dict.fromkeys(t for row in table.values() for t in row))  # leaf tasks, also of a group
    overall = overall_scores(table, tasks)
    pairs = interactions(overall, plugins)
    presets = {"runs": {r.name: {"preset": r.preset} for r in runs}}  # UniSD* is also paired with the best baseline
    scored = add_uncertainty({"tasks": tasks, "scores": table, "items": items or {}, **presets})
    effects = effect_intervals(items or {}, plugins)
    uncertainty = {"ci95": scored["ci95"], "overall_ci95": scored["overall_ci95"], **effects}
    evaluation = settings.get("eval", {})
    text = markdown(table, overall, pairs, plugins, uncertainty, evaluation.get("gen_toks"),
                    evaluation.get("max_gen_toks"))
    if answers:
        text += "\nAnswer spread (⚠ collapsed: one answer in ≥ 90% of ≥ 10 items):\n\n" + answers_table(answers)
    (out / "table.md").write_text(text)
    if pairs:
        interaction_png(pairs, plugins, {p: v for p, v in gains(overall).items() if p in plugins},
                        out / "interactions.png")
    for (plugin, key), members in _grid_groups(runs).items():
        points = [(r.grid[2], table[r.name], overall[r.name]) for r in members if r.grid]
        sensitivity_png(points, overall[PLAIN_SD], f"{plugin}.{key}", out / f"sensitivity_{plugin}.{key}.png")
    results = {"settings": settings, "tasks": tasks,
               "plan": [{"name": r.name, "folder": f"runs/{r.folder}", "plugins": list(r.plugins),
                         "options": r.options, "preset": r.preset, "grid": r.grid} for r in runs],
               "scores": table, "ci95": scored["ci95"], "overall": overall, "overall_ci95": scored["overall_ci95"],
               "gains": gains(overall), "gains_ci95": effects["gains"],
               "interactions": {f"{a}+{b}": v for (a, b), v in pairs.items()},
               "interactions_ci95": effects["interactions"], "paired": scored["paired"], "answers": answers or {},
               "items": items or {}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _grid_groups(runs: list[Planned]) -> dict[tuple[str, str], list[Planned]]:
    groups: dict[tuple[str, str], list[Planned]] = {}
    for r in runs:
        if r.grid:
            groups.setdefault(r.grid[:2], []).append(r)
    return groups


def ablate(model: str, data: str, out: Path, plugins: tuple[str, ...], combos: str, grid: tuple[str, ...],
           baselines: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]], tasks: list[str],
           limit: int | None, include: list[str], eval_batch_size: int = 4, base: bool = True,
           dry_run: bool = False, sec_per_step: float | None = None, echo: Callable[[str], None] = print,
           show: Callable[[str], None] = print, eval_max_gen_toks: int | None = None,
           report_to: tuple[str, ...] = (), **settings: Any) -> dict[str, Any] | None:
    """Plan, validate, print the plan; then train, evaluate and analyse (unless dry_run)."""
    from unisd.evaluate import order_warning, run_info
    from unisd.plugin import discover

    available = discover()
    runs = plan(plugins, combos, parse_grid(grid), baselines, overrides)
    configs_ = configs(runs, out, model=model, data=data, **settings)
    validate(configs_, available)
    if not tasks:
        raise ConfigError("--eval-tasks is empty")
    steps = next(iter(configs_.values())).max_steps
    rate = sec_per_step or measured_sec_per_unit(runs, configs_, available)
    show(describe_plan(runs, configs_, available, steps, len(runs) + base, rate))
    if dry_run:
        return None
    out.mkdir(parents=True, exist_ok=True)
    train_all(runs, configs_, echo, report_to)
    include = list(include)
    targets = ([("base", model)] if base else []) + [(r.name, configs_[r.name].out) for r in runs]
    folder = {r.name: r.folder for r in runs} | {"base": "base"}
    warning = order_warning({r.name: run_info(configs_[r.name].out) for r in runs})
    if warning:
        echo(warning)
    evals = {name: evaluate_one(name, path, out / "evals" / f"{folder[name]}.json", tasks, limit, include,
                                eval_batch_size, echo, eval_max_gen_toks) for name, path in targets}
    shared = {k: v for k, v in next(iter(configs_.values())).to_json().items()
              if k not in ("out", "plugins", "options", "preset")}
    gen_toks = {t: n for e in evals.values() for t, n in e["gen_toks"].items()}
    return write_outputs(out, runs, {n: e["scores"] for n, e in evals.items()}, plugins,
                         {**shared, "eval": {"tasks": tasks, "limit": limit, "include": include,
                                             "max_gen_toks": eval_max_gen_toks, "gen_toks": gen_toks}},
                         {n: e["items"] for n, e in evals.items()}, {n: e["answers"] for n, e in evals.items()})


# ---- command line -----------------------------------------------------------------------------------

def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's `error: ...` + exit 2 behaviour, looked up at call time (unisd.cli imports this module)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from unisd.cli import _errors_are_one_line

        return _errors_are_one_line(fn)(*args, **kwargs)

    return wrapper


@click.command(name="ablate", epilog="Example:\n\n\b\n    unisd ablate --model smollm2-135m --data train.jsonl "
               "--plugins ema,agree,clip --combos pairs --grid agree.k=2,3,5 --eval-tasks unisd_cose "
               "--out abl/")
@click.option("--model", required=True, help="Hub id, local folder, .gguf file, or the alias smollm2-135m.")
@click.option("--data", required=True, help="Benchmark name or a JSONL file; every run trains on it in the same order.")
@click.option("--out", required=True, help="Folder: runs/, evals/, results.json, table.md, *.png.")
@click.option("--plugins", default="", help="Comma-separated components (any installed plugin).")
@click.option("--combos", default="singles", show_default=True,
              help="singles | pairs | all, or a comma list of presets and a+b combinations.")
@click.option("--grid", multiple=True, metavar="PLUGIN.KEY=V1,V2",
              help="Sensitivity: one run of PLUGIN alone per value.")
@click.option("--baselines", default="", help="Comma-separated presets to add as reference runs (e.g. sft,gkd).")
@click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.KEY=VALUE",
              help="A plugin option for every run that uses the plugin.")
@click.option("--eval-tasks", required=True, help="Comma-separated lm-eval tasks or groups.")
@click.option("--eval-limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--eval-batch-size", type=int, default=4, show_default=True)
@click.option("--eval-max-gen-toks", type=click.IntRange(min=1), default=None,
              help="Cap every task's new tokens per answer (the same for every run; the tasks' own limit is "
                   "1024, as in the paper) to keep a study cheap.")
@click.option("--include-path", "include", multiple=True, help="Extra lm-eval task folders.")
@click.option("--no-base", is_flag=True, help="Do not score the untrained --model as a reference row.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the estimated cost; write nothing.")
@click.option("--sec-per-step", type=float, default=None, help="Seconds per plain-SD step, for the time estimate.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps per run (default: one pass).")
@click.option("--batch-size", type=int, default=None, help="Prompts per micro-batch [4].")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step [1].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [2e-5].")
@click.option("--max-new-tokens", type=int, default=None, help="Rollout length limit [256].")
@click.option("--max-prompt-tokens", type=int, default=None, help="Longer prompts are dropped [1024].")
@click.option("--divergence", type=click.Choice(cfg.DIVERGENCES), default=None, help="Per-token divergence [fkl].")
@click.option("--loss-temperature", type=float, default=None, help="Logit temperature inside the divergence [0.7].")
@click.option("--seed", type=int, default=None, help="Seed for data order, sampling and plugins [42].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps, so a killed run resumes [0].")
@click.option("--lora", is_flag=True, default=None, help="Train LoRA adapters instead of all weights.")
@click.option("--report-to", default="none", show_default=True, metavar="none|tensorboard|wandb|trackio|mlflow",
              help="Comma-separated trackers that get every run's metrics and configuration.")
@_one_line_errors
def ablate_command(model: str, data: str, out: str, plugins: str, combos: str, grid: tuple[str, ...],
                   baselines: str, options: tuple[str, ...], eval_tasks: str, eval_limit: int | None,
                   eval_batch_size: int, eval_max_gen_toks: int | None, include: tuple[str, ...],
                   no_base: bool, dry_run: bool,
                   sec_per_step: float | None, report_to: str, **settings: Any) -> None:
    """Train plain SD, each component, their combinations and option grids alike; score and compare them."""
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    result = ablate(model, data, Path(out), split(plugins), combos, grid, split(baselines),
                    cfg.parse_overrides(options), list(split(eval_tasks)), eval_limit, list(include),
                    eval_batch_size, not no_base, dry_run, sec_per_step, echo, click.echo,
                    eval_max_gen_toks=eval_max_gen_toks, report_to=tracking.parse(report_to), **settings)
    if result is not None:
        click.echo((Path(out) / "table.md").read_text())
        click.echo(f"results: {Path(out) / 'results.json'}")
