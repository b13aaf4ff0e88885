"""Every sharded combination under torchrun x2 (gloo, the tiny model): --fsdp with --lora, with --bf16, with an EMA
teacher (with --bf16 together). Each trains, checkpoints, resumes exactly (a copy of the run cut back to an earlier
checkpoint continues to the same weights) and writes a folder that `lm_eval --model hf` loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.torchrun

COMBINATIONS = {  # (--rollout vllm with --fsdp: tests/test_vllm.py, in the engine's environment)
    "fsdp-lora": ["--lora", "--lora-r", "4", "--plugins", "mix", "-o", "mix.source=base", "-o", "mix.prob=0.5"],
    "fsdp-bf16-ema": ["--bf16", "--plugins", "ema", "-o", "ema.every=1", "-o", "ema.beta=0.5"],
}


def _lm_eval_loads(folder: Path, tmp_path: Path, **extra: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    rows = [{"question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1},
            {"question": "Where do fish live?", "choices": ["water", "trees"], "label": 0}]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny.yaml").write_text(
        "task: unisd_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'tiny.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    args = ",".join([f"pretrained={folder}", "dtype=float32", *(f"{k}={v}" for k, v in extra.items())])
    return simple_evaluate(model="hf", model_args=args, tasks=["unisd_tiny"], device="cpu", batch_size=2,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_sharded_combination_trains_resumes_exactly_and_loads_in_lm_eval(tiny_model, tiny_data, tmp_path, combination,
                                                                         sharded_run, cut_back):
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
    result = _lm_eval_loads(run, tmp_path)
    assert result["n-samples"]["unisd_tiny"]["effective"] == 2
    if "--lora" in extra:  # the adapter on the base model scores as the merged model does
        adapter = _lm_eval_loads(tiny_model, tmp_path, peft=str(run / "adapter"))
        assert adapter["results"]["unisd_tiny"]["acc,none"] == result["results"]["unisd_tiny"]["acc,none"]
