"""Atomic checkpoints, exact resume, and the final model folder.

A checkpoint is a folder DIR/checkpoints/step-NNNNNN written under a temporary name and renamed into
place; MANIFEST.json (written last) lists a sha256 per file, so a half-written or corrupted
checkpoint is detected and skipped on --resume. It holds everything an uninterrupted run would still
have in memory: trainable weights, optimizer, scheduler, every RNG, data position, plugin states,
and the run's `identity`, which --resume compares with the run asking to continue it.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

import unisd
from unisd import card, models
from unisd.rng import rng_state, set_rng_state
from unisd.run import Run, data_order

MANIFEST = "MANIFEST.json"
WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # sharded or not, one file format
RUN_MARKERS = ("unisd.json", "checkpoints", "metrics.jsonl")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message says which flag fixes it."""


def check_out_dir(out: Path, resume: bool, overwrite: bool, extend: bool = False) -> None:
    """Refuse, before anything is loaded or written, to clobber a run or a folder that is not ours.

    A finished run continues only with --resume --extend: its last checkpoint is kept for exactly that."""
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a folder; choose another --out")
    _check_writable(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = any((out / m).exists() for m in RUN_MARKERS)
    if not ours:
        raise OutputDirError(f"{out} is a non-empty folder that holds no unisd run; choose another --out")
    if overwrite:
        return
    if (out / "unisd.json").exists() and not (resume and extend):
        raise OutputDirError(f"{out} holds a finished run; pass --overwrite to replace it, or --resume --extend "
                             "with a larger --max-steps to train it further")
    if not resume:
        raise OutputDirError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to restart")


def _check_writable(out: Path) -> None:
    """The folder, or its nearest existing parent, must be a folder this process may write into."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"cannot create {out}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write into {existing}: permission denied; choose another --out")


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


def save(run: Run) -> Path:
    """Write a complete checkpoint for run.step, then prune to the newest keep_checkpoints."""
    from unisd import distributed

    # collectives first, on every rank: RNGs, and whole tensors of anything sharded
    rngs = distributed.gather(rng_state(), run.world)  # every rank's generators, for an exact resume
    trainable = distributed.gathered(run.policy.trainable(), run.world)
    assert run.optimizer is not None
    optimizer = get_optimizer_state_dict(run.policy.model, run.optimizer, options=WHOLE_ON_RANK0)
    plugins = run.hooks.state_dict()
    root = run.out / "checkpoints"
    final = root / f"step-{run.step:06d}"
    if not run.world.main:
        distributed.barrier(run.world)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{run.step:06d}-"))
    try:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save({"step": run.step, "position": run.position, "bad_steps": run.bad_steps,
                    "scheduler": run.scheduler.state_dict(), "rng": rngs, "plugins": plugins,
                    "identity": identity(run), "truncation": run.truncation.state_dict() if run.truncation else {},
                    "best": run.best},
                   tmp / "state.pt")
        files = sorted(f.name for f in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({f: _sha256(tmp / f) for f in files}, indent=1))
    except BaseException as e:  # e.g. the disk filled up: leave no half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise OutputDirError(f"cannot write checkpoint {final}: the disk is full; {_kept(root)}") from None
        raise
    if final.exists():
        _discard(final)
    os.rename(tmp, final)
    for old in sorted(root.glob("step-*"))[:-run.config.keep_checkpoints]:
        _discard(old)
    distributed.barrier(run.world)
    return final


def disk_full(error: BaseException) -> bool:
    """A write failed for want of space: OSError ENOSPC/EDQUOT, or safetensors' and torch's own errors saying so."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and any(s in str(e) for s in ("No space left on device", "Disk quota exceeded",
                                                       "file write failed")):
            return True
    return False


def _kept(root: Path) -> str:
    """What a run stopped by a full disk still has, and how to go on."""
    intact = [f.name for f in sorted(root.glob("step-*"), reverse=True) if not verify(f)]
    if not intact:
        return "free some space or choose another --out"
    return (f"the earlier checkpoints are intact (newest: {intact[0]}): free some space, then the same command "
            "with --resume continues from it")


