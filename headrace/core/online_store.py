"""The online store: one small interface, the Redis implementation and an in-memory fake.

Everything of ours that reaches Redis goes through :class:`OnlineStore`: the stream
worker (view states, commit records), the feature server (one HMGET round trip per
request, the priors document), ``headrace get`` and ``headrace priors``.

* reads: :meth:`~OnlineStore.read_hashes` (HMGET of keys x fields, ONE round trip),
  :meth:`~OnlineStore.load` (one field per key), :meth:`~OnlineStore.get` (a string);
* writes: :meth:`~OnlineStore.write` (view states with their TTLs, then commit
  records), :meth:`~OnlineStore.set` (a string);
* commit records: :meth:`~OnlineStore.read_commits`; and :meth:`~OnlineStore.close`.

Every method raises :class:`~headrace.core.errors.OnlineStoreError` when the store
cannot answer. Writes overwrite (a view state is the whole state of that entity's view),
so retrying one is harmless. ``tests/contract/test_online_store.py`` runs one contract
against :class:`MemoryOnlineStore` and :class:`RedisOnlineStore` on a real redis-server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from headrace.core.errors import OnlineStoreAuthError, OnlineStoreError, missing_extra
from headrace.core.redis_conn import RedisConfig, auth_error
from headrace.core.resp import PipelineConnections, pack, pack_hmget
from headrace.core.retry import DEFAULT_BACKOFF, Backoff, Outage, with_retries

_T = TypeVar("_T")

log = logging.getLogger(__name__)

__all__ = [
    "EXPIRE_REFRESH_S",
    "MemoryOnlineStore",
    "OnlineStore",
    "RedisOnlineStore",
    "RetryingOnlineStore",
    "TRANSIENT_REPLIES",
    "Rows",
    "StateWrite",
    "expire_due",
]

#: error replies of a Redis that is starting, busy or failing over: retried, like a
#: refused connection or a timeout
TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "READONLY",
                     "NOREPLICAS", "MISCONF")

#: one list per key: the value of each field asked for, None where absent
Rows = list[list[bytes | None]]

#: an EXPIRE is re-issued for a key only when the expiry a store last set for it (kept
#: in memory) is more than this many seconds short of the one a write asks for, or when
#: the TTL is at most twice this: key TTLs are days, and readers honour the view TTL by
#: event time anyway
EXPIRE_REFRESH_S = 300.0


def expire_due(have: float | None, want: float, ttl_s: int) -> bool:
    """Whether a write must (re-)issue ``EXPIRE key ttl_s`` (the refresh rule).

    Args:
        have: when (monotonic seconds) the expiry last set on the key runs out, or None
            when this store has set none.
        want: when the expiry this write asks for runs out (now + ``ttl_s``).
        ttl_s: the TTL asked for, seconds.
    """
    return have is None or have < want - EXPIRE_REFRESH_S or ttl_s <= 2 * EXPIRE_REFRESH_S


@dataclass(frozen=True)
class StateWrite:
    """One view state to write: ``HSET key field value`` then, per the refresh rule,
    ``EXPIRE key ttl_s``."""

    key: str
    field: str
    value: bytes
    ttl_s: int


class OnlineStore(Protocol):
    """What the worker, the server and the CLI need from the online store."""

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        """For each key, the values of ``fields`` (None where absent), in order; ONE
        round trip. Raises OnlineStoreError (failure, timeout, a key that is no hash)."""
        ...

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """The value of each (key, field) pair, None where absent. Raises OnlineStoreError."""
        ...

    def get(self, key: str) -> bytes | None:
        """A string value, or None. Raises OnlineStoreError."""
        ...

    def set(self, key: str, value: bytes) -> None:
        """Store a string value. Raises OnlineStoreError."""
        ...

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        """Write ``states`` (HSET, and EXPIRE per :func:`expire_due`), then, only once
        every state is written, the ``commits`` records (HSET key name value...).
        Raises OnlineStoreError; a failed state write leaves the commit records unwritten."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (absent ones are no error). Raises OnlineStoreError."""
        ...

    def forget_expiries(self) -> None:
        """Forget which keys had their expiry set (a Redis that lost its data lost them:
        every key's next write issues its EXPIRE again)."""
        ...

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """The commit record of each key (an empty dict where absent). Raises
        OnlineStoreError."""
        ...

    def close(self) -> None:
        """Release the connections."""
        ...


