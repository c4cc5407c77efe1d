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

Elsewhere than glibc both glibc calls are skipped; nothing here changes a result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache
from typing import Any

__all__ = ["MALLOC_ARENAS", "RELEASE_AFTER_EVICTIONS", "RELEASE_EVERY_S", "limit_malloc_arenas",
           "release_memory"]

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
