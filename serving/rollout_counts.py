"""The server's per-arm counts of a rollout: counted in memory on every answer, added
to Redis by the split watcher's poll (:mod:`headrace.rollout.serving_counts`).

``Score`` calls :meth:`CountsAccumulator.record` once per answered request of an
active rollout (a split naming a challenger), for the version that answered — both
arms; a challenger that raised counts one error for the challenger and one answer for
the champion that then answered. Shadow predictions are not counted. :meth:`record`
is O(1) under a lock (no Redis call on the RPC path).

:meth:`CountsAccumulator.flush`, called by :class:`~serving.split.SplitWatcher` after
each poll (and once more when it stops), sends at most ONE batch per call:

* with no batch in flight, it swaps the counts out of memory into a new batch with
  the next ``seq`` and sends it;
* with a batch whose outcome is unknown (the last flush failed: Redis down, a timeout
  after Redis may have applied it), it resends that same batch with the same ``seq``
  while new answers keep counting in memory for the next batch.

A batch leaves memory only once Redis confirmed it (applied now, or already applied:
:func:`~headrace.rollout.serving_counts.flush_batch`), so an outage loses nothing and
a lost reply counts nothing twice. Each failure counts in
``headrace_rollout_counts_flush_failures_total``; a server that dies loses at most the
answers since its last confirmed flush (one poll, 250 ms, when Redis is up).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import numpy as np

from headrace.core.errors import OnlineStoreError
from headrace.rollout.serving_counts import (
    COUNTS_TTL_S,
    LATENCY_BOUNDS_MS,
    ServingCounts,
    flush_batch,
)

__all__ = ["CountsAccumulator"]

log = logging.getLogger(__name__)
_NBUCKETS = len(LATENCY_BOUNDS_MS)


class _Cell:
    """One (rollout, version)'s counts since the last swap (mutable, under the lock)."""

    __slots__ = ("requests", "errors", "latency", "pub_requests", "pub_errors", "lo", "hi")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * _NBUCKETS
        self.pub_requests: dict[str, int] = {}
        self.pub_errors: dict[str, int] = {}
        self.lo: float | None = None
        self.hi: float | None = None

    def freeze(self) -> ServingCounts:
        return ServingCounts(self.requests, self.errors, tuple(self.latency),
                             self.pub_requests, self.pub_errors, self.lo, self.hi)


class CountsAccumulator:
    """Per-(rollout_id, version) deltas of this server (see the module docstring).

    Args:
        prefix: the deployment's Redis key prefix.
        server_id: this server's name; with a random suffix it is the writer's flush
            token (unique per process lifetime, so a restarted server never collides
            with the markers of its previous life).
        on_failure: called once per failed flush (the server's metric).
        ttl_s: the counts' expiry after the last flush.
    """

    def __init__(self, prefix: str, server_id: str, *,
                 on_failure: Callable[[], Any] | None = None,
                 ttl_s: int = COUNTS_TTL_S) -> None:
        self.prefix = prefix
        self.token = f"{server_id}-{secrets.token_hex(4)}"
        self.ttl_s = ttl_s
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._cells: dict[tuple[str, str], _Cell] = {}
        self._seq = 0
        # the batch sent but not confirmed: (seq, deltas); only the flushing thread
        self._pending: tuple[int, dict[tuple[str, str], ServingCounts]] | None = None
        self._failing = False

    def record(self, rollout_id: str, version: str, publisher: str | None,
               latency_ms: float | None = None, pctr: np.ndarray | None = None, *,
               error: bool = False) -> None:
        """Count one answer of ``version`` in rollout ``rollout_id``.

        Args:
            rollout_id: the split's rollout id.
            version: the model version that answered (or failed).
            publisher: the request's publisher (None: counted under ``""``).
            latency_ms: the server latency of a successful answer, ms.
            pctr: its predictions (their min and max are kept; a NaN is out of range).
            error: the version failed to answer (no latency, no predictions counted).
        """
        pub = publisher or ""
        i = -1 if error or latency_ms is None else bisect_left(LATENCY_BOUNDS_MS, latency_ms)
        lo = hi = None
        if pctr is not None and not error and len(pctr):
            lo, hi = float(pctr.min()), float(pctr.max())
            if lo != lo:  # NaN propagates through min/max: the range is open both ways
                lo, hi = -math.inf, math.inf
        key = (rollout_id, version)
        with self._lock:
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = _Cell()
            cell.requests += 1
            cell.pub_requests[pub] = cell.pub_requests.get(pub, 0) + 1
            if error:
                cell.errors += 1
                cell.pub_errors[pub] = cell.pub_errors.get(pub, 0) + 1
            elif i >= 0:
                cell.latency[i] += 1
            if lo is not None and hi is not None:
                if cell.lo is None or lo < cell.lo:
                    cell.lo = lo
                if cell.hi is None or hi > cell.hi:
                    cell.hi = hi

    def unflushed(self) -> dict[tuple[str, str], ServingCounts]:
        """What Redis has not confirmed yet (the batch in flight plus the counts in
        memory), per (rollout_id, version). For tests and diagnostics."""
        out = dict(self._pending[1]) if self._pending is not None else {}
        with self._lock:
            cells = {k: c.freeze() for k, c in self._cells.items()}
        for k, c in cells.items():
            out[k] = out[k].merge(c) if k in out else c
        return out

    def flush(self, client: Any) -> bool:
        """Send the batch in flight, else the counts in memory (at most one round trip).

        Args:
            client: a redis-py client with a socket timeout.

        Returns:
            True when Redis confirmed (or there was nothing to send), False when the
            flush failed; its batch is kept and resent, same ``seq``, next time.
            Never raises for Redis errors.
        """
        if self._pending is None:
            with self._lock:
                cells, self._cells = self._cells, {}
            if not cells:
                return True
            self._seq += 1
            self._pending = (self._seq, {k: c.freeze() for k, c in cells.items()})
        seq, batch = self._pending
        try:
            flush_batch(client, self.prefix, batch, token=self.token, seq=seq,
                        ttl_s=self.ttl_s)
        except OnlineStoreError as exc:
            if self._on_failure is not None:
                self._on_failure()
            if not self._failing:
                self._failing = True
                log.warning("rollout serving counts: flush %d failed, kept for the next "
                            "poll: %s", seq, exc)
            return False
        self._pending = None
        if self._failing:
            self._failing = False
            log.warning("rollout serving counts: flushed again (batch %d)", seq)
        return True
