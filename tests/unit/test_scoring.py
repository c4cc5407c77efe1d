"""ScoringService on the fake online store: ranking, feature layout vs the brute-force
oracle, bad requests naming the field, the cold-start fallback, and hot reload under
concurrent calls."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.coldstart import Priors
from feature_defs.layout import entity_key, priors_key
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import scoring_pb2 as spb
from headrace.commands.score import parse_ad
from headrace.core.errors import InvalidArgument
from headrace.core.online_store import MemoryOnlineStore
from headrace.model.artifact import LoadedModel, load_model, set_champion, write_artifact
from headrace.model.booster import CategoryCodes
from headrace.model.coldstart import ColdStartModel
from serving.breaker import CircuitBreaker
from serving.client import build_score_request, ranked_candidates
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.scoring import ModelUnavailable, ScoringService, model_watcher
from serving.server import status_of
from tests import oracle

PREFIX = "hr"
T0 = 1_700_000_000_000
DAY = 86_400_000
REG = load_registry()
VIEW_OF = {p.view.entity.name: p for p in REG.plans.values()}
SERVED = REG.feature_names()


def make_events(seed: int = 5, users: int = 4, n: int = 700) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        u = rng.randrange(users)
        events.append({"type": "click" if rng.random() < 0.1 else "impression",
                       "event_id": f"e{i}", "ts": T0 - int(rng.random() ** 2 * (u + 1) * DAY),
                       "user_id": f"u{u}", "ad_id": f"a{rng.randrange(6)}",
                       "campaign_id": f"c{rng.randrange(3)}", "publisher_id": "p0"})
    return sorted(events, key=lambda e: e["ts"])


EVENTS = make_events()


def load_store(events: list[dict[str, Any]],
               sleep: Callable[[float], object] = time.sleep) -> MemoryOnlineStore:
    store = MemoryOnlineStore(sleep=sleep)
    states: dict[tuple[str, str], ViewState] = {}
    for e in events:
        for entity, key in oracle.ENTITY_KEYS.items():
            st = states.setdefault((entity, e[key]), ViewState(VIEW_OF[entity]))
            st.apply(oracle.TOPIC_OF[e["type"]], e["ts"], e)
    for (entity, eid), st in states.items():
        store.hset(entity_key(PREFIX, entity, eid), VIEW_OF[entity].view.id, st.encode())
    return store


class FakeBooster:
    """Records every call; ``fn(x)`` gives the probabilities."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn = fn
        self.calls: list[tuple[np.ndarray, dict[str, Any]]] = []

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        self.calls.append((np.array(x), kwargs))
        return self.fn(x)


class Timer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def service_for(store: MemoryOnlineStore, models: dict[str, LoadedModel], tmp: Path, *,
                priors: Priors | None = None, timer: Timer | None = None) -> ScoringService:
    if priors is not None:
        store.set(priors_key(PREFIX), priors.to_json())
    metrics = ServingMetrics()  # this test's own: exact counts
    cache = PriorsCache(store, PREFIX, metrics=metrics)
    cache.refresh()
    timer = timer or Timer()
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, lambda m: ScoringModel.compile(m, REG), load=lambda _d, v: models[v])
    if models:
        (tmp / "CHAMPION").write_text(next(iter(models)) + "\n")
    watcher.refresh()
    return ScoringService(REG, OnlineReader(store, PREFIX), cache,
                          CircuitBreaker(failures=2, reset_s=1.0, clock=timer), watcher,
                          budget_ms=10.0, clock_ms=lambda: T0 + 1, timer=timer, metrics=metrics)


def request(user: str | None, cands: list[tuple[str, str, float]], **ctx: Any
            ) -> spb.ScoreRequest:
    return build_score_request(user, [{"ad_id": a, "campaign_id": c, "bid_cpm": b}
                                      for a, c, b in cands], ctx)


def expected(events: list[dict[str, Any]], entity: str, eid: str | None,
             as_of: int) -> dict[str, Any]:
    if eid is None:
        return oracle.defaults(entity)
    return oracle.features_as_of(events, entity, eid, as_of)


