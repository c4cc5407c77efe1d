"""The shared exploration budget of :mod:`serving.exploration`.

The budget (:class:`ExploreBudget`): a request explores only while exploring it keeps
the explored share of answers (explored / all answers, over a sliding window of
``window_s`` = 60 s in 1 s buckets) within the budget, **summed over every server**:
each server counts its answers in memory and, every ``flush_s`` (0.25 s) from its own
thread, adds them to Redis and reads back the window's totals ``N``, ``E`` and the
number ``S`` of servers that flushed within the window, in ONE Lua script
(:class:`RedisBudgetCounter`). Between flushes a server with ``n`` answers and ``e``
explorations not yet flushed explores one more only if ``e + 1 <= b·(n + 1) +
max(0, b·N - E)/S``: its own new traffic's share plus its 1/S of the window's unused
budget. If every server flushed at the same instants the window's share would never
exceed ``b``; flushes are not synchronised, so a server may spend slack another has
just spent (at most one flush interval's worth each) and a batch resent after a lost
reply counts twice. Measured in ``tests/unit/test_exploration_budget.py`` (two servers,
staggered flushes, 100 % eligible traffic, ε = 1): the share over any 60 s window never
exceeds the budget by more than 0.2 percentage points (the issue's target). Redis away:
the server keeps its unflushed counts (resent later) and the last totals it read.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from headrace.core.errors import InputError, OnlineStoreError
from serving.periodic import Periodic

__all__ = ["BudgetCounter", "MemoryBudgetCounter", "RedisBudgetCounter", "ExploreBudget",
           "BUDGET_SCRIPT"]

log = logging.getLogger(__name__)


class BudgetCounter(Protocol):
    """The shared sums of every server's answers (Redis, or an in-memory fake)."""

    def add_and_read(self, token: str, deltas: dict[int, tuple[int, int]], now_s: float,
                     window_s: float) -> tuple[int, int, int]:
        """Add ``deltas`` (bucket second → (answers, explored)) and return the window's
        totals ``(answers, explored, servers)`` as of ``now_s`` (epoch seconds).

        Raises:
            OnlineStoreError: the store did not confirm (the deltas may or may not be
                added).
        """
        ...


class MemoryBudgetCounter:
    """In-process :class:`BudgetCounter`: one process's servers (tests, a single server
    without Redis). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[int, list[int]] = {}
        self._seen: dict[str, float] = {}

    def add_and_read(self, token: str, deltas: dict[int, tuple[int, int]], now_s: float,
                     window_s: float) -> tuple[int, int, int]:
        lo = math.floor(now_s) - int(window_s)  # buckets <= lo are out of the window
        with self._lock:
            for b, (n, e) in deltas.items():
                if b > lo:
                    cell = self._buckets.setdefault(b, [0, 0])
                    cell[0] += n
                    cell[1] += e
            for b in [b for b in self._buckets if b <= lo]:
                del self._buckets[b]
            self._seen[token] = now_s
            self._seen = {t: s for t, s in self._seen.items() if s > now_s - window_s}
            n = sum(c[0] for c in self._buckets.values())
            e = sum(c[1] for c in self._buckets.values())
            return n, e, len(self._seen)


#: KEYS[1]: the window hash (fields ``n:{second}``, ``e:{second}``); KEYS[2]: the zset of
#: server tokens scored by their last flush (ms). ARGV: now second, window s, now ms,
#: token, ttl s, then (second, answers, explored) triples. Returns {answers, explored,
#: servers} over the window.
BUDGET_SCRIPT: Final = """
local h, z = KEYS[1], KEYS[2]
local nowb, w = tonumber(ARGV[1]), tonumber(ARGV[2])
local nowms, ttl = tonumber(ARGV[3]), tonumber(ARGV[5])
local lo = nowb - w
for i = 6, #ARGV, 3 do
  if tonumber(ARGV[i]) > lo then
    redis.call('HINCRBY', h, 'n:' .. ARGV[i], ARGV[i + 1])
    if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', h, 'e:' .. ARGV[i], ARGV[i + 2]) end
  end
