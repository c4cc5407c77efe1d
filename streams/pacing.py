"""When the worker does its periodic work: online flushes (:class:`FlushPacer`), offline
parts (:class:`OfflineSchedule`), and whether input is a backlog being caught up on
(:func:`catching_up`). Pure policy on monotonic or epoch times, tested on its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from streams.rows import RawMessage

__all__ = ["CATCH_UP_MS", "FlushPacer", "OfflineSchedule", "catching_up"]


class OfflineSchedule:
    """When each source partition's buffered events become an offline part.

    Every ``interval_s`` per partition, phase-shifted by partition number (partition
    ``p`` of ``partitions`` at ``(p + 1) / partitions`` of the interval): a worker's
    parts are then written one after another across the interval, not in one burst of
    Parquet encodes and uploads that would slow the online path for its length. A
    partition that has buffered ``part_rows`` events is due at once (a backlog being
    caught up on: parts keep pace with the input). Times are ``time.monotonic()``
    seconds.
    """

    def __init__(self, interval_s: float, partitions: int, part_rows: int | None = None) -> None:
        self.interval_s = interval_s
        self.partitions = max(1, partitions)
        self.part_rows = part_rows
        self._next: dict[tuple[str, int], float] = {}

    def _next_at(self, tp: tuple[str, int], now: float) -> float:
        at = self._next.get(tp)
        if at is None:
            phase = (tp[1] % self.partitions + 1) / self.partitions
            at = self._next[tp] = now + self.interval_s * phase
        return at

    def due(self, tps: Iterable[tuple[str, int]], now: float,
            rows: Callable[[tuple[str, int]], int] | None = None) -> list[tuple[str, int]]:
        """The partitions of ``tps`` whose part is due at ``now``; ``rows`` gives a
        partition's buffered events."""
        full = self.part_rows
        return [tp for tp in tps if now >= self._next_at(tp, now)
                or (full is not None and rows is not None and rows(tp) >= full)]

    def detached(self, tps: Iterable[tuple[str, int]], now: float) -> None:
        """Record that the parts of ``tps`` were taken at ``now`` (an early one too:
        the next stays on the partition's phase)."""
        for tp in tps:
            at = self._next_at(tp, now)
            while at <= now:
                at += self.interval_s
            self._next[tp] = at


class FlushPacer:
    """When the worker writes applied state to the online store.

    Freshness wants a flush right after every batch; a flush costs a Redis round trip
    plus the encoding of every dirty state (hot ads, campaigns and publishers are dirty
    in nearly every batch), so under load flushes are spaced by their own cost: the gap
    between the end of one flush and the start of the next is at least ``duty`` times
    the recent flush time (flushing takes at most ``1 / (duty + 1)`` of the loop), at
    least ``min_s`` and at most ``max_s`` seconds. Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, min_s: float, max_s: float, duty: float = 4.0) -> None:
        self.min_s = min_s
        self.max_s = max(min_s, max_s)
        self.duty = duty
        self.cost = 0.0  # moving average of recent flush durations (s)
        self.last = time.monotonic()

    def gap(self) -> float:
        """Seconds to leave between the end of a flush and the next one."""
        return min(self.max_s, max(self.min_s, self.duty * self.cost))

    def due(self, now: float) -> bool:
        return now - self.last >= self.gap()

    def flushed(self, started: float, ended: float) -> None:
        self.cost = 0.7 * self.cost + 0.3 * max(0.0, ended - started)
        self.last = ended


#: a batch holding a message older than this (Kafka timestamp) is a backlog being caught
#: up on, not live traffic
CATCH_UP_MS = 1000


def catching_up(msgs: Sequence[RawMessage], now_ms: float, lag_ms: int = CATCH_UP_MS) -> bool:
    """True when some message of ``msgs`` was stamped more than ``lag_ms`` before ``now_ms``
    (epoch ms; messages without a timestamp do not count)."""
    return any(0 < m.timestamp_ms < now_ms - lag_ms for m in msgs)
