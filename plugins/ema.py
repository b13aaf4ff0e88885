"""EMA teacher (UniSD paper §2.2, Eq. 3): the primary teacher follows a slow average of the student.

    unisd train ... --plugins ema -o ema.beta=0.9 -o ema.every=10

θ̄ ← β·θ̄ + (1−β)·θ every `every` optimizer steps (θ̄ initialised to θ, Algorithm 1), where θ are the
student's *effective* weights (`run.policy.student.weights()`: base + scaled LoRA delta). The teacher
is a plain frozen model (`run.policy.follower()`), scored under the gold-demonstration prompt (it
replaces the frozen initial model as the primary teacher; agree/contrast views use it too).

Difference from the official code: its sync callback skips LoRA parameters and averages only the
frozen base weights, so under LoRA (always on there) its EMA teacher never moves from the base model.
Here the teacher follows the student under LoRA too. Under LoRA it is, as in TRL's SDFT trainer, a second adapter
on the student's own base whose factors A, B follow the student's (`run.policy.follow_student`): no second copy of
the base. A product of averages is not the average of products, so this teacher differs slightly from an average
of the merged weights (the full copy kept under --fsdp and without LoRA; measured in docs/differences.md).

The metric `ema/distance` is ‖θ̄ − θ‖ / ‖θ‖ just before the latest update: how far the student had
moved from its teacher, i.e. how much the EMA held it back.

The policy holds the teacher like the student (sharded under `--fsdp`: each rank averages only its own
shards). The average itself is always kept in fp32 (a bf16 average would round away most updates); with
`--bf16` (and on CUDA) a full copy's forwards run on what the policy scores with (`run.policy.for_scoring`: a
copy with bf16 linear layers where the student is not sharded), refreshed after every update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unisd import distributed
from unisd.api import Outputs, Plugin, RunView

if TYPE_CHECKING:
    from unisd.policy import Model, Policy


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
        self.average: Model | None = None  # θ̄, fp32 (a second adapter under LoRA)
        self.scorer: Model | None = None   # what scores: the average, or its copy made for scoring (--bf16)
        self.updates = 0
        self.distance = 0.0   # relative teacher-student distance before the latest update

    def setup(self, run: RunView) -> None:
        self.average = run.policy.follower()  # θ̄ ← θ exactly
        self.scorer = run.policy.for_scoring(self.average)

    def _average(self) -> Model:
        assert self.average is not None and self.scorer is not None, "ema: setup was not called"
        return self.average

    @torch.no_grad()
    def update(self, policy: Policy, beta: float | None = None) -> None:
        """θ̄ ← β·θ̄ + (1−β)·θ over every parameter, θ = the student's effective weights."""
        beta = self.config.beta if beta is None else beta
        policy.follow_student(self._average(), 1.0 - beta)
        self._refresh()

    def _refresh(self) -> None:
        assert self.scorer is not None
        if self.scorer is not self.average:
            self.scorer.follow(self._average().weights())

    def teacher(self, run: RunView) -> Model | None:
        return self.scorer

    def after_step(self, run: RunView) -> None:
        if run.step % self.config.every == 0:
            self.distance = self.relative_distance(run.policy)
            self.update(run.policy)
            self.updates += 1

    @torch.no_grad()
    def relative_distance(self, policy: Policy) -> float:
        """‖θ̄ − θ‖ / ‖θ‖ over all weights: how far the student moved from its teacher since the last update."""
        diff = total = 0.0
        for (name, theta), (same, average) in zip(policy.student.weights(), self._average().weights(), strict=True):
            assert name == same, f"ema: weights out of order ({name} vs {same})"
            theta = theta.float()
            diff += float((average.float() - theta).pow(2).sum())
            total += float(theta.pow(2).sum())
        return (diff / total) ** 0.5 if total else 0.0

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        out.metrics[f"{self.name}/distance"] = self.distance  # logged only: the divergence is unchanged
        return D

    def state_dict(self) -> dict[str, Any]:
        # every rank gathers the shards (a collective); only rank 0, which writes checkpoints, keeps a CPU copy
        main = distributed.is_main()
        weights = {k: v.to("cpu", copy=True) for k, v in self._average().own() if main}
        return {"weights": weights, "updates": self.updates, "distance": self.distance}  # logged until the next update

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self._average().load_own(state["weights"])
        except ValueError:
            raise ValueError("ema: the checkpoint's teacher weights do not match this model") from None
        self._refresh()
        self.updates = int(state.get("updates", 0))
        self.distance = float(state.get("distance", 0.0))
