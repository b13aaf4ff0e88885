"""Ranks stay in step under torchrun (2 gloo processes): a rank with no counted token still joins the
gradient reduction, metric keys are the union over ranks, and setup work is done once and shared."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.torchrun

# Runs inside each torchrun worker: test plugins are registered by replacing discovery, then a real run.
WORKER = '''
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

import unisd.plugin
from unisd import config as cfg
from unisd.plugin import Plugin, PluginInfo, discover
from unisd.rollout import Rollout

MODEL, DATA, OUT, MODE = sys.argv[1:5]


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


class Uneven(Plugin):
    """Rank 1 trains on completions with no counted token, and each rank logs different metric keys."""

    def completions(self, batch, run):
        ids = run.tokenizer.encode("four", add_special_tokens=False)[:1] * 4
        tokens = torch.tensor([ids] * len(batch.examples))
        mask = torch.full(tokens.shape, float(rank() == 0))
        return Rollout(tokens, mask, torch.zeros(len(batch.examples), dtype=torch.bool))

    def aux_losses(self, out):
        out.metrics["uneven/everywhere"] = 1.0 + 2.0 * rank()   # 1 and 3: mean 2
        if rank() == 1:
            out.metrics["uneven/rank1_only"] = 5.0             # reported by one rank: its value
        return {}


if MODE == "masked":
    found = discover()
    unisd.plugin.discover = lambda: {**found, "uneven": PluginInfo("uneven", "tests", "0", Uneven)}
    config = cfg.resolve("", ("uneven",), {}, model=MODEL, data=DATA, out=OUT, max_steps=2, batch_size=1,
                         max_new_tokens=4, lr=1e-2)
    from unisd.train import train
    train(config, echo=lambda m: print(m, file=sys.stderr))
else:  # contrast's setup: count who generates the negatives
    import unisd_plugins.contrast as contrast
    built = contrast.build_negatives

    def counted(*args, **kwargs):
        Path(OUT, f"built-by-rank{rank()}").write_text("1")
        return built(*args, **kwargs)

    contrast.build_negatives = counted
    config = cfg.resolve("", ("contrast",), {"contrast": {"max_new_tokens": "6", "tries": "1"}}, model=MODEL,
                         data=DATA, out=OUT, max_steps=1, batch_size=1, max_new_tokens=4)
    from unisd import distributed
    from unisd.train import prepare
    run = prepare(config, echo=lambda m: None)
    Path(OUT, f"negatives-rank{run.world.rank}.json").write_text(json.dumps(run.plugins[0].negatives))
    distributed.close(run.world)
'''


def _torchrun(tmp_path: Path, model: Path, data: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "UNISD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(model), str(data), str(out), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank waiting in a collective the other never joins
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the ranks hung:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("masked")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    out = root / "run"
    _torchrun(root, tiny_model, data, out, "masked")
    return out


def test_a_rank_with_every_completion_masked_finishes_the_step(masked_run, tiny_model):
    metrics = [json.loads(x) for x in (masked_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # rank 0's tokens alone count: per rank 4 of them, averaged over the two ranks
    assert [m["completion_tokens"] for m in metrics] == [2.0, 2.0]
    trained, initial = load_file(str(masked_run / "model.safetensors")), load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # rank 0's gradient was applied


def test_metric_keys_are_the_union_over_ranks(masked_run):
    for line in (masked_run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert m["uneven/everywhere"] == 2.0
        assert m["uneven/rank1_only"] == 5.0


def test_contrast_negatives_are_rank_0s_on_every_rank(tmp_path, tiny_model, tiny_data):
    """On a cache miss every rank generates (a sharded student samples on all ranks together), and every rank
    keeps rank 0's negatives, which rank 0 alone stores."""
    out = tmp_path / "run"
    out.mkdir()
    done = _torchrun(tmp_path, tiny_model, tiny_data, out, "negatives")
    assert sorted(p.name for p in out.glob("built-by-rank*")) == ["built-by-rank0", "built-by-rank1"]
    assert len(list((tmp_path / "cache" / "plugins" / "contrast").glob("*.json"))) == 1
    negatives = [json.loads((out / f"negatives-rank{r}.json").read_text()) for r in (0, 1)]
    assert negatives[0] == negatives[1] and len(negatives[0]) == 6
    assert done.stderr.count("warning: contrast:") <= 1  # rank 0 alone speaks
