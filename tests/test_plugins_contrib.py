"""A third-party plugin distribution (plugins/contrib/unisd-surprisal-gate) is found through entry points and trains."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unisd import config as cfg
from unisd.plugin import discover
from unisd.train import train

CONTRIB = Path(__file__).resolve().parents[1] / "plugins" / "contrib" / "unisd-surprisal-gate"


@pytest.fixture
def gate_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pip install` would leave: a dist-info with the entry point, and the module on sys.path."""
    site = tmp_path / "site"
    info = site / "unisd_surprisal_gate-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unisd-surprisal-gate\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[unisd.plugins]\ngate = unisd_surprisal_gate:SurprisalGate\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(CONTRIB))


def test_gate_is_discovered_and_trains(gate_installed: None, tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path / "cache"))
    found = discover()
    assert found["gate"].cls is not None and found["gate"].distribution == "unisd-surprisal-gate"
    assert found["gate"].hooks == ["weights"] and found["gate"].options == {"keep": 0.5}
    config = cfg.resolve("", ("gate", "clip"), {"gate": {"keep": "0.5"}}, model=str(tiny_model), data=str(tiny_data),
                         out=str(tmp_path / "run"), batch_size=2, max_new_tokens=8, max_steps=2)
    out = train(config, echo=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["gate/kept"] < 1 for r in rows)  # some kept, some gated


def test_without_the_distribution_there_is_no_gate() -> None:
    assert "gate" not in discover()
