"""Progress loss is an alarm, not a fresh start.

A Redis restarted without its data (no persistence, a failover to an empty replica, a
``FLUSHALL``) takes the view states and the progress records with it. A worker that
then reads "no progress" and starts over would rewrite, and before that delete as
orphans, every offline part, and history the log no longer holds would be gone.

:class:`ProgressGuard` tells a loss from a first start:

* **at assignment** (:meth:`streams.admission.Admission.assign`): with the group's
  epoch marker gone from Redis, a source partition without offline progress whose
  parts are in the offline store lost its progress (with the marker in place, it is a
  crash before the first part was recorded, and the parts are orphans, removed).
  Its offline progress is recovered from the parts (:meth:`~streams.offline_writer.
  OfflineWriter.durable_end`), nothing is deleted, and its online state is rebuilt
  from the log's first retained offset;
* **while running**: the group's epoch marker (:func:`~feature_defs.layout.epoch_key`,
  a random token written when the group starts) is read every
  :data:`CHECK_EVERY_S`; missing or replaced, Redis lost its data under the worker,
  which rebuilds (:meth:`streams.engine.Engine.rebuild_online`): it deletes what it
  wrote since the last good check (states whose fences would hide the replayed
  events), forgets its cached states, and replays every assigned partition from the
  log's first retained offset. Offline parts below the partitions' offline progress
  (known in memory) are neither deleted nor rewritten.

Both log a WARNING and count ``headrace_progress_lost_total{topic}``; each rebuild
counts ``headrace_online_rebuilds_total``. ``headrace worker --rebuild-online`` runs the
same rebuild on purpose.

Limits: the rebuild replays what the log retains; where retention is shorter than a
view's longest window, the rebuilt values lack the events before the log's start (a
WARNING says so; the offline store still holds them, and training sets are unaffected).
Late and dead-letter records of the replayed range are not published again (each
partition's ``sides_next``: what the worker had processed before the rebuild).
"""

from __future__ import annotations

import logging
import uuid

from prometheus_client import Counter

from feature_defs.layout import epoch_key
from headrace.core.online_store import OnlineStore
from streams.metrics import StreamMetrics

__all__ = ["ProgressGuard", "CHECK_EVERY_S"]

log = logging.getLogger(__name__)

#: seconds between two reads of the epoch marker in a running worker
CHECK_EVERY_S = 1.0


class ProgressGuard:
    """The group's epoch marker, and the keys written since it was last seen.

    Args:
        store: The online store.
        prefix, group: Name the marker (:func:`~feature_defs.layout.epoch_key`).
        metrics: Registers the loss and rebuild counters on its registry.
    """

    def __init__(self, store: OnlineStore, prefix: str, group: str,
                 metrics: StreamMetrics) -> None:
        self.store = store
        self.key = epoch_key(prefix, group)
        self.token: bytes | None = None
        #: state keys written since the marker was last seen in place
        self.written: set[str] = set()
        r = metrics.registry
        self.lost = Counter("headrace_progress_lost_total",
                            "partitions whose progress records Redis lost", ["topic"],
                            registry=r)
        self.rebuilds = Counter("headrace_online_rebuilds_total",
                                "online-state rebuilds from the log (progress lost, or "
                                "--rebuild-online)", registry=r)

    def adopt(self) -> bool:
        """Take the group's current marker, writing a new one where there is none.
        Returns True when there was none."""
        current = self.store.get(self.key)
        missing = current is None
        if current is None:
            self.store.set(self.key, uuid.uuid4().hex.encode())
            current = self.store.get(self.key)  # another worker's, if it wrote last
        self.token = current
        self.written.clear()
        return missing

    def present(self) -> bool:
        """Whether Redis holds a marker of the group (False: a first start, or Redis
        lost its data)."""
        return self.store.get(self.key) is not None

    def intact(self) -> bool:
        """Whether the marker this worker adopted is still in Redis (if so, what was
        written until now is safe: the record of written keys restarts)."""
        if self.token is None:
            return True
        if self.store.get(self.key) != self.token:
            return False
        self.written.clear()
        return True

    def note_written(self, keys: list[str]) -> None:
        self.written.update(keys)
