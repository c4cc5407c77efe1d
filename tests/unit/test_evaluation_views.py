"""The evaluation views (feature_defs.evaluation) on the in-memory engine against a
brute-force count of the raw events, read back as ArmStats by ViewStatsSource; a full
replay of the same messages changes nothing (effectively once)."""

from __future__ import annotations

import random
from typing import Any

from feature_defs.layout import repartition_topic
from feature_defs.registry import load_registry
from headrace.core.online_store import MemoryOnlineStore
from headrace.rollout.gates import ArmStats
from serving.arm_stats import ViewStatsSource
from serving.reader import OnlineReader
from streams.encode import encode_events
from streams.engine import Engine, RawMessage
from streams.sides import MemorySideOutputs, encode_arrow

T0 = 1_700_000_000_000
REGISTRY = load_registry("feature_defs.evaluation")
EDGES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # as documented
ARMS = ("v1", "v2")
PUBLISHERS, DEVICES, COUNTRIES = ("p1", "p2", "p3"), ("mobile", "desktop"), ("US", "DE")


def events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """Impressions (some without model_version or p_ctr) and their clicks, in time order."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        arm = rng.choice((*ARMS, None))
        p = rng.choice((None, rng.random() ** 4, 0.001, 0.5, 1.0, 0.0))
        imp = {"type": "impression", "event_id": f"i{i}", "ts": T0 + i * 100,
               "user_id": rng.choice((None, "u1", "u2", "u3")), "ad_id": "a1",
               "campaign_id": "c1", "publisher_id": rng.choice(PUBLISHERS), "placement": "f",
               "creative_type": "b", "device_type": rng.choice(DEVICES),
               "country": rng.choice(COUNTRIES), "bid_cpm": 1.0,
               "prediction_id": f"pr{i}" if arm else None, "model_version": arm, "p_ctr": p}
        out.append(imp)
        if rng.random() < 0.3:
            out.append({"type": "click", "event_id": f"k{i}", "ts": imp["ts"] + 50,
                        "impression_id": imp["event_id"], "user_id": imp["user_id"],
                        "ad_id": "a1", "campaign_id": "c1", "publisher_id": imp["publisher_id"],
                        "prediction_id": imp["prediction_id"], "model_version": arm,
                        "p_ctr": p, "device_type": imp["device_type"],
                        "country": imp["country"]})
    return out


def _bucket(p: float) -> int:
    """Index of the bucket [EDGES[i], EDGES[i+1]) holding p (the last one closed)."""
    return next(i for i in range(10) if EDGES[i] <= p < EDGES[i + 1] or (i == 9 and p == 1.0))


def brute_force(evs: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """The expected counts of one arm, from the raw events (plain loops)."""
    imps = [e for e in evs if e["type"] == "impression" and e["model_version"] == arm]
    clks = [e for e in evs if e["type"] == "click" and e["model_version"] == arm]
    ps = [e["p_ctr"] for e in imps if e["p_ctr"] is not None]
    out: dict[str, Any] = {"impressions": len(imps), "clicks": len(clks), "sum_pctr": sum(ps),
                           "min_pctr": min(ps, default=None), "max_pctr": max(ps, default=None)}
    out["buckets"] = [(sum(1 for e in imps if e["p_ctr"] is not None and _bucket(e["p_ctr"]) == b),
                       sum(1 for e in clks if e["p_ctr"] is not None and _bucket(e["p_ctr"]) == b),
                       sum(e["p_ctr"] for e in imps if e["p_ctr"] is not None
                           and _bucket(e["p_ctr"]) == b)) for b in range(10)]
    out["segments"] = {dim: {v: (sum(1 for e in imps if e[f] == v),
                                 sum(1 for e in clks if e[f] == v)) for v in values
                             if any(e[f] == v for e in imps + clks)}
                       for dim, f, values in (("publisher", "publisher_id", PUBLISHERS),
                                              ("device_type", "device_type", DEVICES),
                                              ("country", "country", COUNTRIES))}
    return out


def problems(got: ArmStats, want: dict[str, Any]) -> list[str]:
    """Differences between ViewStatsSource's answer and the brute force (sums to 1e-9)."""
    out = []
    for name in ("impressions", "clicks", "min_pctr", "max_pctr"):
        if getattr(got, name) != want[name]:
            out.append(f"{name}: {getattr(got, name)} != {want[name]}")
    if abs(got.sum_pctr - want["sum_pctr"]) > 1e-9:
        out.append(f"sum_pctr: {got.sum_pctr} != {want['sum_pctr']}")
    for i, (b, (imps, clks, s)) in enumerate(zip(got.buckets, want["buckets"], strict=True)):
        if (b.low, b.high) != (EDGES[i], EDGES[i + 1]) or (b.impressions, b.clicks) != (
                imps, clks) or abs(b.sum_pctr - s) > 1e-9:
            out.append(f"bucket {i}: {b} != {(imps, clks, s)}")
    segs = {d: {v: (g.impressions, g.clicks) for v, g in vals.items()}
            for d, vals in got.segments.items()}
    if segs != want["segments"]:
        out.append(f"segments: {segs} != {want['segments']}")
    return out


