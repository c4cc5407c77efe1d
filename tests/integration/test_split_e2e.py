"""The traffic split, shadow mode and the prediction log on the real local services: a
real server (``build_server``) with two real LightGBM versions, the stack's redis-server
(or a private one to freeze) and the stack's Kafka-protocol broker.

Arms are checked against the spec's formula (:func:`headrace.rollout.split.assign`),
predictions against each version's booster loaded here, records by decoding the topic.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.layout import TOPIC_PREDICTIONS, partition_for
from feature_defs.predictions import Arm, PredictionRecord, decode_prediction
from headrace.core.settings import ServeSettings
from headrace.model.artifact import load_model, set_champion, write_artifact
from headrace.rollout.split import SplitState, ack_key, assign, split_key
from serving.client import FeatureClient, build_score_request
from serving.server import FeatureServer, build_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

USERS = [f"u{i}" for i in range(40)]
ROLLOUT = "r-e2e"
#: correctness tests must not turn into fallbacks when a loaded CI machine stalls a read
BASE = {"redis_budget_ms": 2000.0, "split_poll_ms": 250, "server_id": "s-e2e"}


def _bid_model(models: Path, hour: int, seed: int) -> str:
    """A real LightGBM version on ``bid_cpm`` alone (Score reads no entity for it)."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    x = rng.random((400, 1)) * 20
    y = (rng.random(400) < 0.02 + 0.01 * seed * x[:, 0] / 3).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1,
                         "seed": seed}, lgb.Dataset(x, y, feature_name=["bid_cpm"]), 5)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({"features": ["bid_cpm"]}))

    return write_artifact(models, datetime(2024, 5, 1, hour, tzinfo=UTC), fill)[0]


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, str, str]:
    folder = tmp_path / "models"
    champion, challenger = _bid_model(folder, 10, 1), _bid_model(folder, 11, 3)
    set_champion(folder, champion)
    return folder, champion, challenger


