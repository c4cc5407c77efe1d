"""``feature_defs.state.ViewState`` against the brute-force oracle (seeded random cases).

The state claims exact answers for any ``T >= max_ts`` whatever the order events were
applied in, so these cases apply events in sorted, nearly sorted and shuffled orders,
with ties, and compare every feature and the default flag with :mod:`tests.oracle`.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from feature_defs.registry import load_registry
from feature_defs.state import ViewState, fence_key, fence_pos
from tests import oracle
from tests.oracle import DAY, HOUR, MINUTE

T0 = 1_709_553_600_000  # 2024-03-04T12:00:00Z, aligned to every tile size

REG = load_registry()
PLAN_OF = {p.view.entity.name: p for p in REG.plans.values()}


def _source(event: dict[str, Any]) -> str:
    return oracle.TOPIC_OF[event["type"]]


# ----------------------------------------------------------------------- generators
def random_events(rng: random.Random, n: int, span_ms: int, *, n_users: int = 3,
                  n_ads: int = 5) -> list[dict[str, Any]]:
    """Events over ``[T0, T0 + span_ms)`` with ties and tile-boundary times."""
    events: list[dict[str, Any]] = []
    for i in range(n):
        r = rng.random()
        if events and r < 0.2:
            ts = rng.choice(events)["ts"]  # a tie
        else:
            ts = T0 + rng.randrange(span_ms)
            if r < 0.3:
                ts -= ts % rng.choice((5000, MINUTE, 15 * MINUTE, HOUR))
        ad = f"a{rng.randrange(n_ads)}"
        events.append({
            "type": "impression" if rng.random() < 0.7 else "click",
            "event_id": f"e{i}",
            "ts": ts,
            "user_id": None if rng.random() < 0.1 else f"u{rng.randrange(n_users)}",
            "ad_id": ad,
            "campaign_id": f"c{int(ad[1:]) % 2}",
            "publisher_id": f"p{rng.randrange(2)}",
        })
    return events


def arrival_order(rng: random.Random, events: list[dict[str, Any]], mode: str) -> list[dict]:
    if mode == "sorted":
        return sorted(events, key=lambda e: e["ts"])
    if mode == "jitter":  # out of order within 60 s
        return [e for _, e in sorted(((e["ts"] + rng.randrange(60_000), e) for e in events),
                                     key=lambda k: k[0])]
    out = list(events)
    rng.shuffle(out)
    return out


def build_states(events: list[dict[str, Any]], entity: str) -> dict[str, ViewState]:
    plan = PLAN_OF[entity]
    key = oracle.ENTITY_KEYS[entity]
    states: dict[str, ViewState] = {}
    for e in events:
        if e.get(key) is None:
            continue
        st = states.setdefault(e[key], ViewState(plan))
        assert st.apply(_source(e), e["ts"], e) is True
    return states


def probe_times(rng: random.Random, max_ts: int, entity: str) -> list[int]:
    ttl = oracle.TTL_MS[entity]
    ts = [max_ts, max_ts + 1, max_ts + rng.randrange(1, 10 * MINUTE),
          max_ts + rng.randrange(1, 2 * DAY), max_ts + rng.randrange(1, 9 * DAY),
          max_ts + ttl - 1, max_ts + ttl, max_ts + ttl + rng.randrange(1, 30 * DAY)]
    for tile in (5000, MINUTE, 15 * MINUTE, HOUR):  # the next tile boundaries
        nxt = (max_ts // tile + 1) * tile
        ts += [nxt - 1, nxt, nxt + 1]
    return ts


def check_against_oracle(states: dict[str, ViewState], events: list[dict[str, Any]],
                         entity: str, rng: random.Random) -> int:
    checked = 0
    for eid, st in states.items():
        for t in probe_times(rng, st.max_ts, entity):
            got, flag = st.rollup(t)
            want = oracle.features_as_of(events, entity, eid, t)
            assert flag == oracle.is_default(events, entity, eid, t), (entity, eid, t)
            assert got == want, (entity, eid, t, st.max_ts)
            checked += 1
    return checked


# ----------------------------------------------------------------------- tests
def test_plans_cover_the_oracle_features() -> None:
    for entity, plan in PLAN_OF.items():
        assert sorted(plan.names) == sorted(oracle.feature_names(entity))
        assert plan.ttl_ms == oracle.TTL_MS[entity]


SPANS = (10 * MINUTE, 3 * HOUR, 2 * DAY, 12 * DAY)


@pytest.mark.parametrize("mode", ["sorted", "jitter", "shuffled"])
@pytest.mark.parametrize("entity", list(oracle.ENTITY_KEYS))
def test_random_sequences_match_oracle(entity: str, mode: str) -> None:
    checked = 0
    for seed in range(12):
        rng = random.Random(f"{entity}-{mode}-{seed}")
        events = random_events(rng, rng.randrange(1, 160), SPANS[seed % len(SPANS)])
        order = arrival_order(rng, events, mode)
        checked += check_against_oracle(build_states(order, entity), events, entity, rng)
    assert checked > 0


@pytest.mark.parametrize("entity", list(oracle.ENTITY_KEYS))
def test_prefixes_match_oracle_and_survive_encode_decode(entity: str) -> None:
    plan = PLAN_OF[entity]
    key = oracle.ENTITY_KEYS[entity]
    for seed in range(8):
        rng = random.Random(f"prefix-{entity}-{seed}")
        events = arrival_order(rng, random_events(rng, 120, SPANS[seed % len(SPANS)]),
                               "jitter" if seed % 2 else "shuffled")
        states: dict[str, ViewState] = {}
        for i, e in enumerate(events, start=1):
            if e.get(key) is None:
                continue
            eid = e[key]
            st = states.setdefault(eid, ViewState(plan))
            st.apply(_source(e), e["ts"], e)
            if rng.random() < 0.3:
                data = st.encode()
                again = ViewState.decode(plan, data)
                assert again.encode() == data
                for t in (st.max_ts, st.max_ts + rng.randrange(1, DAY)):
                    assert again.rollup(t) == st.rollup(t)
                states[eid] = again  # continue on the decoded copy
            if rng.random() < 0.2:
                prefix = events[:i]
                t = st.max_ts + rng.choice((0, 1, rng.randrange(1, 3 * DAY)))
                got, flag = states[eid].rollup(t)
                assert got == oracle.features_as_of(prefix, entity, eid, t)
                assert flag == oracle.is_default(prefix, entity, eid, t)
        check_against_oracle(states, events, entity, rng)


def test_decode_rejects_foreign_bytes() -> None:
    plan = PLAN_OF["user"]
    with pytest.raises(ValueError):
        ViewState.decode(plan, b"")
    with pytest.raises(ValueError):
        ViewState.decode(plan, b"\x7fgarbage")
    with pytest.raises(ValueError):  # the ad view's ring layout is not the user's
        ViewState.decode(plan, ViewState(PLAN_OF["ad"]).encode())


def test_rollup_before_max_ts_is_refused() -> None:
    st = ViewState(PLAN_OF["user"])
    st.apply("impressions", T0, {"ad_id": "a1"})
    with pytest.raises(ValueError):
        st.rollup(T0 - 1)


def test_empty_state_is_default() -> None:
    st = ViewState(PLAN_OF["ad"])
    values, flag = st.rollup(T0)
    assert flag is True
    assert values == oracle.defaults("ad")


# ----------------------------------------------------------------------- replay fences
def _with_positions(events: list[dict[str, Any]], partitions: int) -> list[tuple[dict, int, int]]:
    """(event, fence key, fence position) in arrival order: offsets per (topic, partition)."""
    offsets: dict[tuple[str, int], int] = {}
    out = []
    for e in events:
        src_idx = 0 if e["type"] == "impression" else 1
        part = oracle.partition_of(e, partitions)
        off = offsets[(src_idx, part)] = offsets.get((src_idx, part), -1) + 1
        out.append((e, fence_key(src_idx, part), fence_pos(off, 0)))
    return out


@pytest.mark.parametrize("entity", list(oracle.ENTITY_KEYS))
def test_replay_fences_skip_and_change_nothing(entity: str) -> None:
    plan = PLAN_OF[entity]
    key = oracle.ENTITY_KEYS[entity]
    for seed in range(6):
        rng = random.Random(f"fence-{entity}-{seed}")
        events = arrival_order(rng, random_events(rng, 150, SPANS[seed % len(SPANS)]), "jitter")
        positioned = _with_positions(events, partitions=3)
        states: dict[str, ViewState] = {}
        crash = rng.randrange(1, len(positioned))
        for e, fk, pos in positioned[:crash]:
            if e.get(key) is not None:
                st = states.setdefault(e[key], ViewState(plan))
                assert st.apply(_source(e), e["ts"], e, fkey=fk, pos=pos) is True
        # restart from an earlier committed offset: the replayed prefix is skipped
        restart = rng.randrange(0, crash)
        snapshot = {k: s.encode() for k, s in states.items()}
        for e, fk, pos in positioned[restart:crash]:
            if e.get(key) is not None:
                st = states[e[key]]
                assert st.seen(fk, pos)
                assert st.apply(_source(e), e["ts"], e, fkey=fk, pos=pos) is False
        assert {k: s.encode() for k, s in states.items()} == snapshot
        # round trip keeps the fences
        states = {k: ViewState.decode(plan, s.encode()) for k, s in states.items()}
        for e, fk, pos in positioned[restart:]:
            if e.get(key) is not None:
                st = states.setdefault(e[key], ViewState(plan))
                st.apply(_source(e), e["ts"], e, fkey=fk, pos=pos)
        check_against_oracle(states, events, entity, rng)


def test_same_position_twice_is_applied_once() -> None:
    st = ViewState(PLAN_OF["user"])
    fk = fence_key(0, 2)
    assert st.apply("impressions", T0, {"ad_id": "a1"}, fkey=fk, pos=fence_pos(7, 0))
    before = st.encode()
    assert not st.apply("impressions", T0, {"ad_id": "a1"}, fkey=fk, pos=fence_pos(7, 0))
    assert not st.apply("impressions", T0 + 5, {"ad_id": "a2"}, fkey=fk, pos=fence_pos(6, 3))
    assert st.encode() == before
    # another index inside the same message, and another partition, are new
    assert st.apply("impressions", T0, {"ad_id": "a1"}, fkey=fk, pos=fence_pos(7, 1))
    assert st.apply("impressions", T0, {"ad_id": "a1"}, fkey=fence_key(0, 3),
                    pos=fence_pos(0, 0))
    values, _ = st.rollup(T0 + 1)
    assert values["user__impressions_5m"] == 3


# ----------------------------------------------------------------------- KMV
@pytest.mark.parametrize("n_distinct", [1, 511, 512, 513, 600, 3_000, 20_000])
def test_distinct_ads_above_and_below_k(n_distinct: int) -> None:
    rng = random.Random(n_distinct)
    ads = [f"ad-{i}" for i in range(n_distinct)]
    ads += rng.choices(ads, k=n_distinct // 4)  # repeats
    events = [
        {"type": "impression", "event_id": f"e{i}", "ts": T0 + rng.randrange(23 * HOUR),
         "user_id": "u1", "ad_id": ad, "campaign_id": "c", "publisher_id": "p"}
        for i, ad in enumerate(ads)
    ]
    # older impressions outside the 24h window as of the probes must not count
    events += [{"type": "impression", "event_id": f"old{i}", "ts": T0 - 2 * DAY + i,
                "user_id": "u1", "ad_id": f"old-{i}", "campaign_id": "c", "publisher_id": "p"}
               for i in range(50)]
    rng.shuffle(events)
    (st,) = build_states(events, "user").values()
    for t in (st.max_ts, st.max_ts + 1, st.max_ts + HOUR):
        got = st.rollup(t)[0]["user__distinct_ads_24h"]
        want = oracle.features_as_of(events, "user", "u1", t)["user__distinct_ads_24h"]
        assert got == want
        truth = len({e["ad_id"] for e in events if oracle.in_window(e["ts"], t, "24h")})
        if truth < oracle.KMV_K:
            assert got == truth
        else:
            assert abs(got - truth) <= 3 * 0.044 * truth, (got, truth)
