"""What every command shares: one-line errors, value types, and the trainer flags made from TrainConfig.

`trainer_flags` gives `unisd train` and `unisd ablate` the same options from one source, the `flag`
fields of `unisd.config.TrainConfig`: name, type, accepted range, help and default are written there
once. Every flag defaults to None here, meaning "not given", so a preset's value is not overridden.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable

import click

from unisd import config as cfg

EXAMPLE = "Example:\n\n\b\n    {}"
CONFIG_HELP = ("A YAML or JSON file of settings: any trainer flag (batch_size: 8), plugins, preset, options "
               "(plugin -> option -> value), model, data, out; flags given here win. A run's unisd.json repeats that run.")


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf, which slip through every comparison."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


POSITIVE = Finite(min=0, min_open=True)
AT_LEAST_1 = click.IntRange(min=1)
AT_LEAST_0 = click.IntRange(min=0)


def click_type(kind: str, spec: cfg.Flag) -> click.ParamType:
    """The click type of a flag field (`kind`: its annotation): choices, a bounded number, or free text."""
    if spec.choices:
        return click.Choice(spec.choices)
    if kind == "str":
        return click.STRING
    if kind == "int":
        low, high = (None if x is None else int(x) for x in (spec.low, spec.high))
        return click.IntRange(min=low, max=high, min_open=spec.low_open, max_open=spec.high_open)
    return Finite(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)


def trainer_flags(command: Callable[..., Any] | None = None, *, skip: tuple[str, ...] = ()) -> Any:
    """Add one click option per `flag` field of TrainConfig, in field order, but those in `skip` (a command that
    defines them itself: `@trainer_flags(skip=(...))`)."""
    if command is None:
        return functools.partial(trainer_flags, skip=skip)
    for f in reversed(dataclasses.fields(cfg.TrainConfig)):
        spec = f.metadata.get("flag")
        if spec is None or f.name in skip:
            continue
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            command = click.option(name, is_flag=True, default=None, help=spec.help)(command)
            continue
        shown = f" [{f.default}]" if spec.show_default else ""
        command = click.option(name, type=click_type(str(f.type), spec), default=None,
                               help=spec.help + shown)(command)
    return command


# `unisd train --help` in sections by what the flags do (parameter names; anything unlisted goes under Options)
HELP_SECTIONS: dict[str, tuple[str, ...]] = {
    "What to train": ("config_file", "model", "data", "out", "plugins", "preset", "options", "data_config", "data_split",
                      "columns", "teacher", "teacher_template", "chat_template_kwargs", "teacher_chat_template_kwargs"),
    "Schedule and optimizer": ("max_steps", "batch_size", "grad_accum", "num_generations", "lr", "warmup_ratio",
                               "weight_decay", "max_grad_norm", "seed", "data_seed"),
    "Sampling (rollouts)": ("max_new_tokens", "max_prompt_tokens", "temperature", "top_p", "top_k", "rollout",
                            "rollout_kv_cache_gb", "rollout_eager", "rollout_sleep"),
    "Objective": ("divergence", "alpha", "loss_temperature", "mask_truncated", "skip_first_tokens"),
    "LoRA": ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "Precision, devices and memory": ("bf16", "keep_activations", "fsdp", "dist_timeout_min", "dry_run", "device",
                                      "device_memory_gb", "world_size"),
    "Checkpoints, resuming and logging": ("save_every", "keep_checkpoints", "max_bad_steps", "resume", "extend",
                                          "overwrite", "log_every", "log_samples", "report_to", "push_to_hub",
                                          "hub_private"),
    "Evaluation while training": ("eval_every", "eval_tasks", "eval_limit", "eval_include", "keep_best"),
}


class SectionedCommand(click.Command):
    """A command whose --help lists its options under HELP_SECTIONS' headings instead of one long list."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        for title, names in [*HELP_SECTIONS.items(), ("Options", tuple(n for n in records if not section_of(n)))]:
            rows = [record for name in names if (record := records.get(name))]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def section_of(name: str | None) -> str | None:
    """The help section a parameter is listed under (None: the closing Options section)."""
    return next((title for title, names in HELP_SECTIONS.items() if name in names), None)


class OneLineGroup(click.Group):
    """click's own usage errors (a bad flag value, an unknown option) as one `error:` line, exit 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `unisd`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            fail(e.format_message().replace("\n", " "))
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail_if_expected(e: Exception) -> None:
    """Exit with one line for an error the user can fix; return for a bug (its traceback is wanted).

    The error classes are imported here, not up front: a bad flag is refused before torch is imported.
    """
    from unisd.api import PluginError

    if isinstance(e, (cfg.ConfigError, PluginError)):
        fail(str(e))
    from unisd.api import TrainError
    from unisd.checkpoint import OutputDirError
    from unisd.data import DataError
    from unisd.errors import write_problem
    from unisd.evaluate import EvalError
    from unisd.models import ModelError

    if isinstance(e, (DataError, ModelError, OutputDirError, EvalError)):
        fail(str(e))
    if isinstance(e, TrainError):
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    problem = write_problem(e) if isinstance(e, OSError) else None
    if problem is not None:
        fail(problem)


def errors_are_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's expected errors into `error: ...` + exit 2, with no traceback.

    A failed write (disk full, permission, a file in the way) is one too: unisd.errors says what to do.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            _fail_if_expected(e)
            raise

    return wrapper
