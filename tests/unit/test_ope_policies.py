"""offline.ope_policies: the prediction log joined to a model's scores and the clicks,
checked against values worked out by hand for a handful of records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feature_defs.predictions import Arm, PredictionRecord
from headrace.core.errors import InputError
from offline.ope import evaluate
from offline.ope_policies import TargetPolicy, build_log, logged_action, parse_policy

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ADS = ("a1", "a2", "a3")


def rec(pid: str, *, ts: int = T0, version: str = "champ", shadow: bool = False,
        p_ctr: tuple[float, ...] = (0.1, 0.2, 0.3), ranks: tuple[int, ...] = (2, 1, 0),
        chosen: int | None = 0, propensity: float | None = 1.0, error: str | None = None,
        policy: str | None = "greedy", ads: tuple[str, ...] = ADS) -> PredictionRecord:
    return PredictionRecord(pid, ts, "u", "pub", "us", "mobile", "feed", "banner", ads,
                            tuple(f"c{a}" for a in ads), p_ctr, ranks, chosen,
                            Arm.CHALLENGER if shadow else Arm.CHAMPION, version, shadow,
                            1.0, error, (), propensity, False, policy)


def test_parse_policy() -> None:
    assert parse_policy("greedy") == TargetPolicy("greedy")
    assert parse_policy("logged").name == "logged"
    assert parse_policy("eps:0.05") == TargetPolicy("eps", 0.05)
    assert parse_policy("eps:0.05").name == "eps:0.05"
    for bad in ("eps:1.5", "eps:", "thompson", "eps:-0.1"):
        with pytest.raises(InputError, match="unknown policy"):
            parse_policy(bad)


def test_logged_action_is_the_chosen_rank() -> None:
    assert logged_action(rec("p", ranks=(2, 1, 0), chosen=0)) == 2
    assert logged_action(rec("p", ranks=(2, 1, 0), chosen=1)) == 1  # explored
    assert logged_action(rec("p", ranks=(2, 1, 0), chosen=None)) == 2
    assert logged_action(rec("p", ranks=(2, 1, 0), chosen=5)) is None


def _records() -> list[PredictionRecord]:
    # champion logs eps-greedy (eps .3, K 3): greedy p = .7 + .1 = .8, explored p = .1
    # the challenger "chal" scores every request in shadow mode except p4
    return [
        # p1: champion shows a3 (its rank 0, greedy); chal ranks a1 first
        rec("p1", propensity=0.8, policy="eps-greedy:0.3"),
        rec("p1", version="chal", shadow=True, p_ctr=(0.5, 0.1, 0.2), ranks=(0, 2, 1)),
        # p2: champion explored a1 (its rank 2); chal ranks a1 first
        rec("p2", chosen=2, propensity=0.1, policy="eps-greedy:0.3"),
        rec("p2", version="chal", shadow=True, p_ctr=(0.4, 0.2, 0.3), ranks=(0, 2, 1)),
        # p3: champion shows a3 greedy; chal agrees
        rec("p3", propensity=0.8, policy="eps-greedy:0.3", ts=T0 + 10),
        rec("p3", version="chal", shadow=True, p_ctr=(0.1, 0.1, 0.6), ranks=(1, 2, 0)),
        # p4: no chal record -> skipped (coverage)
        rec("p4", propensity=0.8, policy="eps-greedy:0.3"),
        # not decisions: a duplicate of p1, an error, one out of range, a shadow
        rec("p1", propensity=0.8),
        rec("p5", error="boom", p_ctr=(), ranks=(), chosen=None, propensity=None),
        rec("p6", ts=T0 + 1000),
        rec("p7", version="chal", shadow=True),
    ]


CLICKS = {("p1", "a3"): [T0 + 60_000],           # at ts + attribution: counted
          ("p2", "a1"): [T0 - 1, T0 + 60_001],    # before ts and after the window: not
          ("p3", "a3"): [T0 + 10], ("p3", "a1"): [T0 + 20]}  # a3 at ts: counted


def test_build_log_greedy_under_the_challenger() -> None:
    out = build_log(_records(), "chal", TargetPolicy("greedy"), CLICKS, from_ms=T0,
                    to_ms=T0 + 1000, attribution_ms=60_000)
    assert (out.served, out.no_model_record, out.mismatched, out.duplicates) == (4, 1, 0, 1)
    assert out.coverage == 0.75 and out.clicked == 2
    assert out.policies == {"eps-greedy:0.3": 3}
    # p1: logged a3 (p .8), chal's top a1 -> pi 0; q_target = chal q(a1) = .5, q(a3) = .2
    # p2: logged a1 (p .1), chal's top a1 -> pi 1; q_target = .4, q_logged = .4
    # p3: logged a3 (p .8), chal's top a3 -> pi 1; q_target = q_logged = .6
    assert out.log.rewards.tolist() == [1.0, 0.0, 1.0]
    assert out.log.logging_prob.tolist() == [0.8, 0.1, 0.8]
    assert out.log.target_prob.tolist() == [0.0, 1.0, 1.0]
    assert out.log.q_target.tolist() == [0.5, 0.4, 0.6]
    assert out.log.q_logged.tolist() == [0.2, 0.4, 0.6]
    rep = evaluate(out.log, min_ess=0)
    # w = [0, 10, 1.25]; w r = [0, 0, 1.25]: IPS 1.25 / 3, SNIPS 1.25 / 11.25
    assert rep.ips.value == pytest.approx(1.25 / 3)
    assert rep.snips.value == pytest.approx(1.25 / 11.25)
    # DR: .5 + 0; .4 + 10 (0 - .4) = -3.6; .6 + 1.25 (1 - .6) = 1.1 -> -2.0 / 3
    assert rep.dr.value == pytest.approx(-2.0 / 3)


def test_build_log_eps_under_the_challenger() -> None:
    out = build_log(_records(), "chal", TargetPolicy("eps", 0.3), CLICKS, from_ms=T0,
                    to_ms=T0 + 1000, attribution_ms=60_000)
    # pi(a_i) = .7 [a_i = chal's top] + .1: p1 .1, p2 .8, p3 .8
    assert out.log.target_prob == pytest.approx([0.1, 0.8, 0.8])
    # q_target = .7 q(top) + .3 mean(q): p1 .35 + .08 = .43; p2 .28 + .09 = .37;
    # p3 .42 + .08 = .50
    assert out.log.q_target == pytest.approx([0.43, 0.37, 0.50])


def test_build_log_logged_policy_and_the_serving_model() -> None:
    out = build_log(_records(), "champ", TargetPolicy("logged"), CLICKS, from_ms=T0,
                    to_ms=T0 + 1000, attribution_ms=60_000)
    # the champion served every decision: all four covered; weights all 1
    assert out.coverage == 1.0 and out.log.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert np.array_equal(out.log.target_prob, out.log.logging_prob)
    rep = evaluate(out.log, min_ess=0)
    assert rep.ips.value == rep.snips.value == rep.logged_ctr == 0.5
    assert rep.dr.value == pytest.approx(0.5)


def test_decisions_without_propensity_are_refused() -> None:
    records = [rec("p1", propensity=None, policy=None), rec("p2")]
    out = build_log(records, "champ", TargetPolicy("greedy"), {}, from_ms=T0,
                    to_ms=T0 + 1, attribution_ms=0)
    assert math.isnan(out.log.logging_prob[0])
    with pytest.raises(InputError, match="1 of 2 decisions carry no logging propensity"):
        evaluate(out.log, min_ess=0)


def test_a_model_that_scored_other_ads_is_mismatched() -> None:
    records = [rec("p1"), rec("p1", version="chal", shadow=True, ads=("b1", "b2", "b3"))]
    out = build_log(records, "chal", TargetPolicy("greedy"), {}, from_ms=T0,
                    to_ms=T0 + 1, attribution_ms=0)
    assert (out.served, out.mismatched, len(out.log.rewards)) == (1, 1, 0)


def test_a_thompson_log_supports_only_the_logged_action() -> None:
    # both decisions stochastic (p .6); chal's top differs from the logged ad on p1.
    # eps-greedy tries every candidate: full support. Thompson may never show a known
    # ad below the top: only the logged action counts as supported -> 1 - 1/2 = .5
    def log(policy: str) -> list[PredictionRecord]:
        return [rec("p1", propensity=0.6, policy=policy),
                rec("p1", version="chal", shadow=True, ranks=(0, 2, 1)),
                rec("p2", propensity=0.6, policy=policy),
                rec("p2", version="chal", shadow=True, ranks=(2, 1, 0))]

    for policy, support in (("eps-greedy:0.05", 1.0), ("thompson:v1", 0.5)):
        out = build_log(log(policy), "chal", TargetPolicy("greedy"), {}, from_ms=T0,
                        to_ms=T0 + 1, attribution_ms=0)
        assert evaluate(out.log, min_ess=0, min_support=0).support == support
    with pytest.raises(InputError, match=r"supports only 50\.0%.*on 1 of 2 decisions"):
        evaluate(out.log, min_ess=0)
