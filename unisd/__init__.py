"""unisd: a compact self-distillation trainer for causal LMs, each UniSD mechanism a plugin.

The library in three names (the command line's `unisd train --config`, `unisd eval`):

    from unisd import TrainConfig, evaluate, load_config, train

    folder = train(load_config("run.yaml", max_steps=20))   # a config file, keyword arguments winning
    folder = train(TrainConfig(model="smollm2-135m", data="train.jsonl", out="runs/x", plugins=("ema", "clip")))
    evaluate({"x": str(folder)}, ["unisd_cose"], "eval/")

`train(config)` trains and returns the run's output folder (unisd.train.train); `evaluate(models, tasks, out)`
scores checkpoints with lm-eval and writes a table (unisd.evaluate.evaluate). The names load on first use, so
`import unisd` (and the command line's flag checks) do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainConfig", "evaluate", "load_config", "train", "__version__"]

_LAZY = {"TrainConfig": ("unisd.config", "TrainConfig"), "load_config": ("unisd.config_file", "load_config")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    if name in ("train", "evaluate"):  # callable modules: unisd.callable_module
        return importlib.import_module(f"unisd.{name}")
    raise AttributeError(f"module 'unisd' has no attribute {name!r}")
