"""Intervals over seeds and items (`unisd.seeds`): the variance formula by hand, and coverage on simulated scores."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from unisd.seeds import combine, estimate


def test_the_variance_is_the_crossed_designs_by_hand() -> None:
    x = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # 3 seeds x 4 items
    seeds, items = x.shape
    seed_means, item_means, grand = x.mean(1), x.mean(0), x.mean()
    ms_seed = items * ((seed_means - grand) ** 2).sum() / (seeds - 1)
    ms_item = seeds * ((item_means - grand) ** 2).sum() / (items - 1)
    ms_res = ((x - seed_means[:, None] - item_means[None, :] + grand) ** 2).sum() / ((seeds - 1) * (items - 1))
    variance = (ms_seed + max(ms_item - ms_res, 0.0)) / (seeds * items)
    e = estimate([x])
    assert e.mean == pytest.approx(grand)
    half = e.ci95[1] - e.mean
    assert half == pytest.approx(sps.t.ppf(0.975, e.df) * variance ** 0.5)
    assert e.seeds == 3 and e.ci95[0] == pytest.approx(e.mean - half)


def test_one_seed_is_the_ordinary_interval_over_items() -> None:
    x = np.array([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    e = estimate([x])
    se = x[0].std(ddof=1) / np.sqrt(x.shape[1])
    assert e.df == x.shape[1] - 1
    assert e.ci95[1] - e.mean == pytest.approx(sps.t.ppf(0.975, e.df) * se)


def test_an_overall_shares_the_seed_term_and_averages_the_item_terms() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 5)), rng.random((3, 7))
    overall = estimate([a, b])
    assert overall.mean == pytest.approx((a.mean() + b.mean()) / 2)
    per_seed = (a.mean(1) + b.mean(1)) / 2
    seed_term = per_seed.var(ddof=1) / 3
    assert (overall.ci95[1] - overall.mean) / sps.t.ppf(0.975, overall.df) >= seed_term ** 0.5


def test_differences_pair_seed_k_with_seed_k_and_broadcast_a_single_seed() -> None:
    runs = {"a": [np.array([[1.0, 1.0], [0.0, 1.0]])], "b": [np.array([[0.0, 1.0], [0.0, 1.0]])],
            "base": [np.array([[0.0, 0.0]])]}
    assert combine(runs, {"a": 1.0, "b": -1.0})[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert combine(runs, {"a": 1.0, "base": -1.0})[0].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    same = estimate(combine({"b": runs["b"], "c": runs["b"]}, {"b": 1.0, "c": -1.0}))
    assert same.mean == 0.0 and same.ci95 == (0.0, 0.0) and same.p_value == 1.0


def _simulate(rng: np.random.Generator, seeds: int, items: int, seed_sd: float, tasks: int = 1) -> list[np.ndarray]:
    """0/1 scores whose success probability has a seed effect (a model trained with another seed) and an item
    effect (item difficulty), as in `unisd.seeds`' model, on the logit scale."""
    a = rng.normal(0.0, seed_sd, seeds)
    return [(rng.random((seeds, items)) < expit(-0.5 + a[:, None] + rng.normal(0.0, 1.0, items)[None, :])).astype(float)
            for _ in range(tasks)]


@pytest.mark.parametrize("seeds,tasks", [(3, 1), (5, 1), (3, 3)])
def test_coverage_on_simulated_scores(seeds: int, tasks: int) -> None:
    """The interval holds the population mean (over seeds and items) about 95% of the time, where an interval over
    items alone, computed from the seeds' mean scores, falls far short once seeds differ."""
    rng = np.random.default_rng(seeds * 10 + tasks)
    truth = float(expit(-0.5 + rng.normal(0, 0.5, 400_000) + rng.normal(0, 1.0, 400_000)).mean())
    reps, covered, covered_by_items = 300, 0, 0
    for _ in range(reps):
        xs = _simulate(rng, seeds, 100, 0.5, tasks)
        e = estimate(xs)
        covered += e.ci95[0] <= truth <= e.ci95[1]
        items_only = sum(x.mean(0).var(ddof=1) / x.shape[1] for x in xs) / tasks ** 2
        covered_by_items += abs(e.mean - truth) <= 1.96 * items_only ** 0.5
    assert 0.89 <= covered / reps <= 0.99
    assert covered_by_items / reps < 0.8


