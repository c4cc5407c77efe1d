"""``headrace bench stream``: worker throughput and freshness on the real local stack.

Figures (all measured in one run, on one stack):

* ``events_per_s``: synthetic events produced beforehand as batched Arrow envelopes,
  consumed by one ``headrace worker`` process end to end (decoded → applied → Redis
  written → Parquet written → progress committed): events / (last durable commit −
  first input). Group join and start-up are excluded.
* ``single_event_messages_per_s``: the same with one JSON event per Kafka message.
* ``reference_events_per_s``: one plain confluent-kafka consumer process decoding the same
  single-event JSON messages and updating a dict (the machine's physical floor for one
  process, measured in the same run; the README's benchmark table lists the figures).
* ``freshness_p50_ms`` / ``freshness_p99_ms`` / ``freshness_max_ms``: a producer paced
  at ``rate`` events/s stamping events with the wall clock; freshness = wall time when
  the state was written to Redis − event time, per event and view entity (the user view
  and, one Kafka hop later, the ad, campaign and publisher views), sampled uniformly by
  the worker. The window opens once the worker has joined its group and made a few
  earlier events durable on every view (``worker_ready_s`` after its start); those
  earlier events waited for the start-up and give ``freshness_warmup_max_ms``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

__all__ = ["run"]


def _progress(msg: str) -> None:
    print(f"[bench stream] {msg}", file=sys.stderr, flush=True)


def _produce(env: dict[str, str], events: list[dict[str, Any]], encoding: str) -> float:
    from headrace.core.settings import ProducerSettings
    from streams.producer import EventProducer

    settings = ProducerSettings.from_env(env)
    started = time.perf_counter()
    producer = EventProducer(settings, encoding=encoding, progress=False)  # type: ignore[arg-type]
    producer.send_events(events)
    producer.flush()
    return time.perf_counter() - started


def _worker(env: dict[str, str], stats: str, until_idle: float = 3.0,
            timeout: float = 600) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "headrace.cli", "worker", "--until-idle", str(until_idle),
           "--stats", stats]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return read_worker_stats(stats, proc.returncode, proc.stderr[-2000:])


def read_worker_stats(path: str, returncode: int, stderr_tail: str) -> dict[str, Any]:
    """The ``--stats`` file of a finished worker; a failed or idle run raises with the
    tail of its stderr."""
    if returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"worker failed ({returncode}): {stderr_tail}")
    with open(path, encoding="utf-8") as fh:
        result: dict[str, Any] = json.load(fh)
    if not result["events_in"] or not result["last_online_commit"]:
        raise RuntimeError(f"worker consumed nothing: {stderr_tail}")
    return result


def _rate(stats: dict[str, Any]) -> float:
    end = max(t for t in (stats["last_online_commit"], stats["last_offline_commit"]) if t)
    return stats["events_in"] / max(1e-9, end - stats["first_input"])


def _reference(env: dict[str, str], topics: list[str], expected: int) -> float:
    """Plain confluent consumer + json decode + dict update (same run, same events)."""
    from confluent_kafka import Consumer

    from headrace.core.settings import WorkerSettings

    settings = WorkerSettings.from_env(env)
    consumer = Consumer(settings.confluent_consumer(f"bench-ref-{time.time_ns()}"))
    consumer.subscribe(topics)
    counts: dict[str, int] = {}
    seen = 0
    started = None
    deadline = time.monotonic() + 120
    while seen < expected and time.monotonic() < deadline:
        batch = consumer.consume(1000, 0.5)
        if batch and started is None:
            started = time.perf_counter()
        for msg in batch:
            if msg.error():
                continue
            ev = json.loads(cast(bytes, msg.value()))
            key = ev.get("user_id") or ev["event_id"]
            counts[key] = counts.get(key, 0) + 1
            seen += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / max(1e-9, elapsed)


def _wait_ready(env: dict[str, str], messages: int, worker: subprocess.Popen,
                timeout: float = 120.0) -> float:
    """Wait until the worker has joined, been assigned, and made ``messages`` source
    messages durable on every view (commit records of the source partitions cover them,
    and every repartition topic has one); returns the seconds waited."""
    from feature_defs.layout import commit_key, repartition_topic
    from feature_defs.registry import registry_for
    from headrace.core.settings import WorkerSettings

    s = WorkerSettings.from_env(env)
    # the definitions the worker runs: it inherits this process's environment
    topo = registry_for(WorkerSettings.from_env({**os.environ, **env})).topology
    client = s.redis_config().client()
    parts = range(s.partitions)
    sources = [commit_key(s.redis_prefix, s.group_id, s.topic("impressions"), p) for p in parts]
    remote = [[commit_key(s.redis_prefix, s.group_id, s.topic(repartition_topic(e)), p)
               for p in parts] for e in topo.repartitioned_entities]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited early: {worker.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        done = sum(int(client.hget(k, "online_next") or 0) for k in sources)
        if done >= messages and all(any(client.exists(k) for k in keys) for keys in remote):
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"worker not caught up after {timeout:.0f}s")


def run(events: int = 200_000, users: int = 20_000, single_events: int = 30_000,
        rate: int = 5000, freshness_seconds: float = 15.0, seed: int = 0) -> dict[str, Any]:
    """Run the benchmark on a fresh local stack and return its figures."""
    from headrace.stack.local import local_stack
    from streams.live import PacedProducer
    from streams.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as tmp, \
            local_stack(os.path.join(tmp, "stack")) as info:
        base = dict(info.env)

        def ns(name: str) -> dict[str, str]:
            return {**base, "HEADRACE_TOPIC_PREFIX": f"{name}.", "HEADRACE_REDIS_PREFIX": name,
                    "HEADRACE_OFFLINE_URI": f"{info.offline_uri}/{name}",
                    "HEADRACE_GROUP_ID": f"g-{name}", "HEADRACE_DATA_DIR": f"{tmp}/w-{name}",
                    "HEADRACE_LOG_LEVEL": "WARNING"}

        start_ms = int(time.time() * 1000) - 7 * 86_400_000
        _progress(f"generating {events} synthetic events for {users} users")
        stream = generate(users, events, seed, start_ms, days=7).events
        env_a = ns("envelopes")
        _progress("producing Arrow envelopes")
        produce_s = _produce(env_a, stream, "arrow")
        _progress("worker: envelopes")
        stats_a = _worker(env_a, f"{tmp}/a.json")

        single = stream[:single_events]
        env_b = ns("single")
        _progress(f"producing {len(single)} single-event JSON messages")
        _produce(env_b, single, "json")
        _progress("reference consumer")
        ref = _reference(env_b, [f"single.{t}" for t in ("impressions", "clicks")], len(single))
        _progress("worker: single-event messages")
        stats_b = _worker(env_b, f"{tmp}/b.json")

        env_c = ns("fresh")
        _progress(f"freshness: {rate} events/s for {freshness_seconds:.0f}s")
        stats_file = f"{tmp}/c.json"
        cmd = [sys.executable, "-m", "headrace.cli", "worker", "--until-idle", "10",
               "--stats", stats_file]
        # a few events first: the topics exist before the worker joins, and their
        # freshness shows the start-up (group join, assignment): reported apart. The same
        # producer then sends the paced window (its own start-up is no event's latency)
        paced = PacedProducer(env_c, users)
        paced.run(50, 0.2)
        worker = subprocess.Popen(cmd, env={**os.environ, **env_c}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            ready_s = _wait_ready(env_c, paced.producer.counts.messages, worker)
        except BaseException:
            worker.kill()
            raise
        window_ms = int(time.time() * 1000)  # the paced window: events stamped from here
        sent = paced.run(rate, freshness_seconds)
        _, err = worker.communicate(timeout=120)
        with open(stats_file, encoding="utf-8") as fh:
            stats_c = json.load(fh)
        lags = stats_c["freshness_ms"]
        times = stats_c["freshness_ts_ms"]
        fresh = sorted(lag for lag, t in zip(lags, times, strict=True) if t >= window_ms)
        warmup = [lag for lag, t in zip(lags, times, strict=True) if t < window_ms]

        def q(p: float) -> float | None:
            return round(fresh[min(len(fresh) - 1, int(p * len(fresh)))], 1) if fresh else None

        return {
            "events": stats_a["events_in"],
            "events_per_s": round(_rate(stats_a)),
            "reference_events_per_s": round(ref),
            "ratio_to_reference": round(_rate(stats_a) / ref, 3),
            "single_event_messages_per_s": round(_rate(stats_b)),
            "freshness_rate_events_per_s": rate,
            "freshness_events": sent,
            "freshness_p50_ms": q(0.50),
            "freshness_p99_ms": q(0.99),
            "freshness_max_ms": q(1.0),
            "freshness_warmup_max_ms": round(max(warmup), 1) if warmup else None,
            "worker_ready_s": round(ready_s, 2),
            "produce_seconds": round(produce_s, 2),
            "users": users,
        }
