"""Plugin discovery, option parsing and the errors a user sees."""
from __future__ import annotations

import dataclasses

import pytest

from unisd import plugin
from unisd.plugin import parse_overrides
from unisd.plugin import Plugin, PluginError

GOOD = '''
from dataclasses import dataclass
from unisd.plugin import Plugin

class Good(Plugin):
    @dataclass(frozen=True)
    class Config:
        scale: float = 1.0
        steps: int = 2
        on: bool = True
        mode: str = "a"
        cap: float | None = None

        def __post_init__(self):
            if self.mode not in ("a", "b"):
                raise ValueError(f"mode must be a or b, got {self.mode!r}")

    def token_loss(self, D, out):
        return D * self.config.scale
'''

OLD_API = '''
from unisd.plugin import Plugin

class Old(Plugin):
    api_version = 0
'''


def test_discovery_records_broken_plugins_without_breaking_others(plugin_dist):
    plugin_dist("good-dist", {"good": "host_good_mod:Good", "broken": "missing_module:Nope", "old": "host_old_mod:Old"},
                {"host_good_mod": GOOD, "host_old_mod": OLD_API})
    found = plugin.discover()
    assert found["good"].cls is not None and found["good"].distribution == "good-dist"
    assert found["good"].hooks == ["token_loss"]
    assert found["good"].options == {"scale": 1.0, "steps": 2, "on": True, "mode": "a", "cap": None}
    assert "ModuleNotFoundError" in found["broken"].error
    assert "API version 0" in found["old"].error
    with pytest.raises(PluginError, match="failed to load"):
        plugin.load(["broken"], {}, found)
    with pytest.raises(PluginError, match="unknown plugin 'nope'"):
        plugin.load(["nope"], {}, found)


def test_options_are_type_checked(plugin_dist):
    plugin_dist("good-dist", {"good": "host_good_mod:Good"}, {"host_good_mod": GOOD})
    found = plugin.discover()
    [p] = plugin.load(["good"], {"good": {"scale": "0.5", "steps": "3", "on": "false", "cap": "none"}}, found)
    assert p.name == "good"
    assert p.config == p.Config(scale=0.5, steps=3, on=False, cap=None)
    [p] = plugin.load(["good"], {"good": {"cap": "2.5"}}, found)
    assert p.config.cap == 2.5
    bad = [({"steps": "two"}, "good.steps='two': expected int"),
           ({"scale": "x"}, "expected float"),
           ({"on": "maybe"}, "expected bool"),
           ({"nope": "1"}, "unknown option good.nope"),
           ({"mode": "c"}, "mode must be a or b")]
    for options, message in bad:
        with pytest.raises(PluginError, match=message):
            plugin.load(["good"], {"good": options}, found)
    with pytest.raises(PluginError, match="not among the selected"):
        plugin.load([], {"good": {"scale": "1"}}, found)


def test_override_syntax():
    assert parse_overrides(["agree.k=5", "agree.gamma=0.1", "ema.beta=0.9"]) == \
        {"agree": {"k": "5", "gamma": "0.1"}, "ema": {"beta": "0.9"}}
    for bad in ("agree.k", "k=5", ".k=5", "agree.=5"):
        with pytest.raises(PluginError, match="expected plugin.option=value"):
            parse_overrides([bad])


def test_base_plugin_hooks_do_nothing():
    p = Plugin()
    assert p.views(None) == {} and p.teacher(None) is None and p.weights(None) is None
    assert p.token_loss("D", None) == "D" and p.aux_losses(None) == {} and p.state_dict() == {}
    assert dataclasses.fields(p.config) == ()