# ---------------------------------------------------------------- ranking and layout
def test_candidates_are_ranked_by_ecpm_with_ties_in_request_order(tmp_path: Path) -> None:
    def p_of(x: np.ndarray) -> np.ndarray:  # column 0 is ad__impressions_24h
        return 0.05 / (1.0 + np.nan_to_num(x[:, 0]))

    booster = FakeBooster(p_of)
    model = LoadedModel("v1", booster, ("ad__impressions_24h", "bid_cpm"), {})
    svc = service_for(load_store(EVENTS), {"v1": model}, tmp_path)
    cands = [("a0", "c0", 2.0), ("a1", "c1", 1.0), ("zz", "c0", 3.0), ("a0", "c0", 2.0),
             ("a2", "c2", 0.0), ("a3", "c1", 5.0), ("a1", "c1", 1.0)]
    resp = svc.score(request("u1", cands, ts_ms=T0 + 1))
    p = [0.05 / (1 + expected(EVENTS, "ad", a, T0 + 1)["ad__impressions_24h"])
         for a, _, _ in cands]
    ecpm = [pi * b * 1000 for pi, (_, _, b) in zip(p, cands, strict=True)]
    want = sorted(range(len(cands)), key=lambda i: (-ecpm[i], i))
    assert list(resp.order) == want
    assert list(resp.ad_ids) == [cands[i][0] for i in want]
    assert list(resp.p_ctr) == pytest.approx([p[i] for i in want], rel=1e-12)
    assert list(resp.ecpm) == pytest.approx([ecpm[i] for i in want], rel=1e-12)
    assert resp.model_version == "v1" and resp.source == spb.MODEL
    assert len(booster.calls) == 2  # the warm-up at load, then ONE call for all candidates
    assert booster.calls[1][0].shape == (len(cands), 2)
    assert booster.calls[1][1] == {"num_threads": 1}
    ranked = ranked_candidates(request("u1", cands), resp)
    assert [r["index"] for r in ranked] == want and ranked[0]["rank"] == 1
    assert ranked[0]["ecpm"] == max(ecpm) and ranked[0]["tier"] in pb.ColdStartTier.keys()


def test_feature_vector_is_in_the_model_feature_order(tmp_path: Path) -> None:
    features = [*SERVED, "hour_of_day", "day_of_week", "bid_cpm"]
    random.Random(3).shuffle(features)
    booster = FakeBooster(lambda x: np.full(x.shape[0], 0.01))
    store = load_store(EVENTS)
    svc = service_for(store, {"v1": LoadedModel("v1", booster, tuple(features), {})},
                      tmp_path, priors=Priors())  # no priors: the served values are own values
    as_of = T0 + 3_600_000 + 1
    cands = [("a0", "c0", 1.5), ("a5", "c2", 2.0), ("new-ad", "c9", 0.5), ("a0", "c1", 3.0)]
    for user, publisher in (("u2", "p0"), (None, None), ("nobody", "p-new")):
        before = store.calls
        ctx = {"ts_ms": as_of} | ({"publisher_id": publisher} if publisher else {})
        svc.score(request(user, cands, **ctx))
        assert store.calls == before + 1  # user, ads, campaigns and publisher: ONE round trip
        x = booster.calls[-1][0]
        assert x.shape == (len(cands), len(features))
        when = datetime.fromtimestamp(as_of / 1000, UTC)
        for i, (ad, campaign, bid) in enumerate(cands):
            row = {**expected(EVENTS, "user", user, as_of), **expected(EVENTS, "ad", ad, as_of),
                   **expected(EVENTS, "campaign", campaign, as_of),
                   **expected(EVENTS, "publisher", publisher, as_of),
                   "hour_of_day": when.hour, "day_of_week": when.weekday(), "bid_cpm": bid}
            for j, name in enumerate(features):
                want = row[name]
                got = x[i, j]
                assert (math.isnan(got) if want is None else got == pytest.approx(want)), \
                    (user, ad, name, got, want)


