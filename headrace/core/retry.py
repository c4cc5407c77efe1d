"""Waiting out a store outage: bounded exponential back-off with jitter, and the
outage's start, end and cost made visible.

A worker that stops at the first refused connection turns a 30-second Redis restart
into a crash loop. :func:`with_retries` runs an operation until it succeeds, sleeping
``Backoff.delay(attempt)`` between tries: ``initial_s * multiplier**attempt``, capped
at ``max_s``, less a random fraction (up to ``jitter``) so that workers restarted
together do not retry in step. Only *transient* failures are retried (``transient``
decides, e.g. :attr:`~headrace.core.errors.OnlineStoreError.transient`); anything
else is raised at once, as before.

An :class:`Outage` tracks one dependency (``redis``, ``s3``, ``kafka``) across every
operation that uses it: the first failure logs one WARNING (what failed, and that the
worker waits), recovery logs one WARNING with the stall's length, and callbacks feed
the metrics (available or not, retries, stall seconds). :attr:`Outage.stalled` is what
``headrace worker --until-idle`` checks: time spent waiting for a store is not idle
time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "DEFAULT_BACKOFF", "Outage", "with_retries"]

T = TypeVar("T")

log = logging.getLogger("headrace.retry")


@dataclass(frozen=True)
class Backoff:
    """Delays between tries: exponential from ``initial_s``, capped at ``max_s``, each
    less a uniformly random fraction of up to ``jitter``.

    ``give_up_s``: stop retrying (raise the last error) once an operation has failed
    for that long; None waits forever (a worker waits out outages of any length).
    """

    initial_s: float = 0.05
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    give_up_s: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s and self.multiplier >= 1
                and 0 <= self.jitter < 1):
            raise ValueError(f"invalid back-off {self!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to sleep after failed try number ``attempt`` (0 = the first)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return base * (1.0 - self.jitter * rand())


#: the back-off of every store call that waits outages out: 50 ms doubling to 5 s
DEFAULT_BACKOFF = Backoff()


class Outage:
    """Availability of one dependency, shared by the threads that use it.

    Args:
        name: The dependency (``redis``, ``s3``, ``kafka``): log lines and metrics.
        on_available: Called with True/False when availability changes (a gauge).
        on_retry: Called once per retried failure (a counter).
        on_stall: Called with the seconds of each stall when it ends (a counter).
        clock: Monotonic seconds.
    """

    def __init__(self, name: str, *, on_available: Callable[[bool], None] | None = None,
                 on_retry: Callable[[], None] | None = None,
                 on_stall: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._on_available = on_available
        self._on_retry = on_retry
        self._on_stall = on_stall
        self._clock = clock
        self._lock = threading.Lock()
        self._failing = 0  # operations failing right now
        self._since: float | None = None  # monotonic start of the current stall
        #: totals since the start: retried failures, stalls, seconds stalled
        self.retries = 0
        self.stalls = 0
        self.stalled_s = 0.0
        #: when (``clock``) the last stall ended, or None
        self.recovered_at: float | None = None
        if on_available is not None:
            on_available(True)

    @property
    def stalled(self) -> bool:
        """Whether some operation is waiting for the dependency now."""
        return self._failing > 0

    def failed(self, what: str, exc: BaseException, wait_s: float) -> None:
        """An operation failed transiently and will be retried after ``wait_s``."""
        with self._lock:
            self.retries += 1
            first = self._since is None
            if first:
                self._since = self._clock()
                self.stalls += 1
        if self._on_retry is not None:
            self._on_retry()
        if first:
            log.warning("%s unavailable (%s: %s); waiting for it, retrying with back-off",
                        self.name, what, exc)
            if self._on_available is not None:
                self._on_available(False)

    def begin(self) -> None:
        with self._lock:
            self._failing += 1

    def end(self, ok: bool) -> None:
        """An operation that had failed ended (``ok``: it finally succeeded)."""
        with self._lock:
            self._failing -= 1
            if self._failing or self._since is None or not ok:
                return
            self.recovered_at = self._clock()
            stalled = self.recovered_at - self._since
            self._since = None
            self.stalled_s += stalled
        log.warning("%s available again after %.1f s", self.name, stalled)
        if self._on_stall is not None:
            self._on_stall(stalled)
        if self._on_available is not None:
            self._on_available(True)


def with_retries(op: Callable[[], T], *, what: str, outage: Outage,
                 transient: Callable[[BaseException], bool],
                 backoff: Backoff = DEFAULT_BACKOFF, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """``op()``, retried with ``backoff`` while it fails transiently.

    Raises:
        Exception: ``op``'s error when it is not transient, or when it has failed for
            ``backoff.give_up_s``.
    """
    try:
        return op()
    except Exception as first:
        if not transient(first):
            raise
        last: Exception = first
    started = clock()
    outage.begin()
    ok = False
    try:
        attempt = 0
        while True:
            if backoff.give_up_s is not None and clock() - started >= backoff.give_up_s:
                raise last
            wait = backoff.delay(attempt)
            outage.failed(what, last, wait)
            sleep(wait)
            attempt += 1
            try:
                result = op()
            except Exception as again:
                if not transient(again):
                    raise
                last = again
                continue
            ok = True
            return result
    finally:
        outage.end(ok)
