"""The exploration policies' decisions and propensities (serving/exploration.py) against
hand-computed values, exact integrals and seeded frequencies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from feature_defs.coldstart import Tier
from headrace.core.errors import InputError
from serving.exploration import (
    ExploreConfig,
    beta_prior,
    decide,
    eps_greedy,
    eps_greedy_propensity,
    is_eligible,
    request_rng,
    served_order,
    thompson,
    thompson_draws,
)


# ---------------------------------------------------------------- ε-greedy
def test_eps_greedy_propensity_by_hand() -> None:
    # K = 4, ε = 0.2: the greedy one 0.8 + 0.05 = 0.85, any other 0.05
    assert eps_greedy_propensity(2, 2, 4, 0.2) == pytest.approx(0.85, abs=1e-15)
    assert eps_greedy_propensity(0, 2, 4, 0.2) == pytest.approx(0.05, abs=1e-15)
    # K = 1: always 1; ε = 1: uniform 1/K
    assert eps_greedy_propensity(0, 0, 1, 0.05) == pytest.approx(1.0, abs=1e-15)
    assert eps_greedy_propensity(3, 0, 5, 1.0) == pytest.approx(0.2, abs=1e-15)
    # the propensities of the K candidates sum to 1
    assert sum(eps_greedy_propensity(i, 1, 7, 0.3) for i in range(7)) == pytest.approx(1.0)


def test_eps_greedy_frequencies_match_the_propensity() -> None:
    """60,000 seeded draws: each candidate's share within 5 binomial standard errors of
    (1 - ε)·[greedy] + ε/K, and every draw reports its candidate's exact propensity."""
    k, eps, greedy, n = 5, 0.3, 3, 60_000
    rng = np.random.default_rng(7)
    seen = np.zeros(k)
    for _ in range(n):
        first, prop = eps_greedy(rng, greedy, k, eps)
        seen[first] += 1
        assert prop == (0.76 if first == greedy else 0.06)  # 0.7 + 0.06, 0.06
    want = np.array([0.06, 0.06, 0.06, 0.76, 0.06])
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(seen / n - want) < 5 * se)


# ---------------------------------------------------------------- Thompson
def test_beta_prior_is_the_pseudo_count_around_the_prior_ctr() -> None:
    a, b = beta_prior(np.array([0.01, 0.0, np.nan, 1.0]), 100.0)
    assert a[0] == pytest.approx(1.0) and b[0] == pytest.approx(99.0)
    assert a[1] == pytest.approx(1e-4) and b[1] == pytest.approx(100 - 1e-4)  # clipped
    assert a[2] == pytest.approx(1e-4)  # NaN reads the clip
    assert b[3] == pytest.approx(1e-4)


def test_compact_draws_equal_the_full_matrix() -> None:
    """The (m, drawn + 1) matrix picks the same winners as the brute-force (m, K) one
    fed the same Beta draws (known candidates as constants, ties to the lowest index)."""
    gen = np.random.default_rng(5)
    for _ in range(30):
        k = int(gen.integers(2, 12))
        p = gen.beta(2, 60, k)
        bids = gen.choice([0.0, 0.5, 1.0, 2.0], k)  # zero bids and ties included
        new = gen.random(k) < 0.5
        alpha, beta = gen.uniform(1, 5, int(new.sum())), gen.uniform(50, 200, int(new.sum()))
        got = thompson_draws(np.random.default_rng(9), p, bids, new, alpha, beta, 64)
        full = np.broadcast_to(p * bids, (64, k)).copy()
        if new.any():
            full[:, new] = np.random.default_rng(9).beta(alpha, beta, size=(64, int(
                new.sum()))) * bids[new]
        assert got.tolist() == np.argmax(full, axis=1).tolist()


def test_only_the_most_promising_new_candidates_are_drawn() -> None:
    """17 new candidates, 16 contenders: the one of lowest optimistic eCPM (half the bid)
    keeps its model pCTR, here 0.9, and so always wins; drawn, it never could."""
    k = 17
    p = np.full(k, 0.01)
    p[5] = 0.9
    bids = np.ones(k)
    bids[5] = 0.5
    first, prop = thompson(np.random.default_rng(1), p, bids, np.ones(k, bool),
                           np.full(k, 0.01), np.zeros(k), np.zeros(k), strength=100.0,
                           draws=64, contenders=16)
    assert (first, prop) == (5, 1.0)
    first, prop = thompson(np.random.default_rng(1), p, bids, np.ones(k, bool),
                           np.full(k, 0.01), np.zeros(k), np.zeros(k), strength=100.0,
                           draws=64, contenders=17)
    assert first != 5


def _exact_one_new(alpha: float, beta: float, bid_new: float, known_score: float) -> float:
    """P(X·bid_new > known_score), X ~ Beta(alpha, beta): the Beta survival function."""
    return float(stats.beta.sf(known_score / bid_new, alpha, beta))


