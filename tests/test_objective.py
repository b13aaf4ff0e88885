"""One switch decides the per-token objective: --divergence fkl|rkl|jsd|ce|none; a plugin may stand for one
(nll: ce), and a --divergence given that differs is a one-line error, never silently replaced."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from unisd import config as cfg
from unisd import losses
from unisd.api import Plugin
from unisd.cli import main
from unisd.plugin import discover, load, settle_objective


def _config(preset: str = "", plugins: tuple[str, ...] = (), **settings) -> cfg.TrainConfig:
    return cfg.resolve(preset, plugins, {}, model="m", data="d", out="o", **settings)


def test_the_objective_is_the_divergence_the_cross_entropy_or_nothing():
    D, logp = torch.tensor([[0.5, 2.0]]), torch.tensor([[-0.1, -3.0]], requires_grad=True)
    assert losses.objective("rkl", D, logp) is D
    assert losses.objective("ce", D, logp)[0].tolist() == pytest.approx([0.1, 3.0])
    nothing = losses.objective("none", D, logp)
    assert nothing.tolist() == [[0.0, 0.0]] and not nothing.requires_grad


def test_nll_sets_ce_and_refuses_a_different_objective_given_or_by_its_preset():
    nll = load(["nll"], {})
    assert settle_objective(_config(plugins=("nll",)), nll).divergence == "ce"
    assert settle_objective(_config("sft"), load(["mix", "nll"], {})).divergence == "ce"
    assert settle_objective(_config(plugins=("nll",), divergence="ce"), nll, given=True).divergence == "ce"
    with pytest.raises(cfg.ConfigError, match="--divergence fkl conflicts with plugin 'nll'"):
        settle_objective(_config(plugins=("nll",), divergence="fkl"), nll, given=True)
    with pytest.raises(cfg.ConfigError, match="--divergence jsd conflicts with plugin 'nll'"):
        settle_objective(_config("gkd", ("nll",)), load(["mix", "nll"], {}))


def test_two_plugins_that_set_different_objectives_are_refused():
    class Nothing(Plugin):
        objective = "none"

    other = Nothing()
    other.name = "feature-only"
    with pytest.raises(cfg.ConfigError, match="plugins set different per-token objectives"):
        settle_objective(_config(), load(["nll"], {}) + [other])


def test_a_conflicting_divergence_is_one_line_on_the_command_line(tmp_path):
    assert not discover()["nll"].error
    result = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                                       "--plugins", "nll", "--divergence", "rkl"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --divergence rkl conflicts with plugin 'nll', which trains on "
                                     "--divergence ce; drop one of them")
    assert not (tmp_path / "o").exists()
