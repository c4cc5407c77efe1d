"""Handing freed memory back to the operating system in a worker process.

A worker that evicts states (:mod:`streams.state_cache`) frees as much as it allocates,
but its allocators keep what was freed: measured on ``bench memory`` (300k users, a
24 MB state cache), the Python heap held ~110 MB while the process held 780 MB RSS.

* glibc gives every thread that allocates its own 64 MB arena (the offline pool, the
  online writer, the S3 client's loop, librdkafka's threads), each keeping its freed
  chunks: :func:`limit_malloc_arenas` caps them at :data:`MALLOC_ARENAS` (the
  ``MALLOC_ARENA_MAX`` setting, applied at start-up before those threads exist);
* freed chunks inside an arena are returned by ``malloc_trim``, and Arrow's pool
  (mimalloc or jemalloc: the Parquet parts, the decoded batches) keeps its freed pages
  until asked: :func:`release_memory` does both, at most every :data:`RELEASE_EVERY_S`
  from the worker's timer and only after :data:`RELEASE_AFTER_EVICTIONS` evictions, on
  a thread of its own (``malloc_trim`` runs without the GIL).

Arrow's own pool (mimalloc in the wheels) kept ~200 MB resident at the same bench that
held under 100 MB of Arrow data at any time: its freed pages stay with the threads that
freed them, out of ``release_unused``'s reach. A worker therefore gives Arrow the system
allocator (:func:`use_system_arrow_pool`: glibc, whose freed chunks ``malloc_trim``
returns; 130 MB less peak RSS there, at the same events/s) unless
``ARROW_DEFAULT_MEMORY_POOL`` names one.

Elsewhere than glibc both glibc calls are skipped; nothing here changes a result.

**The cyclic garbage collector** (:class:`GcFreezer`). Every cached state is a few
dozen GC-tracked containers, so a worker holding hundreds of thousands of states holds
millions of them, and CPython's collector re-scans all of them in every full collection:
measured on ``bench memory`` (512 MB cache), each full collection took ~0.7 s (a stall
of the loop, and of every event's freshness) and the collector 10 % of the worker's CPU.
The worker therefore moves every object that survived to the permanent generation once
a second (``gc.freeze()``, a list splice): young collections then only see what the last
second allocated, and full collections find nothing to scan. Objects in the permanent
generation are still freed by reference counting (an evicted state goes at once); only
reference *cycles* among them wait for :data:`GC_COLLECT_EVERY_S`, when everything is
unfrozen and collected once (measured: a few hundred cyclic objects per minute, so the
wait costs kilobytes).

**While catching up on a backlog the automatic collector is off**
(:meth:`GcFreezer.backlog`, ``headrace worker`` only). A backlog over millions of users
loads and drops hundreds of thousands of states a second, whose containers the young
and middle collections scan once or twice each before the freeze; reference counting
frees them all the same (a state holds no cycle). Measured on ``bench memory``'s
stream (2M Zipf events over 450k users, 256 MB cache, one run each way on the same
stack): with the collector on, 392 young and 106 middle collections took 12.5 s (14 and
65 ms each), 17.2k events/s and 127 s of worker CPU; with it off, 27.2k events/s and 83 s
of CPU at the same peak RSS (945 vs 926 MB), and a collection at the end found 3,043
unreachable objects for 88 s of input. Live input turns it back on: there it costs
little (few allocations a second), and five back-to-back ``bench stream`` pairs with it
off throughout showed freshness p50 higher in every pair (+28 to +39 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

__all__ = ["MALLOC_ARENAS", "RELEASE_AFTER_EVICTIONS", "RELEASE_EVERY_S", "limit_malloc_arenas",
           "release_memory", "use_system_arrow_pool", "GcFreezer", "GC_FREEZE_EVERY_S",
           "GC_COLLECT_EVERY_S"]

log = logging.getLogger(__name__)

#: glibc malloc arenas of a worker process (``M_ARENA_MAX``; glibc's default is 8 per core)
MALLOC_ARENAS = 2
#: seconds between two :func:`release_memory` calls in a running worker
RELEASE_EVERY_S = 10.0
#: state-cache evictions since the last call that make the next one worth it: freed
#: memory piles up where states are evicted. Without evictions (a stream whose states
#: fit the cache) nothing is trimmed: ``malloc_trim`` holds each arena's lock while it
#: walks the heap, a pause for the loop's allocations that showed in freshness p99
RELEASE_AFTER_EVICTIONS = 10_000
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
#: seconds between two ``gc.freeze()`` of a running worker (:class:`GcFreezer`)
GC_FREEZE_EVERY_S = 1.0
#: seconds between two full collections of everything frozen (reference cycles among
#: frozen objects wait this long; each costs about 0.5 µs per tracked object, ~2 s at
#: a full 512 MB cache on a slow core)
GC_COLLECT_EVERY_S = 1800.0


@lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the rest of the process; True if it took effect.

    Call before threads start allocating (arenas already made stay)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def use_system_arrow_pool() -> bool:
    """Make the system allocator Arrow's default pool (see the module docstring) unless
    ``ARROW_DEFAULT_MEMORY_POOL`` is set, or the process is not on glibc; True if it
    took effect. Call before Arrow allocates (buffers already made stay where they are).
    """
    import os

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or _libc() is None:
        return False
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    return True


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's pool's unused pages, then glibc's free
    chunks (``malloc_trim(0)``). Safe from any thread; costs milliseconds."""
    import pyarrow as pa

    try:
        pa.default_memory_pool().release_unused()
    except (AttributeError, NotImplementedError):  # older pyarrow, a pool without it
        pass
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class GcFreezer:
    """Keeps the cyclic GC off the cached states (see the module docstring): call
    :meth:`tick` from the worker's timer.

    Args:
        freeze_every_s: Seconds between two ``gc.freeze()``.
        collect_every_s: Seconds between two full collections (``gc.unfreeze()``,
            ``gc.collect()``, ``gc.freeze()``), the first one that long after start.
        clock: Monotonic seconds (tests pin it).
        pause_in_backlog: :meth:`backlog` turns the automatic collector off while the
            input is a backlog (process-wide: only for a process that is the worker's
            own, ``headrace worker``); False: :meth:`backlog` does nothing.

    Attributes:
        freezes, collections: How many of each so far; ``collected``: objects the full
            collections found unreachable; ``collect_s``: seconds they took.
        paused: Whether :meth:`backlog` turned the automatic collector off (and has not
            turned it back on).
    """

    def __init__(self, freeze_every_s: float = GC_FREEZE_EVERY_S,
                 collect_every_s: float = GC_COLLECT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic,
                 pause_in_backlog: bool = False) -> None:
        self.freeze_every_s = freeze_every_s
        self.collect_every_s = collect_every_s
        self._clock = clock
        self._frozen_at = self._collected_at = clock()
        self.freezes = self.collections = self.collected = 0
        self.collect_s = 0.0
        self.pause_in_backlog = pause_in_backlog
        self.paused = False

    def backlog(self, behind: bool) -> None:
        """The input is a backlog (``behind``) or live: the automatic collector goes off
        for a backlog and back on for live input (see the module docstring). Cycles made
        meanwhile are left to the scheduled full collection, or to the next automatic one
        once it is on again."""
        if not self.pause_in_backlog or behind == self.paused:
            return
        self.paused = behind
        if behind:
            gc.disable()
        else:
            gc.enable()

    def resume(self) -> None:
        """Turn the automatic collector back on if :meth:`backlog` turned it off (the
        worker stops)."""
        self.backlog(False)

    def tick(self) -> None:
        """Freeze (or collect, then freeze) when due."""
        now = self._clock()
        if now - self._collected_at >= self.collect_every_s:
            self._collected_at = self._frozen_at = now
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            took = time.perf_counter() - started
            self.collections += 1
            self.collected += found
            self.collect_s += took
            log.info("full garbage collection: %d unreachable objects in %.2fs; %d frozen",
                     found, took, gc.get_freeze_count())
        elif now - self._frozen_at >= self.freeze_every_s:
            self._frozen_at = now
            gc.freeze()
            self.freezes += 1
