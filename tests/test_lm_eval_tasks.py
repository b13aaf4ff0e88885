"""The lm-eval task suite: indexing, loading, and scoring through the harness itself (no neural model)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from unisd.data import benchmarks as B  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
FIXTURES = Path(__file__).parent / "fixtures"
ALL = ["unisd_scienceqa", "unisd_mbpp", "unisd_cose", "unisd_toolalpaca", "unisd_gpqa", "unisd_humaneval"]
OFFLINE = ["unisd_mbpp", "unisd_cose", "unisd_toolalpaca", "unisd_humaneval"]


@pytest.fixture
def fixtures_env(monkeypatch):
    monkeypatch.setenv("UNISD_DATA_DIR", str(FIXTURES))


def _manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_index_finds_all_tasks_and_groups_fast():
    start = time.monotonic()
    tm = _manager()
    elapsed = time.monotonic() - start
    print(f"TaskManager indexing: {elapsed:.3f} s")
    assert set(ALL + ["unisd", "unisd_offline"]) <= set(tm.all_tasks)
    assert elapsed < 5


def test_load_every_task_on_fixtures(fixtures_env):
    tasks = _manager().load(["unisd"])["tasks"]
    assert set(tasks) == set(ALL)
    for name, task in tasks.items():
        cfg = task.config
        assert cfg.output_type == "generate_until"
        assert cfg.generation_kwargs["do_sample"] is False
        docs = list(task.test_docs())
        bench = json.loads(docs[0]["meta"])["benchmark"]
        assert task.doc_to_text(docs[0]) == B.load(bench, B.EVAL_SPLITS[bench])[0].prompt  # one source of truth
    assert tasks["unisd_mbpp"].config.unsafe_code and tasks["unisd_humaneval"].config.unsafe_code
    assert not tasks["unisd_cose"].config.unsafe_code
    assert {n: t.config.generation_kwargs["max_gen_toks"] for n, t in tasks.items()} == dict.fromkeys(ALL, 1024)


def test_missing_offline_data_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("UNISD_DATA_DIR", str(tmp_path))
    with pytest.raises(Exception, match=r"scienceqa: no offline file .*scienceqa/test\.jsonl"):
        _manager().load(["unisd_scienceqa"])


def test_process_results_scores_gold_1_and_wrong_0(fixtures_env):
    tasks = _manager().load(["unisd_mbpp", "unisd_humaneval", "unisd_toolalpaca", "unisd_gpqa"])["tasks"]
    pr = tasks["unisd_mbpp"].process_results
    for doc in tasks["unisd_mbpp"].test_docs():
        assert pr(doc, [f"```python\n{doc['answer']}\n```"]) == {"pass@1": 1.0}
        assert pr(doc, ["```python\ndef wrong():\n    pass\n```"]) == {"pass@1": 0.0}
    he = list(tasks["unisd_humaneval"].test_docs())[:3]
    for doc in he:
        assert tasks["unisd_humaneval"].process_results(doc, [f"```python\n{doc['answer']}\n```"]) == {"pass@1": 1.0}
        assert tasks["unisd_humaneval"].process_results(doc, ["```python\n    return None\n```"]) == {"pass@1": 0.0}
    for doc in tasks["unisd_toolalpaca"].test_docs():
        assert tasks["unisd_toolalpaca"].process_results(doc, [doc["answer"]])["full_acc"] == 1.0
        assert tasks["unisd_toolalpaca"].process_results(doc, ["Final Answer: no tools"])["full_acc"] == 0.0
    for doc in tasks["unisd_gpqa"].test_docs():
        wrong = next(x for x in "ABCD" if x != doc["answer"])
        assert tasks["unisd_gpqa"].process_results(doc, [f"Reasoning: ok\nAnswer: {doc['answer']}"]) == {"acc": 1.0}
        assert tasks["unisd_gpqa"].process_results(doc, [f"Answer: {wrong}"]) == {"acc": 0.0}


class GoldLM(LM):
    """Answers each prompt with the gold response (formatted as a model would), or a wrong one."""

    def __init__(self, replies: dict[str, str]):
        super().__init__()
        self.replies = replies

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.replies[r.args[0]] for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def _gold_reply(e) -> str:
    bench = e.meta["benchmark"]
    if bench in ("mbpp", "humaneval"):
        return f"```python\n{e.answer}\n```"
    if bench == "toolalpaca":
        return e.answer
    return f"Reasoning: from the reference.\nAnswer: {e.answer}"


def test_simple_evaluate_end_to_end_with_gold_model(fixtures_env):
    import lm_eval

    replies = {e.prompt: _gold_reply(e) for b in ("mbpp", "cos_e", "toolalpaca", "humaneval", "scienceqa", "gpqa")
               for e in B.load(b, B.EVAL_SPLITS[b])}
    out = lm_eval.simple_evaluate(model=GoldLM(replies), tasks=["unisd"], task_manager=_manager(), limit=3,
                                  confirm_run_unsafe_code=True, log_samples=False)
    res = out["results"]
    for t in ("unisd_scienceqa", "unisd_cose", "unisd_gpqa"):
        assert res[t]["acc,none"] == 1.0
    for t in ("unisd_mbpp", "unisd_humaneval"):
        assert res[t]["pass@1,none"] == 1.0
    assert res["unisd_toolalpaca"]["full_acc,none"] == 1.0
    assert res["unisd"]["acc,none"] == 1.0 and res["unisd"]["pass@1,none"] == 1.0
    assert out["versions"]["unisd_mbpp"] == 1.0

    wrong = {p: "Answer: Z\n```python\nraise SystemExit(1)\n```" for p in replies}
    bad = lm_eval.simple_evaluate(model=GoldLM(wrong), tasks=["unisd_offline"], task_manager=_manager(), limit=3,
                                  confirm_run_unsafe_code=True, log_samples=False)["results"]
    assert bad["unisd_cose"]["acc,none"] == 0.0 and bad["unisd_mbpp"]["pass@1,none"] == 0.0
    assert bad["unisd_toolalpaca"]["full_acc,none"] == 0.0


def test_unsafe_tasks_refuse_without_confirmation(fixtures_env):
    import lm_eval

    with pytest.raises(ValueError, match="unsafe"):
        lm_eval.simple_evaluate(model=GoldLM({}), tasks=["unisd_mbpp"], task_manager=_manager(), limit=1,
                                log_samples=False)
