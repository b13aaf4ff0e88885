"""Student prompts, answer extraction and scorers: one source of truth for training and lm-eval.

The prompt a model sees at evaluation is exactly `Example.prompt` built here during training, and the
lm-eval tasks (`lm_eval_tasks/*/utils.py`) call the same scorers the trainer may call. Everything in
this module is a pure function of strings and plain dicts, so it can be tested without a model.
Code execution lives in `unisd.sandbox`; `check_code` runs a reply's code and its tests there.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from unisd import sandbox

LETTERS = "ABCDEFGHIJ"

# --------------------------------------------------------------------------------------------------
# Student prompt builders
# --------------------------------------------------------------------------------------------------


def mc_prompt(question: str, options: Sequence[str], context: str = "") -> str:
    """Multiple-choice prompt with a fixed last-line answer format, so extraction is reliable."""
    letters = LETTERS[: len(options)]
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
    context_block = f"Background:\n{context.strip()}\n\n" if context.strip() else ""
    allowed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return (
        "Solve this multiple-choice question.\n\n"
        f"Question: {question.strip()}\n\n"
        f"{context_block}"
        f"Options:\n{choices}\n\n"
        "Think it through in a few short sentences, then give your choice on the final line. "
        f"Exactly one option is correct; the final line must name one of {allowed}.\n\n"
        "Reply in this format:\n"
        "Reasoning: <up to three short sentences>\n"
        f"Answer: <{'/'.join(letters)}>"
    )


def mbpp_prompt(task: str, signature: str, tests: Sequence[str]) -> str:
    """MBPP prompt: the task, the signature the tests call, and the tests themselves (visible, as in the paper)."""
    test_block = "\n".join(t.strip() for t in tests)
    return (
        f"{task.strip()}\n\n"
        f"Implement it as the Python function `{signature}`.\n"
        "Rules: write only the function (plus any helpers and imports it needs), keep the exact name "
        "used by the tests below, and put all of it in a single ```python code block.\n\n"
        f"Your code must pass these tests:\n```python\n{test_block}\n```"
    )


def humaneval_prompt(code_prompt: str) -> str:
    """HumanEval in instruct style: ask for the whole function back, inside one python block."""
    return (
        "Complete the Python function below.\n\n"
        f"```python\n{code_prompt.rstrip()}\n```\n\n"
        "Return the complete function (signature, docstring and body) with any imports it needs, "
        "keeping the signature unchanged, in a single ```python code block and nothing else."
    )


def toolalpaca_prompt(instruction: str, documentation: str, tool_names: Sequence[str]) -> str:
    """ReAct prompt for ToolAlpaca rows that have no ready-made `prompt` (the offline rebuild).

    The model plans every call up front (no observations come back during a single generation), so
    we ask for all Thought/Action/Action Input steps in order and a closing Final Answer line.
    """
    return (
        "You can use the tools of an API to help a user. The tools are:\n\n"
        f"{documentation.strip()}\n\n"
        f"Valid tool names: {', '.join(tool_names)}\n\n"
        "Write every tool call you need, in order, each as three lines:\n"
        "Thought: <why this call is needed>\n"
        f"Action: <one of {', '.join(tool_names)}>\n"
        'Action Input: <the arguments as a JSON object, e.g. {"key": "value"}>\n'
        "Do not write any Observation lines. After the last call, finish with:\n"
        "Final Answer: <what you will tell the user>\n\n"
        f"User request: {instruction.strip()}\n"
        "Begin!"
    )


def react_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """Gold calls rendered in the ReAct format the prompt asks for (the teacher's demonstration)."""
    lines = []
    for call in calls:
        args = call.get("Action_Input", {})
        lines.append(f"Action: {call.get('Action', '')}")
        lines.append(f"Action Input: {args if isinstance(args, str) else json.dumps(args)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------


def is_multiple_choice(meta: Mapping[str, Any]) -> bool:
    """An item whose answer is one of `n_options` lettered options, `gold` the right one."""
    return "gold" in meta and "n_options" in meta


def extract_letter(text: str, n_options: int) -> str | None:
    """The chosen option letter, or None. Rules in order, the first rule that matches wins:

    1. a line starting with "Answer: X" (also "**Answer:** (X)"), the last such line;
    2. "the answer is X"; 3. "ANSWER: X" anywhere; 4. a line starting with "X." / "X)" / "X ";
    5. last resort: the last standalone capital letter in range, where an "A" that reads as the
       English article ("A cat", "A 3-day trip") is skipped, since prose would otherwise win.
    The article filter applies to rule 4 too. Within each rule the last match is taken: a corrected
    answer comes after the first attempt.
    """
    if not text or n_options < 1:
        return None
    valid = LETTERS[:n_options]
    cls = f"[{valid}]"
    rules = [
        rf"(?m)^[\s>*#_-]*(?i:answer)\s*[*_]*\s*:\s*[*_]*\s*\(?({cls})\)?(?![\w'])",
        rf"(?i:the (?:correct |final )?answer is):?\s*[*_]*\s*\(?({cls})\)?(?![\w'])",
        rf"ANSWER:\s*\(?({cls})\)?(?![\w'])",
    ]
    for pattern in rules:
        hits = re.findall(pattern, text)
        if hits:
            return hits[-1]
    for pattern in (rf"(?m)^\s*\(?({cls})(?=[.)]|\s)", rf"(?<![\w'])({cls})(?![\w'])"):
        for match in reversed(list(re.finditer(pattern, text))):
            if _is_article(text, match.start(), match.end()):
                continue  # "A cat ..." / "A 3-step plan": the article, not an option
            return match.group(1)
    return None


def _is_article(text: str, start: int, end: int) -> bool:
    """An "A" followed by a lowercase word reads as the article, unless a word like "option" names it."""
    if text[start:end] != "A" or not re.match(r"\s+[a-z0-9]", text[end:]):
        return False
    return not re.search(r"(?i)\b(option|choice|answer|letter|pick|choose|select|is)\W*$", text[:start])


def score_mc(generation: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """Accuracy of one multiple-choice generation against `meta['gold']` (a letter)."""
    letter = extract_letter(generation, int(meta["n_options"]))
    return {"acc": float(letter is not None and letter == meta["gold"])}


# --------------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """Code from a reply: the first ```python block, else the first ``` block, else the raw text.

    A block left open (generation stopped at the token limit) counts up to the end of the text. A JSON
    reply {"code": ...} is accepted too, as the official evaluator does.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
            if isinstance(obj, dict) and isinstance(obj.get("code"), str):
                return obj["code"]
        except json.JSONDecodeError:
            pass
    blocks = _FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    if blocks:
        return blocks[0][1]
    return text


def called_names(tests: Sequence[str]) -> list[str]:
    """Names called in the test asserts, in first-seen order (to find the function under test)."""
    seen: list[str] = []
    for test in tests:
        for name in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", test):
            if name not in seen and name not in _NOT_ENTRY:
                seen.append(name)
    return seen


_NOT_ENTRY = {"assert", "set", "list", "tuple", "dict", "sorted", "len", "abs", "round", "str", "int",
              "float", "isclose", "math", "all", "any", "frozenset", "type", "isinstance", "sum", "max",
              "min", "bool", "map", "zip", "range", "print", "repr", "callable", "Pair", "Node"}


def fix_function_name(code: str, tests: Sequence[str]) -> tuple[str, str]:
    """(code, entry point): rename the reference solution's main def to the name the tests call.

    A few MBPP references define e.g. `def func(...)` while the asserts call `solve(...)`; the teacher's
    demonstration must be code that passes, so the last top-level def is renamed when no def matches.
    """
    defs = re.findall(r"(?m)^def\s+([A-Za-z_]\w*)\s*\(", code)
    wanted = called_names(tests)
    for name in wanted:
        if name in defs:
            return code, name
    if not defs or not wanted:
        return code, defs[-1] if defs else (wanted[0] if wanted else "")
    old, new = defs[-1], wanted[0]
    return re.sub(rf"\b{re.escape(old)}\b", new, code), new


def signature_of(code: str, name: str) -> str:
    """`name(args)` from the def line in `code`, for the prompt; `name(...)` when it cannot be found."""
    match = re.search(rf"(?m)^def\s+{re.escape(name)}\s*\((.*?)\)\s*(?:->[^:]*)?:", code, re.S)
    return f"{name}({' '.join(match.group(1).split())})" if match else f"{name}(...)"


def code_test_program(code: str, meta: Mapping[str, Any]) -> str:
    """The whole program to execute: candidate code followed by the benchmark's tests.

    HumanEval: if the reply has no `def <entry_point>` it is taken as a body completion and the original
    prompt is put in front; then `check(entry_point)` is called. MBPP: test imports, code, setup code, then the asserts.
    """
    if meta.get("benchmark") == "humaneval":
        entry = meta["entry_point"]
        if not re.search(rf"(?m)^\s*def\s+{re.escape(entry)}\s*\(", code):
            code = meta["code_prompt"] + code
        return f"{code}\n\n{meta['test']}\n\ncheck({entry})\n"
    imports = "\n".join(meta.get("test_imports") or [])
    setup = meta.get("test_setup_code") or ""  # may use classes the solution defines (MBPP 927)
    tests = "\n".join(meta["tests"])
    return f"{imports}\n{code}\n\n{setup}\n{tests}\n"


# --------------------------------------------------------------------------------------------------
# Tool use (ToolAlpaca)
# --------------------------------------------------------------------------------------------------


def parse_arguments(raw: Any) -> dict[str, Any]:
    """Action input → dict, leniently: real gold data holds inputs such as `{"id": ${id from search}}`.

    Tries JSON; then JSON with `${...}` placeholders quoted; then `"key": value` pairs by regex.
    Anything unparsable becomes {} (so a call with garbage arguments still counts as a call).
    """
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        return {}
    text = raw.strip()
    start = text.find("{")
    if start < 0:
        return {}
    text = text[start:]
    candidates = [_balanced(text), text]
    for cand in list(candidates):
        candidates.append(re.sub(r'"?\$\{([^}]*)\}"?', lambda m: json.dumps("${" + m.group(1) + "}"), cand))
    for cand in candidates:
        try:
            obj = json.loads(cand)
            if isinstance(obj, dict):
                return obj
        except (json.JSONDecodeError, TypeError):
            continue
    pairs = re.findall(r'"([^"]+)"\s*:\s*(.*?)\s*(?=,\s*"[^"]+"\s*:|\}\s*$|$)', text, re.S)
    out: dict[str, Any] = {}
    for key, value in pairs:
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.strip().strip('"')
    return out


def _balanced(text: str) -> str:
    """The prefix of `text` (starting at "{") up to its matching "}", ignoring braces inside strings."""
    depth, in_str, escape = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            escape = ch == "\\" and not escape
            if ch == '"' and not escape:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[: i + 1]
    return text


_REACT_STEP = re.compile(
    r"(?ms)^\s*Action\s*:\s*(.+?)\s*$\s*^\s*Action[ _]Input\s*:\s*(.*?)"
    r"(?=^\s*(?:Thought|Action|Observation|Final Answer|ASSISTANT Response)\s*:|\Z)"
)


def parse_react(text: str) -> list[dict[str, Any]]:
    """All `Action:` / `Action Input:` pairs in order, as [{"Action", "Action_Input": dict}]."""
    return [{"Action": name.strip().strip("`*"), "Action_Input": parse_arguments(args)}
            for name, args in _REACT_STEP.findall(text)]


def parse_json_calls(text: str) -> list[dict[str, Any]] | None:
    """Calls from a JSON reply {"tool_calls": [{Thought, Action, Action_Input}]} (or a bare list); None if not JSON."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        obj = obj.get("tool_calls")
    if not isinstance(obj, list) or not all(isinstance(c, dict) and "Action" in c for c in obj):
        return None
    return [{"Action": str(c["Action"]).strip(), "Action_Input": parse_arguments(c.get("Action_Input", {}))}
            for c in obj]


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Calls from a reply in either format: JSON tool_calls first, then ReAct."""
    calls = parse_json_calls(text)
    return calls if calls is not None else parse_react(text)


def _filled(value: Any) -> bool:
    return value not in (None, "", [], {})


def score_tool_calls(pred: Sequence[Mapping[str, Any]], gold: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """ToolAlpaca per-example scores, as the paper's evaluator defines them.

    action: 1 iff same number of calls and the same action names in order.
    argument: 0 if call counts differ, else the mean over calls of the fraction of gold keys with a
      non-empty value whose predicted value matches (`str(v).strip()` equality); an empty gold
      dict scores 1 iff the prediction is empty too.
    full: 1 iff action and argument are both 1.
    """
    if len(pred) != len(gold):
        return {"action_acc": 0.0, "argument_acc": 0.0, "full_acc": 0.0}
    action = float(all(str(p["Action"]).strip() == str(g["Action"]).strip() for p, g in zip(pred, gold)))
    per_call = []
    for p, g in zip(pred, gold):
        pa, ga = parse_arguments(p.get("Action_Input", {})), parse_arguments(g.get("Action_Input", {}))
        keys = [k for k, v in ga.items() if _filled(v)]
        if not ga:
            per_call.append(float(not pa))
        elif not keys:
            per_call.append(1.0)
        else:
            per_call.append(sum(str(pa.get(k, "")).strip() == str(ga[k]).strip() for k in keys) / len(keys))
    argument = sum(per_call) / len(per_call) if per_call else 1.0
    return {"action_acc": action, "argument_acc": argument, "full_acc": float(action == 1.0 and argument == 1.0)}


def score_tools(generation: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """ToolAlpaca scores of one generation against `meta['gold_calls']`."""
    return score_tool_calls(parse_tool_calls(generation), meta["gold_calls"])


def extract_number(text: str) -> str | None:
    """The integer a free-form reply gives: the last one on its last 'Answer:' line, else the last one in it."""
    lines = re.findall(r"(?im)^\s*(?:final\s+)?answer\s*:(.*)$", text or "")
    for scope in ([lines[-1]] if lines else []) + [text or ""]:
        found = re.findall(r"-?\d+", scope.replace(",", ""))
        if found:
            return str(int(found[-1]))
    return None


def check_code(generation: str, meta: Mapping[str, Any], timeout: float = 10.0) -> sandbox.SandboxResult:
    """Extract the code from a model reply and run it against the benchmark tests described by `meta`."""
    return sandbox.run_program(code_test_program(extract_code(generation), meta), timeout=timeout)


def code_passes(generation: str, meta: Mapping[str, Any], timeout: float = 10.0) -> bool:
    """True iff the reply's code passes all tests (MBPP asserts or HumanEval `check`)."""
    return check_code(generation, meta, timeout).passed


def pass_at_1(generations: Sequence[str], metas: Sequence[Mapping[str, Any]], timeout: float = 10.0) -> float:
    """Mean pass rate of one greedy generation per problem (pass@1 for MBPP and HumanEval)."""
    if len(generations) != len(metas):
        raise ValueError(f"{len(generations)} generations for {len(metas)} problems")
    if not metas:
        return 0.0
    return sum(code_passes(g, m, timeout) for g, m in zip(generations, metas)) / len(metas)


# --------------------------------------------------------------------------------------------------
# Dispatch (trainer and lm-eval)
# --------------------------------------------------------------------------------------------------

MC_BENCHMARKS = ("scienceqa", "cos_e", "gpqa")
CODE_BENCHMARKS = ("mbpp", "humaneval")


def score(generation: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """Score one generation for the benchmark named in `meta['benchmark']`.

    MC → {"acc"}; code → {"pass@1"} (run in `unisd.sandbox`); ToolAlpaca → {action_acc, argument_acc, full_acc}.
    """
    bench = meta.get("benchmark")
    if bench in MC_BENCHMARKS:
        return score_mc(generation, meta)
    if bench in CODE_BENCHMARKS:
        return {"pass@1": float(code_passes(generation, meta))}
    if bench == "toolalpaca":
        return score_tools(generation, meta)
    if bench == "demo":
        return {"acc": float(extract_number(generation) == meta["number"])}
    raise ValueError(f"no scorer for benchmark {bench!r}")


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval `process_results` for every unisd task: the doc carries the Example's meta as JSON."""
    return score(results[0], json.loads(doc["meta"]))
