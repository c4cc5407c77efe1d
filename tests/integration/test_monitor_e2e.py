"""The drift and performance monitor on the real local broker and redis-server.

A models folder with a champion (``metadata.json`` + ``reference_profile.json`` built
on known data), prediction records whose ``f1`` and ``f3`` have shifted (only ``f1``
is in the top-k), impressions and clicks of the hour before: the monitor's gauges
equal a brute-force oracle computed here, ``headrace drift`` over the same window gives
the same PSI/KS to 1e-9, the drift alert lands in the Redis stream exactly once per
window, and a restarted monitor rebuilds the same gauges without sending it again.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from feature_defs.layout import TOPIC_CLICKS, TOPIC_IMPRESSIONS, TOPIC_PREDICTIONS
from feature_defs.predictions import Arm, PredictionRecord, encode_prediction
from headrace.commands.monitor import decode_events
from headrace.monitor.metrics import MonitorMetrics
from headrace.monitor.profile import build_profile, save_profile
from headrace.monitor.service import MonitorService
from headrace.monitor.settings import MonitorSettings
from tests.conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

H = 3_600_000
VERSION = "2026-01-01-00"
FEATURES = ("f1", "f2", "f3")
ATTR_S = 60


def _hist(edges: tuple[float, ...], values: list[float]) -> list[int]:
    out = [0] * (len(edges) + 2)
    for v in values:
        out[-1 if math.isnan(v) else sum(1 for e in edges if v >= e)] += 1
    return out


def _psi(e: list[int], a: list[int]) -> float:
    return sum((max(y / sum(a), 1e-4) - max(x / sum(e), 1e-4))
               * math.log(max(y / sum(a), 1e-4) / max(x / sum(e), 1e-4))
               for x, y in zip(e, a, strict=True))


def _ks(e: list[int], a: list[int]) -> float:
    ce, ca = np.cumsum(e) / sum(e), np.cumsum(a) / sum(a)
    return max(abs(float(x) - float(y)) for x, y in zip(ce, ca, strict=True))


def _pairs_auc(s: list[float], y: list[int]) -> float:
    pos = [a for a, b in zip(s, y, strict=True) if b]
    neg = [a for a, b in zip(s, y, strict=True) if not b]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (
        len(pos) * len(neg))


def _models(folder: Path) -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3))
    x[rng.random(3000) < 0.05, 2] = np.nan
    pred = rng.uniform(0, 0.1, 3000)
    prof = build_profile(VERSION, x, FEATURES, pred,
                         {"country": list(rng.choice(["us", "de"], 3000))}, bins=10)
    (folder / VERSION).mkdir(parents=True)
    (folder / VERSION / "metadata.json").write_text(json.dumps({
        "features": list(FEATURES), "metrics": {"auc": 0.9},
        "importance_gain": {"f1": 10.0, "f2": 5.0, "f3": 1.0}}))
    save_profile(prof, folder / VERSION)
    (folder / "CHAMPION").write_text(VERSION + "\n")
    return prof


def _scrape(m: MonitorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for metric in m.registry.collect():
        for s in metric.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _run(service: MonitorService, until: Any, within_s: float) -> None:
    stop = threading.Event()
    th = threading.Thread(target=service.run, args=(stop.is_set, 0.2), daemon=True)
    th.start()
    deadline = time.monotonic() + within_s
    try:
        while not until() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        th.join(10)
    assert until(), "the monitor did not get there in time"


def test_monitor_gauges_drift_command_and_alert(ns: Namespace, tmp_path: Path,
                                                redis_client: Any) -> None:
    models = tmp_path / "models"
    prof = _models(models)
    settings = ns.settings(MonitorSettings, models_dir=str(models), monitor_min_rows=200,
                           monitor_top_k=1, monitor_attribution_s=ATTR_S)
    topics = [settings.topic(t) for t in (TOPIC_PREDICTIONS, TOPIC_IMPRESSIONS,
                                          TOPIC_CLICKS)]
    admin = AdminClient(settings.confluent_admin())
    # partition 2 stays empty: the monitor must still see itself caught up
    for fut in admin.create_topics([NewTopic(t, 3, 1) for t in topics]).values():
        fut.result(timeout=10)
    now_ms = time.time_ns() // 1_000_000
    start = now_ms - now_ms % H  # the clock is pinned 40 min into this hour
    clock_s = (start + 40 * 60_000) / 1000
    rng = np.random.default_rng(1)
    producer = Producer(settings.confluent_producer())
    served: list[tuple[list[float], float, str]] = []
    for i in range(800):
        f = [float(rng.normal(1.5)), float(rng.normal()), float(rng.normal(2.0))]
        if i % 9 == 0:
            f[2] = math.nan
        p = float(rng.uniform(0, 0.1))
        country = str(rng.choice(["us", "de", "fr"]))
        served.append((f, p, country))
        rec = PredictionRecord(f"p{i}", start + int(rng.integers(0, 30 * 60_000)), f"u{i}",
                               "pub", country, "mobile", "feed", "banner", ("a1", "a2"),
                               ("c1", "c2"), (0.5, p), (1, 0), 0, Arm.CHAMPION, VERSION,
                               False, 1.0, None, f)
        producer.produce(topics[0], encode_prediction(rec), partition=i % 2)
    for i, (shadow, error) in enumerate([(True, None), (False, "boom")]):
        producer.produce(topics[0], encode_prediction(PredictionRecord(
            f"x{i}", start, None, None, None, None, None, None, ("a",), ("c",),
            () if error else (0.1,), () if error else (0,), 0, Arm.CHAMPION, VERSION,
            shadow, 1.0, error, (0.0, 0.0, 0.0))), partition=0)
    producer.produce(topics[0], b"not a record", partition=1)
    # the hour before: impressions with the champion's pCTR, clicks within attribution
    imps: list[tuple[float, int]] = []
    for i in range(400):
        ts = start - H + int(rng.integers(0, H))
        p = float(rng.uniform(0, 0.3))
        clicked = int(rng.random() < p)
        imps.append((p, clicked))
        ev = {"event_id": f"i{i}", "ts": ts, "user_id": f"u{i}", "ad_id": "a1",
              "campaign_id": "c1", "publisher_id": "pub", "placement": "feed",
              "creative_type": "banner", "device_type": "mobile", "country": "us",
              "bid_cpm": 1.0, "prediction_id": f"q{i}", "model_version": VERSION, "p_ctr": p}
        producer.produce(topics[1], json.dumps(ev).encode(), partition=i % 2)
        if clicked:
            click = {"event_id": f"k{i}", "ts": ts + 1000, "impression_id": f"i{i}",
                     "user_id": f"u{i}", "ad_id": "a1", "campaign_id": "c1",
                     "publisher_id": "pub"}
            producer.produce(topics[2], json.dumps(click).encode(), partition=i % 2)
    for part in (0, 1):  # event time moves past the hour + attribution everywhere
        late = start + 5 * 60_000
        producer.produce(topics[1], json.dumps({
            "event_id": f"s{part}", "ts": late, "user_id": "u", "ad_id": "a1",
            "campaign_id": "c1", "publisher_id": "pub", "placement": "feed",
            "creative_type": "banner", "device_type": "mobile", "country": "us",
            "bid_cpm": 1.0}).encode(), partition=part)
        producer.produce(topics[2], json.dumps({
            "event_id": f"z{part}", "ts": late, "impression_id": "none", "user_id": "u",
            "ad_id": "a1", "campaign_id": "c1", "publisher_id": "pub"}).encode(),
            partition=part)
    producer.flush(10)

    def service() -> MonitorService:
        return MonitorService(settings, lambda k, m, n: decode_events(k, m, n, 3_600_000),
                              metrics=MonitorMetrics(), redis=redis_client,
                              clock=lambda: clock_s)

    key = f"{ns.redis_prefix}:monitor:alerts"
    first = service()
    _run(first, lambda: first.caught_up and redis_client.xlen(key) >= 2
         and first.ticks >= 8, 60)
    got = _scrape(first.metrics)

    def g(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    # the oracle: every served row counted by hand on the profile's edges
    want_psi: dict[str, float] = {}
    for j, name in enumerate(FEATURES):
        p = prof.features[name]
        h = _hist(p.edges, [f[j] for f, _, _ in served])
        want_psi[name] = _psi(list(p.counts), h)
        for window in ("1h", "24h"):
            lab = {"model_version": VERSION, "feature": name, "window": window}
            assert g("headrace_drift_psi", **lab) == pytest.approx(want_psi[name], abs=1e-9)
            assert g("headrace_drift_ks_statistic", **lab) == pytest.approx(
                _ks(list(p.counts[:-1]), h[:-1]), abs=1e-9)
    hp = _hist(prof.prediction.edges, [p for _, p, _ in served])
    assert g("headrace_drift_psi", model_version=VERSION, feature="__prediction__",
             window="1h") == pytest.approx(_psi(list(prof.prediction.counts), hp), abs=1e-9)
    cp = prof.context["country"]
    hc = [sum(1 for *_, c in served if (c if c in cp.counts else "__other__") == k)
          for k in cp.counts]
    assert g("headrace_drift_psi", model_version=VERSION, feature="context:country",
             window="1h") == pytest.approx(_psi(list(cp.counts.values()), hc), abs=1e-9)
    assert g("headrace_drift_rows", model_version=VERSION, window="1h") == 800
    assert want_psi["f1"] > 0.25 and want_psi["f3"] > 0.25 and want_psi["f2"] < 0.1
    for outcome, n in {"ok": 800, "shadow": 1, "error": 1, "undecodable": 1}.items():
        assert g("headrace_monitor_records_total", outcome=outcome) == n
    assert g("headrace_monitor_event_lag_seconds") >= 10 * 60
    # the AUC of the hour before, closed by the clicks' event time
    s, y = [p for p, _ in imps], [c for _, c in imps]
    assert g("headrace_model_auc", model_version=VERSION, window="1h") == pytest.approx(
        _pairs_auc(s, y), abs=1e-12)
    assert g("headrace_model_calibration_ratio", model_version=VERSION,
             window="1h") == pytest.approx(sum(s) / sum(y), rel=1e-12)
    assert g("headrace_model_auc_validation", model_version=VERSION) == 0.9
    # f1 alerted once per window; f3 (outside the top 1) never
    entries = [json.loads(f[b"alert"]) for _, f in redis_client.xrange(key)]
    drift = [e for e in entries if e["signal"] == "drift"]
    assert sorted((e["feature"], e["window"]) for e in drift) == [("f1", "1h"), ("f1", "24h")]
    assert {e["window_start_ms"] for e in drift if e["window"] == "1h"} == {start}
    assert all(e["value"] == pytest.approx(want_psi["f1"], abs=1e-9) and e["threshold"] == 0.25
               for e in drift)
    assert g("headrace_monitor_alerts_total", signal="drift") == 2

    # headrace drift over the same window: the same numbers
    env = ns.subprocess_env(HEADRACE_MODELS_DIR=str(models), HEADRACE_MONITOR_MIN_ROWS="200")
    out = subprocess.run([sys.executable, "-m", "headrace.cli", "drift", "--model", VERSION,
                          "--from", str(start), "--to", str(start + H), "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (w,) = json.loads(out.stdout)["windows"]
    assert w["rows"] == 800
    for name in FEATURES:
        lab = {"model_version": VERSION, "feature": name, "window": "1h"}
        assert w["features"][name]["psi"] == pytest.approx(g("headrace_drift_psi", **lab),
                                                           abs=1e-9)
        assert w["features"][name]["ks"] == pytest.approx(
            g("headrace_drift_ks_statistic", **lab), abs=1e-9)
        assert w["features"][name]["ks_pvalue"] == pytest.approx(
            g("headrace_drift_ks_pvalue", **lab), abs=1e-9)
    assert w["features"]["f1"]["level"] == "alert" and w["features"]["f2"]["level"] == "ok"
    bad = subprocess.run([sys.executable, "-m", "headrace.cli", "drift", "--model", "nope",
                          "--from", str(start), "--to", str(start + H)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown model nope" in bad.stderr

    # a restart rebuilds the same windows from the log and sends nothing again
    second = service()
    _run(second, lambda: second.caught_up and second.ticks >= 6, 60)
    again = _scrape(second.metrics)
    assert again[("headrace_drift_psi", (("feature", "f1"), ("model_version", VERSION),
                                         ("window", "1h")))] == g(
        "headrace_drift_psi", model_version=VERSION, feature="f1", window="1h")
    assert redis_client.xlen(key) == len(entries)


def test_performance_alerts_for_a_miscalibrated_model_that_ranks_at_random(
        ns: Namespace, tmp_path: Path, redis_client: Any) -> None:
    """Two closed hours of the champion's impressions whose logged pCTRs (0.1-0.3) are
    about four times the real click rate (5 %, independent of the pCTR): the calibration
    alert fires for each hour, the AUC alert (validation 0.9 - 0.02) once, on the second
    consecutive hour; each lands in the Redis stream once."""
    models = tmp_path / "models"
    _models(models)
    settings = ns.settings(MonitorSettings, models_dir=str(models), monitor_min_rows=200,
                           monitor_attribution_s=ATTR_S)
    topics = [settings.topic(t) for t in (TOPIC_PREDICTIONS, TOPIC_IMPRESSIONS,
                                          TOPIC_CLICKS)]
    admin = AdminClient(settings.confluent_admin())
    for fut in admin.create_topics([NewTopic(t, 2, 1) for t in topics]).values():
        fut.result(timeout=10)
    now_ms = time.time_ns() // 1_000_000
    start = now_ms - now_ms % H
    clock_s = (start + 40 * 60_000) / 1000
    rng = np.random.default_rng(7)
    producer = Producer(settings.confluent_producer())
    hours: dict[int, tuple[list[float], list[int]]] = {}
    for hour in (start - 2 * H, start - H):
        scores, labels = [], []
        for i in range(300):
            ts = hour + int(rng.integers(0, H - ATTR_S * 1000))
            p, clicked = float(rng.uniform(0.1, 0.3)), int(rng.random() < 0.05)
            scores.append(p)
            labels.append(clicked)
            eid = f"i{hour}-{i}"
            producer.produce(topics[1], json.dumps({
                "event_id": eid, "ts": ts, "user_id": f"u{i}", "ad_id": "a1",
                "campaign_id": "c1", "publisher_id": "pub", "placement": "feed",
                "creative_type": "banner", "device_type": "mobile", "country": "us",
                "bid_cpm": 1.0, "prediction_id": f"q{eid}", "model_version": VERSION,
                "p_ctr": p}).encode(), partition=i % 2)
            if clicked:
                producer.produce(topics[2], json.dumps({
                    "event_id": f"k{eid}", "ts": ts + 2000, "impression_id": eid,
                    "user_id": f"u{i}", "ad_id": "a1", "campaign_id": "c1",
                    "publisher_id": "pub"}).encode(), partition=i % 2)
        hours[hour] = (scores, labels)
    for part in (0, 1):  # the event time passes both hours + attribution everywhere
        producer.produce(topics[1], json.dumps({
            "event_id": f"s{part}", "ts": start + 5 * 60_000, "user_id": "u", "ad_id": "a1",
            "campaign_id": "c1", "publisher_id": "pub", "placement": "feed",
            "creative_type": "banner", "device_type": "mobile", "country": "us",
            "bid_cpm": 1.0}).encode(), partition=part)
        producer.produce(topics[2], json.dumps({
            "event_id": f"z{part}", "ts": start + 5 * 60_000, "impression_id": "none",
            "user_id": "u", "ad_id": "a1", "campaign_id": "c1",
            "publisher_id": "pub"}).encode(), partition=part)
    producer.flush(10)
    service = MonitorService(settings, lambda k, m, n: decode_events(k, m, n, 3_600_000),
                             metrics=MonitorMetrics(), redis=redis_client,
                             clock=lambda: clock_s)
    key = f"{ns.redis_prefix}:monitor:alerts"

    def hourly() -> list[dict[str, Any]]:
        return [e for e in (json.loads(f[b"alert"]) for _, f in redis_client.xrange(key))
                if e["signal"] == "performance" and e["window"] == "1h"]

    _run(service, lambda: service.caught_up and len(hourly()) >= 3 and service.ticks >= 6, 60)
    got = {(e["feature"], e["window_start_ms"]): e for e in hourly()}
    assert set(got) == {("calibration", start - 2 * H), ("calibration", start - H),
                        ("auc", start - H)}
    for hour, (scores, labels) in hours.items():
        ratio = sum(scores) / sum(labels)  # the oracle: predicted / observed
        assert ratio > 1.15
        assert got[("calibration", hour)]["value"] == pytest.approx(ratio, rel=1e-12)
        assert got[("calibration", hour)]["threshold"] == 1.15
    second_auc = _pairs_auc(*hours[start - H])
    assert second_auc < 0.88
    assert got[("auc", start - H)]["value"] == pytest.approx(second_auc, abs=1e-12)
    assert got[("auc", start - H)]["threshold"] == pytest.approx(0.88)
    assert _scrape(service.metrics)[("headrace_monitor_alerts_total",
                                     (("signal", "performance"),))] >= 3
