"""A circuit breaker around the online store, with an injected clock.

States::

    CLOSED --(failures consecutive failures or budget overruns)--> OPEN
    OPEN   --(reset_s elapsed: the next caller is let through as a probe)--> HALF_OPEN
    HALF_OPEN --probe succeeds--> CLOSED      HALF_OPEN --probe fails--> OPEN (timer restarts)

While OPEN, and while a HALF_OPEN probe is in flight, :meth:`CircuitBreaker.allow`
answers False and callers serve their fallback without touching the store. A probe
that never reports (its caller died) is replaced by a new one after ``reset_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import IntEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(IntEnum):
    """Breaker state (the metric gauge value)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Consecutive-failure circuit breaker.

    Args:
        failures: consecutive failures that open the breaker (>= 1).
        reset_s: seconds an open breaker waits before letting one probe through.
        clock: monotonic seconds (``time.monotonic``); tests pin it.
        on_change: called with the new state after every transition (metrics).
    """

    def __init__(
        self,
        failures: int = 5,
        reset_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._since = 0.0  # when OPEN was entered / the current probe started

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May the caller use the store now? (True in CLOSED; one probe when due.)"""
        if self._state is BreakerState.CLOSED:  # fast path, no lock
            return True
        with self._lock:
            state = self._state
            if state is BreakerState.CLOSED:
                return True
            if self._clock() - self._since < self.reset_s:
                return False
            self._since = self._clock()  # this caller is the (new) probe
            if state is not BreakerState.HALF_OPEN:
                self._set(BreakerState.HALF_OPEN)
            return True

    def success(self) -> None:
        """Report a successful call within budget."""
        if self._state is BreakerState.CLOSED and not self._consecutive:
            return
        with self._lock:
            self._consecutive = 0
            if self._state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """Report a failed call or a budget overrun."""
        with self._lock:
            self._consecutive += 1
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._consecutive >= self.failures
            ):
                self._since = self._clock()
                self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
