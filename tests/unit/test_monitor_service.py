"""The monitor's tick without Kafka: encoded prediction records in, gauges and alerts
out (pinned clock, no Redis), checked against PSI computed by hand; and the metric
names the dashboard relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from feature_defs.predictions import Arm, PredictionRecord, encode_prediction
from headrace.monitor.alerts import AlertSink
from headrace.monitor.metrics import MonitorMetrics
from headrace.monitor.profile import build_profile, save_profile
from headrace.monitor.rules import RuleConfig
from headrace.monitor.service import Monitor
from headrace.rollout.alerts import WebhookAlerter

T0 = 1_767_225_600_000
V = "2026-01-01-00"


def _models(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 2))
    prof = build_profile(V, x, ("f1", "f2"), rng.uniform(0, 0.1, 1000), bins=4)
    (tmp_path / V).mkdir()
    save_profile(prof, tmp_path / V)
    (tmp_path / V / "metadata.json").write_text(json.dumps(
        {"features": ["f1", "f2"], "metrics": {"auc": 0.8},
         "importance_gain": {"f1": 2.0, "f2": 1.0}}))
    (tmp_path / "CHAMPION").write_text(V)
    return tmp_path


def _rec(i: int, f: list[float]) -> bytes:
    return encode_prediction(PredictionRecord(
        f"p{i}", T0 + i, None, None, "us", None, None, None, ("a",), ("c",), (0.05,), (0,),
        0, Arm.CHAMPION, V, False, 1.0, None, f))


def test_tick_sets_gauges_and_alerts_once(tmp_path: Path) -> None:
    models = _models(tmp_path)
    metrics = MonitorMetrics()
    sink = AlertSink(None, "hr", WebhookAlerter(None),
                     on_alert=lambda s: metrics.alerts.labels(signal=s).inc(),
                     clock=lambda: T0 / 1000)
    mon = Monitor(models, RuleConfig(min_rows=10, top_k=1), 0, metrics, sink,
                  clock=lambda: (T0 + 60_000) / 1000)
    mon.predictions([_rec(i, [5.0, 5.0]) for i in range(20)] + [b"junk"])
    assert mon.tick(judge=False) == []  # backlog not read: gauges only
    r = metrics.registry
    labels = {"model_version": V, "feature": "f1", "window": "1h"}
    prof_counts = [250, 250, 250, 250, 0]  # 4 quantile bins of 1000 rows, no nulls
    want = sum((max(a, 1e-4) - b) * math.log(max(a, 1e-4) / b)
               for a, b in zip([0, 0, 0, 1, 0], [max(c / 1000, 1e-4) for c in prof_counts],
                               strict=True))
    got = r.get_sample_value("headrace_drift_psi", labels)
    assert got is not None and abs(got - want) < 1e-9
    assert r.get_sample_value("headrace_drift_ks_statistic", labels) == 0.75
    assert r.get_sample_value("headrace_drift_rows", {"model_version": V, "window": "1h"}) == 20
    assert r.get_sample_value("headrace_monitor_records_total", {"outcome": "ok"}) == 20
    assert r.get_sample_value("headrace_monitor_records_total",
                              {"outcome": "undecodable"}) == 1
    assert r.get_sample_value("headrace_model_auc_validation", {"model_version": V}) == 0.8
    assert r.get_sample_value("headrace_monitor_event_lag_seconds") == (60_000 - 19) / 1000
    assert mon.tick() == [] and mon.tick() == []  # evaluations 1 and 2
    fired = mon.tick()
    # f1 and the (constant) prediction in the 1h and the 24h window; f2 is outside the
    # top 1
    assert sorted((a.feature, a.window) for a in fired) == [
        ("__prediction__", "1h"), ("__prediction__", "24h"), ("f1", "1h"), ("f1", "24h")]
    assert mon.tick() == []
    assert r.get_sample_value("headrace_monitor_alerts_total", {"signal": "drift"}) == 4


def test_metric_names() -> None:
    names = {m.name for m in MonitorMetrics().registry.collect()}
    assert names == {"headrace_drift_psi", "headrace_drift_ks_statistic",
                     "headrace_drift_ks_pvalue", "headrace_drift_rows", "headrace_model_auc",
                     "headrace_model_calibration_ratio", "headrace_model_auc_validation",
                     "headrace_monitor_alerts", "headrace_monitor_event_lag_seconds",
                     "headrace_monitor_records"}  # counters collect without _total
