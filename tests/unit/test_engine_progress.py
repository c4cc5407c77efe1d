"""Engine progress: resume positions from durable commits, and no silent gaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feature_defs.registry import load_registry
from headrace.core.online_store import MemoryOnlineStore
from streams.admission import RESEEK_S
from streams.engine import MAX_GAP_SEEKS, Engine, RawMessage
from streams.sides import MemorySideOutputs

T0 = 1_700_000_000_000


def _engine(store: MemoryOnlineStore) -> Engine:
    return Engine(registry=load_registry(), store=store, writer=None, sides=MemorySideOutputs(),
                  topic=lambda t: t, redis_prefix="hr", group="g", max_future_ms=10**13)


def _imp(i: int, user: str = "u1") -> RawMessage:
    ev = {"event_id": f"i{i}", "ts": T0 + i * 1000, "user_id": user, "ad_id": "a",
          "campaign_id": "c", "publisher_id": "p", "placement": "top", "creative_type": "banner",
          "device_type": "mobile", "country": "US", "bid_cpm": 1.0}
    return RawMessage(json.dumps(ev).encode(), None, "impressions", 0, i, T0)


def test_a_jump_past_the_next_offset_is_re_sought_not_skipped() -> None:
    eng = _engine(MemoryOnlineStore())
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(0), _imp(1)])
    eng.on_source("impressions", [_imp(5), _imp(6)])  # offsets 2..4 never delivered
    assert eng.take_seek_requests() == {("impressions", 0): 2}
    assert eng.progress[("impressions", 0)].next == 2
    eng.on_source("impressions", [_imp(2), _imp(3), _imp(4), _imp(5)])
    assert eng.take_seek_requests() == {}
    assert eng.progress[("impressions", 0)].next == 6
    assert eng.stats["events_in"] == 6


class _Clock:
    """Stands in for ``time.monotonic`` in :mod:`streams.admission`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import streams.admission as adm

        self.now = 1000.0
        monkeypatch.setattr(adm.time, "monotonic", lambda: self.now)


def test_an_unverifiable_gap_is_accepted_after_spaced_re_seeks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No way to ask the log: MAX_GAP_SEEKS re-seeks, RESEEK_S apart (what arrives in
    between was fetched before the last seek: dropped, no new seek), then accepted."""
    clock = _Clock(monkeypatch)
    eng = _engine(MemoryOnlineStore())
    eng.assign([("impressions", 0)])
    for _ in range(MAX_GAP_SEEKS):
        eng.on_source("impressions", [_imp(3)])
        assert eng.take_seek_requests() == {("impressions", 0): 0}
        clock.now += RESEEK_S / 2
        eng.on_source("impressions", [_imp(4)])  # too soon: no seek, not accepted
        assert eng.take_seek_requests() == {}
        assert eng.progress[("impressions", 0)].next == 0
        clock.now += RESEEK_S / 2
    eng.on_source("impressions", [_imp(3)])
    assert eng.take_seek_requests() == {}
    assert eng.progress[("impressions", 0)].next == 4


def test_a_gap_the_log_confirms_is_accepted_at_once() -> None:
    eng = _engine(MemoryOnlineStore())
    asked: list[tuple[str, int, int]] = []
    eng.admission.log_probe = lambda t, p, o: asked.append((t, p, o)) or 3
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(3), _imp(4)])
    assert eng.take_seek_requests() == {}
    assert eng.progress[("impressions", 0)].next == 5
    assert asked == [("impressions", 0, 0)]


def test_a_gap_the_log_does_not_have_is_never_accepted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI failure of 2026-12-02: after a stall, the consumer delivered batch after
    batch past the next offset (fetched before the seek, or dropped by Faust around
    it) and three quick re-seeks accepted 0..1161 as a gap. With the log holding the
    next offset, no number of jumps or seconds accepts it; re-seeks stay spaced."""
    clock = _Clock(monkeypatch)
    eng = _engine(MemoryOnlineStore())
    asked: list[int] = []
    eng.admission.log_probe = lambda t, p, o: asked.append(o) or o
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(0)])
    seeks = 0
    for i in range(40):
        eng.on_source("impressions", [_imp(10 + i)])
        seeks += len(eng.take_seek_requests())
        clock.now += 0.25
    assert eng.progress[("impressions", 0)].next == 1
    assert seeks == 10  # one at the first jump, then one per RESEEK_S
    assert asked == [1]  # asked once per expected offset
    eng.on_source("impressions", [_imp(i) for i in range(1, 12)])
    assert eng.progress[("impressions", 0)].next == 12
    assert eng.stats["events_in"] == 12


