"""A poison state on the real local stack (issue 13): quarantined, the stream keeps flowing.

A small adversarial stream (``generate(small=True)``) is produced in two halves. A first
``headrace worker --until-idle`` processes the first half and exits (its states are
durable in Redis, none is cached anywhere). A second worker is started (it runs, no
``--until-idle``), junk bytes are written over one user's ``user_activity@1`` field with
redis-py, and the second half is produced live. Then, with the worker still running:

a. the dead-letter topic holds the ``corrupt_state`` record of that key and view, with
   the junk as its value (exactly one: no crash, no replay), and the worker logged it;
b. every other entity's features (all four entities, a few hundred probes through
   ``headrace get --at T --json``) equal the brute-force oracle over every event;
c. the corrupted user's features equal the oracle over only its events of the second
   half (the state was reset when the junk was found, its first-half history is lost:
   the documented price), and differ from the full oracle, so a worker that kept or
   rebuilt the history would fail here too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from feature_defs.layout import entity_key, repartition_topic
from tests import streamkit as sk
from tests.adversarial import generate, probe_points
from tests.oracle import DAY, HOUR, OracleIndex, accepted_events, features_as_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SEED = 13_004
VIEW = "user_activity@1"
JUNK = b"\x00 poison: not a view state \xff\xfe"
N_PROBES = 300
WORKER_TIMEOUT_S = 120
PROGRESS_TIMEOUT_S = 90


def _tp(commit_key: str) -> tuple[str, int]:
    topic, partition = commit_key.rsplit(":", 2)[1:]
    return topic, int(partition)


def _online_next(redis_client: Any, ns: Any, group: str) -> dict[tuple[str, int], int]:
    return {_tp(k): rec.get("online_next", 0)
            for k, rec in sk.commit_records(redis_client, ns.redis_prefix, group).items()}


def _ends(ns: Any, *produced: sk.Produced) -> dict[tuple[str, int], int]:
    """Next offset past the last message of each source partition."""
    ends: dict[tuple[str, int], int] = {}
    for p in produced:
        for topic, part, offset, _index in p.coords.values():
            tp = (ns.topic(topic), part)
            ends[tp] = max(ends.get(tp, 0), offset + 1)
    return ends


def _wait(what: str, done: Callable[[], bool], worker: sk.Worker) -> None:
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while not done():
        assert worker.alive(), f"the worker exited while waiting for {what}:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.log_tail()}"
        time.sleep(0.1)


def _differs(got: Any, want: dict[str, Any]) -> bool:
    """Not exactly the oracle's values, types included (an int count is not 3.0)."""
    if not isinstance(got, dict) or set(got) != set(want):
        return True
    return any(type(got[n]) is not type(w) or got[n] != w for n, w in want.items())


def _headers(msg: Any) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}


