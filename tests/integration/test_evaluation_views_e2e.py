"""The evaluation views end to end on the real local stack: impressions and clicks
carrying ``model_version``/``p_ctr`` (mixed json/avro/arrow), a ``headrace worker
--until-idle --definitions feature_defs.evaluation``, then ViewStatsSource's ArmStats
read from Redis equal a brute-force count of the produced events; ``headrace get``
answers a composite id (``v1}{p1``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from feature_defs.layout import partition_for
from feature_defs.registry import load_registry
from headrace.core.online_store import RedisOnlineStore
from serving.arm_stats import ViewStatsSource
from serving.reader import OnlineReader
from streams.encode import encode_events
from streams.events import routing_key
from tests import streamkit as sk
from tests.unit.test_evaluation_views import (
    ARMS,
    COUNTRIES,
    DEVICES,
    PUBLISHERS,
    brute_force,
    events,
    problems,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEFINITIONS = "feature_defs.evaluation"
ARGS = ("--definitions", DEFINITIONS)
N = 1200


def _produce(bootstrap: str, prefix: str, evs: list[dict[str, Any]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i, e in enumerate(evs):
        event = {k: v for k, v in e.items() if k != "type"}
        enc = ("json", "avro", "arrow")[i % 3]
        (msg,) = encode_events(e["type"], [event], enc)
        producer.produce(f"{prefix}{e['type']}s", msg.value, headers=msg.headers,
                         partition=partition_for(routing_key(event), sk.PARTITIONS))
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def test_view_stats_from_a_real_worker_equal_the_brute_force_count(
    ns: Any, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    now = int(time.time() * 1000)
    evs = events(N)
    shift = now - 600_000 - evs[0]["ts"]  # ten minutes ago, in time order (none late)
    for e in evs:
        e["ts"] += shift
    bootstrap = ns.stack.kafka_bootstrap
    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)
    with sk.timer("produce", timings):
        _produce(bootstrap, ns.topic_prefix, evs)
    env = sk.worker_env(ns, tmp_path)
    with sk.timer("worker --until-idle", timings):
        worker = sk.Worker(env, tmp_path / "worker.log", until_idle=3, extra_args=ARGS)
        try:
            rc = worker.wait(150)
        finally:
            worker.kill()
    assert rc == 0, worker.log_tail()

    registry = load_registry(DEFINITIONS)
    store = RedisOnlineStore(ns.stack.redis_url, timeout_ms=5000)
    source = ViewStatsSource(registry, OnlineReader(store, ns.redis_prefix),
                             segments={"publisher": PUBLISHERS, "device_type": DEVICES,
                                       "country": COUNTRIES})
    with sk.timer("read ArmStats", timings):
        got = source.read(*ARMS)
    found = [f"{arm}: {p}" for arm, stats in zip(ARMS, got, strict=True)
             for p in problems(stats, brute_force(evs, arm))]
    want = brute_force(evs, "v1")["segments"]["publisher"]["p1"]
    code, lines = sk.get_inprocess(ns.settings_env, "arm_publisher", ["v1}{p1"], now + 3_600_000,
                                   ARGS)
    assert code == 0, lines
    assert (lines[0]["features"]["arm_publisher__impressions_lifetime"],
            lines[0]["features"]["arm_publisher__clicks_lifetime"]) == want
    print(f"[result] {N} impressions, arms {[s.impressions for s in got]}; [timing] {timings}")
    assert not found, "\n".join(found)
