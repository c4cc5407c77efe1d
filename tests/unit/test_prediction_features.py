"""The feature row in the prediction log (schema id 2): ``Score`` logs, for each record,
the row its model scored for the candidate it ranked first — checked against the matrix
the booster actually received and against the brute-force oracle's feature values; an
error or a cold-start answer logs none; a shadow record logs the shadow model's row."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.coldstart import Priors
from feature_defs.layout import entity_key, priors_key
from feature_defs.predictions import Arm, decode_prediction, encode_prediction
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.core.online_store import MemoryOnlineStore
from headrace.model.artifact import LoadedModel
from headrace.model.booster import CategoryCodes
from headrace.model.coldstart import ColdStartModel
from headrace.rollout.split import SplitState, assign
from serving.breaker import CircuitBreaker
from serving.client import build_score_request
from serving.model_loader import ModelWatcher, ScoringModel
from serving.prediction_log import MemoryPredictionLog
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.scoring import ScoringService
from serving.split import AppliedSplit, StaticSplit
from tests import oracle

PREFIX = "hr"
T0 = 1_700_000_000_000
DAY = 86_400_000
REG = load_registry()
VIEW_OF = {p.view.entity.name: p for p in REG.plans.values()}
#: a mix of ad, user and request features; user__ctr_24h is null for a user without clicks
FEATURES = ("ad__impressions_24h", "user__ctr_24h", "bid_cpm", "ad__ctr_24h")


def _events() -> list[dict[str, Any]]:
    rng = random.Random(11)
    events = []
    for i in range(400):
        u = rng.randrange(3)
        events.append({"type": "click" if rng.random() < 0.1 else "impression",
                       "event_id": f"e{i}", "ts": T0 - int(rng.random() * DAY),
                       "user_id": f"u{u}", "ad_id": f"a{rng.randrange(5)}",
                       "campaign_id": f"c{rng.randrange(2)}", "publisher_id": "p0"})
    return sorted(events, key=lambda e: e["ts"])


EVENTS = _events()


def _store() -> MemoryOnlineStore:
    store = MemoryOnlineStore()
    states: dict[tuple[str, str], ViewState] = {}
    for e in EVENTS:
        for entity, key in oracle.ENTITY_KEYS.items():
            st = states.setdefault((entity, e[key]), ViewState(VIEW_OF[entity]))
            st.apply(oracle.TOPIC_OF[e["type"]], e["ts"], e)
    for (entity, eid), st in states.items():
        store.hset(entity_key(PREFIX, entity, eid), VIEW_OF[entity].view.id, st.encode())
    store.set(priors_key(PREFIX), Priors().to_json())  # no priors: served values are own
    return store


class Booster:
    """Records the matrices it is given; pCTR from ``fn``; raises when ``fail``."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], fail: bool = False) -> None:
        self.fn, self.fail = fn, fail
        self.calls: list[np.ndarray] = []

    def predict(self, x: np.ndarray, **_kw: Any) -> np.ndarray:
        self.calls.append(np.array(x))
        if self.fail and len(self.calls) > 1:  # the warm-up at load passes
            raise ValueError("broken booster")
        return self.fn(x)


def by_impressions(x: np.ndarray) -> np.ndarray:
    """pCTR falls with the ad's impressions (column 0): the ranking is not the bids'."""
    return 0.05 / (1.0 + np.nan_to_num(x[:, 0]))


def _service(tmp: Path, models: dict[str, LoadedModel], log: MemoryPredictionLog,
             store: MemoryOnlineStore | None = None, split: StaticSplit | None = None
             ) -> tuple[ScoringService, ModelWatcher[ScoringModel], MemoryOnlineStore]:
    store = store or _store()
    cache = PriorsCache(store, PREFIX)
    cache.refresh()
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, lambda m: ScoringModel.compile(m, REG), load=lambda _d, v: models[v])
    (tmp / "CHAMPION").write_text("v1\n")
    watcher.refresh()
    svc = ScoringService(REG, OnlineReader(store, PREFIX), cache, CircuitBreaker(), watcher,
                         predictions=log, split=split, clock_ms=lambda: T0 + 1)
    return svc, watcher, store


CANDS = [("a0", "c0", 1.5), ("a1", "c1", 2.0), ("new-ad", "c0", 0.7), ("a3", "c1", 3.0),
         ("a4", "c0", 1.0)]


def _request(user: str | None, rid: str = "r1") -> Any:
    r = build_score_request(user, [{"ad_id": a, "campaign_id": c, "bid_cpm": b}
                                   for a, c, b in CANDS],
                            {"publisher_id": "p0", "ts_ms": T0 + 1, "country": "US"})
    r.request_id = rid
    return r


def _oracle_row(user: str | None, i: int) -> list[float]:
    ad, campaign, bid = CANDS[i]
    row = {**(oracle.defaults("user") if user is None else
              oracle.features_as_of(EVENTS, "user", user, T0 + 1)),
           **oracle.features_as_of(EVENTS, "ad", ad, T0 + 1), "bid_cpm": bid}
    return [math.nan if row[f] is None else float(row[f]) for f in FEATURES]


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                               equal_nan=True))


