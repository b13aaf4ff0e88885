"""`unisd train --dry-run`: the memory estimate from a model's config alone, checked against counts made by hand."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from unisd import config as cfg
from unisd import engine, memory
from unisd.cli import main

ROOT = Path(__file__).resolve().parents[1]


# the sizes in the models' config.json (no weights: the estimate reads the config only)
SHAPES = {f"Qwen/{p.stem}": json.loads(p.read_text()) for p in (ROOT / "tests" / "fixtures" / "configs").glob("*.json")}
GPU_GB = 80  # the GPUs the docs' commands are sized for (docs/distributed.md)


def _config(model: Path, **kw) -> cfg.TrainConfig:
    return cfg.resolve(kw.pop("preset", ""), tuple(kw.pop("plugins", ())), {}, model=str(model), data="x.jsonl",
                       out="unused", **kw)


def test_counts_match_the_loaded_model_and_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = memory.shape_of(_config(tiny_model, lora=True))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.linear == sum(m.weight.numel() for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert 8 * shape.lora == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_each_part_is_the_closed_form(tiny_model):
    shape = memory.shape_of(_config(tiny_model))
    P = shape.params
    sd = memory.estimate(_config(tiny_model), shape, 1, device="cpu")
    assert (sd["student weights (fp32)"], sd["gradients (fp32)"], sd["AdamW state (fp32)"], sd["frozen teacher"]) == \
        (4 * P, 4 * P, 8 * P, 4 * P)
    fast = memory.estimate(_config(tiny_model, bf16=True), shape, 1, device="cpu")
    assert fast["frozen teacher"] == 2 * shape.linear + 4 * (P - shape.linear)   # bf16 linear layers
    assert fast["bf16 sampling copy"] == 2 * P
    assert memory.estimate(_config(tiny_model), shape, 1)["frozen teacher"] == fast["frozen teacher"]  # CUDA: bf16
    sharded = memory.estimate(_config(tiny_model, fsdp=True), shape, 4)
    assert sharded["AdamW state (fp32)"] == 2 * P and sharded["frozen teacher"] == P   # 1/4 of each per rank
    sft = memory.estimate(_config(tiny_model, preset="sft"), shape, 1)
    assert "frozen teacher" not in sft                           # cross-entropy on gold completions: no teacher
    star = memory.estimate(_config(tiny_model, preset="unisd-star"), shape, 1, device="cpu")
    assert "frozen teacher" not in star and star["EMA teacher"] == 4 * P
    lora = memory.estimate(_config(tiny_model, lora=True, lora_r=8), shape, 1, device="cpu")
    assert lora["AdamW state (fp32)"] == 8 * 8 * shape.lora and "frozen teacher" not in lora  # the adapter off


def test_dry_run_prints_the_estimate_and_the_flag_that_makes_it_fit(qwen_7b_config, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "missing.jsonl", "--out",
                                       str(out), "--dry-run", "--device-memory-gb", "80", "--bf16"])
    assert result.exit_code == 0, result.output
    assert "7.62 B parameters" in result.output
    assert "does not fit in 80 GB per device: add --lora" in result.output
    assert not out.exists()  # nothing loaded, nothing written
    fits = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", str(out),
                                     "--dry-run", "--device-memory-gb", "80", "--bf16", "--lora"])
    assert "fits in 80 GB per device" in fits.output


@pytest.mark.parametrize("args, message", [
    (["--device-memory-gb", "-3"], "error: Invalid value for '--device-memory-gb'"),
    (["--device-memory-gb", "nan"], "error: Invalid value for '--device-memory-gb'"),
    (["--world-size", "0"], "error: Invalid value for '--world-size'"),
])
def test_bad_dry_run_values_are_one_line(qwen_7b_config, args, message):
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", "o",
                                       "--dry-run", *args])
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1


@pytest.mark.parametrize("flag", [["--world-size", "8"], ["--device", "cpu"]])
def test_planning_flags_need_dry_run(qwen_7b_config, flag):
    result = CliRunner().invoke(main, ["train", "--model", str(qwen_7b_config), "--data", "x.jsonl", "--out", "o", *flag])
    assert result.exit_code == 2 and "use them with --dry-run" in result.output


def test_the_dry_run_assumes_the_stated_device_not_the_planning_machines(tiny_model, monkeypatch):
    config = _config(tiny_model, rollout="vllm", rollout_kv_cache_gb=1.0)
    shape = memory.shape_of(config)
    P, kv = shape.params, engine.GiB
    part = "vLLM engine (weights, KV cache, buffers)"
    for planner_has_cuda in (False, True):  # the planning machine's devices change nothing
        monkeypatch.setattr(torch.cuda, "is_available", lambda: planner_has_cuda)
        assert memory.estimate(config, shape, 1, "cuda")[part] == 2 * P + kv + engine.BUFFERS  # bf16 engine
        assert memory.estimate(config, shape, 1, "cpu")[part] == 4 * P + kv + engine.BUFFERS   # fp32 engine
    assert memory.estimate(_config(tiny_model, rollout="vllm", bf16=True), shape, 1, "cpu")[part] == \
        2 * P + 2 * engine.GiB + engine.BUFFERS
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", "x.jsonl", "--out", "o",
                                       "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0 and "per cpu device" in result.output


def test_every_teacher_view_of_the_no_grad_forward_is_counted(tiny_model):
    shape = memory.shape_of(_config(tiny_model))
    B, length, H = 4, 1024 + 256, shape.hidden
    states = "teacher views' hidden states"
    assert memory.estimate(_config(tiny_model, preset="sd"), shape, 1)[states] == 4 * 1 * B * length * H
    # agree adds k contexts (3 by default) and contrast one wrong demonstration, all scored with the teacher's
    star = _config(tiny_model, preset="unisd-star")
    assert memory.estimate(star, shape, 1)[states] == 4 * (1 + 3 + 1) * B * length * H
    more = cfg.resolve("unisd-star", (), {"agree": {"k": 5}}, model=str(tiny_model), data="x.jsonl", out="unused")
    assert memory.estimate(more, shape, 1)[states] == 4 * (1 + 5 + 1) * B * length * H
    assert states not in memory.estimate(_config(tiny_model, preset="sft"), shape, 1)  # no teacher forward
    # the largest layer: one no-grad forward of B rows (the 5 x B view rows run B at a time, train.forward), bf16
    # projections under autocast on CUDA
    one_layer = 2 * B * length * (6 * H + 3 * shape.intermediate)
    kept = 4 * B * length * H * shape.layers
    assert memory.estimate(star, shape, 1)["activations (estimate)"] == kept + one_layer + 3 * 4 * 512 * shape.vocab


def test_autocast_keeps_a_bf16_copy_of_what_trains_unless_sharded(tiny_model):
    shape = memory.shape_of(_config(tiny_model))
    cache = "autocast weight cache (bf16)"
    assert memory.estimate(_config(tiny_model), shape, 1, "cuda")[cache] == 2 * shape.linear
    assert memory.estimate(_config(tiny_model, lora=True, lora_r=8), shape, 1, "cuda")[cache] == 2 * 8 * shape.lora
    assert cache not in memory.estimate(_config(tiny_model), shape, 1, "cpu")           # fp32 on CPU: no autocast
    assert cache not in memory.estimate(_config(tiny_model, fsdp=True), shape, 2, "cuda")  # the cache is off there


def test_the_peak_is_the_step_or_the_setup_transient_whichever_is_larger(tiny_model):
    shape = memory.shape_of(_config(tiny_model))
    parts = memory.estimate(_config(tiny_model, bf16=True), shape, 1, "cuda")
    assert parts[memory.SETUP] == 2 * shape.linear  # the initial model loaded in fp32, then its linears in bf16
    resident = parts["student weights (fp32)"] + parts["frozen teacher"] + parts["bf16 sampling copy"]
    step = sum(parts[k] for k in memory.STEP_ONLY if k in parts)
    assert memory.peak(parts) == resident + max(step, parts[memory.SETUP])
    assert memory.peak({"student weights (fp32)": 10.0, "gradients (fp32)": 1.0, memory.SETUP: 5.0}) == 15.0
    assert memory.peak({"student weights (fp32)": 10.0, "gradients (fp32)": 7.0, memory.SETUP: 5.0}) == 17.0


def _documented_gpu_commands() -> list[tuple[int, list[str]]]:
    """(processes, `unisd train` arguments) of every command in the README's and the docs' sh blocks that trains one
    of SHAPES' models; a command that is itself a --dry-run (the planning example) shows a plan, not a run."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for block in (b for page in pages for b in re.findall(r"```sh\n(.*?)```", page.read_text(), flags=re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if "train" not in words or "--dry-run" in words or "--model" not in words:
                continue
            if words[words.index("--model") + 1] not in SHAPES:
                continue
            processes = 1
            if words[0] == "torchrun":
                processes = int(words[words.index("--nproc_per_node") + 1])
            found.append((processes, words[words.index("train") + 1:]))
    return found


