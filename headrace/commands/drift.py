"""``headrace drift``: one model's drift over a time range, read from the prediction log.

``headrace drift --model V --from T1 --to T2 [--window 1h|24h] [--json]`` reads the
prediction-log topic (``{HEADRACE_TOPIC_PREFIX}headrace-predictions``, or ``--topic``)
with confluent-kafka from ``offsets_for_times(T1)`` in every partition, stopping a
partition at its end or at its first message whose Kafka timestamp is at or after
``T2 + --grace`` (60 s: the log's delivery delay, so a record of time < T2 written a
little later still counts). The served records of model V with ``T1 <= ts < T2`` are
aggregated by the monitor's own code (:class:`~headrace.monitor.windows.
DriftAggregator`): over the whole range, or with ``--window`` per aligned window
(only the part of each window inside the range), and compared with V's reference
profile: per feature ``{psi, ks, ks_pvalue, null_share, rows, level}`` (level
``ok|warn|alert``, :func:`~headrace.monitor.rules.level` with
``HEADRACE_MONITOR_MIN_ROWS``), the same for the prediction and, PSI only, for each
context column. The numbers equal the ``headrace monitor`` gauges of the same window.

Exit 2 with one sentence: unparseable or empty range, an unknown model, a model without
``reference_profile.json``, a topic that does not exist.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headrace.core.errors import BrokerError, InputError

__all__ = ["register", "handler", "read_range", "drift_report", "print_report"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "drift", help="a model's feature and prediction drift over a time range",
        description="Read the prediction log over [FROM, TO) and compare model V's served "
        "feature rows and predictions with its reference profile (PSI, binned KS).")
    p.add_argument("--model", required=True, metavar="V", help="the model version")
    p.add_argument("--from", dest="from_", required=True, metavar="T1",
                   help="start (inclusive): epoch ms or ISO-8601 with a zone")
    p.add_argument("--to", required=True, metavar="T2", help="end (exclusive)")
    p.add_argument("--window", choices=("1h", "24h"), default=None,
                   help="one result per aligned window instead of one for the range")
    p.add_argument("--topic", default=None,
                   help="the prediction-log topic (default: the prefix + "
                        "headrace-predictions)")
    p.add_argument("--models-dir", default=None, help="default HEADRACE_MODELS_DIR")
    p.add_argument("--grace", default="60s", metavar="DURATION",
                   help="read this long past T2 in Kafka time (default 60s)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="give up when Kafka answers nothing for S seconds (default 30)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=handler)


def read_range(conf: dict[str, Any], topic: str, from_ms: int, to_ms: int,
               timeout_s: float = 30.0) -> Iterator[list[bytes | None]]:
    """Batches of message values of ``topic`` from ``offsets_for_times(from_ms)`` in
    every partition until each partition's end or its first message with a Kafka
    timestamp >= ``to_ms``.

    Raises:
        InputError: the topic does not exist.
        BrokerError: Kafka answered nothing for ``timeout_s``.
    """
    from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

    c = Consumer({**conf, "enable.partition.eof": True, "enable.auto.commit": False})
    try:
        try:
            md = c.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            raise BrokerError(f"kafka unavailable: {exc}", transient=True) from exc
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            raise InputError(f"the topic {topic} does not exist (is the prediction log on, "
                             "and the prefix right?)")
        tps = [TopicPartition(topic, p, from_ms) for p in sorted(t.partitions)]
        found = c.offsets_for_times(tps, timeout=timeout_s)
        open_parts = set()
        for tp in found:
            if tp.offset < 0:
                tp.offset = OFFSET_END
            open_parts.add(tp.partition)
        c.assign(found)
        last = time.monotonic()
        while open_parts:
            msgs = c.consume(5000, timeout=0.5)
            if not msgs and time.monotonic() - last > timeout_s:
                raise BrokerError(f"kafka answered nothing on {topic} for {timeout_s:g} s",
                                  transient=True)
            batch: list[bytes | None] = []
            for m in msgs:
                last = time.monotonic()
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                    continue
                if m.partition() not in open_parts:
                    continue
                if m.timestamp()[1] >= to_ms:
                    open_parts.discard(m.partition())
                    continue
                batch.append(m.value())
            if batch:
                yield batch
    finally:
        c.close()


def handler(args: argparse.Namespace) -> int:
    """Run ``headrace drift`` (module docstring)."""

    from feature_defs.layout import TOPIC_PREDICTIONS
    from feature_defs.predictions import PredictionFormatError, decode_prediction
    from headrace.core.jsonsafe import json_safe
    from headrace.core.timeparse import parse_duration, parse_time
    from headrace.monitor.profile import load_profile
    from headrace.monitor.settings import MonitorSettings
    from headrace.monitor.windows import WINDOWS, DriftAggregator

    settings = MonitorSettings.load()
    t1, t2 = parse_time(args.from_), parse_time(args.to)
    if t2 <= t1:
        raise InputError(f"--to ({args.to}) must be after --from ({args.from_})")
    grace = parse_duration(args.grace)
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    models_dir = Path(args.models_dir or settings.models_dir)
    version = str(args.model)
    if not (models_dir / version / "metadata.json").is_file():
        raise InputError(f"unknown model {version}: no {models_dir / version / 'metadata.json'}")
    profile = load_profile(models_dir, version)
    if profile is None:
        raise InputError(f"model {version} has no reference profile "
                         f"({models_dir / version / 'reference_profile.json'}); it was "
                         "trained before profiles existed")
    topic = args.topic or settings.topic(TOPIC_PREDICTIONS)
    agg = DriftAggregator(lambda v: profile if v == version else None,
                          windows={args.window: WINDOWS[args.window]} if args.window else {},
                          span=None if args.window else (t1, t2))
    conf = {**settings.confluent_common(), "group.id": f"headrace-drift.{time.time_ns()}"}
    conf.pop("session.timeout.ms", None)
    conf.pop("heartbeat.interval.ms", None)
    undecodable = 0
    for values in read_range(conf, topic, t1, t2 + grace, args.timeout):
        recs = []
        for v in values:
            try:
                r = decode_prediction(v or b"")
            except PredictionFormatError:
                undecodable += 1
                continue
            if r.model_version == version and t1 <= r.ts < t2:
                recs.append(r)
        agg.add(recs)
    report = drift_report(agg, profile, settings.monitor_min_rows)
    report.update({"model_version": version, "topic": topic, "from_ms": t1, "to_ms": t2,
                   "undecodable": undecodable})
    if args.json:
        print(json.dumps(json_safe(report), allow_nan=False, sort_keys=True))
    else:
        print_report(report)
    return 0


def drift_report(agg: Any, profile: Any, min_rows: int) -> dict[str, Any]:
    """The JSON report of every window of ``agg`` (start order)."""
    from headrace.monitor.rules import level
    from headrace.monitor.windows import CONTEXT_PREFIX, PREDICTION, window_drift

    windows = []
    for (_v, name, start), a in sorted(agg.aggregates.items(), key=lambda kv: kv[0][2]):
        feats: dict[str, Any] = {}
        ctx: dict[str, Any] = {}
        pred: dict[str, Any] = {}
        for d in window_drift(a, profile):
            entry = {"psi": d.psi, "ks": d.ks, "ks_pvalue": d.ks_pvalue,
                     "null_share": d.null_share, "rows": d.rows,
                     "level": level(d.psi, d.rows, min_rows)}
            if d.feature == PREDICTION:
                pred = entry
            elif d.feature.startswith(CONTEXT_PREFIX):
                del entry["ks"], entry["ks_pvalue"]
                ctx[d.feature[len(CONTEXT_PREFIX):]] = entry
            else:
                feats[d.feature] = entry
        windows.append({"window": name, "start_ms": start, "end_ms": a.end_ms,
                        "rows": a.rows, "features": feats, "prediction": pred,
                        "context": ctx})
    return {"records": dict(agg.outcomes), "windows": windows}


def print_report(report: dict[str, Any]) -> None:
    """The report as a table per window, on stdout."""
    out = sys.stdout
    print(f"model {report['model_version']}, {report['topic']} "
          f"[{report['from_ms']}, {report['to_ms']}): records {report['records']}", file=out)
    if not report["windows"]:
        print("no served record of this model in the range", file=out)
    for w in report["windows"]:
        print(f"\n{w['window']} window [{w['start_ms']}, {w['end_ms']}): {w['rows']} rows",
              file=out)
        print(f"  {'feature':<32} {'psi':>9} {'ks':>7} {'ks_p':>9} {'null':>6}  level",
              file=out)
        rows = [*w["features"].items(), ("__prediction__", w["prediction"]),
                *((f"context:{k}", v) for k, v in w["context"].items())]
        for name, e in rows:
            print(f"  {name:<32} {e['psi']:>9.4f} {e.get('ks', float('nan')):>7.4f} "
                  f"{e.get('ks_pvalue', float('nan')):>9.3g} {e['null_share']:>6.3f}  "
                  f"{e['level']}", file=out)
