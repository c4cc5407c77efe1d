"""``headrace simulate drift``: drift found, and a model retrained, with no human step,
through the real system on the embedded local stack (:mod:`headrace.stack.local`).

1. The stack (Kafka, redis-server, S3), a stream worker (the shipped definitions), one
   ``headrace serve`` with the prediction log on, and a champion trained on synthetic
   rows (:func:`~headrace.simulate.world.train_version` kind ``drift``: ``bid_cpm``,
   ``device_type``, ``country``). Past impressions and clicks give every ad its online
   features, so the retrained model has something to learn from.
2. The simulated ad server (:mod:`headrace.simulate.traffic`) calls ``Score`` for
   ``baseline_s`` seconds. The champion's reference profile
   (:mod:`headrace.monitor.profile`) is built from what it served then: the feature row
   of each answer's first candidate, exactly what the server logs. (A reference period
   of served traffic, as NannyML's and Evidently's reference data can be: the synthetic
   training rows hold uniform bids, while the first candidate of six carries the
   highest bid, so a profile of the training rows would call every run drifted.)
3. ``headrace monitor`` and ``headrace pipeline schedule`` start (the real processes,
   the monitor reading the prediction log, the scheduler reading the monitor's alerts).
4. The shift: from then on ``shift_share`` of the requests come from ``BR`` (a third
   before) and BR's click rates are ``shift_lift`` times what they were. The ranking
   does not move (a country's lift multiplies every candidate of a request alike), so
   ``bid_cpm`` and ``device_type`` keep their distributions: they are the stable
   features, ``country`` the shifted one.
5. Measured: the monitor's PSI of every feature (its Prometheus endpoint), the time from
   the shift to the drift alert (its Redis stream), whether the alert started a
   pipeline run, whether that run registered a challenger, and the run's duration.
   One JSON summary; ``as_expected`` checks the targets (:data:`TARGETS`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from headrace.core.errors import HeadraceError
from headrace.simulate.procs import CLI, Children
from headrace.simulate.traffic import AdServer, EventPump
from headrace.simulate.world import COUNTRIES, DEVICES, DRIFT_FEATURES, World, train_version

__all__ = ["TARGETS", "run_drift_simulation", "served_rows"]

#: the issue's targets: the shifted feature's PSI, every stable feature's, the seconds
#: from the shift to the alert
TARGETS: Mapping[str, float] = {"shifted_feature_psi_min": 0.25,
                                "stable_feature_psi_max": 0.1, "alert_seconds_max": 120.0}
_SHIFTED = "country"
_STABLE = ("bid_cpm", "device_type")
#: clicks come 1.2-4 s after their impression: the pipeline's invalid-traffic filter
#: drops clicks under a second, and its labels attribute clicks within 10 s
_CLICK_DELAY_MS = (1200, 4000)
#: a pipeline run's statuses that end it (``failed`` would be resumed by the scheduler
#: later, with its transient failure waited out; the simulation reports it as it is)
_FINAL = ("succeeded", "rejected", "invalid", "abandoned", "failed")


def _say(line: str) -> None:
    print(f"[simulate] {line}", file=sys.stderr, flush=True)


def served_rows(shown: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The drift champion's input rows of what the ad server was answered (the first
    candidate's ``bid_cpm``, the request's device and country as the model's category
    codes) and the answers' first pCTRs: the rows the server logs."""
    x = np.array([[s["bid_cpm"], DEVICES.index(s["device_type"]),
                   COUNTRIES.index(s["country"])] for s in shown], dtype=np.float64)
    return x.reshape(-1, len(DRIFT_FEATURES)), np.array([s["p_ctr"] for s in shown])


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """The monitor's ``headrace_drift_psi`` gauges: (feature, window) -> value."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("headrace_drift_psi{"):
            continue
        labels, _, value = line.rpartition(" ")
        fields = dict(part.split("=", 1) for part in labels[labels.index("{") + 1:-1]
                      .split(","))
        out[(fields["feature"].strip('"'), fields["window"].strip('"'))] = float(value)
    return out


def _alerts(redis: Any, key: str) -> list[dict[str, Any]]:
    out = []
    for _id, fields in redis.xrange(key):
        raw = fields.get(b"alert") or fields.get("alert")
        if raw is not None:
            out.append(json.loads(raw))
    return out


def _pipeline_runs(env: Mapping[str, str]) -> list[dict[str, Any]]:
    proc = subprocess.run([*CLI, "pipeline", "status", "--json"], env=dict(env),
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return []
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return []
    runs = doc.get("runs") if isinstance(doc, dict) else doc
    return list(runs or [])


def run_drift_simulation(seed: int = 0, *, rate: float = 150.0, baseline_s: float = 40.0,
                         shift_share: float = 0.9, shift_lift: float = 1.5,
                         history_per_ad: int = 300, timeout_s: float = 840.0
                         ) -> dict[str, Any]:
    """Run the simulation end to end; returns the summary (module docstring).

    Raises:
        HeadraceError: a service did not start, or the loop did not finish in time.
    """
    from headrace.core.settings import CommonSettings
    from headrace.model.artifact import set_champion
    from headrace.model.registry import ModelRegistry
    from headrace.monitor.profile import build_profile, save_profile
    from headrace.stack.local import local_stack
    from headrace.stack.proc import free_port
    from serving.client import FeatureClient

    started = time.monotonic()
    world = World(seed)
    with tempfile.TemporaryDirectory(prefix="headrace-sim-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        _say("starting the local stack")
        info = stack.enter_context(local_stack(work / "stack"))
        models = work / "models"
        champion = train_version(models, 0, world, "drift", seed)
        set_champion(models, champion)
        tag = uuid.uuid4().hex[:6]
        env = {**os.environ, **info.env, "HEADRACE_LOG_LEVEL": "WARNING",
               "HEADRACE_MODELS_DIR": str(models), "HEADRACE_REDIS_PREFIX": f"sim{tag}",
               "HEADRACE_TOPIC_PREFIX": f"sim{tag}.", "HEADRACE_GROUP_ID": f"sim{tag}"}
        children = Children()
        stack.callback(children.stop)
        pump = EventPump(env)
        rng = np.random.default_rng(seed)
        now = time.time_ns() // 1_000_000
        history = world.history(history_per_ad, now - 1_200_000, now - 5_000, rng,
                                click_delay_ms=_CLICK_DELAY_MS)
        pump.send_now(history)
        children.spawn(["worker"], {
            **env, "HEADRACE_DATA_DIR": str(work / "worker"),
            "HEADRACE_FLUSH_INTERVAL_MS": "200", "HEADRACE_OFFLINE_FLUSH_INTERVAL_MS": "5000"},
            work / "worker.log")
        port = free_port()
        children.spawn(["serve", "--port", str(port), "--host", "127.0.0.1", "--workers",
                        "4"], {**env, "HEADRACE_SERVER_ID": "sim-s1",
                               "HEADRACE_PREDICTION_LOG": "true"}, work / "serve.log")
        address = f"127.0.0.1:{port}"
        client = FeatureClient(address)
        client.wait_ready(timeout_s=90)
        client.close()
        _say(f"server up; {len(history)} past events produced; {baseline_s:g} s of "
             f"baseline traffic at {rate:g} requests/s")
        pump.start()
        ads = AdServer(world, [address], pump, rate=rate, threads=4, seed=seed)
        ads.record_shown = True
        ads.click_delay_ms = _CLICK_DELAY_MS
        ads.start()
        time.sleep(baseline_s)
        with ads.lock:
            baseline = list(ads.shown)
        x, p = served_rows(baseline)
        profile = build_profile(champion, x, DRIFT_FEATURES, p)
        save_profile(profile, models / champion)
        _say(f"reference profile of {len(baseline)} served rows; starting the monitor and "
             "the pipeline scheduler")
        metrics_port = free_port()
        children.spawn(["monitor"], {
            **env, "HEADRACE_METRICS_PORT": str(metrics_port), "HEADRACE_MONITOR_TICK_S": "2",
            "HEADRACE_MONITOR_MIN_ROWS": "500", "HEADRACE_MONITOR_CONSECUTIVE": "3",
            "HEADRACE_MONITOR_ATTRIBUTION_S": "10"}, work / "monitor.log")
        children.spawn(["pipeline", "schedule"], {
            **env, "HEADRACE_PIPELINE_POLL_S": "2", "HEADRACE_PIPELINE_EVERY": "3650d",
            "HEADRACE_PIPELINE_CANDIDATES": "8", "HEADRACE_PIPELINE_SEARCH_BUDGET_S": "60",
            # the run's labels: every simulated impression but the last attribution window
            "HEADRACE_PIPELINE_LOOKBACK": "1h", "HEADRACE_PIPELINE_ATTRIBUTION": "10s",
            "HEADRACE_DATA_DIR": str(work / "pipeline")}, work / "pipeline.log")
        time.sleep(5.0)
        shift_ms = time.time_ns() // 1_000_000
        t_shift = time.monotonic()
        world.shift_country("BR", shift_share, shift_lift)
        _say(f"shift: BR gets {shift_share:.0%} of the requests, its CTRs x{shift_lift:g}")
        settings = CommonSettings.from_env(env)
        redis = settings.redis_config().client(socket_timeout=5)
        key = f"{settings.redis_prefix}:monitor:alerts"
        alert: dict[str, Any] | None = None
        psi_at_alert: dict[tuple[str, str], float] = {}
        run: dict[str, Any] | None = None
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if alert is None:
                drift = [a for a in _alerts(redis, key) if a.get("signal") == "drift"]
                if drift:
                    alert = drift[0]
                    psi_at_alert = _scrape(metrics_port)
                    _say(f"{time.monotonic() - t_shift:6.1f} s  drift alert: "
                         f"{alert.get('feature')} PSI {alert.get('value')}")
                continue
            runs = [r for r in _pipeline_runs(env)
                    if (r.get("trigger") or {}).get("kind") == "drift"]
            run = max(runs, key=lambda r: r.get("created_ms") or 0) if runs else None
            if run is not None and run.get("status") in _FINAL:
                break
        ads.stop()
        pump.stop_flag.set()
        pump.join(10)
        if alert is None:
            tail = (work / "monitor.log").read_text(errors="replace")[-1500:]
            raise HeadraceError(f"no drift alert within {timeout_s:g} s of the start: {tail}")
        registry = ModelRegistry(models)
        challenger = registry.challenger()
        trained = {}
        if challenger is not None:
            meta = json.loads((models / challenger / "metadata.json").read_text())
            trained = {"auc": meta["metrics"]["auc"], "logloss": meta["metrics"]["logloss"],
                       "features": len(meta["features"]), "rows": meta["data"]["rows"],
                       "candidates_ran": len(meta["search"]["results"])}
        window = str(alert.get("window") or "1h")
        stable = [psi_at_alert.get((f, window), float("nan")) for f in _STABLE]
        shifted = psi_at_alert.get((_SHIFTED, window), float("nan"))
        alert_s = (int(alert["at_ms"]) - shift_ms) / 1000.0
        doc: dict[str, Any] = {
            "seed": seed, "champion": champion, "baseline_rows": len(baseline),
            "shift": {"country": "BR", "share": shift_share, "ctr_lift": shift_lift},
            "shifted_feature": _SHIFTED, "shifted_feature_psi": shifted,
            "stable_feature_psi": dict(zip(_STABLE, stable, strict=True)),
            "stable_feature_psi_max": max(stable), "alert": alert,
            "alert_seconds": round(alert_s, 1), "window": window,
            "retrain_started": run is not None, "pipeline_run": run,
            "challenger_registered": challenger is not None, "challenger": challenger,
            "challenger_model": trained,
            "pipeline_status": (run or {}).get("status"),
            "pipeline_seconds": None if not run or not run.get("finished_ms") else round(
                (run["finished_ms"] - run["created_ms"]) / 1000, 1),
            "alert_to_registered_seconds": None if not run or not run.get("finished_ms")
            else round((run["finished_ms"] - int(alert["at_ms"])) / 1000, 1),
            "requests": ads.requests, "score_errors": ads.errors,
            "targets": dict(TARGETS), "seconds": round(time.monotonic() - started, 1)}
        doc["as_expected"] = bool(
            shifted >= TARGETS["shifted_feature_psi_min"]
            and max(stable) < TARGETS["stable_feature_psi_max"]
            and alert_s <= TARGETS["alert_seconds_max"] and doc["retrain_started"]
            and doc["challenger_registered"])
        return doc