def test_a_corrupt_state_is_quarantined_and_the_worker_keeps_running(
    ns: Any, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    bootstrap = ns.stack.kafka_bootstrap
    group = f"g{ns.id}"
    with sk.timer("generate + oracle", timings):
        stream = generate(seed=SEED, small=True, partitions=sk.PARTITIONS)
        half = len(stream.arrivals) // 2
        first, second = stream.arrivals[:half], stream.arrivals[half:]
        accepted, _late = accepted_events(stream.events, stream.partitions)
        index = OracleIndex(accepted)
        in_second = {a.event["event_id"] for a in second if a.event is not None}
    # the victim: a user with events in both halves, its latest in the second, and the
    # most first-half history to lose
    def history(uid: str) -> tuple[int, int]:
        evs = index.events_of("user", uid)
        return sum(e["event_id"] not in in_second for e in evs), len(evs)
    candidates = [u for u in index.ids("user")
                  if 0 < history(u)[0] < history(u)[1]
                  and max(index.events_of("user", u), key=lambda e: e["ts"])["event_id"]
                  in in_second]
    victim = max(candidates, key=lambda u: history(u)[0])
    kept = [e for e in index.events_of("user", victim) if e["event_id"] in in_second]
    key = entity_key(ns.redis_prefix, "user", victim)

    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)
    env = sk.worker_env(ns, tmp_path, group=group)
    workers: list[sk.Worker] = []
    try:
        with sk.timer("first half, --until-idle worker", timings):
            p1 = sk.produce_arrivals(bootstrap, ns.topic_prefix, first, seed=1)
            w1 = sk.Worker(env, tmp_path / "worker-1.log", until_idle=3)
            workers.append(w1)
            assert w1.wait(WORKER_TIMEOUT_S) == 0, w1.log_tail()
        recs = sk.commit_records(redis_client, ns.redis_prefix, group)
        ends1 = _ends(ns, p1)
        for k, rec in recs.items():  # the next worker resumes where the first half ends
            if _tp(k) in ends1:
                assert rec["online_next"] == rec["offline_next"] == ends1[_tp(k)], (k, rec)
        assert redis_client.hget(key, VIEW), f"{victim} has no state to corrupt"

        with sk.timer("second half, live, junk mid-stream", timings):
            w2 = sk.Worker(env, tmp_path / "worker-2.log")
            workers.append(w2)
            redis_client.hset(key, VIEW, JUNK)
            p2 = sk.produce_arrivals(bootstrap, ns.topic_prefix, second, seed=2,
                                     timestamp_base=sk.TIMESTAMP_BASE + half,
                                     pace=(0, 2000.0))
            ends = _ends(ns, p1, p2)
            _wait("the sources' progress",
                  lambda: all(_online_next(redis_client, ns, group).get(tp, 0) >= end
                              for tp, end in ends.items()), w2)
            # forwards are durable before source progress: the repartition topics are
            # complete now; wait for their progress too
            rep_ends: dict[tuple[str, int], int] = {}
            for entity in ("ad", "campaign", "publisher"):
                topic = ns.topic(repartition_topic(entity))
                for msg in sk.read_topic(bootstrap, topic):
                    tp = (topic, msg.partition())
                    rep_ends[tp] = max(rep_ends.get(tp, 0), msg.offset() + 1)
            _wait("the repartition topics' progress",
                  lambda: all(_online_next(redis_client, ns, group).get(tp, 0) >= end
                              for tp, end in rep_ends.items()), w2)
        assert w2.alive(), f"the worker stopped:\n{w2.log_tail()}"

        problems: list[str] = []
        with sk.timer("dead-letter topic", timings):
            dlq = sk.read_topic(bootstrap, ns.topic("headrace-dlq"))
            corrupt = [m for m in dlq if _headers(m)["hr-reason"].startswith("corrupt_state:")]
            assert len(corrupt) == 1, [_headers(m) for m in corrupt]
            h = _headers(corrupt[0])
            assert (h["hr-state-key"], h["hr-state-view"]) == (key, VIEW), h
            assert corrupt[0].value() == JUNK and corrupt[0].key() == key.encode()
            assert h["hr-state-bytes"] == str(len(JUNK))
            log = w2.log_tail(1_000_000)
            assert "unreadable view state" in log and key in log, log[-2000:]
            stored = redis_client.hget(key, VIEW)
            assert stored and stored != JUNK  # the reset state's write overwrote the junk

        with sk.timer("probes", timings):
            probes = [p for p in probe_points(index, N_PROBES, seed=SEED)
                      if (p[0], p[1]) != ("user", victim)]
            latest = max(e["ts"] for e in kept)
            victim_probes = [("user", victim, latest + d)
                             for d in (0, 1, 5 * 60_000, HOUR, DAY, 3 * DAY, 8 * DAY)]
            got, _calls = sk.online_features(ns.settings_env, probes + victim_probes)
            for (entity, eid, at), features in got.items():
                if (entity, eid) == ("user", victim):
                    want = features_as_of(kept, "user", victim, at)
                else:
                    want = features_as_of(index, entity, eid, at)
                if _differs(features, want):
                    problems.append(f"{entity} {eid} @ {at}: got {features}, oracle {want}")
            lost = [at for _e, _i, at in victim_probes
                    if features_as_of(kept, "user", victim, at)
                    != features_as_of(index, "user", victim, at)]
            assert lost, "the victim's lost history must show in some probe to mean anything"
    finally:
        for w in workers:
            w.kill()
    print(f"[result] victim {victim}: {history(victim)[0]} events lost, {len(kept)} kept; "
          f"{len(probes)} other probes, {len(problems)} problems; [timing] {timings}")
    assert not problems, "\n".join(["values differ from the oracle:", *problems[:30]])

