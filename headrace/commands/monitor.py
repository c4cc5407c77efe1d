"""``headrace monitor``: the long-running drift and performance monitor
(:mod:`headrace.monitor.service`).

It reads the prediction log and the impression and click topics from 24 h + the
attribution window back (the open windows are rebuilt from the log: no state store,
nothing lost on a crash), exports the drift and AUC gauges on
``HEADRACE_METRICS_PORT`` every ``HEADRACE_MONITOR_TICK_S`` and sends drift and
performance alerts (log, counter, ``HEADRACE_MONITOR_WEBHOOK_URL``, the Redis stream
``<prefix>:monitor:alerts``). Runs until SIGINT/SIGTERM (exit 0); ``--seconds N``
stops it after N seconds. Settings: :class:`~headrace.monitor.settings.
MonitorSettings`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from headrace.core.errors import UsageError

__all__ = ["register", "handler", "decode_events"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "monitor", help="drift and performance monitor of the champion (long-running)",
        description="Follow the prediction log, impressions and clicks; export drift (PSI, "
        "KS) and rolling AUC / calibration gauges and alert on sustained drift of an "
        "important feature or degraded AUC. Settings: HEADRACE_MONITOR_* "
        "(headrace/monitor/settings.py), HEADRACE_MODELS_DIR, HEADRACE_METRICS_PORT.")
    p.add_argument("--seconds", type=float, default=None, metavar="N",
                   help="stop after N seconds (default: until interrupted)")
    p.set_defaults(func=handler)


def decode_events(kind: str, messages: Sequence[Any], now_ms: int, max_future_ms: int
                  ) -> list[Mapping[str, Any]]:
    """Impressions or clicks decoded by the stream worker's decoder (dead letters are
    skipped), as dicts with ``ts`` in epoch ms."""
    from streams.codec import decode_batch

    table = decode_batch(kind, messages, now_ms=now_ms,  # type: ignore[arg-type]
                         max_future_ms=max_future_ms).table
    cols = [c for c in ("event_id", "impression_id", "model_version", "p_ctr")
            if c in table.column_names]
    ts = table.column("ts").cast("int64").to_pylist()
    rows = table.select(cols).to_pylist()
    for row, t in zip(rows, ts, strict=True):
        row["ts"] = t
    return rows


def handler(args: argparse.Namespace) -> int:
    """Run the monitor until a signal or ``--seconds``."""

    from headrace.monitor.metrics import MonitorMetrics
    from headrace.monitor.service import MonitorService
    from headrace.monitor.settings import MonitorSettings

    settings = MonitorSettings.load()
    if problems := settings.check():
        raise UsageError("; ".join(problems))
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = MonitorMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    redis = settings.redis_config().client(socket_timeout=2.0, socket_connect_timeout=2.0)
    future_ms = settings.monitor_max_future_s * 1000
    service = MonitorService(
        settings, lambda kind, msgs, now: decode_events(kind, msgs, now, future_ms),
        metrics=metrics, redis=redis)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    log.info("monitor: models %s, tick %.1f s, attribution %d s", settings.models_dir,
             settings.monitor_tick_s, settings.monitor_attribution_s)
    service.run(lambda: stop.is_set() or (deadline is not None
                                           and time.monotonic() >= deadline))
    return 0
