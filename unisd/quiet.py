"""Other libraries' noise, silenced where it starts, so that what a run prints is the run's own (`unisd --verbose`
brings it back).

- vLLM's import-time lines ("Triton is installed, but doesn't include CPU backend") and per-request INFO:
  its logging level, read once when vllm is first imported (so set before any command can import it), and
  its package logger's own level, since the Triton line is logged before vLLM configures its handlers;
- torch's C++ warnings printed outside Python (vLLM's CPU worker: "NUMA binding: Using MEMBIND policy"):
  TORCH_CPP_LOG_LEVEL, which torch reads once at import, so it is set only while torch is not yet imported;
- transformers 5's `is_gradient_checkpointing` deprecation, which peft triggers when it wraps a model for LoRA;
- lm-eval's advice meant for its own command line (`--metadata` for a task that loads its data by function,
  `do_sample` when generation settings are passed, vLLM ignoring `device`): filters on its loggers;
- lm-eval's "fatal: not a git repository": it runs `git describe` for its results' `git_hash` and lets git
  write to the terminal when the working folder is not a repository.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

verbose = False  # `unisd --verbose`: leave every library's own output alone

LM_EVAL_ADVICE = {  # logger -> the start of the line it drops
    "lm_eval.api.task": "Custom kwargs can be passed to `--metadata`",
    "lm_eval.evaluator": "generation_kwargs: ",
    "lm_eval.models.vllm_causallms": "The `device` argument is ignored by the vLLM backend",
}


def _drop_advice(record: logging.LogRecord) -> bool:
    text = LM_EVAL_ADVICE.get(record.name)
    return text is None or text not in record.getMessage()


def apply(be_verbose: bool) -> None:
    """Silence the noise above for this process, or with `be_verbose` keep vLLM at its own INFO level."""
    global verbose
    verbose = be_verbose
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if be_verbose else "ERROR")  # before unisd.engine's ERROR
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    for name in LM_EVAL_ADVICE:
        logging.getLogger(name).removeFilter(_drop_advice)
        if not be_verbose:
            logging.getLogger(name).addFilter(_drop_advice)
    if be_verbose:
        return
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
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
