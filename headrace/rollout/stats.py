"""Beta-Binomial statistics on the click-through rate of two arms (numpy only).

Model: each arm's CTR ``p`` has the prior Beta(``prior_alpha``, ``prior_beta``), by
default **Beta(1, 1)** (uniform; at the counts a rollout judges — thousands of clicks —
any weak prior gives the same decisions), and after ``clicks`` clicks in
``impressions`` impressions the posterior Beta(α + clicks, β + impressions − clicks).
The arms are independent; the challenger's relative lift is ``R − 1`` with
``R = p_challenger / p_champion``.

Methods (scipy is not a dependency, so nothing here needs it):

* :func:`p_better_exact` — P(p_challenger > p_champion) by the exact finite sum for an
  integer posterior α (Evan Miller's formula), in log space; O(min(clicks)) terms.
* :func:`prob_log_ratio_above` / :func:`prob_log_ratio_below` — P(ln R > t) for any
  threshold, vectorized over arrays of counts: the *exact* first four cumulants of
  ``ln R`` (ψ, ψ′, ψ″, ψ‴ of the posterior parameters) in the Edgeworth expansion to
  O(1/n). Against the exact sum its error is below 1e-4 from 20 clicks per arm and
  below 1e-7 from 1,000 (tests/unit/test_rollout_stats.py); a plain normal on ``ln R``
  (what the normal approximation of the log-ratio gives) is off by ~1e-4 even at 12,000
  clicks, because ln p is skewed (−1/√clicks).
* :func:`expected_lift` — E[R] − 1, exact: E[p₂]·E[1/p₁] − 1.
* :func:`expected_loss` and :func:`lift_interval` — on the log-normal with those exact
  cumulants (Cornish–Fisher for the interval); a Monte Carlo of 1e6 draws agrees to
  1e-3 relative at the tested counts.

Everything takes counts as scalars or numpy arrays (broadcast together) and returns
float64 arrays; the gates call them on scalars, the benchmark on arrays of schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "PRIOR_ALPHA",
    "PRIOR_BETA",
    "FloatArray",
    "digamma",
    "trigamma",
    "tetragamma",
    "pentagamma",
    "norm_cdf",
    "log_ratio_cumulants",
    "prob_log_ratio_above",
    "prob_log_ratio_below",
    "p_better_exact",
    "expected_lift",
    "expected_loss",
    "lift_interval",
    "Comparison",
    "compare",
]

PRIOR_ALPHA = 1.0
PRIOR_BETA = 1.0

FloatArray = npt.NDArray[np.float64]

_SHIFT = 10.0  # the asymptotic series below are accurate to ~1e-14 from x = 10 on
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _arr(x: npt.ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def _polygammas(x: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """ψ, ψ′, ψ″ and ψ‴ of ``x > 0``: recurrence up to x ≥ 10, then the asymptotic
    series (Bernoulli numbers up to B₁₂)."""
    x = _arr(x).copy()
    if np.any(~(x > 0)):
        raise ValueError("polygamma arguments must be positive")
    d0, d1, d2, d3 = (np.zeros_like(x) for _ in range(4))
    for _ in range(int(_SHIFT)):
        small = x < _SHIFT
        if not small.any():
            break
        r = np.where(small, 1.0 / np.where(small, x, 1.0), 0.0)
        d0 -= r
        d1 += r**2
        d2 -= 2.0 * r**3
        d3 += 6.0 * r**4
        x = np.where(small, x + 1.0, x)
    r = 1.0 / x
    r2 = r * r
    psi = np.log(x) - 0.5 * r - r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (
        1 / 240 - r2 * (1 / 132)))))
    psi1 = r + 0.5 * r2 + r * r2 * (1 / 6 - r2 * (1 / 30 - r2 * (1 / 42 - r2 * (
        1 / 30 - r2 * (5 / 66)))))
    psi2 = -r2 - r * r2 - r2 * r2 * (0.5 - r2 * (1 / 6 - r2 * (1 / 6 - r2 * (
        3 / 10 - r2 * (5 / 6)))))
    psi3 = 2.0 * r * r2 + 3.0 * r2 * r2 + r * r2 * r2 * (2.0 - r2 * (1.0 - r2 * (
        4 / 3 - r2 * (3.0 - r2 * 10.0))))
    return psi + d0, psi1 + d1, psi2 + d2, psi3 + d3


def digamma(x: npt.ArrayLike) -> FloatArray:
    """ψ(x) for x > 0 (absolute error < 1e-12)."""
    return _polygammas(x)[0]


def trigamma(x: npt.ArrayLike) -> FloatArray:
    """ψ′(x) for x > 0 (relative error < 1e-12)."""
    return _polygammas(x)[1]


def tetragamma(x: npt.ArrayLike) -> FloatArray:
    """ψ″(x) for x > 0 (relative error < 1e-12)."""
    return _polygammas(x)[2]


def pentagamma(x: npt.ArrayLike) -> FloatArray:
    """ψ‴(x) for x > 0 (relative error < 1e-12)."""
    return _polygammas(x)[3]


def norm_cdf(x: npt.ArrayLike) -> FloatArray:
    """Standard normal CDF Φ(x), elementwise (``math.erfc``: full double precision)."""
    return np.asarray(_erfc(-_arr(x) / math.sqrt(2.0)), dtype=np.float64) * 0.5


def _posterior(clicks: npt.ArrayLike, impressions: npt.ArrayLike, prior: tuple[float, float]
               ) -> tuple[FloatArray, FloatArray]:
    c, n = _arr(clicks), _arr(impressions)
    if np.any(c < 0) or np.any(n < c):
        raise ValueError("need 0 <= clicks <= impressions")
    return prior[0] + c, prior[1] + n - c


def log_ratio_cumulants(
    champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
    challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
    prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA),
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """The exact first four cumulants of ``ln R`` under the posteriors.

    For X ~ Beta(a, b), the n-th cumulant of ln X is ψ⁽ⁿ⁻¹⁾(a) − ψ⁽ⁿ⁻¹⁾(a + b); the
    champion's odd cumulants enter with a minus sign (ln R = ln p₂ − ln p₁).
    """
    a1, b1 = _posterior(champion_clicks, champion_impressions, prior)
    a2, b2 = _posterior(challenger_clicks, challenger_impressions, prior)
    g1a, g1ab, g2a, g2ab = (_polygammas(v) for v in (a1, a1 + b1, a2, a2 + b2))
    k1, k2, k3, k4 = ((g2a[n] - g2ab[n]) + (-1) ** (n + 1) * (g1a[n] - g1ab[n])
                      for n in range(4))
    return k1, k2, k3, k4


def _edgeworth_cdf(t: npt.ArrayLike, k1: FloatArray, k2: FloatArray, k3: FloatArray,
                   k4: FloatArray) -> FloatArray:
    """P(ln R < t) by the Edgeworth expansion to O(1/n) (skewness, kurtosis terms)."""
    sd = np.sqrt(k2)
    z = (_arr(t) - k1) / sd
    g1 = k3 / sd**3
    g2 = k4 / k2**2
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    z2 = z * z
    correction = (g1 / 6.0 * (z2 - 1.0) + g2 / 24.0 * z * (z2 - 3.0)
                  + g1 * g1 / 72.0 * z * (z2 * z2 - 10.0 * z2 + 15.0))
    return np.clip(norm_cdf(z) - pdf * correction, 0.0, 1.0)


def prob_log_ratio_above(
    threshold: npt.ArrayLike,
    champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
    challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
    prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA),
) -> FloatArray:
    """P(ln(p_challenger / p_champion) > ``threshold``), elementwise.

    ``threshold = 0`` is P(challenger better); ``math.log1p(0.01)`` is P(lift > 1 %).
    Edgeworth expansion on the exact cumulants (module docstring for its error).
    """
    k = log_ratio_cumulants(champion_clicks, champion_impressions, challenger_clicks,
                            challenger_impressions, prior)
    return 1.0 - _edgeworth_cdf(threshold, *k)


def prob_log_ratio_below(
    threshold: npt.ArrayLike,
    champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
    challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
    prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA),
) -> FloatArray:
    """P(ln(p_challenger / p_champion) < ``threshold``): ``math.log(0.95)`` is the
    probability that the challenger's CTR is more than 5 % below the champion's."""
    k = log_ratio_cumulants(champion_clicks, champion_impressions, challenger_clicks,
                            challenger_impressions, prior)
    return _edgeworth_cdf(threshold, *k)


def p_better_exact(champion_clicks: int, champion_impressions: int, challenger_clicks: int,
                   challenger_impressions: int, prior: tuple[float, float] = (1, 1)) -> float:
    """P(p_challenger > p_champion) exactly (to float rounding), for an integer prior α.

    With p₁ ~ Beta(a₁, b₁), p₂ ~ Beta(a₂, b₂) and integer a₂:
    P(p₂ > p₁) = Σ_{i<a₂} B(a₁+i, b₁+b₂) / ((b₂+i) B(1+i, b₂) B(a₁, b₁)). Successive
    terms have the ratio (a₁+i)(b₂+i) / ((i+1)(a₁+b₁+b₂+i)), so the sum is one cumulative
    sum of logs; all terms are positive (no cancellation). The sum runs over the arm with
    fewer clicks (P(p₂ > p₁) = 1 − P(p₁ > p₂)).

    Raises:
        ValueError: a non-integer or non-positive prior α, or counts out of range.
    """
    if prior[0] != int(prior[0]) or prior[0] < 1:
        raise ValueError("the exact sum needs a positive integer prior alpha")
    a1, b1 = (float(v) for v in _posterior(champion_clicks, champion_impressions, prior))
    a2, b2 = (float(v) for v in _posterior(challenger_clicks, challenger_impressions, prior))
    if a2 > a1:
        return 1.0 - _exact_sum(a2, b2, a1, b1)
    return _exact_sum(a1, b1, a2, b2)


def _exact_sum(a1: float, b1: float, a2: float, b2: float) -> float:
    log_t0 = (math.lgamma(b1 + b2) + math.lgamma(a1 + b1) - math.lgamma(a1 + b1 + b2)
              - math.lgamma(b1))
    i = np.arange(int(a2) - 1, dtype=np.float64)
    steps = np.log(a1 + i) + np.log(b2 + i) - np.log(i + 1.0) - np.log(a1 + b1 + b2 + i)
    logs = log_t0 + np.concatenate(([0.0], np.cumsum(steps)))
    top = float(logs.max())
    return float(min(1.0, math.exp(top) * float(np.exp(logs - top).sum())))


def expected_lift(champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
                  challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
                  prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA)) -> FloatArray:
    """E[p₂/p₁] − 1 = a₂/(a₂+b₂) · (a₁+b₁−1)/(a₁−1) − 1, exact (needs a₁ > 1)."""
    a1, b1 = _posterior(champion_clicks, champion_impressions, prior)
    a2, b2 = _posterior(challenger_clicks, challenger_impressions, prior)
    with np.errstate(divide="ignore"):
        return np.where(a1 > 1.0, a2 / (a2 + b2) * (a1 + b1 - 1.0) / (a1 - 1.0) - 1.0,
                        np.inf)


def expected_loss(champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
                  challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
                  prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA)
                  ) -> tuple[FloatArray, FloatArray]:
    """Expected relative CTR loss (fraction of the champion's CTR) of each choice.

    Returns ``(E[max(0, 1 − R)], E[max(0, R − 1)])``: what choosing the challenger
    costs if it is worse, and what keeping the champion costs if the challenger is
    better; ln R is taken normal with its exact mean and variance.
    """
    k1, k2, _, _ = log_ratio_cumulants(champion_clicks, champion_impressions,
                                       challenger_clicks, challenger_impressions, prior)
    sd = np.sqrt(k2)
    er = np.exp(k1 + k2 / 2.0)
    loss_challenger = norm_cdf(-k1 / sd) - er * norm_cdf(-k1 / sd - sd)
    loss_champion = er * norm_cdf(k1 / sd + sd) - norm_cdf(k1 / sd)
    return np.maximum(loss_challenger, 0.0), np.maximum(loss_champion, 0.0)


def lift_interval(champion_clicks: npt.ArrayLike, champion_impressions: npt.ArrayLike,
                  challenger_clicks: npt.ArrayLike, challenger_impressions: npt.ArrayLike,
                  level: float = 0.95,
                  prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA)
                  ) -> tuple[FloatArray, FloatArray]:
    """The equal-tailed ``level`` credible interval of the relative lift R − 1."""
    k1, k2, k3, _ = log_ratio_cumulants(champion_clicks, champion_impressions,
                                        challenger_clicks, challenger_impressions, prior)
    sd = np.sqrt(k2)
    skew = k3 / sd**3
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    bounds = []
    for zz in (-z, z):  # Cornish–Fisher: the quantile of a slightly skewed ln R
        bounds.append(np.expm1(k1 + sd * (zz + skew / 6.0 * (zz * zz - 1.0))))
    return bounds[0], bounds[1]


@dataclass(frozen=True)
class Comparison:
    """The posterior comparison of two arms' CTR, as the gates log it (JSON-able)."""

    champion_ctr: float
    challenger_ctr: float
    p_better: float
    p_worse: float
    expected_lift: float
    lift_low: float
    lift_high: float
    loss_challenger: float
    loss_champion: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain floats."""
        return {k: float(v) for k, v in self.__dict__.items()}


def compare(champion_clicks: int, champion_impressions: int, challenger_clicks: int,
            challenger_impressions: int, prior: tuple[float, float] = (PRIOR_ALPHA, PRIOR_BETA),
            level: float = 0.95) -> Comparison:
    """Every figure of one comparison; P(better) by the exact sum when the prior α is an
    integer, by the Edgeworth expansion otherwise."""
    args = (champion_clicks, champion_impressions, challenger_clicks, challenger_impressions)
    if prior[0] == int(prior[0]) and prior[0] >= 1:
        p_better = p_better_exact(*args, prior=prior)
    else:
        p_better = float(prob_log_ratio_above(0.0, *args, prior=prior))
    lo, hi = lift_interval(*args, level=level, prior=prior)
    loss2, loss1 = expected_loss(*args, prior=prior)
    a1, b1 = _posterior(champion_clicks, champion_impressions, prior)
    a2, b2 = _posterior(challenger_clicks, challenger_impressions, prior)
    return Comparison(
        champion_ctr=float(a1 / (a1 + b1)), challenger_ctr=float(a2 / (a2 + b2)),
        p_better=p_better, p_worse=1.0 - p_better,
        expected_lift=float(expected_lift(*args, prior=prior)),
        lift_low=float(lo), lift_high=float(hi),
        loss_challenger=float(loss2), loss_champion=float(loss1))
