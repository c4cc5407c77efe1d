"""One contract for every :class:`~headrace.core.online_store.OnlineStore`.

Each test runs twice: on :class:`MemoryOnlineStore` (unit tier, no network) and on
:class:`RedisOnlineStore` against the session's real redis-server (``integration``).
What a store wrote is checked through an independent view of the data, not through the
store: a plain redis-py client for the real server, the fake's attributes for the fake.
Keys are named per test (``ns.redis_prefix`` is uuid-based; the fake gets a uuid too).

The tests of :func:`headrace.core.resp.connected_socket` at the end pin the one use of
redis-py internals (``Connection._sock``) against the installed redis-py.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from headrace.core.errors import OnlineStoreError
from headrace.core.online_store import (
    EXPIRE_REFRESH_S,
    MemoryOnlineStore,
    OnlineStore,
    RedisOnlineStore,
    StateWrite,
)
from headrace.core.resp import connected_socket

DAY = 86_400
BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.integration)]


class Clock:
    """A pinned monotonic clock both stores read for the EXPIRE refresh rule."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """The store under test and an independent view of the data it holds."""

    store: OnlineStore
    prefix: str
    clock: Clock
    hset: Callable[[str, str, bytes], None]  # seed a hash field
    set_string: Callable[[str, bytes], None]  # seed a string key
    hgetall: Callable[[str], dict[bytes, bytes]]
    ttl: Callable[[str], int | None]  # seconds of the TTL set on the key; None: none
    expire: Callable[[str, int], None]  # change a TTL behind the store's back

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"


def _memory() -> Backend:
    clock = Clock()
    fake = MemoryOnlineStore(clock=clock)

    def hgetall(key: str) -> dict[bytes, bytes]:
        if key in fake.commits:
            return {k.encode(): b"%d" % v for k, v in fake.commits[key].items()}
        return {k.encode(): v for k, v in fake.hashes.get(key, {}).items()}

    def expire(key: str, ttl_s: int) -> None:
        fake.ttls[key] = ttl_s

    return Backend(fake, f"hr{uuid.uuid4().hex[:8]}", clock, fake.hset,
                   lambda k, v: fake.strings.__setitem__(k, v), hgetall, fake.ttls.get, expire)


def _redis(request: pytest.FixtureRequest) -> Backend:
    ns = request.getfixturevalue("ns")
    client = request.getfixturevalue("redis_client")  # deletes ns.redis_prefix* after
    clock = Clock()
    store = RedisOnlineStore(ns.stack.redis_url, timeout_ms=1000, clock=clock)
    request.addfinalizer(store.close)

    def ttl(key: str) -> int | None:
        left = int(client.ttl(key))  # TTL rounds to the nearest second: writes are fresh
        return None if left < 0 else left

    return Backend(store, ns.redis_prefix, clock, lambda k, f, v: client.hset(k, f, v),
                   lambda k, v: client.set(k, v),
                   lambda k: {bytes(a): bytes(b) for a, b in client.hgetall(k).items()},
                   ttl, lambda k, s: client.expire(k, s))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return _memory() if request.param == "memory" else _redis(request)


@pytest.fixture(params=BACKENDS)
def down(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    """A store whose server cannot be reached."""
    if request.param == "memory":
        fake = MemoryOnlineStore()
        fake.fail = "connection refused"
        yield fake
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    store = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", timeout_ms=50)
    yield store
    store.close()


# ------------------------------------------------------------------ reads
def test_read_hashes_one_row_per_key_none_where_absent(backend: Backend) -> None:
    store, k = backend.store, backend.key
    backend.hset(k("a:{1}"), "v@1", b"\x01one")
    backend.hset(k("a:{1}"), "w@1", b"\x00two")
    backend.hset(k("a:{3}"), "w@1", b"")
    rows = store.read_hashes([k("a:{1}"), k("a:{2}"), k("a:{3}")], ["v@1", "w@1"])
    assert rows == [[b"\x01one", b"\x00two"], [None, None], [None, b""]]
    assert store.read_hashes([], ["v@1"]) == []
    many = [k("a:{1}")] * 3000  # replies arrive over several socket reads
    assert store.read_hashes(many, ["w@1", "x@1"]) == [[b"\x00two", None]] * 3000


def test_load_one_value_per_pair(backend: Backend) -> None:
    store, k = backend.store, backend.key
    backend.hset(k("u"), "v@1", b"blob\r\n" * 3)
    backend.hset(k("u"), "w@1", b"w")
    pairs = [(k("u"), "v@1"), (k("u"), "nope"), (k("none"), "v@1"), (k("u"), "w@1")]
    assert store.load(pairs) == [b"blob\r\n" * 3, None, None, b"w"]
    assert store.load([]) == []
    assert store.load(pairs * 700) == [b"blob\r\n" * 3, None, None, b"w"] * 700  # > a batch


def test_get_and_set_strings(backend: Backend) -> None:
    store, k = backend.store, backend.key
    assert store.get(k("doc")) is None
    store.set(k("doc"), b'{"format": 1}')
    assert store.get(k("doc")) == b'{"format": 1}'
    store.set(k("doc"), b"\x00second")
    assert store.get(k("doc")) == b"\x00second"


def test_wrong_type_fails_the_call_and_the_next_call_works(backend: Backend) -> None:
    store, k = backend.store, backend.key
    backend.set_string(k("plain"), b"not a hash")
    backend.hset(k("h"), "f", b"v")
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        store.read_hashes([k("h"), k("plain"), k("h")], ["f"])
    assert store.read_hashes([k("h"), k("none")], ["f"]) == [[b"v"], [None]]
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        store.load([(k("plain"), "f")])
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        store.get(k("h"))
    assert store.load([(k("h"), "f")]) == [b"v"]


def test_concurrent_readers_each_get_their_own_answers(backend: Backend) -> None:
    store, k = backend.store, backend.key
    for i in range(8):
        backend.hset(k(f"t{i}"), "f", b"%d" % i)
    wrong: list[Any] = []

    def reader(i: int) -> None:
        for _ in range(50):
            rows = store.read_hashes([k(f"t{i}"), k(f"t{(i + 1) % 8}")], ["f"])
            if rows != [[b"%d" % i], [b"%d" % ((i + 1) % 8)]]:
                wrong.append(rows)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not wrong


# ------------------------------------------------------------------ writes
def test_write_sets_fields_and_ttls(backend: Backend) -> None:
    store, k = backend.store, backend.key
    store.write([StateWrite(k("u1"), "v@1", b"\x00\r\n", DAY),
                 StateWrite(k("u1"), "w@1", b"y", DAY),
                 StateWrite(k("u2"), "v@1", b"z", 60)], {})
    assert backend.hgetall(k("u1")) == {b"v@1": b"\x00\r\n", b"w@1": b"y"}
    assert backend.hgetall(k("u2")) == {b"v@1": b"z"}
    assert (backend.ttl(k("u1")), backend.ttl(k("u2"))) == (DAY, 60)
    store.write([StateWrite(k("u1"), "v@1", b"new", DAY)], {})  # overwrites, keeps the rest
    assert backend.hgetall(k("u1")) == {b"v@1": b"new", b"w@1": b"y"}
    assert store.load([(k("u1"), "v@1"), (k("u2"), "v@1")]) == [b"new", b"z"]


def test_expire_is_refreshed_per_the_refresh_rule(backend: Backend) -> None:
    store, k, clock = backend.store, backend.key, backend.clock
    key = k("long")

    def write(ttl_s: int) -> int | None:
        backend.expire(key, 5000)  # behind the store's back: shows whether it re-issued
        store.write([StateWrite(key, "v@1", b"x", ttl_s)], {})
        return backend.ttl(key)

    store.write([StateWrite(key, "v@1", b"x", DAY)], {})
    assert backend.ttl(key) == DAY  # the first write of a key sets its TTL
    clock.now += EXPIRE_REFRESH_S - 1
    assert write(DAY) == 5000  # the expiry set is within the refresh window: not re-issued
    clock.now += 2
    assert write(DAY) == DAY  # more than the window short of the one asked: re-issued
    assert write(DAY) == 5000
    assert write(30 * DAY) == 30 * DAY  # a much longer TTL: at once
    short = k("short")  # TTLs of at most twice the window: every write
    for _ in range(2):
        backend.expire(short, 5000)
        store.write([StateWrite(short, "v@1", b"x", int(2 * EXPIRE_REFRESH_S))], {})
        assert backend.ttl(short) == int(2 * EXPIRE_REFRESH_S)


def test_commit_records_round_trip(backend: Backend) -> None:
    store, k = backend.store, backend.key
    c1, c2 = k("commit:g:t:0"), k("commit:g:t:1")
    store.write([], {c1: {"online_next": 7, "online_wm": -3}, c2: {"online_next": 2**62}})
    assert store.read_commits([c1, k("commit:none"), c2]) == [
        {"online_next": 7, "online_wm": -3}, {}, {"online_next": 2**62}]
    assert backend.hgetall(c1) == {b"online_next": b"7", b"online_wm": b"-3"}  # decimal
    store.write([], {c1: {"offline_next": 9, "online_next": 8}})  # fields merge
    assert store.read_commits([c1]) == [{"online_next": 8, "online_wm": -3, "offline_next": 9}]
    assert store.read_commits([]) == []


def test_commit_records_are_written_only_after_every_state(backend: Backend) -> None:
    store, k = backend.store, backend.key
    backend.set_string(k("plain"), b"not a hash")  # HSET on it fails (WRONGTYPE)
    commit = k("commit:g:t:0")
    states = [StateWrite(k(f"s{i}"), "v@1", b"x", DAY) for i in range(2500)]  # two batches
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        store.write([*states, StateWrite(k("plain"), "v@1", b"x", DAY)],
                    {commit: {"online_next": 1}})
    assert store.read_commits([commit]) == [{}] and backend.hgetall(commit) == {}
    store.write(states, {commit: {"online_next": 1}})  # reconnects; states, then the record
    assert store.read_commits([commit]) == [{"online_next": 1}]
    assert backend.hgetall(k("s2499")) == {b"v@1": b"x"}


def test_delete_removes_hashes_strings_and_records(backend: Backend) -> None:
    store, k = backend.store, backend.key
    backend.hset(k("h"), "v@1", b"x")
    store.set(k("s"), b"y")
    store.write([], {k("commit:g:t:0"): {"online_next": 3}})
    keys = [k("h"), k("s"), k("commit:g:t:0"), k("absent")]
    store.delete(keys)
    assert store.load([(k("h"), "v@1")]) == [None] and store.get(k("s")) is None
    assert store.read_commits([k("commit:g:t:0")]) == [{}]
    store.delete([])
    # a key deleted then written again gets its EXPIRE again (the memo forgets it)
    store.write([StateWrite(k("h"), "v@1", b"z", DAY)], {})
    assert backend.ttl(k("h")) == DAY


# ------------------------------------------------------------------ failures
def test_every_call_fails_with_online_store_error_when_unreachable(down: OnlineStore) -> None:
    calls: list[Callable[[], object]] = [
        lambda: down.read_hashes(["k"], ["f"]),
        lambda: down.load([("k", "f")]),
        lambda: down.get("k"),
        lambda: down.set("k", b"v"),
        lambda: down.write([StateWrite("k", "f", b"v", 60)], {"c": {"n": 1}}),
        lambda: down.write([], {"c": {"n": 1}}),
        lambda: down.read_commits(["c"]),
        lambda: down.delete(["k"]),
    ]
    for call in calls:
        with pytest.raises(OnlineStoreError) as err:
            call()
        assert err.value.transient, err.value  # unreachable: worth waiting for
    down.close()


# ------------------------------------------------------------------ the raw-socket path
def test_redis_py_connection_keeps_its_socket_in_sock() -> None:
    """Fails when redis-py renames ``Connection._sock`` (no network needed)."""
    import redis

    conn = redis.Connection(host="127.0.0.1", port=1)
    assert conn._sock is None


@pytest.mark.integration
def test_connected_socket_connects_once_and_talks_resp(stack: Any) -> None:
    import redis

    conn = redis.ConnectionPool.from_url(stack.redis_url).make_connection()
    sock, fresh = connected_socket(conn)
    assert fresh and isinstance(sock, socket.socket)
    assert connected_socket(conn) == (sock, False)  # the same socket, not reconnected
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert sock.recv(64) == b"+PONG\r\n"
    conn.disconnect()
    again, fresh = connected_socket(conn)
    assert fresh and again is not sock
    conn.disconnect()


@pytest.mark.integration  # loopback only, but a socket all the same
def test_connected_socket_surfaces_connect_errors() -> None:
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = redis.Connection(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        connected_socket(conn)
