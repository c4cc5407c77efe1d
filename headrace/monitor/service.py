"""``headrace monitor``: the long-running drift and performance monitor, and the
prediction-log reader ``headrace drift`` shares with it.

**No state store.** One confluent-kafka consumer (no group, nothing committed) is
assigned every partition of the prediction log and of the impression and click topics,
each sought to ``offsets_for_times(now - 24 h - attribution)``; the open 1 h and 24 h
windows are then rebuilt exactly from the log, so a crash or a restart loses nothing
and needs no recovery (the last alerts sent are read back from the Redis stream, so
they are not sent twice). A topic that does not exist yet is assigned when it appears.
On the local Tansu broker ``offsets_for_times`` answers 0 (defect D2): the whole log
is read and the windows still hold exactly their records (every record is placed by
its own ``ts``).

**Every tick** (``HEADRACE_MONITOR_TICK_S``, 5 s) :meth:`Monitor.tick` recomputes, for
the champion (``MODELS_DIR/CHAMPION``), the drift of the windows holding the clock
(:func:`~headrace.monitor.windows.window_drift`), sets the gauges
(:mod:`headrace.monitor.metrics`), closes the AUC windows whose clicks are all in
(:mod:`headrace.monitor.auc`; the watermark is the smallest per-partition newest click
``ts``, capped by the impressions' newest ``ts`` + attribution) and runs the alert rule
(:mod:`headrace.monitor.rules`) — only once every partition has been read to its end
once, so a half-read backlog never alerts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from feature_defs.predictions import PredictionFormatError, decode_prediction
from headrace.core.errors import InputError
from headrace.model.artifact import champion_version
from headrace.monitor.alerts import AlertSink
from headrace.monitor.auc import LabelJoin
from headrace.monitor.metrics import MonitorMetrics
from headrace.monitor.profile import ReferenceProfile, load_profile
from headrace.monitor.rules import AlertRules, Evaluation, Performance, RuleConfig
from headrace.monitor.windows import DAY_MS, WINDOWS, DriftAggregator, window_drift

__all__ = ["EventDecoder", "ModelInfo", "read_model_info", "Monitor", "MonitorService",
           "LOOKBACK_MS"]

log = logging.getLogger(__name__)

#: (kind, consumed messages, now_ms) -> the accepted events as dicts (``event_id``,
#: ``ts`` epoch ms, ``impression_id``, ``model_version``, ``p_ctr``): the stream's
#: decoder, injected by the command (this package does not import ``streams``)
EventDecoder = Callable[[str, Sequence[Any], int], list[Mapping[str, Any]]]
_BATCH: Final = 5000
#: how far back the monitor starts reading: the open 24 h window (plus attribution)
LOOKBACK_MS: Final = DAY_MS


@dataclass(frozen=True)
class ModelInfo:
    """What the rules need of a model's ``metadata.json``."""

    version: str
    importance: Mapping[str, float]
    validation_auc: float | None


def read_model_info(models_dir: Path | str, version: str) -> ModelInfo | None:
    """``importance_gain`` and ``metrics.auc`` of ``version``; None without metadata.

    Raises:
        InputError: the metadata exists but is not JSON.
    """
    path = Path(models_dir) / version / "metadata.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    auc = (meta.get("metrics") or {}).get("auc")
    imp = meta.get("importance_gain") or {}
    return ModelInfo(version, {str(k): float(v) for k, v in imp.items()},
                     float(auc) if isinstance(auc, int | float) else None)


