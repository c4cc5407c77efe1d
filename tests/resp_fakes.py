"""A fake Redis at the socket level, for unit tests of code that pipelines RESP itself
(:mod:`headrace.core.resp`): it records the commands sent and answers each with the next
prepared reply, in RESP bytes that the real hiredis reader parses, split across reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_commands(buf: bytes) -> list[list[bytes]]:
    """Parse RESP arrays of bulk strings (what a client sends)."""
    out, i = [], 0
    while i < len(buf):
        assert buf[i : i + 1] == b"*"
        j = buf.index(b"\r\n", i)
        n, i = int(buf[i + 1 : j]), j + 2
        args = []
        for _ in range(n):
            assert buf[i : i + 1] == b"$"
            j = buf.index(b"\r\n", i)
            size, i = int(buf[i + 1 : j]), j + 2
            args.append(buf[i : i + size])
            assert buf[i + size : i + size + 2] == b"\r\n"
            i += size + 2
        out.append(args)
    return out


def resp(reply: Any) -> bytes:
    """RESP bytes of a reply: int, bytes (bulk), None (nil), list, or an Exception
    (an error reply with its message)."""
    if isinstance(reply, Exception):
        return b"-%s\r\n" % str(reply).encode()
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(resp(r) for r in reply)


class FakeSocket:
    def __init__(self, answer: Callable[[list[bytes]], Any], chunk: int) -> None:
        self.answer = answer
        self.chunk = chunk
        self.sent = b""
        self.pending = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data
        for cmd in parse_commands(bytes(data)):
            self.pending += resp(self.answer(cmd))

    def recv_into(self, buf: bytearray) -> int:
        n = min(len(buf), self.chunk, len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class FakeConnection:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self._sock: FakeSocket | None = None

    def connect(self) -> None:
        self.pool.connects += 1
        self._sock = FakeSocket(self.pool.answer, self.pool.chunk)
        self.pool.sockets.append(self._sock)

    def disconnect(self) -> None:
        if self._sock is not None:
            self.pool.dropped += 1
        self._sock = None


class FakePool:
    """Stands in for a redis-py ``ConnectionPool``: ``answer(command args)`` gives each
    command's reply (default: 1); replies arrive ``chunk`` bytes per socket read."""

    def __init__(self, answer: Callable[[list[bytes]], Any] | None = None,
                 chunk: int = 7) -> None:
        self.answer = answer or (lambda _cmd: 1)
        self.chunk = chunk
        self.sockets: list[FakeSocket] = []
        self.connects = 0
        self.dropped = 0

    def make_connection(self) -> FakeConnection:
        return FakeConnection(self)

    def disconnect(self) -> None:
        pass

    @property
    def sent(self) -> bytes:
        return b"".join(s.sent for s in self.sockets)

    def commands(self) -> list[list[bytes]]:
        return parse_commands(self.sent)
