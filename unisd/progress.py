"""What a run prints about its progress where no progress bar shows (a log file, CI, a cluster job).

`StepLog` gives one line every N optimizer steps and at the last, as transformers' `logging_steps` does;
`phase` frames a setup phase that may take minutes (contexts, negatives, engine start) with a line before
and one with its time after. Plugins call `phase` around their own long setup work.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from unisd import distributed


def duration(seconds: float) -> str:
    """`42 s`, `5 min 07 s`, `2 h 03 min`: short enough for a log line, exact enough to plan by."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def bar_shows() -> bool:
    """Whether tqdm draws its bars (it draws on stderr, and only on a terminal)."""
    return sys.stderr.isatty()


class StepLog:
    """`line(metrics)`: the progress line of an optimizer step that should have one, else None.

    The time left is the mean step time of this process's steps times the steps to go, so a resumed run
    estimates from its own steps.
    """

    def __init__(self, every: int, total: int) -> None:
        self.every, self.total = every, total
        self.seconds = 0.0
        self.steps = 0

    def line(self, metrics: dict[str, Any]) -> str | None:
        step = int(metrics["step"])
        self.seconds += metrics["step_time_s"]
        self.steps += 1
        if not self.every or (step % self.every and step != self.total):
            return None
        left = self.seconds / self.steps * (self.total - step)
        return (f"step {step}/{self.total}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.3g}, "
                f"{metrics['step_time_s']:.2f} s/step, {duration(left)} left")


@contextlib.contextmanager
def phase(what: str, say: Callable[[str], None] = distributed.say) -> Iterator[None]:
    """`with phase("contrast: negatives for 96 examples"):` prints `... ...` before and `...: done in 2 min 23 s`
    after (rank 0 only, on stderr), so a long setup is never silent."""
    say(f"{what} ...")
    started = time.perf_counter()
    yield
    say(f"{what}: done in {duration(time.perf_counter() - started)}")
