"""`reward`: a verifier's reward added to the distillation loss as a policy-gradient term.

    unisd train ... --plugins reward -o reward.weight=0.5                    the data's own verifier
    unisd train ... --num-generations 4 --plugins reward                     group-normalised advantages
    unisd train ... --plugins reward -o reward.verifier=mypkg.checks:score   a function (example, text) -> float

verl (`use_task_rewards`), Tinker, TRL's SDPO trainer and prime-rl mix a verifier's reward with the
distillation signal; unisd ships verifiers (exact answers, the MBPP/HumanEval sandbox, ToolAlpaca's action
match: `unisd.data.scoring.score`). Each sampled completion i gets a reward r_i and an advantage A_i:

    G > 1 samples of a prompt (--num-generations): A_i = (r_i - mean_group r) / (std_group r + 1e-6), as GRPO;
    one sample per prompt: A_i = r_i - mean of the micro-batch's rewards (a batch-mean baseline);

and the term is  L = -weight · (1/R) Σ_i A_i · (Σ_t m_t log π(y_t) / Σ_t m_t)  over the R rows, the log-probs of
the sampled tokens (at temperature 1) with gradient, each sequence's mean as the core's loss takes it. Logged:
`reward/mean` (the raw reward) and `reward/share` (the term's share of the loss).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from unisd.api import Outputs, Plugin, RunView
from unisd.data import Example
from unisd.data import scoring, verify

Verifier = Callable[[Example, str], float]


def verified(example: Example, completion: str) -> float:
    """The benchmark's own scorer (its headline metric: full_acc for ToolAlpaca), or for data of one's own
    whether the final answer is the gold answer (whitespace, case and a final period aside)."""
    if example.meta.get("benchmark"):
        found = scoring.score(completion, example.meta)
        return float(found.get("full_acc", next(iter(found.values()))))
    return float(verify.normalized(verify.final_answer(completion)) == verify.normalized(example.answer))


def verifier_of(name: str) -> Verifier:
    """`auto` (`verified`), or a function named `module:function` that takes (example, completion) -> score."""
    if name == "auto":
        return verified
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"reward.verifier {name!r}: expected auto or module:function naming an importable "
                         "function (example, completion) -> score") from None


def advantages(rewards: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Group-normalised advantages where a prompt has siblings in the micro-batch, else reward minus the batch mean."""
    out = torch.empty_like(rewards)
    for g in set(groups):
        rows = torch.tensor([i for i, x in enumerate(groups) if x == g])
        if len(rows) > 1:
            r = rewards[rows]
            out[rows] = (r - r.mean()) / (r.std() + 1e-6)
        else:
            out[rows] = rewards[rows] - rewards.mean()
    return out


def policy_gradient(logps: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """-(1/R) Σ_i A_i · mean_t log π(y_t) over each row's counted tokens (logps and mask [R, T], advantage [R])."""
    m = mask.to(logps.dtype)
    per_row = (logps * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return -(advantage.to(logps.dtype).detach() * per_row).mean()


class Reward(Plugin):
    __doc__ = __doc__
    forwards = 0.0  # the student's own log-probs: no view of its own
    needs_teacher = False

    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0          # the term's weight beside the distillation loss
        verifier: str = "auto"       # auto: the data's own scorer; or module:function

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ValueError(f"reward.weight must be >= 0, got {self.weight}")
            verifier_of(self.verifier)

    config: Config

    def setup(self, run: RunView) -> None:
        self.tokenizer = run.tokenizer
        self.verify = verifier_of(self.config.verifier)

    def rewards(self, out: Outputs) -> torch.Tensor:
        """Each row's reward for its sampled completion (decoded from the sampled tokens)."""
        batch = out.batch
        assert batch.tokens is not None and batch.mask is not None
        lengths = batch.mask.sum(-1).long().tolist()
        texts = [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(batch.tokens, lengths)]
        return torch.tensor([self.verify(e, t) for e, t in zip(batch.examples, texts)], dtype=torch.float32)

    def aux_losses(self, out: Outputs) -> dict[str, Any]:
        rewards = self.rewards(out)
        out.metrics[f"{self.name}/mean"] = float(rewards.mean())
        advantage = advantages(rewards, out.batch.indices).to(out.mask.device)
        return {self.name: self.config.weight * policy_gradient(out.logps["student"], out.mask, advantage)}