@pytest.mark.parametrize("user", ["u0", "u1", None, "nobody"])
def test_the_logged_row_is_the_model_input_of_the_top_candidate(tmp_path: Path,
                                                                user: str | None) -> None:
    booster = Booster(by_impressions)
    log = MemoryPredictionLog()
    svc, _, _ = _service(tmp_path, {"v1": LoadedModel("v1", booster, FEATURES, {})}, log)
    resp = svc.score(_request(user))
    (rec,) = log.records
    top = resp.order[0]
    assert rec.ranks[top] == 0
    assert _same(rec.features, booster.calls[-1][top])  # what the booster scored
    want = _oracle_row(user, top)  # and, independently, the oracle's values
    assert len(rec.features) == len(FEATURES)
    for got, w, name in zip(rec.features, want, FEATURES, strict=True):
        assert (math.isnan(got) if math.isnan(w) else got == pytest.approx(w)), name
    # its own small array, not a view that would keep the whole matrix alive
    assert isinstance(rec.features, np.ndarray) and rec.features.base is None
    back = decode_prediction(encode_prediction(rec))  # NaN survives the wire
    assert _same(back.features, rec.features)


def test_a_null_feature_is_logged_as_nan(tmp_path: Path) -> None:
    log = MemoryPredictionLog()
    svc, _, _ = _service(tmp_path, {"v1": LoadedModel(
        "v1", Booster(by_impressions), FEATURES, {})}, log)
    svc.score(_request(None))  # anonymous: the user's ratio is null
    assert math.isnan(log.records[0].features[1])


def test_an_error_record_has_no_row_and_the_champion_logs_its_own(tmp_path: Path) -> None:
    v1 = Booster(by_impressions)
    v2 = Booster(by_impressions, fail=True)
    models = {"v1": LoadedModel("v1", v1, FEATURES, {}),
              "v2": LoadedModel("v2", v2, ("bid_cpm", "ad__impressions_24h"), {})}
    split = StaticSplit()
    log = MemoryPredictionLog()
    svc, watcher, _ = _service(tmp_path, models, log, split=split)
    split.current = AppliedSplit(SplitState(3, "r-1", "v1", "v2", 0.5, False, 1, 1),
                                 watcher.load("v2"), 0.5, False, "r-1", "applied")
    user = next(f"u{i}" for i in range(100) if assign("r-1", f"u{i}", 0.5))
    resp = svc.score(_request(user))
    error, served = log.records
    assert error.error is not None and error.arm is Arm.CHALLENGER and error.features == ()
    assert served.arm is Arm.CHAMPION and _same(served.features, v1.calls[-1][resp.order[0]])
    assert decode_prediction(encode_prediction(error)).features == ()


def test_a_shadow_record_logs_the_shadow_models_row(tmp_path: Path) -> None:
    v1 = Booster(lambda x: np.full(x.shape[0], 0.01))  # the champion ranks by bid
    v2 = Booster(lambda x: 0.05 / (1.0 + np.nan_to_num(x[:, 1])))  # by impressions
    models = {"v1": LoadedModel("v1", v1, FEATURES, {}),
              "v2": LoadedModel("v2", v2, ("bid_cpm", "ad__impressions_24h"), {})}
    split = StaticSplit()
    log = MemoryPredictionLog()
    svc, watcher, _ = _service(tmp_path, models, log, split=split)
    split.current = AppliedSplit(SplitState(3, "r-1", "v1", "v2", 0.0, True, 1, 1),
                                 watcher.load("v2"), 0.0, True, "r-1", "applied")
    svc.shadow.start()
    try:
        resp = svc.score(_request("u1"))
    finally:
        svc.shadow.stop()
    served, shadow = sorted(log.records, key=lambda r: r.shadow)
    assert shadow.shadow and shadow.model_version == "v2"
    assert _same(served.features, v1.calls[-1][resp.order[0]])
    top2 = list(shadow.ranks).index(0)  # the shadow model's own first candidate
    assert top2 != resp.order[0]  # (the two rankings differ here)
    assert _same(shadow.features, v2.calls[-1][top2])
    assert len(shadow.features) == 2
    assert shadow.features[0] == CANDS[top2][2]  # its bid_cpm, in v2's feature order


def _coldstart() -> ColdStartModel:
    codes = CategoryCodes({c: ("x",) for c in ("device_type", "placement", "creative_type",
                                               "country", "publisher_id")})
    return ColdStartModel(Booster(lambda x: np.full(x.shape[0], 0.02)), codes)


def test_a_cold_start_answer_has_no_row_a_priors_answer_has_the_priors(tmp_path: Path
                                                                        ) -> None:
    log = MemoryPredictionLog()
    main = Booster(by_impressions)
    (tmp_path / "a").mkdir()
    svc, _, store = _service(tmp_path / "a", {"v1": LoadedModel(
        "v1", main, FEATURES, {}, _coldstart())}, log)
    store.fail = "down"
    svc.score(_request("u1"))
    assert log.records[-1].error is None and log.records[-1].features == ()
    # without a cold-start model the booster scores the fallback values: those are logged
    (tmp_path / "b").mkdir()
    log2 = MemoryPredictionLog()
    store2 = _store()
    store2.set(priors_key(PREFIX), Priors(global_values={"ad__ctr_24h": 0.03}).to_json())
    svc2, _, _ = _service(tmp_path / "b", {"v1": LoadedModel("v1", main, FEATURES, {})},
                          log2, store=store2)
    store2.fail = "down"
    resp = svc2.score(_request("u1"))
    row = log2.records[-1].features
    assert _same(row, main.calls[-1][resp.order[0]])
    assert row[3] == 0.03 and row[2] == CANDS[resp.order[0]][2]