class Monitor:
    """The monitor's state and its tick, without Kafka (fed decoded data).

    Args:
        models_dir: the models folder.
        rules: the thresholds.
        attribution_ms: the click attribution window.
        metrics: the gauges to set.
        sink: where alerts go.
        clock: epoch seconds.
    """

    def __init__(self, models_dir: Path | str, rules: RuleConfig, attribution_ms: int,
                 metrics: MonitorMetrics, sink: AlertSink,
                 clock: Callable[[], float] = time.time) -> None:
        self.models_dir = Path(models_dir)
        self.metrics = metrics
        self.sink = sink
        self.clock = clock
        self.attribution_ms = attribution_ms
        self.drift = DriftAggregator(self._profile)
        self.labels = LabelJoin(attribution_ms)
        self.infos: dict[str, ModelInfo | None] = {}
        self._importance: dict[str, Mapping[str, float]] = {}
        self._validation_auc: dict[str, float] = {}
        self.rules = AlertRules(rules, self._importance, self._validation_auc)
        self.newest_ts: int | None = None
        self._click_wm: dict[int, int] = {}
        self._imp_wm: dict[int, int] = {}
        self._labelled: set[tuple[str, str, str]] = set()
        self._bad_profiles: set[str] = set()

    def _profile(self, version: str) -> ReferenceProfile | None:
        try:
            return load_profile(self.models_dir, version)
        except InputError as exc:
            if version not in self._bad_profiles:  # once, not at every tick
                self._bad_profiles.add(version)
                log.warning("monitor: model %s: %s (its records count as no_profile)",
                            version, exc)
            return None

    def info(self, version: str) -> ModelInfo | None:
        """``version``'s metadata (cached)."""
        if version not in self.infos:
            try:
                info = read_model_info(self.models_dir, version)
            except InputError as exc:
                log.warning("monitor: %s", exc)
                info = None
            self.infos[version] = info
            if info is not None:  # what the rules read
                self._importance[version] = info.importance
                if info.validation_auc is not None:
                    self._validation_auc[version] = info.validation_auc
        return self.infos[version]

    def predictions(self, values: Sequence[bytes | None]) -> None:
        """Decode and count prediction-log message values."""
        recs = []
        bad = 0
        for v in values:
            try:
                recs.append(decode_prediction(v or b""))
            except PredictionFormatError:
                bad += 1
        out = self.drift.add(recs)
        if bad:
            out["undecodable"] += bad
        for outcome, n in out.items():
            self.metrics.records.labels(outcome=outcome).inc(n)
        if recs:
            newest = max(r.ts for r in recs)
            self.newest_ts = newest if self.newest_ts is None else max(self.newest_ts, newest)

    def impressions(self, events: Sequence[Mapping[str, Any]], partition: int) -> None:
        """Add decoded impressions of one partition."""
        for e in events:
            self.labels.impression(str(e["event_id"]), int(e["ts"]), e.get("model_version"),
                                   e.get("p_ctr"))
            self._imp_wm[partition] = max(self._imp_wm.get(partition, e["ts"]), e["ts"])

    def clicks(self, events: Sequence[Mapping[str, Any]], partition: int) -> None:
        """Add decoded clicks of one partition."""
        for e in events:
            self.labels.click(e.get("impression_id"), int(e["ts"]))
            self._click_wm[partition] = max(self._click_wm.get(partition, e["ts"]), e["ts"])

    def watermark_ms(self) -> int | None:
        """The clicks' event-time watermark (module docstring); None before any click."""
        if not self._click_wm:
            return None
        wm = min(self._click_wm.values())
        if self._imp_wm:
            wm = min(wm, min(self._imp_wm.values()) + self.attribution_ms)
        return wm

    def tick(self, *, judge: bool = True) -> list[Any]:
        """One evaluation (module docstring); returns the alerts sent. ``judge``
        False: the gauges only (the backlog is not read yet)."""
        now_ms = int(self.clock() * 1000)
        m = self.metrics
        if self.newest_ts is not None:
            m.event_lag.set(max(0.0, now_ms - self.newest_ts) / 1000)
        series: list[Evaluation | Performance] = []
        try:
            champion = champion_version(self.models_dir)
        except InputError as exc:  # an unreadable CHAMPION: no gauges this tick
            log.warning("monitor: %s", exc)
            champion = None
        self.drift.forget_missing()  # a profile written since is picked up
        profile = None if champion is None else self.drift.profile(champion)
        info = None if champion is None else self.info(champion)
        if info is not None and info.validation_auc is not None:
            m.auc_validation.labels(model_version=info.version).set(info.validation_auc)
        if champion is not None and profile is not None:
            series += self._drift_gauges(champion, profile, now_ms)
        self._drop_stale(champion)
        wm = self.watermark_ms()
        if judge and wm is not None:
            for w in self.labels.close(wm):
                m.auc.labels(model_version=w.model_version, window=w.window).set(w.auc)
                m.calibration.labels(model_version=w.model_version, window=w.window).set(
                    w.calibration_ratio)
                if w.start_ms + w.length_ms > now_ms - LOOKBACK_MS - self.attribution_ms:
                    # a window older than the lookback (read only where the broker cannot
                    # seek by time) sets the gauges but alerts nobody
                    series.append(Performance(w.model_version, w.window, w.start_ms,
                                              w.impressions, w.auc, w.calibration_ratio))
        self.drift.evict_before(now_ms - DAY_MS)
        if not judge:
            return []
        alerts = []
        for item in series:
            if isinstance(item, Evaluation):
                alerts += self.rules.drift(item)
            elif item.model_version == champion:
                alerts += self.rules.performance(item)
        self.sink.send(alerts)
        if not alerts:
            self.sink.flush()
        return alerts

    def _drift_gauges(self, version: str, profile: ReferenceProfile, now_ms: int
                      ) -> list[Evaluation | Performance]:
        m = self.metrics
        out: list[Evaluation | Performance] = []
        for name, length in WINDOWS.items():
            start = now_ms - now_ms % length
            agg = self.drift.aggregates.get((version, name, start))
            m.rows.labels(model_version=version, window=name).set(agg.rows if agg else 0)
            if agg is None:
                for f in self._labelled_features(version, name):
                    for g in (m.psi, m.ks, m.ks_pvalue):
                        g.labels(model_version=version, feature=f, window=name).set(math.nan)
                continue
            psis = {}
            for d in window_drift(agg, profile):
                labels = {"model_version": version, "feature": d.feature, "window": name}
                m.psi.labels(**labels).set(d.psi)
                psis[d.feature] = d.psi
                if not d.feature.startswith("context:"):
                    m.ks.labels(**labels).set(d.ks)
                    m.ks_pvalue.labels(**labels).set(d.ks_pvalue)
                self._labelled.add((version, d.feature, name))
            out.append(Evaluation(version, name, start, psis, agg.rows))
        return out

    def _labelled_features(self, version: str, window: str) -> list[str]:
        return [f for v, f, w in self._labelled if v == version and w == window]

    def _drop_stale(self, champion: str | None) -> None:
        """Remove the drift gauges of a former champion."""
        m = self.metrics
        for key in [k for k in self._labelled if k[0] != champion]:
            v, f, w = key
            for g in (m.psi, m.ks, m.ks_pvalue):
                try:
                    g.remove(v, f, w)
                except KeyError:
                    pass
            try:
                m.rows.remove(v, w)
            except KeyError:
                pass
            self._labelled.discard(key)


