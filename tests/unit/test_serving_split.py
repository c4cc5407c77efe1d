"""The traffic split in Score, without network: the split watcher on a fake Redis client,
the arm choice, prediction ids, shadow predictions and the records they log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.predictions import Arm
from feature_defs.registry import load_registry
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import InvalidArgument
from headrace.core.online_store import MemoryOnlineStore
from headrace.model.artifact import LoadedModel, ModelLoadError
from headrace.rollout.split import SplitState, ack_key, assign, split_key
from serving.breaker import CircuitBreaker
from serving.client import build_score_request
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.prediction_log import MemoryPredictionLog
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.scoring import ModelPredictError, ScoringService
from serving.split import AppliedSplit, SplitWatcher, StaticSplit

REG = load_registry()
PREFIX = "hr"


class Booster:
    """pCTR = ``scale`` x bid (the model's one feature); raises when ``fail``."""

    def __init__(self, scale: float, fail: bool = False) -> None:
        self.scale, self.fail = scale, fail

    def predict(self, x: np.ndarray, **_kw: Any) -> np.ndarray:
        if self.fail:
            raise ValueError("broken booster")
        return np.asarray(self.scale * np.nan_to_num(x[:, 0]), dtype=np.float64)


def loaded(version: str, scale: float, fail: bool = False) -> LoadedModel:
    return LoadedModel(version, Booster(scale, fail), ("bid_cpm",), {})


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int | None] = {}
        self.fail: BaseException | None = None

    def get(self, name: str) -> bytes | None:
        if self.fail is not None:
            raise self.fail
        return self.data.get(name)

    def set(self, name: str, value: str, ex: int | None = None) -> bool:
        if self.fail is not None:
            raise self.fail
        self.data[name], self.ttl[name] = value.encode(), ex
        return True


def state(seq: int, challenger: str | None = "v2", share: float = 0.5,
          shadow: bool = False) -> SplitState:
    return SplitState(seq, "r-1", "v1", challenger, share if challenger else 0.0, shadow,
                      1 if challenger else 0, 1)


def compile_(model: LoadedModel) -> ScoringModel:
    # a booster that raises must still load: predictions fail later, per request
    booster = model.booster
    if isinstance(booster, Booster) and booster.fail:
        booster.fail = False
        compiled = ScoringModel.compile(model, REG)
        booster.fail = True
        return compiled
    return ScoringModel.compile(model, REG)


def service(tmp: Path, split: Any, log: MemoryPredictionLog | None = None,
            versions: dict[str, LoadedModel] | None = None, shadow_queue: int = 256,
            ) -> tuple[ScoringService, ModelWatcher[ScoringModel]]:
    models = versions or {"v1": loaded("v1", 0.001), "v2": loaded("v2", 0.002)}
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, compile_, load=lambda _d, v: _load(models, v))
    (tmp / "CHAMPION").write_text("v1\n")
    watcher.refresh()
    store = MemoryOnlineStore()
    metrics = ServingMetrics()
    svc = ScoringService(REG, OnlineReader(store, PREFIX), PriorsCache(store, PREFIX),
                         CircuitBreaker(), watcher, metrics=metrics, split=split,
                         predictions=log, shadow_queue=shadow_queue,
                         clock_ms=lambda: 1_700_000_000_000)
    return svc, watcher


def _load(models: dict[str, LoadedModel], version: str) -> LoadedModel:
    if version not in models:
        raise ModelLoadError(f"no model {version}")
    return models[version]


def applied(svc: ScoringService, watcher: ModelWatcher[ScoringModel], share: float,
            shadow: bool = False, challenger: str = "v2") -> AppliedSplit:
    return AppliedSplit(state(3, challenger, share, shadow), watcher.load(challenger), share,
                        shadow, "r-1", "applied")


def req(user: str | None, request_id: str | None = None, n: int = 5) -> spb.ScoreRequest:
    r = build_score_request(user, [{"ad_id": f"a{i}", "campaign_id": f"c{i % 2}",
                                    "bid_cpm": 1.0 + i} for i in range(n)],
                            {"country": "US", "device_type": "mobile", "publisher_id": "p0"})
    if request_id is not None:
        r.request_id = request_id
    return r


# ---------------------------------------------------------------- the arm in Score
def test_arm_follows_the_sticky_assignment(tmp_path: Path) -> None:
    split = StaticSplit()
    svc, watcher = service(tmp_path, split)
    split.current = applied(svc, watcher, 0.3)
    arms = {}
    for i in range(300):
        user = f"u{i}"
        resp = svc.score(req(user))
        want = assign("r-1", user, 0.3)
        assert resp.arm == (spb.CHALLENGER if want else spb.CHAMPION)
        assert resp.model_version == ("v2" if want else "v1")
        assert resp.p_ctr[0] == pytest.approx((0.002 if want else 0.001) * 5.0)
        arms[user] = resp.arm
    assert 0.2 < sum(a == spb.CHALLENGER for a in arms.values()) / 300 < 0.4
    assert all(svc.score(req(u)).arm == a for u, a in list(arms.items())[:50])  # sticky
    m = svc.metrics
    assert m.value("headrace_scoring_arm_total", arm="CHALLENGER") == sum(
        a == spb.CHALLENGER for a in arms.values()) + sum(
        a == spb.CHALLENGER for a in list(arms.values())[:50])