def test_cold_start_tiers_are_reported_per_candidate(tmp_path: Path) -> None:
    priors = Priors(global_values={"user__ctr_24h": 0.02, "ad__ctr_24h": 0.03},
                    segments={("US", "mobile"): {"user__ctr_24h": 0.05}})
    features = ("user__ctr_24h", "ad__ctr_24h")
    booster = FakeBooster(lambda x: np.full(x.shape[0], 0.01))
    svc = service_for(load_store(EVENTS), {"v1": LoadedModel("v1", booster, features, {})},
                      tmp_path, priors=priors)
    resp = svc.score(request(None, [("a0", "c0", 1.0), ("unseen", "c0", 1.0)],
                             country="US", device_type="mobile"))
    assert resp.user_tier == pb.GLOBAL  # anonymous
    x = booster.calls[-1][0]
    assert list(x[:, 0]) == [0.02, 0.02] and x[1, 1] == 0.03  # global priors
    assert list(resp.tiers) == [pb.GLOBAL, pb.GLOBAL]
    svc.score(request("new-user", [("a0", "c0", 1.0)], country="US", device_type="mobile"))
    assert booster.calls[-1][0][0, 0] == 0.05  # a user without history: the segment prior
    heavy = max({e["user_id"] for e in EVENTS},
                key=lambda u: sum(e["user_id"] == u for e in EVENTS))
    resp = svc.score(request(heavy, [("a0", "c0", 1.0)], country="US", device_type="mobile"))
    assert resp.user_tier == pb.PERSONALIZED and list(resp.tiers) == [pb.PERSONALIZED]


# ---------------------------------------------------------------- bad requests
def _with_unknown(where: str) -> Callable[[spb.ScoreRequest], None]:
    def mutate(req: spb.ScoreRequest) -> None:
        target: Any = {"request": req, "context": req.context}.get(where, req.candidates[2])
        target.MergeFromString(b"\x78\x01")  # field 15, varint 1: unknown everywhere

    return mutate


def _set_candidate(i: int, **kw: Any) -> Callable[[spb.ScoreRequest], None]:
    def mutate(req: spb.ScoreRequest) -> None:
        for k, v in kw.items():
            setattr(req.candidates[i], k, v)

    return mutate


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r.ClearField("candidates"), "candidates"),
    (lambda r: [r.candidates.add(ad_id="a", campaign_id="c", bid_cpm=1) for _ in range(200)],
     "candidates"),
    (_set_candidate(3, ad_id="bad id"), "candidates[3].ad_id"),
    (_set_candidate(1, ad_id=""), "candidates[1].ad_id"),
    (_set_candidate(2, campaign_id="{c}"), "candidates[2].campaign_id"),
    (_set_candidate(3, bid_cpm=-0.5), "candidates[3].bid_cpm"),
    (_set_candidate(0, bid_cpm=math.nan), "candidates[0].bid_cpm"),
    (_set_candidate(4, bid_cpm=math.inf), "candidates[4].bid_cpm"),
    (_set_candidate(1, bid_cpm=1e308), "candidates[1].bid_cpm"),
    (lambda r: setattr(r, "user_id", "u\n1"), "user_id"),
    (lambda r: setattr(r.context, "publisher_id", "p 0"), "context.publisher_id"),
    (lambda r: setattr(r.context, "ts_ms", -1), "context.ts_ms"),
    (_with_unknown("request"), "request"),
    (_with_unknown("context"), "context"),
    (_with_unknown("candidate"), "candidates[2]"),
])
def test_bad_requests_name_the_field(tmp_path: Path, mutate: Callable[[spb.ScoreRequest], Any],
                                     field: str) -> None:
    booster = FakeBooster(lambda x: np.full(x.shape[0], 0.01))
    svc = service_for(MemoryOnlineStore(), {"v1": LoadedModel("v1", booster, ("bid_cpm",), {})},
                      tmp_path)
    req = request("u1", [(f"a{i}", "c0", 1.0) for i in range(5)])
    ok = svc.score(req)  # a model on bid_cpm alone: no entity to read, no round trip
    assert len(ok.order) == 5 and list(ok.tiers) == [pb.GLOBAL] * 5 and ok.user_tier == 0
    mutate(req)
    with pytest.raises(InvalidArgument) as info:
        svc.score(req)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert len(booster.calls) == 2  # the warm-up and the good request: nothing more


