"""Trainer flags come from one source, TrainConfig: `train` and `ablate` offer the same ones, alike."""
from __future__ import annotations

import dataclasses

from unisd import config as cfg
from unisd.cli import main


def _options(command: str) -> dict[str, object]:
    return {p.name: p for p in main.commands[command].params}


def test_every_flag_field_is_an_option_of_train_and_ablate_with_the_same_type():
    fields = [f for f in dataclasses.fields(cfg.TrainConfig) if "flag" in f.metadata]
    assert {"batch_size", "alpha", "bf16", "mask_truncated", "fsdp", "max_bad_steps", "rollout"} <= {f.name for f in fields}
    train, ablate = _options("train"), _options("ablate")
    for f in fields:
        if f.name in ("eval_tasks", "eval_limit"):  # ablate's own options of those names serve --eval-every too
            assert ablate[f.name].opts == ["--" + f.name.replace("_", "-")]
            continue
        ours, theirs = train[f.name], ablate[f.name]
        assert ours.opts == theirs.opts == ["--" + f.name.replace("_", "-")]
        assert repr(ours.type) == repr(theirs.type) and ours.is_flag == theirs.is_flag, f.name
        assert ours.default is None and theirs.default is None, f.name  # not given: the preset's value stays


def test_the_help_gives_the_default_from_the_config():
    help_of = {p.name: p.help for p in main.commands["train"].params}
    assert help_of["batch_size"].endswith("[4]") and help_of["divergence"].endswith("[fkl]")


def test_train_help_lists_every_flag_under_a_heading_of_what_it_does():
    from click.testing import CliRunner

    from unisd.cli import main, train
    from unisd.flags import HELP_SECTIONS, section_of

    unplaced = [p.name for p in train.params if section_of(p.name) is None]
    assert unplaced == [], "add these to unisd.flags.HELP_SECTIONS"
    text = CliRunner().invoke(main, ["train", "--help"]).output
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == [*HELP_SECTIONS, "Options"]  # Options: --help alone
    assert text.index("--warmup-ratio") < text.index("Sampling (rollouts):") < text.index("--top-p")
