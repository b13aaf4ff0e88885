"""The teacher prompt: the student prompt plus the gold demonstration (one source of truth).

The teacher is the same model as the student; what makes it a teacher is this privileged context.
Benchmark adapters shape `Example.answer` / `Example.rationale`; the wording lives here only.
"""
from __future__ import annotations

from unisd.data.examples import Example

SOLVE_YOUR_WAY = "Study the reference response above, then answer the task again in your own words and your own way."


def demonstration(example: Example) -> str:
    """The gold response as the teacher sees it: reasoning first when there is any, then the answer."""
    if example.rationale.strip():
        return f"Reasoning: {example.rationale.strip()}\nAnswer: {example.answer.strip()}"
    return example.answer.strip()


def teacher_prompt(example: Example, demo: str | None = None) -> str:
    """Student prompt + a demonstration (the gold one by default) + the instruction to solve it anew."""
    demo = demonstration(example) if demo is None else demo
    return (
        f"{example.prompt}\n\n"
        f"Here is a reference response to this task:\n{demo}\n\n"
        f"{SOLVE_YOUR_WAY}"
    )
