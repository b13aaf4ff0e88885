"""Tables print the interval itself, and say over which items Overall is taken."""
from __future__ import annotations

from unisd import evaluate as ev
from unisd import report


def test_a_cell_is_the_score_and_its_exact_interval_not_a_symmetric_half_width(tmp_path):
    # 1 of 4 right: Clopper-Pearson [0.63%, 80.6%], far from 25 ± 40
    combined = ev.add_uncertainty({"scores": {"base": {"t": 25.0}, "sd": {"t": 75.0, "u": 50.0}},
                                   "items": {"base": {"t": {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0}},
                                             "sd": {"t": {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}, "u": {}}}})
    report.write_comparison(combined, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| base | 25.0 [0.6, 80.6] | – | 25.0 [0.6, 80.6] |" in table
    assert "| sd | 75.0 [19.4, 99.4] | 50.0 | 62.5 [19.4, 99.4] |" in table  # u has no items: no interval
    assert ("Overall: the mean of a row's task scores, each task counting once; its interval resamples the items "
            "within each task (t 4 items); u: no per-item scores, so not in the interval.") in table
    assert "±" not in table
