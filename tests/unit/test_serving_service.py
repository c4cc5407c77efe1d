"""OnlineFeatureService on the fake online store: values vs the brute-force oracle,
TTL, cold start, bad requests naming the field, fallback, budget and breaker."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from feature_defs.coldstart import Priors, Status, Tier
from feature_defs.layout import entity_key, priors_key
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import InvalidArgument
from headrace.core.online_store import MemoryOnlineStore
from headrace.core.settings import ServeSettings
from serving.breaker import BreakerState, CircuitBreaker
from serving.client import OnlineFeatures, build_request
from serving.fetch import FallbackReason
from serving.metrics import ServingMetrics
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.score_request import MAX_BID_CPM, parse_score_request
from serving.service import MAX_FEATURE_NAMES, OnlineFeatureService
from tests import oracle

PREFIX = "hr"
T0 = 1_700_000_000_000
DAY = 86_400_000
REG = load_registry()
VIEW_OF = {p.view.entity.name: p for p in REG.plans.values()}
ENTITIES = ("user", "ad", "campaign", "publisher")


def make_events(rng: random.Random, users: int = 6, n: int = 900) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        u = rng.randrange(users)
        ts = T0 - int(rng.random() ** 2 * (u + 1) * DAY)  # u0 recent ... u5 up to 6 days
        events.append({"type": "click" if rng.random() < 0.1 else "impression",
                       "event_id": f"e{i}", "ts": ts, "user_id": f"u{u}",
                       "ad_id": f"a{rng.randrange(4)}", "campaign_id": f"c{rng.randrange(2)}",
                       "publisher_id": "p0"})
    return sorted(events, key=lambda e: e["ts"])


def load(store: MemoryOnlineStore, events: list[dict[str, Any]]) -> None:
    states: dict[tuple[str, str], ViewState] = {}
    for e in events:
        for entity, key in oracle.ENTITY_KEYS.items():
            plan = VIEW_OF[entity]
            st = states.setdefault((entity, e[key]), ViewState(plan))
            st.apply(oracle.TOPIC_OF[e["type"]], e["ts"], e)
    for (entity, eid), st in states.items():
        store.hset(entity_key(PREFIX, entity, eid), VIEW_OF[entity].view.id, st.encode())


class Timer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_service(
    store: MemoryOnlineStore,
    *,
    priors: Priors | None = None,
    timer: Timer | None = None,
    now: int = T0 + 1,
    memo_entries: int = 8192,
) -> OnlineFeatureService:
    if priors is not None:
        store.set(priors_key(PREFIX), priors.to_json())
    metrics = ServingMetrics()  # this test's own: exact counts
    cache = PriorsCache(store, PREFIX, metrics=metrics)
    cache.refresh()
    timer = timer or Timer()
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=timer,
                             on_change=lambda s: metrics.breaker_state.set(int(s)))
    reader = OnlineReader(store, PREFIX, memo_entries=memo_entries)
    return OnlineFeatureService(REG, reader, cache, breaker,
                                budget_ms=10.0, max_ids=5, clock_ms=lambda: now,
                                timer=timer, metrics=metrics)


def ask(service: OnlineFeatureService, entity: str, ids: list[str], **kw: Any) -> OnlineFeatures:
    return OnlineFeatures.from_pb(
        entity, service.get_online_features(build_request(entity, ids, **kw))
    )


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return make_events(random.Random(11))


@pytest.fixture
def store(events: list[dict[str, Any]]) -> MemoryOnlineStore:
    s = MemoryOnlineStore()
    load(s, events)
    return s


@pytest.mark.parametrize("entity", ENTITIES)
def test_values_equal_the_oracle_in_one_round_trip(
    entity: str, events: list[dict[str, Any]], store: MemoryOnlineStore
) -> None:
    service = make_service(store)  # no priors: every value is the entity's own roll-up
    index = oracle.OracleIndex(events)
    ids = index.ids(entity)[:4] + ["nobody"]
    for as_of in (T0 + 1, T0 + 61_000, T0 + 3 * 3_600_000, T0 + 2 * DAY, T0 + 6 * DAY):
        before = store.calls
        answer = ask(service, entity, ids, as_of_ms=as_of)
        assert store.calls == before + 1
        assert answer.as_of_ms == as_of and answer.feature_names == oracle.feature_names(entity)
        for ent in answer.entities:
            want = oracle.features_as_of(index, entity, ent.id, as_of)
            got = {n: (None if v is None else v) for n, v in ent.values.items()}
            assert got == {n: (None if w is None else float(w)) for n, w in want.items()}
            if not oracle.is_default(index, entity, ent.id, as_of):
                status = "PRESENT"
            elif oracle.latest_before(index, entity, ent.id, as_of) is None:
                status = "DEFAULT"
            else:
                status = "STALE"  # data beyond the TTL (Redis has not expired it yet)
            assert set(ent.statuses.values()) == {status}


def test_ttl_is_honoured_by_event_time(
    store: MemoryOnlineStore, events: list[dict[str, Any]]
) -> None:
    service = make_service(store, priors=Priors({"user__ctr_7d": 0.5}))
    ttl = VIEW_OF["user"].ttl_ms
    latest = max(e["ts"] for e in events if e["user_id"] == "u0")
    answer = ask(service, "user", ["u0"], as_of_ms=latest + ttl)  # key not expired in Redis
    ent = answer.entities[0]
    assert set(ent.statuses.values()) == {"STALE"}
    assert ent.values["user__ctr_7d"] == 0.5 and ent.values["user__impressions_7d"] == 0
    assert ent.tier == "GLOBAL"
    store.strings.clear()
    plain = make_service(store)  # no priors: the rolled-up values themselves
    fresh = ask(plain, "user", ["u0"], as_of_ms=latest + ttl - 1).entities[0]
    assert set(fresh.statuses.values()) == {"PRESENT"}
    assert ask(plain, "user", ["u0"], as_of_ms=latest + ttl).entities[0].values == {
        n: (None if v is None else float(v)) for n, v in oracle.defaults("user").items()
    }


def test_cold_start_through_the_service(store: MemoryOnlineStore) -> None:
    priors = Priors({"user__ctr_24h": 0.01}, {("US", "mobile"): {"user__ctr_24h": 0.2}})
    service = make_service(store, priors=priors)
    answer = ask(service, "user", ["nobody"], features=["user__ctr_24h"], country="US",
                 device_type="mobile")
    assert answer.entities[0].values == {"user__ctr_24h": 0.2}
    assert answer.entities[0].tier == "SEGMENT"
    assert ask(service, "user", ["nobody"], features=["user__ctr_24h"]).entities[0].tier == "GLOBAL"


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"entity_type": "planet", "ids": ["x"]}, "entity_type"),
        ({"ids": []}, "ids"),
        ({"ids": [f"u{i}" for i in range(6)]}, "ids"),
        ({"ids": ["u1", "u2", "u3", "has space"]}, "ids[3]"),
        ({"ids": ["u{1}"]}, "ids[0]"),
        ({"ids": ["u1"], "features": ["user__ctr_24h", "nope"]}, "feature_names[1]"),
        ({"ids": ["u1"], "features": ["ad__ctr_1h"]}, "feature_names[0]"),
        ({"ids": ["u1"], "features": []}, "feature_names"),
        ({"ids": ["u1"], "feature_set": "ad_activity"}, "feature_set"),
        ({"ids": ["u1"], "as_of_ms": -5}, "as_of_ms"),
        ({"ids": ["u0"], "as_of_ms": T0 - 7 * DAY}, "as_of_ms"),
    ],
)
def test_bad_requests_name_the_field(store: MemoryOnlineStore, request_kw: dict[str, Any],
                                     field: str) -> None:
    service = make_service(store)
    kw = {"entity_type": "user", **request_kw}
    with pytest.raises(InvalidArgument) as err:
        service.get_online_features(build_request(**kw))
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    assert InvalidArgument.grpc_status == "INVALID_ARGUMENT"


def test_feature_sets(store: MemoryOnlineStore) -> None:
    service = make_service(store)
    for name in ("", "all", "user_activity", "user_activity@1"):
        names = ask(service, "user", ["u1"], feature_set=name).feature_names
        assert names == REG.feature_names("user")
    with pytest.raises(InvalidArgument, match="^feature_names: "):  # not the cached "all"
        service.get_online_features(build_request("user", ["u1"], []))


def test_server_clock_behind_event_times_is_not_an_error(store: MemoryOnlineStore) -> None:
    service = make_service(store, now=T0 - DAY)  # events up to T0 are "in the future"
    ent = ask(service, "user", ["u0"]).entities[0]
    assert set(ent.statuses.values()) == {"PRESENT"}


def test_unreadable_state_is_a_fallback_never_a_cold_start(store: MemoryOnlineStore) -> None:
    # issue 13: it was served as a brand-new entity (DEFAULT, reason NONE)
    store.hset(entity_key(PREFIX, "ad", "bad"), VIEW_OF["ad"].view.id, b"\x01garbage")
    resp = ask(make_service(store), "ad", ["bad"])
    assert set(resp.entities[0].statuses.values()) == {"FALLBACK"}
    assert resp.fallback_reason == "CORRUPT_STATE"


PRIORS = Priors({"user__ctr_24h": 0.03}, {("US", "mobile"): {"user__ctr_24h": 0.07}})


def test_store_errors_fall_back_to_priors_then_the_breaker_opens(store: MemoryOnlineStore) -> None:
    timer = Timer()
    service = make_service(store, priors=PRIORS, timer=timer)
    store.fail = "connection refused"
    for _ in range(2):
        resp = service.get_online_features(build_request(
            "user", ["u0", "u1"], ["user__ctr_24h", "user__clicks_1h"], country="US",
            device_type="mobile"))
        assert resp.fallback_reason == pb.REDIS_ERROR
        assert list(resp.statuses) == [Status.FALLBACK] * 4
        assert list(resp.tiers) == [Tier.SEGMENT] * 2
        assert list(resp.values) == [0.07, 0.0, 0.07, 0.0]  # no prior for clicks: default 0
    assert service.breaker.state is BreakerState.OPEN
    m = service.metrics
    assert m.value("headrace_serving_breaker_state") == BreakerState.OPEN
    calls = store.calls
    resp = service.get_online_features(build_request("user", ["u0"]))
    assert resp.fallback_reason == pb.BREAKER_OPEN and store.calls == calls
    assert list(resp.tiers) == [Tier.GLOBAL]
    store.fail = None
    timer.now += 1.0  # breaker_reset_s
    resp = service.get_online_features(build_request("user", ["u0"]))
    assert resp.fallback_reason == pb.NONE and store.calls == calls + 1
    assert service.breaker.state is BreakerState.CLOSED
    assert m.value("headrace_serving_breaker_state") == BreakerState.CLOSED
    fallbacks = "headrace_serving_fallbacks_total"
    assert m.value(fallbacks, tier="SEGMENT", reason="REDIS_ERROR") == 4  # 2 requests x 2 ids
    assert m.value(fallbacks, tier="GLOBAL", reason="BREAKER_OPEN") == 1
    assert sum(m.value(fallbacks, tier=t.name, reason=r.name)
               for t in Tier for r in FallbackReason) == 5
    served = {t.name: m.value("headrace_serving_entities_total", entity="user", tier=t.name)
              for t in Tier}
    assert served == {"PERSONALIZED": 1, "BLENDED": 0, "SEGMENT": 4, "GLOBAL": 1}
    assert m.value("headrace_serving_redis_seconds_count") == 1  # the one completed read


def test_budget_overrun_is_a_fallback(store: MemoryOnlineStore) -> None:
    timer = Timer()
    service = make_service(store, priors=PRIORS, timer=timer)

    def slow(seconds: float) -> None:
        timer.now += seconds

    store._sleep = slow  # the fake's injectable sleep advances the pinned timer
    store.delay_s = 0.0101
    resp = service.get_online_features(build_request("user", ["u0"], ["user__ctr_24h"]))
    assert resp.fallback_reason == pb.BUDGET_EXCEEDED and list(resp.values) == [0.03]
    store.delay_s = 0.0099
    resp = service.get_online_features(build_request("user", ["u0"], ["user__ctr_24h"]))
    assert resp.fallback_reason == pb.NONE and list(resp.statuses) == [Status.PRESENT]
    m = service.metrics
    assert m.value("headrace_serving_fallbacks_total", tier="GLOBAL",
                   reason="BUDGET_EXCEEDED") == 1
    assert m.value("headrace_serving_redis_seconds_count") == 2  # an overrun is observed too
    assert m.value("headrace_serving_redis_seconds_sum") == pytest.approx(0.02)
    assert m.value("headrace_serving_breaker_state") == BreakerState.CLOSED  # 1 of 2 failures


def test_metrics_are_per_service(events: list[dict[str, Any]]) -> None:
    down, up = MemoryOnlineStore(), MemoryOnlineStore()
    load(down, events)
    load(up, events)
    failing, healthy = make_service(down), make_service(up)
    down.fail = "down"
    assert failing.get_online_features(build_request("ad", ["a0"])).fallback_reason \
        == pb.REDIS_ERROR
    assert healthy.get_online_features(build_request("ad", ["a0"])).fallback_reason == pb.NONE
    assert failing.metrics.registry is not healthy.metrics.registry
    key = ("headrace_serving_fallbacks_total", {"tier": "GLOBAL", "reason": "REDIS_ERROR"})
    assert failing.metrics.value(key[0], **key[1]) == 1
    assert healthy.metrics.value(key[0], **key[1]) == 0
    assert healthy.metrics.value("headrace_serving_entities_total", entity="ad",
                                 tier="PERSONALIZED") == 1
    assert failing.metrics.value("headrace_serving_entities_total", entity="ad",
                                 tier="PERSONALIZED") == 0


def test_priors_cache_keeps_last_good_priors() -> None:
    store = MemoryOnlineStore()
    cache = PriorsCache(store, PREFIX, metrics=ServingMetrics())
    errors = "headrace_serving_priors_refresh_errors_total"
    assert not cache.refresh() and cache.priors == Priors()
    assert cache.metrics.value(errors) == 0  # no document yet is not an error
    store.set(priors_key(PREFIX), PRIORS.to_json())
    assert cache.refresh() and cache.priors == PRIORS
    store.set(priors_key(PREFIX), "{broken")
    assert not cache.refresh() and cache.priors == PRIORS
    assert cache.metrics.value(errors) == 1
    store.fail = "down"
    assert not cache.refresh() and cache.priors == PRIORS
    assert cache.metrics.value(errors) == 2


def test_priors_age_gauge() -> None:
    store = MemoryOnlineStore()
    store.set(priors_key(PREFIX), Priors({"user__ctr_24h": 0.03}, computed_at_ms=T0).to_json())
    cache = PriorsCache(store, PREFIX, clock_ms=lambda: T0 + 90_000, metrics=ServingMetrics())
    assert cache.refresh()
    assert cache.metrics.value("headrace_serving_priors_age_seconds") == 90.0


def test_enum_numbers_match_the_proto() -> None:
    for status in Status:
        assert pb.FeatureStatus.Value(status.name) == status
    for tier in Tier:
        assert pb.ColdStartTier.Value(tier.name) == tier
    assert {r.name: int(r) for r in FallbackReason} == {
        n: pb.FallbackReason.Value(n) for n in pb.FallbackReason.keys()}


def test_memo_answers_equal_fresh_roll_ups(store: MemoryOnlineStore,
                                           events: list[dict[str, Any]]) -> None:
    memo = make_service(store, memo_entries=3)  # tiny: eviction runs too
    plain = make_service(store, memo_entries=0)
    rng = random.Random(5)
    for _ in range(120):
        entity = rng.choice(ENTITIES)
        ids = rng.sample(oracle.OracleIndex(events).ids(entity) + ["x"], 2)
        req = build_request(
            entity,
            ids,
            as_of_ms=T0
            + rng.choice([1, 2, 4_999, 5_000, 5_001, 60_000, 3_600_000, DAY, 2 * DAY, 8 * DAY]),
        )
        assert memo.get_online_features(req) == plain.get_online_features(req)


def test_memo_is_never_stale_after_a_write(store: MemoryOnlineStore) -> None:
    service = make_service(store)
    req = build_request("ad", ["a0"], ["ad__impressions_1h"], as_of_ms=T0 + 1)
    before = list(service.get_online_features(req).values)
    key = entity_key(PREFIX, "ad", "a0")
    st = ViewState.decode(VIEW_OF["ad"], store.hashes[key][VIEW_OF["ad"].view.id])
    st.apply("impressions", T0 - 10)
    store.hset(key, VIEW_OF["ad"].view.id, st.encode())
    assert list(service.get_online_features(req).values) == [before[0] + 1]


def test_several_views_of_one_entity_in_one_round_trip() -> None:
    from datetime import timedelta

    from feature_defs.model import AggOp, Feature, FeatureView, Measure, Source
    from feature_defs.registry import Registry
    from feature_defs.standard import USER, USER_ACTIVITY
    from feature_defs.windows import sliding

    bids = FeatureView(
        name="user_bids", entity=USER, sources=(Source("impressions", "impression"),),
        features=(Feature("bid_sum", (sliding(timedelta(hours=1), timedelta(minutes=1)),),
                          measure=Measure(AggOp.SUM, "impressions", "bid_cpm"), default=0.0),),
    )
    reg = Registry.build([USER_ACTIVITY, bids])
    store = MemoryOnlineStore()
    act, bid = ViewState(reg.plans["user_activity@1"]), ViewState(reg.plans["user_bids@1"])
    for i in range(150):
        ts = T0 - i * 10_000
        act.apply("impressions", ts, {"ad_id": f"a{i % 7}"})
        bid.apply("impressions", ts, {"bid_cpm": 0.1 * (i % 5)})
    store.hset(entity_key(PREFIX, "user", "both"), "user_activity@1", act.encode())
    store.hset(entity_key(PREFIX, "user", "both"), "user_bids@1", bid.encode())
    store.hset(entity_key(PREFIX, "user", "one"), "user_activity@1", act.encode())
    cache = PriorsCache(store, PREFIX)
    breaker = CircuitBreaker(clock=Timer())
    service = OnlineFeatureService(reg, OnlineReader(store, PREFIX), cache, breaker,
                                   clock_ms=lambda: T0 + 1)
    names = ["user__bid_sum_1h", "user__ctr_24h", "user__impressions_7d"]
    answer = ask(service, "user", ["both", "one"], features=names)
    assert store.calls == 1
    want = {**act.rollup(T0 + 1)[0], **bid.rollup(T0 + 1)[0]}
    both, one = answer.entities
    assert both.values == {n: want[n] for n in names} and both.tier == "PERSONALIZED"
    assert one.values == {**{n: want[n] for n in names}, "user__bid_sum_1h": 0.0}
    assert one.statuses == {"user__bid_sum_1h": "DEFAULT", "user__ctr_24h": "PRESENT",
                            "user__impressions_7d": "PRESENT"}


# ------------------------------------------------------------------ feature names
def test_repeated_feature_names_are_answered_once_in_first_seen_order(
    store: MemoryOnlineStore,
) -> None:
    service = make_service(store)
    once = ["user__clicks_1h", "user__ctr_24h", "user__impressions_7d"]
    repeated = ["user__clicks_1h", "user__ctr_24h", "user__clicks_1h", "user__impressions_7d",
                "user__ctr_24h", "user__clicks_1h"]
    want = service.get_online_features(build_request("user", ["u0", "u1"], once, as_of_ms=T0 + 1))
    got = service.get_online_features(build_request("user", ["u0", "u1"], repeated,
                                                    as_of_ms=T0 + 1))
    assert list(got.feature_names) == once
    assert got == want  # the same answer, value for value
    assert len(got.values) == 2 * len(once)


def test_a_bad_name_after_repeats_is_named_at_its_own_index(store: MemoryOnlineStore) -> None:
    service = make_service(store)
    names = ["user__ctr_24h", "user__ctr_24h", "user__ctr_24h", "nope"]
    with pytest.raises(InvalidArgument) as err:
        service.get_online_features(build_request("user", ["u1"], names))
    assert err.value.field == "feature_names[3]"


def test_feature_names_are_capped(store: MemoryOnlineStore) -> None:
    service = make_service(store)
    assert service.max_feature_names == MAX_FEATURE_NAMES == 1024  # > the known features
    at_cap = ["user__ctr_24h"] * MAX_FEATURE_NAMES
    resp = service.get_online_features(build_request("user", ["u1"], at_cap))
    assert list(resp.feature_names) == ["user__ctr_24h"]
    for n in (MAX_FEATURE_NAMES + 1, 100_000):
        with pytest.raises(InvalidArgument) as err:
            service.get_online_features(build_request("user", ["u1"], ["user__ctr_24h"] * n))
        assert err.value.field == "feature_names"
        assert str(err.value) == f"feature_names: {n} names exceed the limit of 1024"
    assert len(service._plans) == 1  # a rejected request leaves no cached plan


def test_the_name_cap_never_rejects_every_known_feature_once(store: MemoryOnlineStore) -> None:
    reader = OnlineReader(store, PREFIX)
    service = OnlineFeatureService(REG, reader, PriorsCache(store, PREFIX),
                                   CircuitBreaker(clock=Timer()), max_feature_names=1,
                                   clock_ms=lambda: T0 + 1)
    names = REG.feature_names("user")
    assert service.max_feature_names == len(REG.by_feature)
    assert list(service.get_online_features(build_request("user", ["u1"], names))
                .feature_names) == names
    with pytest.raises(InvalidArgument, match="^feature_names: "):
        service.get_online_features(
            build_request("user", ["u1"], names * (len(REG.by_feature) // len(names) + 1)))


# ------------------------------------------------------------------ Score bids
def _score_request(*bids: float) -> spb.ScoreRequest:
    req = spb.ScoreRequest(user_id="u1")
    for i, bid in enumerate(bids):
        req.candidates.add(ad_id=f"a{i}", campaign_id="c0", bid_cpm=bid)
    return req


def _parse(req: spb.ScoreRequest, **kw: Any) -> Any:
    return parse_score_request(req, max_candidates=200, clock_ms=lambda: T0, **kw)


@pytest.mark.parametrize(
    ("bad", "shown"),
    [(1e308, "1e+308"), (MAX_BID_CPM * (1 + 1e-12), "10000.0000"), (math.inf, "inf"),
     (-math.inf, "-inf"), (math.nan, "nan"), (-0.01, "-0.01")],
)
def test_bid_cpm_must_be_finite_and_within_the_cap(bad: float, shown: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _parse(_score_request(1.0, 2.5, bad, 3.0))
    assert err.value.field == "candidates[2].bid_cpm"
    assert str(err.value).startswith(
        "candidates[2].bid_cpm: must be a finite number from 0 to 10000 (CPM), got " + shown)


def test_bids_up_to_the_cap_are_accepted_and_the_cap_is_configurable() -> None:
    inp = _parse(_score_request(0.0, MAX_BID_CPM, 7.5))
    assert inp.bids.tolist() == [0.0, MAX_BID_CPM, 7.5]
    assert _parse(_score_request(50.0), max_bid_cpm=50.0).bids.tolist() == [50.0]
    with pytest.raises(InvalidArgument, match=r"^candidates\[1\]\.bid_cpm: .* from 0 to 50 "):
        _parse(_score_request(50.0, 50.5), max_bid_cpm=50.0)


def test_max_bid_cpm_setting() -> None:
    assert ServeSettings.from_env({}).max_bid_cpm == MAX_BID_CPM
    assert ServeSettings.from_env({"HEADRACE_MAX_BID_CPM": "250.5"}).max_bid_cpm == 250.5
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="max_bid_cpm"):
            ServeSettings.from_env({"HEADRACE_MAX_BID_CPM": bad})
