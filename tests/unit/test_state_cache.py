"""The bounded view-state cache: LRU by bytes, never a dirty or in-flight state, misses
reloaded in one batched load with their fences, and the same Redis states with or
without a tiny cache; and the orphan removal that lists only what can hold orphans."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from feature_defs.layout import commit_key, entity_key, repartition_topic
from feature_defs.registry import load_registry
from feature_defs.state import ViewState, fence_key
from headrace.core.errors import StateFormatError
from headrace.core.online_store import MemoryOnlineStore
from streams.admission import ORPHAN_SLACK_MS
from streams.encode import encode_arrow as encode_events
from streams.engine import Engine, RawMessage
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter
from streams.sides import CorruptState, MemorySideOutputs, encode_arrow
from streams.state_cache import RESIDENT_BASE, StateCache, resident_bytes
from streams.synthetic import generate

T0 = 1_700_000_000_000
REGISTRY = load_registry()
USER = REGISTRY.plans["user_activity@1"]
VID = USER.view.id


class CountingStore(MemoryOnlineStore):
    """The in-memory store, counting :meth:`load` calls and the pairs they asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[int] = []

    def load(self, pairs: Sequence[tuple[str, str]]) -> list[bytes | None]:
        self.loads.append(len(pairs))
        return super().load(pairs)


def _state(n_events: int) -> bytes:
    """An encoded user-view state holding ``n_events`` impressions (size grows with it)."""
    st = ViewState(USER)
    for i in range(n_events):
        st.apply("impressions", T0 + i * 3_600_000, {"ad_id": f"a{i}"},
                 fkey=fence_key(0, 0), pos=i << 20)
    return st.encode()


def _cache(store: MemoryOnlineStore, limit: int | None) -> StateCache:
    return StateCache(plans=REGISTRY.plans, store=store, prefix="hr", limit_bytes=limit,
                      metrics=StreamMetrics())


def _put(store: MemoryOnlineStore, key: str, blob: bytes) -> None:
    store.hset(entity_key("hr", "user", key), VID, blob)


# ------------------------------------------------------------------ the cache itself
def test_evicts_least_recently_used_first_until_within_the_budget() -> None:
    store = CountingStore()
    blobs = {k: _state(n) for k, n in (("a", 1), ("b", 8), ("c", 2), ("d", 3))}
    for k, b in blobs.items():
        _put(store, k, b)
    size = {k: resident_bytes(len(b)) for k, b in blobs.items()}
    cache = _cache(store, limit=None)
    cache.prefetch({VID: ["a", "b", "c", "d"]})
    assert store.loads == [4] and cache.misses == 4 and cache.hits == 0
    assert cache.bytes == sum(size.values())
    cache.prefetch({VID: ["a", "c"]})  # touched: now the most recently used
    assert store.loads == [4] and cache.hits == 2
    assert cache.evict() == 0  # unbounded; the next interval has loaded nothing
    # order now b, d, a, c; a budget that only b's bytes must go to meet
    cache.limit_bytes = cache.bytes - size["b"]
    assert cache.evict() == 1
    assert set(cache.states[VID]) == {"a", "c", "d"}
    cache.limit_bytes = size["c"]  # d then a go (by bytes, not by count)
    assert cache.evict() == 2
    assert set(cache.states[VID]) == {"c"} and cache.bytes == size["c"]
    assert cache.evictions == 3
    cache.metrics.state_cache_bytes.set(0)  # the gauges follow the cache on evict
    cache.evict()
    assert cache.metrics.state_cache_bytes._value.get() == size["c"]


def test_eviction_leaves_room_for_what_a_batch_loads() -> None:
    store = MemoryOnlineStore()
    for k in "abcdef":
        _put(store, k, _state(2))
    one = resident_bytes(len(_state(2)))
    cache = _cache(store, limit=4 * one)
    cache.prefetch({VID: list("abcd")})  # a batch that loaded 4 states' bytes
    assert cache.evict() == 2  # room for as much (at most half the budget) next time
    cache.prefetch({VID: list("ef")})
    assert cache.bytes == 4 * one  # with the next batch's loads: within the budget
    assert cache.evict() == 2 and set(cache.states[VID]) == {"e", "f"}
    assert cache.evict() == 0  # nothing loaded since: the whole budget is usable