def test_the_service_applies_its_bid_cap(tmp_path: Path) -> None:
    booster = FakeBooster(lambda x: np.full(x.shape[0], 0.01))
    svc = service_for(MemoryOnlineStore(), {"v1": LoadedModel("v1", booster, ("bid_cpm",), {})},
                      tmp_path)
    svc.max_bid_cpm = 50.0
    assert len(svc.score(request("u1", [("a0", "c0", 50.0)])).order) == 1
    with pytest.raises(InvalidArgument) as info:
        svc.score(request("u1", [("a0", "c0", 1.0), ("a1", "c0", 50.5)]))
    assert info.value.field == "candidates[1].bid_cpm"


def test_no_model_is_failed_precondition(tmp_path: Path) -> None:
    svc = service_for(MemoryOnlineStore(), {}, tmp_path)
    with pytest.raises(ModelUnavailable, match="no champion model") as info:
        svc.score(request("u1", [("a0", "c0", 1.0)]))
    assert status_of(info.value).name == "FAILED_PRECONDITION"


def test_client_names_bad_fields_before_sending() -> None:
    with pytest.raises(InvalidArgument) as info:
        build_score_request("u", [{"ad_id": "a", "campaign_id": "c", "bid": 1.0}])
    assert info.value.field == "candidates[0].bid"
    with pytest.raises(InvalidArgument) as info:
        build_score_request("u", [{"ad_id": "a", "campaign_id": "c", "bid_cpm": "x"}])
    assert info.value.field == "candidates[0].bid_cpm"
    with pytest.raises(InvalidArgument) as info:
        build_score_request("u", [], {"region": "EU"})
    assert info.value.field == "context.region"
    assert parse_ad("ad:1:cmp:2.5") == {"ad_id": "ad:1", "campaign_id": "cmp", "bid_cpm": 2.5}
    for bad in ("a:b", "a::1", "a:b:x"):
        with pytest.raises(Exception, match="AD:CAMPAIGN:BID|not a number"):
            parse_ad(bad)


# ---------------------------------------------------------------- fallback
def _coldstart() -> tuple[ColdStartModel, FakeBooster]:
    booster = FakeBooster(lambda x: 0.01 + 0.001 * np.nan_to_num(x[:, 0]))  # by hour of day
    codes = CategoryCodes({c: ("x",) for c in ("device_type", "placement", "creative_type",
                                               "country", "publisher_id")})
    return ColdStartModel(booster, codes), booster


