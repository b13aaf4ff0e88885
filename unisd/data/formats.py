"""Row formats, detected from a dataset's columns, each turned into `Example`s.

- conversational `messages`: a list of {"role", "content"}; everything before the last assistant turn is
  the prompt (system prompt and earlier turns included), the last assistant turn is the gold demonstration,
  and no turn may follow it; tool use is kept (`tool_calls`, `tool_call_id`, `name`; an assistant turn with
  tool calls may have `content` null), and the chat template renders it (`unisd.sequences.render`);
- TRL's `prompt` / `completion`, standard (two strings) or conversational (a list of messages, then one
  assistant message);
- TRL SDFT's `prompt` + `privileged_context`: the teacher's context, used verbatim as the demonstration;
- `prompt` / `answer` with an optional `rationale` (reasoning shown to the teacher before the answer).

A `prompt` may be a string (one user turn) or a list of messages whose last user turn is the prompt; tool
turns may follow it (`Example.after`). Demonstrations must hold text; a JSON number is read as its text, as a
CSV cell is. Other columns ride along in `Example.meta`; `--columns new=old,...` renames columns before detection.
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
        if new in mapping.values():
            raise ValueError(f"--columns: {new!r} is named twice; map one column to it")
        if old in mapping:
            raise ValueError(f"--columns: column {old!r} is mapped twice; a column becomes one format column")
        mapping[old] = new
    return mapping


TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # kept on a turn when present: the chat template renders them

Turns = tuple[dict[str, Any], ...]


def _message(m: Any) -> dict[str, Any] | None:
    """One message with its role, content and tool fields, or None when it is not a message.

    `content` may be null (then empty) on an assistant turn that calls tools, as in OpenAI-style data.
    """
    if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)):
        return None
    content = m.get("content")
    if content is None and m["role"] == "assistant" and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str) or not _tool_calls_ok(m.get("tool_calls")):
        return None
    # an empty tool_calls list (OpenAI exports write one on every turn) is no tool call
    return {"role": m["role"], "content": content, **{k: m[k] for k in TOOL_KEYS if m.get(k) not in (None, [], "")}}


def _tool_calls_ok(calls: Any) -> bool:
    """None, or a list of {"function": {"name": str, ...}} (or {"name": str, ...}) as chat templates read them."""
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(c, Mapping) and isinstance(f := c.get("function", c), Mapping) and isinstance(f.get("name"), str)
        for c in calls)


def _messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    turns = [_message(m) for m in value]
    if any(t is None for t in turns):
        raise DataError(f"{where}: field '{field}' must hold messages with string 'role' and 'content' (null only "
                        "beside tool calls), and tool calls with a function name")
    return [t for t in turns if t is not None]


def _text(row: Mapping[str, Any], where: str, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field '{field}'")
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # JSON 42 -> "42", as a CSV cell reads
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string")
    return value


def _demonstration(text: str, where: str, field: str) -> str:
    """A gold demonstration must say something: an empty one teaches a lone end token."""
    if not text.strip():
        raise DataError(f"{where}: field '{field}' is empty (a demonstration needs text)")
    return text


def _prompt(value: Any, where: str, field: str) -> tuple[str, Turns, Turns]:
    """A prompt string or message list -> (last user turn's text, the turns before it, the tool turns after it)."""
    if value is None:
        raise DataError(f"{where}: missing field '{field}'")
    context: Turns = ()
    after: Turns = ()
    if isinstance(value, str):
        text = value
    else:
        turns = _messages(value, where, field)
        user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
        if user < 0 or any(m["role"] not in ("assistant", "tool") or (m["role"] == "assistant" and "tool_calls" not in m)
                           for m in turns[user + 1:]):
            raise DataError(f"{where}: field '{field}' must end with a user turn (or its tool calls and their "
                            f"results), not {turns[-1]['role']!r}")
        text, context, after = turns[user]["content"], tuple(turns[:user]), tuple(turns[user + 1:])
    if not text.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return text, context, after


def _from_messages(row: Mapping[str, Any], where: str) -> Example:
    turns = _messages(row.get("messages"), where, "messages")
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant" and "tool_calls" not in m), default=-1)
    if last < 1 and turns[-1]["role"] == "assistant":  # the only assistant turns call tools
        raise DataError(f"{where}: field 'messages' ends with a tool call; the gold demonstration must be the "
                        "assistant's answer in text (a tool call as the gold answer is not supported)")
    if last < 1:
        raise DataError(f"{where}: field 'messages' needs a user turn followed by an assistant turn")
    if last < len(turns) - 1:
        extra = turns[last + 1]
        kind = "an assistant turn with tool calls" if extra["role"] == "assistant" else f"a {extra['role']!r} turn"
        raise DataError(f"{where}: field 'messages' has {kind} after the last assistant answer (the gold "
                        "demonstration); end each conversation with that answer")
    text, context, after = _prompt(turns[:last], where, "messages")
    return Example(text, _demonstration(turns[last]["content"], where, "messages"), context=context, after=after)


def _from_completion(row: Mapping[str, Any], where: str) -> Example:
    text, context, after = _prompt(row.get("prompt"), where, "prompt")
    completion = row.get("completion")
    if isinstance(completion, list):
        turns = _messages(completion, where, "completion")
        if len(turns) != 1 or turns[0]["role"] != "assistant" or "tool_calls" in turns[0]:
            raise DataError(f"{where}: field 'completion' must be one assistant message with text, got "
                            f"{', '.join(m['role'] for m in turns)}")
        answer = turns[0]["content"]
    else:
        answer = _text(row, where, "completion")
    return Example(text, _demonstration(answer, where, "completion"), context=context, after=after)


def _from_privileged(row: Mapping[str, Any], where: str) -> Example:
    text, context, after = _prompt(row.get("prompt"), where, "prompt")
    demo = _demonstration(_text(row, where, "privileged_context"), where, "privileged_context")
    return Example(text, demo, context=context, after=after)


def _from_answer(row: Mapping[str, Any], where: str) -> Example:
    text, context, after = _prompt(row.get("prompt"), where, "prompt")
    answer = _demonstration(_text(row, where, "answer"), where, "answer")
    return Example(text, answer, _text(row, where, "rationale", required=False), context=context, after=after)


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
        examples.append(Example(e.prompt, e.answer, e.rationale, meta, e.context, e.after))
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return examples
