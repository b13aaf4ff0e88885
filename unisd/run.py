"""The state of one training run (`Run`): its policy (the weights and their forms), data, plugins, schedule.

`Run` is what `unisd.train` steps and `unisd.checkpoint` saves; plugins see it through the narrower
`unisd.api.RunView`. The data order lives here too: it is a property of the run (data, seed, schedule),
never of its plugins.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from unisd import distributed
from unisd.api import Plugin
from unisd.config import TrainConfig
from unisd.data import Example
from unisd.hooks import Hooks
from unisd.monitor import TruncationWatch
from unisd.policy import Policy


@dataclass
class Run:
    """Everything a step and the plugins work on."""

    config: TrainConfig
    policy: Policy                     # the student's weights and every form of them (unisd.policy)
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    hooks: Hooks                       # the selected plugins, called through one host
    world: distributed.World
    out: Path
    kept: list[int] = field(default_factory=list)   # indices of examples whose prompts fit
    total_steps: int = 0
    step: int = 0                      # optimizer steps done
    position: int = 0                  # examples consumed
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    bad_steps: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl rows of the last step (rank 0)
    best: dict[str, Any] = field(default_factory=dict)  # --keep-best: {task, score, step} of the model in DIR/best
    teacher_tokenizer: PreTrainedTokenizerBase | None = None  # the teacher views' (--teacher-chat-template-kwargs)
    truncation: TruncationWatch | None = None  # the collapse warning's state, checkpointed (set by unisd.train)

    @property
    def plugins(self) -> list[Plugin]:
        """The selected plugins, in command-line order."""
        return self.hooks.plugins

    @property
    def needs_teacher(self) -> bool:
        """Whether a step scores with a teacher: a divergence to it, or a plugin that reads its outputs.

        SFT and SSD (--divergence ce) then cost a student forward and backward: no teacher model is loaded."""
        return needs_teacher(self.config, self.plugins)

    def order(self) -> list[int]:
        """Indices into `examples` of every example the whole schedule consumes, in order."""
        c = self.config
        positions = self.total_steps * c.batch_size * c.grad_accum * self.world.size
        return [self.kept[i] for i in order_slice(len(self.kept), c.order_seed, 0, positions)]

    def scheduled(self) -> list[int]:
        """The examples the schedule draws, ascending: setup work (negatives, contexts) is needed for
        these only, so a short run on a large data set does not prepare what it never sees."""
        return sorted(set(self.order()))


TEACHER_OBJECTIVES = ("fkl", "rkl", "jsd")  # the --divergence values that compare the student with a teacher


def needs_teacher(config: TrainConfig, plugins: list[Plugin]) -> bool:
    """A divergence to the teacher, or a plugin that reads the teacher's outputs (`Plugin.needs_teacher`)."""
    return config.divergence in TEACHER_OBJECTIVES or any(p.needs_teacher for p in plugins)


def order_slice(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start+count) of an endless sequence of seeded permutations of range(n)."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.extend(perm[offset: offset + count - len(out)])
    return out


def data_order(run: Run) -> dict[str, Any]:
    """The ids of every example the whole schedule consumes, in order, as a sha256 and a count.

    Equal for runs with the same data, seed, prompt limit and schedule, whatever their plugins, so a
    comparison can check that its runs saw the same data.
    """
    ids = [str(run.examples[i].meta.get("task_id", i)) for i in run.order()]
    digest = hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"order_sha256": digest, "order_count": len(ids), "examples": len(run.kept)}
