"""Beta-Binomial statistics against hand-computed values, an independent exact formula,
Monte Carlo of 1e6 draws and a seeded A/A simulation with a known truth."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from headrace.rollout import stats


def _p_better_direct(c1: int, n1: int, c2: int, n2: int) -> float:
    """Evan Miller's sum, term by term with lgamma (no recurrence): the oracle."""
    a1, b1, a2, b2 = 1 + c1, 1 + n1 - c1, 1 + c2, 1 + n2 - c2

    def lbeta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return sum(math.exp(lbeta(a1 + i, b1 + b2) - math.log(b2 + i) - lbeta(1 + i, b2)
                        - lbeta(a1, b1)) for i in range(a2))


def test_p_better_hand_computed_small_posteriors() -> None:
    # no data: Beta(1,1) vs Beta(1,1) -> 1/2
    assert stats.p_better_exact(0, 0, 0, 0) == pytest.approx(0.5, abs=1e-15)
    # champion 1/1 clicked: Beta(2,1); challenger no data Beta(1,1): P(U > X), X ~ Beta(2,1)
    # = ∫ 2x (1 - x) dx = 1/3
    assert stats.p_better_exact(1, 1, 0, 0) == pytest.approx(1 / 3, abs=1e-15)
    # challenger Beta(2,1) vs champion Beta(1,2): P = 1 - ∫∫ ... = 5/6
    assert stats.p_better_exact(0, 1, 1, 1) == pytest.approx(5 / 6, abs=1e-14)


@pytest.mark.parametrize("counts", [(3, 10, 5, 12), (20, 2000, 25, 2100), (7, 50, 2, 40),
                                    (150, 9000, 130, 10000)])
def test_p_better_exact_matches_the_direct_sum(counts: tuple[int, int, int, int]) -> None:
    # the oracle's lgamma of ~1e4 carries ~1e-12 absolute error itself
    assert stats.p_better_exact(*counts) == pytest.approx(_p_better_direct(*counts),
                                                          abs=1e-10)


@pytest.mark.parametrize("counts", [(20, 2000, 25, 2100), (50, 5000, 60, 5000),
                                    (1000, 100_000, 1040, 100_000),
                                    (48_000, 4_800_000, 12_100, 1_200_000)])
def test_edgeworth_matches_exact_where_plain_normal_does_not(
        counts: tuple[int, int, int, int]) -> None:
    exact = stats.p_better_exact(*counts)
    approx = float(stats.prob_log_ratio_above(0.0, *counts))
    assert abs(approx - exact) < (1e-4 if counts[0] < 1000 else 1e-7)
    k1, k2, _, _ = stats.log_ratio_cumulants(*counts)
    plain = 1 - float(stats.norm_cdf(-k1 / np.sqrt(k2)))
    if counts[0] >= 1000:  # the skewness term the plain normal misses
        assert abs(plain - exact) > 10 * abs(approx - exact)


def test_polygammas_at_known_values() -> None:
    euler = 0.5772156649015329
    assert float(stats.digamma(1.0)) == pytest.approx(-euler, abs=1e-13)
    assert float(stats.digamma(0.5)) == pytest.approx(-euler - 2 * math.log(2), abs=1e-13)
    assert float(stats.trigamma(1.0)) == pytest.approx(math.pi**2 / 6, rel=1e-13)
    assert float(stats.tetragamma(1.0)) == pytest.approx(-2 * 1.2020569031595942, rel=1e-12)
    assert float(stats.pentagamma(1.0)) == pytest.approx(math.pi**4 / 15, rel=1e-12)
    x = np.array([3.7, 250.0, 1e6])  # recurrence: ψ(x+1) = ψ(x) + 1/x
    assert np.allclose(stats.digamma(x + 1) - stats.digamma(x), 1 / x, rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        stats.digamma(0.0)


def test_expected_lift_and_posterior_means_by_hand() -> None:
    # champion Beta(1+2, 1+8) = Beta(3, 9): E[1/p] = (3+9-1)/(3-1) = 5.5
    # challenger Beta(1+4, 1+6) = Beta(5, 7): E[p] = 5/12 -> E[R] - 1 = 5/12 * 11/2 - 1
    want = Fraction(5, 12) * Fraction(11, 2) - 1
    assert float(stats.expected_lift(2, 10, 4, 10)) == pytest.approx(float(want), abs=1e-15)
    comp = stats.compare(2, 10, 4, 10)
    assert comp.champion_ctr == pytest.approx(3 / 12) and comp.challenger_ctr == 5 / 12
    assert comp.p_better + comp.p_worse == pytest.approx(1.0)
    assert set(comp.to_dict()) >= {"p_better", "expected_lift", "lift_low", "loss_challenger"}


def test_loss_interval_and_tail_probability_against_monte_carlo() -> None:
    rng = np.random.default_rng(7)
    c1, n1, c2, n2 = 900, 100_000, 960, 100_000
    p1 = rng.beta(1 + c1, 1 + n1 - c1, 1_000_000)
    p2 = rng.beta(1 + c2, 1 + n2 - c2, 1_000_000)
    r = p2 / p1
    loss_chal, loss_champ = stats.expected_loss(c1, n1, c2, n2)
    assert float(loss_chal) == pytest.approx(np.maximum(1 - r, 0).mean(), rel=0.02)
    assert float(loss_champ) == pytest.approx(np.maximum(r - 1, 0).mean(), rel=0.01)
    lo, hi = stats.lift_interval(c1, n1, c2, n2, level=0.9)
    assert float(lo) == pytest.approx(np.quantile(r - 1, 0.05), abs=1e-3)
    assert float(hi) == pytest.approx(np.quantile(r - 1, 0.95), abs=1e-3)
    p_above = float(stats.prob_log_ratio_above(math.log1p(0.01), c1, n1, c2, n2))
    assert p_above == pytest.approx((r > 1.01).mean(), abs=2e-3)  # MC s.e. 5e-4
    p_below = float(stats.prob_log_ratio_below(math.log(0.95), c1, n1, c2, n2))
    assert p_below == pytest.approx((r < 0.95).mean(), abs=1e-3)


def test_vectorized_equals_elementwise() -> None:
    c1, n1 = np.array([100, 200, 5000]), np.array([10_000, 20_000, 400_000])
    c2, n2 = np.array([110, 190, 5100]), np.array([10_000, 20_000, 400_000])
    batch = stats.prob_log_ratio_above(0.0, c1, n1, c2, n2)
    one = [float(stats.prob_log_ratio_above(0.0, *t)) for t in zip(c1, n1, c2, n2, strict=True)]
    assert batch.shape == (3,) and np.allclose(batch, one, rtol=0, atol=1e-15)


def test_one_look_under_aa_fires_p_worse_about_ten_percent() -> None:
    """Known truth: under A/A the posterior P(worse) is ~uniform, so one look at
    P(worse) > 0.9 fires 10 % of the time (s.e. 0.3 % over 10,000 draws)."""
    rng = np.random.default_rng(2024)
    n = 200_000
    c1 = rng.binomial(n, 0.01, 10_000)
    c2 = rng.binomial(n, 0.01, 10_000)
    p_worse = 1 - stats.prob_log_ratio_above(0.0, c1, n, c2, n)
    assert abs((p_worse > 0.9).mean() - 0.10) < 0.012
    assert abs((p_worse > 0.5).mean() - 0.50) < 0.02


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        stats.prob_log_ratio_above(0.0, 5, 3, 1, 10)
    with pytest.raises(ValueError):
        stats.p_better_exact(1, 10, 1, 10, prior=(0.5, 0.5))