class MonitorService:
    """The Kafka side: one consumer, the :class:`Monitor`, the tick loop.

    Args:
        settings: the monitor's settings (``MonitorSettings``).
        decode_events: the impression/click decoder (:data:`EventDecoder`).
        metrics: the metrics (a new registry when None).
        redis: a redis-py client for the alert stream; None: no stream.
        clock: epoch seconds (windows, lag, ``at_ms``); tests pin it.
    """

    def __init__(self, settings: Any, decode_events: EventDecoder, *,
                 metrics: MonitorMetrics | None = None, redis: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        from feature_defs.layout import TOPIC_CLICKS, TOPIC_IMPRESSIONS, TOPIC_PREDICTIONS
        from headrace.rollout.alerts import WebhookAlerter

        self.settings = settings
        self.decode_events = decode_events
        self.metrics = metrics or MonitorMetrics()
        self.clock = clock
        sink = AlertSink(redis, settings.redis_prefix, WebhookAlerter(settings.webhook_url),
                         on_alert=lambda s: self.metrics.alerts.labels(signal=s).inc(),
                         clock=clock)
        self.monitor = Monitor(settings.models_dir, settings.rule_config(),
                               settings.attribution_ms, self.metrics, sink, clock)
        self.monitor.rules.mark_fired(sink.already_sent())
        self.predictions_topic = settings.topic(TOPIC_PREDICTIONS)
        self.kinds = {self.predictions_topic: "prediction",
                      settings.topic(TOPIC_IMPRESSIONS): "impression",
                      settings.topic(TOPIC_CLICKS): "click"}
        self.assigned: set[str] = set()
        self._not_at_end: set[tuple[str, int]] = set()
        self._consumer: Any = None
        self._warned = -math.inf
        self.ticks = 0

    @property
    def caught_up(self) -> bool:
        """Whether the prediction log is assigned and every assigned partition was read
        to its end at least once."""
        return self.predictions_topic in self.assigned and not self._not_at_end

    def start(self) -> None:
        """Create the consumer and assign the topics that exist."""
        from confluent_kafka import Consumer

        conf = {**self.settings.confluent_common(),
                "group.id": f"headrace-monitor.{int(self.clock() * 1000)}",
                "enable.auto.commit": False, "auto.offset.reset": "earliest",
                "enable.partition.eof": True}
        conf.pop("session.timeout.ms", None)  # no group is joined (assign only)
        conf.pop("heartbeat.interval.ms", None)
        self._consumer = Consumer(conf)
        self.assign_new()

    def assign_new(self) -> None:
        """Assign the partitions of every topic not assigned yet that now exists, each
        from ``offsets_for_times(now - 24 h - attribution)``."""
        from confluent_kafka import OFFSET_END, KafkaException, TopicPartition

        c = self._consumer
        try:
            md = c.list_topics(timeout=5)
        except KafkaException as exc:
            log.warning("monitor: kafka metadata unavailable (retried next tick): %s", exc)
            return
        since = int(self.clock() * 1000) - LOOKBACK_MS - self.settings.attribution_ms
        for topic in self.kinds:
            t = md.topics.get(topic)
            if topic in self.assigned or t is None or t.error is not None or not t.partitions:
                continue
            tps = [TopicPartition(topic, p, since) for p in sorted(t.partitions)]
            try:
                found = c.offsets_for_times(tps, timeout=10)
            except KafkaException as exc:
                log.warning("monitor: cannot find offsets of %s (retried): %s", topic, exc)
                continue
            for tp in found:
                if tp.offset < 0:  # nothing at or after that time
                    tp.offset = OFFSET_END
            c.incremental_assign(found)
            self.assigned.add(topic)
            self._not_at_end.update((topic, tp.partition) for tp in found)
            log.info("monitor: reading %s (%d partitions)", topic, len(found))

    def poll(self, timeout_s: float) -> int:
        """Consume one batch and feed it to the monitor; returns the messages read."""
        from confluent_kafka import KafkaError

        msgs = self._consumer.consume(_BATCH, timeout=timeout_s)
        preds: list[bytes | None] = []
        events: dict[tuple[str, int], list[Any]] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._not_at_end.discard((msg.topic(), msg.partition()))
                elif time.monotonic() - self._warned >= 60:  # one line a minute at most
                    self._warned = time.monotonic()
                    log.warning("monitor: kafka: %s (the windows wait for it)", err)
                continue
            kind = self.kinds.get(msg.topic())
            if kind == "prediction":
                preds.append(msg.value())
            elif kind is not None:
                events.setdefault((kind, msg.partition()), []).append(msg)
        if preds:
            self.monitor.predictions(preds)
        now_ms = int(self.clock() * 1000)
        for (kind, partition), batch in events.items():
            decoded = self.decode_events(kind, batch, now_ms)
            if kind == "impression":
                self.monitor.impressions(decoded, partition)
            else:
                self.monitor.clicks(decoded, partition)
        return len(msgs)

    def tick(self) -> list[Any]:
        """Assign new topics, then :meth:`Monitor.tick` (judging once caught up)."""
        if len(self.assigned) < len(self.kinds):
            self.assign_new()
        self.ticks += 1
        return self.monitor.tick(judge=self.caught_up)

    def run(self, stop: Callable[[], bool], tick_s: float | None = None) -> None:
        """Consume and tick every ``tick_s`` (default ``monitor_tick_s``) until
        ``stop()``; the consumer is closed at the end."""
        period = self.settings.monitor_tick_s if tick_s is None else tick_s
        if self._consumer is None:
            self.start()
        next_tick = time.monotonic()
        try:
            while not stop():
                left = next_tick - time.monotonic()
                if left <= 0:
                    self.tick()
                    next_tick = time.monotonic() + period
                    continue
                self.poll(min(left, 0.5))
        finally:
            self.close()

    def close(self) -> None:
        """Close the consumer (idempotent)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
