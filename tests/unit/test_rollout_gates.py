"""Every guardrail and phase-end gate firing and not firing at its threshold."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from headrace.core.errors import InputError
from headrace.rollout import stats
from headrace.rollout.gates import (
    Action,
    ArmStats,
    PctrBucket,
    SegmentStats,
    guardrails,
    phase_end,
)
from headrace.rollout.policy import Policy

POLICY = Policy()


def arm(impressions: int = 1_000_000, clicks: int = 10_000, **kw: Any) -> ArmStats:
    """A healthy, calibrated arm at a 1 % CTR."""
    base: dict[str, Any] = {"impressions": impressions, "clicks": clicks,
                            "sum_pctr": float(clicks), "requests": impressions, "errors": 0,
                            "latency_p99_ms": 4.0, "min_pctr": 0.001, "max_pctr": 0.2}
    return ArmStats(**{**base, **kw})


def names(challenger: ArmStats, phase: int = 1, policy: Policy = POLICY) -> list[str]:
    return [b.name for b in guardrails(phase, arm(), challenger, policy)]


def test_a_healthy_arm_passes_every_guardrail() -> None:
    assert names(arm()) == []


@pytest.mark.parametrize(("errors", "fires"), [(999, False), (1000, True)])
def test_error_rate_boundary(errors: int, fires: bool) -> None:
    # "error rate < 0.1 %": 1000 / 1,000,000 is exactly 0.1 % and fails
    assert ("error_rate" in names(arm(errors=errors))) is fires


def test_error_rate_needs_its_minimum_errors() -> None:
    assert names(arm(requests=1000, errors=4)) == []  # 0.4 %, but only 4 errors
    assert names(arm(requests=1000, errors=5)) == ["error_rate"]


@pytest.mark.parametrize(("p99", "fires"), [(9.99, False), (10.0, True)])
def test_latency_boundary(p99: float, fires: bool) -> None:
    assert ("latency_p99" in names(arm(latency_p99_ms=p99))) is fires


@pytest.mark.parametrize(("champion_p99", "challenger_p99", "fires"), [
    (20.0, 29.99, False),  # over the absolute 10 ms, but under champion + 10 ms
    (20.0, 30.0, True),    # both: fires
    (2.0, 9.99, False),    # 7.99 ms above the champion, under 10 ms absolute
    (None, 12.0, True),    # no champion latency known: the absolute limit alone
])
def test_latency_relative_to_the_champion(champion_p99: float | None, challenger_p99: float,
                                          fires: bool) -> None:
    """latency_vs_champion_ms: the breach needs both the absolute limit and the margin
    over the champion's p99 in the same phase (a machine slow for both arms)."""
    pol = replace(POLICY, latency_vs_champion_ms=10.0)
    got = guardrails(1, arm(latency_p99_ms=champion_p99), arm(latency_p99_ms=challenger_p99),
                     pol)
    assert ("latency_p99" in [b.name for b in got]) is fires
    default = "latency_p99" in names(arm(latency_p99_ms=challenger_p99))
    assert default is (challenger_p99 >= 10.0)  # the default: the absolute limit alone


def test_latency_vs_champion_is_validated() -> None:
    with pytest.raises(InputError, match="latency_vs_champion_ms"):
        Policy(latency_vs_champion_ms=-1.0)
    with pytest.raises(InputError, match="latency_vs_champion_ms"):
        Policy(latency_vs_champion_ms=math.inf)


def test_latency_p99_from_a_histogram() -> None:
    # 1000 requests: 980 ≤ 5 ms, 20 in (5, 20]: rank 990 is half-way into the second
    a = arm(latency_p99_ms=None, latency_bounds_ms=(5.0, 20.0, math.inf),
            latency_counts=(980, 20, 0), requests=1000)
    assert a.p99_ms() == pytest.approx(5.0 + 15.0 * 10 / 20)
    assert "latency_p99" in names(a)
    open_bucket = replace(a, latency_counts=(980, 0, 20))
    assert open_bucket.p99_ms() == 20.0  # the open bucket answers its lower bound
    assert names(replace(a, latency_counts=(995, 5, 0))) == []


@pytest.mark.parametrize(("clicks", "fires"), [(2, False), (1, True)])
def test_click_floor_boundary(clicks: int, fires: bool) -> None:
    # 2 clicks in 20,000 is exactly 1 per 10,000 and passes
    a = arm(impressions=20_000, clicks=clicks, sum_pctr=float(clicks))
    assert ("click_floor" in names(a)) is fires
    assert "click_floor" not in names(replace(a, impressions=19_999, requests=19_999))


def test_segment_errors_boundary_on_publishers_only() -> None:
    def seg(errors: int) -> dict[str, dict[str, SegmentStats]]:
        return {"publisher": {"p1": SegmentStats(100, 1, errors, 200)},
                "country": {"fr": SegmentStats(0, 0, 200, 200)}}
    assert names(arm(segments=seg(100))) == []  # exactly 50 %: not more than
    found = guardrails(1, arm(), arm(segments=seg(101)), POLICY)
    assert [b.name for b in found] == ["segment_errors"]
    assert found[0].values["segments"][0]["value"] == "p1"
    small = {"publisher": {"p1": SegmentStats(10, 0, 80, 90)}}  # under 100 requests
    assert names(arm(segments=small)) == []


