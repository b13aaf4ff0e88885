"""What `unisd eval` hands lm-eval and what it makes of the answer, with lm-eval's run replaced by a recorder.

The end-to-end tests (`test_evaluate`, `test_eval_against_lm_eval`) show the numbers equal lm-eval's own on
the tiny CPU model; these pin the settings that model cannot tell apart (device, seeds, the vLLM cache,
unsafe code allowed for MBPP/HumanEval) and the bookkeeping around each run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lm_eval
import pytest
import torch

from unisd import engine
from unisd import evaluate as ev
from unisd.shared_engine import SharedEngine


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: calls.append(kwargs) or {"results": {}})
    return calls


def test_lm_eval_gets_the_shared_settings_on_cpu(recorded, tiny_model):
    ev.run_lm_eval(str(tiny_model), ["unisd_cose"], 7, [], 3)
    (kwargs,) = recorded
    manager = kwargs.pop("task_manager")
    assert kwargs == {"model": "hf", "model_args": f"pretrained={tiny_model},dtype=float32", "tasks": ["unisd_cose"],
                      "limit": 7, "apply_chat_template": True, "confirm_run_unsafe_code": True, "log_samples": True,
                      "device": "cpu", "batch_size": 3, "random_seed": 1234, "gen_kwargs": None,
                      "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
    assert "unisd_mbpp" in manager.all_tasks and "hellaswag" not in manager.all_tasks  # only ours (and --include-path)


def test_lm_eval_on_vllm_and_a_gpu(recorded, tiny_model, monkeypatch):
    import lm_eval.api.registry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine, "lm_eval_backend", lambda: None)
    made, stopped = [], []

    class VLLM:  # lm-eval's vllm model type, made by unisd so that its engine can be shut down after scoring
        model = "its vllm.LLM"

        @classmethod
        def create_from_arg_string(cls, args, extra):
            made.append((args, extra))
            return cls()

    monkeypatch.setattr(lm_eval.api.registry, "get_model", lambda name: VLLM if name == "vllm" else None)
    monkeypatch.setattr(engine, "shut_down", stopped.append)
    ev.run_lm_eval(str(tiny_model), ["unisd_cose"], None, [], 3, max_gen_toks=64, backend="vllm")
    (kwargs,) = recorded
    assert isinstance(kwargs["model"], VLLM) and kwargs["model_args"] is None
    assert kwargs["device"] == "cuda" and kwargs["batch_size"] == "auto" and kwargs["gen_kwargs"] == "max_gen_toks=64"
    assert made == [(f"pretrained={tiny_model},dtype=bfloat16,seed=1234,kv_cache_memory_bytes={2 * 2 ** 30},"
                     "enforce_eager=False", {"batch_size": "auto", "max_batch_size": None, "device": "cuda"})]
    assert stopped == ["its vllm.LLM"]  # shut down once scored


def test_unknown_task_names_the_unisd_tasks(recorded, tiny_model):
    with pytest.raises(ev.EvalError, match=r"unknown task\(s\) nope \(unisd tasks: .*unisd_cose"):
        ev.run_lm_eval(str(tiny_model), ["unisd_cose", "nope"], None, [], 1)
    assert recorded == []


def _result(score: float) -> dict:
    row = {"doc_id": 0, "doc": {"prompt": "p", "answer": "a"}, "arguments": [["ctx", {}]], "resps": [["a"]],
           "filtered_resps": ["a"], "exact_match": score, "logged_path": Path("x")}  # not JSON: saved as text
    return {"results": {"t": {"exact_match,none": score}}, "configs": {"t": {"generation_kwargs": {"max_gen_toks": 8}}},
            "samples": {"t": [row]}}


def _run_folder(root: Path, name: str, order: str) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "unisd.json").write_text(json.dumps({"config": {"preset": "sd"}, "data": {"order_sha256": order * 64}}))
    (folder / "README.md").write_text("# a run\n")  # its model card
    return str(folder)


def test_evaluate_passes_its_settings_on_and_writes_every_file(monkeypatch, tmp_path):
    calls: list[tuple] = []

    def fake(*args):
        calls.append(args)
        return _result(float(len(calls) == 2))

    monkeypatch.setattr(ev, "run_lm_eval", fake)
    checkpoints = {"a": _run_folder(tmp_path, "a", "1"), "b": _run_folder(tmp_path, "b", "2")}
    lines: list[str] = []
    out = tmp_path / "eval"
    (out / "a").mkdir(parents=True)  # an earlier evaluation's folder is reused
    combined = ev.evaluate(checkpoints, ["t"], out, limit=5, batch_size=2, echo=lines.append, max_gen_toks=8)
    assert lines[0] == ("warning: these runs were trained on different data orders (a 11111111, b 22222222); "
                        "their differences mix method and data")
    assert calls == [(checkpoints["a"], ["t"], 5, [], 2, 8, "hf", None, None),
                     (checkpoints["b"], ["t"], 5, [], 2, 8, "hf", None, None)]
    assert combined["runs"]["a"] == {"preset": "sd", "order_sha256": "1" * 64}
    assert combined["scores"] == {"a": {"t": 0.0}, "b": {"t": 100.0}} and combined["gen_toks"] == {"t": 8}
    assert set(combined["paired"]) == {"b"} and combined["paired"]["b"]["a"]["t"]["n"] == 1
    assert set(combined) == {"tasks", "limit", "seed", "max_gen_toks", "gen_toks", "runs", "scores", "ci95",
                             "overall_ci95", "paired", "answers", "retention", "items", "retention_documents",
                             "chat_template_kwargs"}
    assert (out / "results.json").read_text() == json.dumps(combined, indent=2)
    saved = json.loads((out / "b" / "results.json").read_text())
    assert "samples" not in saved and (out / "b" / "results.json").read_text() == json.dumps(saved, indent=2)
    (logged,) = [json.loads(line) for line in (out / "b" / "samples.jsonl").read_text().splitlines()]
    assert logged["task"] == "t" and logged["logged_path"] == "x"

    monkeypatch.setattr(ev, "run_lm_eval", lambda *args: calls.append(args) or {"results": {"t": {"acc,none": 0.5}}})
    again = ev.evaluate({"a": checkpoints["a"]}, ["t"], out, echo=lines.append, backend="vllm")
    # under vllm every checkpoint is offered the engine of the ones before it (unisd.shared_engine)
    assert calls[-1][:-1] == (checkpoints["a"], ["t"], None, [], 4, None, "vllm", None)
    assert isinstance(calls[-1][-1], SharedEngine) and calls[-1][-1].lm is None
    assert again["scores"] == {"a": {"t": 50.0}} and again["items"] == {"a": {}}
    assert (out / "a" / "samples.jsonl").read_text() == ""


def test_run_info_reads_the_preset_and_the_data_order(tmp_path):
    assert ev.run_info(_run_folder(tmp_path, "r", "f")) == {"preset": "sd", "order_sha256": "f" * 64}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "unisd.json").write_text("{}")
    assert ev.run_info(str(tmp_path / "old")) == {"preset": "", "order_sha256": None}
    assert ev.run_info(str(tmp_path)) == {}


def test_scores_keep_leaf_tasks_with_a_headline_metric():
    results = {"results": {"grp": {"acc,none": 0.5}, "a": {"acc,none": 1.0, "acc_stderr,none": 0.1},
                           "b": {"alias": "b", "pass@1,none": 0.25}, "c": {"alias": "c"}},
               "group_subtasks": {"grp": ["a", "b", "c"]}}
    assert ev.scores(results) == {"a": 100.0, "b": 25.0}
    del results["group_subtasks"]
    assert ev.scores(results) == {"grp": 50.0, "a": 100.0, "b": 25.0}


def test_item_scores_skip_a_task_without_results():
    rows = [{"doc_id": 1, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 0.0}]
    result = {"results": {"t": {"acc,none": 0.5}}}
    assert ev.item_scores({"t": rows, "gone": rows}, result) == {"t": {"0": 0.0, "1": 1.0}}


def test_multiple_choice_answer_is_the_highest_log_likelihood():
    row = {"doc_id": 0, "resps": [[(-5.0, False)]], "filtered_resps": [(-5.0, False), (-1.0, False), (-3.0, True)],
           "target": 2}
    assert ev._answer_and_gold(row) == ("1", "2")


def test_overall_interval_is_in_points():
    perfect = {str(i): 1.0 for i in range(10)}
    assert ev.overall_intervals({"r": {"t": perfect, "u": perfect}}) == {"r": [100.0, 100.0]}


def test_merge_joins_tasks_and_keeps_a_shared_generation_cap():
    first = {"tasks": ["a"], "max_gen_toks": 8, "scores": {"x": {"a": 1.0}}}
    second = {"tasks": ["b", "a"], "max_gen_toks": 8, "scores": {"x": {"b": 2.0}, "y": {"a": 3.0}}}
    merged = ev.merge([first, second])
    assert merged["tasks"] == ["a", "b"] and merged["max_gen_toks"] == 8
    assert merged["scores"] == {"x": {"a": 1.0, "b": 2.0}, "y": {"a": 3.0}}
    assert ev.merge([first, {**second, "max_gen_toks": 16}])["max_gen_toks"] is None


def test_uncertainty_without_items_and_comparisons_without_a_task_list():
    combined = ev.add_uncertainty({"scores": {"base": {"t": 10.0}}})
    assert (combined["ci95"], combined["overall_ci95"], combined["paired"]) == ({}, {}, {})
    runs = {"base": {}, "sft": {"preset": "sft"}, "gkd": {"preset": "gkd"}, "star": {"preset": "unisd-star"}}
    scores = {"base": {"t": 1.0}, "sft": {"t": 2.0}, "gkd": {"t": 3.0}, "star": {"t": 4.0}}
    assert ev.comparisons({"scores": scores, "runs": runs})[-1] == ("star", "gkd")


def test_fit_without_gold_demonstrations_is_nan(tiny_model):
    tok_free = {"t": [{"doc_id": 0, "doc": {"question": "q"}, "arguments": [["Say hi.", {}]], "resps": [["hi"]]}]}
    got = ev.retention(tok_free, str(tiny_model), str(tiny_model))["t"]
    assert got["ppl_ret"] > 1.0 and math.isnan(got["ppl_fit"]) and all(math.isnan(x) for x in got["ppl_fit_ci95"])