def test_fallback_is_answered_by_the_coldstart_model(tmp_path: Path) -> None:
    cold, cold_booster = _coldstart()
    main = FakeBooster(lambda x: np.full(x.shape[0], 0.5))
    timer = Timer()
    # the read "takes" delay_s on the pinned timer
    store = load_store(EVENTS, sleep=lambda s: setattr(timer, "now", timer.now + s))
    svc = service_for(store, {"v1": LoadedModel("v1", main, ("ad__ctr_24h",), {}, cold)},
                      tmp_path, timer=timer)
    ts = T0 + 7 * 3_600_000  # hour of day = (T0 // 3_600_000 + 7) % 24
    hour = (ts // 3_600_000) % 24
    req = request("u1", [("a0", "c0", 1.0), ("a1", "c1", 2.0)], ts_ms=ts, device_type="x")
    assert svc.score(req).source == spb.MODEL
    main_calls = len(main.calls)
    for delay, fail, reason in ((0.02, None, pb.BUDGET_EXCEEDED), (0.0, "down", pb.REDIS_ERROR),
                                (0.0, None, pb.BREAKER_OPEN)):
        store.delay_s, store.fail = delay, fail
        resp = svc.score(req)
        assert resp.source == spb.COLDSTART_MODEL and resp.fallback_reason == reason
        assert list(resp.p_ctr) == pytest.approx([0.01 + 0.001 * hour] * 2)
        assert list(resp.order) == [1, 0]  # same pCTR: the higher bid wins
        assert list(resp.tiers) == [pb.GLOBAL, pb.GLOBAL]
        assert cold_booster.calls[-1][0].shape == (1, 7)  # one row, one call
    assert len(main.calls) == main_calls  # the main model was not asked
    m = svc.metrics
    for name in ("BUDGET_EXCEEDED", "REDIS_ERROR", "BREAKER_OPEN"):
        assert m.value("headrace_scoring_fallbacks_total", reason=name,
                       source="COLDSTART_MODEL") == 1
        assert m.value("headrace_scoring_fallbacks_total", reason=name, source="MODEL") == 0
    assert m.value("headrace_scoring_seconds_count", source="MODEL") == 1
    assert m.value("headrace_scoring_seconds_count", source="COLDSTART_MODEL") == 3
    # the good read and the overrun completed; the failed read and the refused one did not
    assert m.value("headrace_serving_redis_seconds_count") == 2
    assert m.value("headrace_serving_redis_seconds_sum") == pytest.approx(0.02)


def test_fallback_without_a_coldstart_model_uses_the_priors(tmp_path: Path) -> None:
    main = FakeBooster(lambda x: np.full(x.shape[0], 0.02))
    store = load_store(EVENTS)
    priors = Priors(global_values={"ad__ctr_24h": 0.03})
    svc = service_for(store, {"v1": LoadedModel("v1", main, ("ad__ctr_24h",), {})}, tmp_path,
                      priors=priors)
    store.fail = "down"
    resp = svc.score(request("u1", [("a0", "c0", 1.0)]))
    assert resp.source == spb.MODEL and resp.fallback_reason == pb.REDIS_ERROR
    assert main.calls[-1][0].tolist() == [[0.03]]
    m = svc.metrics
    assert m.value("headrace_scoring_fallbacks_total", reason="REDIS_ERROR", source="MODEL") == 1
    assert m.value("headrace_scoring_seconds_count", source="MODEL") == 1
    assert m.value("headrace_serving_redis_seconds_count") == 0


def test_metrics_are_per_service(tmp_path: Path) -> None:
    models = {"v1": LoadedModel("v1", FakeBooster(lambda x: np.full(x.shape[0], 0.02)),
                                ("ad__ctr_24h",), {})}
    down, up = load_store(EVENTS), load_store(EVENTS)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    failing = service_for(down, models, tmp_path / "a")
    healthy = service_for(up, models, tmp_path / "b")
    down.fail = "down"
    req = request("u1", [("a0", "c0", 1.0)])
    assert failing.score(req).fallback_reason == pb.REDIS_ERROR
    assert healthy.score(req).fallback_reason == pb.NONE
    assert failing.metrics.registry is not healthy.metrics.registry
    assert failing.metrics.value("headrace_scoring_fallbacks_total", reason="REDIS_ERROR",
                                 source="MODEL") == 1
    assert healthy.metrics.value("headrace_scoring_fallbacks_total", reason="REDIS_ERROR",
                                 source="MODEL") == 0
    assert healthy.metrics.value("headrace_serving_redis_seconds_count") == 1
    assert failing.metrics.value("headrace_serving_redis_seconds_count") == 0


# ---------------------------------------------------------------- hot reload
def _train(models_dir: Path, features: list[str], seed: int) -> str:
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    x = rng.random((400, len(features)))
    y = (rng.random(400) < 0.1 + 0.3 * x[:, seed % len(features)]).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1,
                         "seed": seed}, lgb.Dataset(x, y, feature_name=features), 10)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({"features": features}))

    return write_artifact(models_dir, datetime(2024, 5, 1, 13, tzinfo=UTC), fill)[0]