def test_never_evicts_a_dirty_or_in_flight_state() -> None:
    store = MemoryOnlineStore()
    cache = _cache(store, limit=0)
    states = cache.get(USER, ["a", "b", "c"])
    assert cache.bytes == 3 * RESIDENT_BASE  # absent: new states
    for st in states[:2]:
        st.apply("impressions", T0, {"ad_id": "x"}, fkey=fence_key(0, 0), pos=1)
    cache.dirty[VID].update(["a", "b"])
    assert cache.evict() == 1 and set(cache.states[VID]) == {"a", "b"}  # c was clean
    writes, flight = cache.take_dirty()
    assert sorted(w.key for w in writes) == [entity_key("hr", "user", k) for k in "ab"]
    assert cache.evict() == 0  # in flight: not confirmed yet
    cache.dirty[VID].add("a")  # changed again while its write is in flight
    store.write(writes, {})
    cache.written(flight)
    assert cache.evict() == 1 and set(cache.states[VID]) == {"a"}  # b durable, a dirty
    writes, flight = cache.take_dirty()
    store.write(writes, {})
    cache.written(flight)
    assert cache.evict() == 1 and not cache.states[VID] and cache.bytes == 0


def test_a_state_in_two_writes_is_pinned_until_both_are_confirmed() -> None:
    cache = _cache(MemoryOnlineStore(), limit=0)
    cache.get(USER, ["a"])
    cache.dirty[VID].add("a")
    _, first = cache.take_dirty()
    cache.dirty[VID].add("a")
    _, second = cache.take_dirty()
    cache.written(first)
    assert cache.evict() == 0
    cache.written(second)
    assert cache.evict() == 1


def test_a_reloaded_state_keeps_its_fences_and_replays_are_skipped() -> None:
    store = MemoryOnlineStore()
    eng = _engine(store, cache_bytes=1)  # every durable state goes at the next flush
    eng.assign([("impressions", 0)])
    msgs = _impressions(0, range(6))
    eng.on_source("impressions", msgs)
    eng.flush_online()
    before = {k: dict(v) for k, v in store.hashes.items()}
    eng.flush_online()  # the flush evicts what the last one made durable
    assert eng.views.cached() == 0
    # a replay reaching the engine (e.g. re-published forwards, or a rewind): the
    # reloaded states carry their fences, so nothing is applied twice
    eng.admission.progress[("impressions", 0)].next = 0
    applied = eng.metrics.applied.labels(VID)._value.get()
    misses = eng.views.cache.misses
    eng.on_source("impressions", msgs)
    assert eng.metrics.applied.labels(VID)._value.get() == applied + 6  # reached the states
    assert eng.views.cache.misses == misses + 6  # u0..u5 reloaded
    assert not any(eng.views.dirty.values())
    eng.flush_online()
    assert store.hashes == before


# ------------------------------------------------------------------ through the engine
def _engine(store: MemoryOnlineStore, cache_bytes: int | None = None,
            sides: MemorySideOutputs | None = None, background: bool = False) -> Engine:
    return Engine(registry=REGISTRY, store=store, writer=None,
                  sides=sides or MemorySideOutputs(), topic=lambda t: t, redis_prefix="hr",
                  group="g", max_future_ms=10**13, clock=lambda: T0 / 1000 + 86_400 * 30,
                  background_writes=background, state_cache_bytes=cache_bytes)


def _impressions(part: int, offsets: range, users: int = 7) -> list[RawMessage]:
    out = []
    for o in offsets:
        ev = {"event_id": f"i{part}-{o}", "ts": T0 + o * 1000, "user_id": f"u{o % users}",
              "ad_id": f"a{o % 5}", "campaign_id": f"c{o % 3}", "publisher_id": f"p{o % 4}",
              "placement": "top", "creative_type": "banner", "device_type": "mobile",
              "country": "US", "bid_cpm": 1.0}
        out.append(RawMessage(encode_events("impression", [ev]), [("hr-enc", b"arrow")],
                              "impressions", part, o, T0))
    return out


def test_one_batched_load_per_take_for_every_view() -> None:
    store = CountingStore()
    sides = MemorySideOutputs()
    eng = _engine(store, cache_bytes=1, sides=sides)
    topics = [("impressions", 0), ("clicks", 0)] + [
        (repartition_topic(e), 0) for e in ("ad", "campaign", "publisher")]
    eng.assign(topics)
    eng.on_messages(_impressions(0, range(10)))
    assert len(store.loads) == 1  # the user states of the batch
    forwards = [RawMessage(encode_arrow(t), [("hr-enc", b"arrow")], repartition_topic(e), 0,
                           0, T0) for e, t in sides.forwards]
    eng.flush_online()
    eng.flush_online()  # evicts
    store.loads.clear()
    # sources and repartition topics in one take: user, ad, campaign and publisher
    # states all come from a single load
    eng.on_messages(_impressions(0, range(10, 20)) + forwards)
    assert len(store.loads) == 1
    assert store.loads[0] == 7 + 5 + 3 + 4


