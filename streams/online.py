"""Online store backends for the stream worker: Redis, and an in-memory fake for unit tests.

Both implement the same three-method interface (:class:`OnlineStore`): batch-load entity
view states, write a batch of states with their TTLs and commit records, and read
commit records. Writes overwrite (a view state is the whole state of that entity's
view), so retrying a write is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from headrace.core.errors import OnlineStoreError
from headrace.core.resp import PipelineConnections, pack

__all__ = ["StateWrite", "OnlineStore", "OnlineWrites", "RedisOnlineStore", "MemoryOnlineStore"]


@dataclass(frozen=True)
class StateWrite:
    key: str
    field: str
    value: bytes
    ttl_s: int


class OnlineStore(Protocol):
    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """Values of (key, field) pairs in one round trip; None where absent."""

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        """Write states (HSET + EXPIRE), then commit records, pipelined."""

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """Commit records (empty dict where absent)."""


class RedisOnlineStore:
    """The Redis backend: pipelines packed by hand and their replies read with hiredis
    (:mod:`headrace.core.resp`), one connection per thread (the offline writer's thread
    records its progress beside the loop's flushes)."""

    #: an EXPIRE is re-issued for a key only when the expiry it last set (tracked in
    #: memory) is more than this many seconds short of the one a write asks for: key
    #: TTLs are days, and readers honour the view TTL by event time anyway
    EXPIRE_REFRESH_S = 300.0
    _EXPIRY_CACHE_MAX = 2_000_000

    def __init__(self, url: str, *, batch: int = 2000) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - dependency guard
            from headrace.core.errors import missing_extra

            raise missing_extra("redis", "stream") from exc
        self._client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
        self._pipelines = PipelineConnections(redis.ConnectionPool.from_url(
            url, socket_timeout=30, socket_connect_timeout=5))
        self._errors = (OSError, redis.exceptions.RedisError, *self._pipelines.errors)
        self._batch = batch
        self._expiry: dict[str, float] = {}  # key -> monotonic time its TTL runs out

    def _execute(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands in one write and read one reply per command (an error
        reply raises; the connection is then reopened by the next call)."""
        return self._pipelines.execute(b"".join(commands), len(commands))

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        try:
            for start in range(0, len(pairs), self._batch):
                out.extend(self._execute(
                    [pack(b"HGET", key.encode(), fld.encode())
                     for key, fld in pairs[start : start + self._batch]]
                ))
        except self._errors as exc:
            raise OnlineStoreError(f"redis load failed: {exc}") from exc
        return out

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        expiry = self._expiry
        if len(expiry) > self._EXPIRY_CACHE_MAX:
            expiry.clear()
        refresh = self.EXPIRE_REFRESH_S
        try:
            for start in range(0, len(states), self._batch):
                commands: list[bytes] = []
                now = time.monotonic()
                refreshed: dict[str, float] = {}
                for w in states[start : start + self._batch]:
                    key = w.key.encode()
                    commands.append(pack(b"HSET", key, w.field.encode(), w.value))
                    want = now + w.ttl_s
                    have = refreshed.get(w.key) or expiry.get(w.key)
                    if have is None or have < want - refresh or w.ttl_s <= 2 * refresh:
                        commands.append(pack(b"EXPIRE", key, b"%d" % w.ttl_s))
                        refreshed[w.key] = want
                self._execute(commands)
                expiry.update(refreshed)  # only once the EXPIREs are known to be applied
            if commits:
                # commit records only after every state of the batch is written
                commands = []
                for key, mapping in commits.items():
                    args = [b"HSET", key.encode()]
                    for k, v in mapping.items():
                        args += [k.encode(), b"%d" % int(v)]
                    commands.append(pack(*args))
                self._execute(commands)
        except self._errors as exc:
            raise OnlineStoreError(f"redis write failed: {exc}") from exc

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            raw = pipe.execute()
        except self._errors as exc:
            raise OnlineStoreError(f"redis read failed: {exc}") from exc
        return [{k.decode(): int(v) for k, v in r.items()} for r in raw]

    @property
    def client(self):  # noqa: ANN201 - redis.Redis
        return self._client


class MemoryOnlineStore:
    """In-memory fake with the same interface (unit tests only)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.ttls: dict[str, int] = {}
        self.commits: dict[str, dict[str, int]] = {}
        self.fail = False

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        if self.fail:
            raise OnlineStoreError("fake redis is down")
        return [self.hashes.get(k, {}).get(f) for k, f in pairs]

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        if self.fail:
            raise OnlineStoreError("fake redis is down")
        for w in states:
            self.hashes.setdefault(w.key, {})[w.field] = w.value
            self.ttls[w.key] = w.ttl_s
        for key, mapping in commits.items():
            self.commits.setdefault(key, {}).update({k: int(v) for k, v in mapping.items()})

    def read_commits(self, keys: Iterable[str]) -> list[dict[str, int]]:
        return [dict(self.commits.get(k, {})) for k in keys]


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
