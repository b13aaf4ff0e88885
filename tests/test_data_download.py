"""`unisd data download DIR` writes what `UNISD_DATA_DIR=DIR` reads: the same rows, offline."""
from __future__ import annotations

import datasets
import pytest
from click.testing import CliRunner

from unisd.cli import main
from unisd.data import benchmarks, download


def _fake_hub(monkeypatch) -> list[tuple]:
    """load_dataset answers every (hub id, config, split) with two rows that name where they came from."""
    asked: list[tuple] = []

    def load_dataset(hub_id, config, split):
        asked.append((hub_id, config, split))
        return datasets.Dataset.from_list([{"source": f"{hub_id}/{config}/{split}", "i": i, "text": "é"} for i in range(2)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_every_downloaded_split_is_the_one_unisd_data_dir_reads(tmp_path, monkeypatch):
    asked = _fake_hub(monkeypatch)
    result = CliRunner().invoke(main, ["data", "download", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert ("google-research-datasets/mbpp", "full", "train") in asked
    assert ("google-research-datasets/mbpp", "sanitized", "test") in asked
    assert ("Salesforce/cos_e", "v1.11", "validation") in asked and ("Idavidrein/gpqa", "gpqa_main", "train") in asked
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("read the Hub, not UNISD_DATA_DIR"))
    monkeypatch.setenv("UNISD_DATA_DIR", str(tmp_path / "data"))
    for name in download.DOWNLOADABLE:
        for split in {"train", benchmarks.EVAL_SPLITS[name]}:
            rows = benchmarks.rows(name, split)
            assert [r["i"] for r in rows] == [0, 1] and rows[0]["text"] == "é", (name, split)


def test_an_unknown_benchmark_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    _fake_hub(monkeypatch)
    result = CliRunner().invoke(main, ["data", "download", str(tmp_path / "data"), "--benchmark", "humaneval"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --benchmark humaneval: not downloadable")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "data").exists()


def test_a_hub_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    result = CliRunner().invoke(main, ["data", "download", str(tmp_path), "--benchmark", "cos_e"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: cos_e: cannot download Salesforce/cos_e/v1.11 split 'train' "
                                     "(ConnectionError: Couldn't reach the Hub)")
