"""The one record every data source turns into (`Example`); `unisd.data.files` reads users' datasets into it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation item.

    prompt:    the student prompt (the last user message, before the chat template).
    answer:    the gold answer, shown to the teacher inside the demonstration.
    rationale: optional gold reasoning, shown to the teacher before the answer.
    meta:      whatever a scorer or a plugin needs (tests, option letters, task ids...).
    context:   the turns before the prompt ({"role", "content"}, system prompt included); empty for benchmarks.
    after:     the turns between the prompt and the gold answer: the assistant's tool calls and the tools'
               results, so that the gold answer is the reply to the last tool turn; usually empty.
    """

    prompt: str
    answer: str
    rationale: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    context: tuple[Mapping[str, Any], ...] = ()
    after: tuple[Mapping[str, Any], ...] = ()
