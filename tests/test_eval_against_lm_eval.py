"""`unisd eval` against lm-eval's own `simple_evaluate`, called directly, and against hand perplexities.

The reference run below is written out in full from lm-eval's public API (chat template, greedy
decoding, seeds), not through unisd: if `unisd eval` changed a setting, a prompt or a score, the
contexts, replies, log-likelihoods or headline numbers would differ.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd.cli import main
from unisd.data import Example
from unisd.data.prompts import demonstration

QUESTIONS = [("Which animal barks?", ["cat", "dog"], 1), ("Where do fish live?", ["water", "trees"], 0),
             ("What is two plus two?", ["4", "5"], 0), ("Name a colour of the sky.", ["green", "blue"], 1),
             ("What is one plus one?", ["2", "3"], 0), ("Which is a drink?", ["stone", "water"], 1)]
ROWS = [{"question": q, "choices": c, "label": label, "prompt": f"{q} A. {c[0]} B. {c[1]}", "answer": "AB"[label],
         "rationale": f"the answer is {c[label]}"} for q, c, label in QUESTIONS]
SEED = 1234


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory, tiny_task_writer) -> Path:
    """A multiple-choice task (acc from log-likelihoods) and a generation task (greedy replies)."""
    return tiny_task_writer(tmp_path_factory.mktemp("tasks"), ROWS, "direct")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, other_tiny_model, tiny_tasks) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("eval")
    models = {"base": tiny_model, "other": other_tiny_model}
    args = ["eval", "--tasks", "direct_mc,direct_gen", "--include-path", str(tiny_tasks), "--out", str(out),
            "--retention", "--base", str(tiny_model)]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, models


def _direct(model: Path, tasks: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32",
                           tasks=["direct_mc", "direct_gen"],
                           task_manager=TaskManager(include_path=[str(tasks)], include_defaults=False),
                           apply_chat_template=True, log_samples=True, device="cpu", batch_size=4,
                           random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                           fewshot_random_seed=SEED)


def _normalised(value):
    """JSON's view of a logged value (tuples become lists), as samples.jsonl stores it."""
    return json.loads(json.dumps(value, default=str))


def _logged(out: Path, name: str) -> dict[tuple[str, int], list]:
    rows = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
    return {(r["task"], r["doc_id"]): [r["arguments"], r["filtered_resps"]] for r in rows}


def test_scores_and_samples_equal_a_direct_simple_evaluate(evaluated, tiny_tasks):
    out, models = evaluated
    combined = json.loads((out / "results.json").read_text())
    for name, path in models.items():
        direct = _direct(path, tiny_tasks)
        assert combined["scores"][name] == pytest.approx({
            "direct_mc": 100 * direct["results"]["direct_mc"]["acc,none"],
            "direct_gen": 100 * direct["results"]["direct_gen"]["exact_match,none"]})
        # the same prompts went in and the same replies and log-likelihoods came out
        want = {(task, r["doc_id"]): _normalised([r["arguments"], r["filtered_resps"]])
                for task, rows in direct["samples"].items() for r in rows}
        assert _logged(out, name) == want
        assert len(want) == 2 * len(ROWS)
    # the two models score the choices differently, so equal numbers are no coincidence of two blanks
    assert _logged(out, "base") != _logged(out, "other")


def test_retention_in_results_is_recomputed_by_hand(evaluated, hand_perplexity):
    out, models = evaluated
    combined = json.loads((out / "results.json").read_text())
    for name, path in models.items():
        rows = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["task"] == "direct_gen"]
        contexts = [r["arguments"][0][0] for r in rows]  # lm-eval logs (context, generation kwargs)
        replies = [(c, r["resps"][0][0]) for c, r in zip(contexts, rows) if r["resps"][0][0]]
        gold = [(c, demonstration(Example(r["doc"]["prompt"], r["doc"]["answer"], r["doc"]["rationale"])))
                for c, r in zip(contexts, rows)]
        got = combined["retention"][name]["direct_gen"]
        assert got["ppl_ret"] == pytest.approx(hand_perplexity(models["base"], replies), rel=1e-5)
        assert got["ppl_fit"] == pytest.approx(hand_perplexity(path, gold), rel=1e-5)
