"""Under --fsdp a rank other than 0 builds the model on the meta device: it must stop on the same ids as rank 0."""
from __future__ import annotations

import json
import shutil

import torch

from unisd import models, policy, rollout
from unisd.distributed import World


def test_a_rank_that_builds_on_meta_reads_the_same_stop_ids_as_rank_0(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    tokenizer = models.load_tokenizer(str(folder))
    ends = [tokenizer.eos_token_id, 7, 9]  # chat models list several end-of-turn ids in generation_config.json only
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": ends}))

    def stops(rank: int) -> set[int]:
        model = policy._load(str(folder), World(rank, 2, torch.device("cpu")), sharded=True)
        return rollout.eos_ids(model, tokenizer)

    assert stops(0) == set(ends)
    assert stops(1) == stops(0)


def test_without_a_generation_config_file_the_meta_build_keeps_the_model_configs_end(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    (folder / "generation_config.json").unlink()
    loaded, built = models.load_model(str(folder)), models.build_on_meta(str(folder))
    assert built.generation_config.eos_token_id == loaded.generation_config.eos_token_id is not None
    assert built.device.type == "meta"