def test_anonymous_requests_are_assigned_by_request_id(tmp_path: Path) -> None:
    split = StaticSplit()
    svc, watcher = service(tmp_path, split)
    split.current = applied(svc, watcher, 0.5)
    for i in range(100):
        rid = f"req-{i}"
        resp = svc.score(req(None, rid))
        assert resp.prediction_id == rid
        assert (resp.arm == spb.CHALLENGER) is assign("r-1", rid, 0.5)


def test_without_a_split_the_champion_answers_with_generated_ids(tmp_path: Path) -> None:
    svc, _ = service(tmp_path, None)
    ids = set()
    for _ in range(50):
        resp = svc.score(req("u1"))
        assert resp.arm == spb.CHAMPION and resp.model_version == "v1"
        ids.add(resp.prediction_id)
    assert len(ids) == 50 and all(" " not in i and "{" not in i for i in ids)
    assert svc.score(req("u1", "mine")).prediction_id == "mine"


@pytest.mark.parametrize(("rid", "why"), [("", "empty"), ("a b", "whitespace"),
                                          ("x" * 257, "longer"), ("{x}", "brace")])
def test_a_bad_request_id_is_invalid_argument(tmp_path: Path, rid: str, why: str) -> None:
    svc, _ = service(tmp_path, None)
    with pytest.raises(InvalidArgument) as err:
        svc.score(req("u1", rid))
    assert err.value.field == "request_id" and why in str(err.value)


def test_a_failing_challenger_is_answered_by_the_champion(tmp_path: Path) -> None:
    split = StaticSplit()
    log = MemoryPredictionLog()
    models = {"v1": loaded("v1", 0.001), "v2": loaded("v2", 0.002, fail=True)}
    svc, watcher = service(tmp_path, split, log, models)
    split.current = applied(svc, watcher, 0.5)
    user = next(f"u{i}" for i in range(100) if assign("r-1", f"u{i}", 0.5))
    resp = svc.score(req(user, "r1"))
    assert resp.arm == spb.CHAMPION and resp.model_version == "v1"
    error, served = log.records
    assert (error.arm, error.model_version, error.prediction_id) == (Arm.CHALLENGER, "v2", "r1")
    assert error.error and "broken booster" in error.error and list(error.p_ctr) == []
    assert (served.arm, served.error, served.prediction_id) == (Arm.CHAMPION, None, "r1")
    assert svc.metrics.value("headrace_scoring_predict_errors_total", arm="CHALLENGER") == 1
    models["v1"] = loaded("v1", 0.001, fail=True)  # a failing champion is an RPC error
    (tmp_path / "b").mkdir()
    svc2, _ = service(tmp_path / "b", None, None, models)
    with pytest.raises(ModelPredictError):
        svc2.score(req("u1"))


# ---------------------------------------------------------------- the prediction log
def test_every_answer_is_logged(tmp_path: Path) -> None:
    split = StaticSplit()
    log = MemoryPredictionLog()
    svc, watcher = service(tmp_path, split, log)
    split.current = applied(svc, watcher, 0.5)
    resp = svc.score(req("u7", "p-1", n=6))
    (rec,) = log.records
    assert rec.prediction_id == "p-1" and rec.user_id == "u7" and rec.publisher_id == "p0"
    assert (rec.country, rec.device_type, rec.placement, rec.creative_type) == (
        "US", "mobile", None, None)
    assert rec.ts == 1_700_000_000_000 and not rec.shadow and rec.error is None
    assert rec.arm == (Arm.CHALLENGER if resp.arm == spb.CHALLENGER else Arm.CHAMPION)
    assert rec.model_version == resp.model_version and rec.chosen_rank == 0
    assert list(rec.ad_ids) == [f"a{i}" for i in range(6)]
    assert list(rec.campaign_ids) == [f"c{i % 2}" for i in range(6)]
    ranked = {a: p for a, p in zip(resp.ad_ids, resp.p_ctr, strict=True)}
    assert [ranked[a] for a in rec.ad_ids] == list(rec.p_ctr)
    assert [list(resp.order).index(i) for i in range(6)] == list(rec.ranks)
    assert rec.latency_ms >= 0


def test_shadow_predictions_are_logged_beside_the_served_ones(tmp_path: Path) -> None:
    split = StaticSplit()
    log = MemoryPredictionLog()
    svc, watcher = service(tmp_path, split, log)
    split.current = applied(svc, watcher, 0.0, shadow=True)
    svc.shadow.start()
    try:
        for i in range(20):
            assert svc.score(req(f"u{i}", f"q{i}")).arm == spb.CHAMPION
    finally:
        svc.shadow.stop()
    served = {r.prediction_id: r for r in log.records if not r.shadow}
    shadow = {r.prediction_id: r for r in log.records if r.shadow}
    assert set(served) == set(shadow) == {f"q{i}" for i in range(20)}
    for pid, rec in shadow.items():
        assert (rec.arm, rec.model_version, rec.error) == (Arm.CHALLENGER, "v2", None)
        assert list(rec.p_ctr) == pytest.approx([2 * p for p in served[pid].p_ctr])
        top = list(served[pid].ranks).index(0)
        assert rec.chosen_rank == rec.ranks[top]
    assert svc.metrics.value("headrace_scoring_shadow_total", outcome="scored") == 20