def test_after_a_rebuild_what_was_fetched_before_its_seek_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock(monkeypatch)
    eng = _engine(MemoryOnlineStore())
    eng.admission.log_probe = lambda t, p, o: o
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(i) for i in range(5)])
    assert eng.rebuild_online({("impressions", 0): 0}, "test") == {("impressions", 0): 0}
    eng.on_source("impressions", [_imp(5), _imp(6)])  # fetched before the seek
    assert eng.take_seek_requests() == {}  # the rebuild's seek is recent: no new one
    clock.now += RESEEK_S
    eng.on_source("impressions", [_imp(7)])  # still arriving a second later: re-seek
    assert eng.take_seek_requests() == {("impressions", 0): 0}
    eng.on_source("impressions", [_imp(i) for i in range(8)])
    assert eng.progress[("impressions", 0)].next == 8


def test_restart_resumes_at_the_smaller_durable_offset_with_its_watermark() -> None:
    store = MemoryOnlineStore()
    eng = _engine(store)
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(i) for i in range(10)])
    eng.flush_online()  # online durable to 10; offline never written (no writer)
    rec = store.commits["hr:commit:{g}:impressions:0"]
    assert rec["online_next"] == 10 and rec["online_wm"] == T0 + 9000
    again = _engine(store)
    # offline_next absent = 0 <= online_next: resume at 0 with the offline watermark
    assert again.assign([("impressions", 0)]) == {("impressions", 0): 0}
    again.on_source("impressions", [_imp(i) for i in range(12)])
    again.flush_online()
    # nothing applied twice: the fences in the stored state skip offsets < 10
    from feature_defs.layout import entity_key
    from feature_defs.state import ViewState

    plan = load_registry().plans["user_activity@1"]
    st = ViewState.decode(plan, store.hashes[entity_key("hr", "user", "u1")]["user_activity@1"])
    assert st.rollup(T0 + 60_000)[0]["user__impressions_1h"] == 12
    assert again.resume_offsets() == {("impressions", 0): 12}


def test_no_second_part_of_a_partition_while_one_is_in_flight(tmp_path: Path) -> None:
    """Issue 13: a second part detached while the first was being written started at the
    same durable offset, under the same file name, and overwrote it."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from feature_defs.layout import chunk_file
    from streams.offline_writer import OfflineWriter

    store = MemoryOnlineStore()
    writer = OfflineWriter(pafs.LocalFileSystem(), str(tmp_path))
    eng = Engine(registry=load_registry(), store=store, writer=writer,
                 sides=MemorySideOutputs(), topic=lambda t: t, redis_prefix="hr", group="g",
                 max_future_ms=10**13)
    eng.assign([("impressions", 0)])
    eng.on_source("impressions", [_imp(i) for i in range(5)])
    (first,) = eng.offline_batches()  # being written (the store frozen, say)...
    eng.on_source("impressions", [_imp(i) for i in range(5, 9)])
    assert eng.offline_batches() == []  # ...so nothing else of the partition detaches
    eng.write_offline(first)
    (second,) = eng.offline_batches()
    assert (first[1], first[2], second[1], second[2]) == (0, 5, 5, 9)
    eng.write_offline(second)
    assert store.commits["hr:commit:{g}:impressions:0"]["offline_next"] == 9
    names = sorted(p.name for p in (tmp_path / "events").rglob("*.parquet"))
    assert names == [chunk_file("impressions", 0, 0, 5), chunk_file("impressions", 0, 5, 9)]
    offsets = ds.dataset(str(tmp_path / "events"), format="parquet").to_table(
        columns=["_offset"])["_offset"].to_pylist()
    assert sorted(offsets) == list(range(9))  # every offset exactly once
