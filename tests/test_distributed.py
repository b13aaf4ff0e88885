"""torchrun with 2 CPU processes (gloo), data-parallel and sharded (FSDP2): same weights as one process
with the same global batch; a killed run resumes exactly."""
from __future__ import annotations

import json
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
pytestmark = pytest.mark.torchrun
GOLD = ["-o", "mix.source=gold", "-o", "mix.prob=1.0"]
# float summation order differs between one all-reduce and one batched forward, and Adam divides by sqrt(v):
# where a gradient is near 0 that noise grows to ~1% of a step (measured 1.1e-5, against steps of 1.5e-3);
# a wrong shard or scale moves weights by the order of a whole step
TOLERANCE = 5e-5


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


def _logged(folder: Path, keys: tuple[str, ...] = ("loss", "distill", "grad_norm")) -> list[dict[str, float]]:
    """The per-step values that carry the loss scale (clipping and AdamW hide it from the weights)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in keys} for row in rows]


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
        # the global-batch loss and the averaged gradient, not only their direction, equal one process's
        for got, want in zip(_logged(tmp_path / run), _logged(tmp_path / "one"), strict=True):
            assert got == pytest.approx(want, rel=1e-4), run


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


HOLDINGS = """
import json, sys
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from unisd import config as cfg
from unisd.train import prepare

model, data, out = sys.argv[1:4]
c = cfg.resolve("", ("ema",), {}, model=model, data=data, out=out, fsdp=True, batch_size=1, max_steps=1)
run = prepare(c, echo=lambda m: None)
run.policy.initial  # the frozen teacher is loaded (sharded) when a step first scores with it
ema = next(p for p in run.plugins if p.name == "ema")
held = {}
for name, module in {"student": run.policy.model, "teacher": run.policy.initial.model, "ema": ema.average.model}.items():
    held[name] = {k: [p.to_local().numel() if isinstance(p, DTensor) else -1, p.shape[0], p.numel()]
                  for k, p in module.named_parameters()}
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(held, f)
"""


def test_fsdp_holds_half_of_every_model_on_each_of_two_ranks(tiny_model, tiny_data, tmp_path):
    script = tmp_path / "holdings.py"
    script.write_text(HOLDINGS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(tiny_model), str(tiny_data), str(tmp_path / "out")], env=env, check=True, timeout=300,
                   capture_output=True)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    whole = _weights(tiny_model)
    for name in ("student", "teacher", "ema"):
        assert sorted(ranks[0][name]) == sorted(whole), name  # every weight of the model, each once
        for k, (local0, rows, full) in ranks[0][name].items():
            assert full == whole[k].numel()
            half = -(-rows // 2)  # dim 0 is split: rank 0 holds ceil(rows / 2) rows, rank 1 the rest
            assert (local0, ranks[1][name][k][0]) == (half * full // rows, (rows - half) * full // rows), (name, k)


REDUCTIONS = """
import json, sys
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from unisd import config as cfg
from unisd.train import prepare, step

