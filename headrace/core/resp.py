"""Pipelined Redis commands on a raw socket: RESP packing and reply reading.

Both hot paths, the lookup server's HMGETs and the stream worker's HSET/EXPIRE
flushes, send a whole pipeline in one write and parse the replies with a hiredis reader
straight off the socket: one C call per reply, none of redis-py's per-command and
per-reply Python (packing, callbacks, retries). redis-py still opens each connection
(AUTH, SELECT, timeouts). No MULTI/EXEC: a pipeline, not a transaction.

The one place that touches redis-py's internals is :func:`connected_socket`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

try:
    import hiredis
except ImportError:  # pragma: no cover - depends on the install (stream/serve extras have it)
    hiredis = None  # type: ignore[assignment]

__all__ = [
    "ErrorReply",
    "PipelineConnections",
    "bulk",
    "connected_socket",
    "pack",
    "pack_hmget",
    "read_replies",
]

_BUFFER = 1 << 16


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(*args: bytes) -> bytes:
    """One command (a RESP array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts += (b"$%d\r\n" % len(a), a, b"\r\n")
    return b"".join(parts)


def pack_hmget(keys: Sequence[str], fields: Sequence[str]) -> bytes:
    """One ``HMGET key field...`` per key, pipelined."""
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
    tail = b"".join(bulk(f.encode()) for f in fields)
    return b"".join([head + bulk(k.encode()) + tail for k in keys])


def connected_socket(conn: Any) -> tuple[Any, bool]:
    """The socket of a redis-py ``Connection``, connecting it first when it has none.

    redis-py has no public way to write to a connection's socket and read the replies
    ourselves, so this reads the private ``Connection._sock``: None until ``connect()``
    and again after ``disconnect()``, the connected ``socket.socket`` in between.
    ``connect()`` is redis-py's own: it opens the socket with the pool's timeouts and
    runs the handshake (AUTH, SELECT, client name). The tests in
    ``tests/contract/test_online_store.py`` pin this against the installed redis-py and
    a real redis-server, so an upgrade that moves the attribute fails there, not in
    production.

    Returns:
        ``(sock, fresh)``: ``fresh`` is True when this call connected (any reply parser
        state kept for an earlier socket must be dropped).

    Raises:
        redis.exceptions.ConnectionError: connecting failed.
        ConnectionError: redis-py connected but exposes no socket (its internals moved).
    """
    sock = conn._sock
    if sock is not None:
        return sock, False
    conn.connect()
    sock = conn._sock
    if sock is None:  # pragma: no cover - only if redis-py's internals change
        raise ConnectionError("redis-py connected but Connection._sock is unset")
    return sock, True


class ErrorReply(Exception):
    """Redis answered one of the pipelined commands with an error."""


def read_replies(sock: Any, reader: Any, buf: bytearray, n: int) -> list[Any]:
    """The next ``n`` replies on ``sock``, parsed by the hiredis ``reader`` as they arrive;
    ``buf`` is the connection's receive buffer.

    Raises:
        ErrorReply: a command's reply is an error (the remaining replies stay unread).
        ConnectionError: the server closed the connection.
        OSError: the socket failed or timed out.
    """
    out: list[Any] = []
    if n == 0:
        return out
    gets = reader.gets
    view = memoryview(buf)
    while True:
        reply = gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise ErrorReply(str(reply))
            out.append(reply)
            if len(out) == n:
                return out
            reply = gets()
        got = sock.recv_into(buf)
        if not got:
            raise ConnectionError("redis closed the connection")
        reader.feed(view, 0, got)


class PipelineConnections:
    """One connection per calling thread from a redis-py ``ConnectionPool``, each with
    its own hiredis reader and receive buffer (no pool checkout or health poll per call).

    :meth:`execute` sends packed commands and returns their replies. On any error the
    thread's connection is closed (replies may be left unread on it) and reopened by its
    next call; callers map the errors (:data:`errors` lists them) to their own.
    """

    def __init__(self, pool: Any) -> None:
        if hiredis is None:  # pragma: no cover - depends on the install
            from headrace.core.errors import missing_extra

            raise missing_extra("hiredis", "stream")
        from redis.exceptions import RedisError

        self._pool = pool
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        #: what :meth:`execute` raises besides ``OSError`` (socket failures, timeouts)
        self.errors: tuple[type[Exception], ...] = (RedisError, hiredis.ProtocolError,
                                                     ErrorReply)

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._pool.make_connection()
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
            self._local.buf = bytearray(_BUFFER)
        return conn

    def execute(self, payload: bytes, n: int) -> list[Any]:
        """Send ``payload`` (``n`` packed commands) in one write; the ``n`` replies."""
        conn = self._connection()
        try:
            sock, fresh = connected_socket(conn)
            if fresh:
                self._local.reader = hiredis.Reader()  # nothing left of the old socket's
            sock.sendall(payload)
            return read_replies(sock, self._local.reader, self._local.buf, n)
        except BaseException:
            conn.disconnect()
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.disconnect()
        self._pool.disconnect()
