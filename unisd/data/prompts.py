"""The teacher prompt: the student prompt plus the gold demonstration (one source of truth).

The teacher is the same model as the student; what makes it a teacher is this privileged context.
Benchmark adapters shape `Example.answer` / `Example.rationale`; the wording lives here only.
"""
from __future__ import annotations

import re
from typing import Any

from unisd.data.examples import Example

# The paper's instruction (§2.1), with the problem placed below it as its wording says, so that the teacher's
# context ends, like the student's, with the question itself. Order and wording matter at small scale: the
# probes that chose this order, and what they measured, are in docs/results.md ("The teacher prompt").
SOLVE_YOUR_WAY = "Study the reference solution, then solve the problem with your own approach."


def demonstration(example: Example) -> str:
    """The gold response as the teacher sees it: reasoning first when there is any, then the answer."""
    if example.rationale.strip():
        return f"Reasoning: {example.rationale.strip()}\nAnswer: {example.answer.strip()}"
    return example.answer.strip()


# The teacher's last user turn; `--teacher-template` replaces it (both placeholders required).
TEACHER_TEMPLATE = f"{SOLVE_YOUR_WAY}\n\nReference solution:\n{{demonstration}}\n\nProblem: {{prompt}}"


_PLACEHOLDER = re.compile(r"\{(demonstration|prompt)\}")


def teacher_text(example: Example, demo: str | None = None, template: str = TEACHER_TEMPLATE) -> str:
    """The instruction, a demonstration (the gold one by default), then the student prompt unchanged.

    Both placeholders are filled in one pass: a demonstration or prompt that contains the text `{prompt}`
    (code with f-strings) keeps it literally."""
    demo = demonstration(example) if demo is None else demo
    values = {"demonstration": demo, "prompt": example.prompt}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def in_context(example: Example, text: str) -> str | list[dict[str, Any]]:
    """`text` as the user's turn between the example's earlier turns and its tool turns (plain text when there
    are neither)."""
    if not example.context and not example.after:
        return text
    return [*map(dict, example.context), {"role": "user", "content": text}, *map(dict, example.after)]


def student_prompt(example: Example) -> str | list[dict[str, Any]]:
    """What the student sees: its earlier turns (system prompt included), then the user's prompt."""
    return in_context(example, example.prompt)


def teacher_prompt(example: Example, demo: str | None = None,
                   template: str = TEACHER_TEMPLATE) -> str | list[dict[str, Any]]:
    """The student's earlier turns, then the teacher template as the last user turn."""
    return in_context(example, teacher_text(example, demo, template))