def _synthetic_messages(batch: int) -> list[list[RawMessage]]:
    """A multi-batch stream over two partitions of both sources (Arrow envelopes)."""
    events = generate(300, 6000, 3, T0, days=2).events
    offsets: dict[tuple[str, int], int] = {}
    batches: list[list[RawMessage]] = []
    for start in range(0, len(events), batch):
        chunk = events[start:start + batch]
        msgs = []
        for part in (0, 1):
            for kind, topic in (("impression", "impressions"), ("click", "clicks")):
                rows = [{k: v for k, v in e.items() if k != "type"}
                        for n, e in enumerate(chunk) if e["type"] == kind and n % 2 == part]
                if rows:
                    o = offsets.get((topic, part), 0)
                    offsets[(topic, part)] = o + 1
                    msgs.append(RawMessage(encode_events(kind, rows), [("hr-enc", b"arrow")],
                                           topic, part, o, T0))
        batches.append(msgs)
    return batches


def _run(store: MemoryOnlineStore, cache_bytes: int | None, background: bool) -> Engine:
    sides = MemorySideOutputs()
    eng = _engine(store, cache_bytes=cache_bytes, sides=sides, background=background)
    tps = [(t, p) for t in ("impressions", "clicks") for p in (0, 1)]
    tps += [(repartition_topic(e), 0) for e in ("ad", "campaign", "publisher")]
    eng.assign(tps)
    rep_offset: dict[str, int] = {}
    for msgs in _synthetic_messages(250):
        forwards = []
        for entity, table in sides.forwards:  # last take's forwards arrive with this one
            topic = repartition_topic(entity)
            o = rep_offset.get(topic, 0)
            rep_offset[topic] = o + 1
            forwards.append(RawMessage(encode_arrow(table), [("hr-enc", b"arrow")], topic, 0,
                                       o, T0))
        sides.forwards.clear()
        eng.on_messages(msgs + forwards)
        eng.flush_online(wait=not background)
    while sides.forwards:  # the last forwards
        entity, table = sides.forwards.pop(0)
        topic = repartition_topic(entity)
        o = rep_offset.get(topic, 0)
        rep_offset[topic] = o + 1
        eng.on_messages([RawMessage(encode_arrow(table), [("hr-enc", b"arrow")], topic, 0, o,
                                    T0)])
    eng.flush_online()
    eng.close()
    return eng


@pytest.mark.parametrize("background", [False, True])
def test_final_states_equal_with_and_without_a_tiny_cache(background: bool) -> None:
    unbounded, tiny = MemoryOnlineStore(), MemoryOnlineStore()
    ref = _run(unbounded, None, background)
    eng = _run(tiny, 20_000, background)  # a handful of states
    assert ref.views.cache.evictions == 0
    cache = eng.views.cache
    assert cache.evictions > 1000 and cache.misses > cache.evictions
    eng.views.evict()  # the last flush's states are durable: within the budget again
    assert cache.bytes <= 20_000
    assert tiny.hashes and tiny.hashes == unbounded.hashes
    assert tiny.commits == unbounded.commits


def test_in_flight_states_survive_the_flush_that_evicts() -> None:
    """A background write held back: the next take's flush evicts around it."""
    store = MemoryOnlineStore()
    gate = threading.Event()
    real_write = store.write

    def held_write(*args, **kw):  # type: ignore[no-untyped-def]
        assert gate.wait(5)
        return real_write(*args, **kw)

    store.write = held_write  # type: ignore[method-assign]
    eng = _engine(store, cache_bytes=1, background=True)
    eng.assign([("impressions", 0)])
    eng.on_messages(_impressions(0, range(7)))
    eng.flush_online(wait=False)  # in flight, held
    cache = eng.views.cache
    assert cache.evict() == 0 and eng.views.cached() == 7
    gate.set()
    eng.flush_online()  # confirms the first write, then evicts its states
    assert eng.views.cached() == 0
    eng.close()


