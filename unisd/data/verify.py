"""Is a reply *wrong*? Checks that confirm a model-written answer fails its benchmark's checker.

The scorers in `unisd.data.scoring` say how right a reply is; contrastive learning needs the other
side: a negative demonstration is used only when it is confirmed wrong here (an option the reasoning
itself argues for, code that fails its tests in the sandbox, a parsed tool call that differs from the
gold, a final answer that does not state the gold one).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from unisd.data import scoring as S

ANSWER_LINE = r"(?im)^\s*(?:final\s+)?answer\s*:\s*(.+?)\s*$"


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").lower())


def final_answer(text: str) -> str:
    """The content of the last 'Answer:' line, else the whole text."""
    hits = re.findall(ANSWER_LINE, text)
    return hits[-1] if hits else text


def argued_option(reasoning: str, meta: Mapping[str, Any]) -> str | None:
    """The option a piece of reasoning itself argues for: its extracted letter, else the one option it names."""
    n = int(meta["n_options"])
    letter = S.extract_letter(reasoning, n)
    if letter is not None:
        return letter
    options = meta.get("options") or []
    named = [S.LETTERS[i] for i, text in enumerate(options[:n])
             if re.search(rf"(?<!\w){re.escape(normalized(str(text)))}(?!\w)", normalized(reasoning))]
    return named[0] if len(named) == 1 else None


def failing_code(reply: str, meta: Mapping[str, Any]) -> str | None:
    """The reply's code when it is a program (not prose, no syntax error) that fails its tests; else None."""
    code = S.extract_code(reply).strip()
    try:
        compile(code, "<negative>", "exec")
    except (SyntaxError, ValueError):
        return None
    if not code:
        return None
    try:
        return None if S.code_passes(code, meta) else code
    except Exception:  # the sandbox cannot run here: unverifiable, so unusable
        return None


def wrong_tool_call(reply: str, meta: Mapping[str, Any]) -> bool:
    """A ReAct response that parses (like the gold, not free text) and does not match the gold calls."""
    return bool(S.parse_react(reply)) and S.score_tools(reply, meta)["full_acc"] < 1.0


def wrong_final_answer(reply: str, gold: str) -> str | None:
    """The reply's last 'Answer:' line when it is non-empty and does not state `gold` as a word; else None.

    A reply without an Answer line is None: its wrong answer cannot be told apart from its reasoning.
    """
    lines = re.findall(ANSWER_LINE, reply)
    if not lines:
        return None
    answer, wanted = normalized(lines[-1]), normalized(gold)
    mentions_gold = bool(wanted) and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", answer) is not None
    return None if not answer or mentions_gold else lines[-1].strip()
