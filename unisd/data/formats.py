"""Row formats, detected from a dataset's columns, each turned into `Example`s.

- conversational `messages`: a list of {"role", "content"}; everything before the last assistant turn is
  the prompt (system prompt and earlier turns included), the last assistant turn is the gold demonstration;
- TRL's `prompt` / `completion`, standard (two strings) or conversational (two lists of messages);
- TRL SDFT's `prompt` + `privileged_context`: the teacher's context, used verbatim as the demonstration;
- `prompt` / `answer` with an optional `rationale` (reasoning shown to the teacher before the answer).

A `prompt` may be a string (one user turn) or a list of messages ending with the user's turn. Other
columns ride along in `Example.meta`; `--columns new=old,...` renames columns before detection.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from unisd.data.examples import DataError, Example

FIELDS = ("messages", "prompt", "completion", "privileged_context", "answer", "rationale")


def parse_columns(spec: str) -> dict[str, str]:
    """`prompt=question,answer=label` -> {"question": "prompt", "label": "answer"} (old name -> format name)."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        new, sep, old = (s.strip() for s in item.partition("="))
        if not sep or not new or not old:
            raise ValueError(f"--columns: expected new=old, got {item!r}")
        if new not in FIELDS:
            raise ValueError(f"--columns: {new!r} is not a format column; choose from {', '.join(FIELDS)}")
        mapping[old] = new
    return mapping


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    for m in value:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field '{field}' must hold messages with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: Mapping[str, Any], where: str, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field '{field}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string")
    return value


def _prompt(value: Any, where: str, field: str) -> tuple[str, tuple[dict[str, str], ...]]:
    """A prompt string or message list -> (last user turn's text, the turns before it)."""
    if value is None:
        raise DataError(f"{where}: missing field '{field}'")
    context: tuple[dict[str, str], ...] = ()
    if isinstance(value, str):
        text = value
    else:
        turns = _messages(value, where, field)
        if turns[-1]["role"] != "user":
            raise DataError(f"{where}: field '{field}' must end with a user turn, not {turns[-1]['role']!r}")
        text, context = turns[-1]["content"], tuple(turns[:-1])
    if not text.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return text, context


def _from_messages(row: Mapping[str, Any], where: str) -> Example:
    turns = _messages(row.get("messages"), where, "messages")
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=-1)
    if last < 1:
        raise DataError(f"{where}: field 'messages' needs a user turn followed by an assistant turn")
    text, context = _prompt(turns[:last], where, "messages")
    return Example(text, turns[last]["content"], context=context)


def _from_completion(row: Mapping[str, Any], where: str) -> Example:
    text, context = _prompt(row.get("prompt"), where, "prompt")
    completion = row.get("completion")
    if isinstance(completion, list):
        answer = "\n".join(m["content"] for m in _messages(completion, where, "completion"))
    else:
        answer = _text(row, where, "completion")
    return Example(text, answer, context=context)


def _from_privileged(row: Mapping[str, Any], where: str) -> Example:
    text, context = _prompt(row.get("prompt"), where, "prompt")
    return Example(text, _text(row, where, "privileged_context"), context=context)


def _from_answer(row: Mapping[str, Any], where: str) -> Example:
    text, context = _prompt(row.get("prompt"), where, "prompt")
    return Example(text, _text(row, where, "answer"), _text(row, where, "rationale", required=False), context=context)


# (name, columns that identify it, columns it consumes, converter); the first whose columns are present wins
FORMATS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], Callable[[Mapping[str, Any], str], Example]], ...] = (
    ("messages", ("messages",), ("messages",), _from_messages),
    ("prompt/completion", ("prompt", "completion"), ("prompt", "completion"), _from_completion),
    ("prompt/privileged_context", ("prompt", "privileged_context"), ("prompt", "privileged_context"), _from_privileged),
    # last, on `prompt` alone: a file with no second column is named by row as missing its `answer`
    ("prompt/answer", ("prompt",), ("prompt", "answer", "rationale"), _from_answer),
)


def detect(columns: Sequence[str], source: str) -> str:
    """The name of the format the columns hold; a DataError naming the columns otherwise."""
    for name, needs, _, _ in FORMATS:
        if all(c in columns for c in needs):
            return name
    raise DataError(f"{source}: unknown format (columns: {', '.join(columns) or 'none'}); expected messages, "
                    "prompt/completion, prompt/privileged_context or prompt/answer[/rationale] "
                    "(rename columns with --columns new=old)")


def to_examples(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], source: str) -> list[Example]:
    """Every row as an Example, in the detected format; `source:row` names the first bad row."""
    name = detect(columns, source)
    _, _, consumed, convert = next(f for f in FORMATS if f[0] == name)
    examples = []
    for i, row in enumerate(rows, 1):
        e = convert(row, f"{source}:{i}")
        meta = {k: v for k, v in row.items() if k not in consumed}
        examples.append(Example(e.prompt, e.answer, e.rationale, meta, e.context))
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return examples
