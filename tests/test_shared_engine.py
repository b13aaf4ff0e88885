"""unisd.shared_engine: which checkpoints may share one vLLM engine, and the weights loaded into it.

That the shared engine scores each checkpoint as an engine of its own would (and starts once) is checked against
transformers in tests/test_vllm.py (marker `vllm`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from unisd import shared_engine
from unisd.shared_engine import SharedEngine, checkpoint_weights, weights_only_differ


@pytest.fixture
def copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_copy_written_by_another_transformers_shares_the_engine(tiny_model, copy):
    edit_json(copy / "config.json", transformers_version="0.0.1", dtype="bfloat16")
    edit_json(copy / "tokenizer_config.json", local_files_only=True)
    assert weights_only_differ(tiny_model, copy)


@pytest.mark.parametrize("change", ["shape", "generation", "chat template", "tokenizer", "no safetensors"])
def test_anything_beside_the_weights_needs_an_engine_of_its_own(tiny_model, copy, change):
    if change == "shape":
        edit_json(copy / "config.json", num_hidden_layers=json.loads((copy / "config.json").read_text())
                  ["num_hidden_layers"] + 1)
    elif change == "generation":
        edit_json(copy / "generation_config.json", repetition_penalty=1.3)
    elif change == "chat template":
        template = next(p for p in (copy / "chat_template.jinja", copy / "tokenizer_config.json") if p.is_file())
        template.write_text(template.read_text().replace("{", "{ ", 1) if template.suffix == ".jinja"
                            else json.dumps({**json.loads(template.read_text()), "chat_template": "{{ messages }}"}))
    elif change == "tokenizer":
        edit_json(copy / "tokenizer_config.json", eos_token="<other>")
    else:
        for file in copy.glob("*.safetensors"):
            file.unlink()
    assert weights_only_differ(tiny_model, tiny_model)
    assert not weights_only_differ(tiny_model, copy)


def test_checkpoint_weights_are_every_tensor_of_the_folder(tiny_model):
    found = dict(checkpoint_weights(tiny_model))
    expected = {k: v for f in tiny_model.glob("*.safetensors") for k, v in load_file(f).items()}
    assert found.keys() == expected.keys() and expected
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def fake_lm(path: str) -> SimpleNamespace:
    """Stands in for lm-eval's vLLM model: what SharedEngine reads of it."""
    config = SimpleNamespace(dtype=torch.float32)
    return SimpleNamespace(path=path, model=SimpleNamespace(llm_engine=SimpleNamespace(model_config=config)))


def test_the_engine_starts_once_for_weights_and_again_for_another_model(tiny_model, copy, tmp_path, monkeypatch):
    other = Path(shutil.copytree(tiny_model, tmp_path / "other"))
    edit_json(other / "config.json", num_hidden_layers=json.loads((other / "config.json").read_text())
              ["num_hidden_layers"] + 1)
    started, loaded, shut = [], [], []
    monkeypatch.setattr(shared_engine.engine, "reload", lambda llm, weights, dtype: loaded.append(len(list(weights))))
    monkeypatch.setattr(shared_engine.engine, "shut_down", lambda llm: shut.append(llm))
    shared = SharedEngine(lambda path: started.append(path) or fake_lm(path))
    first = shared.holding(str(tiny_model), tiny_model)
    assert shared.holding(str(copy), copy) is first and started == [str(tiny_model)] and len(loaded) == 1
    assert loaded[0] == len(dict(checkpoint_weights(copy)))
    assert shared.holding("org/hub-id", None) is not first and len(started) == 2 and len(shut) == 1
    shared.holding(str(other), other)
    shared.holding(str(tiny_model), tiny_model)  # not the same as `other`: its own engine again
    assert len(started) == 4 and len(loaded) == 1
    shared.close()
    shared.close()
    assert len(shut) == 4