# ------------------------------------------------------------------ orphans
class ListingFs:
    """A local filesystem that records the directories it was asked to list."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()
        self.listed: list[str] = []

    def get_file_info(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        assert not selector.recursive
        self.listed.append(selector.base_dir)
        return self.fs.get_file_info(selector)

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)


def _touch(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_orphan_removal_lists_only_the_dates_that_can_hold_orphans(tmp_path: Path) -> None:
    names = {
        "old_durable": "events/impression/date=2024-03-01/impressions-p000-000000000000.parquet",
        "old_orphan_name": "views/user_activity@1/date=2024-03-01/"
                           "impressions-p000-000000000500.parquet",
        "durable": "events/impression/date=2024-03-10/impressions-p000-000000000100.parquet",
        "orphan": "events/impression/date=2024-03-10/impressions-p000-000000000500.parquet",
        "orphan_view": "views/user_activity@1/date=2024-03-11/"
                       "impressions-p000-000000000600.parquet",
        "other_part": "events/impression/date=2024-03-10/impressions-p001-000000000700.parquet",
        "other_topic": "events/click/date=2024-03-10/clicks-p000-000000000900.parquet",
    }
    paths = {k: _touch(tmp_path, v) for k, v in names.items()}
    fs = ListingFs()
    writer = OfflineWriter(fs, str(tmp_path))  # type: ignore[arg-type]
    since = 1_710_028_800_000  # 2024-03-10T00:00:00Z
    assert writer.remove_orphans("impressions", 0, 500, since_ms=since) == 2
    gone = {k for k, p in paths.items() if not p.exists()}
    assert gone == {"orphan", "orphan_view"}
    # the older date partition was never listed, only named in its parent's listing
    assert not any("2024-03-01" in d for d in fs.listed)
    assert writer.remove_orphans("impressions", 0, 0) == 3  # nothing durable: every date
    assert any("2024-03-01" in d for d in fs.listed)


class RecordingWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int | None]] = []

    def remove_orphans(self, topic: str, partition: int, durable_next: int,
                       since_ms: int | None = None) -> int:
        self.calls.append((topic, partition, durable_next, since_ms))
        return 0

    def durable_end(self, topic: str, partition: int) -> None:
        return None


def test_assignment_scopes_orphans_from_the_durable_watermark() -> None:
    store = MemoryOnlineStore()
    store.commits[commit_key("hr", "g", "impressions", 0)] = {
        "online_next": 40, "online_wm": T0 + 9_000, "offline_next": 30,
        "offline_wm": T0 + 5_000}
    writer = RecordingWriter()
    eng = Engine(registry=REGISTRY, store=store, writer=writer,  # type: ignore[arg-type]
                 sides=MemorySideOutputs(), topic=lambda t: t, redis_prefix="hr", group="g",
                 max_future_ms=10**13)
    eng.assign([("impressions", 0), ("impressions", 1), (repartition_topic("ad"), 0)])
    lateness = REGISTRY.topology.lateness_ms["impressions"]
    assert writer.calls == [
        ("impressions", 0, 30, T0 + 5_000 - lateness - ORPHAN_SLACK_MS),
        ("impressions", 1, 0, None),  # nothing durable: every date
    ]


def test_an_unreadable_state_of_any_view_is_quarantined_only_with_side_outputs() -> None:
    ad = REGISTRY.plans["ad_activity@1"]
    store = MemoryOnlineStore()
    store.hset(entity_key("hr", "ad", "a1"), ad.view.id, b"\x03junk")
    _put(store, "u1", _state(3))
    with pytest.raises(StateFormatError, match="malformed view state"):
        _cache(store, None).get(ad, ["a1"])  # nowhere to keep the bytes: as before
    sides = MemorySideOutputs()
    cache = StateCache(plans=REGISTRY.plans, store=store, prefix="hr", limit_bytes=None,
                       metrics=StreamMetrics(), sides=sides)
    cache.prefetch({ad.view.id: ["a1"], VID: ["u1"]})
    [dl] = sides.dead
    assert isinstance(dl, CorruptState)
    assert (dl.key, dl.view, dl.value) == (entity_key("hr", "ad", "a1"), ad.view.id, b"\x03junk")
    assert cache.states[ad.view.id]["a1"].encode() == ViewState(ad).encode()  # reset
    assert cache.dirty == {**{v: set() for v in REGISTRY.plans}, ad.view.id: {"a1"}}
    assert cache.states[VID]["u1"].encode() == _state(3)  # the readable one as stored
    assert cache.quarantined == 1 and cache.misses == 2
    assert cache.metrics.registry.get_sample_value(
        "headrace_corrupt_states_total", {"view": ad.view.id}) == 1


def test_resident_estimate_grows_with_the_encoding() -> None:
    sizes = [resident_bytes(len(_state(n))) for n in (0, 4, 32)]
    assert sizes[0] >= RESIDENT_BASE and sizes[0] < sizes[1] < sizes[2]
