"""The `unisd` command line. Every error is one line on stderr and exit status 2.

    unisd train --model smollm2-135m --data examples.jsonl --plugins ema,clip --out runs/x
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from unisd import config as cfg
from unisd.plugin import discover

EXAMPLE = "Example:\n\n\b\n    {}"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _errors_are_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's expected errors into `error: ...` + exit 2, with no traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from unisd.checkpoint import OutputDirError
        from unisd.data import DataError
        from unisd.evaluate import EvalError
        from unisd.models import ModelError
        from unisd.plugin import PluginError
        from unisd.train import TrainError

        try:
            return fn(*args, **kwargs)
        except (cfg.ConfigError, PluginError, DataError, ModelError, OutputDirError, EvalError) as e:
            _fail(str(e))
        except TrainError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group(epilog=EXAMPLE.format("unisd train --model smollm2-135m --data train.jsonl --preset unisd-star --out runs/x"))
@click.version_option(package_name="unisd")
def main() -> None:
    """Self-distillation of causal LMs: the student samples, the same model shown the gold answer teaches.

    Each UniSD mechanism (ema, agree, contrast, match, clip) is a plugin; `unisd plugins` lists them.
    """


@main.command(epilog=EXAMPLE.format("unisd train --model smollm2-135m --data train.jsonl --plugins ema,clip -o clip.max=5 --out runs/x"))
@click.option("--model", required=True, help="Hub id, local folder, .gguf file, or the alias smollm2-135m.")
@click.option("--data", required=True, help="Benchmark name (mbpp, cos_e, ...) or a JSONL file of prompt/answer[/rationale] rows.")
@click.option("--out", required=True, help="Output folder: final model, checkpoints/, metrics.jsonl.")
@click.option("--plugins", default="", help="Comma-separated mechanisms, applied in this order (e.g. ema,agree,clip).")
@click.option("--preset", default="", help="A named configuration (see `unisd presets`); flags given here win.")
@click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.KEY=VALUE", help="Set a plugin option, e.g. -o agree.k=5.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: one pass over the data).")
@click.option("--batch-size", type=int, default=None, help="Prompts per micro-batch [4].")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step [1].")
@click.option("--lr", type=float, default=None, help="Peak learning rate (AdamW, cosine, 10%% warmup) [2e-5].")
@click.option("--max-new-tokens", type=int, default=None, help="Rollout length limit [256].")
@click.option("--max-prompt-tokens", type=int, default=None, help="Longer prompts are dropped, never cut [1024].")
@click.option("--divergence", type=click.Choice(cfg.DIVERGENCES), default=None, help="Per-token divergence [fkl].")
@click.option("--alpha", type=float, default=None, help="JSD mixture weight, 0 < alpha < 1 [0.5].")
@click.option("--loss-temperature", type=float, default=None, help="Logit temperature inside the divergence [0.7].")
@click.option("--mask-truncated", is_flag=True, default=None, help="Leave completions that hit the length limit out of the loss.")
@click.option("--bf16", is_flag=True, default=None,
              help="bf16 compute with fp32 master weights, on CPU too; bf16 frozen teacher and sampling copy.")
@click.option("--seed", type=int, default=None, help="Seed for data order, sampling and plugins [42].")
@click.option("--max-bad-steps", type=int, default=None, help="Stop after this many non-finite steps in a row [3].")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (0: only at the end) [0].")
@click.option("--lora", is_flag=True, default=None, help="Train a LoRA adapter (r 64, alpha 128) instead of all weights.")
@click.option("--fsdp", is_flag=True, default=None, help="Under torchrun, shard weights, gradients and optimizer state (FSDP2).")
@click.option("--resume", is_flag=True, help="Continue from the newest intact checkpoint in --out.")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@_errors_are_one_line
def train(model: str, data: str, out: str, plugins: str, preset: str, options: tuple[str, ...],
          resume: bool, overwrite: bool, **settings: Any) -> None:
    """Train a student by on-policy self-distillation and write the final model to --out."""
    from unisd.train import train as run_training

    names = tuple(n.strip() for n in plugins.split(",") if n.strip())
    config = cfg.resolve(preset, names, cfg.parse_overrides(options), model=model, data=data, out=out, **settings)
    final = run_training(config, resume=resume, overwrite=overwrite, echo=lambda m: click.echo(m, err=True))
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


@main.command(name="eval", epilog=EXAMPLE.format("unisd eval --model base=smollm2-135m --model sd=runs/sd --tasks unisd_cose --limit 100 --retention --base smollm2-135m --out eval/"))
@click.option("--model", "model_specs", multiple=True, required=True, metavar="NAME=PATH", help="A checkpoint to score (repeatable).")
@click.option("--tasks", default="unisd", show_default=True, help="Comma-separated lm-eval tasks or groups.")
@click.option("--limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--out", required=True, help="Folder for results.json, table.md, scores.png and per-model results.")
@click.option("--retention", is_flag=True, help="Also compute PPL_ret and PPL_fit (needs --base).")
@click.option("--base", default=None, help="The base model PPL_ret is measured with.")
@click.option("--include-path", "include", multiple=True, help="Extra lm-eval task folders.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@_errors_are_one_line
def eval_cmd(model_specs: tuple[str, ...], tasks: str, limit: int | None, out: str, retention: bool,
             base: str | None, include: tuple[str, ...], batch_size: int) -> None:
    """Score checkpoints with lm-eval under identical settings; write a table and a chart."""
    from unisd.evaluate import EvalError, evaluate, parse_models

    if retention and not base:
        raise EvalError("--retention needs --base (the model PPL_ret is measured with)")
    checkpoints = parse_models(model_specs)
    combined = evaluate(checkpoints, [t.strip() for t in tasks.split(",") if t.strip()], Path(out), limit,
                        list(include), base if retention else None, batch_size, echo=lambda m: click.echo(m, err=True))
    click.echo((Path(out) / "table.md").read_text())
    click.echo(f"results: {Path(out) / 'results.json'}  chart: {Path(out) / 'scores.png'}")
    del combined


@main.command(epilog=EXAMPLE.format("unisd demo --out runs/demo"))
@click.option("--out", default="runs/demo", show_default=True, help="Folder for the model, metrics, tables and charts.")
@click.option("--steps", type=int, default=12, show_default=True, help="UniSD* optimizer steps.")
@click.option("--eval-limit", type=int, default=40, show_default=True, help="Demo questions scored per model.")
@click.option("--humaneval-limit", type=int, default=3, show_default=True, help="HumanEval problems scored per model.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in --out.")
@_errors_are_one_line
def demo(out: str, steps: int, eval_limit: int, humaneval_limit: int, overwrite: bool) -> None:
    """Self-distil SmolLM2-135M with UniSD* on a bundled task, then score it before and after with lm-eval."""
    from unisd import demo as demo_run

    demo_run.run(Path(out), steps, eval_limit, humaneval_limit, overwrite=overwrite, echo=lambda m: click.echo(m, err=True))


@main.command(epilog=EXAMPLE.format("unisd compare eval-a/results.json eval-b/results.json --out compare/"))
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, help="Folder for the rebuilt table.md and scores.png.")
def compare(results: tuple[str, ...], out: str) -> None:
    """Rebuild the comparison table and chart from saved results.json files."""
    from unisd import report

    merged = report.merge([json.loads(Path(r).read_text()) for r in results])
    Path(out).mkdir(parents=True, exist_ok=True)
    report.write_comparison(merged, Path(out))
    click.echo((Path(out) / "table.md").read_text())


@main.command(epilog=EXAMPLE.format("unisd plot runs/sd"))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir: str) -> None:
    """Draw the training curves of a run (loss, each loss term, plugin metrics) to RUN_DIR/curves.png."""
    from unisd import report

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        _fail(f"{metrics}: no metrics to plot")
    keys = report.training_curves(metrics, Path(run_dir) / "curves.png")
    click.echo(f"{Path(run_dir) / 'curves.png'}: {', '.join(keys)}")


from unisd.ablate import ablate_command  # noqa: E402  (at the end: ablate looks cli up lazily)
main.add_command(ablate_command)
