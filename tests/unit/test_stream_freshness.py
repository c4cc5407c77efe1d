"""The worker's freshness machinery keeps the engine's results: batched calls equal
message-by-message ones (replayed forwards included), flush pacing and offline staggering
stay within their bounds, freshness samples are uniform, and the hand-packed Redis
pipeline writes states before commit records."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from feature_defs.registry import load_registry
from headrace.core.errors import OnlineStoreError
from headrace.core.online_store import MemoryOnlineStore, RedisOnlineStore, StateWrite
from headrace.core.resp import PipelineConnections
from streams.engine import Engine, RawMessage
from streams.flush import STATS_STRIDE
from streams.pacing import FlushPacer, OfflineSchedule, catching_up
from streams.sides import FORWARD_ROWS, KafkaSideOutputs, MemorySideOutputs, encode_arrow
from tests.resp_fakes import FakePool

T0 = 1_700_000_000_000


def _engine(store: MemoryOnlineStore, sides: MemorySideOutputs | None = None,
            clock: float = T0 / 1000 + 3600) -> Engine:
    return Engine(registry=load_registry(), store=store, writer=None,
                  sides=sides or MemorySideOutputs(), topic=lambda t: t, redis_prefix="hr",
                  group="g", max_future_ms=10**13, clock=lambda: clock)


def _imp(part: int, offset: int, i: int) -> RawMessage:
    ev = {"event_id": f"i{i}", "ts": T0 + i * 1000, "user_id": f"u{i % 7}", "ad_id": f"a{i % 5}",
          "campaign_id": f"c{i % 3}", "publisher_id": f"p{i % 4}", "placement": "top",
          "creative_type": "banner", "device_type": "mobile", "country": "US", "bid_cpm": 1.0}
    return RawMessage(json.dumps(ev).encode(), None, "impressions", part, offset, T0)


def _stream() -> dict[int, list[RawMessage]]:
    """Two partitions, a few messages each (ids shared across partitions)."""
    return {p: [_imp(p, o, 100 * p + o) for o in range(6)] for p in (0, 1)}


# ------------------------------------------------------------------- batched == one by one
def test_one_call_over_partitions_equals_calls_per_partition() -> None:
    together, apart = MemoryOnlineStore(), MemoryOnlineStore()
    sides_t, sides_a = MemorySideOutputs(), MemorySideOutputs()
    eng_t, eng_a = _engine(together, sides_t), _engine(apart, sides_a)
    for eng in (eng_t, eng_a):
        eng.assign([("impressions", 0), ("impressions", 1)])
    msgs = _stream()
    eng_t.on_source("impressions", msgs[0] + msgs[1])
    for part in (0, 1):
        eng_a.on_source("impressions", msgs[part])
    eng_t.flush_online()
    eng_a.flush_online()
    assert together.hashes == apart.hashes
    assert together.commits == apart.commits
    # one forward per entity for the whole call, holding the rows of both partitions
    assert sorted(e for e, _ in sides_t.forwards) == ["ad", "campaign", "publisher"]
    rows = {e: t.num_rows for e, t in sides_t.forwards}
    assert rows == {e: sum(t.num_rows for f, t in sides_a.forwards if f == e) for e in rows}


def _forward_messages(topic: str, tables: list[pa.Table]) -> list[RawMessage]:
    return [RawMessage(encode_arrow(t), [("hr-enc", b"arrow")], topic, 0, o, T0)
            for o, t in enumerate(tables)]


def test_repartition_batch_equals_messages_one_by_one_with_replays() -> None:
    src_sides = MemorySideOutputs()
    src = _engine(MemoryOnlineStore(), src_sides)
    src.assign([("impressions", 0), ("impressions", 1)])
    msgs = _stream()
    src.on_source("impressions", msgs[0][:3])
    src.on_source("impressions", msgs[1])
    src.on_source("impressions", msgs[0][3:])
    ads = [t for e, t in src_sides.forwards if e == "ad"]
    assert len(ads) == 3
    topic = "headrace-repartition-ad"
    # a restarted worker re-publishes forwards at and after its durable progress: a whole
    # replayed message, and one overlapping an earlier one only in part
    replayed = [*ads, ads[1], pa.concat_tables([ads[0].slice(1), ads[2]])]

    one_by_one, batched = MemoryOnlineStore(), MemoryOnlineStore()
    eng_1, eng_b = _engine(one_by_one), _engine(batched)
    for eng in (eng_1, eng_b):
        eng.assign([(topic, 0)])
    for m in _forward_messages(topic, ads):
        eng_1.on_repartition(topic, [m])
    eng_b.on_repartition(topic, _forward_messages(topic, replayed))
    eng_1.flush_online()
    eng_b.flush_online()
    assert batched.hashes and batched.hashes == one_by_one.hashes
    assert eng_b.progress[(topic, 0)].next == len(replayed)


# ------------------------------------------------------------------- pacing and schedules
def test_flush_pacer_spaces_flushes_by_their_cost_within_bounds() -> None:
    pacer = FlushPacer(0.01, 0.1, duty=4.0)
    pacer.flushed(0.0, 0.001)  # cheap flushes: the minimum gap
    assert pacer.gap() == pytest.approx(0.01)
    assert not pacer.due(0.005) and pacer.due(0.0111)
    for k in range(20):  # expensive flushes: duty x cost, capped at the maximum
        pacer.flushed(k, k + 0.05)
    assert pacer.gap() == pytest.approx(0.1)
    pacer = FlushPacer(0.01, 0.5, duty=4.0)
    for k in range(30):
        pacer.flushed(k, k + 0.02)
    assert pacer.gap() == pytest.approx(0.08, rel=0.01)


def test_offline_schedule_staggers_partitions_and_keeps_phase() -> None:
    sched = OfflineSchedule(4.0, 4)
    tps = [("impressions", p) for p in range(4)]
    assert sched.due(tps, 0.0) == []
    assert sched.due(tps, 1.0) == [("impressions", 0)]
    assert sched.due(tps, 2.5) == [("impressions", 0), ("impressions", 1)]
    sched.detached([("impressions", 0)], 2.5)
    assert sched.due(tps, 2.5) == [("impressions", 1)]
    assert sched.due(tps, 4.9) == [("impressions", 1), ("impressions", 2), ("impressions", 3)]
    assert sched.due([("impressions", 0)], 5.0) == [("impressions", 0)]  # its phase: 1 + 4
    sched.detached(tps, 5.0)  # all at once (input paused): each stays on its own phase
    assert sched.due(tps, 5.9) == []
    assert sched.due(tps, 6.0) == [("impressions", 1)]
    assert sched.due(tps, 8.0) == tps[1:]
    assert sched.due(tps, 9.0) == tps


def test_offline_schedule_writes_full_partitions_early() -> None:
    sched = OfflineSchedule(4.0, 4, part_rows=100)
    tps = [("impressions", p) for p in range(4)]
    rows = {tps[0]: 99, tps[1]: 100, tps[2]: 5000, tps[3]: 0}
    assert sched.due(tps, 0.0, rows.__getitem__) == tps[1:3]
    assert sched.due(tps, 0.0) == []  # without buffer sizes: the phases only
    sched.detached(tps[1:3], 0.0)  # early parts keep their partitions' phases
    assert sched.due(tps, 2.0, lambda _tp: 0) == tps[:2]
    assert OfflineSchedule(4.0, 4).due(tps, 0.0, rows.__getitem__) == []  # no size trigger


def test_catching_up_looks_at_message_age() -> None:
    now = T0 + 60_000
    live = [RawMessage(b"x", None, "t", 0, 0, now - 50)]
    old = [RawMessage(b"x", None, "t", 0, 1, now - 5_000)]
    unstamped = [RawMessage(b"x", None, "t", 0, 2, 0)]
    assert not catching_up(live, now)
    assert catching_up(live + old, now)
    assert not catching_up(unstamped, now)


# ------------------------------------------------------------------- freshness samples
def test_freshness_samples_are_uniform_across_flushes_of_any_size() -> None:
    store = MemoryOnlineStore()
    eng = _engine(store)
    eng.assign([("impressions", 0)])
    sizes = [1, 7, 40, 3]
    offset = 0
    for n in sizes:
        eng.on_source("impressions", [_imp(0, offset + i, offset + i) for i in range(n)])
        offset += n
        eng.flush_online()
    seen = sum(sizes)  # one value per event for the user view (the others need the hop)
    kept = eng.stats["freshness_ms"]
    assert len(kept) == len(eng.stats["freshness_ts_ms"]) == -(-seen // STATS_STRIDE)
    assert eng.stats["freshness_ts_ms"] == [T0 + i * 1000 for i in range(0, seen, STATS_STRIDE)]


def test_offline_batches_of_some_partitions_only() -> None:
    eng = _engine(MemoryOnlineStore())
    eng.assign([("impressions", 0), ("impressions", 1)])
    msgs = _stream()
    eng.on_source("impressions", msgs[0] + msgs[1])
    first = eng.offline_batches({("impressions", 1)})
    assert [(b[0].partition, b[1], b[2], b[4].num_rows) for b in first] == [(1, 0, 6, 6)]
    rest = eng.offline_batches()
    assert [(b[0].partition, b[4].num_rows) for b in rest] == [(0, 6)]


# ------------------------------------------------------------------- side outputs and redis
def test_forwards_are_split_below_the_message_size() -> None:
    sides = KafkaSideOutputs.__new__(KafkaSideOutputs)
    sides._partitions, sides._topic = 1, lambda t: t
    sent: list = []
    sides._produce = lambda topic, value, headers=None, partition=None, key=None: sent.append(
        value)
    n = 2 * FORWARD_ROWS + 5
    sides.forward("ad", pa.table({"entity_id": ["a"] * n, "n": list(range(n))}))
    tables = [pa.ipc.open_stream(v).read_all() for v in sent]
    assert [t.num_rows for t in tables] == [FORWARD_ROWS, FORWARD_ROWS, 5]
    assert pa.concat_tables(tables)["n"].to_pylist() == list(range(n))


def _redis(answer: object = None, chunk: int = 7) -> tuple[RedisOnlineStore, FakePool]:
    st = RedisOnlineStore.__new__(RedisOnlineStore)
    pool = FakePool(answer, chunk)  # type: ignore[arg-type]
    st._pipelines = PipelineConnections(pool)
    st._errors = (OSError, *st._pipelines.errors)
    st._batch, st._expiry = 2000, {}
    return st, pool


def test_redis_write_packs_states_then_commit_records() -> None:
    st, pool = _redis()
    st.write([StateWrite("k1", "v@1", b"\x00\r\n", 60), StateWrite("k2", "v@1", b"y", 60)],
             {"c": {"online_next": 7, "online_wm": -3}})
    assert pool.sent == (
        b"*4\r\n$4\r\nHSET\r\n$2\r\nk1\r\n$3\r\nv@1\r\n$3\r\n\x00\r\n\r\n"
        b"*3\r\n$6\r\nEXPIRE\r\n$2\r\nk1\r\n$2\r\n60\r\n"
        b"*4\r\n$4\r\nHSET\r\n$2\r\nk2\r\n$3\r\nv@1\r\n$1\r\ny\r\n"
        b"*3\r\n$6\r\nEXPIRE\r\n$2\r\nk2\r\n$2\r\n60\r\n"
        b"*6\r\n$4\r\nHSET\r\n$1\r\nc\r\n$11\r\nonline_next\r\n$1\r\n7\r\n"
        b"$9\r\nonline_wm\r\n$2\r\n-3\r\n"
    )
    # every reply read (two pipelines on one connection, kept open)
    assert pool.connects == 1 and not pool.dropped and not pool.sockets[0].pending


def test_redis_load_and_errors() -> None:
    blobs = {b"k1": b"blob\r\n" * 3}
    st, pool = _redis(lambda cmd: blobs.get(cmd[1]), chunk=5)  # replies split across reads
    assert st.load([("k1", "f"), ("k2", "f")]) == [b"blob\r\n" * 3, None]
    assert pool.sent == b"*3\r\n$4\r\nHGET\r\n$2\r\nk1\r\n$1\r\nf\r\n" \
        b"*3\r\n$4\r\nHGET\r\n$2\r\nk2\r\n$1\r\nf\r\n"
    # an error reply inside a pipeline fails the write and drops the connection (its
    # other replies are unread); the next call reconnects and works
    answers = iter([Exception("WRONGTYPE Operation against a key"), 1, 1, 1])
    st, pool = _redis(lambda _cmd: next(answers))
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        st.write([StateWrite("k", "f", b"x", 10**6)], {})
    assert pool.dropped == 1
    st.write([StateWrite("k", "f", b"x", 10**6)], {})
    assert pool.connects == 2 and pool.dropped == 1
