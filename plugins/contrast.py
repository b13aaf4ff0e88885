"""Token-level contrastive learning (UniSD paper §2.2, Eqs. 4–5): stay near the good teacher, away from a bad one.

    unisd train ... --plugins contrast -o contrast.weight=0.1 -o contrast.margin=0.5

ℓθ_t = log π_θ(ŷ_t | x) (student, grad), ℓ⁺_t = log π_T(ŷ_t | x, y⁺) (primary teacher, gold demo),
ℓ⁻_t = log π_T(ŷ_t | x, y⁻) (teacher shown a wrong demo, via `teacher_prompt(example, demo=y⁻)`):

    L = weight · mean_b [ Σ_t m_t max(0, margin + |ℓθ_t − ℓ⁺_t| − |ℓθ_t − ℓ⁻_t|) / Σ_t m_t ]

over the sequences that have a negative. Negatives are generated once at setup by the model itself
(batched, seeded, with up to `max_new_tokens` tokens: the run's --max-new-tokens unless set; the official
job allows 1024): a wrong option with
an argument for it (multiple choice), code with a planted bug (MBPP/HumanEval), a corrupted tool call
(ToolAlpaca), or the model's own attempt at the question (plain JSONL), each asked after the example's
earlier turns (system prompt, conversation), as its student prompt is.

Differences from the official code, which uses its negatives unchecked:
- each negative is **verified wrong** with the benchmark's checker: multiple choice on its reasoning
  (the option the argument itself names must be the wrong one assigned, not the gold one); code fails
  its tests in `unisd.sandbox`; a ReAct tool call that parses and differs from the gold calls; plain
  data: the Answer line does not contain the gold answer as a word;
- a reply that hit `max_new_tokens` is never used (a program or tool call cut mid-way fails its check
  without being wrong); such replies are counted and reported at setup;
- a negative has exactly the gold demonstration's format (reasoning only where the gold shows
  reasoning; bare code where the gold is bare code), so ℓ⁺ and ℓ⁻ differ in content only;
- a negative whose prompt would exceed --max-prompt-tokens is unused (the example still trains).
Failed examples are regenerated up to `tries` times; those still without one are counted, reported at
setup and as the metric `contrast/no_negative`, and their rows are masked out of this term (they still
train on the main loss), never dropped. `contrast/active` is the share of counted tokens whose hinge is
non-zero. The cache is keyed by a sha256 of the data, the model weights and the settings. Log-probs are
at temperature 1 (official: 0.7).
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from unisd import distributed, generation, losses
from unisd.data import Example
from unisd.data import scoring as S
from unisd.data import verify
from unisd.data.prompts import TEACHER_TEMPLATE, demonstration, in_context, teacher_prompt
from unisd.api import Batch, Outputs, Plugin, RunView
from unisd.sequences import Prompt, render

BUGS = ("off-by-one error", "wrong operator", "missing edge case", "wrong return value")
TOOL_CORRUPTIONS = ("wrong action", "wrong arguments", "extra tool call")


def hinge(student: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-token hinge [B, T]: max(0, margin + |ℓθ − ℓ⁺| − |ℓθ − ℓ⁻|); only ℓθ carries gradient."""
    return torch.relu(margin + (student - positive.detach()).abs() - (student - negative.detach()).abs())


def negative_request(example: Example, rng: random.Random) -> tuple[str, Any]:
    """(generation prompt, what `negative_demo` needs) for one example, by the kind of its checker."""
    meta, bench = example.meta, example.meta.get("benchmark")
    if S.is_multiple_choice(meta):
        n = int(meta["n_options"])
        letter = rng.choice([x for x in S.LETTERS[:n] if x != meta["gold"]])
        options = meta.get("options") or []
        text = f" ({options[S.LETTERS.index(letter)]})" if len(options) == n else ""
        return (f"You are simulating a confident student who made a mistake.\n\n{example.prompt}\n\n"
                f"Argue convincingly, in 2-4 sentences, that the answer is {letter}{text}. "
                "Reply with the argument only."), letter
    if bench in S.CODE_BENCHMARKS:
        return (f"{example.prompt}\n\nWrite a Python solution that LOOKS correct but has a {rng.choice(BUGS)}, "
                "so that it fails at least one test. Reply with one ```python code block only."), None
    if bench == "toolalpaca":
        return (f"{example.prompt}\n\nA correct response is:\n{example.answer}\n\nWrite a plausible but WRONG "
                f"response in the same format, with a {rng.choice(TOOL_CORRUPTIONS)}."), None
    # plain data: the model's own attempt, kept only when its answer is wrong: a mistake it really makes
    # (asked to invent a wrong answer to a demo sum, SmolLM2-135M produced a usable one for 6 of 96)
    return f"{example.prompt}\n\nEnd with a final line 'Answer: <your answer>'.", None


def negative_demo(example: Example, reply: str, extra: Any) -> str | None:
    """The negative demonstration built from a reply, in exactly the positive demonstration's format, or
    None unless the benchmark's checker says it is wrong (`unisd.data.verify`)."""
    meta, bench = example.meta, example.meta.get("benchmark")
    reply = reply.strip()
    if S.is_multiple_choice(meta):
        # the reasoning must itself argue for the wrong letter we assigned, not merely end with it
        if not reply or extra == meta["gold"] or verify.argued_option(reply, meta) != extra:
            return None
        return _like_positive(example, extra, reply)
    if bench in S.CODE_BENCHMARKS:
        return verify.failing_code(reply, meta)  # the positive is bare code: no fenced block
    if bench == "toolalpaca":
        return reply if verify.wrong_tool_call(reply, meta) else None
    answer = verify.wrong_final_answer(reply, example.answer)
    if answer is None:
        return None
    reasoning = re.split(r"(?im)^\s*(?:final\s+)?answer\s*:", reply)[0].strip()
    return _like_positive(example, answer, reasoning)


