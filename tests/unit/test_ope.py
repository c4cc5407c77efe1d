"""offline.ope against values computed by hand on tiny logs (the arithmetic is written
out beside each expected value), and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from headrace.core.errors import InputError
from offline.ope import (
    CI_METHOD,
    Z95,
    OpeLog,
    effective_sample_size,
    evaluate,
    ips,
    snips,
)


def _log(**kw: list[float]) -> OpeLog:
    base = {"rewards": [1, 0, 1, 0], "logging_prob": [0.5, 0.25, 1.0, 0.5],
            "target_prob": [1.0, 0.0, 0.5, 1.0], "q_target": [0.4, 0.2, 0.3, 0.1],
            "q_logged": [0.5, 0.1, 0.2, 0.3]}
    base.update(kw)
    return OpeLog(**{k: np.asarray(v, dtype=float) for k, v in base.items()})


def test_four_decisions_by_hand() -> None:
    rep = evaluate(_log(), min_ess=0, min_support=0.8)
    # w = pi / p = [1/0.5, 0/0.25, 0.5/1, 1/0.5] = [2, 0, 0.5, 2]; w r = [2, 0, 0.5, 0]
    assert rep.decisions == 4 and rep.logged_ctr == 0.5
    assert rep.ips.value == pytest.approx(2.5 / 4)
    # IPS terms [2, 0, .5, 0] - .625 = [1.375, -.625, -.125, -.625]; squares sum 2.6875
    se = math.sqrt(2.6875 / 3) / 2
    assert rep.ips.ci_low == pytest.approx(0.625 - Z95 * se)
    assert rep.ips.ci_high == pytest.approx(0.625 + Z95 * se)
    # SNIPS = 2.5 / 4.5 = 5/9; linearised w (r - 5/9) / mean(w), mean(w) = 1.125 = 9/8:
    # [2 * 4/9 * 8/9, 0, .5 * 4/9 * 8/9, 2 * -5/9 * 8/9] = [64, 0, 16, -80] / 81
    assert rep.snips.value == pytest.approx(5 / 9)
    se = math.sqrt((64**2 + 16**2 + 80**2) / 81**2 / 3) / 2
    assert rep.snips.ci_low == pytest.approx(5 / 9 - Z95 * se)
    assert rep.snips.ci_high == pytest.approx(5 / 9 + Z95 * se)
    # DR terms q_t + w (r - q_l): .4 + 2 * .5 = 1.4; .2 + 0 = .2; .3 + .5 * .8 = .7;
    # .1 + 2 * (0 - .3) = -.5; mean 1.8 / 4 = .45; deviations +-.95, +-.25: squares 1.93
    assert rep.dr.value == pytest.approx(0.45)
    se = math.sqrt(1.93 / 3) / 2
    assert rep.dr.ci_low == pytest.approx(0.45 - Z95 * se)
    assert rep.dr.ci_high == pytest.approx(0.45 + Z95 * se)
    # ESS = 4.5^2 / (4 + 0 + .25 + 4) = 20.25 / 8.25
    assert rep.ess == pytest.approx(20.25 / 8.25)
    # decision 2 logged deterministically (p = 1), target puts .5 elsewhere: unsupported
    # .5 of 4 decisions' mass -> support 1 - .5/4; differs = mean(1 - pi) = 1.5 / 4
    assert rep.support == pytest.approx(0.875)
    assert rep.differs_share == pytest.approx(0.375)
    assert rep.max_weight == 2.0 and rep.clip is None and rep.ci_method == CI_METHOD


def test_clipping_by_hand() -> None:
    rep = evaluate(_log(), clip=1.0, min_ess=0, min_support=0.8)
    # w = min([2, 0, .5, 2], 1) = [1, 0, .5, 1]; w r = [1, 0, .5, 0]
    assert rep.ips.value == pytest.approx(1.5 / 4)
    assert rep.snips.value == pytest.approx(1.5 / 2.5)
    # DR: .4 + .5 = .9; .2; .3 + .4 = .7; .1 - .3 = -.2 -> 1.6 / 4
    assert rep.dr.value == pytest.approx(0.4)
    assert rep.ess == pytest.approx(2.5**2 / 2.25) and rep.clip == 1.0
    assert rep.max_weight == 1.0


def test_three_decisions_greedy_target_on_eps_greedy_log() -> None:
    # eps-greedy logger, eps = .3, K = 3: greedy candidate p = .7 + .1 = .8, others .1.
    # Target greedy under another model: pi = 1 on its choice, 0 elsewhere.
    # decision 0: logged = logger's greedy (p .8), target agrees (pi 1), clicked
    # decision 1: logged an explored one (p .1), target's choice, not clicked
    # decision 2: logged an explored one (p .1), target's choice, clicked
    log = OpeLog(np.array([1.0, 0.0, 1.0]), np.array([0.8, 0.1, 0.1]),
                 np.array([1.0, 1.0, 1.0]), np.array([0.2, 0.3, 0.4]),
                 np.array([0.2, 0.3, 0.4]))
    rep = evaluate(log, min_ess=0)
    # w = [1.25, 10, 10]; IPS = (1.25 + 0 + 10) / 3 = 3.75
    assert rep.ips.value == pytest.approx(11.25 / 3)
    # SNIPS = 11.25 / 21.25
    assert rep.snips.value == pytest.approx(11.25 / 21.25)
    # DR: .2 + 1.25 * .8 = 1.2; .3 + 10 * -.3 = -2.7; .4 + 10 * .6 = 6.4 -> 4.9 / 3
    assert rep.dr.value == pytest.approx(4.9 / 3)
    # every decision stochastic: all mass supported; ESS = 21.25^2 / (1.5625 + 200)
    assert rep.support == 1.0 and rep.ess == pytest.approx(21.25**2 / 201.5625)


def test_target_equal_to_logger_gives_the_logged_ctr_exactly() -> None:
    rng = np.random.default_rng(7)
    n = 1001
    p = rng.uniform(0.01, 1.0, n)
    p[::5] = 1.0
    r = (rng.random(n) < 0.13).astype(float)
    q = rng.uniform(0, 0.2, n)
    rep = evaluate(OpeLog(r, p, p.copy(), q, q.copy()))
    assert rep.ips.value == r.mean() == rep.logged_ctr
    assert rep.snips.value == r.mean()
    assert rep.dr.value == pytest.approx(r.mean(), abs=1e-15)
    assert rep.ess == pytest.approx(n) and rep.support == 1.0


def test_vectorised_along_the_last_axis() -> None:
    w = np.array([[2.0, 0.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
    r = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    v, lo, hi = ips(w, r)
    assert v.tolist() == [0.625, 0.25] and (lo < v).all() and (hi > v).all()
    assert snips(w, r)[0] == pytest.approx([5 / 9, 0.25])
    assert effective_sample_size(w) == pytest.approx([20.25 / 8.25, 4.0])
    assert effective_sample_size(np.zeros(3)) == 0.0


@pytest.mark.parametrize(("kw", "opts", "needle"), [
    ({"rewards": [], "logging_prob": [], "target_prob": [], "q_target": [], "q_logged": []},
     {}, "the range is empty"),
    ({"logging_prob": [0.5, math.nan, 1.0, 0.5]}, {"min_support": 0.8},
     "1 of 4 decisions carry no logging propensity"),
    ({"logging_prob": [0.5, 0.0, 1.0, 0.5]}, {"min_support": 0.8}, "outside (0, 1]"),
    ({"rewards": [1, 0, 2, 0]}, {"min_support": 0.8}, "not 0 or 1"),
    ({"target_prob": [1.0, -0.1, 0.5, 1.0]}, {"min_support": 0.8}, "outside [0, 1]"),
    ({}, {}, "supports only 87.5% of the target policy's probability mass"),
    ({}, {"min_support": 0.8, "min_ess": 100}, "effective sample size is 2.5"),
    ({}, {"min_support": 0.8, "clip": 0.0}, "clip must be positive"),
])
def test_refusals(kw: dict[str, list[float]], opts: dict[str, float], needle: str) -> None:
    with pytest.raises(InputError) as err:
        evaluate(_log(**kw), **{"min_ess": 0, **opts})
    assert needle in str(err.value)
    assert str(err.value).count(". ") == 0  # one sentence


def test_deterministic_log_and_a_differing_target_is_refused() -> None:
    # greedy-only logger (p = 1 everywhere); the target differs on 3 of 200 decisions
    n = 200
    pi = np.ones(n)
    pi[:3] = 0.0
    log = OpeLog(np.zeros(n), np.ones(n), pi, np.zeros(n), np.zeros(n))
    with pytest.raises(InputError, match=r"supports only 98\.5%.* on 3 of 200 decisions"):
        evaluate(log)
    assert evaluate(log, min_support=0.98).support == pytest.approx(0.985)
