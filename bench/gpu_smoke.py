"""The GPU smoke test: the runs a first CUDA session must see pass, offline, within 5 minutes, written under one folder.

    OUT=DIR bench/gpu_smoke.sh                   # a GPU session's command: no network, nothing pip-installed
    python -m bench gpu_smoke --out DIR [--budget-s 300]

Tiny Llamas built from a config (no download) train UniSD* (all five mechanisms, the EMA teacher updated every
step) for two steps on the bundled demo data: fp32, saved every step and resumed from its first checkpoint (the
resumed weights must equal the uninterrupted run's bit for bit), --bf16, --lora --bf16, and --fsdp in one
torchrun process. With CUDA, one model of Qwen2.5-7B's shape (random weights, made on the GPU) takes a UniSD*
--lora --bf16 step with 1024-token completions: its step time and phases, its peak GPU memory beside
--dry-run's estimate, and each phase as a fraction of the GPU's bound (`bench roofline`'s: bf16 matmul peak at the
step's shapes, memory bandwidth for decoding). With two GPUs also DDP and --fsdp across both; where vLLM imports,
two tiny runs with --rollout vllm. Each case runs under its own timeout, all of them inside --budget-s.

DIR receives summary.txt (one PASS/FAIL line per case with its figures), gpu-smoke.json (the same, with
provenance) and log.txt (the end of each failed case's output); models and runs go to DIR/scratch, removed
at the end.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import provenance

ROOT = Path(__file__).resolve().parent.parent
SEVEN_B_SHARE_S = 200  # of --budget-s, kept for the 7B-shape case (build, estimate, load, one step) where there is CUDA
# UniSD*, its EMA teacher updated every step (so the update and its state are exercised), contrast's negatives
# sampled once and as long as the completions (its default, 1024 tokens twice, is for real models)
UNISD_STAR = ("--preset", "unisd-star", "-o", "ema.every=1", "-o", "contrast.tries=1")
TINY_NEW_TOKENS = 16
TINY_STEPS = 2  # a checkpoint after each: the resume continues from the first
TINY = (*UNISD_STAR, "-o", f"contrast.max_new_tokens={TINY_NEW_TOKENS}")
PHASES = ("step_time_s", "rollout_s", "forward_s", "backward_s", "optimizer_s", "after_step_s")
# Qwen2.5-7B's config.json (the Hub's Qwen/Qwen2.5-7B), its shape only
QWEN_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# runs `unisd train` and, at exit (an out-of-memory error included), writes its peak CUDA memory to $UNISD_SMOKE_PEAK;
# with $UNISD_SMOKE_ROOFLINE, also its phases as fractions of this device's bounds (bench/roofline.py), measured
# after the peak is read (registered first, so it runs last: its matmuls must not count in the run's memory)
PEAK = """import atexit, json, os, sys, torch
if os.environ.get("UNISD_SMOKE_ROOFLINE"):
    from pathlib import Path
    from bench import roofline
    probes = roofline.Probes().__enter__()
    def fractions():
        args = sys.argv[1:]
        try:
            found = roofline.smoke_report(args, probes, Path(args[args.index("--out") + 1]) / "metrics.jsonl")
        except Exception as e:
            found = {"error": f"{type(e).__name__}: {e}"}
        open(os.environ["UNISD_SMOKE_ROOFLINE"], "w").write(json.dumps(found))
    atexit.register(fractions)
