"""Progress loss is an alarm, not a fresh start (streams.progress_guard, issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs

from feature_defs.layout import commit_key, epoch_key
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.core.online_store import MemoryOnlineStore
from streams.engine import Engine, RawMessage
from streams.offline_writer import OfflineWriter
from streams.sides import MemorySideOutputs

T0 = 1_700_000_000_000
REG = load_registry()
TP = ("impressions", 0)


def _imp(i: int) -> RawMessage:
    ev = {"event_id": f"i{i}", "ts": T0 + i * 1000, "user_id": f"u{i % 7}", "ad_id": "a",
          "campaign_id": "c", "publisher_id": "p", "placement": "top",
          "creative_type": "banner", "device_type": "mobile", "country": "US", "bid_cpm": 1.0}
    return RawMessage(json.dumps(ev).encode(), None, "impressions", 0, i, T0)


def _engine(store: MemoryOnlineStore, root: Path | None = None) -> Engine:
    writer = OfflineWriter(pafs.LocalFileSystem(), str(root)) if root else None
    return Engine(registry=REG, store=store, writer=writer, sides=MemorySideOutputs(),
                  topic=lambda t: t, redis_prefix="hr", group="g",
                  max_future_ms=10**13, clock=lambda: T0 / 1000 + 3600)


def _users(store: MemoryOnlineStore) -> dict[str, int]:
    plan = REG.plans["user_activity@1"]
    out = {}
    for key, fields in store.hashes.items():
        if key.startswith("hr:user:") and "user_activity@1" in fields:
            st = ViewState.decode(plan, fields["user_activity@1"])
            out[key] = st.rollup(T0 + 3_600_000)[0]["user__impressions_24h"]
    return out


def _offsets(root: Path) -> list[int]:
    return sorted(ds.dataset(str(root / "events"), format="parquet").to_table(
        columns=["_offset"])["_offset"].to_pylist())


def test_a_restart_on_an_emptied_redis_keeps_and_resumes_the_offline_store(
        tmp_path: Path) -> None:
    store = MemoryOnlineStore()
    eng = _engine(store, tmp_path)
    eng.assign([TP])
    eng.on_source("impressions", [_imp(i) for i in range(20)])
    eng.flush_online()
    eng.flush_offline()
    parts = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    store.flushall()  # Redis restarted without persistence
    again = _engine(store, tmp_path)
    # it resumes at the log's start for the online state, not at an "empty" record...
    assert again.assign([TP], {TP: 0}) == {TP: 0}
    prog = again.progress[TP]
    assert (prog.online_next, prog.offline_next) == (0, 20)
    # ...deletes no part, and records the recovered offline progress at once
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == parts
    assert store.commits[commit_key("hr", "g", *TP)]["offline_next"] == 20
    assert again.guard.lost.labels("impressions")._value.get() == 1
    again.on_source("impressions", [_imp(i) for i in range(25)])
    again.flush_online()
    again.flush_offline()
    assert _offsets(tmp_path) == list(range(25))  # every offset once: none rewritten
    assert sum(_users(store).values()) == 25  # the online state rebuilt from the log


def test_redis_emptied_under_a_running_worker_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    msgs = [_imp(i) for i in range(30)]
    ref_store = MemoryOnlineStore()
    ref = _engine(ref_store)
    ref.assign([TP])
    ref.on_source("impressions", msgs)
    ref.flush_online()

    store = MemoryOnlineStore()
    eng = _engine(store, tmp_path)
    eng.assign([TP], {TP: 0})
    eng.on_source("impressions", msgs[:12])
    eng.flush_online()
    eng.flush_offline()
    assert eng.progress_intact()
    store.flushall()
    eng.on_source("impressions", msgs[12:20])  # written into the empty Redis...
    eng.flush_online()
    assert not eng.progress_intact()  # ...and the marker is gone
    assert eng.rebuild_online({TP: 0}, "test") == {TP: 0}
    assert store.get(epoch_key("hr", "g")) is not None
    assert _users(store) == {}  # the stale states (fences at 12..19) are deleted
    assert store.commits[commit_key("hr", "g", *TP)]["offline_next"] == 12
    eng.on_source("impressions", msgs)  # the replay from the log's start
    eng.flush_online()
    eng.flush_offline()
    assert _users(store) == _users(ref_store)
    assert _offsets(tmp_path) == list(range(30))
    assert eng.progress_intact()


def test_orphans_are_kept_when_the_log_could_not_rewrite_them(tmp_path: Path) -> None:
    store = MemoryOnlineStore()
    eng = _engine(store, tmp_path)
    eng.assign([TP])
    eng.on_source("impressions", [_imp(i) for i in range(5)])
    eng.flush_offline()
    eng.on_source("impressions", [_imp(i) for i in range(5, 10)])
    eng.flush_offline()  # parts [0, 5) and [5, 10)
    # the record says less than the store holds (the part past it: a crashed attempt's)
    store.commits[commit_key("hr", "g", *TP)] = {"online_next": 5, "offline_next": 5,
                                                 "offline_wm": T0 + 4000}
    _engine(store, tmp_path).assign([TP], {TP: 8})  # the log now starts at 8
    assert _offsets(tmp_path) == list(range(10))  # kept: offsets 5..7 exist nowhere else
    _engine(store, tmp_path).assign([TP], {TP: 0})  # the log holds them: removed
    assert _offsets(tmp_path) == list(range(5))


def test_a_crash_before_the_first_recorded_part_is_no_progress_loss(tmp_path: Path) -> None:
    """With the group's epoch marker in place, a record without offline_next is a crash
    before the first part was recorded: the parts found are orphans, not progress."""
    store = MemoryOnlineStore()
    eng = _engine(store, tmp_path)
    eng.assign([TP])
    eng.on_source("impressions", [_imp(i) for i in range(6)])
    eng.flush_online()  # online progress recorded...
    (part,) = eng.offline_batches()
    eng.offline.writer.write_part("impressions", "impression", "impressions", 0, 0, part[4], [],
                                  end=6)  # ...a part written, never recorded: SIGKILL
    again = _engine(store, tmp_path)
    assert again.assign([TP], {TP: 0}) == {TP: 0}
    assert again.progress[TP].offline_next == 0
    assert not list(tmp_path.rglob("*.parquet"))  # the orphan is gone
    assert again.guard.lost.labels("impressions")._value.get() == 0
