"""What only a CUDA device shows (marker gpu, `tox -e gpu`; skipped with a reason elsewhere, so the tier always
collects): bf16 copies of the frozen models, the output head's matmul in bf16 with its log-softmax in fp32, FSDP2
gathering bf16 weights, the per-device RNG, and a resume on CUDA that continues to the same weights bit for bit.
Written against the CLI and `train.prepare`/`train.step`, which other changes keep, rather than internals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from unisd import config as cfg
from unisd import train as tr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
MATMULS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__}
LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}


class VocabularyOps(TorchFunctionMode):
    """Records the dtype of every matmul and log-softmax whose result spans the vocabulary (the output head)."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.matmuls: set[torch.dtype] = set()
        self.log_softmaxes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dim() and result.shape[-1] == self.vocabulary:
            if func in MATMULS:
                self.matmuls.add(result.dtype)
            elif func in LOG_SOFTMAX:
                self.log_softmaxes.add(result.dtype)
        return result


def _config(tiny_model: Path, tiny_data: Path, out: Path, preset: str = "sd", **settings):
    return cfg.resolve(preset, (), {}, model=str(tiny_model), data=str(tiny_data), out=str(out),
                       **{"max_steps": 2, "batch_size": 2, "max_new_tokens": 8, "lr": 1e-3, **settings})


def _train(model: Path, data: Path, out: Path, *flags: str, processes: int = 0) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    args = [sys.executable, *launcher, "-m", "unisd", "train", "--model", str(model), "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--max-steps", "3", "--max-new-tokens", "8", "--lr", "1e-2",
            "--save-every", "1", *flags]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_frozen_teacher_scores_with_bf16_weights_on_cuda_without_the_flag(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "run"), echo=lambda m: None)
    scorer = run.policy.for_scoring(run.policy.initial)
    head = scorer.model.get_output_embeddings()  # bf16 or not: the head test below checks how it multiplies
    dtypes = {m.weight.dtype for m in scorer.model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    assert dtypes == {torch.bfloat16}


def test_the_output_head_multiplies_in_bf16_and_normalises_in_fp32(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "run", bf16=True), echo=lambda m: None)
    vocabulary = run.policy.model.get_output_embeddings().weight.shape[0]
    with VocabularyOps(vocabulary) as seen:
        metrics = tr.step(run)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert seen.matmuls == {torch.bfloat16}, "the head's matmul under bf16 compute"
    assert seen.log_softmaxes == {torch.float32}, "log-probs stay fp32"


FSDP_DTYPES = """
import json, sys, torch
from torch.distributed.fsdp import FSDPModule
from unisd import config as cfg, train as tr
config = cfg.resolve("sd", (), {}, model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], max_steps=1, batch_size=2,
                     max_new_tokens=8, fsdp=True, bf16=True)
run = tr.prepare(config, echo=lambda m: None)
seen = set()
layers = [m for m in run.policy.model.modules() if isinstance(m, FSDPModule)]  # the decoder layers
for layer in layers:  # FSDP's own pre-forward hook runs first: the unit's weights are gathered by then
    layer.register_forward_pre_hook(lambda m, a: seen.update(str(p.dtype) for p in m.parameters(recurse=True)))
tr.step(run)
print(json.dumps({"gathered": sorted(seen), "layers": len(layers)}))
"""


def test_fsdp_gathers_the_students_weights_in_bf16(tiny_model, tiny_data, tmp_path):
    script = tmp_path / "fsdp_dtypes.py"
    script.write_text(textwrap.dedent(FSDP_DTYPES))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script),
            str(tiny_model), str(tiny_data), str(tmp_path / "run")]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["layers"] and found["gathered"] == ["torch.bfloat16"]


RNG_SAVE = """import torch; from unisd import rng
torch.cuda.manual_seed_all(1234)
torch.save(rng.rng_state(), {path!r})
print(torch.rand(4, device="cuda").tolist())"""
RNG_RESTORE = """import torch; from unisd import rng
rng.set_rng_state(torch.load({path!r}, weights_only=False))
print(torch.rand(4, device="cuda").tolist())"""


def test_the_cuda_rng_round_trips_on_this_device():
    from unisd import rng

    state = rng.rng_state()
    first = torch.rand(4, device="cuda")
    rng.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_rng_state_saved_with_two_gpus_visible_restores_where_one_is(tmp_path):
    path = str(tmp_path / "rng.pt")
    saved = subprocess.run([sys.executable, "-c", RNG_SAVE.format(path=path)], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr[-2000:]
    restored = subprocess.run([sys.executable, "-c", RNG_RESTORE.format(path=path)],
                              env={**ENV, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert restored.stdout == saved.stdout  # device 0 draws on from where the saved run left it


@pytest.mark.parametrize("flags", [("--preset", "unisd-star", "-o", "ema.every=1", "-o", "contrast.max_new_tokens=8"),
                                   ("--lora", "--bf16", "--plugins", "ema", "-o", "ema.every=1")],
                         ids=["unisd-star-fp32", "lora-bf16-ema"])
def test_a_resume_on_cuda_continues_to_the_same_weights(tiny_model, tiny_data, tmp_path, cut_back, flags):
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    _train(tiny_model, tiny_data, run, *flags)
    cut_back(run, resumed)
    _train(tiny_model, tiny_data, resumed, *flags, "--resume")
    trained, again = load_file(str(run / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert sorted(trained) == sorted(again)
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_the_engines_memory_share_is_what_this_device_has_free():
    """The rule the engine starts with, on the real device: free/total less the margin, and one error line when
    the engine cannot fit in what is free (a request larger than the whole card)."""
    from unisd import engine
    from unisd.models import ModelError

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    share = engine.memory_fraction(free, total, weights=2**30, kv=2**30)
    assert 0 < share < free / total
    with pytest.raises(ModelError, match="--rollout-kv-cache-gb"):
        engine.memory_fraction(free, total, weights=total, kv=2**30)
