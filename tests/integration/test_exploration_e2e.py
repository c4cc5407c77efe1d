"""The exploration budget shared through a real redis-server (a private one per test, so
it can be frozen): the script's sums, window and server count against the test's own
tally; two budgets (two "servers") staying within the budget; a freeze that loses no
count; the settings' factory.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.core.settings import ServeSettings
from serving.exploration import ExploreBudget, RedisBudgetCounter, exploration

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T0 = 1_900_000_000.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A private redis-server on a free port: (process, port)."""
    from headrace.stack.proc import free_port
    from tests.localredis import start_redis

    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_the_script_sums_the_window_of_every_writer(redis_server: Any) -> None:
    import redis

    _proc, port = redis_server
    a = RedisBudgetCounter(redis.Redis(port=port), "hre")
    b = RedisBudgetCounter(redis.Redis(port=port), "hre")
    now = T0 + 0.5
    assert a.add_and_read("a", {int(T0) - 70: (100, 50), int(T0) - 10: (40, 1),
                                int(T0): (10, 0)}, now, 60.0) == (50, 1, 1)  # 70 s ago: out
    assert b.add_and_read("b", {int(T0): (5, 2)}, now, 60.0) == (55, 3, 2)
    assert a.add_and_read("a", {}, now, 60.0) == (55, 3, 2)
    # 55 s later the bucket of T0 - 10 leaves the window (and the hash); b still counts
    assert a.add_and_read("a", {}, now + 55.0, 60.0) == (15, 2, 2)
    keys: list[bytes] = redis.Redis(port=port).hkeys("hre:explore:window")  # type: ignore[assignment]
    fields = {k.decode() for k in keys}
    assert fields == {f"n:{int(T0)}", f"e:{int(T0)}"}
    # 61 s later nothing is left, and b (silent for 61 s) is no longer a server
    assert a.add_and_read("a", {}, now + 61.0, 60.0) == (0, 0, 1)
    assert not redis.Redis(port=port).exists("hre:explore:window")
    assert 0 < redis.Redis(port=port).ttl("hre:explore:servers") <= 300


def test_two_servers_share_one_budget_through_redis(redis_server: Any) -> None:
    """Two budgets on a fake clock, flushing every 0.25 s staggered; server A's traffic
    all eligible, 0.5 % of B's (B's greedy answers leave A room): the true share over the
    trailing 60 s stays <= 2 % + 0.2 points, A explores more than 2 % of its own
    traffic, and Redis holds exactly the test's tally."""
    import redis

    _proc, port = redis_server
    clock = Clock()
    servers = [ExploreBudget(0.02, RedisBudgetCounter(redis.Redis(port=port), "hr2"), name,
                             clock=clock) for name in ("a", "b")]
    next_flush = [T0 + 0.25, T0 + 0.125]
    rng = np.random.default_rng(1)
    tally: list[tuple[float, int]] = []
    a_explored = a_answers = 0
    for _ in range(100 * 90):  # 90 s at 100 answers/s per server (share checked every 0.25 s)
        clock.now += 0.01
        for s, srv in enumerate(servers):
            if clock.now >= next_flush[s]:
                assert srv.flush()
                next_flush[s] += 0.25
            if s == 0 or rng.random() < 0.005:
                ok = srv.try_reserve()
                if ok:
                    srv.settle(True)
                if s == 0:
                    a_explored += ok
                    a_answers += 1
                tally.append((clock.now, int(ok)))
            else:
                srv.count()
                tally.append((clock.now, 0))
        if len(tally) % 50:
            continue
        recent = [e for t, e in tally[-12_000:] if t > clock.now - 60.0]
        if len(recent) >= 2000:
            assert sum(recent) / len(recent) <= 0.022
    assert a_explored / a_answers > 0.03  # B's unused budget went to A
    for srv in servers:
        assert srv.flush()
    n, e, servers_seen = RedisBudgetCounter(redis.Redis(port=port), "hr2").add_and_read(
        "probe", {}, clock.now, 60.0)
    lo = np.floor(clock.now) - 60
    assert (n, e) == (sum(1 for t, _ in tally if np.floor(t) > lo),
                      sum(x for t, x in tally if np.floor(t) > lo))
    assert servers_seen == 3


def test_a_freeze_keeps_the_counts(redis_server: Any) -> None:
    import redis

    proc, port = redis_server
    clock = Clock()
    client = redis.Redis(port=port, socket_timeout=0.2, retry=None)  # type: ignore[arg-type]
    failures: list[int] = []
    budget = ExploreBudget(0.1, RedisBudgetCounter(client, "hrf"), "a", clock=clock,
                           on_failure=lambda: failures.append(1))
    for _ in range(20):
        budget.count()
    client.ping()
    proc.send_signal(signal.SIGSTOP)
    try:
        assert not budget.flush()  # no reply within 0.2 s: kept
    finally:
        proc.send_signal(signal.SIGCONT)
    assert failures == [1]
    budget.count(True)
    assert budget.flush()
    # the frozen script ran on resume AND the batch was resent: counted twice (stated in
    # the module docstring: a lost reply double-counts one batch), never lost
    n, e, _ = RedisBudgetCounter(redis.Redis(port=port), "hrf").add_and_read(
        "probe", {}, clock.now, 60.0)
    assert (n, e) in ((21, 1), (41, 1))


def test_the_factory_follows_the_settings(redis_server: Any) -> None:
    _proc, port = redis_server
    env = {"HEADRACE_REDIS_URL": f"redis://127.0.0.1:{port}/0", "HEADRACE_REDIS_PREFIX": "hrs"}
    assert exploration(ServeSettings.from_env(env), "s1") is None  # off by default
    exp = exploration(ServeSettings.from_env({**env, "HEADRACE_EXPLORE": "eps-greedy",
                                              "HEADRACE_EXPLORE_EPSILON": "0.1",
                                              "HEADRACE_EXPLORE_SEED": "4"}), "s1")
    assert exp is not None
    assert exp.config.label == "eps-greedy:0.1" and exp.config.seed == 4
    assert exp.budget.token.startswith("s1-")
    exp.budget.count()
    assert exp.budget.flush()