class RedisOnlineStore:
    """The Redis online store.

    Pipelined commands (:meth:`read_hashes`, :meth:`load`, :meth:`write`,
    :meth:`read_commits`) are packed by hand and sent in one write per batch, their
    replies parsed by a hiredis reader straight off the socket
    (:class:`~headrace.core.resp.PipelineConnections`): one round trip, what
    ``pipeline(transaction=False)`` sends, without redis-py's per-command and per-reply
    Python work (measured faster for both the lookup and the worker flush). Each calling
    thread keeps its own connection; a connection that failed is closed and reopened on
    its thread's next call. The string document (:meth:`get`, :meth:`set`) goes through
    a plain redis-py client with a longer timeout: the server reads the priors in the
    background, not under the request budget. redis-py's own retries are off: the caller
    decides (breaker, fallback, the worker's restart).

    Args:
        url: where Redis is: a :class:`~headrace.core.redis_conn.RedisConfig`
            (``settings.redis_config()``: password and TLS settings) or a plain
            ``redis://[user:password@]host:port/db`` URL. A refused password or TLS
            handshake raises :class:`~headrace.core.errors.OnlineStoreAuthError`.
        timeout_ms: socket read timeout of the pipelined commands, milliseconds: the
            serving budget, or the worker's 30 s (the default).
        connect_timeout_ms: socket connect timeout of the pipelined commands,
            milliseconds; default ``min(timeout_ms, 5000)``.
        max_connections: most pipelined connections (one per calling thread).
        batch: most commands per pipeline in :meth:`load`, :meth:`write` and
            :meth:`read_commits`.
        clock: monotonic seconds, for the EXPIRE refresh rule.

    The document client's read and connect timeouts are those above, at least 2 s each.
    """

    # keys whose expiry is remembered (bounds the memory: ~200 B a key, so a worker over
    # millions of entities does not hold hundreds of MB of it; past it the memo restarts
    # and each key's next write re-issues its EXPIRE once)
    _EXPIRY_CACHE_MAX = 250_000
    # also a class default: the socket-level unit tests build stores without __init__
    _clock: Callable[[], float] = staticmethod(time.monotonic)
    _unavailable: tuple[type[Exception], ...] = (OSError,)
    _config: RedisConfig | None = None

    def __init__(self, url: RedisConfig | str, timeout_ms: float = 30_000.0, *,
                 connect_timeout_ms: float | None = None, max_connections: int = 64,
                 batch: int = 2000, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import RedisError
            from redis.exceptions import TimeoutError as RedisTimeoutError
        except ImportError as exc:  # pragma: no cover - every deployable's extra has it
            raise missing_extra("redis", "serve") from exc
        timeout = timeout_ms / 1000.0
        connect = min(timeout, 5.0) if connect_timeout_ms is None else connect_timeout_ms / 1000.0
        self._config = config = RedisConfig.of(url)
        self._pipelines = PipelineConnections(config.connection_pool(
            socket_timeout=timeout, socket_connect_timeout=connect,
            max_connections=max_connections, retry=None))
        self._client = config.client(
            socket_timeout=max(timeout, 2.0), socket_connect_timeout=max(connect, 2.0),
            retry=None)
        # OSError: socket failures and timeouts on the raw path
        self._unavailable: tuple[type[Exception], ...] = (
            RedisConnectionError, RedisTimeoutError, OSError)
        self._errors: tuple[type[Exception], ...] = (
            OSError, RedisError, *self._pipelines.errors)
        self._batch = batch
        self._clock = clock
        self._expiry: dict[str, float] = {}  # key -> monotonic time its TTL runs out

    def _execute(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands in one write and read one reply per command (an error
        reply raises; the connection is then reopened by the next call)."""
        return self._pipelines.execute(b"".join(commands), len(commands))

    def _error(self, what: str, exc: BaseException) -> OnlineStoreError:
        """``exc`` as an :class:`OnlineStoreError`, transient when Redis is unreachable,
        timing out, or answering one of :data:`TRANSIENT_REPLIES`; an
        :class:`OnlineStoreAuthError` (one sentence) for a refused password or TLS
        handshake. The password never appears in the message."""
        config = self._config
        endpoint = config.endpoint if config is not None else "redis"
        denied = auth_error(exc, endpoint)
        if denied is not None:
            return denied
        text = config.redact(str(exc)) if config is not None else str(exc)
        transient = isinstance(exc, self._unavailable) or text.startswith(TRANSIENT_REPLIES)
        return OnlineStoreError(f"{what}: {text}", transient=transient)

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        if not keys:
            return []
        try:
            return self._pipelines.execute(pack_hmget(keys, fields), len(keys))
        except self._errors as exc:  # the rest of the replies were left unread
            raise self._error("redis error", exc) from exc

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        try:
            for start in range(0, len(pairs), self._batch):
                out.extend(self._execute(
                    [pack(b"HGET", key.encode(), fld.encode())
                     for key, fld in pairs[start : start + self._batch]]
                ))
        except self._errors as exc:
            raise self._error("redis load failed", exc) from exc
        return out

    def get(self, key: str) -> bytes | None:
        try:
            value = self._client.get(key)
        except self._errors as exc:
            raise self._error("redis error", exc) from exc
        return value  # bytes: decode_responses is off

    def set(self, key: str, value: bytes) -> None:
        try:
            self._client.set(key, value)
        except self._errors as exc:
            raise self._error("redis error", exc) from exc

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        expiry = self._expiry
        if len(expiry) > self._EXPIRY_CACHE_MAX:
            expiry.clear()
        try:
            for start in range(0, len(states), self._batch):
                commands: list[bytes] = []
                now = self._clock()
                refreshed: dict[str, float] = {}
                for w in states[start : start + self._batch]:
                    key = w.key.encode()
                    commands.append(pack(b"HSET", key, w.field.encode(), w.value))
                    want = now + w.ttl_s
                    if expire_due(refreshed.get(w.key) or expiry.get(w.key), want, w.ttl_s):
                        commands.append(pack(b"EXPIRE", key, b"%d" % w.ttl_s))
                        refreshed[w.key] = want
                self._execute(commands)
                expiry.update(refreshed)  # only once the EXPIREs are known to be applied
            if commits:
                # commit records only after every state of the batch is written
                commands = []
                for name, mapping in commits.items():
                    args = [b"HSET", name.encode()]
                    for k, v in mapping.items():
                        args += [k.encode(), b"%d" % int(v)]
                    commands.append(pack(*args))
                self._execute(commands)
        except self._errors as exc:
            raise self._error("redis write failed", exc) from exc

    def delete(self, keys: Sequence[str]) -> None:
        try:
            for start in range(0, len(keys), self._batch):
                self._execute([pack(b"DEL", k.encode()) for k in keys[start : start + self._batch]])
        except self._errors as exc:
            raise self._error("redis delete failed", exc) from exc
        for k in keys:
            self._expiry.pop(k, None)

    def forget_expiries(self) -> None:
        """Forget which keys had their expiry set (a Redis that lost its data lost them:
        every key's next write issues its EXPIRE again)."""
        self._expiry.clear()

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        out: list[dict[str, int]] = []
        try:
            for start in range(0, len(keys), self._batch):
                out.extend(_record(r) for r in self._execute(
                    [pack(b"HGETALL", k.encode()) for k in keys[start : start + self._batch]]))
        except self._errors as exc:
            raise self._error("redis read failed", exc) from exc
        return out

    def close(self) -> None:
        self._pipelines.close()
        self._client.close()


def _record(reply: Any) -> dict[str, int]:
    """A commit record from an HGETALL reply (a flat list in RESP2, a map in RESP3)."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2],
                                                              strict=True)
    return {k.decode(): int(v) for k, v in items}


class MemoryOnlineStore:
    """In-memory :class:`OnlineStore` for unit tests, with failure injection.

    It keeps Redis's key types (a string key read as a hash, or a hash key read as a
    string, raises ``OnlineStoreError("WRONGTYPE ...")``) and applies the same EXPIRE
    refresh rule (:func:`expire_due`, on ``clock``).

    Args:
        hashes: initial key -> field -> bytes.
        sleep: what ``delay_s`` sleeps with (injectable for pinned timers).
        clock: monotonic seconds, for the refresh rule.

    Attributes:
        hashes: key -> field -> bytes (view states); write with :meth:`hset` or
            :meth:`write`.
        strings: key -> bytes; write with :meth:`set`.
        ttls: key -> the TTL (s) of the last EXPIRE the store issued for the key.
        commits: key -> commit record.
        fail: when truthy, every call but :meth:`close` raises a transient
            ``OnlineStoreError`` (with this message when it is a string): Redis down.
        delay_s: sleep this long in every :meth:`read_hashes`.
        calls: number of :meth:`read_hashes` calls (the serving read's round trips).
    """

    def __init__(self, hashes: Mapping[str, Mapping[str, bytes]] | None = None,
                 sleep: Callable[[float], object] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {k: dict(v) for k, v in (hashes or {}).items()}
        self.strings: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.commits: dict[str, dict[str, int]] = {}
        self.fail: str | bool | None = None
        self.delay_s = 0.0
        self.calls = 0
        self._sleep = sleep
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.fail:
            raise OnlineStoreError(self.fail if isinstance(self.fail, str)
                                   else "fake redis is down", transient=True)

    def _hash(self, key: str) -> dict[str, bytes]:
        if key in self.strings:
            raise OnlineStoreError(
                "WRONGTYPE Operation against a key holding the wrong kind of value")
        return self.hashes.get(key, {})

    def hset(self, key: str, field: str, value: bytes) -> None:
        """Set one hash field (test setup: no failure injection, no TTL)."""
        with self._lock:
            self.hashes.setdefault(key, {})[field] = value

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        self.calls += 1
        if self.delay_s:
            self._sleep(self.delay_s)
        self._check()
        with self._lock:
            return [[self._hash(k).get(f) for f in fields] for k in keys]

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        self._check()
        with self._lock:
            return [self._hash(k).get(f) for k, f in pairs]

    def get(self, key: str) -> bytes | None:
        self._check()
        with self._lock:
            if key in self.hashes or key in self.commits:
                raise OnlineStoreError(
                    "WRONGTYPE Operation against a key holding the wrong kind of value")
            return self.strings.get(key)

    def set(self, key: str, value: bytes | str) -> None:  # str: as redis-py encodes it
        self._check()
        with self._lock:
            self.hashes.pop(key, None)  # SET replaces a key of any type, and its TTL
            self.commits.pop(key, None)
            self.ttls.pop(key, None)
            self.strings[key] = value.encode() if isinstance(value, str) else value

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        self._check()
        with self._lock:
            failed: OnlineStoreError | None = None
            now = self._clock()
            refreshed: dict[str, float] = {}
            for w in states:  # like a pipeline: a failed command does not stop the rest
                try:
                    self._hash(w.key)
                except OnlineStoreError as exc:
                    failed = failed or exc
                    continue
                self.hashes.setdefault(w.key, {})[w.field] = w.value
                want = now + w.ttl_s
                if expire_due(refreshed.get(w.key) or self._expiry.get(w.key), want, w.ttl_s):
                    self.ttls[w.key] = w.ttl_s
                    refreshed[w.key] = want
            if failed is not None:  # the expiries set are not known to be applied
                raise failed
            self._expiry.update(refreshed)
            for key, mapping in commits.items():
                self.commits.setdefault(key, {}).update({k: int(v) for k, v in mapping.items()})

    def delete(self, keys: Sequence[str]) -> None:
        self._check()
        with self._lock:
            for k in keys:
                self.hashes.pop(k, None)
                self.strings.pop(k, None)
                self.commits.pop(k, None)
                self.ttls.pop(k, None)
                self._expiry.pop(k, None)

    def forget_expiries(self) -> None:
        self._expiry.clear()

    def flushall(self) -> None:
        """Lose every key, as a Redis restarted without persistence (tests)."""
        with self._lock:
            self.hashes.clear()
            self.strings.clear()
            self.commits.clear()
            self.ttls.clear()

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        self._check()
        with self._lock:
            return [dict(self.commits.get(k, {})) for k in keys]

    def close(self) -> None:
        pass


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OnlineStoreError) and exc.transient


def _retried(exc: BaseException) -> bool:
    # A refused password is not transient, but a long-running process waits for the
    # operator to fix it (an ERROR line, then back-off) rather than crash-loop.
    return _transient(exc) or isinstance(exc, OnlineStoreAuthError)


class RetryingOnlineStore:
    """An :class:`OnlineStore` whose every call waits out a transient outage
    (:func:`~headrace.core.retry.with_retries`: back-off with jitter, one WARNING when
    Redis goes and one when it is back, ``outage`` counting retries and stall time).
    Errors that are not transient are raised at once, except
    :class:`~headrace.core.errors.OnlineStoreAuthError` (wrong password, failed TLS
    handshake): that one is logged at ERROR once per streak, in one sentence without the
    password, and retried with the same back-off, so the process recovers as soon as the
    credentials are fixed instead of crash-looping.

    Every operation is safe to repeat: HSET and EXPIRE are idempotent, and a write
    whose states went through but whose commit records did not is written again whole
    (the commit records still come only after every state).
    """

    def __init__(self, store: OnlineStore, outage: Outage, backoff: Backoff = DEFAULT_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.outage = outage
        self.backoff = backoff
        self._sleep = sleep
        self._denied = False  # an auth error was logged and has not succeeded since

    def _retry(self, what: str, op: Callable[[], _T]) -> _T:
        def attempt() -> _T:
            try:
                result = op()
            except OnlineStoreAuthError as exc:
                if not self._denied:
                    self._denied = True
                    log.error("%s; check HEADRACE_REDIS_URL and the TLS settings; "
                              "retrying with back-off", exc)
                raise
            if self._denied:
                self._denied = False
                log.warning("redis accepted the credentials again")
            return result

        return with_retries(attempt, what=what, outage=self.outage, transient=_retried,
                            backoff=self.backoff, sleep=self._sleep)

    def read_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> Rows:
        return self._retry("read", lambda: self.store.read_hashes(keys, fields))

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        return self._retry("load states", lambda: self.store.load(pairs))

    def get(self, key: str) -> bytes | None:
        return self._retry("get", lambda: self.store.get(key))

    def set(self, key: str, value: bytes) -> None:
        self._retry("set", lambda: self.store.set(key, value))

    def write(self, states: Sequence[StateWrite], commits: Mapping[str, Mapping[str, int]]) -> None:
        self._retry("write states", lambda: self.store.write(states, commits))

    def read_commits(self, keys: Sequence[str]) -> list[dict[str, int]]:
        return self._retry("read progress", lambda: self.store.read_commits(keys))

    def delete(self, keys: Sequence[str]) -> None:
        self._retry("delete", lambda: self.store.delete(keys))

    def forget_expiries(self) -> None:
        self.store.forget_expiries()

    def close(self) -> None:
        self.store.close()