@pytest.mark.parametrize(("lo", "hi", "fires"), [(0.0, 1.0, False), (-1e-9, 0.5, True),
                                                 (0.1, 1.0000001, True),
                                                 (math.nan, 0.5, True)])
def test_prediction_range(lo: float, hi: float, fires: bool) -> None:
    assert ("prediction_range" in names(arm(min_pctr=lo, max_pctr=hi))) is fires


def test_constant_predictions() -> None:
    assert names(arm(min_pctr=0.01, max_pctr=0.01)) == ["constant_predictions"]
    assert names(arm(min_pctr=0.01, max_pctr=0.01 + 2e-9)) == []
    few = arm(impressions=999, clicks=10, sum_pctr=10.0, min_pctr=0.01, max_pctr=0.01)
    assert names(few) == []


@pytest.mark.parametrize(("sum_pctr", "fires"), [(16_000.0, False), (16_001.0, True),
                                                 (6_000.0, False), (5_999.0, True)])
def test_calibration_collapse_bounds(sum_pctr: float, fires: bool) -> None:
    assert ("calibration_collapse" in names(arm(sum_pctr=sum_pctr))) is fires


def test_calibration_collapse_waits_for_clicks() -> None:
    assert names(arm(impressions=20_000, clicks=90, sum_pctr=180.0)) == []  # 2x, 180 < 200
    assert names(arm(impressions=20_000, clicks=100, sum_pctr=200.0)) == [
        "calibration_collapse"]


def test_breaches_and_decisions_are_json() -> None:
    bad = arm(errors=5000, latency_p99_ms=30.0, clicks=0, sum_pctr=100.0)
    d = phase_end(1, arm(), bad, POLICY)
    assert d.action is Action.ROLLBACK and d.name == "error_rate"
    assert [b.name for b in d.breaches] == ["error_rate", "latency_p99", "click_floor"]
    out = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert out["action"] == "rollback" and out["values"]["threshold"] == 0.001


def test_phase_1_advances_when_safe() -> None:
    d = phase_end(1, arm(), arm(impressions=60_000, clicks=600, sum_pctr=600.0), POLICY)
    assert (d.action, d.name) == (Action.ADVANCE, "passed")


def test_phase_2_min_impressions_and_calibration() -> None:
    assert phase_end(2, arm(), arm(impressions=49_999, clicks=500, sum_pctr=500.0),
                     POLICY).name == "min_impressions"
    held = phase_end(2, arm(), arm(impressions=49_999, clicks=500, sum_pctr=500.0), POLICY,
                     final=True)
    assert (held.action, held.name) == (Action.ROLLBACK, "min_impressions")
    for ratio, action in ((0.85, Action.ADVANCE), (1.15, Action.ADVANCE),
                          (0.849, Action.ROLLBACK), (1.151, Action.ROLLBACK)):
        d = phase_end(2, arm(), arm(sum_pctr=10_000 * ratio), POLICY)
        assert d.action is action, (ratio, d)
        assert d.name == ("passed" if action is Action.ADVANCE else "calibration")


def _bucketed(clicks: int, sum_pctr: float, impressions: int = 50_000) -> ArmStats:
    return arm(buckets=(PctrBucket(0.0, 0.01, impressions, clicks, sum_pctr),
                        PctrBucket(0.01, 1.0, 950_000, 9_800, 9_800.0)))


def test_phase_2_bucket_calibration_with_enough_data() -> None:
    assert phase_end(2, arm(), _bucketed(200, 280.0), POLICY).action is Action.ADVANCE
    d = phase_end(2, arm(), _bucketed(200, 281.0), POLICY)  # 1.405 > 1.4
    assert (d.action, d.name) == (Action.ROLLBACK, "calibration_bucket")
    assert d.values["buckets"][0]["ratio"] == pytest.approx(1.405)
    assert phase_end(2, arm(), _bucketed(400, 279.0), POLICY).name == "calibration_bucket"
    # not enough data: 49,999 impressions, or fewer than 200 clicks and expected clicks
    assert phase_end(2, arm(), _bucketed(200, 281.0, 49_999), POLICY).action is Action.ADVANCE
    assert phase_end(2, arm(), _bucketed(100, 199.0), POLICY).action is Action.ADVANCE


def _challenger_at(p_worse: float, champion: ArmStats) -> ArmStats:
    """The challenger clicks (same impressions) whose P(worse) is nearest p_worse."""
    ks = np.arange(9000, 11_000)
    p_w = 1 - stats.prob_log_ratio_above(0.0, champion.clicks, champion.impressions, ks,
                                         1_000_000)
    best = int(ks[np.argmin(np.abs(p_w - p_worse))])
    return arm(clicks=best, sum_pctr=float(best))