def _split(seq: int, champion: str, challenger: str | None, share: float,
           shadow: bool = False) -> bytes:
    return SplitState(seq, ROLLOUT, champion, challenger, share, shadow,
                      1 if challenger else 0, time.time_ns() // 1_000_000).to_json().encode()


def _request(user: str | None, rid: str | None = None) -> Any:
    req = build_score_request(user, [{"ad_id": f"a{i}", "campaign_id": f"c{i % 3}",
                                      "bid_cpm": 0.5 + i} for i in range(8)],
                              {"country": "US", "device_type": "mobile",
                               "publisher_id": "pub1", "placement": "feed"})
    if rid is not None:
        req.request_id = rid
    return req


def _until(check: Callable[[], bool], within_s: float, what: str) -> float:
    """Seconds until ``check()`` holds (fails past ``within_s``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within_s, f"{what}: not within {within_s} s"
        time.sleep(0.01)
    return time.monotonic() - start


def _arms(client: FeatureClient) -> dict[str, tuple[int, str]]:
    out = {}
    for user in USERS:
        resp = client.score_pb(_request(user))
        out[user] = (resp.arm, resp.model_version)
    return out


def _expected(champion: str, challenger: str, share: float) -> dict[str, tuple[int, str]]:
    from headrace.api.v1 import scoring_pb2 as spb

    return {u: (spb.CHALLENGER, challenger) if assign(ROLLOUT, u, share)
            else (spb.CHAMPION, champion) for u in USERS}


@pytest.fixture
def serve() -> Iterator[Callable[[ServeSettings], tuple[FeatureServer, FeatureClient]]]:
    started: list[tuple[FeatureServer, FeatureClient]] = []

    def start(settings: ServeSettings) -> tuple[FeatureServer, FeatureClient]:
        srv = build_server(settings, port=0, host="127.0.0.1").start()
        client = FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=5.0)
        client.wait_ready()
        started.append((srv, client))
        return srv, client

    yield start
    for srv, client in started:
        client.close()
        srv.stop(0)


# ---------------------------------------------------------------- the split
def test_a_split_reaches_the_server_within_a_second(ns: Any, redis_client: Any,
                                                    models: tuple[Path, str, str],
                                                    serve: Any) -> None:
    from headrace.api.v1 import scoring_pb2 as spb

    folder, champion, challenger = models
    _srv, client = serve(ns.settings(ServeSettings, models_dir=str(folder),
                                     prediction_log=False, **BASE))
    assert set(_arms(client).values()) == {(spb.CHAMPION, champion)}
    want = _expected(champion, challenger, 0.5)
    assert 8 < sum(a == spb.CHALLENGER for a, _v in want.values()) < 32
    redis_client.set(split_key(ns.redis_prefix), _split(1, champion, challenger, 0.5))
    took = _until(lambda: _arms(client) == want, 1.0, "split applied")
    ack = json.loads(redis_client.get(ack_key(ns.redis_prefix, "s-e2e")))
    assert (ack["seq"], ack["share"], ack["challenger"]) == (1, 0.5, challenger)
    assert 0 < redis_client.ttl(ack_key(ns.redis_prefix, "s-e2e")) <= 10
    # the challenger's answers are its own booster's predictions
    booster = load_model(folder, challenger).booster
    user = next(u for u, (a, _v) in want.items() if a == spb.CHALLENGER)
    resp = client.score_pb(_request(user))
    x = np.array([[0.5 + i] for i in resp.order])
    assert list(resp.p_ctr) == pytest.approx(list(booster.predict(x, num_threads=1)))
    # rollback: 100 % champion within a second
    redis_client.set(split_key(ns.redis_prefix), _split(2, champion, None, 0.0))
    took_back = _until(lambda: set(_arms(client).values()) == {(spb.CHAMPION, champion)},
                       1.0, "rollback applied")
    ack = json.loads(redis_client.get(ack_key(ns.redis_prefix, "s-e2e")))
    assert (ack["seq"], ack["share"], ack["challenger"]) == (2, 0.0, None)
    print(f"split applied in {took:.3f} s, rollback in {took_back:.3f} s")


def test_redis_unavailable_serves_100_percent_champion(
        ns: Any, tmp_path: Path, models: tuple[Path, str, str], serve: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    import redis

    from bench.lookup import start_redis
    from headrace.api.v1 import scoring_pb2 as spb

    folder, champion, challenger = models
    proc, port = start_redis(str(tmp_path))
    try:
        own = redis.Redis(port=port)
        own.set(split_key(ns.redis_prefix), _split(1, champion, challenger, 0.5))
        srv, client = serve(ns.settings(
            ServeSettings, models_dir=str(folder), redis_url=f"redis://127.0.0.1:{port}/0",
            split_timeout_ms=200, prediction_log=False, **BASE))
        want = _expected(champion, challenger, 0.5)
        all_champion = {u: (spb.CHAMPION, champion) for u in USERS}
        assert _arms(client) == want  # applied at start
        caplog.set_level(logging.WARNING, "serving.split")
        proc.send_signal(signal.SIGSTOP)  # a hung Redis: reads time out
        try:
            _until(lambda: _arms(client) == all_champion, 1.5, "champion on a hung redis")
            start = time.monotonic()
            assert _arms(client) == all_champion  # Score itself never waits for the split
            assert time.monotonic() - start < 1.0
            m = srv.metrics
            assert m.value("headrace_rollout_split_redis_available") == 0
            assert m.value("headrace_rollout_split_share") == 0
            assert m.value("headrace_rollout_split_errors_total", reason="redis") >= 1
        finally:
            proc.send_signal(signal.SIGCONT)
        _until(lambda: _arms(client) == want, 1.5, "split back after the outage")
        assert srv.metrics.value("headrace_rollout_split_redis_available") == 1
        proc.kill()  # gone: connections refused
        proc.wait()
        _until(lambda: _arms(client) == all_champion, 1.5, "champion on a dead redis")
        messages = [r.getMessage() for r in caplog.records if r.name == "serving.split"]
        assert any("redis unavailable" in s and "100 % champion" in s for s in messages)
        assert any("available again" in s for s in messages), messages
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the prediction log
def _consume(ns: Any, topic: str, want: int, within_s: float = 20.0
             ) -> list[tuple[int, bytes | None, PredictionRecord]]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    settings = ns.settings()
    consumer = Consumer(settings.confluent_consumer(f"g{ns.id}"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[tuple[int, bytes | None, PredictionRecord]] = []
        deadline = time.monotonic() + within_s
        while len(out) < want and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out.append((msg.partition(), msg.key(), decode_prediction(msg.value())))
        return out
    finally:
        consumer.close()


def test_prediction_records_land_on_the_topic_and_decode(
        ns: Any, redis_client: Any, models: tuple[Path, str, str], serve: Any) -> None:
    from headrace.api.v1 import scoring_pb2 as spb

    folder, champion, challenger = models
    # shadow on, 30 % served by the challenger: every champion answer is shadow-scored
    redis_client.set(split_key(ns.redis_prefix), _split(1, champion, challenger, 0.3, True))
    settings = ns.settings(ServeSettings, models_dir=str(folder), **BASE)  # log: auto
    srv, client = serve(settings)
    assert srv.scoring.predictions is not None  # HEADRACE_KAFKA_BOOTSTRAP given: on
    answers = {}
    for i in range(30):
        user = USERS[i] if i % 3 else None  # a third anonymous
        resp = client.score_pb(_request(user, f"req-{i}"))
        answers[resp.prediction_id] = (user, resp)
    shadowed = sum(r.arm == spb.CHAMPION for _u, r in answers.values())
    srv.stop(0)  # flushes the log
    topic = settings.topic(TOPIC_PREDICTIONS)
    got = _consume(ns, topic, 30 + shadowed)
    served = {r.prediction_id: (p, k, r) for p, k, r in got if not r.shadow}
    shadows = {r.prediction_id: r for _p, _k, r in got if r.shadow}
    assert set(served) == set(answers) and len(got) == 30 + shadowed
    assert set(shadows) == {pid for pid, (_u, r) in answers.items() if r.arm == spb.CHAMPION}
    for pid, (partition, key, rec) in served.items():
        user, resp = answers[pid]
        assert rec.user_id == user and rec.model_version == resp.model_version
        assert rec.arm == (Arm.CHALLENGER if resp.arm == spb.CHALLENGER else Arm.CHAMPION)
        assert (rec.country, rec.device_type, rec.placement, rec.publisher_id) == (
            "US", "mobile", "feed", "pub1")
        by_ad = dict(zip(resp.ad_ids, resp.p_ctr, strict=True))
        assert list(rec.p_ctr) == [by_ad[a] for a in rec.ad_ids]
        assert rec.ranks[resp.order[0]] == 0 and rec.chosen_rank == 0 and rec.error is None
        assert rec.latency_ms > 0
        unit = user or pid  # routed like the impressions: user id, else the prediction id
        assert key == unit.encode()
        assert partition == partition_for(unit, settings.partitions)
    for pid, rec in shadows.items():
        assert rec.arm is Arm.CHALLENGER and rec.model_version == challenger
        assert rec.user_id == served[pid][2].user_id and rec.error is None
    m = srv.metrics
    assert m.value("headrace_prediction_log_total", outcome="sent") == 30 + shadowed
    assert m.value("headrace_scoring_shadow_total", outcome="scored") == shadowed


def test_kafka_unavailable_score_keeps_answering_and_drops_are_counted(
        ns: Any, models: tuple[Path, str, str], serve: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    from headrace.stack.proc import free_port

    folder, champion, _challenger = models
    caplog.set_level(logging.WARNING, "headrace.retry")
    srv, client = serve(ns.settings(
        ServeSettings, models_dir=str(folder), kafka_bootstrap=f"127.0.0.1:{free_port()}",
        prediction_log=True, prediction_log_buffer=20, prediction_log_timeout_ms=400,
        **BASE))
    slowest = 0.0
    for i in range(200):
        start = time.perf_counter()
        resp = client.score_pb(_request(USERS[i % 40], f"k-{i}"))
        slowest = max(slowest, time.perf_counter() - start)
        assert resp.model_version == champion and resp.prediction_id == f"k-{i}"
    assert slowest < 1.0, slowest
    m = srv.metrics

    def lost() -> float:
        return sum(m.value("headrace_prediction_log_total", outcome=o)
                   for o in ("dropped_buffer", "dropped_queue", "failed"))

    _until(lambda: lost() == 200, 10.0, "every record counted as lost")
    assert m.value("headrace_prediction_log_total", outcome="sent") == 0
    assert m.value("headrace_prediction_log_total", outcome="dropped_buffer") > 0
    assert m.value("headrace_prediction_log_available") == 0
    assert any("kafka (prediction log) unavailable" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