def peak():
    if torch.cuda.is_initialized():
        found = {"allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                 "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
        open(os.environ["UNISD_SMOKE_PEAK"], "w").write(json.dumps(found))
atexit.register(peak)
sys.argv[0] = "unisd"
from unisd.cli import main
main()
"""


@dataclass(frozen=True)
class Case:
    """One training run: its flags, how many processes (0: no torchrun), and whether a resume must match it."""

    name: str
    flags: tuple[str, ...]
    processes: int = 0
    resume: bool = False

    @property
    def launches(self) -> int:
        return 2 if self.resume else 1


@dataclass
class Outcome:
    name: str
    passed: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    problem: str = ""
    log: str = ""


def tiny_cases(gpus: int, vllm: bool) -> list[Case]:
    """The tiny-model cases this machine can run (vLLM's only on CUDA: the CPU engine's start alone takes minutes)."""
    found = [Case("fp32", TINY, resume=True), Case("bf16", (*TINY, "--bf16")),
             Case("lora-bf16", (*TINY, "--lora", "--bf16")), Case("fsdp-1proc", (*TINY, "--fsdp"), 1)]
    if gpus >= 2:
        found += [Case("ddp-2gpu", TINY, 2), Case("fsdp-2gpu", (*TINY, "--fsdp", "--lora", "--bf16"), 2)]
    if gpus and vllm:
        found += [Case("vllm", (*TINY, "--rollout", "vllm")),
                  Case("lora-bf16-vllm", (*TINY, "--lora", "--bf16", "--rollout", "vllm"))]
    return found


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama of width 64 with a 300-token BPE tokenizer and a ChatML template, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = ["What is two plus two? The answer is 4.", "Ann has 3 apples and buys 5 more, so 8 apples.",
             "Reasoning: add the numbers, then give the answer. The answer is 12."] * 4
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qwen_7b_shape(folder: Path, tokenizer_from: Path, weights: bool) -> Path:
    """Qwen2.5-7B's architecture with the tiny tokenizer; with `weights`, random bf16 weights initialised on the GPU
    (a CPU init of 7.6 B parameters would take minutes). Without them the folder is enough for --dry-run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = Qwen2Config(**QWEN_7B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    if weights:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
    else:
        config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def source_tree_site(scratch: Path) -> Path | None:
    """Where unisd is not installed, a folder that makes this source tree importable with its plugins' entry points
    (what `pip install -e .` would register, without pip, a build backend or a network); None where it is."""
    try:
        metadata.distribution("unisd")
        return None
    except metadata.PackageNotFoundError:
        pass
    site = scratch / "site"
    info = site / "unisd-0.0.0+source.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unisd\nVersion: 0.0.0+source\n")
    table = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."unisd.plugins"]\n', 1)[1]
    entries = [line.replace('"', "") for line in table.split("\n[", 1)[0].splitlines() if "=" in line]
    (info / "entry_points.txt").write_text("[unisd.plugins]\n" + "\n".join(entries) + "\n")
    (site / "unisd_plugins").symlink_to(ROOT / "plugins")
    (site / "unisd_tasks").symlink_to(ROOT / "lm_eval_tasks")
    return site


