"""`unisd ablate`: train component combinations under identical settings, score them, map their interactions.

    unisd ablate --model smollm2-135m --data train.jsonl --plugins ema,clip --combos pairs \\
        --eval-tasks unisd_cose --eval-limit 30 --out ablation/

Every run shares the model, data, seed (so the data order), every trainer flag and the lm-eval settings;
only plugins and their options differ (`unisd.ablation_plan` names the runs and estimates their cost;
`unisd.ablation_report` analyses the scores). DIR/runs/<run>/ holds each trained model and
DIR/evals/<run>.json its scores: a finished run (its unisd.json exists) is not trained again, an
unfinished one is resumed from its newest checkpoint, and a done evaluation is not repeated, so
rerunning a killed ablation finishes only what is missing.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from unisd import config_file as config_files
from unisd import tracking
from unisd.ablation_plan import (Planned, configs, describe_plan, finished, measured_sec_per_unit, parse_grid, plan,
                                 seeded, validate)
from unisd.ablation_report import write_outputs
from unisd.config import ConfigError, TrainConfig
from unisd.flags import CONFIG_HELP, errors_are_one_line, trainer_flags
from unisd.plugin import parse_overrides


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
                 max_gen_toks: int | None = None, template_kwargs: dict[str, Any] | None = None,
                 backend: str = "hf") -> dict[str, Any]:
    """{scores, items (per-item scores), answers (answer spread), gen_toks} of one model, from record when it
    holds these settings and is newer than the model. `backend` is not a setting: greedy answers are the same
    under either (tests/test_vllm.py), so a record made with one serves the other."""
    from unisd.evaluate import answer_spread, generation_limits, item_scores, run_lm_eval, scores

    settings: dict[str, Any] = {"tasks": tasks, "limit": limit, "max_gen_toks": max_gen_toks}
    if template_kwargs:  # as the runs rendered their prompts (--chat-template-kwargs)
        settings["chat_template_kwargs"] = template_kwargs
    marker = Path(model) / "unisd.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        fresh = not marker.is_file() or record.stat().st_mtime >= marker.stat().st_mtime
        kept = ("scores", "items", "answers", "gen_toks")  # a record from an older unisd lacks some: redo it
        if fresh and saved["settings"] == settings and all(k in saved for k in kept):
            echo(f"{name}: evaluated earlier, not repeated")
            return {k: saved[k] for k in kept}
    echo(f"{name}: evaluating on {', '.join(tasks)}")
    result = run_lm_eval(model, tasks, limit, include, batch_size, max_gen_toks, backend, template_kwargs)
    samples = result.pop("samples", {})
    found = {"scores": scores(result), "items": item_scores(samples, result), "answers": answer_spread(samples),
             "gen_toks": generation_limits(result)}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": settings, **found, "results": result}, indent=1, default=str))
    return found


def ablate(model: str, data: str, out: Path, plugins: tuple[str, ...], combos: str, grid: tuple[str, ...],
           baselines: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]], tasks: list[str],
           limit: int | None, include: list[str], eval_batch_size: int = 4, base: bool = True,
           dry_run: bool = False, sec_per_step: float | None = None, echo: Callable[[str], None] = print,
           show: Callable[[str], None] = print, eval_max_gen_toks: int | None = None,
           report_to: tuple[str, ...] = (), seeds: int = 1, eval_backend: str = "hf",
           **settings: Any) -> dict[str, Any] | None:
    """Plan, validate, print the plan; then train, evaluate and analyse (unless dry_run).

    `seeds` > 1 trains every run with --seed, --seed + 1, ... on one data order and reports means over seeds
    with intervals that count seeds and items (`unisd.seeds`)."""
    from unisd.evaluate import order_warning, run_info
    from unisd.plugin import discover

    available = discover()
    runs = plan(plugins, combos, parse_grid(grid), baselines, overrides)
    configs_ = configs(runs, out, available, model=model, data=data, **settings)
    validate(configs_, available)
    if not tasks:
        raise ConfigError("--eval-tasks is empty")
    if eval_backend == "vllm":
        if next(iter(configs_.values())).template_kwargs():
            raise ConfigError("--chat-template-kwargs: score with --eval-backend hf (lm-eval's vLLM model takes no "
                              "template variables)")
        from unisd import engine

        engine.require()  # before anything trains: a missing engine is the first thing to say
    steps = next(iter(configs_.values())).max_steps
    rate = sec_per_step or measured_sec_per_unit(runs, configs_, available)
    per_seed = seeded(configs_, seeds)
    plan_text = describe_plan(runs, configs_, available, steps, len(runs) * seeds + base, rate)
    show(plan_text + (f"\neach run trained with {seeds} seeds (--seed to --seed + {seeds - 1}): {seeds}x the steps "
                      f"and time above" if seeds > 1 else ""))
    if dry_run:
        return None
    out.mkdir(parents=True, exist_ok=True)
    for seed_configs in per_seed:
        train_all(runs, seed_configs, echo, report_to)
    include = list(include)
    warning = order_warning({r.name: run_info(per_seed[0][r.name].out) for r in runs})
    if warning:
        echo(warning)
    variables = next(iter(configs_.values())).template_kwargs()
    score = lambda name, path, record: evaluate_one(name, path, record, tasks, limit, include,  # noqa: E731
                                                     eval_batch_size, echo, eval_max_gen_toks, variables,
                                                     eval_backend)
    evals = {"base": score("base", model, out / "evals" / "base.json")} if base else {}
    if seeds == 1:
        evals |= {r.name: score(r.name, configs_[r.name].out, out / "evals" / f"{r.folder}.json") for r in runs}
    else:
        by_seed = {r.name: [score(f"{r.name} (seed {c[r.name].seed})", c[r.name].out,
                                  out / "evals" / r.folder / f"seed-{c[r.name].seed}.json") for c in per_seed]
                   for r in runs}
        evals |= {name: _mean_over_seeds(found) for name, found in by_seed.items()}
    shared = {k: v for k, v in next(iter(configs_.values())).to_json().items()
              if k not in ("out", "plugins", "options", "preset")}
    gen_toks = {t: n for e in evals.values() for t, n in e["gen_toks"].items()}
    return write_outputs(out, runs, {n: e["scores"] for n, e in evals.items()}, plugins,
                         {**shared, "seeds": seeds,
                          "eval": {"tasks": tasks, "limit": limit, "include": include,
                                   "max_gen_toks": eval_max_gen_toks, "gen_toks": gen_toks}},
                         {n: e["items"] for n, e in evals.items()}, {n: e["answers"] for n, e in evals.items()},
                         seeded={n: e.get("seeded", [e["items"]]) for n, e in evals.items()} if seeds > 1 else None)


def _mean_over_seeds(found: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's evaluations of every seed as one: scores averaged, the first seed's items and answers (tables of
    one seed), and every seed's items under `seeded` for the intervals."""
    tasks = [t for t in found[0]["scores"] if all(t in f["scores"] for f in found)]
    return {"scores": {t: sum(f["scores"][t] for f in found) / len(found) for t in tasks}, "items": found[0]["items"],
            "answers": found[0]["answers"], "gen_toks": found[0]["gen_toks"], "seeded": [f["items"] for f in found]}


