"""Atomic checkpoints, exact resume, and the final model folder.

A checkpoint is a folder DIR/checkpoints/step-NNNNNN written under a temporary name and renamed into
place; MANIFEST.json (written last) lists a sha256 per file, so a half-written or corrupted
checkpoint is detected and skipped on --resume. It holds everything an uninterrupted run would still
have in memory: trainable weights, optimizer, scheduler, every RNG, data position, plugin states.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

import unisd
from unisd import models

if TYPE_CHECKING:
    from unisd.train import Run

MANIFEST = "MANIFEST.json"
WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # sharded or not, one file format
RUN_MARKERS = ("unisd.json", "checkpoints", "metrics.jsonl")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message says which flag fixes it."""


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, to clobber a run or a folder that is not ours."""
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = any((out / m).exists() for m in RUN_MARKERS)
    if not ours:
        raise OutputDirError(f"{out} is a non-empty folder that holds no unisd run; choose another --out")
    if overwrite:
        return
    if (out / "unisd.json").exists():
        raise OutputDirError(f"{out} holds a finished run; pass --overwrite to replace it")
    if not resume:
        raise OutputDirError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to restart")


def clear(out: Path) -> None:
    """Remove a previous run's files (only called after check_out_dir accepted --overwrite)."""
    if out.is_dir():
        shutil.rmtree(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run: Run) -> Path:
    """Write a complete checkpoint for run.step, then prune to the newest keep_checkpoints."""
    from unisd import distributed

    # collectives first, on every rank: RNGs, and whole tensors of anything sharded
    rngs = distributed.gather(rng_state(), run.world)  # every rank's generators, for an exact resume
    trainable = distributed.gathered(((n, p) for n, p in run.student.named_parameters() if p.requires_grad),
                                     run.world)
    assert run.optimizer is not None
    optimizer = get_optimizer_state_dict(run.student, run.optimizer, options=WHOLE_ON_RANK0)
    plugins = {p.name: p.state_dict() for p in run.plugins}
    root = run.out / "checkpoints"
    final = root / f"step-{run.step:06d}"
    if not run.world.main:
        distributed.barrier(run.world)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{run.step:06d}-"))
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save({"step": run.step, "position": run.position, "bad_steps": run.bad_steps,
                "scheduler": run.scheduler.state_dict(), "rng": rngs, "plugins": plugins}, tmp / "state.pt")
    files = sorted(f.name for f in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps({f: _sha256(tmp / f) for f in files}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob("step-*"))[:-run.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(run.world)
    return final


def verify(folder: Path) -> str:
    """'' if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (it was not finished)"
    try:
        listed = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "unreadable manifest"
    for name, digest in listed.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _sha256(folder / name) != digest:
            return f"{name} does not match its checksum"
    return ""


def restore(run: Run, echo: Callable[[str], None]) -> bool:
    """Load the newest intact checkpoint into run; False if there is none."""
    from unisd import distributed

    root = run.out / "checkpoints"
    if run.world.main:
        for leftover in root.glob(".tmp-step-*"):  # a save interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)
    for folder in sorted(root.glob("step-*"), reverse=True):
        problem = verify(folder)
        if problem:
            echo(f"warning: skipping checkpoint {folder.name}: {problem}")
            continue
        trainable = load_file(str(folder / "trainable.safetensors"), device=str(run.world.device))
        params = dict(run.student.named_parameters())
        for name, value in trainable.items():
            distributed.assign(params[name], value)
        assert run.optimizer is not None
        set_optimizer_state_dict(run.student, run.optimizer, torch.load(folder / "optimizer.pt", weights_only=False),
                                 options=StateDictOptions(full_state_dict=True))
        state = torch.load(folder / "state.pt", weights_only=False)
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, run.position, run.bad_steps = state["step"], state["position"], state["bad_steps"]
        for p in run.plugins:
            if p.name in state["plugins"]:
                p.load_state_dict(state["plugins"][p.name])
        rngs = state["rng"]
        if len(rngs) != run.world.size:
            raise OutputDirError(f"{folder} was written by {len(rngs)} processes; resume with as many")
        set_rng_state(rngs[run.world.rank])
        return True
    echo("no intact checkpoint found; starting from the beginning")
    return False


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step`: after a resume those steps are run again."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def data_fingerprint(run: Run) -> str:
    h = hashlib.sha256()
    for e in run.examples:
        h.update(json.dumps([e.prompt, e.answer, e.rationale], ensure_ascii=False).encode())
    return h.hexdigest()


def model_card(run: Run) -> str:
    c = run.config
    plugins = ", ".join(c.plugins) or "none (plain self-distillation)"
    return (f"# {run.out.name}\n\nSelf-distilled with [unisd](https://github.com/unisd/unisd) {unisd.__version__}.\n\n"
            f"- base model: `{c.model}`\n- data: `{c.data}` ({len(run.kept)} examples)\n- plugins: {plugins}\n"
            f"- preset: {c.preset or 'none'}\n- steps: {run.step} (batch {c.batch_size} x grad-accum {c.grad_accum})\n"
            f"- divergence: {c.divergence} at temperature {c.loss_temperature}\n\n"
            f"The full resolved configuration is in `unisd.json`; per-step metrics in `metrics.jsonl`.\n\n"
            f"Evaluate with\n\n```\nlm_eval --model hf --model_args pretrained={run.out} "
            f"--include_path \"$(unisd tasks-path)\" --tasks unisd --apply_chat_template --confirm_run_unsafe_code\n```\n")


def save_final(run: Run) -> None:
    """Write the final model into run.out itself; unisd.json goes last and marks the run finished.

    Every rank calls it: a sharded student's whole weights are gathered to rank 0, which writes.
    """
    from unisd import distributed
    from unisd.plugin import discover

    sharded = distributed.is_sharded(run.student_hidden)
    weights = distributed.gathered(run.student.named_parameters(), run.world) if sharded else None
    if not run.world.main:
        return

    staging = Path(tempfile.mkdtemp(dir=run.out, prefix=".final-"))
    found = discover()
    record = {"unisd_version": unisd.__version__, "config": run.config.to_json(), "steps": run.step,
              "examples": len(run.kept), "data_fingerprint": data_fingerprint(run),
              "plugins": {p.name: {"distribution": found[p.name].distribution if p.name in found else "?",
                                   "version": found[p.name].version if p.name in found else "?",
                                   "options": {k: v for k, v in vars(p.config).items()}} for p in run.plugins},
              "torch": torch.__version__}
    models.save_final(run.student, run.tokenizer, staging, model_card(run), record, weights)
    names = sorted(f.name for f in staging.iterdir())
    for name in [n for n in names if n != "unisd.json"] + ["unisd.json"]:
        os.replace(staging / name, run.out / name)
    staging.rmdir()
