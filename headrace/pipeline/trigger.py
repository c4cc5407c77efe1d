"""When ``headrace pipeline schedule`` starts a run: a pure decision (:func:`decide`) and
the monitor's alerts stream it reads (:class:`AlertReader`).

Rules, in order, at a look at ``now``:

1. A rollout in progress (a challenger in the registry or a running rollout state):
   no run — its outcome decides the champion the next model must beat.
2. The last run started less than ``cooldown_ms`` ago (``HEADRACE_PIPELINE_RETRY_AFTER``,
   1 h): no run, so that a run failing on its data, or alerts repeated every window,
   do not start a run at every look.
3. The first new ``drift`` alert whose ``model_version`` is the champion, or the first
   new ``performance`` alert of the champion (or naming no version): a run, trigger
   ``drift`` / ``performance`` with the alert.
4. The last successful run started ``every_ms`` or more ago
   (``HEADRACE_PIPELINE_EVERY``, 14 d), or, before any successful run, the champion was
   trained that long ago (its ``created_at``; a hand-trained champion is retrained on
   the same period, not at the scheduler's first start), or there is no successful run
   and no champion's training time is known: a run, trigger ``schedule``.

The alerts stream is ``{prefix}:monitor:alerts`` (written by the monitor): entries whose
field ``alert`` is JSON ``{"at_ms", "signal": "drift"|"performance", "model_version",
"feature", "value", "threshold", "window", "window_start_ms", "detail"}``. The last id
read is kept in ``MODELS_DIR/pipeline/alerts.cursor`` (see :func:`next_cursor`), so a
restarted scheduler does not trigger again on alerts it has already acted on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from headrace.core.errors import OnlineStoreError

__all__ = ["SIGNALS", "Alert", "Trigger", "parse_alert", "relevant", "decide", "next_cursor",
           "alerts_key", "AlertReader"]

log = logging.getLogger(__name__)

#: the alert signals that trigger a run
SIGNALS = ("drift", "performance")


@dataclass(frozen=True)
class Alert:
    """One entry of the alerts stream (``stream_id``: its Redis id)."""

    stream_id: str
    signal: str
    model_version: str | None
    at_ms: int | None = None
    feature: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """What a run records of the alert that triggered it."""
        return {"stream_id": self.stream_id, "signal": self.signal,
                "model_version": self.model_version, "at_ms": self.at_ms,
                "feature": self.feature, **{k: v for k, v in self.detail.items()
                                            if k not in ("signal", "model_version", "at_ms",
                                                         "feature")}}


@dataclass(frozen=True)
class Trigger:
    """Why a run starts: ``kind`` is ``schedule``, ``drift``, ``performance`` (or
    ``manual`` for ``pipeline run``)."""

    kind: str
    reason: str
    alert: Alert | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run record's ``trigger``."""
        return {"kind": self.kind, "reason": self.reason,
                "alert": None if self.alert is None else self.alert.to_dict()}


def parse_alert(stream_id: str, fields: dict[str, str]) -> Alert | None:
    """The alert of one stream entry, or None (logged) when it is malformed."""
    try:
        doc = json.loads(fields["alert"])
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        version = doc.get("model_version")
        at = doc.get("at_ms")
        return Alert(stream_id, str(doc["signal"]), None if version is None else str(version),
                     None if at is None else int(at),
                     None if doc.get("feature") is None else str(doc["feature"]), doc)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("ignoring the malformed alert %s: %s", stream_id, exc)
        return None


def relevant(alert: Alert, champion: str | None) -> bool:
    """Whether ``alert`` calls for a new model: drift of the champion's inputs, or the
    champion's performance (an alert naming no version counts as the champion's)."""
    if champion is None:
        return False
    if alert.signal == "drift":
        return alert.model_version == champion
    if alert.signal == "performance":
        return alert.model_version in (None, champion)
    return False