def _required(key: str, given: str | None, in_file: str | None) -> str:
    """A setting the flag gives, else the --config file."""
    value = given or in_file
    if not value:
        raise ConfigError(f"--{key} is missing: give it on the command line or in the --config file")
    return value


# ---- command line -----------------------------------------------------------------------------------

@click.command(name="ablate", epilog="Example:\n\n\b\n    unisd ablate --model smollm2-135m --data train.jsonl "
               "--plugins ema,agree,clip --combos pairs --grid agree.k=2,3,5 --eval-tasks unisd_cose "
               "--out abl/")
@click.option("--config", "config_file", default=None, metavar="FILE", help=CONFIG_HELP + " Its plugins are the "
              "components and its options apply to every run that uses the plugin; a preset is refused (use --combos).")
@click.option("--model", default=None, help="Hub id, local folder, .gguf file, or the alias smollm2-135m.")
@click.option("--data", default=None, help="Benchmark name or a JSONL file; every run trains on it in the same order.")
@click.option("--out", default=None, help="Folder: runs/, evals/, results.json, table.md, *.png.")
@click.option("--plugins", default="", help="Comma-separated components (any installed plugin).")
@click.option("--combos", default="singles", show_default=True,
              help="singles | pairs | all, or a comma list of presets and a+b combinations.")
