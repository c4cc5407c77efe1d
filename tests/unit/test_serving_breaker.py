"""Circuit breaker transitions with a pinned clock."""

from __future__ import annotations

import pytest

from serving.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def seen() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock: Clock, seen: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(failures=3, reset_s=2.0, clock=clock, on_change=seen.append)


def test_opens_after_consecutive_failures_only(breaker: CircuitBreaker) -> None:
    breaker.failure()
    breaker.failure()
    breaker.success()  # resets the count
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()


def test_half_open_probe_then_close(breaker: CircuitBreaker, clock: Clock,
                                    seen: list[BreakerState]) -> None:
    for _ in range(3):
        breaker.failure()
    clock.now += 1.999
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_failed_probe_reopens_and_restarts_the_timer(breaker: CircuitBreaker,
                                                     clock: Clock) -> None:
    for _ in range(3):
        breaker.failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.failure()  # a single failure in HALF_OPEN reopens
    assert breaker.state is BreakerState.OPEN
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_lost_probe_is_replaced_after_reset(breaker: CircuitBreaker, clock: Clock) -> None:
    for _ in range(3):
        breaker.failure()
    clock.now += 2.0
    assert breaker.allow()  # probe never reports back
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow() and breaker.state is BreakerState.HALF_OPEN


def test_needs_at_least_one_failure() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
