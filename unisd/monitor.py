"""Collapse seen while it happens: per-step rollout statistics, a truncation warning, sample records.

On-policy self-distillation of small models tends to collapse into completions that never end
(issue 29: the truncated share went from 0.25 to 1.0 within four steps). These helpers make that
visible during training, in metrics.jsonl, as one `warning:` line and in samples.jsonl, instead of
only in the evaluation afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from unisd.api import Outputs
from unisd.rollout import Rollout
from unisd.sequences import Prompt

NGRAM = 4                    # repetition is measured over 4-grams of completion tokens
SAMPLES_PER_STEP = 4         # prompts of the step's first micro-batch recorded in samples.jsonl
TRUNCATED_SHARE = 0.5        # the warning fires when this share of completions hits the length limit ...
TRUNCATED_STEPS = 3          # ... this many steps in a row


def repeated_share(tokens: list[int], n: int = NGRAM) -> float:
    """1 - distinct/total over the n-grams of one sequence: 0 when none repeats; 0 when it has no n-gram."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rollout_stats(tokens: torch.Tensor, mask: torch.Tensor, n: int = NGRAM) -> dict[str, float]:
    """Mean completion length (sampled tokens) and mean repeated n-gram share over the samples."""
    lengths = mask.sum(-1).long().tolist()
    rows = tokens.tolist()
    repeated = [repeated_share(row[:length], n) for row, length in zip(rows, lengths)]
    return {"completion_length": sum(lengths) / len(lengths), "repeated_ngrams": sum(repeated) / len(repeated)}


class TruncationWatch:
    """Says once per run when the truncated share of the student's own samples stays at or above TRUNCATED_SHARE
    for TRUNCATED_STEPS steps; its streak is checkpointed, so a resume continues it."""

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.streak = 0
        self.warned = False

    def update(self, truncated_share: float | None) -> str:
        """The warning line the first time the streak is reached, else ''.

        None: the student sampled nothing this step (gold or base-model completions, e.g. sft, gkd's off-policy
        share); a cut gold demonstration says nothing of collapse, so the streak neither grows nor breaks."""
        if truncated_share is None:
            return ""
        self.streak = self.streak + 1 if truncated_share >= TRUNCATED_SHARE else 0
        if self.warned or self.streak < TRUNCATED_STEPS:
            return ""
        self.warned = True
        return (f"warning: {truncated_share:.0%} of this step's completions hit the {self.max_new_tokens}-token limit, "
                f"at least {TRUNCATED_SHARE:.0%} for {TRUNCATED_STEPS} steps in a row: the student may be collapsing "
                "into text that never ends; what usually helps: a larger --max-new-tokens, a lower --lr, "
                "--skip-first-tokens 3, --mask-truncated, an EMA teacher (--plugins ema)")

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.warned = int(state["streak"]), bool(state["warned"])


def own_truncated_share(metrics: dict[str, Any]) -> float | None:
    """The truncated share among the completions the student sampled in a step (`step`'s `student_sampled` and
    `student_truncated`, both shares of all its completions); None when it sampled none."""
    sampled = metrics["student_sampled"]
    return metrics["student_truncated"] / sampled if sampled else None


def sample_records(step: int, prompts: Sequence[Prompt], rollout: Rollout, out: Outputs, tokenizer: PreTrainedTokenizerBase,
                   limit: int = SAMPLES_PER_STEP) -> list[dict[str, Any]]:
    """One samples.jsonl row per prompt (at most `limit`): prompt, completion, whether it hit the length limit,
    its length in sampled tokens, the per-token divergence's mean and maximum over its counted tokens (None when
    no token of it counts, e.g. under --mask-truncated), and per sampled token its text, divergence (None where it
    does not count) and log-probability under the student and the teacher, so `unisd inspect` needs no rerun."""
    records = []
    lengths = rollout.mask.sum(-1).long().tolist()
    for i in range(min(limit, len(prompts))):
        counted = out.mask[i].bool()
        values = out.divergence[i][counted].detach().float()
        n = lengths[i]
        ids = rollout.tokens[i, :n].tolist()
        per_token = {"tokens": [tokenizer.decode([t]) for t in ids],
                     "token_divergence": [float(d) if c else None for d, c in
                                          zip(out.divergence[i, :n].detach().float().tolist(), counted[:n].tolist())]}
        per_token |= {f"logp_{view}": [round(x, 5) for x in out.logps[view][i, :n].detach().float().tolist()]
                      for view in ("student", "teacher") if view in out.logps}
        records.append({"step": step, "prompt": prompts[i],
                        "completion": tokenizer.decode(ids, skip_special_tokens=True),
                        "truncated": bool(rollout.truncated[i]), "length": n,
                        "divergence_mean": float(values.mean()) if values.numel() else None,
                        "divergence_max": float(values.max()) if values.numel() else None, **per_token})
    return records


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file (as metrics.jsonl is written); nothing, not even the file, for no rows."""
    if rows:
        with path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
