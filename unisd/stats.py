"""Uncertainty of scores measured on a few hundred items: intervals, paired tests, collapse checks.

The paper's differences are a few points on test sets of 68 to a few hundred items, so every score
unisd reports carries a 95% interval and every comparison a paired test over the same items:

- a score whose per-item values are all 0 or 1 (accuracy, pass@1, full_acc) is a proportion and gets
  the exact Clopper-Pearson interval; any other mean gets a percentile bootstrap over items;
- two runs scored on the same items are compared by the mean per-item difference, its paired bootstrap
  interval, and an exact McNemar test (0/1 scores, the interval then widened to cover the test's own exact
  interval, so that it excludes 0 only when p < 0.05) or a sign-flip permutation test (others);
- a pooled perplexity exp(-Σ log p / Σ tokens) gets a bootstrap over documents.

Every bootstrap is seeded (SEED), so a rerun prints the same interval.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
RESAMPLES = 2000
PERMUTATIONS = 9999  # exact (all sign flips) up to 13 items, Monte Carlo above
SEED = 1234
COLLAPSE_SHARE = 0.9   # one option (or one identical output) in at least this share of answers ...
COLLAPSE_MIN_ITEMS = 10  # ... of at least this many items: the checkpoint's answers have collapsed


def _binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def _percentile(draws: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return float(low), float(high)


def resample(n: int, rng: np.random.Generator, resamples: int = RESAMPLES) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement: one bootstrap replicate per row."""
    return rng.integers(0, n, size=(resamples, n))


def proportion_ci(successes: int, n: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion, as fractions."""
    ci = sps.binomtest(successes, n).proportion_ci(confidence_level=LEVEL, method="exact")
    return float(ci.low), float(ci.high)


def mean_ci(values: Sequence[float] | np.ndarray, seed: int = SEED) -> tuple[float, float]:
    """Interval of the mean of per-item scores: exact for 0/1 scores, bootstrap otherwise."""
    x = np.asarray(values, dtype=float)
    if _binary(x):
        return proportion_ci(int(x.sum()), len(x))
    return _percentile(x[resample(len(x), np.random.default_rng(seed))].mean(axis=1))


def pooled_perplexity(logp: Sequence[float], tokens: Sequence[int]) -> float:
    """exp(-Σ log p / Σ tokens) over documents (each given by its summed log-probability and length)."""
    total = float(np.sum(tokens))
    return float(np.exp(-np.sum(logp) / total)) if total else float("nan")


def perplexity_ci(logp: Sequence[float], tokens: Sequence[int], seed: int = SEED) -> tuple[float, float]:
    """Bootstrap over documents of the pooled perplexity."""
    lp, tk = np.asarray(logp, dtype=float), np.asarray(tokens, dtype=float)
    if not len(lp) or not tk.sum():
        return float("nan"), float("nan")
    idx = resample(len(lp), np.random.default_rng(seed))
    return _percentile(np.exp(-lp[idx].sum(axis=1) / np.maximum(tk[idx].sum(axis=1), 1.0)))


@dataclass(frozen=True)
class Paired:
    """run minus reference over the same items: mean difference, its interval, a two-sided p-value."""

    difference: float
    ci95: tuple[float, float]
    p_value: float
    n: int
    test: str  # which test gave p_value: "exact McNemar" or "sign-flip permutation"

    def as_json(self, scale: float = 1.0) -> dict[str, object]:
        return {"difference": scale * self.difference, "ci95": [scale * self.ci95[0], scale * self.ci95[1]],
                "p_value": self.p_value, "n": self.n, "test": self.test}


def paired(run: Sequence[float], reference: Sequence[float], seed: int = SEED) -> Paired:
    """Paired comparison of two runs' per-item scores on the same items (same order)."""
    a, b = np.asarray(run, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired test needs two equal, non-empty score lists (got {len(a)} and {len(b)})")
    d = a - b
    rng = np.random.default_rng(seed)
    ci = _percentile(d[resample(len(d), rng)].mean(axis=1))
    if _binary(a) and _binary(b):
        wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        exact = mcnemar(wins, losses, len(d))
        # the wider of the two: the bootstrap also varies the number of discordant items, the exact one
        # never excludes 0 when the test does not reject
        hull = (min(ci[0], exact.ci95[0]), max(ci[1], exact.ci95[1]))
        return Paired(exact.difference, hull, exact.p_value, exact.n, exact.test)
    if not d.any():
        return Paired(0.0, ci, 1.0, len(d), "sign-flip permutation")
    result = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=PERMUTATIONS,
                                  vectorized=True, rng=rng)
    return Paired(float(d.mean()), ci, float(result.pvalue), len(d), "sign-flip permutation")


def mcnemar(wins: int, losses: int, n: int) -> Paired:
    """0/1 scores on n items, `wins` right only in the run, `losses` only in the reference.

    Given the m = wins + losses discordant items, wins ~ Binomial(m, q) and the difference is m(2q - 1)/n;
    the exact McNemar test asks whether q = 1/2, and the interval maps q's Clopper-Pearson interval through
    m(2q - 1)/n. So this interval excludes 0 exactly when p < 0.05 (a bootstrap interval of the difference
    can exclude 0 at p = 0.125 when the discordant items are few). It takes the discordant share m/n as
    observed, so alone it is too narrow on the far side; `paired` reports its hull with the bootstrap.
    """
    m = wins + losses
    if not m:
        return Paired(0.0, (0.0, 0.0), 1.0, n, "exact McNemar")
    low, high = proportion_ci(wins, m)
    p = float(sps.binomtest(wins, m).pvalue)
    return Paired((wins - losses) / n, (m * (2 * low - 1) / n, m * (2 * high - 1) / n), p, n, "exact McNemar")


def bootstrap_intervals(statistic: Callable[[Any], Mapping[str, float]],
                        sizes: Mapping[Any, int], seed: int = SEED) -> dict[str, tuple[float, float]]:
    """Percentile intervals of several statistics of item groups, resampled jointly.

    sizes: number of items per group (a task); each replicate draws every group's items with
    replacement, the same draw for every run, and passes {group: indices} to `statistic`, so
    statistics that compare runs (gains, interactions) stay paired.
    """
    rng = np.random.default_rng(seed)
    draws = {g: resample(n, rng) for g, n in sizes.items()}
    rows = [statistic({g: d[i] for g, d in draws.items()}) for i in range(RESAMPLES)]
    keys = rows[0].keys() if rows else []
    return {k: _percentile(np.array([r[k] for r in rows])) for k in keys}


def most_frequent(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(most frequent answer, its share of all items); an unparsed answer (None) is no option."""
    counts = Counter(a for a in answers if a is not None)
    if not counts or not answers:
        return None, 0.0
    top, count = counts.most_common(1)[0]
    return top, count / len(answers)


def constant_answer_baseline(golds: Sequence[str]) -> tuple[str, float]:
    """(option, score) of the best constant answer: always giving the most frequent gold option."""
    top, count = Counter(golds).most_common(1)[0]
    return top, count / len(golds)


def collapsed(share: float, n: int) -> bool:
    """One answer in >= COLLAPSE_SHARE of >= COLLAPSE_MIN_ITEMS items."""
    return n >= COLLAPSE_MIN_ITEMS and share >= COLLAPSE_SHARE