def _exact_two_new(a1: float, b1: float, bid1: float, a2: float, b2: float, bid2: float
                   ) -> float:
    """P(X1·bid1 > X2·bid2) = ∫ f1(x) F2(x·bid1/bid2) dx, by adaptive quadrature."""
    def f(x: float) -> float:
        return float(stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x * bid1 / bid2, a2, b2))

    value, err = integrate.quad(f, 0.0, 1.0, limit=200, points=[a1 / (a1 + b1)])
    assert err < 1e-8
    return value


def test_thompson_draws_keep_known_ads_and_take_the_argmax() -> None:
    rng = np.random.default_rng(0)
    p, bids = np.array([0.02, 0.01, 0.05]), np.array([1.0, 3.0, 1.0])
    # nothing new: the greedy winner (0.05 > 0.03 > 0.02 -> index 2) every time
    assert set(thompson_draws(rng, p, bids, np.zeros(3, bool), np.array([]), np.array([]),
                              50).tolist()) == {2}
    # a new candidate whose posterior sits at ~0.9 always wins
    new = np.array([True, False, False])
    w = thompson_draws(rng, p, bids, new, np.array([9000.0]), np.array([1000.0]), 50)
    assert set(w.tolist()) == {0}


@pytest.mark.parametrize(("imps", "clicks", "bid_new"), [(0.0, 0.0, 2.0), (300.0, 9.0, 1.5),
                                                         (50.0, 0.0, 4.0)])
def test_thompson_propensity_matches_the_exact_one_new_candidate(imps: float, clicks: float,
                                                                 bid_new: float) -> None:
    """One new ad against known ones: the Monte Carlo propensity of whoever is shown is
    within its stated error (bias <= 1/(M+1) plus 5 standard errors) of the exact Beta
    survival function, and averaged over 200 requests within 5 standard errors of it."""
    p = np.array([0.01, 0.02, 0.015])  # candidate 0 is new; its pCTR is not used
    bids = np.array([bid_new, 1.0, 1.0])
    new = np.array([True, False, False])
    prior = np.full(3, 0.01)
    m = 256
    a, b = 100 * 0.01 + clicks, 100 * 0.99 + imps - clicks
    pi_new = _exact_one_new(a, b, bid_new, 0.02)
    exact = {0: pi_new, 1: 1.0 - pi_new}
    props: dict[int, list[float]] = {0: [], 1: []}
    rng = np.random.default_rng(11)
    for _ in range(200):
        first, prop = thompson(rng, p, bids, new, prior, np.array([imps, 0, 0]),
                               np.array([clicks, 0, 0]), strength=100.0, draws=m)
        assert first in (0, 1)  # candidate 2 (0.015) can never beat candidate 1
        pi = exact[first]
        se = math.sqrt(m * pi * (1 - pi)) / (m + 1)
        assert abs(prop - pi) <= 1 / (m + 1) + 5 * se + 1e-12
        props[first].append(prop)
    for first, got in props.items():
        if len(got) >= 20:
            pi = exact[first]
            mean_want = (1 + m * pi) / (m + 1)  # E[p̂ | shown], the estimator's mean
            se = math.sqrt(m * pi * (1 - pi)) / (m + 1) / math.sqrt(len(got))
            assert abs(float(np.mean(got)) - mean_want) <= 5 * se + 1e-12


def test_thompson_propensity_matches_the_exact_two_new_integral() -> None:
    """Two new ads, no known one competitive: a large-M estimate (M = 8192) is within
    5 standard errors + 1/(M+1) of the exact integral ∫ f1 F2."""
    p = np.array([0.0, 0.0, 0.0001])
    bids = np.array([1.0, 1.6, 1.0])
    new = np.array([True, True, False])
    imps, clicks = np.array([40.0, 10.0, 0.0]), np.array([2.0, 0.0, 0.0])
    prior = np.array([0.02, 0.02, 0.02])
    a = 2.0 + clicks[:2]
    b = 98.0 + imps[:2] - clicks[:2]
    p0 = _exact_two_new(a[0], b[0], 1.0, a[1], b[1], 1.6)
    exact = {0: p0, 1: 1.0 - p0}
    m = 8192
    rng = np.random.default_rng(3)
    for _ in range(5):
        first, prop = thompson(rng, p, bids, new, prior, imps, clicks, strength=100.0,
                               draws=m)
        pi = exact[first]
        assert abs(prop - pi) <= 1 / (m + 1) + 5 * math.sqrt(pi * (1 - pi) / m)


# ---------------------------------------------------------------- the decision
def test_eligibility() -> None:
    imps = np.array([5000.0, 1200.0])
    personal = int(Tier.PERSONALIZED)
    assert not is_eligible(imps, personal, 1000)
    assert is_eligible(np.array([5000.0, 999.0]), personal, 1000)
    for tier in (Tier.BLENDED, Tier.SEGMENT, Tier.GLOBAL):
        assert is_eligible(imps, int(tier), 1000)
    assert not is_eligible(imps, 0, 1000)  # a model without user features: unknown
    assert not is_eligible(None, int(Tier.GLOBAL), 1000)  # no counts: never


