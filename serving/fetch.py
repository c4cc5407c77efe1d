"""The one guarded read of the online store: breaker, budget, round trip, fallback reason.

``GetOnlineFeatures`` (:mod:`serving.service`) and ``Score`` (:mod:`serving.scoring`)
read the store only through :meth:`StoreFetch.read`. It answers either the rows or
``None`` with the reason the caller must fall back:

===================  =================================================================
reason               when (breaker report)
===================  =================================================================
``BREAKER_OPEN``     the breaker refuses the call; the store is not touched (none)
``REDIS_ERROR``      the store raised :class:`~headrace.core.errors.OnlineStoreError`
                     (failure)
``BUDGET_EXCEEDED``  the round trip took longer than ``budget_ms``; the rows are
                     dropped (failure)
``NONE``             rows within budget (success)
===================  =================================================================

A fifth reason is set by the services, not here: ``CORRUPT_STATE``, the rows came back
but an entity's state cannot be decoded (:attr:`serving.reader.EntityRow.corrupt`); that
entity is answered as its fallback row, the others from their states.

Every completed round trip (within budget or not) is observed in
``headrace_serving_redis_seconds``; a failed one is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Protocol

from headrace.core.errors import OnlineStoreError
from serving.breaker import CircuitBreaker
from serving.metrics import ServingMetrics

__all__ = ["FallbackReason", "HashReader", "Rows", "StoreFetch"]

#: raw states: per key, per field, the bytes or None (missing)
Rows = list[list[bytes | None]]


class FallbackReason(IntEnum):
    """Why a request, or some of its entities, was answered without the online store's
    values (numbers equal the proto ``FallbackReason`` values; the names are the metric
    label values)."""

    NONE = 0
    REDIS_ERROR = 1
    BUDGET_EXCEEDED = 2
    BREAKER_OPEN = 3
    CORRUPT_STATE = 4  # an entity's stored state cannot be decoded (set by the services)


class HashReader(Protocol):
    """What :class:`StoreFetch` needs of the online store."""

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        """Per key, the values of ``fields`` (None: missing), in one round trip."""
        ...


class StoreFetch:
    """Breaker, budget and timing around one store round trip (see the module docstring).

    Shared by nothing but its owner's requests; thread-safe (the breaker locks, the
    histogram is thread-safe, everything else is read-only).

    Args:
        store: the online store.
        breaker: the circuit breaker around it (one per server, shared by the services).
        metrics: the server's metrics (``redis_seconds``).
        budget_ms: time budget of the round trip in milliseconds; an overrun is a
            fallback and a breaker failure.
        timer: monotonic seconds used to time the round trip (tests pin it).
    """

    __slots__ = ("store", "breaker", "budget_s", "_observe", "_timer")

    def __init__(
        self,
        store: HashReader,
        breaker: CircuitBreaker,
        metrics: ServingMetrics,
        *,
        budget_ms: float = 10.0,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.breaker = breaker
        self.budget_s = budget_ms / 1000.0
        self._observe = metrics.redis_seconds.observe
        self._timer = timer

    def read(self, keys: Sequence[str], fields: Sequence[str]
             ) -> tuple[Rows | None, FallbackReason]:
        """Read ``fields`` of every key in one round trip, unless the guard says no.

        Args:
            keys: Redis keys, in answer order.
            fields: hash fields to read of each key.

        Returns:
            ``(rows, FallbackReason.NONE)``, or ``(None, reason)`` when the caller must
            answer without the store. Never raises for store errors.
        """
        breaker = self.breaker
        if not breaker.allow():
            return None, FallbackReason.BREAKER_OPEN
        timer = self._timer
        start = timer()
        try:
            rows = self.store.read_hashes(keys, fields)
        except OnlineStoreError:
            breaker.failure()
            return None, FallbackReason.REDIS_ERROR
        elapsed = timer() - start
        self._observe(elapsed)
        if elapsed > self.budget_s:
            breaker.failure()
            return None, FallbackReason.BUDGET_EXCEEDED
        breaker.success()
        return rows, FallbackReason.NONE
