"""Benchmark adapters, read through UNISD_DATA_DIR from fixtures written in each benchmark's Hub schema."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from unisd.data import DataError, benchmarks as B
from unisd.data.prompts import teacher_prompt
from unisd.data.scoring import LETTERS, parse_react, score_mc

FIXTURES = Path(__file__).parent / "fixtures"
REAL = Path(os.environ.get("UNISD_REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def fixture_data(monkeypatch):
    monkeypatch.setenv("UNISD_DATA_DIR", str(FIXTURES))


def _raw(rel: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / rel).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name,split,rel", [
    ("scienceqa", "test", "scienceqa/test.jsonl"),
    ("cos_e", "validation", "cos_e/v1.11/validation.jsonl"),
    ("gpqa", "test", "gpqa/gpqa_main/train.jsonl"),
])
def test_mc_gold_letter_points_at_the_correct_option(name, split, rel):
    examples = B.load(name, split)
    raw = [r for r in _raw(rel) if r.get("image") is None]
    assert len(examples) == len(raw)
    for ex, row in zip(examples, raw):
        correct = {"scienceqa": lambda r: r["choices"][r["answer"]], "cos_e": lambda r: r["answer"],
                   "gpqa": lambda r: r["Correct Answer"]}[name](row)
        options = ex.meta["options"]
        assert options[LETTERS.index(ex.answer)] == correct
        assert ex.meta["gold"] == ex.answer and ex.meta["n_options"] == len(options)
        assert f"{ex.answer}. {correct}" in ex.prompt  # the prompt lists the options with these letters
        assert sorted(options) == sorted(row["choices"] if "choices" in row else
                                         [row["Correct Answer"]] + [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)])
        assert score_mc(f"Reasoning: because.\nAnswer: {ex.answer}", ex.meta)["acc"] == 1.0
        assert ex.meta["benchmark"] == name


def test_shuffle_is_deterministic_per_question_and_varies_across_questions():
    a, b = B.load("cos_e", "validation"), B.load("cos_e", "validation")
    assert [e.meta["options"] for e in a] == [e.meta["options"] for e in b]
    assert B.shuffled_options("q1", "x", ["y", "z", "w"]) == B.shuffled_options("q1", "x", ["y", "z", "w"])
    golds = {B.shuffled_options(f"question {i}", "right", ["w1", "w2", "w3"])[1] for i in range(40)}
    assert len(golds) >= 3  # the gold is not always in the same slot


def test_scienceqa_text_only_with_lecture_and_rationale():
    examples = B.load("scienceqa", "test")
    assert len(examples) == 3  # the row with an image is dropped
    ex = examples[0]
    assert "Speed tells how far" in ex.prompt  # lecture as context
    assert ex.rationale.startswith("Ninety kilometres")
    assert "Answer: " + ex.answer in teacher_prompt(ex)
    assert all("picture" not in e.prompt for e in examples)


def test_cose_rationale_is_abstractive_explanation():
    ex = B.load("cos_e", "train")[0]
    assert ex.rationale == "A refrigerator keeps food cold."
    assert B.load("cos_e", "test")[0].meta["task_id"] == "fx-cose-1"  # test is an alias of validation


def test_mbpp_sanitized_and_full_with_function_name_fixed():
    test = B.load("mbpp", "test")
    assert [e.meta["task_id"] for e in test] == [9001, 9002, 9003]
    renamed = test[1]
    assert "def triangular(" in renamed.answer and "def tri(" not in renamed.answer
    assert renamed.meta["entry_point"] == "triangular" and "`triangular(n)`" in renamed.prompt
    assert all(t in renamed.prompt for t in renamed.meta["tests"])  # visible tests
    assert test[2].meta["test_imports"] == ["import math"]
    train = B.load("mbpp", "train")
    assert train[0].meta["entry_point"] == "count_vowels" and "\r" not in train[0].answer
    assert train[1].meta["test_setup_code"] == "chain = Box(Box(Box()))"


def test_toolalpaca_local_schema_builds_react_prompt_and_gold_calls():
    examples = B.load("toolalpaca", "test")
    ex = examples[1]
    assert "searchBooks" in ex.prompt and "Action Input:" in ex.prompt and ex.meta["instruction"] in ex.prompt
    assert [c["Action"] for c in ex.meta["gold_calls"]] == ["searchBooks", "getBook"]
    assert ex.meta["gold_calls"][0]["Action_Input"] == {"query": "chess"}
    assert [c["Action"] for c in parse_react(ex.answer)] == ["searchBooks", "getBook"]


def test_toolalpaca_hub_train_schema_uses_prompt_verbatim():
    examples = B.load("toolalpaca", "train")
    raw = _raw("toolalpaca/train.jsonl")
    assert examples[0].prompt == raw[0]["prompt"]
    assert examples[1].answer == "\n".join(raw[1]["golden_response"])
    assert examples[1].meta["gold_calls"] == [{"Action": "weatherNow", "Action_Input": {"city": "Rome"}},
                                              {"Action": "weatherNow", "Action_Input": {"city": "Paris"}}]


def test_humaneval_from_package_always():
    examples = B.load("humaneval", "test")
    assert len(examples) == 164 and examples[0].meta["task_id"] == "HumanEval/0"
    assert examples[0].meta["code_prompt"] in examples[0].prompt


def test_unknown_name_and_missing_file_are_one_line_data_errors(monkeypatch, tmp_path):
    with pytest.raises(DataError) as e:
        B.load("sciq", "test")
    assert "scienceqa" in str(e.value) and "humaneval" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("UNISD_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"scienceqa.*test\.jsonl"):
        B.load("scienceqa", "test")
    with pytest.raises(DataError, match="toolalpaca"):
        B.load("toolalpaca", "train")


def test_a_torn_offline_file_is_one_line_naming_its_line(monkeypatch, tmp_path):
    (tmp_path / "cos_e" / "v1.11").mkdir(parents=True)
    (tmp_path / "cos_e" / "v1.11" / "train.jsonl").write_text('{"id": "a"}\n{"id": "b", "quest')
    monkeypatch.setenv("UNISD_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"cos_e/v1\.11/train\.jsonl:2: not valid JSON"):
        B.load("cos_e", "train")


def test_hub_failure_for_gpqa_explains_gating(monkeypatch):
    import datasets

    def refuse(*a, **k):
        raise ConnectionError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub.")

    monkeypatch.delenv("UNISD_DATA_DIR")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataError) as e:
        B.load("gpqa", "test")
    assert "HF_TOKEN" in str(e.value) and "huggingface-cli login" in str(e.value)


def test_hf_dataset_columns_round_trip_meta():
    ds = B.hf_dataset("mbpp")["test"]
    assert ds.column_names == ["prompt", "answer", "rationale", "task_id", "meta"]
    assert ds[0]["prompt"] == B.load("mbpp", "test")[0].prompt
    assert json.loads(ds[1]["meta"])["entry_point"] == "triangular"


@pytest.mark.realdata
def test_real_cose_and_toolalpaca_files(monkeypatch):
    if not (REAL / "cos_e").is_dir():
        pytest.skip(f"no real data at {REAL}")
    monkeypatch.setenv("UNISD_DATA_DIR", str(REAL))
    cose = B.load("cos_e", "validation")
    assert len(cose) == 1221 and all(e.rationale for e in cose[:50])
    counts = {x: sum(e.answer == x for e in cose) for x in "ABCDE"}
    assert all(0.12 < c / len(cose) < 0.28 for c in counts.values()), counts  # the shuffle spreads the gold
    assert all(e.meta["options"][LETTERS.index(e.answer)] in e.prompt for e in cose)
    assert len(B.load("cos_e", "train")) == 9741
    tools = B.load("toolalpaca", "test")
    assert len(tools) == 214 and all(e.meta["gold_calls"] for e in tools)
