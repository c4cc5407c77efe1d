"""The online store the server reads: a small interface, the Redis one, and a fake.

Interface (:class:`OnlineStore`), three methods:

* ``read_hashes(keys, fields)``: HMGET ``fields`` of every key, ONE round trip;
* ``get(key)``: one string value (the priors document);
* ``close()``.

Both raise :class:`~headrace.errors.OnlineStoreError` when the store cannot answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from headrace.errors import OnlineStoreError, missing_extra

try:
    import hiredis
except ImportError:  # pragma: no cover - depends on the install (the serve extra has it)
    hiredis = None

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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_hmget(keys: Sequence[str], fields: Sequence[str]) -> bytes:
    """RESP bytes of one ``HMGET key field...`` per key, pipelined (no MULTI/EXEC)."""
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
    tail = b"".join(_bulk(f.encode()) for f in fields)
    return b"".join([head + _bulk(k.encode()) + tail for k in keys])


class _ErrorReply(Exception):
    """Redis answered one of the pipelined commands with an error."""


def _replies(sock: Any, reader: Any, buf: bytearray, n: int) -> Rows:
    """The next ``n`` replies on ``sock``, parsed by the hiredis ``reader`` as they arrive
    (one C call per reply, none of redis-py's per-reply Python); ``buf`` is the
    connection's receive buffer."""
    out: Rows = []
    gets = reader.gets
    view = memoryview(buf)
    while True:
        reply = gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise _ErrorReply(str(reply))
            out.append(reply)
            if len(out) == n:
                return out
            reply = gets()
        got = sock.recv_into(buf)
        if not got:
            raise ConnectionError("redis closed the connection")
        reader.feed(view, 0, got)


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
        self._pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            retry=None,
        )
        # the priors document is read in the background, not under the request budget
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=max(timeout, 2.0),
            socket_connect_timeout=max(timeout, 2.0),
            retry=None,
        )
        self._unavailable = (RedisConnectionError, RedisTimeoutError, OSError)
        self._redis_error = RedisError
        self._errors = (RedisError, hiredis.ProtocolError, _ErrorReply)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._pool.make_connection()
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        if not keys:
            return []
        payload = pack_hmget(keys, fields)
        conn = self._connection()
        try:
            if conn._sock is None:  # redis-py connects (AUTH, SELECT) and sets the timeouts
                conn.connect()
                self._local.reader = hiredis.Reader()  # fresh: nothing left of the old one
                if getattr(self._local, "buf", None) is None:
                    self._local.buf = bytearray(1 << 16)
            sock = conn._sock
            sock.sendall(payload)
            return _replies(sock, self._local.reader, self._local.buf, len(keys))
        except self._unavailable as exc:  # with OSError: socket timeouts, resets
            conn.disconnect()
            raise OnlineStoreError(f"redis unavailable: {exc!r}") from exc
        except self._errors as exc:
            conn.disconnect()  # the rest of the replies are unread
            raise OnlineStoreError(f"redis error: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        try:
            value = self._client.get(key)
        except self._redis_error as exc:
            raise OnlineStoreError(f"redis error: {exc}") from exc
        return value  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.disconnect()
        self._pool.disconnect()
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
