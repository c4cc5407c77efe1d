"""Where the monitor's alerts go: a log WARNING, ``headrace_monitor_alerts_total
{signal}``, a webhook POST (:class:`~headrace.rollout.alerts.WebhookAlerter`, when
``HEADRACE_MONITOR_WEBHOOK_URL`` is set) and one entry of the Redis stream
``<prefix>:monitor:alerts`` — what a retraining pipeline reads::

    XADD <prefix>:monitor:alerts MAXLEN ~ 10000 * alert <json>

with ``json`` = ``{"at_ms", "signal": "drift"|"performance", "model_version",
"feature", "value", "threshold", "window", "window_start_ms", "detail"}``
(:meth:`~headrace.monitor.rules.Alert.to_dict`; a non-finite value is null).

The rule (:mod:`headrace.monitor.rules`) decides each alert once per (signal, version,
feature, window, start). The Redis entry is written at least once: an entry that
could not be written (Redis away) stays pending and is retried at the next
:meth:`AlertSink.send` / :meth:`AlertSink.flush`, in order. On start the monitor
reads the stream's last entries back (:meth:`AlertSink.already_sent`), so a restart
that rebuilds the same windows from the log does not send their alerts again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from headrace.monitor.rules import Alert
from headrace.rollout.alerts import WebhookAlerter

__all__ = ["STREAM_SUFFIX", "STREAM_MAXLEN", "alert_stream_key", "AlertSink"]

log = logging.getLogger(__name__)

STREAM_SUFFIX: Final = ":monitor:alerts"
#: approximate length the stream is trimmed to
STREAM_MAXLEN: Final = 10_000


def alert_stream_key(prefix: str) -> str:
    """``<prefix>:monitor:alerts``."""
    return prefix + STREAM_SUFFIX


class AlertSink:
    """Sends alerts (module docstring).

    Args:
        redis: a redis-py client (``xadd``, ``xrevrange``); None: no stream.
        prefix: the Redis key prefix (``CommonSettings.redis_prefix``).
        webhook: the webhook sender (its URL None: nothing is POSTed).
        on_alert: called with each alert's signal (the counter).
        clock: epoch seconds (``at_ms``).
    """

    def __init__(self, redis: Any, prefix: str, webhook: WebhookAlerter,
                 on_alert: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.key = alert_stream_key(prefix)
        self.webhook = webhook
        self._on_alert = on_alert
        self._clock = clock
        self.pending: list[str] = []
        self.sent: list[Alert] = []

    def send(self, alerts: Iterable[Alert]) -> None:
        """Log, count, POST and queue for the stream each alert, then flush."""
        for alert in alerts:
            at_ms = int(self._clock() * 1000)
            log.warning("monitor alert: %s %s of model %s, %s window at %d: %s",
                        alert.signal, alert.feature, alert.model_version, alert.window,
                        alert.window_start_ms, alert.detail)
            if self._on_alert is not None:
                self._on_alert(alert.signal)
            self.webhook.send(f":warning: headrace monitor: {alert.signal} alert, model "
                              f"{alert.model_version}, {alert.feature}: {alert.detail}")
            self.pending.append(json.dumps(alert.to_dict(at_ms), allow_nan=False,
                                           sort_keys=True))
            self.sent.append(alert)
        self.flush()

    def flush(self) -> bool:
        """Write the pending entries; True when none is left. A Redis failure is logged
        (WARNING) and the entries stay pending."""
        if self.redis is None:
            self.pending.clear()
            return True
        from redis.exceptions import RedisError

        while self.pending:
            try:
                self.redis.xadd(self.key, {"alert": self.pending[0]},
                                maxlen=STREAM_MAXLEN, approximate=True)
            except RedisError as exc:
                log.warning("monitor: cannot write %d alert(s) to %s, retried next tick: "
                            "%s", len(self.pending), self.key, exc)
                return False
            self.pending.pop(0)
        return True

    def already_sent(self, count: int = 1000) -> list[tuple[str, str, str, str, int]]:
        """The (signal, version, feature, window, start) of the stream's last ``count``
        entries ([] without Redis, or when it cannot be read: logged)."""
        if self.redis is None:
            return []
        from redis.exceptions import RedisError

        try:
            entries = self.redis.xrevrange(self.key, count=count)
        except RedisError as exc:
            log.warning("monitor: cannot read %s (alerts may repeat after this restart): "
                        "%s", self.key, exc)
            return []
        out = []
        for _id, fields in entries:
            raw = fields.get(b"alert", fields.get("alert"))
            try:
                d = json.loads(raw)
                out.append((str(d["signal"]), str(d["model_version"]), str(d["feature"]),
                            str(d["window"]), int(d["window_start_ms"])))
            except (TypeError, ValueError, KeyError):
                continue  # not ours: ignored
        return out
