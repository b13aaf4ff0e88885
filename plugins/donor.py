"""`donor`: the other-demonstration control. The teacher is shown another example's demonstration.

    unisd train ... --preset other-demo                     plain SD whose teacher sees a donor's solution
    unisd ablate ... --baselines other-demo                 the same as a control row beside any plan
    unisd train ... --plugins donor -o donor.pick=retrieval the nearest other task's solution

A teacher shown a *different* solved problem can be competitive with one shown the gold demonstration
(OP²SD, arXiv 2608.09228), so a claim that self-distillation learns from the gold answer needs this row:
same samples, same teacher model, same template, only the demonstration swapped. The primary teacher's
prompt is the run's teacher template (--teacher-template) with a donor's demonstration in place of the
example's own. Each example's donor is fixed at setup: a seeded random other example (`random`) or the
nearest other task by TF-IDF cosine over the tasks (`retrieval`). A donor whose demonstration equals the
example's (a duplicate row) is never used, since it would show the gold answer; a donor whose prompt
exceeds --max-prompt-tokens gives way to the next of `candidates`. An example left without a donor gets
weight 0 (counted at setup and in the metric `donor/no_donor`), so its gold answer never reaches the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from unisd import distributed
from unisd.api import Batch, Outputs, Plugin, RunView
from unisd.data import Example
from unisd.data.prompts import demonstration, teacher_prompt
from unisd.sequences import Prompt, render
from unisd_plugins import _contexts as C


def donors(examples: list[Example], candidates: list[list[int]],
           fits: Callable[[Example, Example], bool]) -> list[int | None]:
    """For each example, the first candidate whose demonstration differs from its own and whose prompt fits."""
    own = [demonstration(e).strip() for e in examples]
    return [next((j for j in ranked if own[j] != own[i] and fits(e, examples[j])), None)
            for i, (e, ranked) in enumerate(zip(examples, candidates))]


class Donor(Plugin):
    __doc__ = __doc__
    forwards = 0.0  # it replaces the teacher's prompt, adding no view

    @dataclass(frozen=True)
    class Config:
        pick: Literal["random", "retrieval"] = "random"
        candidates: int = 8          # donors tried per example, in order, before it is left without one

        def __post_init__(self) -> None:
            if self.pick not in ("random", "retrieval"):
                raise ValueError(f"donor.pick must be random or retrieval, got {self.pick!r}")
            if self.candidates < 1:
                raise ValueError(f"donor.candidates must be at least 1, got {self.candidates}")

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.donor: list[int | None] = []   # example index -> donor index (None: no usable donor)
        self.examples: list[Example] = []
        self.template = ""

    def setup(self, run: RunView) -> None:
        examples = run.examples
        if len(examples) < 2:
            raise ValueError("donor needs at least 2 examples: the teacher is shown *another* example's demonstration")
        pool = min(len(examples) - 1, self.config.candidates)
        if self.config.pick == "random":
            ranked = C.random_donors(len(examples), pool, run.config.seed)
        else:
            ranked = C.retrieval_donors([C.donor_task(e) for e in examples], pool)
        self.examples, self.template = examples, run.config.teacher_template
        limit = run.config.max_prompt_tokens
        self.donor = donors(examples, ranked, lambda e, d: len(render(run.tokenizer, self.prompt(e, d))) <= limit)
        missing = sum(d is None for d in self.donor)
        if missing:
            distributed.say(f"warning: {self.name}: {missing} of {len(examples)} examples have no donor with another "
                            f"demonstration within --max-prompt-tokens; they get weight 0 (metric {self.name}/no_donor)")

    def prompt(self, example: Example, donor: Example) -> Prompt:
        """The run's teacher prompt for `example` with `donor`'s demonstration in place of its own."""
        return teacher_prompt(example, demonstration(donor), template=self.template)

    def views(self, batch: Batch) -> dict[str, list[Prompt]]:
        # an example without a donor is scored under its own student prompt, never its gold answer; weight 0
        # then takes it out of the loss
        donors = [self.donor[i] for i in batch.indices]
        return {"teacher": [self.prompt(e, self.examples[d]) if d is not None else student
                            for e, d, student in zip(batch.examples, donors, batch.prompts["student"])]}

    def weights(self, out: Outputs) -> torch.Tensor:
        has = torch.tensor([self.donor[i] is not None for i in out.batch.indices], device=out.mask.device)
        out.metrics[f"{self.name}/no_donor"] = float(1.0 - has.float().mean())
        return has.to(out.mask.dtype)[:, None]