def _like_positive(example: Example, answer: str, reasoning: str) -> str:
    """`answer` (with `reasoning` when the gold demonstration shows reasoning) in the gold demonstration's format."""
    return demonstration(dataclasses.replace(example, answer=answer,
                                             rationale=reasoning if example.rationale.strip() else ""))


@dataclass(frozen=True)
class Negatives:
    """The negatives of a data set and why the others are missing, counted over every try."""

    demos: list[str | None]
    cut_off: int = 0     # replies that hit max_new_tokens: unfinished, so never taken as wrong
    not_wrong: int = 0   # finished replies the checker did not confirm as wrong


def build_negatives(policy: Any, examples: list[Example], seed: int, max_new_tokens: int, tries: int) -> Negatives:
    """One verified-wrong, finished negative demonstration per example (None where every try failed), sampled
    from the student (`RunView.policy`) as the run samples."""
    negatives: list[str | None] = [None] * len(examples)
    cut_off = not_wrong = 0
    for attempt in range(tries):
        todo = [i for i, neg in enumerate(negatives) if neg is None]
        if not todo:
            break
        requests = [negative_request(examples[i], random.Random(f"{seed}:{attempt}:{i}")) for i in todo]
        # asked as the example's last user turn: a multi-turn example's attempt sees its whole conversation
        asked = [in_context(examples[i], text) for i, (text, _) in zip(todo, requests)]
        replies = generation.generate(policy, asked, max_new_tokens, seed + attempt,
                                      desc=f"negatives (try {attempt + 1} of {tries})")
        for i, (_, extra), (reply, finished) in zip(todo, requests, replies):
            if not finished:
                cut_off += 1
                continue
            negatives[i] = negative_demo(examples[i], reply, extra)
            not_wrong += negatives[i] is None
    return Negatives(negatives, cut_off, not_wrong)


class Contrast(Plugin):
    __doc__ = __doc__
    forwards = 1.0  # the negative view

    @dataclass(frozen=True)
    class Config:
        weight: float = 0.1          # λ (official contrastive run: 0.1; UniSD*: 0.01)
        margin: float = 0.5          # hinge margin (official contrastive run: 0.5; UniSD*: 0.1)
        tries: int = 2               # generation attempts per example before it counts as without negative
        max_new_tokens: int = 0      # room to finish (0: the run's --max-new-tokens; official: 1024); cut-off replies unused

        def __post_init__(self) -> None:
            if self.weight < 0 or self.margin < 0:
                raise ValueError("contrast.weight and contrast.margin must be >= 0")
            if self.tries < 1 or self.max_new_tokens < 0:
                raise ValueError("contrast.tries must be at least 1 and contrast.max_new_tokens 0 (the run's) or more")

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.negatives: list[str | None] = []
        self.template = TEACHER_TEMPLATE

    @property
    def view(self) -> str:
        return f"{self.name or 'contrast'}:negative"

    def setup(self, run: RunView) -> None:
        c, seed = dataclasses.replace(self.config, max_new_tokens=self.config.max_new_tokens or run.config.max_new_tokens), \
            run.config.seed
        drawn = run.scheduled()  # only the examples this run's schedule reaches need a negative
        examples = [run.examples[i] for i in drawn]
        key = {"kind": "negatives-v4", "data": generation.data_digest(examples), "model": run.config.model,
               "weights": generation.model_digest(run.policy), "seed": seed, "tokens": c.max_new_tokens, "tries": c.tries}
        found = Negatives(**generation.cached("contrast", key, lambda: dataclasses.asdict(build_negatives(
            run.policy, examples, seed, c.max_new_tokens, c.tries))))
        # the negative view must fit like every other prompt; one that does not is unused, not the example
        limit = run.config.max_prompt_tokens
        fits = [neg is not None and len(render(run.tokenizer, teacher_prompt(e, neg, run.config.teacher_template))) <= limit
                for e, neg in zip(examples, found.demos)]
        self.negatives = [None] * len(run.examples)
        self.template = run.config.teacher_template
        for i, neg, ok in zip(drawn, found.demos, fits):
            self.negatives[i] = neg if ok else None
        too_long = sum(neg is not None for neg in found.demos) - sum(fits)
        missing = len(drawn) - sum(fits)
        if missing:
            distributed.say(f"warning: {self.name}: {missing} of {len(drawn)} examples have no verified-wrong "
                            f"negative ({found.cut_off} replies cut off at {c.max_new_tokens} tokens, {found.not_wrong} "
                            f"not confirmed wrong, {too_long} too long for --max-prompt-tokens {limit}); they get no "
                            f"contrastive term (metric {self.name}/no_negative)")

    def views(self, batch: Batch) -> dict[str, list[Prompt]]:
        # rows without a negative are scored under the gold prompt and masked out in aux_losses
        return {self.view: [teacher_prompt(e, self.negatives[i], self.template) for i, e in zip(batch.indices, batch.examples)]}

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        has = torch.tensor([self.negatives[i] is not None for i in out.batch.indices],
                           dtype=out.mask.dtype, device=out.mask.device)
        out.metrics[f"{self.name}/no_negative"] = float(1.0 - has.mean())
        c = hinge(out.logps["student"], out.logps["teacher"], out.logps[self.view], self.config.margin)
        counted = out.mask * has[:, None]
        out.metrics[f"{self.name}/active"] = float(((c.detach() > 0) * counted).sum() / counted.sum().clamp_min(1.0))
        return {self.name or "contrast": self.config.weight * losses.weighted_mean(c, counted)}
