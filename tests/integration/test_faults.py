"""Store outages waited out, on real local services, against a fault-free run.

A stack of its own (its services are frozen and killed here, so the session's stack
stays healthy). One adversarial stream is produced, with identical records, into a
fresh namespace per run: the reference (no fault), then one run per fault, each with
a live tail (the stream keeps arriving during the fault) and ``--until-idle`` shorter
than the fault:

* Redis frozen (SIGSTOP) past ``--until-idle`` and past the worker's Redis timeout;
* the S3 endpoint frozen past the worker's S3 timeout;
* the broker frozen;
* Redis killed (connections refused) and restarted on its port with its data (an
  append-only file fsynced on every write: the restarted server holds what was acked),
  and restarted empty (no persistence): the worker notices the loss (the group's epoch
  marker is gone) and rebuilds the online state from the log, offline store kept.

Each run must end on its own (exit 0, never a crash), after the fault, with the
reference's online features for every probe (and the oracle's), the same offline rows
(every offset exactly once), and the same late and dead-letter records; its log must
name the outage when it starts and when it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
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

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SEED = 9_131
N_EVENTS = 15_000
N_PROBES = 300
LIVE_FROM = 6_000  # arrivals before this are produced at once, the rest live
LIVE_RATE = 1_500.0  # arrivals per second of the live tail (~6 s)
FAULT_S = 8.0
UNTIL_IDLE_S = 4.0
WORKER_TIMEOUT_S = 240
#: short timeouts and back-off: the faults outlast them
FAST_FAIL = {"HEADRACE_REDIS_TIMEOUT_MS": "1000", "HEADRACE_S3_TIMEOUT_MS": "2000",
             "HEADRACE_RETRY_MAX_S": "0.5", "HEADRACE_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from headrace.stack.local import local_stack

    with local_stack(tmp_path_factory.mktemp("fault-stack")) as info:
        yield info


@pytest.fixture(scope="module")
def stream() -> Stream:
    return generate(N_EVENTS, seed=SEED, partitions=sk.PARTITIONS)


def _run(stack: Any, stream: Stream, tmp: Path, *, fault: Callable[[], None] | None,
         redis_url: str | None = None) -> tuple[rcmp.Snapshot, sk.Worker, dict[str, float]]:
    """Produce the stream (its tail live), run a worker until idle, inject ``fault``
    (which returns once the fault is over) a second into the live tail."""
    ns = sk.namespace_for(stack)
    env_extra = dict(FAST_FAIL)
    if redis_url is not None:
        ns.settings_env["HEADRACE_REDIS_URL"] = redis_url
        env_extra["HEADRACE_REDIS_URL"] = redis_url
    sk.create_source_topics(stack.kafka_bootstrap, [ns.topic("impressions"),
                                                    ns.topic("clicks")], sk.PARTITIONS)
    produced: dict[str, sk.Produced] = {}
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            produced["p"] = sk.produce_arrivals(stack.kafka_bootstrap, ns.topic_prefix,
                                                stream.arrivals, pace=(LIVE_FROM, LIVE_RATE))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    timings: dict[str, float] = {}
    worker = sk.Worker(sk.worker_env(ns, tmp, **env_extra), tmp / f"worker-{ns.id}.log",
                       until_idle=UNTIL_IDLE_S)
    producer = threading.Thread(target=produce, daemon=True)
    started = time.monotonic()
    producer.start()
    try:
        if fault is not None:
            _wait_for_progress(redis_url or stack.redis_url, ns, worker)
            fault()
            timings["fault_ended_s"] = time.monotonic() - started
        producer.join(WORKER_TIMEOUT_S)
        assert not errors, errors
        rc_ = worker.wait(WORKER_TIMEOUT_S)
        timings["worker_s"] = time.monotonic() - started
    finally:
        worker.kill()
    assert rc_ == 0, worker.log_tail()
    exp = sc.expectations(stream, produced["p"])
    return rcmp.snapshot(ns, exp, probe_points(exp.index, N_PROBES, seed=SEED)), worker, timings


def _wait_for_progress(redis_url: str, ns: Any, worker: sk.Worker) -> None:
    """Until the worker has durable progress online and offline (so the fault hits a
    worker mid-stream, not one still starting)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while True:
            recs = sk.commit_records(client, ns.redis_prefix, f"g{ns.id}").values()
            if (sum(r.get("online_next", 0) for r in recs) >= LIVE_FROM // 2
                    and any(r.get("offline_next", 0) for r in recs)):
                return
            assert worker.alive(), worker.log_tail()
            assert time.monotonic() < deadline, "no progress: " + worker.log_tail()
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(fault_stack: Any, stream: Stream, tmp_path_factory: pytest.TempPathFactory
              ) -> rcmp.Snapshot:
    snap, _worker, _t = _run(fault_stack, stream, tmp_path_factory.mktemp("ref"), fault=None)
    problems = sc.feature_problems(snap.exp, snap.features) + snap.offline_problems
    assert not problems, problems[:10]
    return snap


