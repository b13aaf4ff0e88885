"""torchrun with 2 CPU processes (gloo), data-parallel and sharded (FSDP2): same weights as one process
with the same global batch; a killed run resumes exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Rollouts are random, and two ranks draw different samples than one process would, so the equality
# runs train on the gold demonstrations (`mix`, prob 1): identical tokens, the divergence to the
# demonstration-conditioned teacher as the loss, and everything else (sharding, DDP averaging,
# EMA, checkpoints) exactly as in a sampled run.
GOLD = ["-o", "mix.source=gold", "-o", "mix.prob=1.0"]
TOLERANCE = 1e-5  # float summation order differs between one all-reduce and one batched forward


def _train(model: Path, data: Path, out: Path, batch: int, procs: int, *extra: str) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    args = launcher + ["-m", "unisd", "train", "--model", str(model), "--data", str(data), "--out", str(out),
                       "--batch-size", str(batch), "--max-new-tokens", "8", "--lr", "1e-3", "--save-every", "1",
                       *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill_everything_writing(out: Path) -> None:
    """SIGKILL every process whose command line names `out` (torchrun starts its workers in new sessions)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmdline and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("plugins", ["mix", "mix,ema,agree"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_model, tiny_data, tmp_path, plugins):
    extra = ["--plugins", plugins, *GOLD, "--max-steps", "2"]
    if "ema" in plugins:  # a fast-moving EMA and strong, globally normalised agreement weights
        extra += ["-o", "ema.beta=0.5", "-o", "ema.every=1", "-o", "agree.gamma=5", "-o", "agree.contexts=random"]
    _finish(_train(tiny_model, tiny_data, tmp_path / "one", 2, 1, *extra))
    _finish(_train(tiny_model, tiny_data, tmp_path / "ddp", 1, 2, *extra))
    _finish(_train(tiny_model, tiny_data, tmp_path / "fsdp", 1, 2, *extra, "--fsdp"))
    one, initial = _weights(tmp_path / "one"), _weights(tiny_model)
    assert any(not torch.equal(one[k], initial[k]) for k in one)  # training moved the weights
    for run in ("ddp", "fsdp"):
        two = _weights(tmp_path / run)
        assert sorted(two) == sorted(one)
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=TOLERANCE, msg=f"{run}: {k}")
        assert len((tmp_path / run / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_killed_two_process_run_resumes(tiny_model, tiny_data, tmp_path, sharding):
    # the sharded run samples on-policy: ranks whose completions end at different lengths decode together
    extra = ["--max-steps", "4", *sharding, *(["--max-new-tokens", "12"] if sharding else ["--plugins", "mix", *GOLD])]
    _finish(_train(tiny_model, tiny_data, tmp_path / "ref", 1, 2, *extra))
    out = tmp_path / "killed"
    proc = _train(tiny_model, tiny_data, out, 1, 2, *extra)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    _kill_everything_writing(out)
    proc.wait()
    assert not (out / "unisd.json").exists()
    err = _finish(_train(tiny_model, tiny_data, out, 1, 2, *extra, "--resume"))
    assert "resumed at step" in err
    ref, got = _weights(tmp_path / "ref"), _weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
