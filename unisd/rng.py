"""Every random generator's state (torch, CUDA, Python, NumPy): saved for an exact resume, and restored
around code that would otherwise disturb the run's own draws (an engine that seeds at start).

CUDA: only the current device's generator, the one this process draws from (under torchrun each rank has
its own device). `get_rng_state_all` would store one state per visible GPU, and a resume on a machine that
shows fewer GPUs could not restore them. NumPy's state is held as plain lists and numbers, so a checkpoint
loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, keys.tolist(), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
