"""`mix`: train some micro-batches on completions that are not the student's own sample.

With probability `prob` a micro-batch's completions come from `source` instead of the on-policy
student: `gold`, the dataset's demonstration (SFT and GKD's off-policy share), or `base`, a sample
of the frozen initial model with the run's sampling settings (--temperature, --top-p, --top-k; SSD).
The draw uses the plugin's own seeded generator, saved with the checkpoint, so resumes are exact; it
is seeded alike on every rank, so all ranks draw the same way (sharded sampling needs every rank to
decode together).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unisd.data.prompts import demonstration
from unisd.api import Batch, Plugin, RunView
from unisd.rollout import Rollout, from_texts
from unisd.sequences import render


class Mix(Plugin):
    forwards = 0.0  # no view of its own
    needs_teacher = False  # it supplies completions; scoring them is the objective's business

    @dataclass(frozen=True)
    class Config:
        source: str = "gold"       # gold | base
        prob: float = 1.0          # probability that a micro-batch uses `source`

        def __post_init__(self) -> None:
            if self.source not in ("gold", "base"):
                raise ValueError(f"mix.source must be gold or base, got {self.source!r}")
            if not 0.0 <= self.prob <= 1.0:
                raise ValueError(f"mix.prob must be in [0, 1], got {self.prob}")

    config: Config

    def setup(self, run: RunView) -> None:
        self.generator = torch.Generator().manual_seed(run.config.seed + 7)

    def completions(self, batch: Batch, run: RunView) -> Rollout | None:
        if torch.rand((), generator=self.generator).item() >= self.config.prob:
            return None
        c = run.config
        if self.config.source == "gold":
            return from_texts(run.tokenizer, [demonstration(e) for e in batch.examples], c.max_new_tokens)
        prompts = [render(run.tokenizer, p) for p in batch.prompts["student"]]
        return run.policy.sample(prompts, c.max_new_tokens, c.temperature, c.top_p, top_k=c.top_k, initial=True)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
