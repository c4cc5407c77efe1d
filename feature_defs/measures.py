"""Mergeable per-tile states of the aggregation operators.

Each operator has three pure functions: ``init`` (state of one event), ``merge`` (two
states → one; ``None`` is the empty state) and ``finalize`` (state → feature value).
States are plain Python values (stored as typed columns by :mod:`feature_defs.state_codec`):

============  ==========================  =====================================
op            state                       value of an empty window
============  ==========================  =====================================
COUNT         int                         0
SUM           float                       0.0
MEAN          (sum, count)                null
MIN / MAX     float                       null
LAST          (ts, tiebreak, value)       null   (latest event time wins; ties
                                                  broken by the event-id hash)
APPROX_DIST.  sorted tuple of ≤ K hashes  0
============  ==========================  =====================================

APPROX_DISTINCT is a K-minimum-values sketch over the 64-bit xxh64 hash of the value:
exact while fewer than K = 512 distinct values fall in the window; beyond that the
estimate ``(K - 1) / ((h_K + 1) / 2**64)`` has relative standard error
``1 / sqrt(K - 2)`` ≈ 4.4 %. The estimate is a deterministic function of the set of
distinct values in the window, so any path that computes that set (online tiles,
offline joins) gets the identical number.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from feature_defs.model import AggOp

__all__ = [
    "KMV_K",
    "distinct_hash",
    "last_tiebreaks",
    "kmv_estimate",
    "init_state",
    "merge_state",
    "finalize_state",
    "MERGERS",
]

KMV_K = 512
_TWO64 = float(2**64)


def distinct_hash(value: str) -> int:
    """The 64-bit hash every path uses for APPROX_DISTINCT."""
    return xxhash.xxh64_intdigest(value.encode("utf-8"))


def last_tiebreaks(event_ids: Iterable[str | None]) -> list[int]:
    """The LAST tie-break of each event id: its xxh64 shifted right by one (a
    non-negative int64), ``""``'s for a missing id. Of two events at the same event
    time, the one with the larger tie-break is the latest; the stream worker and the
    point-in-time join both call this, so they pick the same event."""
    h = xxhash.xxh64_intdigest
    return [h((v or "").encode("utf-8")) >> 1 for v in event_ids]


def kmv_estimate(smallest: tuple[int, ...] | list[int] | None) -> int:
    """Distinct-count estimate from the (up to) K smallest distinct hashes, ascending."""
    if not smallest:
        return 0
    n = len(smallest)
    if n < KMV_K:
        return n
    return int(round((KMV_K - 1) / ((smallest[KMV_K - 1] + 1) / _TWO64)))


def _merge_kmv(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if len(a) + len(b) <= KMV_K:
        return tuple(sorted(set(a).union(b)))
    return tuple(heapq.nsmallest(KMV_K, set(a).union(b)))


def _merge_last(a: tuple, b: tuple) -> tuple:
    return a if (a[0], a[1]) >= (b[0], b[1]) else b


def _merge_mean(a: tuple, b: tuple) -> tuple:
    return (a[0] + b[0], a[1] + b[1])


MERGERS: dict[AggOp, Callable[[Any, Any], Any]] = {
    AggOp.COUNT: lambda a, b: a + b,
    AggOp.SUM: lambda a, b: a + b,
    AggOp.MEAN: _merge_mean,
    AggOp.MIN: min,
    AggOp.MAX: max,
    AggOp.LAST: _merge_last,
    AggOp.APPROX_DISTINCT: _merge_kmv,
}


def init_state(op: AggOp, value: Any, ts: int, tiebreak: int) -> Any:
    """State of a single event; ``None`` when the event has no value for the measure."""
    if op is AggOp.COUNT:
        return 1
    if value is None:
        return None
    if op is AggOp.APPROX_DISTINCT:
        return (distinct_hash(str(value)),)
    value = float(value)
    if op is AggOp.MEAN:
        return (value, 1)
    if op is AggOp.LAST:
        return (ts, tiebreak, value)
    return value


def merge_state(op: AggOp, a: Any, b: Any) -> Any:
    """Merge two states; either may be ``None`` (empty)."""
    if a is None:
        return b
    if b is None:
        return a
    return MERGERS[op](a, b)


def finalize_state(op: AggOp, state: Any) -> Any:
    """Feature value of a (possibly empty) state."""
    if op is AggOp.COUNT:
        return 0 if state is None else int(state)
    if op is AggOp.SUM:
        return 0.0 if state is None else float(state)
    if op is AggOp.APPROX_DISTINCT:
        return kmv_estimate(state)
    if state is None:
        return None
    if op is AggOp.MEAN:
        return state[0] / state[1] if state[1] else None
    if op is AggOp.LAST:
        return state[2]
    return float(state)
