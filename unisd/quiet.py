"""Other libraries' noise, silenced where it starts, so that what a run prints is the run's own (`unisd --verbose`
brings it back).

- vLLM's import-time lines ("Triton is installed, but doesn't include CPU backend") and per-request INFO:
  its logging level, read once when vllm is first imported (so set before any command can import it);
- transformers 5's `is_gradient_checkpointing` deprecation, which peft triggers when it wraps a model for LoRA;
- lm-eval's "fatal: not a git repository": it runs `git describe` for its results' `git_hash` and lets git
  write to the terminal when the working folder is not a repository.
"""
from __future__ import annotations

import os
import subprocess
import warnings

verbose = False  # `unisd --verbose`: leave every library's own output alone


def apply(be_verbose: bool) -> None:
    """Silence the noise above for this process, or with `be_verbose` keep vLLM at its own INFO level."""
    global verbose
    verbose = be_verbose
    if be_verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")  # before unisd.engine would set ERROR
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def git_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, with git's complaint outside a repository kept off the terminal."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
    except FileNotFoundError:
        found = None
    if found is not None and found.returncode == 0:
        return found.stdout.strip()
    return get_commit_from_path(os.getcwd())


def lm_eval() -> None:
    """Quiet lm-eval's git lookup (unless --verbose); call once lm_eval.evaluator is imported."""
    if not verbose:
        import lm_eval.evaluator

        lm_eval.evaluator.get_git_commit_hash = git_hash  # type: ignore[attr-defined]
