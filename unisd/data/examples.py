"""The one record every data source turns into (`Example`), and the reader of users' JSONL files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation item.

    prompt:    the student prompt (the user message, before the chat template).
    answer:    the gold answer, shown to the teacher inside the demonstration.
    rationale: optional gold reasoning, shown to the teacher before the answer.
    meta:      whatever a scorer or a plugin needs (tests, option letters, task ids...).
    """

    prompt: str
    answer: str
    rationale: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL file of {"prompt", "answer", optional "rationale"} rows, refusing bad rows by line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; --data takes a JSONL file or a benchmark name")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        # utf-8-sig drops a byte-order mark; text mode reads CRLF line endings as plain newlines
        # (split on those only: str.splitlines would also cut at U+2028 inside a JSON string)
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    examples: list[Example] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("prompt", "answer"):
            if key not in row:
                raise DataError(f"{path}:{lineno}: missing field '{key}'")
        for key in ("prompt", "answer", "rationale"):
            if key in row and not isinstance(row[key], str):
                raise DataError(f"{path}:{lineno}: field '{key}' must be a string")
        if not row["prompt"].strip():
            raise DataError(f"{path}:{lineno}: field 'prompt' is empty")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "answer", "rationale")}
        examples.append(Example(row["prompt"], row["answer"], row.get("rationale", ""), meta))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples
