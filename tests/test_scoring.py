"""Answer extraction, code extraction, tool-call parsing and ToolAlpaca scoring (pure functions)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from unisd.data import scoring as S

REAL = Path(os.environ.get("UNISD_REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.parametrize("text,expected", [
    ("Reasoning: metals conduct.\nAnswer: B", "B"),                   # rule 1
    ("**Answer:** (C)", "C"),                                          # rule 1, markdown
    ("Answer: A\nWait, no.\nAnswer: D", "D"),                          # rule 1, last line wins
    ("I am sure the answer is D.", "D"),                               # rule 2
    ("The correct answer is (B)", "B"),                                # rule 2
    ("FINAL ANSWER: C", "C"),                                          # rule 3
    ("C) because copper is a metal", "C"),                             # rule 4
    ("B.", "B"),                                                       # rule 4
    ("E", "E"),                                                        # rule 5
    ("A beaver builds dams, so I pick B here", "B"),                   # rule 5 skips the article
    ("A cat sat on a mat.", None),                                     # only the article: no answer
    ("Option A is right.", "A"),                                       # a real "A"
    ("I pick A because metals conduct.", "A"),
    ("Answer: F", None),                                               # out of range (5 options)
    ("", None),
])
def test_extract_letter(text, expected):
    assert S.extract_letter(text, 5) == expected


def test_extract_letter_respects_option_count():
    assert S.extract_letter("Answer: D", 3) is None
    assert S.extract_letter("Answer: C", 3) == "C"


def test_rules_apply_in_order():
    # an "Answer:" line beats an earlier "the answer is" phrase and a stray capital letter
    assert S.extract_letter("The answer is A, I think. E is wrong.\nAnswer: B", 5) == "B"
    assert S.extract_letter("the answer is C\nD) maybe", 5) == "C"


@pytest.mark.parametrize("reply,expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```\nx = 2\n```\n```python\ny = 3\n```", "y = 3\n"),   # a python block beats an earlier plain one
    ("```\nx = 2\n```", "x = 2\n"),
    ("```python\ndef g():\n    return 2", "def g():\n    return 2"),  # unterminated block
    ("def h(): return 3", "def h(): return 3"),
    ('{"code": "def k(): return 4"}', "def k(): return 4"),
])
def test_extract_code(reply, expected):
    assert S.extract_code(reply) == expected


def test_fix_function_name_and_signature():
    code, entry = S.fix_function_name("def helper(x):\n    return x\ndef tri(n):\n    return helper(n)",
                                      ["assert triangular(3) == 3"])
    assert entry == "triangular" and "def triangular(n)" in code and "def helper(x)" in code
    same, entry2 = S.fix_function_name("def ok(a, b):\n    return a", ["assert set(ok(1, 2)) == {1}"])
    assert entry2 == "ok" and same.startswith("def ok")
    assert S.signature_of("def ok(a,\n   b=2):\n    pass", "ok") == "ok(a, b=2)"


def test_code_test_program_orders_parts():
    meta = {"benchmark": "mbpp", "tests": ["assert f() == 1"], "test_imports": ["import math"],
            "test_setup_code": "obj = Thing()"}
    prog = S.code_test_program("class Thing: pass\ndef f(): return 1", meta)
    assert prog.index("import math") < prog.index("class Thing") < prog.index("obj = Thing()") < prog.index("assert f()")
    he = {"benchmark": "humaneval", "entry_point": "f", "test": "def check(c):\n    assert c() == 1",
          "code_prompt": "def f():\n"}
    assert S.code_test_program("    return 1\n", he).startswith("def f():\n    return 1")  # body completion
    assert S.code_test_program("def f():\n    return 1\n", he).count("def f()") == 1
    assert S.code_test_program("def f():\n    return 1\n", he).rstrip().endswith("check(f)")


REACT = """Thought: I need to look the book up first.
Action: searchBooks
Action Input: {"query": "chess", "limit": 2}
Observation: (none)
Thought: Now fetch it.
Action: getBook
Action Input: {"bookId": "B-1"}
Final Answer: here it is."""


def test_parse_react_and_json():
    calls = S.parse_react(REACT)
    assert calls == [{"Action": "searchBooks", "Action_Input": {"query": "chess", "limit": 2}},
                     {"Action": "getBook", "Action_Input": {"bookId": "B-1"}}]
    js = json.dumps({"tool_calls": [{"Thought": "t", "Action": "searchBooks", "Action_Input": {"query": "chess", "limit": 2}},
                                    {"Thought": "t", "Action": "getBook", "Action_Input": {"bookId": "B-1"}}]})
    assert S.parse_tool_calls("Sure:\n" + js) == calls
    assert S.parse_tool_calls(REACT) == calls
    assert S.parse_tool_calls("I cannot help.") == []


def test_parse_arguments_is_lenient_with_real_gold_quirks():
    assert S.parse_arguments('{"animeId": ${animeId from searchAnime}}') == {"animeId": "${animeId from searchAnime}"}
    assert S.parse_arguments('{"a": 1} trailing words') == {"a": 1}
    broken = S.parse_arguments('{"base": "USD", "symbols": "symbols": ["EUR"]}')
    assert broken.get("base") == "USD"
    assert S.parse_arguments("no json here") == {}


def test_tool_scoring_matches_the_paper_definition():
    gold = [{"Action": "searchBooks", "Action_Input": '{"query": "chess", "limit": 2}'},
            {"Action": "getBook", "Action_Input": '{"bookId": "B-1"}'}]
    assert S.score_tools(REACT, {"gold_calls": gold}) == {"action_acc": 1.0, "argument_acc": 1.0, "full_acc": 1.0}
    wrong_arg = REACT.replace('"B-1"', '"B-2"')
    assert S.score_tools(wrong_arg, {"gold_calls": gold}) == {"action_acc": 1.0, "argument_acc": 0.5, "full_acc": 0.0}
    one_call = REACT.split("Thought: Now")[0]
    assert S.score_tools(one_call, {"gold_calls": gold}) == {"action_acc": 0.0, "argument_acc": 0.0, "full_acc": 0.0}
    swapped = REACT.replace("Action: getBook", "Action: searchBooks")
    assert S.score_tools(swapped, {"gold_calls": gold})["action_acc"] == 0.0
    # empty gold arguments: 1 iff the prediction is empty too; empty-valued gold keys are ignored
    assert S.score_tool_calls([{"Action": "a", "Action_Input": {}}], [{"Action": "a", "Action_Input": {}}])["full_acc"] == 1.0
    assert S.score_tool_calls([{"Action": "a", "Action_Input": {"x": 1}}], [{"Action": "a", "Action_Input": {}}])["argument_acc"] == 0.0
    assert S.score_tool_calls([{"Action": "a", "Action_Input": {"x": " 1"}}],
                              [{"Action": "a", "Action_Input": {"x": 1, "y": ""}}])["full_acc"] == 1.0


def test_prompts_are_self_consistent():
    p = S.mc_prompt("Q?", ["one", "two", "three"], context="ctx")
    assert "A. one\nB. two\nC. three" in p and "ctx" in p and p.rstrip().endswith("Answer: <A/B/C>")
    t = S.toolalpaca_prompt("Do it", "docs here", ["x", "y"])
    assert "docs here" in t and "Action Input:" in t and t.rstrip().endswith("Begin!")
    assert S.parse_react(S.react_text([{"Action": "x", "Action_Input": '{"k": "v"}'}])) == [{"Action": "x", "Action_Input": {"k": "v"}}]


def test_score_dispatch_rejects_unknown_benchmark():
    with pytest.raises(ValueError):
        S.score("x", {"benchmark": "nope"})


@pytest.mark.realdata
def test_real_toolalpaca_gold_calls_score_full_match(monkeypatch):
    if not (REAL / "toolalpaca" / "test.jsonl").is_file():
        pytest.skip(f"no real data at {REAL}")
    monkeypatch.setenv("UNISD_DATA_DIR", str(REAL))
    from unisd.data import benchmarks as B

    examples = B.load("toolalpaca", "test")
    scores = [S.score(e.answer, e.meta) for e in examples]
    assert all(s["full_acc"] == 1.0 for s in scores)
    # a reply that drops the last call scores lower on every multi-call example
    multi = [e for e in examples if len(e.meta["gold_calls"]) > 1]
    assert multi and all(S.score(e.answer.rsplit("Action:", 1)[0], e.meta)["action_acc"] == 0.0 for e in multi)
