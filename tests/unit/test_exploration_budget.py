"""The exploration budget (serving/exploration.py ExploreBudget): a fake clock and a fake
shared counter; the true explored share, counted here independently, over every 60 s
window of long seeded runs of two servers."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from headrace.core.errors import InputError, OnlineStoreError
from serving.exploration import ExploreBudget, MemoryBudgetCounter

T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FlakyCounter(MemoryBudgetCounter):
    """Fails while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def add_and_read(self, token: str, deltas: dict[int, tuple[int, int]], now_s: float,
                     window_s: float) -> tuple[int, int, int]:
        if self.down:
            raise OnlineStoreError("redis away", transient=True)
        return super().add_and_read(token, deltas, now_s, window_s)


def simulate(budget: float, phases: list[tuple[float, tuple[float, float]]], *,
             rate: float = 200.0, seed: int = 0, tolerance: float = 0.002
             ) -> tuple[float, float]:
    """Two servers sharing one counter, flushing every 0.25 s, staggered by 0.125 s.

    ``phases``: (seconds, (eligible share of server A's traffic, of B's)). Every eligible
    request that gets a reservation explores (the worst case, ε = 1). The true counts
    are kept here per request; returns (the largest true share over a trailing 60 s
    window at any step once the window holds >= 2,000 answers, the mean share over the
    last phase).
    """
    rng = np.random.default_rng(seed)
    clock = Clock()
    counter = MemoryBudgetCounter()
    servers = [ExploreBudget(budget, counter, name, clock=clock) for name in ("a", "b")]
    next_flush = [T0 + 0.25, T0 + 0.125]
    window: deque[tuple[float, int]] = deque()  # (time, explored) of every answer
    explored_in = 0
    worst = 0.0
    last_phase: list[float] = []
    dt = 1.0 / rate
    for p, (seconds, eligible) in enumerate(phases):
        end = clock.now + seconds
        while clock.now < end:
            clock.now += dt
            for s, srv in enumerate(servers):
                if clock.now >= next_flush[s]:
                    srv.flush()
                    next_flush[s] += 0.25
                if rng.random() < eligible[s]:
                    ok = srv.try_reserve()
                    if ok:
                        srv.settle(True)
                    window.append((clock.now, int(ok)))
                    explored_in += int(ok)
                else:
                    srv.count(False)
                    window.append((clock.now, 0))
            while window and window[0][0] <= clock.now - 60.0:
                explored_in -= window.popleft()[1]
            share = explored_in / len(window)
            if len(window) >= 2000:
                worst = max(worst, share)
                assert share <= budget + tolerance, (clock.now - T0, share)
            if p == len(phases) - 1:
                last_phase.append(share)
    return worst, float(np.mean(last_phase))


def test_two_servers_never_exceed_the_budget_by_more_than_the_tolerance() -> None:
    """Steady mixed traffic, then an idle-then-burst pattern (a full window of unused
    budget, then all traffic eligible on both servers: the slack both would like to
    spend), then one-sided traffic: the share over any 60 s window stays <= 2 % +
    0.2 points (measured: +0.088 points; without splitting the unused budget between
    the servers it would be +0.19), and the budget is used (the share ends close to 2 %).
    """
    worst, end = simulate(0.02, [(90.0, (1.0, 0.1)), (70.0, (0.0, 0.0)), (60.0, (1.0, 1.0)),
                                 (60.0, (1.0, 0.0))], seed=3)
    assert worst <= 0.021
    assert 0.018 <= end <= 0.022


@pytest.mark.parametrize("budget", [0.005, 0.05])
def test_other_budgets_hold_too(budget: float) -> None:
    worst, end = simulate(budget, [(70.0, (0.0, 0.0)), (80.0, (1.0, 1.0))], seed=int(budget * 1e3))
    assert worst <= budget + 0.002
    assert end >= budget - 0.003


def test_rare_eligible_traffic_is_all_explored() -> None:
    """Eligible traffic below the budget: every eligible request explores."""
    clock = Clock()
    b = ExploreBudget(0.02, MemoryBudgetCounter(), "a", clock=clock)
    explored = 0
    for i in range(20_000):
        clock.now += 0.005
        if i % 250 == 0:
            b.flush()
        if i % 100 == 99:  # 1 % eligible
            explored += b.try_reserve()
            b.settle(True)
        else:
            b.count()
    assert explored == 200
    b.flush()
    assert b.share == pytest.approx(0.01, abs=0.001)


def test_the_first_exploration_waits_for_enough_answers() -> None:
    """With nothing counted yet, exploring would make the share 100 %: refused until
    one exploration fits within 2 % (the 50th answer)."""
    b = ExploreBudget(0.02, MemoryBudgetCounter(), "a", clock=Clock())
    got = [b.try_reserve() for _ in range(50)]
    assert got == [False] * 49 + [True]
    assert b.share == pytest.approx(1 / 50)


def test_a_reservation_not_used_is_given_back() -> None:
    clock = Clock()
    b = ExploreBudget(0.5, MemoryBudgetCounter(), "a", clock=clock)
    b.count()
    assert b.try_reserve()
    b.settle(False)
    assert b.share == 0.0
    b.flush()
    assert b.share == 0.0
    with pytest.raises(RuntimeError, match="without an open reservation"):
        b.settle(False)  # a second settle would drive the explored count negative


def test_a_failed_flush_keeps_the_counts_and_resends_them() -> None:
    clock = Clock()
    counter = FlakyCounter()
    b = ExploreBudget(0.1, counter, "a", clock=clock)
    for _ in range(30):
        b.count()
    assert b.try_reserve()
    b.settle(True)
    counter.down = True
    assert not b.flush()
    clock.now += 1.0
    b.count()
    counter.down = False
    assert b.flush()
    assert counter.add_and_read("probe", {}, clock.now, 60.0) == (32, 1, 2)


def test_counts_leave_the_window() -> None:
    clock = Clock()
    counter = MemoryBudgetCounter()
    b = ExploreBudget(0.1, counter, "a", clock=clock)
    for _ in range(20):
        b.count()
    b.flush()
    clock.now += 61.0
    b.count()
    b.flush()
    assert counter.add_and_read("a", {}, clock.now, 60.0) == (1, 0, 1)


def test_a_bad_budget_is_one_sentence() -> None:
    with pytest.raises(InputError, match=r"budget must be in \(0, 1\)"):
        ExploreBudget(1.5, MemoryBudgetCounter(), "a")