def test_a_full_shadow_queue_drops_and_never_blocks(tmp_path: Path) -> None:
    split = StaticSplit()
    svc, watcher = service(tmp_path, split, MemoryPredictionLog(), shadow_queue=3)
    split.current = applied(svc, watcher, 0.0, shadow=True)
    for i in range(10):  # the shadow thread is not started: nothing is taken off the queue
        svc.score(req(f"u{i}"))
    assert svc.metrics.value("headrace_scoring_shadow_total", outcome="dropped") == 7
    assert svc.shadow.pending == 3


# ---------------------------------------------------------------- the watcher
def watcher_for(tmp: Path, client: FakeRedis, models: dict[str, LoadedModel] | None = None,
                clock: Callable[[], float] = time.monotonic) -> SplitWatcher:
    models = models or {"v1": loaded("v1", 0.001), "v2": loaded("v2", 0.002)}
    champion: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, compile_, load=lambda _d, v: _load(models, v))
    return SplitWatcher(client, PREFIX, "s-1", champion.load, poll_s=0.01,
                        clock_ms=lambda: 42, clock=clock)


def test_watcher_applies_and_acknowledges(tmp_path: Path) -> None:
    client = FakeRedis()
    w = watcher_for(tmp_path, client)
    assert w.poll().reason == "none" and w.current.challenger is None
    assert json.loads(client.data[ack_key(PREFIX, "s-1")]) == {
        "seq": -1, "applied_ms": 42, "share": 0.0, "challenger": None}
    client.data[split_key(PREFIX)] = state(5, share=0.1, shadow=True).to_json().encode()
    cur = w.poll()
    assert cur.challenger is not None and cur.challenger.version == "v2"
    assert (cur.share, cur.shadow, cur.rollout_id, cur.reason) == (0.1, True, "r-1", "applied")
    assert client.ttl[ack_key(PREFIX, "s-1")] == 10
    assert json.loads(client.data[ack_key(PREFIX, "s-1")]) == {
        "seq": 5, "applied_ms": 42, "share": 0.1, "challenger": "v2"}
    assert w.poll() is cur  # unchanged: the same object
    client.data[split_key(PREFIX)] = state(6, challenger=None).to_json().encode()
    assert w.poll().challenger is None  # rollback
    assert w.metrics.value("headrace_rollout_split_seq") == 6
    assert w.metrics.value("headrace_rollout_split_share") == 0


def test_redis_outage_serves_the_champion_until_it_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = FakeRedis()
    client.data[split_key(PREFIX)] = state(5).to_json().encode()
    w = watcher_for(tmp_path, client)
    first = w.poll()
    assert first.share == 0.5
    client.fail = RedisTimeoutError("Timeout reading from socket")
    with caplog.at_level(logging.WARNING, "serving.split"):
        for _ in range(3):
            cur = w.poll()
            assert cur.challenger is None and cur.share == 0.0 and cur.reason == "redis"
        assert w.metrics.value("headrace_rollout_split_redis_available") == 0
        assert w.metrics.value("headrace_rollout_split_errors_total", reason="redis") == 3
        client.fail = None
        back = w.poll()
    assert back.challenger is first.challenger and back.share == 0.5  # no reload
    assert w.metrics.value("headrace_rollout_split_redis_available") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "redis unavailable" in warnings[0] and "100 % champion" in warnings[0]
    assert "available again" in warnings[1]


def test_invalid_documents_and_unloadable_challengers_serve_the_champion(
        tmp_path: Path) -> None:
    client = FakeRedis()
    now = [0.0]
    w = watcher_for(tmp_path, client, clock=lambda: now[0])
    client.data[split_key(PREFIX)] = b'{"seq": 1}'
    assert w.poll().reason == "invalid" and w.current.challenger is None
    assert w.metrics.value("headrace_rollout_split_errors_total", reason="invalid") == 1
    client.data[split_key(PREFIX)] = state(2, challenger="v9").to_json().encode()
    assert w.poll().reason == "challenger_load" and w.current.share == 0.0
    assert w.poll().reason == "challenger_load"  # not retried before RETRY_LOAD_S
    assert w.metrics.value("headrace_rollout_split_errors_total",
                           reason="challenger_load") == 1
    assert json.loads(client.data[ack_key(PREFIX, "s-1")])["share"] == 0.0
    client.data[split_key(PREFIX)] = state(3).to_json().encode()
    assert w.poll().share == 0.5


def test_watcher_thread_applies_a_change(tmp_path: Path) -> None:
    client = FakeRedis()
    w = watcher_for(tmp_path, client)
    w.start()
    try:
        client.data[split_key(PREFIX)] = state(9, share=0.2).to_json().encode()
        deadline = time.monotonic() + 2
        while w.current.share != 0.2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        w.stop()
