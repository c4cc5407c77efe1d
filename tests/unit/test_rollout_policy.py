"""The rollout policy: the issue's phases and defaults, scaling, validation, round trip."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from headrace.core.errors import InputError
from headrace.rollout.policy import DEFAULT_PHASES, Policy


def test_the_issue_phases() -> None:
    p = Policy()
    assert [ph.share for ph in p.phases] == [0.03, 0.10, 0.20, 0.40, 0.50]
    hours = [(ph.min_duration / timedelta(hours=1), ph.max_duration / timedelta(hours=1))
             for ph in p.phases]
    assert hours == [(24, 48), (48, 72), (72, 120), (72, 120), (48, 72)]
    assert [ph.min_impressions for ph in p.phases][1:3] == [50_000, 200_000]
    ph3, ph4, ph5 = p.phase(3), p.phase(4), p.phase(5)
    assert (ph3.p_better, ph3.inconclusive_advances, ph3.p_worse_rollback) == (0.6, True, 0.9)
    assert (ph4.p_better, ph4.min_lift, ph4.segments) == (0.85, 0.01, True)
    assert (ph5.p_better, ph5.min_lift, ph5.promote, ph5.p_lift) == (0.90, 0.01, True, None)
    assert (p.error_rate_max, p.latency_p99_max_ms, p.click_floor) == (0.001, 10.0, 1e-4)
    assert (p.calibration_low, p.calibration_high, p.bucket_low, p.bucket_high) == (
        0.85, 1.15, 0.7, 1.4)
    assert (p.segment_error_rate_max, p.segment_max_degradation) == (0.5, 0.05)
    assert (p.prior_alpha, p.prior_beta) == (1, 1)


def test_literal_differs_only_in_the_changed_gate() -> None:
    lit, default = Policy.literal(), Policy()
    assert lit.segment_confidence is None and default.segment_confidence == 0.9
    assert lit.phases == default.phases == DEFAULT_PHASES
    assert Policy.literal(time_scale=0.5).time_scale == 0.5


def test_time_scale_shrinks_durations() -> None:
    p = Policy(time_scale=1 / 3600)
    assert p.min_duration(1) == timedelta(seconds=24)
    assert p.max_duration(3) == timedelta(seconds=120)
    assert Policy().min_duration(5) == timedelta(days=2)


def test_round_trip_through_json() -> None:
    p = Policy(time_scale=0.01).replace_phase(5, p_lift=0.95)
    back = Policy.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and back.phase(5).p_lift == 0.95


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"time_scale": 0}, "time_scale"),
    ({"error_rate_max": 1.5}, "error_rate_max"),
    ({"prior_alpha": 0.5}, "prior_alpha"),
    ({"calibration_low": 1.2}, "calibration_low"),
    ({"segment_confidence": 1.0}, "segment_confidence"),
    ({"bucket_min_clicks": -1}, "bucket_min_clicks"),
    ({"segment_errors_dimension": ""}, "segment_errors_dimension"),
])
def test_bad_policy_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InputError, match=field):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_bad_phases_name_the_field_and_all_problems_at_once() -> None:
    with pytest.raises(InputError) as info:
        Policy().replace_phase(2, share=0.7, max_duration=timedelta(hours=1), p_better=1.5)
    text = str(info.value)
    assert "phases[1].share" in text and "phases[1].max_duration" in text
    assert "phases[1].p_better" in text
    with pytest.raises(InputError, match="5 phases"):
        Policy(phases=DEFAULT_PHASES[:4])
    with pytest.raises(InputError, match="p_lift needs min_lift"):
        Policy().replace_phase(2, p_lift=0.9)
    with pytest.raises(InputError, match="phase must be 1..5"):
        Policy().phase(0)


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(InputError, match="unknown field"):
        Policy.from_dict({"error_rate": 0.01})
    with pytest.raises(InputError, match="phases"):
        Policy.from_dict({"phases": [{"number": 1, "shares": 0.1}]})
