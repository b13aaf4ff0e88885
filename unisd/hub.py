"""`--push-to-hub REPO_ID`: the finished output folder uploaded to the Hugging Face Hub.

The folder is already a Hub model repository (weights, tokenizer, chat template, a model card with Hub front
matter, `unisd.json`, and under --lora the adapter in peft's format), so the upload is `HfApi.upload_folder` of
it, less what only resuming needs (checkpoints/) and the per-sample log. The token and the repository are
checked before anything loads: a missing token or an unreachable Hub is one error line then, not after hours
of training.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from unisd.config import ConfigError

LEFT_OUT = ["checkpoints/*", ".final-*", "samples.jsonl", "tensorboard/*"]  # resuming state, raw samples, tracker files


class HubError(ConfigError):
    """The Hub cannot take the upload (no token, no access, unreachable); the message says which."""


def connect(repo_id: str, private: bool) -> HfApi:
    """Who the token is, and the repository created (or found) with write access; one HubError line if not."""
    api = HfApi()
    try:
        user = api.whoami()
    except Exception as e:  # a missing or bad token, or no network: both are the user's to fix before training
        raise HubError(f"--push-to-hub {repo_id}: cannot reach the Hugging Face Hub as a logged-in user "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); log in with "
                       f"`hf auth login` or set HF_TOKEN, or drop --push-to-hub") from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as e:
        raise HubError(f"--push-to-hub {repo_id}: {user.get('name', 'this token')} cannot create or write it "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return api


def push(api: HfApi, repo_id: str, folder: Path, steps: int) -> str:
    """Upload the output folder's final model; returns the repository's URL."""
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=LEFT_OUT,
                             commit_message=f"unisd: final model after {steps} steps")
    return f"https://huggingface.co/{repo_id}" if info is None else str(getattr(info, "repo_url", None) or
                                                                        f"https://huggingface.co/{repo_id}")