GPU_COMMANDS = _documented_gpu_commands()


def test_the_docs_show_gpu_commands():
    assert len(GPU_COMMANDS) >= 6  # README and training: 1.5B; distributed: DDP, FSDP, vLLM; training: the paper's


@pytest.mark.parametrize("processes, args", GPU_COMMANDS, ids=[f"{n}x " + " ".join(a)[:70] for n, a in GPU_COMMANDS])
def test_every_documented_gpu_command_fits_its_gpus(processes, args, tmp_path):
    model = args[args.index("--model") + 1]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SHAPES[model]))
    args = [str(folder) if a == model else a for a in args]
    result = CliRunner().invoke(main, ["train", *args, "--dry-run", "--device", "cuda", "--device-memory-gb",
                                       str(GPU_GB), "--world-size", str(processes)])
    assert result.exit_code == 0, result.output
    assert f"fits in {GPU_GB} GB per device" in result.output, result.output


def test_kept_activations_are_every_layers_working_set(tiny_model):
    """Without recomputation each layer keeps its working set (6 x hidden + 3 x intermediate per token) instead of
    its fp32 input alone (hidden per token)."""
    shape = memory.shape_of(_config(tiny_model))
    recomputed = memory.estimate(_config(tiny_model), shape, 1, device="cpu")["activations (estimate)"]
    kept = memory.estimate(_config(tiny_model, keep_activations=True), shape, 1, device="cpu")["activations (estimate)"]
    c = _config(tiny_model)
    rows_tokens = c.batch_size * c.num_generations * (c.max_prompt_tokens + c.max_new_tokens)
    per_layer = 4 * rows_tokens * (6 * shape.hidden + 3 * shape.intermediate) - 4 * rows_tokens * shape.hidden
    assert kept - recomputed == shape.layers * per_layer
