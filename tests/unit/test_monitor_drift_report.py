"""``headrace drift``'s report over aggregated windows (the Kafka read is covered by
tests/integration/test_monitor_e2e.py): per-window mode, levels, JSON-safety, text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from feature_defs.predictions import Arm, PredictionRecord
from headrace.commands.drift import drift_report, print_report
from headrace.core.jsonsafe import json_safe
from headrace.monitor.profile import build_profile
from headrace.monitor.windows import HOUR_MS, DriftAggregator

T0 = 1_767_225_600_000


def _rec(ts: int, f: list[float]) -> PredictionRecord:
    return PredictionRecord("p", ts, None, None, "us", None, None, None, ("a",), ("c",),
                            (0.05,), (0,), 0, Arm.CHAMPION, "v1", False, 1.0, None, f)


def test_per_window_report(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    prof = build_profile("v1", rng.normal(size=(2000, 2)), ("f1", "f2"),
                         rng.uniform(0, 0.1, 2000), {"country": ["us"] * 2000}, bins=5)
    recs = [_rec(T0 + i * 1000, [float(rng.normal()), float(rng.normal(3))])
            for i in range(600)]  # hour 1
    recs += [_rec(T0 + HOUR_MS + i, [math.nan, float(rng.normal())]) for i in range(50)]
    agg = DriftAggregator(lambda v: prof, windows={"1h": HOUR_MS})
    agg.add(recs)
    report = drift_report(agg, prof, min_rows=100)
    first, second = report["windows"]
    assert (first["start_ms"], first["end_ms"], first["rows"]) == (T0, T0 + HOUR_MS, 600)
    assert first["features"]["f1"]["level"] == "ok" and first["features"]["f1"]["psi"] < 0.1
    assert first["features"]["f2"]["level"] == "alert"
    assert first["context"]["country"]["psi"] == 0 and "ks" not in first["context"]["country"]
    assert first["prediction"]["null_share"] == 0
    # the second hour is all null on f1, but has too few rows to be more than ok
    assert second["features"]["f1"]["null_share"] == 1.0
    assert second["features"]["f1"]["level"] == "ok" and second["features"]["f1"]["psi"] > 5
    assert math.isnan(second["features"]["f1"]["ks"])
    assert json.loads(json.dumps(json_safe(report), allow_nan=False))["windows"][1][
        "features"]["f1"]["ks"] is None
    report.update({"model_version": "v1", "topic": "t", "from_ms": T0, "to_ms": T0 + 2 * HOUR_MS})
    print_report(report)
    out = capsys.readouterr().out
    assert "1h window" in out and "f2" in out and "alert" in out and "context:country" in out