model, data, out, sharded = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "fsdp"
counts = {}
for accum in (1, 3):
    c = cfg.resolve("", ("mix",), {"mix": {"source": "gold", "prob": "1.0"}}, model=model, data=data,
                    out=f"{out}-{accum}", fsdp=sharded, batch_size=1, grad_accum=accum, max_steps=2)
    run = prepare(c, echo=lambda m: None)
    calls = [0]
    if sharded:  # FSDP2 reduce-scatters each unit's gradients in foreach_reduce
        real = _fsdp_param_group.foreach_reduce
        def counting(*a, real=real, **k):
            calls[0] += 1
            return real(*a, **k)
        _fsdp_param_group.foreach_reduce = counting
    else:  # DDP calls its communication hook once per gradient bucket it all-reduces
        def hook(state, bucket):
            calls[0] += 1
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / dist.get_world_size())
        run.policy.student.graded.register_comm_hook(None, hook)
    step(run)
    counts[accum] = calls[0]
    if sharded:
        _fsdp_param_group.foreach_reduce = real
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(counts, f)
"""


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_gradient_accumulation_reduces_once_per_step(tiny_model, tiny_data, tmp_path, sharding):
    """DDP: three micro-batches all-reduce as often as one (no_sync before the last). FSDP: every micro-batch
    reduce-scatters into the gradient shards, so no rank holds whole gradients between micro-batches."""
    script = tmp_path / "reductions.py"
    script.write_text(REDUCTIONS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tiny_model), str(tiny_data), str(tmp_path / "out"), sharding],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert counts["1"] > 0
        assert counts["3"] == (3 if sharding == "fsdp" else 1) * counts["1"], counts


def test_an_objective_that_leaves_the_untied_head_unused_trains_under_ddp(tiny_model_builder, tiny_data, tmp_path):
    """match.mode=repr trains on hidden states alone: an untied head gets no gradient, and DDP must not wait for it."""
    model = tiny_model_builder(tmp_path / "untied", tied=False)
    proc = _train(model, tiny_data, tmp_path / "repr", 1, 2, "--plugins", "match", "-o", "match.mode=repr",
                  "--max-steps", "2")
    try:
        _finish(proc)  # a hang here is the failure: communicate() times out after 300 s
    finally:
        _kill_everything_writing(tmp_path / "repr")
    before, after = _weights(model), _weights(tmp_path / "repr")
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # no gradient reached the head
    assert any(not torch.equal(before[k], after[k]) for k in before if "layers" in k)


LAYOUT = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor
import unisd.train as train
from unisd import config as cfg
from unisd.policy import shard_units

model, data, out = sys.argv[1:4]
c = cfg.resolve("", ("mix", "ema"), {"mix": {"source": "gold", "prob": "1.0"}}, model=model, data=data, out=out,
                fsdp=True, batch_size=1, grad_accum=2, max_steps=1, max_new_tokens=8)
run = train.prepare(c, echo=lambda m: None)
report = {"units": len(shard_units(run.policy.student.root))}

gathers = [0]
real_gather = _fsdp_param_group.foreach_all_gather
def counting(*a, **k):
    gathers[0] += 1
    return real_gather(*a, **k)
_fsdp_param_group.foreach_all_gather = counting
run.policy.sample([[5, 6, 7]], 8, 1.0, 1.0, min_new_tokens=8)
_fsdp_param_group.foreach_all_gather = real_gather
report["sampling_gathers"] = gathers[0]

real_batch, calls = train.make_batch, [0]
def noting(run):  # its second call starts micro-batch 2: what micro-batch 1's backward left behind
    calls[0] += 1
    if calls[0] == 2:
        report["grads"] = {n: [isinstance(p.grad, DTensor), p.grad.to_local().numel() if isinstance(p.grad, DTensor)
                               else -1, p.to_local().numel()] if p.grad is not None else None
                           for n, p in run.policy.trainable()}
    return real_batch(run)
train.make_batch = noting
train.step(run)
ema = next(p for p in run.plugins if p.name == "ema")
report["ema_weights_kept"] = len(ema.state_dict()["weights"])
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def sharded_layout(tmp_path_factory, tiny_model):
    """One 2-rank --fsdp run (gold completions, ema, --grad-accum 2) reporting what each rank held."""
    root = tmp_path_factory.mktemp("layout")
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)})
                                             + "\n" for i in range(4)))
    script = root / "layout.py"
    script.write_text(LAYOUT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tiny_model), str(root / "data.jsonl"), str(root / "out")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((root / f"out.rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp_gradients_stay_sharded_between_micro_batches(sharded_layout):
    """After a micro-batch before the last, each rank holds only its shard of every gradient (reduce-scattered),
    not a whole fp32 gradient of every layer waiting for the last micro-batch."""
    for rank in sharded_layout:
        assert rank["grads"], rank
        for name, layout in rank["grads"].items():
            assert layout is not None, f"{name}: no gradient shard after the first micro-batch"
            is_dtensor, local, shard = layout
            assert is_dtensor and local == shard, (name, layout)


def test_fsdp_sampling_gathers_each_unit_once_per_rollout(sharded_layout):
    """Eight decoded tokens, yet every unit is gathered once, not once per token."""
    for rank in sharded_layout:
        assert 0 < rank["sampling_gathers"] <= rank["units"], rank


def test_ema_state_is_kept_on_rank_0_alone(sharded_layout):
    """Every rank joins the gather; only rank 0, which writes the checkpoint, keeps a whole CPU copy."""
    assert sharded_layout[0]["ema_weights_kept"] > 0
    assert sharded_layout[1]["ema_weights_kept"] == 0


def test_fsdp_with_gradient_accumulation_matches_one_process(tiny_model, tiny_data, tmp_path):
    """Reduce-scattering every micro-batch into the shards sums to the same update as one process's step."""
    extra = ["--plugins", "mix", *GOLD, "--max-steps", "2", "--grad-accum", "2"]
    _finish(_train(tiny_model, tiny_data, tmp_path / "one", 2, 1, *extra))
    _finish(_train(tiny_model, tiny_data, tmp_path / "fsdp", 1, 2, *extra, "--fsdp"))
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "fsdp")
    assert any(not torch.equal(one[k], v) for k, v in _weights(tiny_model).items())
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=TOLERANCE, msg=k)
    for got, want in zip(_logged(tmp_path / "fsdp"), _logged(tmp_path / "one"), strict=True):
        assert got == pytest.approx(want, rel=1e-4)


MIXED = """
import json, sys
import torch
import torch.distributed as dist
from unisd import config as cfg, distributed
from unisd.policy import shard_units
from unisd.train import prepare

model, data, out = sys.argv[1:4]
c = cfg.resolve("", ("ema",), {}, model=model, data=data, out=out, fsdp=True, bf16=True, batch_size=1, max_steps=1)
run = prepare(c, echo=lambda m: None)
ema = next(p for p in run.plugins if p.name == "ema")
report = {}
for name, form in {"student": run.policy.student, "teacher": run.policy.initial, "ema": ema.average}.items():
    units = shard_units(form.root)
    for unit in units:
        unit.unshard()
    report[name] = sorted({str(p.dtype) for p in form.root.parameters()})  # every unit gathered as a forward does
    for unit in units:
        unit.reshard()
with torch.no_grad():
    for _, p in run.policy.trainable():
        p.add_(torch.randn_like(p) * 1e-3)  # fp32 values that bf16 cannot hold
shards = {n: distributed.whole(p.detach()) for n, p in run.policy.trainable()}
given = dict(run.policy.student.weights())
report["weights_dtypes"] = sorted({str(w.dtype) for w in given.values()})
report["weights_exact"] = all(torch.equal(given[n], w) for n, w in shards.items())
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(report, f)
"""


def test_fsdp_bf16_gathers_bf16_and_the_weights_stay_fp32(tiny_model, tiny_data, tmp_path):
    """Under --fsdp with bf16 compute every sharded model gathers bf16 weights for its forwards (FSDP2 mixed
    precision), while what the policy hands on (EMA, checkpoints, the final model) is the exact fp32 weights."""
    script = tmp_path / "mixed.py"
    script.write_text(MIXED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tiny_model), str(tiny_data), str(tmp_path / "out")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        for form in ("student", "teacher", "ema"):
            assert report[form] == ["torch.bfloat16"], (form, report)
        assert report["weights_dtypes"] == ["torch.float32"] and report["weights_exact"], report
