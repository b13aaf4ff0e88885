"""Token-level contrastive learning (UniSD paper §2.2, Eqs. 4–5): stay near the good teacher, away from a bad one.

    unisd train ... --plugins contrast -o contrast.weight=0.1 -o contrast.margin=0.5

ℓθ_t = log π_θ(ŷ_t | x) (student, grad), ℓ⁺_t = log π_T(ŷ_t | x, y⁺) (primary teacher, gold demo),
ℓ⁻_t = log π_T(ŷ_t | x, y⁻) (teacher shown a wrong demo, via `teacher_prompt(example, demo=y⁻)`):

    L = weight · mean_b [ Σ_t m_t max(0, margin + |ℓθ_t − ℓ⁺_t| − |ℓθ_t − ℓ⁻_t|) / Σ_t m_t ]

over the sequences that have a negative. Negatives are generated once at setup by the model itself
(batched, short, seeded): a wrong option with an argument for it (multiple choice), code with a planted
bug (MBPP/HumanEval), a corrupted tool call (ToolAlpaca), or a confident wrong answer (plain JSONL).
Differences from the official code: each negative is **verified wrong** with the benchmark's checker
(letter ≠ gold; code fails its tests in `unisd.sandbox`; tool calls ≠ gold; plain data: the extracted
answer does not contain the gold answer as a word) and regenerated up to `tries` times; examples still without one are counted,
reported at setup and as the metric `contrast/no_negative`, and their rows are masked out of this
term (they still train on the main loss) — never silently dropped. The cache is keyed by a sha256 of
the data, the model weights and the settings. Log-probs are at temperature 1 (official: 0.7).
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unisd import losses
from unisd.data import Example
from unisd.data import scoring as S
from unisd.data.prompts import teacher_prompt
from unisd.plugin import Plugin
from unisd_plugins import _contexts as C

if TYPE_CHECKING:
    from unisd.train import Batch, Outputs, Run

BUGS = ("off-by-one error", "wrong operator", "missing edge case", "wrong return value")
TOOL_CORRUPTIONS = ("wrong action", "wrong arguments", "extra tool call")


def hinge(student: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-token hinge [B, T]: max(0, margin + |ℓθ − ℓ⁺| − |ℓθ − ℓ⁻|); only ℓθ carries gradient."""
    return torch.relu(margin + (student - positive.detach()).abs() - (student - negative.detach()).abs())


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").lower())


def final_answer(text: str) -> str:
    """The content of the last 'Answer:' line, else the whole text."""
    hits = re.findall(r"(?im)^\s*(?:final\s+)?answer\s*:\s*(.+?)\s*$", text)
    return hits[-1] if hits else text


def negative_request(example: Example, rng: random.Random) -> tuple[str, Any]:
    """(generation prompt, what `negative_demo` needs) for one example, by the kind of its checker."""
    meta, bench = example.meta, example.meta.get("benchmark")
    if "gold" in meta and "n_options" in meta:
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
    return (f"{example.prompt}\n\nWrite a plausible-looking but WRONG answer to this task: one or two confident "
            "sentences of reasoning, then a final line 'Answer: <a wrong answer>'."), None


def negative_demo(example: Example, reply: str, extra: Any) -> str | None:
    """The negative demonstration built from a reply, or None unless the checker says it is wrong."""
    meta, bench = example.meta, example.meta.get("benchmark")
    reply = reply.strip()
    if "gold" in meta and "n_options" in meta:
        demo = f"Reasoning: {reply}\nAnswer: {extra}" if reply else f"Answer: {extra}"
        letter = S.extract_letter(demo, int(meta["n_options"]))
        return demo if letter is not None and letter != meta["gold"] else None
    if bench in S.CODE_BENCHMARKS:
        code = S.extract_code(reply).strip()
        if not code:
            return None
        demo = f"```python\n{code}\n```"
        try:
            from unisd import sandbox

            return None if sandbox.passes(demo, meta) else demo
        except Exception:  # the sandbox cannot run here: unverifiable, so unusable
            return None
    if bench == "toolalpaca":
        return reply if reply and S.score_tools(reply, meta)["full_acc"] < 1.0 else None
    answer, gold = _norm(final_answer(reply)), _norm(example.answer)
    mentions_gold = bool(gold) and re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", answer) is not None
    return reply if answer and not mentions_gold else None


def build_negatives(model: torch.nn.Module, tokenizer: Any, examples: list[Example], seed: int,
                    max_new_tokens: int, tries: int) -> list[str | None]:
    """One verified-wrong negative demonstration per example (None where every try failed)."""
    negatives: list[str | None] = [None] * len(examples)
    for attempt in range(tries):
        todo = [i for i, neg in enumerate(negatives) if neg is None]
        if not todo:
            break
        requests = [negative_request(examples[i], random.Random(f"{seed}:{attempt}:{i}")) for i in todo]
        replies = C.generate(model, tokenizer, [r[0] for r in requests], max_new_tokens, seed + attempt)
        for i, (_, extra), reply in zip(todo, requests, replies):
            negatives[i] = negative_demo(examples[i], reply, extra)
    return negatives


class Contrast(Plugin):
    __doc__ = __doc__

    @dataclass(frozen=True)
    class Config:
        weight: float = 0.1          # λ (official contrastive run: 0.1; UniSD*: 0.01)
        margin: float = 0.5          # hinge margin (official contrastive run: 0.5; UniSD*: 0.1)
        tries: int = 2               # generation attempts per example before it counts as without negative
        max_new_tokens: int = 96     # length of each generated negative (kept short: setup cost)

        def __post_init__(self) -> None:
            if self.weight < 0 or self.margin < 0:
                raise ValueError("contrast.weight and contrast.margin must be >= 0")
            if self.tries < 1 or self.max_new_tokens < 1:
                raise ValueError("contrast.tries and contrast.max_new_tokens must be at least 1")

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.negatives: list[str | None] = []

    @property
    def view(self) -> str:
        return f"{self.name or 'contrast'}:negative"

    def setup(self, run: Run) -> None:
        c, seed = self.config, run.config.seed
        key = {"kind": "negatives-v2", "data": C.data_digest(run.examples), "model": run.config.model,
               "weights": C.model_digest(run.student), "seed": seed, "tokens": c.max_new_tokens, "tries": c.tries}
        self.negatives = C.cached("contrast", key, lambda: build_negatives(
            run.student, run.tokenizer, run.examples, seed, c.max_new_tokens, c.tries))
        missing = sum(neg is None for neg in self.negatives)
        if missing:
            print(f"warning: {self.name}: {missing} of {len(self.negatives)} examples have no verified-wrong "
                  "negative; they get no contrastive term (metric contrast/no_negative)", file=sys.stderr)

    def views(self, batch: Batch) -> dict[str, list[str]]:
        # rows without a negative are scored under the gold prompt and masked out in aux_losses
        return {self.view: [teacher_prompt(e, demo=self.negatives[i]) for i, e in zip(batch.indices, batch.examples)]}

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        has = torch.tensor([self.negatives[i] is not None for i in out.batch.indices],
                           dtype=out.mask.dtype, device=out.mask.device)
        out.metrics[f"{self.name}/no_negative"] = float(1.0 - has.mean())
        c = hinge(out.logps["student"], out.logps["teacher"], out.logps[self.view], self.config.margin)
        return {self.name or "contrast": self.config.weight * losses.weighted_mean(c, out.mask * has[:, None])}