def decide(now_ms: int, *, champion: str | None, alerts: Sequence[Alert],
           last_success_ms: int | None, last_run_ms: int | None, every_ms: int,
           cooldown_ms: int, rollout_in_progress: bool = False,
           champion_since_ms: int | None = None) -> Trigger | None:
    """The trigger of a run at ``now_ms`` (rules in the module docstring), or None.

    Args:
        champion: the champion's version (None: no champion).
        alerts: the alerts not yet acted on, oldest first.
        last_success_ms: when the last successful run started (epoch ms), or None.
        last_run_ms: when the last run of any outcome started, or None.
        every_ms: the period of the time trigger (> 0); cooldown_ms: rule 2 (>= 0).
        champion_since_ms: when the champion was trained (epoch ms), or None: rule 4
            before the first successful run.
    """
    if rollout_in_progress:
        return None
    if last_run_ms is not None and now_ms - last_run_ms < cooldown_ms:
        return None
    for alert in alerts:
        if relevant(alert, champion):
            what = f"feature {alert.feature}" if alert.feature else "the model"
            return Trigger(alert.signal, f"{alert.signal} alert {alert.stream_id} on {what} "
                           f"of champion {champion}", alert)
    if last_success_ms is None:
        if champion is None or champion_since_ms is None:
            return Trigger("schedule", "no successful pipeline run yet")
        age = now_ms - champion_since_ms
        if age >= every_ms:
            return Trigger("schedule", f"no pipeline run yet and the champion {champion} was "
                           f"trained {age / 86_400_000:.1f} days ago (every "
                           f"{every_ms / 86_400_000:g} days)")
        return None
    age = now_ms - last_success_ms
    if age >= every_ms:
        return Trigger("schedule", f"the last successful run started {age / 86_400_000:.1f} "
                       f"days ago (every {every_ms / 86_400_000:g} days)")
    return None


def next_cursor(cursor: str | None, last_seen: str | None, alerts: Sequence[Alert],
                champion: str | None, fired: bool) -> str | None:
    """The cursor to keep after a look that read up to ``last_seen`` (the newest entry
    read, malformed ones included): past it when a run started or no alert read was
    relevant; else unchanged, so the relevant alerts are read again at the next look
    (they still wait for the cooldown or the rollout)."""
    if last_seen is None:
        return cursor
    if fired or not any(relevant(a, champion) for a in alerts):
        return last_seen
    return cursor


def alerts_key(prefix: str) -> str:
    """The monitor's alerts stream."""
    return f"{prefix}:monitor:alerts"


class AlertReader:
    """Reads the alerts stream after a cursor (``XREAD``, no blocking).

    Args:
        client: a redis-py client (bytes replies) with a socket timeout.
        prefix: ``HEADRACE_REDIS_PREFIX``.
        count: most entries read per look.
    """

    def __init__(self, client: Any, prefix: str, count: int = 1000) -> None:
        self.client, self.key, self.count = client, alerts_key(prefix), count

    @contextmanager
    def _redis(self) -> Iterator[None]:
        from redis.exceptions import RedisError

        from headrace.core.redis_conn import auth_error, client_endpoint

        try:
            yield
        except (RedisError, OSError) as exc:
            denied = auth_error(exc, client_endpoint(self.client))
            if denied is not None:
                raise denied from exc
            raise OnlineStoreError(f"cannot read the alerts stream {self.key}: {exc}",
                                   transient=True) from exc

    def last_id(self) -> str:
        """The newest entry's id ("0-0" when the stream is empty or missing): a first
        start begins there, acting only on alerts that come after it."""
        with self._redis():
            entries = self.client.xrevrange(self.key, count=1)
        return entries[0][0].decode() if entries else "0-0"

    def read(self, cursor: str) -> tuple[list[Alert], str | None]:
        """The alerts after ``cursor``, oldest first (malformed entries skipped), and the
        id of the newest entry read (None: nothing new)."""
        with self._redis():
            reply = self.client.xread({self.key: cursor}, count=self.count)
        out: list[Alert] = []
        last: str | None = None
        for _key, entries in reply or []:
            for raw_id, raw_fields in entries:
                fields = {(k.decode() if isinstance(k, bytes) else str(k)):
                          (v.decode() if isinstance(v, bytes) else str(v))
                          for k, v in raw_fields.items()}
                sid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                last = sid
                alert = parse_alert(sid, fields)
                if alert is not None:
                    out.append(alert)
        return out, last
