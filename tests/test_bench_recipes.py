"""The recipe study's runs are the sources' recipes, and its table is rendered from its JSON alone."""
from __future__ import annotations

import argparse

import pytest

from bench import recipes
from unisd import config as cfg


def _config(name: str) -> cfg.TrainConfig:
    args = argparse.Namespace(work="runs/recipes", steps=12, batch_size=4, backend="hf")
    return recipes.configure(name, args)


@pytest.mark.parametrize("name", ["sdft-2e-5", "sdft-5e-6", "unisd-star-sdft-2e-5", "unisd-star-sdft-5e-6"])
def test_sdft_recipes_have_sdfts_teacher_divergence_sampling_and_skipped_tokens(name):
    c = _config(name)
    assert c.options["ema"]["beta"] == 0.99 and c.options["ema"]["every"] == 1
    assert (c.divergence, c.temperature, c.loss_temperature, c.skip_first_tokens) == ("fkl", 1.0, 1.0, 3)
    assert c.lr == (2e-5 if name.endswith("2e-5") else 5e-6) and not c.lora


@pytest.mark.parametrize("name", ["opsd-5e-6", "unisd-star-opsd-5e-6"])
def test_opsd_recipes_keep_a_fixed_teacher_the_grad_cap_and_opsds_sampling(name):
    c = _config(name)
    assert "ema" not in c.plugins
    assert (c.divergence, c.max_grad_norm, c.temperature, c.top_p, c.top_k) == ("fkl", 0.1, 1.1, 0.95, 20)


def test_unisd_star_rows_keep_every_other_mechanism_and_the_paper_row_uses_lora():
    assert set(_config("unisd-star-opsd-5e-6").plugins) == set(cfg.PRESETS["unisd-star"].plugins) - {"ema"}
    paper = _config("unisd-star-lora-2e-5")
    assert paper.lora and paper.lr == 2e-5 and paper.options["ema"] == dict(cfg.PRESETS["unisd-star"].options["ema"])
    sft = _config("sft-5e-6")
    assert "nll" in sft.plugins and sft.lr == 5e-6


def _row(score, truncated, versus=None):
    return {"score": score, "ci95": [score - 5, score + 5], "n": 50, "vs_base": versus, "identical_share": 4.0,
            "collapsed": False, "ppl_ret": 2.5, "ppl_ret_ci95": [2.0, 3.0], "truncated_per_step": truncated,
            "completion_length_per_step": [], "loss_per_step": [0.1] * len(truncated),
            "train_s": 10.0 * len(truncated) or None}


def test_table_is_rendered_from_the_json_with_one_digit_per_step():
    config = _config("sdft-2e-5").to_json()
    result = {"command": "python -m bench recipes", "git_sha": "0123456789abcdef", "machine": {"cpu": "EPYC"},
              "model": "smollm2-135m", "precision": "fp32", "backend": "hf", "eval_limit": 50,
              "retention_documents": 25, "same_data_order": True, "not_reproduced": "OPSD's point-wise clip",
              "not_run": ["opsd-5e-6"],
              "recipes": {"sdft-2e-5": {"why": "", "config": config}},
              "runs": {"base": _row(14.0, []),
                       "sdft-2e-5": _row(12.0, [0.0, 0.25, 0.5, 1.0],
                                         {"difference": -2.0, "ci95": [-6.0, 2.0], "p_value": 0.4})}}
    lines = recipes.table(result).splitlines()
    sdft = next(line for line in lines if line.startswith("| sdft-2e-5 |"))
    assert "| 0124 |" in sdft and "-2.0 [-6.0, +2.0], p=0.4" in sdft and "12.0 [7.0, 17.0] (n=50)" in sdft
    assert "teacher EMA 0.99/1" in sdft and "skip 3" in sdft and "lr 2e-05" in sdft
    base = next(line for line in lines if line.startswith("| base |"))
    assert "untrained" in base and "14.0 [9.0, 19.0] (n=50)" in base
    assert "OPSD's point-wise clip" in recipes.table(result) and "Not run: opsd-5e-6." in lines
