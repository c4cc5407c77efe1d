"""The engine's online-store writes: :class:`OnlineWrites` runs them, one at a time,
in the background when asked to.

The store itself (interface, Redis, in-memory fake) is :mod:`headrace.core.online_store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from headrace.core.online_store import OnlineStore, StateWrite

__all__ = ["OnlineWrites"]


class OnlineWrites:
    """Runs the engine's online-store writes, at most one at a time, in the background
    when ``background`` is set: the loop encodes and applies the next batch while Redis
    takes the last one (its replies were up to a fifth of a busy loop's time).

    :meth:`submit` starts a write of states then progress records (the store writes them
    in that order); ``done(completed_at)`` runs on the CALLER's thread once the write is
    known to have succeeded, from the next :meth:`submit` or :meth:`finish`, which also
    re-raise the write's error. ``clock`` stamps the completion (wall seconds).
    """

    def __init__(self, store: OnlineStore, *, background: bool = False,
                 clock: Callable[[], float] = time.time,
                 observe: Callable[[float], None] | None = None,
                 failed: Callable[[], None] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.observe = observe  # seconds each write took
        self.failed = failed
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(1, thread_name_prefix="headrace-online") if background else None)
        self._inflight: tuple[Future[float], Callable[[float], None]] | None = None

    def _write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]
               ) -> float:
        started = time.perf_counter()
        try:
            self.store.write(states, commits)
        except Exception:
            if self.failed is not None:
                self.failed()
            raise
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        return self.clock()

    def submit(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]],
               done: Callable[[float], None]) -> None:
        self.finish()
        if self._pool is None:
            done(self._write(states, commits))
            return
        self._inflight = (self._pool.submit(self._write, states, commits), done)

    def finish(self) -> None:
        """Wait for the write in flight (if any) and run its ``done``."""
        if self._inflight is None:
            return
        fut, done = self._inflight
        self._inflight = None
        done(fut.result())

    def close(self) -> None:
        self.finish()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
