"""Drift statistics over binned counts: the population stability index (PSI) and the
two-sample Kolmogorov–Smirnov statistic, pure numpy/scipy.

Both take two histograms over the same bins — ``expected`` (the model's training data,
:mod:`headrace.monitor.profile`) and ``actual`` (what is served) — as integer counts in
the same bin order; the samples themselves are never needed.

**PSI**: with each histogram normalised to shares and every share floored at
:data:`PSI_EPSILON` (the empty-bin rule: bin ``i``'s share is
``max(count_i / total, PSI_EPSILON)``, so an empty bin contributes a large but finite
term instead of ``inf``)::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

0 for identical distributions, never negative; by the usual reading < :data:`PSI_WARN`
(0.1) is stable, 0.1–0.25 a moderate shift, >= :data:`PSI_ALERT` (0.25) a major one.

**Binned KS**: ``D = max_j |F_e(j) - F_a(j)|`` over the bin boundaries, ``F`` being the
empirical CDFs at the right edge of each bin. It is the exact KS statistic of the two
samples restricted to those edges — equal to the continuous two-sample KS when every
value sits on a bin edge (discrete data on the grid), otherwise a lower bound of it
(the largest CDF gap may fall inside a bin). The p-value is the asymptotic one
(Kolmogorov distribution) with ``n_eff = n*m / (n+m)``:
``kstwobign.sf(sqrt(n_eff) * D)``; like any asymptotic p-value it is approximate for
small samples, and on a lower-bound ``D`` it is conservative (too large).

Both return NaN when either histogram is empty (a total of 0): there is nothing to
compare, which is not the same as "no drift".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from headrace.core.errors import InputError, missing_extra

__all__ = ["PSI_WARN", "PSI_ALERT", "PSI_EPSILON", "psi", "ks_binned", "average_ranks",
           "auc"]

#: PSI at or above which a feature has shifted moderately (a warning)
PSI_WARN: Final = 0.1
#: PSI at or above which a feature has shifted a lot (an alert)
PSI_ALERT: Final = 0.25
#: the floor of every bin's share in :func:`psi` (the empty-bin rule)
PSI_EPSILON: Final = 1e-4


def _kstwobign() -> Any:
    """scipy's limiting Kolmogorov distribution, or the "install the extra" error (scipy
    is imported on first use: :func:`psi` and the profile do not need it)."""
    try:
        from scipy.stats import distributions
    except ModuleNotFoundError as exc:
        raise missing_extra("scipy", "offline or stream") from exc
    return distributions.kstwobign


def _pair(expected: Sequence[int] | np.ndarray, actual: Sequence[int] | np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """The two histograms as float arrays, checked: same length >= 1, counts finite and
    >= 0."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.ndim != 1 or a.ndim != 1 or e.shape != a.shape or e.size == 0:
        raise InputError(f"histograms of {e.shape} and {a.shape} bins cannot be compared: "
                         "they need the same number of bins, at least one")
    if not (np.isfinite(e).all() and np.isfinite(a).all()) or (e < 0).any() or (a < 0).any():
        raise InputError("a histogram holds a negative or non-finite count")
    return e, a


def psi(expected: Sequence[int] | np.ndarray, actual: Sequence[int] | np.ndarray) -> float:
    """The population stability index of ``actual`` against ``expected``.

    Args:
        expected: the reference counts per bin (>= 0).
        actual: the observed counts over the same bins (>= 0).

    Returns:
        ``sum((a_i - e_i) * ln(a_i / e_i))`` over the bins' shares, each share floored
        at :data:`PSI_EPSILON`; >= 0 (0 when the shares are equal), unbounded above
        (at most about ``2 * ln(1 / PSI_EPSILON)`` ≈ 18.4 for disjoint supports). NaN
        when either total is 0.

    Raises:
        InputError: the histograms differ in length, are empty, or hold a negative or
            non-finite count.
    """
    e, a = _pair(expected, actual)
    te, ta = e.sum(), a.sum()
    if te == 0 or ta == 0:
        return math.nan
    es = np.maximum(e / te, PSI_EPSILON)
    as_ = np.maximum(a / ta, PSI_EPSILON)
    return float(np.sum((as_ - es) * np.log(as_ / es)))


def ks_binned(expected: Sequence[int] | np.ndarray, actual: Sequence[int] | np.ndarray
              ) -> tuple[float, float]:
    """The two-sample KS statistic over the bin edges and its asymptotic p-value.

    Args:
        expected: the reference counts per bin (>= 0), bins in ascending value order.
        actual: the observed counts over the same bins (>= 0).

    Returns:
        ``(D, p)``: ``D = max |F_e - F_a|`` at the bin boundaries, in [0, 1] (a lower
        bound of the continuous KS statistic, equal to it when the values sit on the
        edges), and ``p = kstwobign.sf(sqrt(n*m/(n+m)) * D)`` in [0, 1], ``n`` and
        ``m`` the two totals. ``(NaN, NaN)`` when either total is 0.

    Raises:
        InputError: the histograms differ in length, are empty, or hold a negative or
            non-finite count.
        MissingDependencyError: scipy is not installed (the ``offline`` or ``stream``
            extra).
    """
    e, a = _pair(expected, actual)
    n, m = e.sum(), a.sum()
    if n == 0 or m == 0:
        return math.nan, math.nan
    d = float(np.max(np.abs(np.cumsum(e) / n - np.cumsum(a) / m)))
    d = min(max(d, 0.0), 1.0)  # rounding of the cumulative sums
    n_eff = n * m / (n + m)
    p = float(_kstwobign().sf(math.sqrt(n_eff) * d))
    return d, min(max(p, 0.0), 1.0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` (float64) for the boolean mask ``positive``, ties counted
    half (Mann-Whitney U over average ranks): one implementation for training's metrics
    (:func:`offline.evaluation.auc`) and the monitor's rolling AUC.

    Returns:
        In [0, 1]; NaN when there is no positive or no negative.
    """
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