def test_served_order_puts_the_explored_one_first() -> None:
    order = np.array([4, 0, 2, 1, 3])
    assert served_order(order, 4) is order
    assert served_order(order, 2).tolist() == [2, 4, 0, 1, 3]
    assert served_order(order, 3).tolist() == [3, 4, 0, 2, 1]


def test_decide_is_deterministic_for_a_seed_and_prediction_id() -> None:
    cfg = ExploreConfig("thompson", seed=42, draws=64)
    p = np.array([0.02, 0.01, 0.03, 0.01])
    bids = np.ones(4)
    imps, clicks = np.array([10.0, 0.0, 5000.0, 20.0]), np.array([1.0, 0.0, 150.0, 0.0])
    prior = np.full(4, 0.02)

    def run(seed: int, pid: str) -> tuple[int, float]:
        d = decide(ExploreConfig("thompson", seed=seed, draws=64), request_rng(seed, pid), 2,
                   p, bids, imps, clicks, prior)
        return d.first, d.propensity

    first = [run(42, f"r{i}") for i in range(40)]
    assert first == [run(42, f"r{i}") for i in range(40)]  # same seed, same answers
    assert first != [run(43, f"r{i}") for i in range(40)]  # another seed, others
    assert len({f for f, _ in first}) > 1  # it does explore
    d = decide(cfg, request_rng(42, "x"), 2, p, bids, np.full(4, 5000.0), clicks, prior)
    assert (d.first, d.propensity, d.explored, d.outcome) == (2, 1.0, False, "greedy")


def test_eps_greedy_decision_labels_its_outcome() -> None:
    cfg = ExploreConfig("eps-greedy", epsilon=1.0, seed=1)
    p, bids = np.array([0.01, 0.05, 0.02]), np.ones(3)
    outcomes = set()
    for i in range(60):
        d = decide(cfg, request_rng(1, f"q{i}"), 1, p, bids, np.zeros(3), np.zeros(3), p)
        assert d.propensity == pytest.approx(1 / 3)
        assert d.explored == (d.first != 1)
        outcomes.add(d.outcome)
    assert outcomes == {"explored", "greedy"}
    assert cfg.label == "eps-greedy:1" and ExploreConfig("eps-greedy").label == \
        "eps-greedy:0.05"
    assert ExploreConfig("thompson").label == "thompson:v1"
    assert ExploreConfig().label == "greedy" and not ExploreConfig().on


@pytest.mark.parametrize(("kw", "why"), [
    ({"policy": "ucb"}, "HEADRACE_EXPLORE must be one of"),
    ({"epsilon": 0.0}, "HEADRACE_EXPLORE_EPSILON"), ({"epsilon": 1.5}, "EPSILON"),
    ({"budget": 1.0}, "HEADRACE_EXPLORE_BUDGET"), ({"budget": 0.0}, "BUDGET"),
    ({"new_ad_impressions": 0}, "NEW_AD_IMPRESSIONS"), ({"draws": 8}, "DRAWS"),
    ({"prior_strength": -1.0}, "PRIOR_STRENGTH"),
])
def test_bad_settings_are_one_sentence(kw: dict[str, object], why: str) -> None:
    with pytest.raises(InputError, match=why):
        ExploreConfig(**kw)  # type: ignore[arg-type]


def test_thompson_for_a_new_user_draws_every_candidate_around_its_pctr() -> None:
    """No new ad, a new user (tier SEGMENT): both candidates' CTRs are drawn from
    Beta(u·p, u·(1 - p)); the propensity of the shown one matches the exact
    P(X_shown > X_other), integrated here, within the Monte Carlo error."""
    from scipy import integrate, stats

    from feature_defs.coldstart import Tier

    u = 50.0
    cfg = ExploreConfig("thompson", seed=5, draws=8192, user_strength=u)
    p, bids = np.array([0.05, 0.04]), np.ones(2)
    known = np.full(2, 5000.0)  # no new ad
    a = [stats.beta(u * q, u * (1 - q)) for q in p]
    second_wins = integrate.quad(lambda x: a[1].pdf(x) * a[0].cdf(x), 0, 1)[0]
    firsts = []
    for i in range(30):
        d = decide(cfg, request_rng(5, f"n{i}"), 0, p, bids, known, np.zeros(2), p,
                   int(Tier.SEGMENT))
        exact = second_wins if d.first == 1 else 1 - second_wins
        assert d.propensity == pytest.approx(exact, abs=0.02)  # SE <= 0.0055 at M = 8192
        assert d.explored == (d.first == 1)
        firsts.append(d.first)
    assert 0 < firsts.count(1) < 30  # it does try the second candidate
    # a known user, or no tier given: greedy, as before
    for tier in (int(Tier.PERSONALIZED), None):
        d = decide(cfg, request_rng(5, "k"), 0, p, bids, known, np.zeros(2), p, tier)
        assert (d.first, d.propensity, d.outcome) == (0, 1.0, "greedy")
    with pytest.raises(InputError, match="HEADRACE_EXPLORE_USER_STRENGTH"):
        ExploreConfig("thompson", user_strength=0.0)
