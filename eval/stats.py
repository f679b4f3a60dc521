"""How sure is a comparison: bootstrap intervals, paired tests and effect sizes over prompts.

The unit of every statistic here is the PROMPT: a comparison of two systems on the same prompts
is a paired design, and the prompts (not the images, not the seeds) are the sample drawn from the
population of prompts one cares about. With several seeds, each prompt's outcome is first pooled
over its seeds (:func:`per_prompt`), so seeds make each prompt's value less noisy but do not
pretend to be more prompts.

Per prompt ``i`` and metric, from the paired scores ``a_s, b_s`` of its seeds ``s``:

* ``w_i = mean_s( 1[a_s > b_s] + 0.5 * 1[a_s == b_s] )``: the prompt's win score of A (ties count
  half, as the official comparison); the win rate of A is ``mean_i w_i``;
* ``d_i = mean_s( a_s - b_s )``: the prompt's score difference; the mean difference is
  ``mean_i d_i``.

Reported for each (:func:`paired_summary`):

* 95% percentile-bootstrap intervals of the win rate and of the mean difference: ``resamples``
  draws of n prompts with replacement from a generator seeded with ``seed`` (the same draws for
  every metric, so macro / micro averages get intervals that respect the metrics' correlation);
* the two-sided exact sign test of the prompts A wins (``w_i > 1/2``) against those B wins
  (``w_i < 1/2``), tied prompts dropped;
* the two-sided Wilcoxon signed-rank test of ``d_i`` (zeros dropped, average ranks for ties;
  exact null distribution up to 50 non-zero differences, normal approximation with the tie
  correction and a continuity correction above);
* the effect size ``d_z = mean(d) / sd(d)`` (Cohen's d for paired samples) and the rank-biserial
  correlation ``(W+ - W-) / (W+ + W-)`` of the signed-rank test.

Only numpy and the standard library are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
LEVEL = 0.95
EXACT_WILCOXON_MAX_N = 50


def outcome(a: float, b: float, tie_credit: float = 0.5) -> float:
    """1 if A's score is strictly higher, ``tie_credit`` (1/2; 0 for the official
    ``--ties_as_loss_for_a``) on a tie, 0 otherwise."""
    return 1.0 if a > b else (tie_credit if a == b else 0.0)


def per_prompt(
    groups: Sequence[Sequence[tuple[float, float]]], tie_credit: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """``(w, d)``: per prompt the mean outcome and mean difference over its seeds' pairs."""
    w = np.array(
        [np.mean([outcome(a, b, tie_credit) for a, b in g]) for g in groups], dtype=np.float64
    )
    d = np.array([np.mean([a - b for a, b in g]) for g in groups], dtype=np.float64)
    return w, d


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` prompt indices drawn with replacement (fixed seed: reproducible)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap replicates (percentile method)."""
    if replicates.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return float(lo), float(hi)


def _binom_cdf_half(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2), exactly (integer arithmetic)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    total = sum(math.comb(m, i) for i in range(k + 1))
    return float(Fraction(total, 2**m))  # exact rational, no float overflow for large m


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: p of a split at least as uneven as ``wins : losses`` if both
    sides were equally likely (ties are dropped before)."""
    m = wins + losses
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_cdf_half(min(wins, losses), m))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_v = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_signed_rank(d: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired differences ``d`` (see module doc).

    Returns ``{"n": non-zero differences, "w_plus", "w_minus", "p", "rank_biserial"}``."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "w_minus": 0.0, "p": 1.0, "rank_biserial": 0.0}
    ranks = _ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    w_minus = float(ranks[d < 0].sum())
    total = n * (n + 1) / 2
    rb = (w_plus - w_minus) / total
    tied = len(np.unique(np.abs(d))) < n
    if n <= EXACT_WILCOXON_MAX_N and not tied:
        # exact null: every sign pattern equally likely; count subsets of {1..n} by rank sum
        counts = np.zeros(int(total) + 1, dtype=np.float64)
        counts[0] = 1.0
        for r in range(1, n + 1):
            counts[r:] = counts[r:] + counts[:-r].copy()
        probs = counts / 2.0**n
        k = int(round(min(w_plus, w_minus)))
        p = min(1.0, 2.0 * float(probs[: k + 1].sum()))
    else:
        mean = total / 2
        _, tie_counts = np.unique(np.abs(d), return_counts=True)
        var = n * (n + 1) * (2 * n + 1) / 24 - float((tie_counts**3 - tie_counts).sum()) / 48
        z = (abs(w_plus - mean) - 0.5) / math.sqrt(var) if var > 0 else 0.0
        p = min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    return {"n": n, "w_plus": w_plus, "w_minus": w_minus, "p": p, "rank_biserial": rb}


def effect_size_dz(d: Sequence[float]) -> float:
    """Cohen's d for paired samples: mean difference over the sample sd of the differences
    (nan with fewer than two prompts; +-inf when every difference is equal and non-zero)."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / sd


def paired_summary(w: np.ndarray, d: np.ndarray, idx: np.ndarray, level: float = LEVEL) -> dict:
    """Every statistic of one metric from its per-prompt ``w`` and ``d`` and the bootstrap
    indices ``idx`` [resamples, n]; also returns the replicates (key ``_win_replicates``)."""
    n = len(w)
    if n == 0:
        nan = math.nan
        return {
            "n_prompts": 0,
            "win_rate_ci": [nan, nan],
            "mean_diff": nan,
            "mean_diff_ci": [nan, nan],
            "sign_test_p": 1.0,
            "wilcoxon_p": 1.0,
            "effect_size_dz": nan,
            "rank_biserial": nan,
            "_win_replicates": np.empty(0),
        }
    win_reps = w[idx].mean(axis=1)
    diff_reps = d[idx].mean(axis=1)
    wil = wilcoxon_signed_rank(d)
    return {
        "n_prompts": n,
        "win_rate_ci": list(percentile_interval(win_reps, level)),
        "mean_diff": float(d.mean()),
        "mean_diff_ci": list(percentile_interval(diff_reps, level)),
        "sign_test_p": sign_test(int((w > 0.5).sum()), int((w < 0.5).sum())),
        "wilcoxon_p": wil["p"],
        "effect_size_dz": effect_size_dz(d),
        "rank_biserial": wil["rank_biserial"],
        "_win_replicates": win_reps,
    }


def average_intervals(
    replicates: dict[str, np.ndarray], weights: dict[str, int], level: float = LEVEL
) -> dict[str, list[float]]:
    """Intervals of the macro (unweighted) and micro (weighted by ``weights``, the pairs of each
    metric) averages of the per-metric win rates, from replicates drawn with the same indices."""
    rows = [m for m in replicates if replicates[m].size]
    if not rows:
        return {"macro_win_rate_a_ci": [math.nan] * 2, "micro_win_rate_a_ci": [math.nan] * 2}
    stack = np.stack([replicates[m] for m in rows])
    wts = np.array([weights[m] for m in rows], dtype=np.float64)
    macro = stack.mean(axis=0)
    micro = (stack * wts[:, None]).sum(axis=0) / wts.sum()
    return {
        "macro_win_rate_a_ci": list(percentile_interval(macro, level)),
        "micro_win_rate_a_ci": list(percentile_interval(micro, level)),
    }


def format_p(p: float) -> str:
    """A p-value for people: 3 significant digits, '<1e-4' below that."""
    if p != p:  # nan
        return "nan"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"
