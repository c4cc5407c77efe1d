"""headrace.monitor.stats: PSI and the binned KS against hand-computed values and
scipy's own two-sample KS on samples that sit on the bin grid."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy.stats import ks_2samp

from headrace.core.errors import InputError, MissingDependencyError
from headrace.monitor.stats import PSI_ALERT, PSI_EPSILON, PSI_WARN, ks_binned, psi


def test_thresholds() -> None:
    assert (PSI_WARN, PSI_ALERT, PSI_EPSILON) == (0.1, 0.25, 1e-4)


def test_psi_of_a_half_half_split_moved_to_a_quarter() -> None:
    # e = (0.5, 0.5), a = (0.25, 0.75):
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5)
    #   = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3 = 0.27465307...
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(3.0), abs=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.2746530721670274, abs=1e-12)
    # symmetric in its arguments (each term is (a-e)(ln a - ln e))
    assert psi([25, 75], [50, 50]) == pytest.approx(0.25 * math.log(3.0), abs=1e-12)


def test_psi_three_bins() -> None:
    # e = (0.2, 0.3, 0.5), a = (0.1, 0.3, 0.6):
    # -0.1 ln(0.5) + 0 + 0.1 ln(1.2) = 0.1 (ln 2 + ln 1.2) = 0.1 ln 2.4
    assert psi(np.array([20, 30, 50]), np.array([10, 30, 60])) == pytest.approx(
        0.1 * math.log(2.4), abs=1e-12)


def test_psi_floors_an_empty_bin_at_epsilon() -> None:
    # e = (1, 0 -> 1e-4), a = (0.5, 0.5):
    # (0.5 - 1) ln(0.5 / 1) + (0.5 - 1e-4) ln(0.5 / 1e-4) = 0.5 ln 2 + 0.4999 ln 5000
    #   = 0.346574 + 0.4999 * 8.517193 = 0.346574 + 4.257745
    want = 0.5 * math.log(2.0) + 0.4999 * math.log(5000.0)
    assert psi([100, 0], [50, 50]) == pytest.approx(want, abs=1e-12)
    assert psi([100, 0], [50, 50]) == pytest.approx(0.346574 + 4.257745, abs=2e-6)
    # both empty in the same bin: that bin contributes 0
    assert psi([100, 0, 0], [50, 50, 0]) == pytest.approx(want, abs=1e-12)


def test_psi_identical_shares_is_zero() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert psi([10, 20, 30], [20, 40, 60]) == pytest.approx(0.0, abs=1e-15)


def test_empty_totals_are_nan() -> None:
    assert math.isnan(psi([0, 0], [1, 2]))
    assert math.isnan(psi([1, 2], [0, 0]))
    d, p = ks_binned([0, 0, 0], [1, 2, 3])
    assert math.isnan(d) and math.isnan(p)


def _kolmogorov_sf(x: float) -> float:
    """P(K > x) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2), written out."""
    return 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, 101))


def test_ks_of_a_half_half_split_moved_to_a_quarter() -> None:
    # CDFs at the one interior edge: 50/100 = 0.5 vs 25/100 = 0.25; at the end both 1
    # D = 0.25; n_eff = 100*100/200 = 50; p = K_sf(sqrt(50) * 0.25) = K_sf(1.767767)
    d, p = ks_binned([50, 50], [25, 75])
    assert d == pytest.approx(0.25, abs=1e-15)
    assert p == pytest.approx(_kolmogorov_sf(math.sqrt(50.0) * 0.25), abs=1e-12)
    # x^2 = 50/16 = 3.125, so p = 2 (e^-6.25 - e^-25 + ...) = 2 * 0.00193045 = 0.0038609
    assert p == pytest.approx(2.0 * (math.exp(-6.25) - math.exp(-25.0)), abs=1e-15)
    assert p == pytest.approx(0.0038609, abs=1e-7)


def test_ks_unequal_totals() -> None:
    # e = 10,30,60 (n=100): F_e = .1, .4, 1;  a = 5,5,10 (m=20): F_a = .25, .5, 1
    # D = max(.15, .1, 0) = .15; n_eff = 100*20/120 = 16.666...
    d, p = ks_binned([10, 30, 60], [5, 5, 10])
    assert d == pytest.approx(0.15, abs=1e-15)
    assert p == pytest.approx(_kolmogorov_sf(math.sqrt(2000 / 120) * 0.15), abs=1e-12)


def test_ks_identical_is_zero_with_p_one() -> None:
    assert ks_binned([3, 4, 5], [6, 8, 10]) == (0.0, 1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ks_equals_scipy_on_grid_valued_samples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # integer values 0..7: one bin per value, so every value sits on a bin edge and the
    # binned KS is the exact two-sample KS
    x = rng.binomial(7, 0.45, size=900)
    y = rng.binomial(7, 0.5, size=1300)
    e = np.bincount(x, minlength=8)
    a = np.bincount(y, minlength=8)
    d, p = ks_binned(e, a)
    exact = ks_2samp(x, y)
    assert d == pytest.approx(exact.statistic, abs=1e-12)
    asymp = ks_2samp(x, y, method="asymp")
    # scipy's asymptotic two-sided p uses the finite-n Kolmogorov law at round(n_eff);
    # ours the limiting law: close, not equal
    assert p == pytest.approx(asymp.pvalue, rel=0.05, abs=1e-4)


@pytest.mark.parametrize(("e", "a"), [([1, 2], [1, 2, 3]), ([], []), ([1, -1], [1, 1]),
                                      ([1, float("nan")], [1, 1]), ([[1, 2]], [[1, 2]])])
def test_bad_histograms_are_one_sentence(e: list, a: list) -> None:
    with pytest.raises(InputError, match="histogram"):
        psi(e, a)
    with pytest.raises(InputError, match="histogram"):
        ks_binned(e, a)


def test_without_scipy_ks_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the import fails
    with pytest.raises(MissingDependencyError, match=r"headrace\[offline or stream\]"):
        ks_binned([1, 2], [2, 1])
    assert psi([1, 2], [2, 1]) > 0  # the PSI needs no scipy
