"""Sanity of the brute-force oracle on hand-computed cases (and of the adversarial stream)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import xxhash

from tests import adversarial, oracle
from tests.oracle import DAY, HOUR, MINUTE

# 2024-03-04T12:00:00Z: a multiple of every tile size used (5 s, 1 min, 15 min, 1 h)
T0 = 1_709_553_600_000


def imp(ts: int, user: str | None = "u1", ad: str = "a1", eid: str | None = None,
        campaign: str = "c1", publisher: str = "p1") -> dict:
    return {"type": "impression", "event_id": eid or f"i{ts}-{ad}", "ts": ts, "user_id": user,
            "ad_id": ad, "campaign_id": campaign, "publisher_id": publisher}


def click(ts: int, user: str | None = "u1", ad: str = "a1", eid: str | None = None) -> dict:
    return {"type": "click", "event_id": eid or f"k{ts}-{ad}", "ts": ts, "user_id": user,
            "ad_id": ad, "campaign_id": "c1", "publisher_id": "p1", "impression_id": "i"}


def test_t0_is_aligned_to_every_tile() -> None:
    for tile in (5000, MINUTE, 15 * MINUTE, HOUR):
        assert T0 % tile == 0


# ----------------------------------------------------------------------- window edges
@pytest.mark.parametrize(
    ("label", "lower"),
    [("5m", 5 * MINUTE - 5000), ("1h", HOUR - MINUTE), ("24h", 24 * HOUR - 15 * MINUTE),
     ("7d", 7 * DAY - HOUR)],
)
def test_window_edges_at_aligned_T(label: str, lower: int) -> None:
    # T on a tile boundary: T's own tile (empty before T) is one of the W/r tiles, so
    # the window is [T - W + r, T)
    assert oracle.in_window(T0 - lower, T0, label)
    assert not oracle.in_window(T0 - lower - 1, T0, label)
    assert oracle.in_window(T0 - 1, T0, label)
    assert not oracle.in_window(T0, T0, label)


def test_window_lower_bound_is_tile_aligned_for_unaligned_T() -> None:
    # 1h window, 1 min tiles, T = T0 + 30 s: lowest tile is floor(T/1min) - 59
    t = T0 + 30_000
    low = (t // MINUTE - 59) * MINUTE  # = T0 - 59 min
    assert low == T0 - 59 * MINUTE
    assert oracle.in_window(low, t, "1h")  # exactly at the lower tile bound: in
    assert not oracle.in_window(low - 1, t, "1h")  # the tile before: out
    assert not oracle.in_window(low - MINUTE, t, "1h")
    assert oracle.in_window(t - 1, t, "1h")
    assert not oracle.in_window(t, t, "1h")  # at T: out


def test_window_with_negative_times_uses_mathematical_floor() -> None:
    # T = -1 ms: floor(-1 / 1min) = -1, so the 1h window starts at tile -60
    assert oracle.in_window(-60 * MINUTE, -1, "1h")
    assert not oracle.in_window(-60 * MINUTE - 1, -1, "1h")
    assert oracle.in_window(-2, -1, "1h")
    assert not oracle.in_window(-1, -1, "1h")


def test_counts_at_the_tile_edges() -> None:
    t = T0 + 30_000
    events = [
        imp(T0 - 59 * MINUTE, ad="edge"),  # lowest tile of 1h: in
        imp(T0 - 59 * MINUTE - 1, ad="before"),  # one ms earlier tile: out of 1h
        imp(T0 - 60 * MINUTE, ad="before2"),  # one tile earlier: out of 1h
        imp(t, ad="at_T"),  # at T: out of everything
        imp(t - 1, ad="last"),
        click(T0),
    ]
    f = oracle.features_as_of(events, "user", "u1", t)
    assert f["user__impressions_1h"] == 2
    assert f["user__impressions_24h"] == 4
    assert f["user__impressions_7d"] == 4
    assert f["user__impressions_5m"] == 1  # 5 s tiles: [T0 - 4m25s, T)
    assert f["user__clicks_1h"] == 1
    assert f["user__ctr_1h"] == 0.5
    assert f["user__ctr_24h"] == 0.25
    assert f["user__distinct_ads_24h"] == 4
    assert set(f) == set(oracle.feature_names("user"))


def test_ratio_is_null_without_impressions_and_counts_are_zero() -> None:
    events = [click(T0 - 10 * MINUTE), click(T0 - 5 * MINUTE)]
    f = oracle.features_as_of(events, "user", "u1", T0)
    assert f["user__clicks_1h"] == 2
    assert f["user__impressions_1h"] == 0
    assert f["user__ctr_1h"] is None
    assert f["user__ctr_7d"] is None
    assert f["user__distinct_ads_24h"] == 0
    assert not oracle.is_default(events, "user", "u1", T0)
    # clicks may exceed impressions: the ratio is not clipped
    f = oracle.features_as_of(events + [imp(T0 - MINUTE)], "user", "u1", T0)
    assert f["user__ctr_1h"] == 2.0


def test_entities_other_than_user() -> None:
    events = [imp(T0 - HOUR, ad="a1"), imp(T0 - 2 * HOUR, ad="a2"), click(T0 - HOUR, ad="a1"),
              imp(T0 - MINUTE, user=None, ad="a1")]
    assert oracle.features_as_of(events, "ad", "a1", T0) == {
        "ad__impressions_1h": 1, "ad__clicks_1h": 0, "ad__ctr_1h": 0.0,
        "ad__impressions_24h": 2, "ad__clicks_24h": 1, "ad__ctr_24h": 0.5,
    }
    assert oracle.features_as_of(events, "campaign", "c1", T0) == {"campaign__ctr_24h": 1 / 3}
    assert oracle.features_as_of(events, "publisher", "p1", T0) == {"publisher__ctr_24h": 1 / 3}
    # the anonymous impression counts for the ad but not for any user
    assert oracle.features_as_of(events, "user", "u1", T0)["user__impressions_24h"] == 2


# ----------------------------------------------------------------------- defaults / TTL
def test_default_without_any_event_before_T() -> None:
    events = [imp(T0)]
    assert oracle.is_default(events, "user", "u1", T0)  # the event at T does not count
    assert oracle.features_as_of(events, "user", "u1", T0) == oracle.defaults("user")
    assert not oracle.is_default(events, "user", "u1", T0 + 1)
    assert oracle.is_default(events, "user", "nobody", T0 + 1)
    assert oracle.defaults("ad") == {
        "ad__impressions_1h": 0, "ad__clicks_1h": 0, "ad__ctr_1h": None,
        "ad__impressions_24h": 0, "ad__clicks_24h": 0, "ad__ctr_24h": None,
    }


@pytest.mark.parametrize(("entity", "ttl"), [("user", 8 * DAY), ("ad", 2 * DAY),
                                             ("campaign", 2 * DAY), ("publisher", 2 * DAY)])
def test_ttl_edge(entity: str, ttl: int) -> None:
    assert oracle.TTL_MS[entity] == ttl
    events = [imp(T0)]
    eid = events[0][oracle.ENTITY_KEYS[entity]]
    assert not oracle.is_default(events, entity, eid, T0 + ttl - 1)
    assert oracle.is_default(events, entity, eid, T0 + ttl)  # ">= TTL": default
    assert oracle.features_as_of(events, entity, eid, T0 + ttl) == oracle.defaults(entity)


def test_ttl_counts_from_latest_event_before_T_not_latest_overall() -> None:
    # events at T0 and T0 + 2d: as of T = T0 + 2d exactly, the latest before T is T0,
    # which is exactly one ad-TTL old, so the ad is served defaults
    events = [imp(T0), imp(T0 + 2 * DAY)]
    assert oracle.is_default(events, "ad", "a1", T0 + 2 * DAY)
    assert not oracle.is_default(events, "ad", "a1", T0 + 2 * DAY + 1)
    assert not oracle.is_default(events, "user", "u1", T0 + 2 * DAY)


def test_within_ttl_but_outside_every_window_gives_counts_zero_not_defaults_flag() -> None:
    events = [imp(T0)]
    t = T0 + 7 * DAY + HOUR  # outside the 7d window, inside the 8d TTL
    assert not oracle.is_default(events, "user", "u1", t)
    f = oracle.features_as_of(events, "user", "u1", t)
    assert f == oracle.defaults("user")  # same values, but is_default is False


# ----------------------------------------------------------------------- KMV
def test_kmv_exact_below_k_and_estimate_at_k() -> None:
    assert oracle.kmv_distinct([]) == 0
    assert oracle.kmv_distinct(["a", "b", "a"]) == 2
    values = [f"ad{i}" for i in range(511)]
    assert oracle.kmv_distinct(values + values) == 511
    values = [f"ad{i}" for i in range(512)]
    h = sorted(xxhash.xxh64_intdigest(v.encode()) for v in values)
    expect = round(511 / ((h[511] + 1) / 2**64))
    assert oracle.kmv_distinct(values) == expect


def test_kmv_estimate_close_to_truth() -> None:
    for n in (600, 2_000, 10_000):
        est = oracle.kmv_distinct(f"ad-{i}" for i in range(n))
        assert abs(est - n) / n < 3 * 0.044, (n, est)


# ----------------------------------------------------------------------- lateness
def _same_partition_events(n: int, partitions: int = 4) -> list[str]:
    users = [f"u{i}" for i in range(200)]
    p0 = oracle.partition_of({"user_id": users[0], "event_id": "x"}, partitions)
    return [u for u in users if oracle.partition_of({"user_id": u, "event_id": "x"},
                                                    partitions) == p0][:n]


def test_lateness_is_strictly_less_than_watermark() -> None:
    ua, ub = _same_partition_events(2)
    head = imp(T0, user=ua)
    at_wm = imp(T0 - 60_000, user=ub)  # == watermark: accepted
    below = imp(T0 - 60_001, user=ub)  # < watermark: late
    acc, late = oracle.accepted_events([head, at_wm, below], partitions=4)
    assert acc == [head, at_wm]
    assert late == [below]


def test_lateness_is_per_topic_and_partition() -> None:
    ua, ub = _same_partition_events(2)
    others = [u for u in (f"v{i}" for i in range(100))
              if oracle.partition_of({"user_id": u, "event_id": "x"}, 4)
              != oracle.partition_of({"user_id": ua, "event_id": "x"}, 4)]
    events = [
        imp(T0, user=ua),
        click(T0 - HOUR, user=ub),  # other topic: not late
        imp(T0 - HOUR, user=others[0]),  # other partition: not late
        imp(T0 - HOUR, user=ub),  # same topic and partition: late
        click(T0 - 2 * HOUR, user=ua),  # clicks partition max is T0 - 1h: late
    ]
    acc, late = oracle.accepted_events(events, partitions=4)
    assert late == [events[3], events[4]]
    assert acc == events[:3]


def test_late_events_do_not_advance_and_first_event_sets_watermark() -> None:
    (ua,) = _same_partition_events(1)
    events = [imp(T0 - DAY, user=ua), imp(T0, user=ua), imp(T0 - DAY, user=ua),
              imp(T0 - 59_999, user=ua)]
    acc, late = oracle.accepted_events(events, partitions=4)
    assert acc == [events[0], events[1], events[3]]
    assert late == [events[2]]
    assert oracle.accepted_events(events, partitions=4, lateness_ms=2 * DAY)[1] == []


def test_anonymous_events_route_by_event_id() -> None:
    e = imp(T0, user=None, eid="evt-1")
    assert oracle.partition_of(e, 7) == xxhash.xxh64_intdigest(b"evt-1") % 7
    e2 = imp(T0, user="u-9", eid="evt-1")
    assert oracle.partition_of(e2, 7) == xxhash.xxh64_intdigest(b"u-9") % 7
    assert oracle.features_as_of([e], "ad", "a1", T0 + 1)["ad__impressions_1h"] == 1


def test_index_answers_like_the_plain_list() -> None:
    events = [imp(T0 - i * 7 * MINUTE, user=f"u{i % 3}", ad=f"a{i % 5}") for i in range(50)]
    events += [click(T0 - i * 11 * MINUTE, user=f"u{i % 3}", ad=f"a{i % 5}") for i in range(20)]
    idx = oracle.OracleIndex(events)
    for entity, ids in (("user", ["u0", "u1", "u9"]), ("ad", ["a0", "a4"]),
                        ("campaign", ["c1"]), ("publisher", ["p1"])):
        for eid in ids:
            for t in (T0 - 3 * HOUR, T0, T0 + 1, T0 + DAY):
                assert oracle.features_as_of(idx, entity, eid, t) == oracle.features_as_of(
                    events, entity, eid, t)


# ----------------------------------------------------------------------- adversarial stream
@pytest.fixture(scope="module")
def small_stream() -> adversarial.Stream:
    return adversarial.generate(small=True, seed=11)


def test_stream_is_deterministic(small_stream: adversarial.Stream) -> None:
    again = adversarial.generate(small=True, seed=11)
    assert again.arrivals == small_stream.arrivals
    assert adversarial.generate(small=True, seed=12).arrivals != small_stream.arrivals


def test_stream_shape(small_stream: adversarial.Stream) -> None:
    events = small_stream.events
    acc, late = oracle.accepted_events(events, small_stream.partitions)
    users = {e["user_id"] for e in acc if e["user_id"] is not None}
    assert len(users) >= 500
    assert any(e["user_id"] is None for e in acc)
    assert len({e["event_id"] for e in events}) == len(events)
    # out of order within the lateness, and ties on the same user
    assert any(b["ts"] < a["ts"] for a, b in zip(acc, acc[1:], strict=False))
    ties = Counter((e["user_id"], e["ts"]) for e in acc if e["user_id"] is not None)
    assert any(c > 1 for c in ties.values())
    # the intent of every injected event agrees with the oracle's lateness rule
    late_ids = {e["event_id"] for e in late}
    for a in small_stream.arrivals:
        if a.event is not None:
            assert (a.event["event_id"] in late_ids) == (a.intent in ("edge_late", "far_late"))
            assert a.partition == oracle.partition_of(a.event, small_stream.partitions)
            assert a.topic == oracle.TOPIC_OF[a.event["type"]]
            wire = json.loads(a.value)
            assert wire["ts"] == a.event["ts"] and "type" not in wire
    assert {a.intent for a in small_stream.arrivals} == {"normal", "edge_ok", "edge_late",
                                                         "far_late"}
    # above 512 distinct ads in a day for the heavy user
    idx = oracle.OracleIndex(acc)
    t = idx.latest("user", "u-heavy") + 1
    assert oracle.features_as_of(idx, "user", "u-heavy", t)["user__distinct_ads_24h"] > 512


def test_malformed_messages(small_stream: adversarial.Stream) -> None:
    bad = small_stream.malformed
    assert {a.reason for a in bad} == set(adversarial.REASONS)
    for a in bad:
        if a.reason == "undecodable":
            with pytest.raises(UnicodeDecodeError):
                a.value.decode("utf-8")
            continue
        text = a.value.decode("utf-8")
        if a.reason == "bad_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
            continue
        obj = json.loads(text)
        assert isinstance(obj, dict)
        if a.reason == "ts_in_future":
            assert obj["ts"] >= adversarial.FUTURE_TS


def test_probe_points(small_stream: adversarial.Stream) -> None:
    acc, _ = oracle.accepted_events(small_stream.events, small_stream.partitions)
    idx = oracle.OracleIndex(acc)
    probes = adversarial.probe_points(idx, 200, seed=3)
    assert probes == adversarial.probe_points(acc, 200, seed=3)
    by_entity = Counter(p[0] for p in probes)
    assert set(by_entity) == set(oracle.ENTITY_KEYS)
    kinds: dict[str, set[str]] = {e: set() for e in oracle.ENTITY_KEYS}
    for entity, eid, t in probes:
        latest = idx.latest(entity, eid)
        if latest is None:
            kinds[entity].add("unseen")
            continue
        assert t >= latest
        ttl = oracle.TTL_MS[entity]
        if t == latest:
            kinds[entity].add("at_latest")
        if t - latest == ttl:
            kinds[entity].add("ttl_edge")
        if t - latest > 2 * ttl:
            kinds[entity].add("far")
    for entity in oracle.ENTITY_KEYS:
        assert kinds[entity] >= {"at_latest", "ttl_edge", "far", "unseen"}, entity
