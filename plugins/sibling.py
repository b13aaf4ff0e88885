"""`sibling`: SDPO's teacher context: the teacher is shown a sibling completion that the verifier accepted.

    unisd train ... --num-generations 4 --plugins sibling
    unisd train ... --num-generations 4 --plugins sibling,reward -o sibling.verifier=mypkg.checks:score

With several samples of each prompt (--num-generations), a row's teacher prompt holds, in place of the gold
demonstration, another sample of the same prompt that the verifier (`reward.verified`, or a module:function)
accepted: the first accepted sibling in the micro-batch. A row none of whose siblings was accepted keeps the
gold demonstration. The share of rows shown a sibling is logged as `sibling/shown`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unisd.api import Batch, Outputs, Plugin, RunView
from unisd.data.prompts import teacher_prompt
from unisd.sequences import Prompt
from unisd_plugins.reward import verifier_of


def accepted_siblings(groups: list[int], accepted: list[bool]) -> list[int | None]:
    """For each row, the first other row of its group (same prompt) whose completion was accepted, else None."""
    return [next((j for j, (h, ok) in enumerate(zip(groups, accepted)) if h == g and ok and j != i), None)
            for i, g in enumerate(groups)]


class Sibling(Plugin):
    __doc__ = __doc__
    forwards = 0.0  # it replaces the teacher's prompt, adding no view

    @dataclass(frozen=True)
    class Config:
        verifier: str = "auto"       # auto: the data's own scorer (reward.verified); or module:function

        def __post_init__(self) -> None:
            verifier_of(self.verifier)

    config: Config

    def setup(self, run: RunView) -> None:
        self.tokenizer, self.template = run.tokenizer, run.config.teacher_template
        self.verify = verifier_of(self.config.verifier)
        self.shown = 0.0

    def views(self, batch: Batch) -> dict[str, list[Prompt]]:
        assert batch.tokens is not None and batch.mask is not None
        lengths = batch.mask.sum(-1).long().tolist()
        texts = [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(batch.tokens, lengths)]
        accepted = [bool(self.verify(e, t)) for e, t in zip(batch.examples, texts)]
        siblings = accepted_siblings(batch.indices, accepted)
        self.shown = sum(s is not None for s in siblings) / max(len(siblings), 1)
        return {"teacher": [teacher_prompt(e, texts[s], template=self.template) if s is not None else gold
                            for e, s, gold in zip(batch.examples, siblings, batch.prompts["teacher"])]}

    def weights(self, out: Outputs) -> torch.Tensor | None:
        out.metrics[f"{self.name}/shown"] = self.shown  # logged with the step it belongs to; no weighting
        return None
