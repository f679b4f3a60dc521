"""eval.stats: intervals and p-values against hand-computed cases, and the bootstrap's coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import stats


def _summary(w, d, resamples=2000, seed=0):
    w, d = np.asarray(w, float), np.asarray(d, float)
    return stats.paired_summary(w, d, stats.bootstrap_indices(len(w), resamples, seed))


def test_all_wins():
    n = 10
    s = _summary([1.0] * n, [0.5] * n)
    # every resample of an all-win sample is all wins: the interval collapses on 1
    assert s["win_rate_ci"] == [1.0, 1.0]
    assert s["mean_diff"] == 0.5 and s["mean_diff_ci"] == [0.5, 0.5]
    # sign test: P(10 of 10 or 0 of 10 | fair) = 2 / 2**10
    assert s["sign_test_p"] == pytest.approx(2 / 1024)
    # signed-rank with 10 equal |d|: all ranks tie at 5.5, W- = 0; normal approximation:
    # var = n(n+1)(2n+1)/24 - (10^3 - 10)/48, z = (|55 - 27.5| - 0.5) / sqrt(var)
    var = 10 * 11 * 21 / 24 - (1000 - 10) / 48
    z = (27.5 - 0.5) / math.sqrt(var)
    assert s["wilcoxon_p"] == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert s["rank_biserial"] == 1.0 and s["effect_size_dz"] == math.inf


def test_half_wins():
    w = [1.0, 0.0] * 5
    d = [0.2, -0.2] * 5
    s = _summary(w, d)
    assert s["sign_test_p"] == 1.0  # 5 : 5 is the most even split
    assert s["wilcoxon_p"] == pytest.approx(1.0)  # W+ == W-: z clipped at 0 -> p = 1
    assert s["effect_size_dz"] == 0.0 and s["rank_biserial"] == 0.0
    lo, hi = s["win_rate_ci"]
    assert lo < 0.5 < hi
    # the percentile interval of a mean of 10 fair coins: about 0.5 +- 1.96 * sqrt(.25 / 10)
    assert lo == pytest.approx(0.2, abs=0.05) and hi == pytest.approx(0.8, abs=0.05)


def test_ties_are_dropped_from_both_tests():
    # 3 wins, 0 losses, 7 ties: the tests see only the 3 non-tied prompts
    w = [1.0, 1.0, 1.0] + [0.5] * 7
    d = [1.0, 2.0, 3.0] + [0.0] * 7
    s = _summary(w, d)
    assert s["sign_test_p"] == pytest.approx(2 / 8)
    # exact signed-rank on (1, 2, 3): W- = 0; P(W- = 0) = 1/8, two-sided 2/8
    assert s["wilcoxon_p"] == pytest.approx(0.25)
    assert s["n_prompts"] == 10


def test_sign_test_and_wilcoxon_hand_values():
    # P(X <= 2 | Bin(10, .5)) = (1 + 10 + 45) / 1024
    assert stats.sign_test(8, 2) == pytest.approx(2 * 56 / 1024)
    assert stats.sign_test(2, 8) == stats.sign_test(8, 2)
    assert stats.sign_test(0, 0) == 1.0
    # d = (1, -2, 3, 4): ranks 1..4, W- = 2; subsets of {1,2,3,4} with sum <= 2: {}, {1}, {2}
    r = stats.wilcoxon_signed_rank([1.0, -2.0, 3.0, 4.0])
    assert (r["w_plus"], r["w_minus"]) == (8.0, 2.0)
    assert r["p"] == pytest.approx(2 * 3 / 16)
    assert r["rank_biserial"] == pytest.approx((8 - 2) / 10)
    assert stats.effect_size_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)


def test_bootstrap_is_reproducible_and_the_seed_matters():
    rng = np.random.default_rng(3)
    w = rng.integers(0, 2, 40).astype(float)
    d = rng.normal(size=40)
    assert _summary(w, d, seed=1)["win_rate_ci"] == _summary(w, d, seed=1)["win_rate_ci"]
    assert _summary(w, d, seed=1)["mean_diff_ci"] != _summary(w, d, seed=2)["mean_diff_ci"]


def test_macro_micro_intervals_from_shared_draws():
    idx = stats.bootstrap_indices(4, 500, 0)
    w1, w2 = np.array([1.0, 1, 0, 0]), np.array([1.0, 1, 0, 0])
    r1 = stats.paired_summary(w1, w1 - 0.5, idx)["_win_replicates"]
    r2 = stats.paired_summary(w2, w2 - 0.5, idx)["_win_replicates"]
    both = stats.average_intervals({"a": r1, "b": r2}, {"a": 4, "b": 4})
    # identical metrics drawn with the same indices: the average's interval is the metric's
    assert both["macro_win_rate_a_ci"] == list(stats.percentile_interval(r1))
    assert both["micro_win_rate_a_ci"] == both["macro_win_rate_a_ci"]


def test_win_rate_interval_covers_the_true_rate_about_95_percent():
    # prompts whose outcome is a win with probability 0.65: the 95% interval of the win rate
    # over 100 prompts must contain 0.65 in about 95% of repeated experiments
    rng = np.random.default_rng(12345)
    true_p, n, experiments = 0.65, 100, 400
    idx = stats.bootstrap_indices(n, 1000, 0)
    hits = 0
    for _ in range(experiments):
        w = (rng.random(n) < true_p).astype(float)
        lo, hi = stats.percentile_interval(w[idx].mean(axis=1))
        hits += lo <= true_p <= hi
    coverage = hits / experiments
    # binomial sd of the coverage estimate at .95 over 400 draws is 0.011; the percentile
    # bootstrap of a proportion runs slightly below nominal at n = 100
    assert 0.91 <= coverage <= 0.98, coverage


def test_mean_difference_interval_covers_the_true_mean():
    rng = np.random.default_rng(7)
    n, experiments, true_mean = 60, 300, 0.3
    idx = stats.bootstrap_indices(n, 1000, 1)
    hits = 0
    for _ in range(experiments):
        d = true_mean + rng.normal(size=n)
        lo, hi = stats.percentile_interval(d[idx].mean(axis=1))
        hits += lo <= true_mean <= hi
    assert 0.90 <= hits / experiments <= 0.98


def test_pvalues_are_uniform_enough_under_the_null():
    # with no true difference the tests reject at 5% about 5% of the time (not far more)
    rng = np.random.default_rng(0)
    rejections_sign = rejections_wil = 0
    trials = 300
    for _ in range(trials):
        d = rng.normal(size=40)
        rejections_wil += stats.wilcoxon_signed_rank(d)["p"] < 0.05
        rejections_sign += stats.sign_test(int((d > 0).sum()), int((d < 0).sum())) < 0.05
    assert rejections_wil / trials <= 0.09 and rejections_sign / trials <= 0.09
    assert rejections_wil > 0  # and the test can reject at all