@click.option("--grid", multiple=True, metavar="PLUGIN.KEY=V1,V2",
              help="Sensitivity: one run of PLUGIN alone per value.")
@click.option("--baselines", default="", help="Comma-separated presets to add as reference runs (e.g. sft,gkd; "
              "other-demo: the teacher shown another example's demonstration, the control).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train every run with this many seeds (--seed, --seed + 1, ...) on the same data order; tables "
                   "show the mean over seeds with intervals that count seeds and items.")
@click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.KEY=VALUE",
              help="A plugin option for every run that uses the plugin.")
@click.option("--eval-tasks", required=True, help="Comma-separated lm-eval tasks or groups.")
@click.option("--eval-limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--eval-batch-size", type=int, default=4, show_default=True)
@click.option("--eval-backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="What scores the runs: transformers, or lm-eval's vLLM model (unisd[vllm]; the same greedy "
                   "answers, several times faster on CPU; --eval-batch-size does not apply).")
@click.option("--eval-max-gen-toks", type=click.IntRange(min=1), default=None,
              help="Cap every task's new tokens per answer (the same for every run; the tasks' own limit is "
                   "1024, as in the paper) to keep a study cheap.")
@click.option("--include-path", "include", multiple=True, help="Extra lm-eval task folders.")
@click.option("--no-base", is_flag=True, help="Do not score the untrained --model as a reference row.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the estimated cost; write nothing.")
@click.option("--sec-per-step", type=float, default=None, help="Seconds per plain-SD step, for the time estimate.")
@trainer_flags(skip=("eval_tasks", "eval_limit"))  # its own --eval-tasks and --eval-limit serve --eval-every too
@click.option("--report-to", default="none", show_default=True, metavar="none|tensorboard|wandb|trackio|mlflow",
              help="Comma-separated trackers that get every run's metrics and configuration.")
@errors_are_one_line
def ablate_command(config_file: str | None, model: str | None, data: str | None, out: str | None, plugins: str,
                   combos: str, grid: tuple[str, ...], baselines: str, seeds: int, options: tuple[str, ...], eval_tasks: str,
                   eval_limit: int | None, eval_batch_size: int, eval_backend: str, eval_max_gen_toks: int | None,
                   include: tuple[str, ...], no_base: bool, dry_run: bool,
                   sec_per_step: float | None, report_to: str, **settings: Any) -> None:
    """Train plain SD, each component, their combinations and option grids alike; score and compare them."""
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    file = config_files.load(config_file) if config_file else {}
    if file.get("preset"):
        raise ConfigError(f"{config_file}: preset: unisd ablate compares presets through --combos or --baselines")
    overrides = {p: dict(o) for p, o in file.pop("options", {}).items()}
    for plugin, opts in parse_overrides(options).items():  # -o wins over the file
        overrides.setdefault(plugin, {}).update(opts)
    components = split(plugins) or file.pop("plugins", ())
    file.pop("plugins", None), file.pop("preset", None)
    model, data, out = (_required(key, given, file.pop(key, None))
                        for key, given in (("model", model), ("data", data), ("out", out)))
    settings = {**file, **{k: v for k, v in settings.items() if v is not None}}  # flags win over the file
    if settings.get("eval_every"):  # each run scores itself on the study's own tasks
        settings |= {"eval_tasks": eval_tasks, "eval_limit": eval_limit or 0}
    result = ablate(model, data, Path(out), components, combos, grid, split(baselines),
                    overrides, list(split(eval_tasks)), eval_limit, list(include),
                    eval_batch_size, not no_base, dry_run, sec_per_step, echo, click.echo,
                    eval_max_gen_toks=eval_max_gen_toks, report_to=tracking.parse(report_to), seeds=seeds,
                    eval_backend=eval_backend, **settings)
    if result is not None:
        click.echo((Path(out) / "table.md").read_text())
        click.echo(f"results: {Path(out) / 'results.json'}")