end
local all = redis.call('HGETALL', h)
local n, e, old = 0, 0, {}
for i = 1, #all, 2 do
  local f = all[i]
  if tonumber(string.sub(f, 3)) <= lo then old[#old + 1] = f
  elseif string.sub(f, 1, 1) == 'n' then n = n + tonumber(all[i + 1])
  else e = e + tonumber(all[i + 1]) end
end
if #old > 0 then redis.call('HDEL', h, unpack(old)) end
redis.call('EXPIRE', h, ttl)
redis.call('ZADD', z, nowms, ARGV[4])
redis.call('ZREMRANGEBYSCORE', z, '-inf', nowms - w * 1000)
redis.call('EXPIRE', z, ttl)
return {n, e, redis.call('ZCARD', z)}
"""


class RedisBudgetCounter:
    """The budget's shared sums in Redis: ``{prefix}:explore:window`` (a hash of
    per-second answers and explorations, older seconds deleted by each flush) and
    ``{prefix}:explore:servers`` (the servers' tokens by last flush), both expiring
    ``ttl_s`` after the last flush; ONE script per flush (:data:`BUDGET_SCRIPT`).

    Args:
        client: a redis-py client with a socket timeout.
        prefix: the deployment's key prefix.
        ttl_s: expiry of both keys after the last flush.
    """

    def __init__(self, client: Any, prefix: str, ttl_s: int = 300) -> None:
        self.client = client
        self.keys = (f"{prefix}:explore:window", f"{prefix}:explore:servers")
        self.ttl_s = ttl_s

    def add_and_read(self, token: str, deltas: dict[int, tuple[int, int]], now_s: float,
                     window_s: float) -> tuple[int, int, int]:
        from redis.exceptions import RedisError

        args: list[Any] = [math.floor(now_s), int(window_s), int(now_s * 1000), token,
                           self.ttl_s]
        for b, (n, e) in deltas.items():
            args += [b, n, e]
        try:
            n, e, servers = self.client.eval(BUDGET_SCRIPT, 2, *self.keys, *args)
        except (RedisError, OSError) as exc:
            raise OnlineStoreError(f"cannot flush the exploration budget: "
                                   f"{type(exc).__name__}: {exc}", transient=True) from exc
        return int(n), int(e), int(servers)


class ExploreBudget:
    """The explored share's budget of one server (see the module docstring).

    Args:
        budget: most explored share, (0, 1).
        counter: the shared sums (:class:`RedisBudgetCounter`, or a
            :class:`MemoryBudgetCounter` for one process).
        token: this server's unique name in the counter.
        window_s: the sliding window, whole seconds (>= 1).
        flush_s: seconds between two flushes of the background thread.
        clock: epoch seconds (buckets are shared between servers: a wall clock).
        on_failure: called once per failed flush.
    """

    def __init__(self, budget: float, counter: BudgetCounter, token: str, *,
                 window_s: float = 60.0, flush_s: float = 0.25,
                 clock: Callable[[], float] = time.time,
                 on_failure: Callable[[], Any] | None = None) -> None:
        if not 0.0 < budget < 1.0:
            raise InputError(f"exploration budget must be in (0, 1), not {budget}")
        self.budget = budget
        self.counter = counter
        self.token = token
        self.window_s = float(max(1, int(window_s)))
        self.flush_s = flush_s
        self._clock = clock
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._deltas: dict[int, list[int]] = {}  # bucket second -> [answers, explored]
        self._n = self._e = 0  # unflushed, within the window
        self._total_n = self._total_e = 0  # the window's sums at the last flush
        self._servers = 1
        self._open = 0  # reservations granted and not settled
        self._failing = False
        self._loop = Periodic("explore-budget", flush_s, self.flush,
                              "exploration budget flush failed unexpectedly")

    # -------------------------------------------------------------- request path
    def count(self, explored: bool = False) -> None:
        """Count one answer (explored or not) that did not go through
        :meth:`try_reserve`."""
        with self._lock:
            self._add(1, int(explored))

    def try_reserve(self) -> bool:
        """Whether one more exploration fits; True counts it as an explored answer
        (call :meth:`settle` with the outcome), False counts a greedy answer."""
        with self._lock:
            slack = (self.budget * self._total_n - self._total_e) / self._servers
            ok = self._e + 1 <= self.budget * (self._n + 1) + slack
            self._add(1, int(ok))
            self._open += ok
            return ok

    def settle(self, explored: bool) -> None:
        """The outcome of a reservation :meth:`try_reserve` granted: not explored gives
        its exploration back.

        Raises:
            RuntimeError: no reservation is open (a caller bug: the counts would drift).
        """
        with self._lock:
            if self._open <= 0:
                raise RuntimeError("ExploreBudget.settle without an open reservation")
            self._open -= 1
            if not explored:
                self._add(0, -1)

    def _add(self, n: int, e: int) -> None:
        b = math.floor(self._clock())
        cell = self._deltas.get(b)
        if cell is None:
            cell = self._deltas[b] = [0, 0]
        cell[0] += n
        cell[1] += e
        self._n += n
        self._e += e

    @property
    def share(self) -> float:
        """The explored share as this server knows it (the window's sums at the last
        flush plus its unflushed counts); 0 before any answer."""
        with self._lock:
            n, e = self._total_n + self._n, self._total_e + self._e
        return e / n if n else 0.0

    # -------------------------------------------------------------- flushing
    def flush(self) -> bool:
        """Add the unflushed counts to the counter and read its totals back.

        Returns:
            True when the counter confirmed; False: the counts are kept (resent next
            time) and the last totals stay. Never raises for store errors.
        """
        now = self._clock()
        lo = math.floor(now) - int(self.window_s)
        with self._lock:
            deltas = {b: (c[0], c[1]) for b, c in self._deltas.items() if b > lo}
            self._deltas = {}
            self._n = self._e = 0
        try:
            n, e, servers = self.counter.add_and_read(self.token, deltas, now, self.window_s)
        except OnlineStoreError as exc:
            with self._lock:  # keep them for the next flush, with what came meanwhile
                for b, (dn, de) in deltas.items():
                    cell = self._deltas.setdefault(b, [0, 0])
                    cell[0] += dn
                    cell[1] += de
                    self._n += dn
                    self._e += de
            if self._on_failure is not None:
                self._on_failure()
            if not self._failing:
                self._failing = True
                log.warning("exploration budget: flush failed, counts kept: %s", exc)
            return False
        with self._lock:
            self._total_n, self._total_e, self._servers = n, e, max(1, servers)
        if self._failing:
            self._failing = False
            log.warning("exploration budget: flushed again")
        return True

    def start(self) -> None:
        """Flush every ``flush_s`` seconds from a daemon thread."""
        self._loop.start()

    def stop(self) -> None:
        """Stop the thread and flush once more."""
        self._loop.stop()
        self.flush()


