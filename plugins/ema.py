"""EMA teacher (UniSD paper §2.2, Eq. 3): the primary teacher follows a slow average of the student.

    unisd train ... --plugins ema -o ema.beta=0.9 -o ema.every=10

θ̄ ← β·θ̄ + (1−β)·θ every `every` optimizer steps (θ̄ initialised to θ, Algorithm 1), where θ are the
student's *effective* weights (`unisd.models.effective_weights`: base + scaled LoRA delta). The teacher
is a plain transformers model in eval mode without gradients, scored under the gold-demonstration
prompt (it replaces the frozen initial model as the primary teacher; agree/contrast views use it too).

Difference from the official code: its sync callback skips LoRA parameters and averages only the
frozen base weights, so under LoRA (always on there) its EMA teacher never moves from the base model.
Here the teacher follows the merged weights, with or without LoRA.

The metric `ema/distance` is ‖θ̄ − θ‖ / ‖θ‖ just before the latest update: how far the student had
moved from its teacher, i.e. how much the EMA held it back.

Under `--fsdp` the teacher is sharded like the student, so each rank averages only its own shards.
The average itself is always kept in fp32 (a bf16 average would round away most updates); with
`--bf16` the teacher's forwards run on a copy whose linear layers are bf16 (`models.bf16_linears`),
refreshed after every update.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from unisd import distributed, models
from unisd.api import Outputs, Plugin, RunView


class EMA(Plugin):
    __doc__ = __doc__

    @dataclass(frozen=True)
    class Config:
        beta: float = 0.9     # β of Eq. 3 (official `ema` run: 0.9; UniSD*: 0.98)
        every: int = 10       # optimizer steps between updates (official ref_model_sync_steps: 10)

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta <= 1.0:
                raise ValueError(f"ema.beta must be in [0, 1], got {self.beta}")
            if self.every < 1:
                raise ValueError(f"ema.every must be at least 1, got {self.every}")

    config: Config
    needs_teacher = False  # it supplies the teacher and reads none of its outputs

    @classmethod
    def extra_forwards(cls, options: dict[str, Any]) -> float:
        return 1.0 / float(options["every"])  # a weight average costs about one forward

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.model: torch.nn.Module | None = None
        self.encoder: Any = None  # the model's encoder in the run (sharded under --fsdp)
        self.scorer: torch.nn.Module | None = None   # what scores: the average, or its bf16 copy (--bf16)
        self.updates = 0
        self.distance = 0.0   # relative teacher-student distance before the latest update

    def setup(self, run: RunView) -> None:
        student = run.student
        # a plain model holding the student's effective weights (LoRA merged into a copy)
        plain = copy.deepcopy(student).merge_and_unload() if models.is_peft(student) else copy.deepcopy(student)
        self.model = plain.requires_grad_(False).eval()
        missing = set(self._params()) - set(models.effective_weights(student))
        if missing:
            raise ValueError(f"ema: the student has no weights for {sorted(missing)[:3]}")
        self.scorer = models.bf16_linears(copy.deepcopy(self.model)) if run.config.bf16 else self.model
        self.update(student, beta=0.0)  # θ̄ ← θ exactly
        self.encoder = run.encoder(self.model)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        """The stored weights: a sharded teacher is resharded first (a forward leaves its root gathered)."""
        assert self.model is not None, "ema: setup was not called"
        if self.encoder is not None and distributed.is_sharded(self.encoder):
            self.encoder.reshard()
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def update(self, student: torch.nn.Module, beta: float | None = None) -> None:
        """θ̄ ← β·θ̄ + (1−β)·θ over every parameter, θ = the student's effective weights."""
        beta = self.config.beta if beta is None else beta
        current = models.effective_weights(student)
        for name, p in self._params().items():
            p.lerp_(current[name].to(p.dtype), 1.0 - beta)
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        if self.scorer is not None and self.scorer is not self.model:
            master = self._params()
            for name, p in self.scorer.named_parameters():
                p.copy_(master[name])

    def teacher(self, run: RunView) -> torch.nn.Module | None:
        return self.scorer

    def after_step(self, run: RunView) -> None:
        if run.step % self.config.every == 0:
            self.distance = self.relative_distance(run.student)
            self.update(run.student)
            self.updates += 1

    @torch.no_grad()
    def relative_distance(self, student: torch.nn.Module) -> float:
        """‖θ̄ − θ‖ / ‖θ‖ over all weights: how far the student moved from its teacher since the last update."""
        current = models.effective_weights(student)
        diff = total = 0.0
        for name, p in self._params().items():
            theta = distributed.whole(current[name].detach()).float()
            diff += float((distributed.whole(p.detach()).float() - theta).pow(2).sum())
            total += float(theta.pow(2).sum())
        return (diff / total) ** 0.5 if total else 0.0

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        out.metrics[f"{self.name}/distance"] = self.distance  # logged only: the divergence is unchanged
        return D

    def state_dict(self) -> dict[str, Any]:
        weights = {k: distributed.whole(v.detach()).to("cpu", copy=True) for k, v in self._params().items()}  # every rank
        return {"weights": weights, "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        if set(state["weights"]) != set(params):
            raise ValueError("ema: the checkpoint's teacher weights do not match this model")
        for name, p in params.items():
            distributed.assign(p, state["weights"][name])
        self._refresh()
        self.updates = int(state.get("updates", 0))
