"""The rollout's serving-side per-arm counts without network: the delta arithmetic
(hand-checked), the flush protocol on an in-memory fake of Redis's script (the real
Lua runs in ``tests/integration/test_serving_counts_e2e.py``), the accumulator's
retry-without-double-counting, Score's counting, the split watcher's flushes, the stats
sources and the CLI's source selection."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.core.errors import InputError
from headrace.rollout.gates import ArmStats, PctrBucket, SegmentStats
from headrace.rollout.serving_counts import (
    FLUSH_SCRIPT,
    LATENCY_BOUNDS_MS,
    LATENCY_FIELDS,
    ServingCounts,
    ServingStatsSource,
    bucket,
    counts_key,
    flush_batch,
    flush_deltas,
    flush_key,
    read_serving_counts,
)
from headrace.rollout.source import MemoryStatsSource, MergedStatsSource, StatsUnavailable, merge
from headrace.rollout.split import assign, split_key
from serving.rollout_counts import CountsAccumulator
from serving.split import SplitWatcher, StaticSplit
from tests.unit.test_serving_split import FakeRedis, applied, loaded, req, service, state

P = "hr"
Z = (0,) * len(LATENCY_BOUNDS_MS)


def _num(s: str) -> float:
    return float(s)


class ScriptRedis(FakeRedis):
    """:class:`FakeRedis` (get/set) plus hashes, the flush script (a Python port of
    :data:`FLUSH_SCRIPT`'s protocol) and a MULTI/EXEC pipeline of HGETALLs.

    ``fail``: raise before doing anything; ``lose_reply``: apply, then raise (a timeout
    after Redis applied the batch).
    """

    def __init__(self) -> None:
        super().__init__()
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.evals = 0
        self.lose_reply = False
        self.expire: dict[str, int] = {}

    def eval(self, script: str, numkeys: int, *args: Any) -> int:
        assert script == FLUSH_SCRIPT
        self.evals += 1
        if self.fail is not None:
            raise self.fail
        keys, argv = list(args[:numkeys]), [str(a) for a in args[numkeys:]]
        seq, ttl = int(argv[0]), int(argv[1])
        last = int(self.data.get(keys[0], b"-1"))
        if last >= seq:
            return 0
        a = 2
        for key in keys[1:]:
            h = self.hashes.setdefault(key, {})
            n = int(argv[a])
            a += 1
            for _ in range(n):
                f = argv[a].encode()
                h[f] = str(int(h.get(f, b"0")) + int(argv[a + 1])).encode()
                a += 2
            lo, hi = argv[a], argv[a + 1]
            a += 2
            if lo and (b"min_pctr" not in h or _num(lo) < _num(h[b"min_pctr"].decode())):
                h[b"min_pctr"] = lo.encode()
            if hi and (b"max_pctr" not in h or _num(hi) > _num(h[b"max_pctr"].decode())):
                h[b"max_pctr"] = hi.encode()
            self.expire[key] = ttl
        self.data[keys[0]] = str(seq).encode()
        if self.lose_reply:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return 1

    def pipeline(self, transaction: bool = True) -> Any:
        assert transaction
        outer = self

        class Pipe:
            def __init__(self) -> None:
                self.keys: list[str] = []

            def hgetall(self, key: str) -> None:
                self.keys.append(key)

            def execute(self) -> list[dict[bytes, bytes]]:
                if outer.fail is not None:
                    raise outer.fail
                return [dict(outer.hashes.get(k, {})) for k in self.keys]

        return Pipe()


# ---------------------------------------------------------------- layout and arithmetic
def test_key_layout_and_latency_fields_are_fixed() -> None:
    assert counts_key("hr", "r-1", "v2") == "hr:rollout:serving:r-1:v2"
    assert flush_key("hr", "s1-ab") == "hr:rollout:serving-flush:s1-ab"
    assert LATENCY_BOUNDS_MS == (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, math.inf)
    assert LATENCY_FIELDS == ("lat_le_1", "lat_le_2", "lat_le_3", "lat_le_5", "lat_le_7.5",
                              "lat_le_10", "lat_le_15", "lat_le_20", "lat_le_30", "lat_le_50",
                              "lat_le_100", "lat_le_inf")
    # upper bounds inclusive: exactly 10 ms is in lat_le_10
    assert [bucket(x) for x in (0.0, 1.0, 1.0001, 7.5, 10.0, 10.01, 100.0, 100.5, 1e9)] == [
        0, 0, 1, 4, 5, 6, 10, 11, 11]


def test_answer_merge_and_increments_by_hand() -> None:
    a = ServingCounts.answer("p1", 0.4, pctr=(0.01, 0.03))
    b = ServingCounts.answer("p1", 12.0, pctr=(0.002, 0.02))
    e = ServingCounts.answer("p2", 3.0, pctr=(0.5, 0.6), error=True)  # no latency/range
    total = a.merge(b).merge(e)
    assert (total.requests, total.errors) == (3, 1)
    assert total.latency_counts == (1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    assert dict(total.pub_requests) == {"p1": 2, "p2": 1}
    assert dict(total.pub_errors) == {"p2": 1}
    assert (total.min_pctr, total.max_pctr) == (0.002, 0.03)
    assert e.merge(ServingCounts()) == e and ServingCounts().empty and not e.empty
    assert sorted(total.increments()) == sorted([
        ("requests", 3), ("errors", 1), ("lat_le_1", 1), ("lat_le_15", 1),
        ("pub_requests:p1", 2), ("pub_requests:p2", 1), ("pub_errors:p2", 1)])
    nan = ServingCounts.answer("p", 1.0, pctr=(math.nan, math.nan))
    assert (nan.min_pctr, nan.max_pctr) == (-math.inf, math.inf)  # out of range, not hidden


def test_from_hash_and_arm_stats() -> None:
    raw = {b"requests": b"200", b"errors": b"3", b"lat_le_1": b"100", b"lat_le_2": b"97",
           b"pub_requests:p:1": b"150", b"pub_errors:p:1": b"3", b"pub_requests:": b"50",
           b"min_pctr": b"1e-05", b"max_pctr": b"inf", b"future_field": b"x"}
    c = ServingCounts.from_hash(raw)
    assert (c.requests, c.errors, c.min_pctr, c.max_pctr) == (200, 3, 1e-05, math.inf)
    assert c.latency_counts[:3] == (100, 97, 0)
    s = c.to_arm_stats()
    assert (s.requests, s.errors, s.impressions, s.clicks) == (200, 3, 0, 0)
    assert s.segments == {"publisher": {"p:1": SegmentStats(errors=3, requests=150),
                                        "": SegmentStats(requests=50)}}
    # p99 rank 0.99 * 197 = 195.03: 95.03 of the 97 in (1, 2] -> 1 + 95.03 / 97
    assert s.p99_ms() == pytest.approx(1 + 95.03 / 97)
    assert ServingCounts().to_arm_stats().latency_counts == Z
    with pytest.raises(InputError, match="invalid serving counts"):
        ServingCounts.from_hash({b"requests": b"many"})


# ---------------------------------------------------------------- the flush protocol
def test_flush_adds_keeps_min_max_and_skips_a_resent_seq() -> None:
    r = ScriptRedis()
    d1 = ServingCounts.answer("p1", 2.5, pctr=(0.02, 0.05))
    assert flush_deltas(r, P, "r-1", "v1", d1, token="t", seq=1) is True
    d2 = ServingCounts.answer("p1", 0.5, pctr=(0.03, 0.09)).merge(
        ServingCounts.answer("p1", error=True))
    assert flush_deltas(r, P, "r-1", "v1", d2, token="t", seq=2)
    assert flush_deltas(r, P, "r-1", "v1", d2, token="t", seq=2) is False  # a resend
    assert flush_deltas(r, P, "r-1", "v1", d2, token="t", seq=1) is False  # older
    got = read_serving_counts(r, P, "r-1", "v1")
    assert got == d1.merge(d2)
    assert (got.requests, got.errors, got.min_pctr, got.max_pctr) == (3, 1, 0.02, 0.09)
    # another writer's seq 1 is its own: applied
    assert flush_deltas(r, P, "r-1", "v1", d1, token="u", seq=1)
    assert read_serving_counts(r, P, "r-1", "v1").requests == 4
    assert r.expire[counts_key(P, "r-1", "v1")] == 30 * 86400
    # nothing to add: no round trip
    before = r.evals
    assert flush_batch(r, P, {("r-1", "v1"): ServingCounts()}, token="t", seq=3)
    assert r.evals == before
    assert read_serving_counts(r, P, "r-1", "v9") == ServingCounts()


def test_flush_errors_are_online_store_errors() -> None:
    from headrace.core.errors import OnlineStoreError

    r = ScriptRedis()
    r.fail = redis.exceptions.ConnectionError("refused")
    with pytest.raises(OnlineStoreError):
        flush_deltas(r, P, "r", "v", ServingCounts.answer("p", 1.0), token="t", seq=1)
    with pytest.raises(OnlineStoreError):
        read_serving_counts(r, P, "r", "v")
    with pytest.raises(StatsUnavailable):
        ServingStatsSource(r, P, "r").read("v1", "v2")


# ---------------------------------------------------------------- the accumulator
def _acc(failures: list[int] | None = None) -> CountsAccumulator:
    return CountsAccumulator(P, "s1", on_failure=None if failures is None
                             else lambda: failures.append(1))


def test_accumulator_counts_and_flushes_once_per_call() -> None:
    acc, r = _acc(), ScriptRedis()
    acc.record("r-1", "v1", "p1", 0.7, np.array([0.02, 0.01, 0.04]))
    acc.record("r-1", "v1", None, 20.0, np.array([0.03]))
    acc.record("r-1", "v2", "p1", error=True)
    assert acc.flush(r) and r.evals == 1
    assert acc.flush(r) and r.evals == 1  # nothing new: no round trip
    v1 = read_serving_counts(r, P, "r-1", "v1")
    assert (v1.requests, v1.errors, v1.min_pctr, v1.max_pctr) == (2, 0, 0.01, 0.04)
    assert v1.latency_counts[0] == 1 and v1.latency_counts[LATENCY_FIELDS.index("lat_le_20")] == 1
    assert dict(v1.pub_requests) == {"p1": 1, "": 1}
    v2 = read_serving_counts(r, P, "r-1", "v2")
    assert (v2.requests, v2.errors, dict(v2.pub_errors), v2.min_pctr) == (1, 1, {"p1": 1}, None)
    assert acc.unflushed() == {}
    acc.record("r-1", "v1", "p1", 1.0, np.array([np.nan, 0.5]))
    acc.flush(r)
    v1 = read_serving_counts(r, P, "r-1", "v1")
    assert (v1.min_pctr, v1.max_pctr) == (-math.inf, math.inf)


def test_a_failed_flush_is_resent_and_a_lost_reply_is_not_counted_twice() -> None:
    failures: list[int] = []
    acc, r = _acc(failures), ScriptRedis()
    acc.record("r-1", "v1", "p1", 1.5, np.array([0.1]))
    r.fail = redis.exceptions.TimeoutError("frozen")
    assert not acc.flush(r) and not acc.flush(r)
    acc.record("r-1", "v1", "p1", 1.5, np.array([0.2]))  # counts on during the outage
    assert acc.unflushed()[("r-1", "v1")].requests == 2
    r.fail = None
    r.lose_reply = True  # Redis applies the resent batch, the reply is lost
    assert not acc.flush(r)
    assert read_serving_counts(r, P, "r-1", "v1").requests == 1
    r.lose_reply = False
    assert acc.flush(r)  # the same seq again: skipped by Redis, dropped here
    assert read_serving_counts(r, P, "r-1", "v1").requests == 1
    assert acc.flush(r)  # then what came during the outage
    got = read_serving_counts(r, P, "r-1", "v1")
    assert (got.requests, got.min_pctr, got.max_pctr) == (2, 0.1, 0.2)
    assert len(failures) == 3 and acc.unflushed() == {}


# ---------------------------------------------------------------- Score feeds it
def test_score_counts_both_arms_errors_and_not_shadows(tmp_path: Path) -> None:
    split = StaticSplit()
    models = {"v1": loaded("v1", 0.001), "v2": loaded("v2", 0.002, fail=True)}
    svc, watcher = service(tmp_path, split, versions=models)
    acc = svc.counts = _acc()
    users = [f"u{i}" for i in range(200)]
    svc.score(req("u0"))  # no split: not counted
    assert acc.unflushed() == {}
    split.current = applied(svc, watcher, 0.3, shadow=True)
    for u in users:
        svc.score(req(u))
    svc.shadow.stop(5.0)  # every shadow prediction done (none counted)
    n2 = sum(assign("r-1", u, 0.3) for u in users)
    got = acc.unflushed()
    v1, v2 = got[("r-1", "v1")], got[("r-1", "v2")]
    assert (v2.requests, v2.errors, dict(v2.pub_errors), v2.min_pctr) == (n2, n2, {"p0": n2},
                                                                          None)
    assert (v1.requests, v1.errors, dict(v1.pub_requests)) == (200, 0, {"p0": 200})
    assert sum(v1.latency_counts) == 200 and sum(v2.latency_counts) == 0
    assert (v1.min_pctr, v1.max_pctr) == pytest.approx((0.001, 0.005))  # bids 1..5
    assert set(got) == {("r-1", "v1"), ("r-1", "v2")}


def test_the_watcher_flushes_after_each_poll_and_at_stop(tmp_path: Path) -> None:
    r = ScriptRedis()
    r.data[split_key(P)] = state(1, "v2", 0.5).to_json().encode()
    acc = _acc()
    w = SplitWatcher(r, P, "s1", lambda v: ScoringModelStub.get(v), counts=acc)
    acc.record("r-1", "v1", "p", 1.0, np.array([0.1]))
    w.poll()
    assert read_serving_counts(r, P, "r-1", "v1").requests == 1
    acc.record("r-1", "v1", "p", 1.0, np.array([0.1]))
    r.fail = redis.exceptions.TimeoutError("down")
    evals = r.evals
    w.poll()  # the split read failed: no flush attempt (no second timeout)
    assert r.evals == evals
    r.fail = None
    w.stop()  # the last flush
    assert read_serving_counts(r, P, "r-1", "v1").requests == 2


class ScoringModelStub:
    @staticmethod
    def get(version: str) -> Any:
        from tests.unit.test_serving_split import compile_

        return compile_(loaded(version, 0.001))


# ---------------------------------------------------------------- the sources
def test_serving_stats_source_reads_both_arms() -> None:
    r = ScriptRedis()
    flush_deltas(r, P, "r-1", "v2", ServingCounts.answer("p", 4.0, pctr=(0.1, 0.2)),
                 token="t", seq=1)
    champ, chall = ServingStatsSource(r, P, "r-1").read("v1", "v2")
    assert champ.requests == 0 and champ.latency_counts == Z
    assert (chall.requests, chall.min_pctr, chall.latency_counts[3]) == (1, 0.1, 1)
    assert ServingStatsSource(r, P, "other").read("v1", "v2")[1].requests == 0


def test_merge_by_hand() -> None:
    bounds = (1.0, 10.0, math.inf)
    serving = ArmStats(requests=100, errors=2, latency_bounds_ms=bounds,
                       latency_counts=(90, 9, 1), min_pctr=0.01, max_pctr=0.3,
                       segments={"publisher": {"p1": SegmentStats(errors=2, requests=60)}})
    stream = ArmStats(impressions=80, clicks=3, sum_pctr=2.5,
                      buckets=(PctrBucket(0.0, 0.1, 70, 2, 1.5),),
                      segments={"publisher": {"p1": SegmentStats(impressions=50, clicks=2),
                                              "p2": SegmentStats(impressions=30, clicks=1)},
                                "country": {"US": SegmentStats(impressions=80, clicks=3)}})
    m = merge(serving, stream)
    assert (m.impressions, m.clicks, m.sum_pctr, m.requests, m.errors) == (80, 3, 2.5, 100, 2)
    assert (m.latency_bounds_ms, m.latency_counts) == (bounds, (90, 9, 1))
    assert (m.min_pctr, m.max_pctr, m.buckets) == (0.01, 0.3, stream.buckets)
    assert m.segments == {
        "publisher": {"p1": SegmentStats(50, 2, 2, 60), "p2": SegmentStats(30, 1, 0, 0)},
        "country": {"US": SegmentStats(80, 3, 0, 0)}}
    twice = merge(m, merge(serving, ArmStats(min_pctr=0.005, max_pctr=0.2,
                                             buckets=(PctrBucket(0.0, 0.1, 1, 1, 0.05),
                                                      PctrBucket(0.1, 0.2, 4, 0, 0.6)))))
    assert (twice.requests, twice.latency_counts, twice.min_pctr, twice.max_pctr) == (
        200, (180, 18, 2), 0.005, 0.3)
    assert twice.buckets == (PctrBucket(0.0, 0.1, 71, 3, 1.55), PctrBucket(0.1, 0.2, 4, 0, 0.6))
    assert merge(ArmStats(latency_p99_ms=4.0), ArmStats(latency_p99_ms=6.0)).latency_p99_ms == 6
    with pytest.raises(StatsUnavailable, match="different bounds"):
        merge(serving, ArmStats(requests=1, latency_bounds_ms=(5.0, math.inf),
                                latency_counts=(1, 0)))


def test_merged_source_reads_every_source() -> None:
    a = MemoryStatsSource({"v2": ArmStats(requests=10, errors=1)})
    b = MemoryStatsSource({"v1": ArmStats(impressions=5), "v2": ArmStats(impressions=7,
                                                                          clicks=1)})
    champ, chall = MergedStatsSource(a, b).read("v1", "v2")
    assert (champ.impressions, chall.requests, chall.errors, chall.impressions) == (5, 10, 1, 7)
    r = ScriptRedis()
    r.fail = redis.exceptions.ConnectionError("down")
    with pytest.raises(StatsUnavailable):  # never half the fields
        MergedStatsSource(b, ServingStatsSource(r, P, "r")).read("v1", "v2")


def test_the_cli_hook_picks_the_file_or_the_servers_counts(tmp_path: Path) -> None:
    from headrace.commands.rollout import stats_source
    from headrace.rollout.settings import RolloutSettings
    from headrace.rollout.source import JsonFileStatsSource

    settings = RolloutSettings.from_env({}, redis_prefix="hrx")
    args = argparse.Namespace()
    src = stats_source(settings, "r-9", args)
    assert isinstance(src, ServingStatsSource) and (src.prefix, src.rollout_id) == ("hrx",
                                                                                    "r-9")
    f = tmp_path / "arms.json"
    f.write_text('{"arms": {}}')
    assert isinstance(stats_source(settings, "r-9", args, stats_file=str(f)),
                      JsonFileStatsSource)
    with pytest.raises(InputError, match="does not exist"):
        stats_source(settings, "r-9", args, stats_file=str(tmp_path / "none.json"))


def test_with_the_evaluation_views_the_stream_counts_join_the_servers() -> None:
    """Definitions that run feature_defs.evaluation: the servers' counts merged with the
    stream's views (ViewStatsSource, with the configured segments); without them only
    the servers' counts."""
    from headrace.commands.rollout import stats_source
    from headrace.rollout.settings import RolloutSettings
    from serving.arm_stats import ViewStatsSource

    settings = RolloutSettings.from_env(
        {}, redis_prefix="hrx", definitions="feature_defs.evaluation",
        rollout_segments={"publisher": ["p01", "p02"]})
    src = stats_source(settings, "r-9", argparse.Namespace())
    assert isinstance(src, MergedStatsSource)
    kinds = [type(s) for s in src.sources]
    assert kinds == [ServingStatsSource, ViewStatsSource]
    view = src.sources[1]
    assert isinstance(view, ViewStatsSource)
    assert view.segments == {"publisher": ("p01", "p02")}
    plain = RolloutSettings.from_env({}, redis_prefix="hrx")
    assert isinstance(stats_source(plain, "r-9", argparse.Namespace()), ServingStatsSource)


def test_rollout_start_retries_a_momentarily_inconsistent_first_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's views can show a click before its impression for a moment: the
    start's baseline read is retried, and only a lasting failure is the error."""
    import headrace.commands.rollout as cmd

    class Flaky:
        def __init__(self, fails: int) -> None:
            self.fails = fails

        def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
            if self.fails:
                self.fails -= 1
                raise StatsUnavailable("buckets (clicks out of range)")
            return ArmStats(impressions=3), ArmStats(impressions=1)

    monkeypatch.setattr(cmd.time, "sleep", lambda s: None)
    champ, chall = cmd._first_read(Flaky(3), "v1", "v2")
    assert (champ.impressions, chall.impressions) == (3, 1)
    monkeypatch.setattr(cmd, "FIRST_READ_S", 0.0)
    with pytest.raises(InputError, match="cannot read the arms' counts to start"):
        cmd._first_read(Flaky(10**6), "v1", "v2")
