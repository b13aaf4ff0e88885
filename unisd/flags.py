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


def _click_type(kind: str, spec: cfg.Flag) -> click.ParamType:
    if spec.choices:
        return click.Choice(spec.choices)
    if kind == "str":
        return click.STRING
    if kind == "int":
        low, high = (None if x is None else int(x) for x in (spec.low, spec.high))
        return click.IntRange(min=low, max=high, min_open=spec.low_open, max_open=spec.high_open)
    return Finite(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)


def trainer_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per `flag` field of TrainConfig, in field order."""
    for f in reversed(dataclasses.fields(cfg.TrainConfig)):
        spec = f.metadata.get("flag")
        if spec is None:
            continue
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            command = click.option(name, is_flag=True, default=None, help=spec.help)(command)
            continue
        shown = f" [{f.default}]" if spec.show_default else ""
        command = click.option(name, type=_click_type(str(f.type), spec), default=None,
                               help=spec.help + shown)(command)
    return command


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
