"""Back-off, outage tracking and the retrying online store (headrace.core.retry)."""

from __future__ import annotations

import logging

import pytest

from headrace.core.errors import OfflineStoreError, OnlineStoreError
from headrace.core.online_store import MemoryOnlineStore, RetryingOnlineStore, StateWrite
from headrace.core.retry import Backoff, Outage, with_retries
from streams.offline_writer import store_error


def test_backoff_delays_by_hand() -> None:
    b = Backoff(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.5)
    # no jitter drawn (rand = 0): 0.1, 0.2, 0.4, 0.8, then capped at 1.0
    assert [round(b.delay(i, lambda: 0.0), 9) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    # the largest jitter takes off half
    assert b.delay(2, lambda: 1.0) == pytest.approx(0.2)
    assert b.delay(10**6, lambda: 0.0) == 1.0  # no overflow for long outages
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.0)


class _Flaky:
    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def _transient(e: BaseException) -> bool:
    return isinstance(e, OnlineStoreError) and e.transient


def test_transient_failures_are_waited_out_with_one_warning_each_way(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    states: list[bool] = []
    stalls: list[float] = []
    retries = [0]
    outage = Outage("redis", on_available=states.append, on_stall=stalls.append,
                    on_retry=lambda: retries.__setitem__(0, retries[0] + 1),
                    clock=lambda: now[0])
    op = _Flaky(5, OnlineStoreError("refused", transient=True))
    b = Backoff(initial_s=0.1, max_s=0.4, jitter=0.0)
    with caplog.at_level(logging.WARNING, logger="headrace.retry"):
        assert with_retries(op, what="write", outage=outage, transient=_transient, backoff=b,
                            sleep=sleep, clock=lambda: now[0]) == "ok"
    assert op.calls == 6 and sleeps == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert retries[0] == 5 and outage.retries == 5 and outage.stalls == 1
    assert stalls == [pytest.approx(1.5)] and outage.stalled_s == pytest.approx(1.5)
    assert states == [True, False, True] and not outage.stalled
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert msgs[0].startswith("redis unavailable (write: refused)")
    assert msgs[1] == "redis available again after 1.5 s"


def test_permanent_errors_are_raised_at_once() -> None:
    outage = Outage("redis")
    op = _Flaky(1, OnlineStoreError("WRONGTYPE Operation against a key"))
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        with_retries(op, what="w", outage=outage, transient=_transient, sleep=lambda _s: None)
    assert op.calls == 1 and outage.retries == 0
    # transient first, then permanent: raised, and the outage does not stay open
    op2 = _Flaky(2, OnlineStoreError("x", transient=True))
    calls = [0]

    def mixed() -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise OnlineStoreError("down", transient=True)
        raise OnlineStoreError("NOAUTH")

    with pytest.raises(OnlineStoreError, match="NOAUTH"):
        with_retries(mixed, what="w", outage=outage, transient=_transient, sleep=lambda _s: None)
    assert not outage.stalled and op2.calls == 0


def test_give_up_after_raises_the_last_error() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    op = _Flaky(10**9, OnlineStoreError("down", transient=True))
    with pytest.raises(OnlineStoreError, match="down"):
        with_retries(op, what="w", outage=Outage("redis"), transient=_transient,
                     backoff=Backoff(initial_s=1.0, max_s=1.0, jitter=0.0, give_up_s=3.0),
                     sleep=sleep, clock=lambda: now[0])
    assert op.calls == 4  # at 0, 1, 2 and 3 s


def test_retrying_store_waits_for_the_fake_redis() -> None:
    fake = MemoryOnlineStore()
    fake.fail = True
    outage = Outage("redis")
    tries = [0]

    def sleep(_s: float) -> None:
        tries[0] += 1
        if tries[0] == 3:
            fake.fail = False  # Redis is back

    store = RetryingOnlineStore(fake, outage, sleep=sleep)
    store.write([StateWrite("k", "f", b"v", 60)], {"c": {"online_next": 7}})
    assert fake.hashes == {"k": {"f": b"v"}} and fake.commits == {"c": {"online_next": 7}}
    assert outage.retries == 3 and outage.stalls == 1 and not outage.stalled
    assert store.load([("k", "f"), ("k", "g")]) == [b"v", None]
    # a key of the wrong type is no outage
    fake.strings["s"] = b"x"
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        store.load([("s", "f")])
    assert outage.retries == 3


def test_s3_errors_classified() -> None:
    assert store_error("cannot write x", OSError("When uploading: curlCode: 7, Couldn't "
                                                 "connect to server")).transient
    assert store_error("w", OSError("AWS Error SLOW_DOWN during PutObject")).transient
    e = store_error("w", OSError("AWS Error ACCESS_DENIED during PutObject: Access Denied"))
    assert isinstance(e, OfflineStoreError) and not e.transient
    assert not store_error("w", OSError("AWS Error NO_SUCH_BUCKET")).transient
