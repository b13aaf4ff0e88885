"""One vLLM engine for the series of checkpoints `unisd eval --backend vllm` scores (the demo's three among them).

Starting an engine costs the same for a base model as for each of its fine-tuned checkpoints (about 15 s for
SmolLM2-135M on a 2-core CPU; on a GPU, minutes of graph capture for a 7B model). A checkpoint that differs from the
engine's model only in its weights (the same config, tokenizer and generation settings) is loaded into the running
engine, as training's rollouts load the student's weights after every step, and its cached prefixes are dropped;
any other model gets an engine of its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open

from unisd import engine

# files that decide how a model reads text, computes and decodes, beside its weights
DESCRIBING = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja", "chat_template.json")
# keys of those files that say where and how a model was written, not what it does (lm-eval sets the dtype)
PROVENANCE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "name_or_path", "_commit_hash",
              "local_files_only"}


def _described(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    if path.suffix != ".json":
        return path.read_bytes()
    found = json.loads(path.read_text())
    return {k: v for k, v in found.items() if k not in PROVENANCE} if isinstance(found, dict) else found


def weights_only_differ(a: Path, b: Path) -> bool:
    """Whether the model in folder `b` can be loaded into an engine built for the one in `a`: every describing
    file the same (provenance aside) and `b`'s weights in safetensors files the engine can read."""
    return any(b.glob("*.safetensors")) and all(_described(a, n) == _described(b, n) for n in DESCRIBING)


def checkpoint_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in a folder's safetensors files, read one at a time."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class SharedEngine:
    """lm-eval's vLLM model, started (`start(path)`) for the first checkpoint and reused for every later one that
    only its weights tell apart; `close` shuts the engine down (unisd.engine.shut_down)."""

    def __init__(self, start: Callable[[str], Any]) -> None:
        self.start = start
        self.lm: Any = None
        self.folder: Path | None = None

    def holding(self, path: str, folder: Path | None) -> Any:
        """The lm-eval model with `path`'s weights; `folder` is where they are on disk (None: not a local folder,
        e.g. a Hub id, which always gets an engine of its own)."""
        if self.lm is not None and self.folder is not None and folder is not None \
                and weights_only_differ(self.folder, folder):
            engine.reload(self.lm.model, checkpoint_weights(folder), self.lm.model.llm_engine.model_config.dtype)
        else:
            self.close()
            self.lm = self.start(path)
            self.folder = folder
        return self.lm

    def close(self) -> None:
        if self.lm is not None:
            engine.shut_down(self.lm.model)
            self.lm = None
