"""unisd.engine's settings for vLLM, checked on CPU against a stand-in `vllm` module that records what it is given.

The stand-in holds vLLM's surface that unisd calls (`LLM`, `SamplingParams`, the model runner's `reload_weights`
signature); the real engine's behaviour is tests/test_vllm.py's (marker `vllm`).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from unisd import config as cfg
from unisd import engine as engine_module
from unisd import train as tr
from unisd.models import ModelError

GiB = 2**30


class FakeLLM:
    """Records the engine's settings and calls; samples two tokens and the end of turn for every prompt."""

    made: list["FakeLLM"] = []

    def __init__(self, **settings: Any) -> None:
        self.settings, self.calls, self.loads = settings, [], 0
        core = types.SimpleNamespace(shutdown=lambda: self.calls.append("shutdown"))
        self.llm_engine = types.SimpleNamespace(engine_core=core)
        FakeLLM.made.append(self)

    def collective_rpc(self, method: str, kwargs: dict[str, Any]) -> None:
        assert method == "reload_weights"
        self.loads += 1
        self.calls.append("load")
        for _ in kwargs["weights_iterator"]:
            pass

    def apply_model(self, fn: Any) -> None:
        pass

    def reset_prefix_cache(self) -> None:
        pass

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(f"wake_up {','.join(tags)}")

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")

    def generate(self, requests: list[Any], params: list[Any], use_tqdm: bool) -> list[Any]:
        self.calls.append("generate")
        eos = params[0].kwargs["stop_token_ids"][0]
        row = types.SimpleNamespace(token_ids=[5, 6, eos])
        return [types.SimpleNamespace(outputs=[row]) for _ in requests]


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, reload_weights: Any) -> None:
    """Install a `vllm` whose model runner's `reload_weights` has the given signature."""
    FakeLLM.made = []
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.0.test"  # type: ignore[attr-defined]
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams  # type: ignore[attr-defined]
    runner = types.ModuleType("vllm.v1.worker.gpu_model_runner")
    runner.GPUModelRunner = type("GPUModelRunner", (), {"reload_weights": reload_weights})  # type: ignore[attr-defined]
    for name, module in {"vllm": vllm, "vllm.v1": types.ModuleType("vllm.v1"),
                         "vllm.v1.worker": types.ModuleType("vllm.v1.worker"),
                         "vllm.v1.worker.gpu_model_runner": runner}.items():
        monkeypatch.setitem(sys.modules, name, module)


def _layerwise(self: Any, weights_iterator: Any = None, weights_path: Any = None, is_checkpoint_format: bool = True) -> None:
    """vLLM >= 0.19.1's signature (layerwise reload)."""