def test_hot_reload_swaps_the_model_under_concurrent_calls(tmp_path: Path) -> None:
    features = ["ad__ctr_24h", "ad__impressions_24h", "user__clicks_7d", "bid_cpm"]
    v1, v2 = _train(tmp_path, features, 1), _train(tmp_path, features, 2)
    set_champion(tmp_path, v1)
    loading = threading.Event()

    def slow_load(d: Path, v: str) -> LoadedModel:
        loading.set()
        time.sleep(0.5)  # requests keep the old model while the new one loads
        return load_model(d, v)

    store = load_store(EVENTS)
    cache = PriorsCache(store, PREFIX)
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp_path, lambda m: ScoringModel.compile(m, REG), poll_s=0.01, load=slow_load)
    svc = ScoringService(REG, OnlineReader(store, PREFIX), cache, CircuitBreaker(), watcher)
    watcher.start()
    req = request("u1", [(f"a{i % 6}", f"c{i % 3}", 1.0 + i % 4) for i in range(50)])
    x = svc.feature_matrix(req)[1]
    p_of = {v: np.sort(load_model(tmp_path, v).booster.predict(x)) for v in (v1, v2)}
    assert not np.allclose(p_of[v1], p_of[v2])
    seen: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller(k: int) -> None:
        while not stop.is_set():
            try:
                resp = svc.score(req)
                # every answer comes from ONE model: its pCTRs are exactly that model's
                if not np.allclose(np.sort(resp.p_ctr), p_of[resp.model_version]):
                    raise AssertionError(f"mixed answer from {resp.model_version}")
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)
                return
            seen[k].append(resp.model_version)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.2)
        loading.clear()
        set_champion(tmp_path, v2)
        assert loading.wait(2)
        during = [len(s) for s in seen]
        deadline = time.monotonic() + 10
        while any(not s or s[-1] != v2 for s in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        watcher.stop()
    assert errors == []
    assert watcher.current is not None and watcher.current.version == v2
    while_loading = 0
    for s, n in zip(seen, during, strict=True):
        first_new = s.index(v2)
        assert set(s[:first_new]) == {v1} and set(s[first_new:]) == {v2}  # one swap, no flip
        while_loading += first_new - n
    assert while_loading > 0  # calls made while v2 was loading were answered by v1


def test_model_watcher_counts_reloads_in_its_server_metrics(tmp_path: Path) -> None:
    features = ["ad__ctr_24h", "bid_cpm"]
    v1 = _train(tmp_path, features, 1)
    set_champion(tmp_path, v1)
    m = ServingMetrics()
    watcher = model_watcher(tmp_path, REG, metrics=m)
    assert watcher.refresh()
    assert m.value("headrace_scoring_model_reloads_total", outcome="ok") == 1
    assert m.value("headrace_scoring_model_info", version=v1) == 1
    set_champion(tmp_path, _train(tmp_path, ["ip", "bid_cpm"], 2))  # cannot be served
    assert not watcher.refresh()
    assert m.value("headrace_scoring_model_reloads_total", outcome="error") == 1
    v3 = _train(tmp_path, features, 3)
    set_champion(tmp_path, v3)
    assert watcher.refresh()
    assert m.value("headrace_scoring_model_reloads_total", outcome="ok") == 2
    assert m.value("headrace_scoring_model_info", version=v3) == 1
    assert m.registry.get_sample_value("headrace_scoring_model_info", {"version": v1}) is None


def test_a_model_that_cannot_load_keeps_the_current_one(tmp_path: Path) -> None:
    features = ["ad__ctr_24h", "bid_cpm"]
    v1 = _train(tmp_path, features, 1)
    set_champion(tmp_path, v1)
    errors: list[str] = []
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp_path, lambda m: ScoringModel.compile(m, REG), on_error=errors.append)
    assert watcher.refresh() and watcher.current is not None
    bad = _train(tmp_path, ["ip", "bid_cpm"], 2)  # a raw column the server cannot produce
    set_champion(tmp_path, bad)
    assert not watcher.refresh() and watcher.current.version == v1
    assert "cannot produce: ip" in errors[-1]
    broken = _train(tmp_path, features, 3)
    (tmp_path / broken / "model.txt").write_text("not a model")
    set_champion(tmp_path, broken)
    assert not watcher.refresh() and watcher.current.version == v1 and len(errors) == 2
    assert not watcher.refresh() and len(errors) == 2  # a failed version is not retried
