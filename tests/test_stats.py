"""Interval and test math against closed forms (unisd.stats)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, norm

from unisd import stats


def test_clopper_pearson_is_the_beta_quantile_interval():
    # exact interval for k of n: [Beta(α/2; k, n-k+1), Beta(1-α/2; k+1, n-k)]
    assert stats.proportion_ci(7, 20) == pytest.approx((beta.ppf(0.025, 7, 14), beta.ppf(0.975, 8, 13)), abs=1e-9)
    assert stats.proportion_ci(7, 20) == pytest.approx((0.15391, 0.59219), abs=5e-5)
    low, high = stats.proportion_ci(0, 30)  # no success: low 0, high 1 - (α/2)^(1/n)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 30), abs=1e-9)


def test_mean_ci_is_exact_for_01_scores_and_bootstrap_otherwise():
    scores = [1.0] * 7 + [0.0] * 13
    assert stats.mean_ci(scores) == stats.proportion_ci(7, 20)
    # continuous: the bootstrap interval of the mean of a large normal sample is close to mean ± 1.96 s/√n
    x = np.random.default_rng(0).normal(5.0, 2.0, 4000)
    half = norm.ppf(0.975) * x.std(ddof=1) / math.sqrt(len(x))
    low, high = stats.mean_ci(x)
    assert low == pytest.approx(x.mean() - half, abs=0.01) and high == pytest.approx(x.mean() + half, abs=0.01)
    assert stats.mean_ci(x) == stats.mean_ci(x)  # seeded
    assert stats.mean_ci([0.5] * 10) == (0.5, 0.5)


def test_paired_on_identical_predictions_is_no_difference():
    same = [1, 0, 1, 1, 0, 0, 1, 0]
    test = stats.paired(same, same)
    assert (test.difference, test.ci95, test.p_value, test.n) == (0.0, (0.0, 0.0), 1.0, 8)
    cont = [0.2, 0.7, 0.5]
    assert (stats.paired(cont, cont).difference, stats.paired(cont, cont).p_value) == (0.0, 1.0)


def test_paired_01_scores_use_the_exact_mcnemar_test():
    # 9 items only the run gets right, 2 only the reference, 9 both, 10 neither
    run = [1] * 9 + [0] * 2 + [1] * 9 + [0] * 10
    ref = [0] * 9 + [1] * 2 + [1] * 9 + [0] * 10
    test = stats.paired(run, ref)
    assert test.difference == pytest.approx(7 / 30)
    assert test.p_value == pytest.approx(2 * sum(math.comb(11, k) for k in range(3)) / 2 ** 11)  # 0.0654
    assert test.test == "exact McNemar"
    assert test.ci95[0] <= 7 / 30 <= test.ci95[1]
    assert stats.paired(ref, run).difference == pytest.approx(-7 / 30)
    assert stats.paired(ref, run).p_value == pytest.approx(test.p_value)
    as_points = test.as_json(scale=100.0)
    assert as_points["difference"] == pytest.approx(700 / 30) and as_points["p_value"] == test.p_value


def test_paired_01_interval_is_the_exact_one_of_the_mcnemar_test():
    # 4 of 4 discordant items favour the run on 100: q's Clopper-Pearson interval is [0.025^(1/4), 1], so the
    # difference's is [4 (2 * 0.025^(1/4) - 1) / 100, 4 / 100], and it includes 0 as p = 2 / 2^4 = 0.125 says
    run, ref = [1] * 4 + [0] * 96, [0] * 100
    assert stats.mcnemar(4, 0, 100).ci95 == pytest.approx((4 * (2 * 0.025 ** 0.25 - 1) / 100, 0.04), abs=1e-9)
    test = stats.paired(run, ref)  # the bootstrap alone gives [0.01, 0.08], which excludes 0
    assert test.ci95 == pytest.approx((4 * (2 * 0.025 ** 0.25 - 1) / 100, 0.08), abs=1e-9)
    assert test.ci95[0] < 0 and test.p_value == pytest.approx(0.125)
    for wins in range(0, 31):  # the exact interval excludes 0 exactly when the test rejects at 5% ...
        for losses in range(0, 31 - wins):
            exact = stats.mcnemar(wins, losses, 200)
            assert (exact.ci95[0] > 0 or exact.ci95[1] < 0) == (exact.p_value < 0.05), (wins, losses)
            assert exact.ci95[0] <= exact.difference <= exact.ci95[1]
            rest = 200 - wins - losses - 20  # ... and the reported one covers it, so it excludes 0 only then
            test = stats.paired([1] * wins + [0] * losses + [1] * 20 + [0] * rest,
                                [0] * wins + [1] * losses + [1] * 20 + [0] * rest)
            assert test.ci95[0] <= exact.ci95[0] and test.ci95[1] >= exact.ci95[1]
            assert (test.difference, test.p_value) == (exact.difference, exact.p_value)


def test_paired_continuous_scores_use_a_sign_flip_permutation_test():
    # every one of 12 differences positive: the exact sign-flip p-value is 2 / 2^12
    run, ref = [1.5 + i for i in range(12)], [1.0 + i for i in range(12)]
    test = stats.paired(run, ref)
    assert test.difference == pytest.approx(0.5) and test.ci95 == pytest.approx((0.5, 0.5))
    assert test.p_value == pytest.approx(2 / 2 ** 12)
    with pytest.raises(ValueError, match="equal"):
        stats.paired([1, 0], [1])


def test_pooled_perplexity_and_its_bootstrap():
    logp, tokens = [-2.0, -6.0, -1.0], [2, 3, 1]
    assert stats.pooled_perplexity(logp, tokens) == pytest.approx(math.exp(9 / 6))
    low, high = stats.perplexity_ci(logp, tokens)
    per_doc = [math.exp(-lp / t) for lp, t in zip(logp, tokens)]
    assert min(per_doc) <= low <= math.exp(9 / 6) <= high <= max(per_doc)
    assert stats.perplexity_ci([-3.0] * 5, [3] * 5) == pytest.approx((math.e, math.e))


def test_joint_bootstrap_keeps_runs_paired():
    a = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    intervals = stats.bootstrap_intervals(lambda idx: {"a": a[idx["t"]].mean(), "same": (a - a)[idx["t"]].mean()},
                                          {"t": len(a)})
    assert intervals["same"] == (0.0, 0.0)
    assert 0.0 <= intervals["a"][0] < 0.6 < intervals["a"][1] <= 1.0


def test_collapse_on_a_constant_answer_prediction_set():
    golds = list("AABBCCCCDD") * 2                       # C is the most frequent gold option: 8 of 20
    assert stats.constant_answer_baseline(golds) == ("C", 0.4)
    constant = ["D"] * 19 + [None]
    top, share = stats.most_frequent(constant)
    assert (top, share) == ("D", 0.95) and stats.collapsed(share, len(constant))
    spread = list("ABCD") * 5
    assert stats.most_frequent(spread)[1] == 0.25 and not stats.collapsed(0.25, 20)
    assert not stats.collapsed(1.0, 3)  # three items cannot show a collapse
    assert stats.most_frequent([None, None]) == (None, 0.0)