def _messages(evs: list[dict[str, Any]]) -> list[RawMessage]:
    """Each event as one message on partition xxh(user)%2 of its topic, encodings mixed."""
    offsets: dict[tuple[str, int], int] = {}
    out = []
    for i, e in enumerate(evs):
        kind = e["type"]
        topic = kind + "s"
        part = 0 if e["user_id"] in (None, "u1") else 1
        o = offsets.get((topic, part), 0)
        offsets[(topic, part)] = o + 1
        enc = ("json", "avro", "arrow")[i % 3]
        (msg,) = encode_events(kind, [{k: v for k, v in e.items() if k != "type"}], enc)
        out.append(RawMessage(msg.value, msg.headers, topic, part, o, T0))
    return out


def run_engine(store: MemoryOnlineStore, msgs: list[RawMessage]) -> None:
    """Drive an engine over ``msgs`` in batches, delivering its forwards to itself."""
    sides = MemorySideOutputs()
    eng = Engine(registry=REGISTRY, store=store, writer=None, sides=sides,
                 topic=lambda t: t, redis_prefix="hr", group="g", max_future_ms=10**13,
                 clock=lambda: T0 / 1000 + 3600)
    entities = REGISTRY.topology.repartitioned_entities
    eng.assign([(t, p) for t in ("impressions", "clicks") for p in (0, 1)]
               + [(repartition_topic(e), 0) for e in entities])
    rep: dict[str, int] = {}

    def forwards() -> list[RawMessage]:
        out = []
        for entity, table in sides.forwards:
            topic = repartition_topic(entity)
            o = rep.get(topic, 0)
            rep[topic] = o + 1
            out.append(RawMessage(encode_arrow(table), [("hr-enc", b"arrow")], topic, 0, o,
                                  T0))
        sides.forwards.clear()
        return out

    for start in range(0, len(msgs), 97):
        eng.on_messages(msgs[start:start + 97] + forwards())
        eng.flush_online()
    while sides.forwards:
        eng.on_messages(forwards())
        eng.flush_online()
    eng.close()


def test_view_stats_match_the_brute_force_count_and_a_replay_changes_nothing() -> None:
    evs = events(1500)
    store = MemoryOnlineStore()
    msgs = _messages(evs)
    run_engine(store, msgs)
    source = ViewStatsSource(REGISTRY, OnlineReader(store, "hr"), clock_ms=lambda: T0,
                             segments={"publisher": PUBLISHERS, "device_type": DEVICES,
                                       "country": COUNTRIES})
    first = source.read("v1", "v2")
    for arm, got in zip(ARMS, first, strict=True):
        want = brute_force(evs, arm)
        assert want["impressions"] > 300 and want["clicks"] > 50
        assert problems(got, want) == [], arm
    run_engine(store, msgs)  # a new engine replaying every message from offset 0
    assert source.read("v1", "v2") == first
    unknown, _ = source.read("v9", "v1")
    assert unknown.impressions == 0 and unknown.segments == {"publisher": {},
                                                             "device_type": {}, "country": {}}
