"""Translate the exceptions of loading and writing into one line that says what to do.

huggingface_hub, transformers, safetensors and the OS each raise their own exceptions, often chained
four deep with hints that do not apply here. Every caller that loads a model or writes a run goes
through these two functions, so a given failure reads the same wherever it happens.
"""
from __future__ import annotations

import errno
from typing import Iterator


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_problem(spec: str, error: BaseException) -> str:
    """Why the model or tokenizer `spec` could not be loaded, and what to do about it."""
    from huggingface_hub import errors as hub

    for e in _chain(error):
        if isinstance(e, hub.GatedRepoError):
            return (f"model '{spec}' is gated on the Hugging Face Hub: accept its terms on its Hub page, "
                    "then log in (hf auth login)")
        if isinstance(e, hub.RepositoryNotFoundError):
            return (f"model '{spec}' is not on the Hugging Face Hub (check the id; for a private model, "
                    "log in with hf auth login)")
        if isinstance(e, hub.RevisionNotFoundError):
            return f"model '{spec}': no such revision on the Hugging Face Hub"
        if isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            return (f"model '{spec}' is neither a local folder nor in the Hugging Face cache, and the Hub "
                    f"cannot be reached (offline); check the path, or download it first: hf download {spec}")
        if isinstance(e, hub.HFValidationError):
            return f"model '{spec}': no such folder, and not a Hub id (org/name); check the path"
        if type(e).__name__ == "SafetensorError" or "deserializ" in str(e) or "unpickl" in str(e).lower():
            return (f"model '{spec}': its weights are corrupt or truncated ({_first_line(e)}); "
                    "download or save the model again")
        if isinstance(e, KeyError) or "does not recognize this architecture" in str(e):
            return (f"model '{spec}': this transformers version does not support its architecture "
                    f"({_first_line(e)}); upgrade transformers or choose another model")
    return f"cannot load model '{spec}': {_first_line(error)}"


WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another --out",
    errno.EACCES: "permission denied; choose a folder you can write to with --out",
    errno.EPERM: "permission denied; choose a folder you can write to with --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another --out",
    errno.EEXIST: "a file stands where a folder is needed; choose another --out",
}


def write_problem(error: OSError) -> str | None:
    """What to do about a failed write to the output folder, or None for an OSError that is not one."""
    advice = WRITE_ADVICE.get(error.errno or 0)
    if advice is None:
        return None
    where = f"{error.filename}: " if error.filename else ""
    return f"cannot write {where}{advice}"
