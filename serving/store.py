"""The online store the server reads: a small interface, the Redis one, and a fake.

Interface (:class:`OnlineStore`), three methods:

* ``read_hashes(keys, fields)``: HMGET ``fields`` of every key, ONE round trip;
* ``get(key)``: one string value (the priors document);
* ``close()``.

Both raise :class:`~headrace.core.errors.OnlineStoreError` when the store cannot answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from headrace.core.errors import OnlineStoreError, missing_extra
from headrace.core.resp import PipelineConnections, hiredis, pack_hmget

__all__ = ["OnlineStore", "RedisOnlineStore", "FakeOnlineStore", "pack_hmget"]

Rows = list[list[bytes | None]]


class OnlineStore(Protocol):
    """What serving needs from the online store."""

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        """For each key, the values of ``fields`` (None where absent), in order.

        Raises:
            OnlineStoreError: the store failed or timed out.
        """
        ...

    def get(self, key: str) -> bytes | None:
        """A string value, or None.

        Raises:
            OnlineStoreError: the store failed or timed out.
        """
        ...

    def close(self) -> None: ...


class RedisOnlineStore:
    """The Redis online store (redis-py with the hiredis parser).

    ``read_hashes`` sends every HMGET in one write and parses the replies with a hiredis
    reader straight off the socket as they arrive: one round trip, what
    ``pipeline(transaction=False)`` sends, without redis-py's per-command and per-reply
    Python work (redis-py still connects, authenticates and selects the database).
    Each request thread keeps its own connection (no pool checkout, health poll
    or pool metrics per request); a connection that failed is closed and reopened on
    its thread's next call. Socket connect/read timeouts equal ``timeout_ms`` (the
    serving budget), and redis-py's own retries are off: the caller decides (breaker,
    fallback).

    Args:
        url: redis-py URL (``redis://host:port/db``).
        timeout_ms: socket connect and read timeout in milliseconds.
        max_connections: most connections (one per request thread).
    """

    def __init__(self, url: str, timeout_ms: float = 10.0, max_connections: int = 64) -> None:
        try:
            import redis
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import RedisError
            from redis.exceptions import TimeoutError as RedisTimeoutError
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise missing_extra("redis", "serve") from exc
        if hiredis is None:  # pragma: no cover - depends on the install
            raise missing_extra("hiredis", "serve")
        timeout = timeout_ms / 1000.0
        self._pipelines = PipelineConnections(redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            retry=None,
        ))
        # the priors document is read in the background, not under the request budget
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=max(timeout, 2.0),
            socket_connect_timeout=max(timeout, 2.0),
            retry=None,
        )
        self._unavailable = (RedisConnectionError, RedisTimeoutError, OSError)
        self._redis_error = RedisError
        self._errors = self._pipelines.errors

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        if not keys:
            return []
        try:
            return self._pipelines.execute(pack_hmget(keys, fields), len(keys))
        except self._unavailable as exc:  # with OSError: socket timeouts, resets
            raise OnlineStoreError(f"redis unavailable: {exc!r}") from exc
        except self._errors as exc:  # the rest of the replies were left unread
            raise OnlineStoreError(f"redis error: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        try:
            value = self._client.get(key)
        except self._redis_error as exc:
            raise OnlineStoreError(f"redis error: {exc}") from exc
        return value  # type: ignore[return-value]

    def close(self) -> None:
        self._pipelines.close()
        self._client.close()


class FakeOnlineStore:
    """In-memory :class:`OnlineStore` for unit tests, with failure injection.

    Attributes:
        hashes: key → field → bytes; write with :meth:`hset`.
        strings: key → bytes; write with :meth:`set`.
        fail: when set, every call raises ``OnlineStoreError(fail)``.
        delay_s: sleep this long in every ``read_hashes`` (``sleep`` is injectable).
        calls: number of ``read_hashes`` calls (round trips).
    """

    def __init__(
        self,
        hashes: Mapping[str, Mapping[str, bytes]] | None = None,
        sleep: object = time.sleep,
    ) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {k: dict(v) for k, v in (hashes or {}).items()}
        self.strings: dict[str, bytes] = {}
        self.fail: str | None = None
        self.delay_s = 0.0
        self.calls = 0
        self._sleep = sleep
        self._lock = threading.Lock()

    def hset(self, key: str, field: str, value: bytes) -> None:
        with self._lock:
            self.hashes.setdefault(key, {})[field] = value

    def set(self, key: str, value: bytes | str) -> None:
        with self._lock:
            self.strings[key] = value.encode() if isinstance(value, str) else value

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        self.calls += 1
        if self.delay_s:
            self._sleep(self.delay_s)  # type: ignore[operator]
        if self.fail:
            raise OnlineStoreError(self.fail)
        with self._lock:
            return [[self.hashes.get(k, {}).get(f) for f in fields] for k in keys]

    def get(self, key: str) -> bytes | None:
        if self.fail:
            raise OnlineStoreError(self.fail)
        return self.strings.get(key)

    def close(self) -> None:
        pass