def test_phase_3_p_worse_and_inconclusive() -> None:
    champ = arm(4_000_000, 40_000, requests=4_000_000)
    for target in (0.88, 0.92):
        chal = _challenger_at(target, champ)
        d = phase_end(3, champ, chal, POLICY)
        p_worse = 1 - stats.p_better_exact(40_000, 4_000_000, chal.clicks, 1_000_000)
        assert d.action is (Action.ROLLBACK if p_worse > 0.9 else Action.ADVANCE), d.message
        assert d.name == ("p_worse" if p_worse > 0.9 else "inconclusive")
        assert d.values["comparison"]["p_worse"] == pytest.approx(p_worse)
    better = phase_end(3, champ, arm(clicks=10_300, sum_pctr=10_300.0), POLICY)
    assert (better.action, better.name) == (Action.ADVANCE, "passed")
    assert phase_end(3, champ, arm(199_999, 2000, requests=199_999, sum_pctr=2000.0),
                     POLICY).name == "min_impressions"


def test_phase_4_p_better_and_lift() -> None:
    champ = arm(1_000_000, 10_000)
    # +1.5 % lift at 10k clicks a side: P(better) ~ 0.86, expected lift ~ 1.5 %
    d = phase_end(4, champ, arm(clicks=10_150, sum_pctr=10_150.0), POLICY)
    assert d.values["comparison"]["p_better"] > 0.85 and d.action is Action.ADVANCE
    # +1.2 %: P(better) ~ 0.80 -> hold on p_better; at the last look, rollback
    d = phase_end(4, champ, arm(clicks=10_120, sum_pctr=10_120.0), POLICY)
    assert (d.action, d.name) == (Action.HOLD, "p_better")
    d = phase_end(4, champ, arm(clicks=10_120, sum_pctr=10_120.0), POLICY, final=True)
    assert (d.action, d.name) == (Action.ROLLBACK, "p_better")
    # P(better) high but expected lift under 1 %: 40x the data at +0.9 %
    big = arm(40_000_000, 400_000, requests=40_000_000)
    d = phase_end(4, big, arm(40_000_000, 403_600, requests=40_000_000, sum_pctr=403_600.0),
                  POLICY)
    assert d.values["comparison"]["p_better"] > 0.85
    assert (d.action, d.name) == (Action.HOLD, "lift")


def _segmented(champ_clicks: int, chal_clicks: int, share: float = 0.1
               ) -> tuple[ArmStats, ArmStats]:
    n = int(1_000_000 * share)
    rest = 1_000_000 - n
    seg1 = {"publisher": {"a": SegmentStats(n, 1000), "b": SegmentStats(rest, 10_000)}}
    seg2 = {"publisher": {"a": SegmentStats(n, chal_clicks), "b": SegmentStats(rest, 10_500)}}
    return (arm(1_000_000, 1000 + 10_000, segments=seg1),
            arm(1_000_000, chal_clicks + 10_500, sum_pctr=float(chal_clicks + 10_500),
                segments=seg2))


def test_phase_4_segment_degradation_accounts_for_uncertainty() -> None:
    # segment a: 100k impressions, 1000 champion clicks; 850 challenger clicks is -15 %
    d = phase_end(4, *_segmented(1000, 850), POLICY)
    assert (d.action, d.name) == (Action.ROLLBACK, "segment_degraded")
    assert d.values["segments"][0]["value"] == "a" and d.values["segments"][0]["p_degraded"] > 0.9
    # 930 clicks: point estimate -7 %, but P(lift < -5 %) ~ 0.7: not degraded ...
    champ, chal = _segmented(1000, 930)
    assert phase_end(4, champ, chal, POLICY).name != "segment_degraded"
    # ... while the literal gate (point estimate) rolls back
    assert phase_end(4, champ, chal, Policy.literal()).name == "segment_degraded"
    # a minor segment (under 5 % of impressions) is not judged
    assert phase_end(4, *_segmented(400, 200, share=0.04), POLICY).name != "segment_degraded"


def test_phase_5_promotes() -> None:
    d = phase_end(5, arm(), arm(clicks=10_500, sum_pctr=10_500.0), POLICY)
    assert (d.action, d.name) == (Action.PROMOTE, "promote")
    d = phase_end(5, arm(), arm(clicks=10_500, sum_pctr=12_200.0), POLICY)  # 1.162
    assert (d.action, d.name) == (Action.ROLLBACK, "calibration")


def test_phase_5_p_lift_alternative_is_stricter() -> None:
    strict = POLICY.replace_phase(5, p_lift=0.9)
    chal = arm(clicks=10_200, sum_pctr=10_200.0)  # E[lift] 2 %, P(lift > 1 %) ~ 0.76
    assert phase_end(5, arm(), chal, POLICY).action is Action.PROMOTE
    d = phase_end(5, arm(), chal, strict)
    assert (d.action, d.name) == (Action.HOLD, "lift") and 0.5 < d.values["value"] < 0.9


def test_bad_input() -> None:
    with pytest.raises(InputError, match="clicks"):
        ArmStats(impressions=5, clicks=6)
    with pytest.raises(InputError, match="latency_counts"):
        ArmStats(latency_bounds_ms=(1.0,), latency_counts=())
    with pytest.raises(InputError, match="phase"):
        phase_end(6, arm(), arm(), POLICY)