def _frozen(pid: int, seconds: float) -> Callable[[], None]:
    def fault() -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
    return fault


def _check(run: rcmp.Snapshot, ref: rcmp.Snapshot, worker: sk.Worker, store: str,
           timings: dict[str, float]) -> None:
    problems, _dups = rcmp.compare(run, ref, f"{store} fault")
    assert not problems, "\n".join(problems[:10])
    log = worker.log_path.read_text(errors="replace")
    assert f"{store} unavailable" in log and f"{store} available again" in log, log[-3000:]
    # it waited the fault out: it did not stop idle while the store was away
    assert timings["worker_s"] > timings["fault_ended_s"], timings


def test_redis_frozen_past_until_idle(fault_stack: Any, stream: Stream, reference: rcmp.Snapshot,
                                      tmp_path: Path) -> None:
    run, worker, timings = _run(fault_stack, stream, tmp_path,
                                fault=_frozen(fault_stack.pids["redis"], FAULT_S))
    _check(run, reference, worker, "redis", timings)


def test_s3_frozen_past_its_timeout(fault_stack: Any, stream: Stream, reference: rcmp.Snapshot,
                                    tmp_path: Path) -> None:
    # a request to a frozen endpoint fails after ~8 s here (curl's low-speed limit,
    # whatever the request timeout): frozen longer than that, a write must be retried
    run, worker, timings = _run(fault_stack, stream, tmp_path,
                                fault=_frozen(fault_stack.pids["s3"], 12.0))
    _check(run, reference, worker, "s3", timings)


def test_broker_frozen(fault_stack: Any, stream: Stream, reference: rcmp.Snapshot,
                       tmp_path: Path) -> None:
    run, _worker, _t = _run(fault_stack, stream, tmp_path,
                            fault=_frozen(fault_stack.pids["kafka"], FAULT_S))
    problems, _dups = rcmp.compare(run, reference, "broker frozen")
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("persistent", [True, False], ids=["with-its-data", "empty"])
def test_redis_killed_and_restarted(fault_stack: Any, stream: Stream, reference: rcmp.Snapshot,
                                    tmp_path: Path, persistent: bool) -> None:
    """Killed mid-stream (connections refused for a while), then restarted on its port:
    with its data (an append-only file), or empty (no persistence: the states and the
    progress are gone, and the worker rebuilds them from the log)."""
    from headrace.stack.proc import free_port
    from tests.localredis import start_redis

    port, data = free_port(), tmp_path / "redis-data"
    data.mkdir()

    def start() -> subprocess.Popen[bytes]:
        return start_redis(port, data, persistent=persistent)

    procs = [start()]

    def fault() -> None:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        time.sleep(FAULT_S)  # connections refused meanwhile
        procs[0] = start()

    try:
        run, worker, timings = _run(fault_stack, stream, tmp_path, fault=fault,
                                    redis_url=f"redis://127.0.0.1:{port}/0")
    finally:
        procs[0].kill()
        procs[0].wait()
    _check(run, reference, worker, "redis", timings)
    rebuilt = "rebuilding the online state from the log" in worker.log_path.read_text(
        errors="replace")
    assert rebuilt is not persistent, worker.log_tail()
