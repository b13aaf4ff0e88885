"""Scores of a configuration trained with several seeds: intervals that count both seeds and items.

Reproductions of SDFT and OPSD differ from their papers by 1-4 points and vary a lot from seed to seed, so
an interval over evaluation items alone (`unisd.stats`) understates what a rerun would show. With S seeds
scored on the same I items, each score is x[s, i] = μ + a_s + b_i + e_si: a seed effect a (σ_a²), an item
effect b shared by every seed (σ_b²), and their interaction e. The grand mean m then has

    Var(m) = σ_a²/S + σ_b²/I + σ_e²/(S·I),

estimated without bias by the two-way crossed design's mean squares:
    var_s(x̄_s)/S                     for σ_a²/S + σ_e²/(S·I)   (the seed means' spread; item effects cancel)
    (MS_items − MS_residual)/(S·I)   for σ_b²/I                 (clamped at 0)
and the interval is m ± t·√Var with Satterthwaite's degrees of freedom, so a few seeds give a wide
interval rather than an overconfident one. Several tasks (an Overall, the mean of the task means) add
their item terms with weight 1/T² and share the seed term (a seed's model is the same on every task).
A difference of two configurations, or any fixed combination (a gain, an interaction), is the same
estimate applied to the combination of their scores, seed k of one paired with seed k of the other (the
same data order). `tests/test_seeds.py` checks the coverage on simulated scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from unisd.stats import LEVEL


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds and items with its interval; `p_value` tests mean = 0 (for differences)."""

    mean: float
    ci95: tuple[float, float]
    df: float
    p_value: float
    seeds: int


def _item_term(x: np.ndarray) -> tuple[float, float]:
    """(σ_b²/I estimate, its degrees of freedom) of one task's [S, I] scores."""
    seeds, items = x.shape
    if items < 2:
        return 0.0, 1.0
    grand = x.mean()
    ms_items = seeds * ((x.mean(0) - grand) ** 2).sum() / (items - 1)
    if seeds == 1:
        return ms_items / items, items - 1.0
    residual = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand
    ms_residual = (residual ** 2).sum() / ((seeds - 1) * (items - 1))
    return max(ms_items - ms_residual, 0.0) / (seeds * items), items - 1.0


def estimate(tasks: Sequence[np.ndarray]) -> Estimate:
    """The mean of the task means of [S, I_t] score arrays (the same S seeds, in the same order), and its interval."""
    arrays = [np.asarray(x, dtype=float) for x in tasks]
    S = arrays[0].shape[0] if arrays else 0
    if not S or any(x.ndim != 2 or x.shape[0] != S or x.shape[1] == 0 for x in arrays):
        raise ValueError("estimate needs one [seeds, items] array per task, every one with the same seeds")
    T = len(arrays)
    per_seed = np.mean([x.mean(1) for x in arrays], axis=0)          # each seed's Overall
    mean = float(per_seed.mean())
    seed_term = float(per_seed.var(ddof=1) / S) if S > 1 else 0.0
    items = [_item_term(x) for x in arrays]
    item_term = sum(v for v, _ in items) / T ** 2
    item_df = sum(df for _, df in items)
    variance = seed_term + item_term
    if variance <= 0:
        return Estimate(mean, (mean, mean), float("inf"), 1.0 if mean == 0 else 0.0, S)
    parts = (seed_term ** 2 / (S - 1) if S > 1 else 0.0) + item_term ** 2 / item_df
    df = variance ** 2 / parts if parts > 0 else float("inf")
    half = float(sps.t.ppf(0.5 + LEVEL / 2, df)) * variance ** 0.5
    p = float(2 * sps.t.sf(abs(mean) / variance ** 0.5, df))
    return Estimate(mean, (mean - half, mean + half), float(df), p, S)


def combine(arrays: Mapping[str, list[np.ndarray]], coefficients: Mapping[str, float]) -> list[np.ndarray]:
    """Σ coef·scores per task, seed by seed; a run with one seed (the untrained base) is the same for every seed."""
    S = max(arrays[r][0].shape[0] for r in coefficients)
    tasks = len(next(iter(arrays.values())))
    return [np.sum([c * np.broadcast_to(arrays[r][t], (S, arrays[r][t].shape[1])) for r, c in coefficients.items()],
                   axis=0) for t in range(tasks)]


PerItem = Mapping[str, Mapping[str, float]]  # task -> doc -> score (0-1) of one trained model


class Seeded:
    """Several runs' per-item scores, each run over its seeds, aligned on the documents every one of them scored."""

    def __init__(self, seeded: Mapping[str, Sequence[PerItem]]) -> None:
        tasks = list(dict.fromkeys(t for runs in seeded.values() for seed in runs for t in seed))
        self.docs = {t: self._common(seeded, t) for t in tasks}
        self.tasks = [t for t in tasks if self.docs[t]]
        self.arrays = {run: [np.array([[seed[t][d] for d in self.docs[t]] for seed in per_seed]) for t in self.tasks]
                       for run, per_seed in seeded.items()}

    @staticmethod
    def _common(seeded: Mapping[str, Sequence[PerItem]], task: str) -> list[str]:
        found = [seed.get(task, {}) for runs in seeded.values() for seed in runs]
        first = next((list(f) for f in found if f), [])
        return [d for d in first if all(d in f for f in found)]

    def estimate(self, coefficients: Mapping[str, float], task: str | None = None) -> Estimate:
        """Σ coef·run's score (one run: its score; run minus reference: their difference), on one task or Overall."""
        combined = combine(self.arrays, coefficients)
        return estimate(combined if task is None else [combined[self.tasks.index(task)]])

    def intervals(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """ci95 (run -> task -> [low, high]), overall_ci95 and paired (run -> reference -> task or Overall ->
        difference, ci95, p_value, n, test, seeds), in points, as `unisd.evaluate.add_uncertainty` reports them."""
        points = lambda e: [100.0 * e.ci95[0], 100.0 * e.ci95[1]]  # noqa: E731
        ci95 = {run: {t: points(self.estimate({run: 1.0}, t)) for t in self.tasks} for run in self.arrays}
        overall = {run: points(self.estimate({run: 1.0})) for run in self.arrays}
        paired: dict[str, dict[str, dict[str, Any]]] = {}
        for run, reference in pairs:
            tests = {t: self.estimate({run: 1.0, reference: -1.0}, t) for t in [*self.tasks, None]}
            paired.setdefault(run, {})[reference] = {
                t or "Overall": {"difference": 100.0 * e.mean, "ci95": points(e), "p_value": e.p_value,
                                 "n": len(self.docs[t]) if t else sum(len(self.docs[x]) for x in self.tasks),
                                 "test": "crossed seeds x items, Satterthwaite t", "seeds": e.seeds}
                for t, e in tests.items()}
        return {"ci95": ci95, "overall_ci95": overall, "paired": paired,
                "seeds": {run: a[0].shape[0] for run, a in self.arrays.items()}}
