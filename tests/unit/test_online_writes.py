"""Background online writes: progress is recorded only after the write succeeded, on the
engine's thread; errors surface at the next flush; results equal synchronous flushes."""

from __future__ import annotations

import threading

import pytest

from headrace.core.errors import OnlineStoreError
from headrace.core.online_store import MemoryOnlineStore, StateWrite
from streams.engine import Engine
from streams.online import OnlineWrites
from tests.unit.test_stream_freshness import _engine, _stream


class _GatedStore(MemoryOnlineStore):
    """Writes block until released, on whichever thread calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.threads: list[str] = []

    def write(self, states, commits) -> None:  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(10)
        super().write(states, commits)


def test_done_runs_on_the_callers_thread_after_the_write() -> None:
    store = _GatedStore()
    writes = OnlineWrites(store, background=True, clock=lambda: 42.0)
    seen: list[tuple[float, str]] = []
    writes.submit([StateWrite("k", "f", b"v", 60)], {"c": {"n": 1}},
                  lambda at: seen.append((at, threading.current_thread().name)))
    assert not seen and not store.hashes  # still in flight
    store.gate.set()
    writes.finish()
    assert seen == [(42.0, threading.current_thread().name)]
    assert store.hashes == {"k": {"f": b"v"}} and store.commits == {"c": {"n": 1}}
    assert store.threads == ["headrace-online_0"]
    writes.close()


def test_a_failed_write_raises_at_the_next_call_and_records_nothing() -> None:
    store = MemoryOnlineStore()
    store.fail = True
    failures: list[int] = []
    writes = OnlineWrites(store, background=True, failed=lambda: failures.append(1))
    done: list[float] = []
    writes.submit([StateWrite("k", "f", b"v", 60)], {}, done.append)
    with pytest.raises(OnlineStoreError):
        writes.submit([], {"c": {"n": 1}}, done.append)  # waits for the first one
    assert not done and failures == [1] and not store.commits
    writes.close()


def _background(store: MemoryOnlineStore) -> Engine:
    eng = _engine(store)
    eng.online_writes = OnlineWrites(store, background=True, clock=eng.clock)
    return eng


def test_background_flushes_equal_synchronous_ones() -> None:
    sync_store, bg_store = MemoryOnlineStore(), _GatedStore()
    sync, bg = _engine(sync_store), _background(bg_store)
    for eng in (sync, bg):
        eng.assign([("impressions", 0), ("impressions", 1)])
    msgs = _stream()
    sync.on_source("impressions", msgs[0])
    sync.flush_online()
    sync.on_source("impressions", msgs[1])
    sync.flush_online()

    bg.on_source("impressions", msgs[0])
    assert bg.flush_online(wait=False) > 0
    prog = bg.progress[("impressions", 0)]
    assert prog.online_next == 0  # not durable yet: no progress recorded
    bg.on_source("impressions", msgs[1])  # the loop goes on while Redis takes the write
    bg_store.gate.set()
    bg.flush_online(wait=False)  # records the first write's progress, starts the second
    assert prog.online_next == len(msgs[0])
    bg.online_writes.finish()
    assert bg.progress[("impressions", 1)].online_next == len(msgs[1])
    assert bg_store.hashes == sync_store.hashes and bg_store.commits == sync_store.commits
    assert bg.stats["last_online_commit"] is not None and bg.stats["freshness_ms"]
    bg.online_writes.close()
