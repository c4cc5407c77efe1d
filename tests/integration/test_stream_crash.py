"""Effectively-once under crashes and with two workers, on the real local stack.

One adversarial stream (~40k events) is produced, with identical records (explicit
Kafka timestamps, the same Arrow envelopes, so the same offsets), into three fresh
namespaces:

* the reference: one uninterrupted ``headrace worker --until-idle`` run;
* the crash run: the stream arrives live while a worker is SIGKILLed three times
  (mid-processing at a random progress point, right after an offline flush, right after
  the consumer group's own Kafka commit passed the durable online progress of a
  partition), then a final ``--until-idle`` run;
* the pair run: two workers of one consumer group (different worker ids and data dirs)
  splitting the partitions.

Each run must give the reference's features for every probe (and the oracle's), the
reference's offline rows (every column, no duplicates), and dead-letter / late topics
holding every expected record; duplicates are tolerated after crashes only when they
are identical records with identical source coordinates (their number is printed).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import runcompare as rcmp
from tests import streamcheck as sc
from tests import streamkit as sk
from tests.adversarial import Stream, generate, probe_points

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SEED = 4_471
N_EVENTS = 60_000  # generate() raises for 20_000 <= n < 60_000 (its heavy user needs 1,200 ads)
N_PROBES = 400
WORKER_TIMEOUT_S = 240
PROGRESS_TIMEOUT_S = 120


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stream() -> Stream:
    s = generate(N_EVENTS, seed=SEED, partitions=sk.PARTITIONS)
    assert len({e["user_id"] for e in s.events if e["user_id"]}) >= 500
    return s


@pytest.fixture(scope="module")
def reference(stack: Any, stream: Stream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        rcmp.Snapshot]:
    """The uninterrupted single-worker run, in its own namespace."""
    import redis

    tmp = tmp_path_factory.mktemp("reference")
    ns = sk.namespace_for(stack)
    timings: dict[str, float] = {}
    with sk.timer("reference: produce", timings):
        sk.create_source_topics(stack.kafka_bootstrap, [ns.topic("impressions"),
                                                        ns.topic("clicks")], sk.PARTITIONS)
        produced = sk.produce_arrivals(stack.kafka_bootstrap, ns.topic_prefix, stream.arrivals)
        exp = sc.expectations(stream, produced)
    worker = sk.Worker(sk.worker_env(ns, tmp), tmp / "worker.log", until_idle=5)
    try:
        with sk.timer("reference: worker", timings):
            rc = worker.wait(WORKER_TIMEOUT_S)
    finally:
        worker.kill()
    assert rc == 0, worker.log_tail()
    with sk.timer("reference: snapshot", timings):
        snap = rcmp.snapshot(ns, exp, probe_points(exp.index, N_PROBES, seed=SEED))
    yield snap
    client = redis.Redis.from_url(stack.redis_url)
    keys = list(client.scan_iter(match=f"{ns.redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _reference_agrees_with_oracle(ref: rcmp.Snapshot) -> list[str]:
    problems = sc.feature_problems(ref.exp, ref.features) + ref.offline_problems
    problems += sc.late_problems(ref.exp, ref.late, allow_duplicates=False)[0]
    problems += sc.dead_problems(ref.exp, ref.dead, allow_duplicates=False,
                                 check_codes=False)[0]
    return [f"reference: {p}" for p in problems]


# --------------------------------------------------------------------------- the crash run
def _source_progress(redis_client: Any, ns: Any, group: str) -> tuple[int, int]:
    """(sum of online_next, sum of offline_next) over the source partitions."""
    recs = sk.commit_records(redis_client, ns.redis_prefix, group)
    online = offline = 0
    sources = (ns.topic("impressions"), ns.topic("clicks"))
    for key, rec in recs.items():
        if key.rsplit(":", 2)[1] in sources:
            online += rec.get("online_next", 0)
            offline += rec.get("offline_next", 0)
    return online, offline


def _online_next(redis_client: Any, ns: Any, group: str) -> dict[tuple[str, int], int]:
    """online_next per source (topic, partition)."""
    out = {}
    for key, rec in sk.commit_records(redis_client, ns.redis_prefix, group).items():
        topic, part = key.rsplit(":", 2)[1:]
        out[(topic, int(part))] = rec.get("online_next", 0)
    return out


@contextlib.contextmanager
def _group_offsets(bootstrap: str, group: str, ns: Any) -> Iterator[
        Callable[[], dict[tuple[str, int], int]]]:
    """A function returning the group's committed offsets of the source partitions
    (OffsetFetch, not ListOffsets). The consumer never joins the group."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    tps = [TopicPartition(ns.topic(t), p) for t in ("impressions", "clicks")
           for p in range(sk.PARTITIONS)]

    def committed() -> dict[tuple[str, int], int]:
        return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=10)}

    try:
        yield committed
    finally:
        consumer.close()