def launch(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[int | None, str]:
    """Run a command from the repository root; (exit status or None on timeout, the end of its output).

    The command gets a process group of its own, so a timeout also ends torchrun's workers (which hold the GPU)."""
    with subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as child:
        try:
            output, _ = child.communicate(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            return None, output[-3000:]
    return child.returncode, output[-3000:]


def train_args(model: Path, out: Path, flags: tuple[str, ...], processes: int, steps: int, batch: int,
               new_tokens: int, entry: tuple[str, ...] = ("-m", "unisd")) -> list[str]:
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}") if processes else ()
    return [sys.executable, *launcher, *entry, "train", "--model", str(model), "--data", "demo", "--out", str(out),
            "--max-steps", str(steps), "--batch-size", str(batch), "--max-new-tokens", str(new_tokens),
            "--save-every", "1", "--lr", "1e-3", *flags]


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trained(run: Path, steps: int) -> str:
    """What is wrong with a finished run (empty: nothing): every step logged with a finite loss, the model written."""
    rows = metrics(run)
    if len(rows) != steps:
        return f"{len(rows)} of {steps} steps logged"
    if not all(math.isfinite(r["loss"]) for r in rows):
        return "a loss is not finite"
    return "" if (run / "unisd.json").exists() and (run / "model.safetensors").exists() else "no final model written"


def cut_back(run: Path, copy: Path) -> None:
    """`copy`: the run as it stood after its first checkpoint (the later ones and the final model removed)."""
    shutil.copytree(run, copy)
    for later in sorted((copy / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    for name in ("unisd.json", "model.safetensors", "README.md"):
        (copy / name).unlink(missing_ok=True)


def largest_difference(a: Path, b: Path) -> float:
    """max |a - b| over every weight of two final models (0.0: bit for bit the same, as a resume must give)."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if sorted(first) != sorted(second):
        return math.inf
    return max((0.0 if torch.equal(first[k], second[k]) else float((first[k].double() - second[k].double()).abs().max())
                for k in first), default=0.0)


def run_tiny(case: Case, model: Path, scratch: Path, env: dict[str, str], timeout_s: float) -> Outcome:
    """Train one case; with `resume`, also a copy cut back to its first checkpoint, continued with --resume."""
    found = Outcome(case.name)
    out = scratch / case.name
    started = time.monotonic()
    steps = TINY_STEPS
    status, log = launch(train_args(model, out, case.flags, case.processes, steps, 2, TINY_NEW_TOKENS), env, timeout_s)
    found.log = log
    if status is None:
        found.problem = f"timed out after {timeout_s:.0f} s"
        return found
    found.problem = f"exit status {status}" if status else trained(out, steps)
    rows = metrics(out)
    if rows:
        found.figures = {k: round(rows[-1][k], 4) for k in PHASES if k in rows[-1]}
    if case.resume and not found.problem:
        copy = scratch / f"{case.name}-resumed"
        cut_back(out, copy)
        left = timeout_s - (time.monotonic() - started)
        status, found.log = launch(train_args(model, copy, (*case.flags, "--resume"), case.processes, steps, 2,
                                              TINY_NEW_TOKENS), env, left)
        if status is None:
            found.problem = "the resumed run timed out"
        elif status:
            found.problem = f"the resumed run: exit status {status}"
        else:
            difference = largest_difference(out, copy)
            found.figures["resume_max_abs_difference"] = difference
            found.problem = "" if difference == 0.0 else f"the resumed weights differ (max |Δ| {difference:.3g})"
    found.passed = not found.problem
    return found


def dry_run_total_gb(args: list[str], env: dict[str, str], timeout_s: float) -> float | None:
    """The `total ... GB` line of `unisd train --dry-run`'s estimate."""
    status, log = launch([*args, "--dry-run"], env, timeout_s)
    match = re.search(r"^\s*total\s+([\d.]+) GB", log, re.MULTILINE)
    return float(match.group(1)) if status == 0 and match else None


def roofline_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The fractions of the bounds `bench.roofline.smoke_report` wrote, as figures: each phase's, the backward's of
    its own kernels' peaks, the bf16 matmul peaks (TFLOP/s, the forward's and the backward's products) and the
    memory bandwidth (GB/s) they are fractions of."""
    if "error" in report:
        return {"roofline_error": report["error"]}
    bounds, backward = report["bounds"], report["phases"]["backward"]
    return {**{f"{phase}_of_bound": round(v, 3) for phase, v in report["fractions"].items()},
            "backward_of_its_kernels": round(backward["kernel_fraction"], 3),
            "matmul_peak_tflops": round(bounds["matmul"]["bf16"]["peak_flops_per_s"] / 1e12, 1),
            "backward_peak_tflops": round(bounds["matmul"]["bf16"]["backward_peak_flops_per_s"] / 1e12, 1),
            "bandwidth_gb_s": round(bounds["bandwidth"]["bytes_per_s"] / 1e9)}


def run_7b(tiny: Path, scratch: Path, env: dict[str, str], device_gb: float, deadline: float) -> Outcome:
    """One UniSD* --lora --bf16 step of the 7B shape, batch 4, 1024 new tokens: phases, peak memory, the estimate."""
    found = Outcome("qwen7b-shape-unisd-star-lora-bf16")
    folder, out, peak = scratch / "qwen-7b-shape", scratch / "qwen-7b-run", scratch / "peak.json"
    roofline = scratch / "roofline.json"
    flags = (*UNISD_STAR, "--lora", "--bf16")
    qwen_7b_shape(folder, tiny, weights=False)
    found.figures["dry_run_total_gb"] = dry_run_total_gb(
        [*train_args(folder, out, flags, 0, 1, 4, 1024), "--device-memory-gb", f"{device_gb:.0f}"], env, 60)
    build = (f"from pathlib import Path; from bench.gpu_smoke import qwen_7b_shape; "
             f"qwen_7b_shape(Path({str(folder)!r}), Path({str(tiny)!r}), weights=True)")
    status, found.log = launch([sys.executable, "-c", build], env, min(120, deadline - time.monotonic()))
    if status != 0:
        found.problem = "building the model " + ("timed out" if status is None else f"failed (exit status {status})")
        return found
    left = deadline - time.monotonic()
    status, found.log = launch(train_args(folder, out, flags, 0, 1, 4, 1024, entry=("-c", PEAK)),
                               {**env, "UNISD_SMOKE_PEAK": str(peak), "UNISD_SMOKE_ROOFLINE": str(roofline)}, left)
    if peak.exists():
        found.figures |= {f"peak_{k}": round(v, 2) for k, v in json.loads(peak.read_text()).items()}
    if roofline.exists():
        found.figures |= roofline_figures(json.loads(roofline.read_text()))
    rows = metrics(out)
    if rows:
        found.figures |= {k: round(rows[0][k], 3) for k in (*PHASES, "completion_length") if k in rows[0]}
    found.problem = (f"timed out after {left:.0f} s" if status is None else f"exit status {status}" if status
                     else trained(out, 1))
    found.passed = not found.problem
    return found


DEVICES = """import json, torch
n = torch.cuda.device_count()
p = torch.cuda.get_device_properties(0) if n else None
try:
    import vllm  # noqa: F401
    engine = True
except Exception:
    engine = False
print(json.dumps({"gpus": n, "name": p.name if p else None, "memory_gb": p.total_memory / 1e9 if p else 0,
                  "vllm": engine}))
"""


def devices(env: dict[str, str]) -> dict[str, Any]:
    """The CUDA devices and whether vLLM imports, asked in a child process, so that this one holds no CUDA context
    (nor vLLM's imports) while the cases run."""
    status, log = launch([sys.executable, "-c", DEVICES], env, 120)
    no_device = {"gpus": 0, "name": None, "memory_gb": 0, "vllm": False}
    return json.loads(log.strip().splitlines()[-1]) if status == 0 else no_device


def line(outcome: Outcome) -> str:
    figures = ", ".join(f"{k} {v}" for k, v in outcome.figures.items())
    return " ".join(x for x in ("PASS" if outcome.passed else "FAIL", outcome.name, figures,
                                f"({outcome.problem})" if outcome.problem else "") if x)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder every file goes to (created)")
    parser.add_argument("--budget-s", type=float, default=300, help="all cases together stop within this many seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    scratch = args.out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        site = source_tree_site(scratch)
        paths = [str(ROOT), *([str(site)] if site else []), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "HF_HOME": str(scratch / "hf"), "MPLCONFIGDIR": str(scratch / "mpl"),
               "UNISD_CACHE": str(scratch / "cache"), "TMPDIR": str(scratch)}  # nothing written outside --out
        device = devices(env)
        tiny = tiny_model(scratch / "tiny")
        outcomes: list[Outcome] = []
        cases = tiny_cases(device["gpus"], device["vllm"])
        for i, case in enumerate(cases):  # each case's timeout: its share of what is left, by launches
            left = deadline - time.monotonic() - (SEVEN_B_SHARE_S if device["gpus"] else 0)
            share = left * case.launches / sum(c.launches for c in cases[i:])
            outcome = (run_tiny(case, tiny, scratch, env, share) if share > 5
                       else Outcome(case.name, problem="not run: the budget was spent"))
            outcomes.append(outcome)
            print(line(outcome), flush=True)
        if device["gpus"]:
            outcomes.append(run_7b(tiny, scratch, env, device["memory_gb"], deadline))
            print(line(outcomes[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    where = f"{device['gpus']} x {device['name']} ({device['memory_gb']:.0f} GB)" if device["gpus"] else "CPU only"
    (args.out / "summary.txt").write_text(f"gpu_smoke on {where}\n" + "".join(line(o) + "\n" for o in outcomes))
    failed = "".join(f"== {o.name}: {o.problem}\n{o.log}\n" for o in outcomes if not o.passed)
    (args.out / "log.txt").write_text(failed or "every case passed\n")
    result = {"description": f"The GPU smoke test on {where}: tiny UniSD* runs (fp32 resumed exactly, --bf16, "
                             f"--lora --bf16, --fsdp) and, with CUDA, a 7B-shape UniSD* --lora --bf16 step.",
              "device": device, "cases": [{"name": o.name, "passed": o.passed, "problem": o.problem, **o.figures}
                                          for o in outcomes]}
    provenance.write(args.out / "gpu-smoke.json", result, ["gpu_smoke", *argv])
    return 0 if all(o.passed for o in outcomes) else 1