def test_ablate_trains_each_run_with_every_seed_on_one_data_order(tiny_model, tiny_data, tmp_path) -> None:
    """Two seeds of sd and clip: four trainings on the same data order whose samples differ; a table of means with
    intervals over seeds and items, paired against plain SD and the base."""
    import json

    from click.testing import CliRunner

    from tests.test_ablate import write_tasks
    from unisd.cli import main

    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "abl"
    result = CliRunner().invoke(main, [
        "ablate", "--model", str(tiny_model), "--data", str(tiny_data), "--plugins", "clip", "--seeds", "2",
        "--eval-tasks", "tiny_a,tiny_b", "--include-path", str(tasks), "--out", str(out), "--max-steps", "1",
        "--batch-size", "2", "--max-new-tokens", "6", "--lr", "0.05", "--seed", "5"])
    assert result.exit_code == 0, result.output
    records = {(run, s): json.loads((out / "runs" / run / f"seed-{s}" / "unisd.json").read_text())
               for run in ("sd", "clip") for s in (5, 6)}
    assert len({r["data"]["order_sha256"] for r in records.values()}) == 1          # one data order
    assert {r["config"]["seed"] for r in records.values()} == {5, 6}
    first = {s: json.loads((out / "runs" / "sd" / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[0])
             for s in (5, 6)}
    assert first[5]["loss"] != first[6]["loss"]                                      # different samples
    found = json.loads((out / "results.json").read_text())
    assert found["seeds"] == {"base": 1, "sd": 2, "clip": 2}
    per_seed = found["seeded_items"]["clip"]
    mean = 100 * np.mean([np.mean(list(seed["tiny_a"].values())) for seed in per_seed])
    assert found["scores"]["clip"]["tiny_a"] == pytest.approx(mean)
    test = found["paired"]["clip"]["sd"]["Overall"]
    assert test["seeds"] == 2 and test["test"].startswith("crossed")
    assert test["ci95"][0] <= test["difference"] <= test["ci95"][1]
    assert "Mean over 2 seeds" in (out / "table.md").read_text()


def test_compare_shows_the_seeds_of_one_configuration_as_one_row(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from unisd.cli import main

    rng = np.random.default_rng(3)
    docs = [str(d) for d in range(40)]
    runs = {"base": 0.3, "sd-s1": 0.4, "sd-s2": 0.5, "st-s1": 0.6, "st-s2": 0.55}
    items = {r: {"t": {d: float(rng.random() < p) for d in docs}} for r, p in runs.items()}
    result = {"tasks": ["t"], "items": items,
              "scores": {r: {"t": 100.0 * float(np.mean(list(v["t"].values())))} for r, v in items.items()}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    out = tmp_path / "cmp"
    shown = CliRunner().invoke(main, ["compare", str(path), "--seeds", "sd=sd-s1,sd-s2", "--seeds", "star=st-s1,st-s2",
                                      "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    rows = [line.split("|")[1].strip() for line in shown.output.splitlines() if line.startswith("| ")]
    assert {"base", "sd", "star"} <= set(rows) and not {"sd-s1", "st-s2"} & set(rows)
    expected = estimate(combine({"star": [np.array([[items[r]["t"][d] for d in docs] for r in ("st-s1", "st-s2")])],
                                 "base": [np.array([[items["base"]["t"][d] for d in docs]])]}, {"star": 1.0, "base": -1.0}))
    assert f"{100 * expected.mean:+.1f}" in shown.output
    assert "star = mean of st-s1, st-s2" in shown.output
    bad = CliRunner().invoke(main, ["compare", str(path), "--seeds", "sd=sd-s1,nope", "--out", str(out)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "nope" in bad.output