def _old(self: Any) -> None:
    """vLLM's signature before its layerwise reload."""


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_vllm(monkeypatch, _layerwise)


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be on a CUDA device with `free` of `total` bytes free."""
    def pretend(free: int, total: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, total))
    return pretend


def test_memory_fraction_is_what_is_free_less_the_margin():
    assert engine_module.memory_fraction(70 * GiB, 80 * GiB, 15 * GiB, 16 * GiB) == pytest.approx(70 / 80 - 0.01)
    # vLLM's default 0.9 would refuse to start with 70 of 80 GiB free; the fraction never asks for more than is free
    assert engine_module.memory_fraction(70 * GiB, 80 * GiB, 15 * GiB, 16 * GiB) * 80 * GiB < 70 * GiB


@pytest.mark.parametrize("free", [20 * GiB, 15 * GiB + 16 * GiB + 3 * GiB])  # short of weights + KV, of the margin
def test_an_engine_that_cannot_fit_is_one_line_naming_the_flags_that_help(free):
    with pytest.raises(ModelError) as e:
        engine_module.memory_fraction(free, 80 * GiB, 15 * GiB, 16 * GiB)
    message = str(e.value)
    assert "\n" not in message and "needs about 34.0 GiB" in message
    assert all(flag in message for flag in ("--rollout-kv-cache-gb", "--lora", "--fsdp"))


@pytest.mark.parametrize("batch, length, cuda, expected", [
    (4, 3072, True, {"max_num_seqs": 16, "max_num_batched_tokens": 4096,
                     "compilation_config": {"max_cudagraph_capture_size": 16}}),
    (64, 5120, True, {"max_num_seqs": 64, "max_num_batched_tokens": 5120,
                      "compilation_config": {"max_cudagraph_capture_size": 64}}),
    (4, 5120, False, {"max_num_seqs": 16, "max_num_batched_tokens": 5120, "enable_chunked_prefill": False}),
])
def test_batch_limits_are_sized_to_the_run(batch, length, cuda, expected):
    assert engine_module.batch_limits(batch, length, cuda) == expected


def test_on_cuda_the_engine_gets_the_free_fraction_and_the_run_sized_limits(fake_vllm, on_cuda, tiny_model: Path):
    on_cuda(60 * GiB, 80 * GiB)
    engine_module.Engine(tiny_model, torch.bfloat16, kv_cache_gb=1, max_model_len=2048, seed=0, batch=32)
    settings = FakeLLM.made[-1].settings
    assert settings["gpu_memory_utilization"] == pytest.approx(60 / 80 - 0.01)
    assert settings["kv_cache_memory_bytes"] == GiB
    assert (settings["max_num_seqs"], settings["max_num_batched_tokens"]) == (32, 4096)
    assert settings["compilation_config"] == {"max_cudagraph_capture_size": 32}
    assert settings["enable_sleep_mode"] is False


def test_on_cuda_an_engine_that_cannot_fit_stops_before_vllm_starts(fake_vllm, on_cuda, tiny_model: Path):
    on_cuda(2 * GiB, 80 * GiB)
    with pytest.raises(ModelError, match="--rollout-kv-cache-gb"):
        engine_module.Engine(tiny_model, torch.bfloat16, kv_cache_gb=1, max_model_len=2048, seed=0)
    assert FakeLLM.made == []


def test_an_engine_without_the_in_memory_reload_names_the_version_needed(monkeypatch, tiny_model: Path):
    _fake_vllm(monkeypatch, _old)
    with pytest.raises(ModelError) as e:
        engine_module.Engine(tiny_model, torch.float32, kv_cache_gb=1, max_model_len=1024, seed=0)
    assert "vllm>=0.19.1" in str(e.value) and "0.0.test" in str(e.value) and "\n" not in str(e.value)
    assert FakeLLM.made == []


def test_sleep_mode_frees_the_engine_between_rollouts(fake_vllm, on_cuda, tiny_model: Path):
    on_cuda(60 * GiB, 80 * GiB)
    engine = engine_module.Engine(tiny_model, torch.bfloat16, kv_cache_gb=1, max_model_len=1024, seed=0, sleep=True)
    llm = FakeLLM.made[-1]
    assert llm.settings["enable_sleep_mode"] is True
    engine.load([("w", torch.zeros(2))], label=1)
    assert engine.held == 1
    engine.generate([[1, 2]], 4, 1.0, 1.0, {0}, [7])
    assert llm.calls == ["wake_up weights", "load", "wake_up kv_cache", "generate", "sleep 2"]
    assert engine.held is None  # level 2 dropped the weights: the next rollout loads them again


def test_sleep_mode_on_cpu_is_one_line(fake_vllm, tiny_model: Path):
    with pytest.raises(ModelError, match="--rollout-sleep needs a CUDA device"):
        engine_module.Engine(tiny_model, torch.float32, kv_cache_gb=1, max_model_len=1024, seed=0, sleep=True)


def test_the_engine_loads_the_weights_once_per_optimizer_step(fake_vllm, tiny_model: Path, tiny_data: Path,
                                                              tmp_path: Path):
    config = cfg.resolve("sd", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path), batch_size=1,
                         grad_accum=2, max_new_tokens=4, max_steps=2, rollout="vllm")
    run = tr.prepare(config, echo=lambda m: None)
    tr.step(run)
    llm = FakeLLM.made[-1]
    assert llm.loads == 1  # two micro-batches, no optimizer step between them
    tr.step(run)
    assert llm.loads == 2
    run.policy.sample([[1, 2]], 4, 1.0, 1.0, initial=True)  # the initial weights, then the student's again
    run.policy.sample([[1, 2]], 4, 1.0, 1.0)
    assert llm.loads == 4


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_shuts_its_engine_down_when_it_ends_however_it_ends(fake_vllm, tiny_model: Path, tiny_data: Path,
                                                                  tmp_path: Path, monkeypatch, fails):
    # vLLM keeps what it allocated out of the garbage collector's sight until shutdown: a process training several
    # runs (ablate, the demo) would keep every engine
    config = cfg.resolve("sd", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "run"),
                         batch_size=1, max_new_tokens=4, max_steps=2, rollout="vllm")
    step = tr._step_or_save

    def failing(run):
        step(run)
        raise RuntimeError("a plugin failed")

    if fails:
        monkeypatch.setattr(tr, "_step_or_save", failing)
        with pytest.raises(RuntimeError, match="a plugin failed"):
            tr.train(config, echo=lambda m: None)
    else:
        tr.train(config, echo=lambda m: None)
    [llm] = FakeLLM.made
    assert llm.calls.count("shutdown") == 1 and llm.calls[-1] == "shutdown"