def _discard(folder: Path) -> None:
    """Delete a checkpoint by renaming it out of sight first: a crash mid-deletion leaves no half-deleted
    step-* folder behind, only a .discard-* one that the next --resume removes."""
    gone = folder.with_name(f".discard-{folder.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.rename(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


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


# settings that say where and how often a run is written, not what it computes: free to change on resume
# (the data's path too: its content is compared by fingerprint; max_steps as the schedule's length)
NOT_IDENTITY = ("out", "data", "save_every", "keep_checkpoints", "max_bad_steps", "max_steps", "rollout_kv_cache_gb",
                "keep_activations", "rollout_eager", "rollout_sleep", "log_samples", "log_every", "push_to_hub", "hub_private",
                "dist_timeout_min", "eval_every", "eval_tasks", "eval_limit", "eval_include", "keep_best")


def identity(run: Run) -> dict[str, Any]:
    """What makes two runs the same run: resolved settings, data, plugins (options, versions), schedule, world."""
    from unisd.plugin import discover

    found = discover()
    # plugin options count by their typed values, under "plugins": the text given (-o clip.max=10 or 10.0) does not
    settings = _without_options({k: v for k, v in run.config.to_json().items() if k not in NOT_IDENTITY})
    plugins = {p.name: {"version": found[p.name].version if p.name in found else "?",
                        "options": {k: v for k, v in vars(p.config).items()}} for p in run.plugins}
    return {"settings": settings, "plugins": plugins, "data": data_fingerprint(run),
            "total_steps": run.total_steps, "world_size": run.world.size}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every leaf that differs (settings. prefixes dropped: they read as flags)."""
    old, new = _flat(stored), _flat(current)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, "(none)") != new.get(key, "(none)"):
            shown = "data fingerprint" if key == "data" else key.removeprefix("settings.")
            out.append(f"{shown}: {_one_line(old.get(key, '(none)'))} -> {_one_line(new.get(key, '(none)'))}")
    return out


def _one_line(value: Any) -> Any:
    """A multi-line setting (a teacher template) quoted with its newlines escaped: the error stays one line."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) and "\n" in value else value


def check_same_run(folder: Path, stored: dict[str, Any] | None, current: dict[str, Any], extend: bool) -> None:
    """Refuse to resume a checkpoint of a different run; --extend accepts a longer schedule, nothing else."""
    if stored is None:
        raise OutputDirError(f"{folder} records no run configuration (written by an older unisd); "
                             "start again with --overwrite")
    if extend and current["total_steps"] > stored["total_steps"]:
        current = {**current, "total_steps": stored["total_steps"]}
    # a setting added to unisd after the checkpoint was written counts as its default; plugin options count by
    # their typed values (under "plugins"), the text that gave them (older checkpoints record it too) on neither side
    stored = {**stored, "settings": _compared({**_defaults(), **stored["settings"]})}
    current = {**current, "settings": _compared(current["settings"])}
    diff = changes(stored, current)
    if diff:
        hint = " (--extend accepts more steps)" if any(d.startswith("total_steps") for d in diff) else ""
        raise OutputDirError(f"--resume: this is not the run in {folder.parent.parent}: {'; '.join(diff)}{hint}; "
                             "resume with the same settings, or start again with --overwrite")


def _without_options(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "options"}


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as --resume compares them: a local model folder by where it is (`./m`, `m` and `/abs/m` are one
    model), not by how its path was written."""
    found = Path(str(settings.get("model", ""))).expanduser()
    model = {"model": str(found.resolve())} if settings.get("model") and found.exists() else {}
    return {**_without_options(settings), **model}


def _defaults() -> dict[str, Any]:
    from unisd.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING and f.name not in NOT_IDENTITY}


def restore(run: Run, echo: Callable[[str], None], extend: bool) -> bool:
    """Load the newest intact checkpoint into run; False if there is none.

    The checkpoint must be of this very run (see `identity`); `extend` lets the schedule grow.
    """
    from unisd import distributed

    root = run.out / "checkpoints"
    if run.world.main:
        for leftover in [*root.glob(".tmp-step-*"), *root.glob(".discard-*")]:  # a save interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)
    for folder in sorted(root.glob("step-*"), reverse=True):
        problem = verify(folder)
        if problem:
            echo(f"warning: skipping checkpoint {folder.name}: {problem}")
            continue
        state = _load_data(folder / "state.pt")
        check_same_run(folder, state.get("identity"), identity(run), extend)
        missing = [p.name for p in run.plugins if p.name not in state["plugins"]]
        if missing:
            raise OutputDirError(f"{folder} holds no state for plugin {', '.join(missing)}; "
                                 "resume with the plugins it was written with, or --overwrite")
        # on the CPU: each parameter then takes its own slice to its device, never every whole tensor at once
        trainable = load_file(str(folder / "trainable.safetensors"), device="cpu")
        params = dict(run.policy.trainable())
        for name, value in trainable.items():
            distributed.assign(params[name], value)
        assert run.optimizer is not None
        set_optimizer_state_dict(run.policy.model, run.optimizer, _load_data(folder / "optimizer.pt"),
                                 options=StateDictOptions(full_state_dict=True))
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, run.position, run.bad_steps = state["step"], state["position"], state["bad_steps"]
        run.hooks.load_state_dict(state["plugins"])
        if run.truncation is not None and state.get("truncation"):  # older checkpoints hold none: a fresh streak
            run.truncation.load_state_dict(state["truncation"])
        run.best = state.get("best", {})
        set_rng_state(state["rng"][run.world.rank])
        return True
    echo("no intact checkpoint found; starting from the beginning")
    return False


# NumPy's generator state as checkpoints before rng.py stored it as lists held it: plain data too
NUMPY_STATE: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]


def _load_data(path: Path) -> Any:
    """A .pt file of tensors and plain data, memory-mapped (every rank reads it; the page cache holds one copy).

    weights_only: a checkpoint folder may come from elsewhere, and unpickling arbitrary objects runs their code.
    """
    try:
        with torch.serialization.safe_globals(NUMPY_STATE):
            return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_STATE}
        named = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        raise OutputDirError(f"{path} names {', '.join(named) or 'objects'} beyond tensors and plain data, and "
                             "loading it could run code; refused. Resume only checkpoints unisd wrote, or start "
                             "again with --overwrite") from e


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step`: after a resume those steps are run again.

    A torn last line (the process was killed mid-write: the case --resume is for) is dropped as well; a
    damaged line before it is not ours to guess about and is named.
    """
    if not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")  # a torn multi-byte character too
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for n, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        row = _json_row(line)
        if row is None and n == last:
            break
        if row is None:
            raise OutputDirError(f"{path}:{n + 1}: not a JSON object with a step; repair or delete that line, "
                                 "then --resume")
        if row["step"] <= step:
            kept.append(line)
    path.write_text("".join(ln + "\n" for ln in kept))


def _json_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def data_fingerprint(run: Run) -> str:
    h = hashlib.sha256()
    for e in run.examples:
        turns = [list(map(dict, e.context))] if e.context or e.after else []  # earlier turns, when any: old
        turns += [list(map(dict, e.after))] if e.after else []  # fingerprints hold; then tool turns, when any
        h.update(json.dumps([e.prompt, e.answer, e.rationale, *turns], ensure_ascii=False).encode())
    return h.hexdigest()


def save_final(run: Run, folder: Path | None = None) -> None:
    """Write the final model into run.out itself (or `folder`: --keep-best's copy); unisd.json goes last and marks
    the run finished.

    Every rank calls it: a sharded student's whole weights are gathered to rank 0, which writes.
    """
    from unisd.plugin import discover

    weights, adapter = run.policy.gathered()
    if not run.world.main:
        return

    target = run.out if folder is None else folder
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target, prefix=".final-"))
    found = discover()
    record = {"unisd_version": unisd.__version__, "config": run.config.to_json(), "steps": run.step,
              "examples": len(run.kept), "data_fingerprint": data_fingerprint(run), "data": data_order(run),
              "plugins": {p.name: {"distribution": found[p.name].distribution if p.name in found else "?",
                                   "version": found[p.name].version if p.name in found else "?",
                                   "options": {k: v for k, v in vars(p.config).items()}} for p in run.plugins},
              "torch": torch.__version__, **({"best": run.best} if folder is not None else {})}
    try:
        models.save_final(run.policy.model, run.tokenizer, staging, card.render(record, target.name), record, weights,
                          adapter)
    except BaseException as e:  # nothing half-written in the output folder
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(e):
            raise OutputDirError(f"cannot write the final model into {run.out}: the disk is full; "
                                 f"{_kept(run.out / 'checkpoints')}") from None
        raise
    names = sorted(f.name for f in staging.iterdir())
    for name in [n for n in names if n != "unisd.json"] + ["unisd.json"]:
        if (target / name).is_dir():  # left by a final write that was cut short (os.replace keeps no folder)
            shutil.rmtree(target / name)
        os.replace(staging / name, target / name)
    staging.rmdir()
