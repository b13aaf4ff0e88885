"""What a CUDA run and a sharded run depend on, checked on CPU: the process group's timeout and device, DDP's
gradient buckets, the autocast cache under FSDP, per-device CUDA RNG, and checkpoint files loaded as data only."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from unisd import config as cfg
from unisd import distributed, rng
from unisd.train import _autocast, train


def test_the_process_group_gets_the_timeout_and_on_cuda_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.init(90.0)
    assert calls[-1] == (("gloo",), {"timeout": timedelta(minutes=90), "device_id": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    world = distributed.init(5.0)
    assert calls[-1] == (("nccl",), {"timeout": timedelta(minutes=5), "device_id": torch.device("cuda:1")})
    assert world.device == torch.device("cuda:1")


def test_the_default_timeout_outlasts_nccls_ten_minutes():
    config = cfg.resolve("", (), {}, model="m", data="d", out="o")
    assert config.dist_timeout_min >= 30
    with pytest.raises(cfg.ConfigError, match="--dist-timeout-min must be positive"):
        cfg.resolve("", (), {}, model="m", data="d", out="o", dist_timeout_min=0)


def test_ddp_gradients_are_views_into_its_buckets(monkeypatch):
    made = {}

    def fake_ddp(module, **kwargs):
        made.update(kwargs)
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    distributed.wrap(torch.nn.Linear(2, 2), distributed.World(0, 2, torch.device("cpu")))
    assert made["gradient_as_bucket_view"] is True


def _run(fsdp: bool, bf16: bool = True) -> SimpleNamespace:
    return SimpleNamespace(world=SimpleNamespace(device=torch.device("cpu")),
                           config=SimpleNamespace(bf16=bf16, fsdp=fsdp))


def test_autocast_keeps_no_weight_cache_under_fsdp():
    """The cache would keep a bf16 copy of every gathered layer until the forward ends, undoing the sharding."""
    with _autocast(_run(fsdp=True)):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    with _autocast(_run(fsdp=False)):  # unsharded, the cache saves a cast per reuse of a weight
        assert torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled()


class _FakeCuda:
    """Four visible GPUs, this process on the third: what torch.cuda's RNG functions would see and do."""

    def __init__(self) -> None:
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(4)}
        self.set: list[tuple[int, torch.Tensor]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[device])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set.append((device, state)))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states.values()))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.set.append((-1, states)))


def test_only_this_devices_cuda_generator_is_saved_and_restored(monkeypatch):
    """A resume where fewer GPUs are visible restores the one generator this rank draws from."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    state = rng.rng_state()
    assert torch.equal(state["cuda"], fake.states[2])
    rng.set_rng_state(state)
    assert len(fake.set) == 1 and fake.set[0][0] == 2 and torch.equal(fake.set[0][1], fake.states[2])


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = rng.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and (got[2] == expected[2]).all()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_state_would_run_code_is_refused_in_one_line(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(out), max_steps=1,
                         batch_size=2, max_new_tokens=4, save_every=1)
    train(config, echo=lambda m: None)
    (out / "unisd.json").unlink()  # as if killed after its checkpoint
    folder = out / "checkpoints" / "step-000001"
    marker = tmp_path / "ran"
    torch.save({"step": 1, "payload": _RunsCode(marker)}, folder / "state.pt")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["state.pt"] = hashlib.sha256((folder / "state.pt").read_bytes()).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, "-m", "unisd", "train", "--model", str(tiny_model), "--data", str(tiny_data),
                           "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4",
                           "--save-every", "1", "--resume"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0], done.stderr
    assert not marker.exists()
