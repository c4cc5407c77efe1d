"""The monitor's alert rule on hand-made series."""

from __future__ import annotations

import math

from headrace.monitor.rules import (
    AlertRules,
    Evaluation,
    Performance,
    RuleConfig,
    decide,
    level,
    top_features,
)

T0 = 1_767_225_600_000
H = 3_600_000
IMPORTANCE = {"v1": {"f1": 50.0, "f2": 40.0, "f3": 30.0, "f4": 20.0, "f5": 10.0,
                     "f6": 5.0}}


def _rules(**cfg: float) -> AlertRules:
    return AlertRules(RuleConfig(**cfg), IMPORTANCE, {"v1": 0.75})  # type: ignore[arg-type]


def _ev(psi: dict[str, float], start: int = T0, rows: int = 1000, window: str = "1h"
        ) -> Evaluation:
    return Evaluation("v1", window, start, psi, rows)


def test_levels_and_top_features() -> None:
    assert level(0.0999, 1000, 500) == "ok"
    assert level(0.1, 1000, 500) == "warn"
    assert level(0.25, 1000, 500) == "alert"
    assert level(5.0, 499, 500) == "ok"
    assert level(math.nan, 1000, 500) == "ok"
    assert top_features(IMPORTANCE["v1"], 2) == {"f1", "f2"}
    assert top_features({"b": 1.0, "a": 1.0, "c": 0.5}, 1) == {"a"}


def test_fires_on_the_third_consecutive_evaluation_once() -> None:
    rules = _rules()
    assert rules.drift(_ev({"f1": 0.3})) == []
    assert rules.drift(_ev({"f1": 0.3})) == []
    (alert,) = rules.drift(_ev({"f1": 0.31}))
    assert (alert.signal, alert.feature, alert.value, alert.threshold, alert.window,
            alert.window_start_ms) == ("drift", "f1", 0.31, 0.25, "1h", T0)
    assert rules.drift(_ev({"f1": 0.4})) == []  # same window: once
    # the next window starts a new count and fires again after 3
    assert decide(rules, [_ev({"f1": 0.3}, T0 + H)] * 2) == []
    assert len(rules.drift(_ev({"f1": 0.3}, T0 + H))) == 1


def test_two_then_a_gap_does_not_fire() -> None:
    series = [_ev({"f1": 0.3}), _ev({"f1": 0.3}), _ev({"f1": 0.2}), _ev({"f1": 0.3}),
              _ev({"f1": 0.3})]
    assert decide(_rules(), series) == []
    # too few rows is a gap too
    series = [_ev({"f1": 0.3}), _ev({"f1": 0.3}), _ev({"f1": 0.3}, rows=10), _ev({"f1": 0.3})]
    assert decide(_rules(), series) == []


def test_a_feature_outside_the_top_k_never_fires_but_the_prediction_does() -> None:
    assert decide(_rules(), [_ev({"f6": 3.0})] * 10) == []
    assert len(decide(_rules(top_k=6), [_ev({"f6": 3.0})] * 3)) == 1
    fired = decide(_rules(), [_ev({"__prediction__": 1.0, "f6": 1.0})] * 3)
    assert [a.feature for a in fired] == ["__prediction__"]


def test_window_lengths_count_separately() -> None:
    series = [_ev({"f1": 0.3}, window="1h"), _ev({"f1": 0.3}, window="24h"),
              _ev({"f1": 0.3}, window="1h"), _ev({"f1": 0.3}, window="24h"),
              _ev({"f1": 0.3}, window="1h")]
    assert [a.window for a in decide(_rules(), series)] == ["1h"]


def _perf(start: int, auc: float, cal: float = 1.0, n: int = 1000) -> Performance:
    return Performance("v1", "1h", start, n, auc, cal)


def test_auc_below_validation_for_two_closed_windows() -> None:
    rules = _rules()
    assert rules.performance(_perf(T0, 0.72)) == []
    (a,) = rules.performance(_perf(T0 + H, 0.7299))
    assert (a.feature, a.window_start_ms) == ("auc", T0 + H)
    assert math.isclose(a.threshold, 0.73)
    rules = _rules()
    series = [_perf(T0, 0.72), _perf(T0 + H, 0.74), _perf(T0 + 2 * H, 0.72),
              _perf(T0 + 3 * H, math.nan), _perf(T0 + 4 * H, 0.72, n=10)]
    assert decide(rules, series) == []
    # a skipped window (NaN, too few) neither breaks nor extends: the next low one fires
    assert [a.window_start_ms for a in rules.performance(_perf(T0 + 5 * H, 0.6))] == [T0 + 5 * H]


def test_calibration_outside_the_band_fires_once_per_window() -> None:
    rules = _rules()
    assert rules.performance(_perf(T0, 0.8, 1.15)) == []
    assert rules.performance(_perf(T0 + H, 0.8, 0.85)) == []
    (a,) = rules.performance(_perf(T0 + 2 * H, 0.8, 1.2))
    assert (a.feature, a.value, a.threshold) == ("calibration", 1.2, 1.15)
    assert rules.performance(_perf(T0 + 2 * H, 0.8, 1.2)) == []
    (b,) = rules.performance(_perf(T0 + 3 * H, 0.8, 0.5))
    assert b.threshold == 0.85
    assert rules.performance(_perf(T0 + 4 * H, 0.8, 3.0, n=499)) == []
    d = b.to_dict(123)
    assert d == {"at_ms": 123, "signal": "performance", "model_version": "v1",
                 "feature": "calibration", "value": 0.5, "threshold": 0.85, "window": "1h",
                 "window_start_ms": T0 + 3 * H, "detail": b.detail}
