"""The sharded combinations under torchrun x2 (gloo, the tiny model): --fsdp with --lora, --bf16, an EMA teacher
and base-model samples (`mix source=base`: the LoRA student with its adapter off), all in one run. It trains,
checkpoints, resumes exactly (a copy of the run cut back to an earlier checkpoint continues to the same weights)
and writes a folder that `lm_eval --model hf` loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.torchrun

COMBINATIONS = {  # one run holds them all (each torchrun launch costs most of the test); --rollout vllm with --fsdp:
    # tests/test_vllm.py, in the engine's environment
    "fsdp-lora-bf16-ema": ["--lora", "--lora-r", "4", "--bf16", "--plugins", "ema,mix", "-o", "ema.every=1",
                           "-o", "ema.beta=0.5", "-o", "mix.source=base", "-o", "mix.prob=0.5"],
}


ROWS = [{"question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1},
        {"question": "Where do fish live?", "choices": ["water", "trees"], "label": 0}]


def _lm_eval_loads(folder: Path, tasks: Path, **extra: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = ",".join([f"pretrained={folder}", "dtype=float32", *(f"{k}={v}" for k, v in extra.items())])
    return simple_evaluate(model="hf", model_args=args, tasks=["combo_mc"], device="cpu", batch_size=2,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_sharded_combination_trains_resumes_exactly_and_loads_in_lm_eval(tiny_model, tiny_data, tmp_path, combination,
                                                                         sharded_run, cut_back, tiny_task_writer):
    extra = COMBINATIONS[combination]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    sharded_run(tiny_model, tiny_data, run, *extra)
    cut_back(run, resumed)
    sharded_run(tiny_model, tiny_data, resumed, *extra, "--resume")
    trained, again, initial = (load_file(str(f / "model.safetensors")) for f in (run, resumed, tiny_model))
    assert sorted(trained) == sorted(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)   # it trained
    for k in trained:
        assert torch.equal(again[k], trained[k]), k                        # and resumed exactly
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 3
    (tmp_path / "tasks").mkdir()
    tasks = tiny_task_writer(tmp_path / "tasks", ROWS, "combo")
    result = _lm_eval_loads(run, tasks)
    assert result["n-samples"]["combo_mc"]["effective"] == 2
    if "--lora" in extra:  # the adapter on the base model scores as the merged model does
        adapter = _lm_eval_loads(tiny_model, tasks, peft=str(run / "adapter"))
        assert adapter["results"]["combo_mc"]["acc,none"] == result["results"]["combo_mc"]["acc,none"]
