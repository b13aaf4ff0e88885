"""Send each step's metrics and the resolved configuration to the experiment trackers users already run.

Each tracker is the tool's own library, installed as an extra (`pip install 'unisd[tensorboard]'`) and
configured the tool's usual way (WANDB_*, TRACKIO_*, MLFLOW_* environment variables). metrics.jsonl
stays the record written whatever is chosen; the trackers get the same rows. Only rank 0 reports.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

from unisd.config import ConfigError


class _TensorBoard:
    def __init__(self, name: str, config: Mapping[str, Any], out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _RunLike:
    """A tracker whose `init` returns a run object with `log(values, step=)` and `finish()` (wandb, trackio)."""

    run: Any

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class _Wandb(_RunLike):
    def __init__(self, name: str, config: Mapping[str, Any], out: Path) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "unisd"), name=name, config=dict(config),
                              dir=str(out))


class _Trackio(_RunLike):
    def __init__(self, name: str, config: Mapping[str, Any], out: Path) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "unisd"), name=name, config=dict(config))


class _MLflow:
    def __init__(self, name: str, config: Mapping[str, Any], out: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "unisd"))
        mlflow.start_run(run_name=name)
        mlflow.log_params(_flat(config))  # mlflow parameters are flat strings

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(values), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


# name -> tracker; each name is also its extra and the module its library installs
TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}


def parse(text: str) -> tuple[str, ...]:
    """`--report-to` as tracker names; an unknown name or a missing extra is a ConfigError before any work."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip() not in ("", "none")))
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name}: unknown tracker; choose from none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs its library: pip install 'unisd[{name}]'")
    return names


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class Trackers(contextlib.AbstractContextManager):
    """The chosen trackers as one: `log` sends them a metrics.jsonl row; leaving the block closes them."""

    def __init__(self, names: tuple[str, ...], config: Mapping[str, Any], out: Path) -> None:
        self._open: list[Any] = []
        try:
            for name in names:
                self._open.append(TRACKERS[name](out.name, config, out))
        except BaseException:
            self.__exit__()  # close those already started
            raise

    def log(self, metrics: Mapping[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self._open:
            tracker.log(values, int(metrics["step"]))

    def __exit__(self, *exc: Any) -> None:
        for tracker in self._open:
            tracker.close()