def _wait_for(cond: Callable[[], bool], worker: sk.Worker, what: str,
              poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while not cond():
        if not worker.alive():
            raise AssertionError(f"worker exited while waiting for {what}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {PROGRESS_TIMEOUT_S}s:\n{worker.log_tail()}")
        time.sleep(poll_s)


def test_sigkilled_worker_matches_uninterrupted_run(
    ns: Any, stream: Stream, reference: rcmp.Snapshot, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    rng = random.Random(SEED)
    bootstrap = ns.stack.kafka_bootstrap
    group = f"g{ns.id}"
    env = sk.worker_env(ns, tmp_path, group=group)
    total = len(stream.arrivals) - reference.exp.produced.enveloped_events \
        + reference.exp.produced.envelopes  # source messages
    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)

    # half the stream at once, the rest live (~25 s) while the worker is being killed
    upfront = len(stream.arrivals) // 2
    rate = (len(stream.arrivals) - upfront) / 25
    result: dict[str, Any] = {}

    def produce() -> None:
        try:
            result["produced"] = sk.produce_arrivals(bootstrap, ns.topic_prefix,
                                                     stream.arrivals, pace=(upfront, rate))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc

    producer = threading.Thread(target=produce, name="live-producer", daemon=True)
    producer.start()
    kills: list[dict[str, Any]] = []
    workers: list[sk.Worker] = []

    def start() -> sk.Worker:
        w = sk.Worker(env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(w)
        return w

    def kill(w: sk.Worker, moment: str) -> None:
        before = _source_progress(redis_client, ns, group)
        w.kill()  # SIGKILL, no chance to flush
        kills.append({"moment": moment, "after_s": round(time.monotonic() - w.started, 2),
                      "online_next_sum": before[0], "offline_next_sum": before[1],
                      "of_messages": total})
        print(f"[kill] {kills[-1]}", flush=True)

    try:
        with sk.timer("crash run: 3 killed workers", timings):
            # 1. mid-processing: at a random progress point, after a random delay
            w = start()
            target = int(total * rng.uniform(0.12, 0.3))
            _wait_for(lambda: _source_progress(redis_client, ns, group)[0] >= target, w,
                      f"online progress to {target}")
            time.sleep(rng.uniform(0, 0.4))
            kill(w, "during processing")

            # 2. later in the stream, right after an offline flush recorded new progress
            w = start()
            target = int(total * rng.uniform(0.4, 0.55))
            _wait_for(lambda: _source_progress(redis_client, ns, group)[0] >= target, w,
                      f"online progress to {target}")
            mid = _source_progress(redis_client, ns, group)
            _wait_for(lambda: _source_progress(redis_client, ns, group)[1] > mid[1], w,
                      "an offline flush", poll_s=0.005)
            kill(w, "right after an offline flush")

            # 3. later still, right after the consumer group's own Kafka commit passed
            #    the durable online progress of a partition (else: a random moment)
            w = start()
            target = int(total * rng.uniform(0.65, 0.8))
            _wait_for(lambda: _source_progress(redis_client, ns, group)[0] >= target, w,
                      f"online progress to {target}")
            with _group_offsets(bootstrap, group, ns) as committed:
                deadline = time.monotonic() + 15
                ahead: dict[Any, Any] = {}
                while not ahead and time.monotonic() < deadline and w.alive():
                    online = _online_next(redis_client, ns, group)
                    ahead = {tp: (off, online.get(tp, 0)) for tp, off in committed().items()
                             if off > online.get(tp, 0)}
                    if not ahead:
                        time.sleep(0.01)
                if not ahead:
                    time.sleep(rng.uniform(0, 1.5))
            kill(w, f"group commit ahead of online progress {ahead}" if ahead
                 else "random moment (group commit never ahead)")

        producer.join(120)
        assert not producer.is_alive(), "the live producer did not finish"
        if "error" in result:
            raise result["error"]
        produced: sk.Produced = result["produced"]
        assert produced.coords == reference.exp.produced.coords, "offsets differ between runs"
        assert kills[-1]["online_next_sum"] < total, "the stream was done before the last kill"

        with sk.timer("crash run: final --until-idle worker", timings):
            final = sk.Worker(env, tmp_path / "worker-final.log", until_idle=5)
            workers.append(final)
            rc = final.wait(WORKER_TIMEOUT_S)
        assert rc == 0, final.log_tail()
    finally:
        for w in workers:
            w.kill()
        producer.join(5)

    with sk.timer("crash run: snapshot + compare", timings):
        exp = sc.expectations(stream, produced)
        run = rcmp.snapshot(ns, exp, list(reference.features))
        problems, dups = rcmp.compare(run, reference, "crash run")
    problems = _reference_agrees_with_oracle(reference) + problems
    timings["total"] = round(time.monotonic() - started, 2)
    print(f"[result] kills: {json.dumps(kills)}")
    print(f"[result] duplicates after 3 SIGKILLs: {dups}; late records {len(run.late)} "
          f"(expected {len(exp.late)}), dlq records {len(run.dead)} (expected {len(exp.dead)})")
    print(f"[timing] summary: {timings}")
    assert not problems, "\n".join(["crash run differs:", *problems])


# --------------------------------------------------------------------------- two workers
_ASSIGNED = re.compile(r"assigned (\d+) partitions; resuming at (\{.*\})")


def test_two_workers_in_one_group_match_one(
    ns: Any, stream: Stream, reference: rcmp.Snapshot, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    bootstrap = ns.stack.kafka_bootstrap
    group = f"g{ns.id}"
    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)
    with sk.timer("pair run: produce", timings):
        produced = sk.produce_arrivals(bootstrap, ns.topic_prefix, stream.arrivals)
    assert produced.coords == reference.exp.produced.coords
    workers = [
        sk.Worker(sk.worker_env(ns, tmp_path, group=group, worker_id=wid,
                                HEADRACE_LOG_LEVEL="INFO"),
                  tmp_path / f"worker-{wid}.log", until_idle=5)
        for wid in ("a", "b")
    ]
    try:
        with sk.timer("pair run: two workers", timings):
            codes = [w.wait(WORKER_TIMEOUT_S) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert codes == [0, 0], [w.log_tail() for w in workers]

    # both took part: each was assigned a strict, non-empty subset at some point
    shares = []
    for w in workers:
        counts = [int(m.group(1)) for m in _ASSIGNED.finditer(w.log_path.read_text())]
        shares.append(counts)
    print(f"[result] partitions assigned per rebalance: a {shares[0]}, b {shares[1]}")
    n_inputs = sk.PARTITIONS * 5  # 2 source topics + 3 repartition topics
    assert all(any(0 < c < n_inputs for c in s) for s in shares), (
        f"the two workers did not split the partitions: {shares}")

    with sk.timer("pair run: snapshot + compare", timings):
        exp = sc.expectations(stream, produced)
        run = rcmp.snapshot(ns, exp, list(reference.features))
        problems, dups = rcmp.compare(run, reference, "two workers")
    problems = _reference_agrees_with_oracle(reference) + problems
    timings["total"] = round(time.monotonic() - started, 2)
    print(f"[result] duplicates with two workers: {dups}")
    print(f"[timing] summary: {timings}")
    assert not problems, "\n".join(["two-worker run differs:", *problems])
