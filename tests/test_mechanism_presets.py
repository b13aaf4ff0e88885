"""The per-mechanism presets and UniSD*: each selects its plugins with the official orchestrator's values
(reference/official-unisd.md §2-3), the plugins receive them, the shared settings stay the plain-SD ones,
and a command-line option wins over the preset."""
from __future__ import annotations

import dataclasses

import pytest

from unisd import config as cfg
from unisd.plugin import load

PLAIN_SD = {"divergence": "fkl", "loss_temperature": 0.7, "temperature": 0.7, "top_p": 1.0, "skip_first_tokens": 0,
            "max_grad_norm": 1.0}
EXPECTED = {
    "agree-tok": {"agree": {"k": 3, "gamma": 0.01, "level": "token", "contexts": "retrieval"}},
    "agree-seq": {"agree": {"k": 3, "gamma": 0.01, "level": "sequence", "contexts": "retrieval"}},
    "ema": {"ema": {"beta": 0.9, "every": 10}},
    "contrast": {"contrast": {"weight": 0.1, "margin": 0.5}},
    "match-joint": {"match": {"weight": 0.1, "mode": "joint"}},
    "match-repr": {"match": {"weight": 0.1, "mode": "repr"}},
    "clip": {"clip": {"max": 10.0}},
    "unisd-star": {"ema": {"beta": 0.98, "every": 10},
                   "agree": {"k": 3, "gamma": 0.001, "level": "token", "stat": "var", "contexts": "retrieval"},
                   "contrast": {"weight": 0.01, "margin": 0.1},
                   "match": {"weight": 0.01, "mode": "joint"},
                   "clip": {"max": 10.0}},
}


def _resolve(preset: str, overrides: dict | None = None) -> cfg.TrainConfig:
    return cfg.resolve(preset, (), overrides or {}, model="m", data="d", out="o")


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_selects_its_plugins_with_the_official_values(preset):
    config = _resolve(preset)
    expected = EXPECTED[preset]
    assert config.plugins == tuple(expected)
    assert {k: getattr(config, k) for k in PLAIN_SD} == PLAIN_SD  # only the mechanisms differ from plain SD
    plugins = load(list(config.plugins), config.options)
    for plugin, values in zip(plugins, expected.values(), strict=True):
        resolved = dataclasses.asdict(plugin.config)
        assert {k: resolved[k] for k in values} == values, plugin.name


def test_command_line_option_wins_over_the_preset():
    config = _resolve("unisd-star", {"ema": {"beta": "0.5"}})
    plugins = {p.name: p for p in load(list(config.plugins), config.options)}
    assert plugins["ema"].config.beta == 0.5 and plugins["ema"].config.every == 10
    assert plugins["agree"].config.gamma == 0.001
