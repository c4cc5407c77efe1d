"""The Faust worker: agents built from the definitions feed the :class:`Engine`.

One agent per source topic and one per repartition topic, each taking message batches
(``take_events``) so Faust's per-message cost is amortized over envelopes of many
events. Faust's windowed tables are deliberately not used (they expire by wall clock;
shared/reference/feature-platforms.md §3): the engine keeps event-time tiles itself.

On assignment the engine's durable progress (Redis) decides where each partition
resumes: the agent seeks there, also right after Faust's recovery seeks to the group's
Kafka-committed offsets (which Faust advances before data is durable); Faust's own
commits only serve lag reporting.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from feature_defs.registry import Registry
from headrace.settings import WorkerSettings
from feature_defs.state import NO_TS
from streams.engine import Engine, RawMessage
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter, resolve_filesystem
from streams.online import RedisOnlineStore
from streams.sides import KafkaSideOutputs

__all__ = ["build_engine", "ensure_topics", "run_worker"]

log = logging.getLogger(__name__)
_TAKE = 1024  # messages per agent batch


def build_engine(
    settings: WorkerSettings, registry: Registry, metrics: StreamMetrics | None = None
) -> Engine:
    """Wire the engine to the real Redis, offline store and Kafka side outputs."""
    fs, root = resolve_filesystem(settings.offline_uri, settings.pyarrow_s3())
    producer_conf = {**settings.confluent_producer(), "enable.idempotence": True}
    return Engine(
        registry=registry,
        store=RedisOnlineStore(settings.redis_url),
        writer=OfflineWriter(fs, root),
        sides=KafkaSideOutputs(producer_conf, settings.topic, settings.partitions),
        topic=settings.topic,
        redis_prefix=settings.redis_prefix,
        group=settings.group_id,
        max_future_ms=settings.max_future_ms,
        metrics=metrics,
    )


def ensure_topics(settings: WorkerSettings, topics: list[str]) -> None:
    """Create missing topics with their final partition count (the embedded broker
    cannot add partitions later, INFRA.md D4)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from headrace.errors import BrokerError

    admin = AdminClient(settings.confluent_admin())
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    # one topic per request: the embedded broker mis-encodes multi-topic CreateTopics replies
    for topic in missing:
        fut = admin.create_topics([NewTopic(topic, settings.partitions, 1)])[topic]
        try:
            fut.result(15)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {topic}: {exc}") from exc


#: young-generation threshold of the cyclic GC in a worker process (CPython's default
#: is 700). The engine keeps millions of small long-lived containers (tile cells, fences)
#: and allocates more per batch, so with the default the collector keeps promoting and
#: re-scanning them: a third of the engine's CPU time at 20k users. Raising it keeps
#: collections (and the full-collection heuristics behind them) but makes them rarer.
GC_GEN0_THRESHOLD = 50_000


def relax_gc() -> None:
    """Raise the GC's young-generation threshold to :data:`GC_GEN0_THRESHOLD` (never
    lowers a higher setting; process-wide, like any ``gc.set_threshold``)."""
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, max(gen1, 20), gen2)


def _short_fetch_wait(wait_ms: int) -> None:
    """Make Faust's aiokafka consumer wait at most ``wait_ms`` per fetch.

    Faust hardcodes ``fetch_max_wait_ms=1500`` for its worker consumer; a broker that
    holds a fetch that long when little data is waiting (the embedded one does) adds up
    to 1.5 s to every event's freshness and starves the agents between fetches.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    base = faust_aiokafka.aiokafka.AIOKafkaConsumer
    if getattr(base, "_headrace_wait_ms", None) == wait_ms:
        return

    class _Consumer(base):  # type: ignore[misc, valid-type]
        _headrace_wait_ms = wait_ms

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("group_id"):  # the worker consumer, not Faust's client consumer
                kwargs["fetch_max_wait_ms"] = wait_ms
            super().__init__(*args, **kwargs)

    faust_aiokafka.aiokafka.AIOKafkaConsumer = _Consumer


def _raw(event: Any) -> RawMessage:
    msg = event.message
    headers = msg.headers
    if isinstance(headers, dict):
        headers = list(headers.items())
    return RawMessage(
        msg.value,
        headers,
        msg.topic,
        msg.partition,
        msg.offset,
        int(msg.timestamp * 1000) if msg.timestamp else 0,
    )


def run_worker(
    settings: WorkerSettings,
    registry: Registry,
    *,
    until_idle: float | None = None,
    stats_path: str | None = None,
) -> int:
    """Run a worker until stopped (or idle for ``until_idle`` seconds). Returns 0.

    ``stats_path`` receives a JSON summary at exit (events, first input and last durable
    commit wall times, freshness samples) for benchmarks.
    """
    try:
        import faust
        from faust.types import TP
    except ImportError as exc:  # pragma: no cover - dependency guard
        from headrace.errors import missing_extra

        raise missing_extra("faust-streaming", "stream") from exc

    _short_fetch_wait(settings.fetch_max_wait_ms)
    relax_gc()  # process-wide: a worker process holds millions of long-lived tile cells
    metrics = StreamMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    engine = build_engine(settings, registry, metrics)
    ensure_topics(settings, engine.input_topics() + engine.side_topics())

    import os

    os.makedirs(f"{settings.data_dir}/{settings.worker_id}", exist_ok=True)
    app = faust.App(
        settings.group_id,
        **settings.faust_broker_kwargs(),
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        datadir=f"{settings.data_dir}/{settings.worker_id}",
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        store="memory://",
        stream_buffer_maxsize=16 * _TAKE,
        broker_max_poll_records=4 * _TAKE,
        consumer_max_fetch_size=8 * 1024 * 1024,
        broker_commit_interval=1.0,
        loghandlers=[],
    )
    flush_s = settings.flush_interval_ms / 1000
    offline_s = settings.offline_flush_interval_ms / 1000
    clock = {"online": time.monotonic(), "offline": time.monotonic(), "assigned": False}
    offline_task: dict[str, asyncio.Future | None] = {"fut": None}

    def maybe_flush(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - clock["online"] >= flush_s:
            engine.flush_online()
            clock["online"] = now
        fut = offline_task["fut"]
        if fut is not None and not fut.done():
            return
        if fut is not None:
            fut.result()  # surface an offline write error
            offline_task["fut"] = None
        paused = time.time() - engine.last_input >= flush_s  # input paused: write now
        if force or paused or now - clock["offline"] >= offline_s:
            batches = engine.offline_batches()
            clock["offline"] = now
            if batches:
                loop = asyncio.get_running_loop()
                offline_task["fut"] = loop.run_in_executor(
                    None, lambda: [engine.write_offline(b) for b in batches]
                )

    def make_agent(topic_name: str, handler: Any) -> None:
        topic = app.topic(
            topic_name,
            value_type=bytes,
            key_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )

        async def agent(stream: Any) -> None:
            async for events in stream.take_events(_TAKE, within=flush_s):
                handler(topic_name, [_raw(e) for e in events])
                for (t, p), offset in engine.take_seek_requests().items():
                    await app.consumer.seek(TP(t, p), offset)
                maybe_flush()

        agent.__name__ = agent.__qualname__ = "agent_" + topic_name.replace(".", "_").replace(
            "-", "_"
        )
        app.agent(topic, name=agent.__name__)(agent)

    for t in engine.sources:
        make_agent(t, engine.on_source)
    for t in engine.repartition:
        make_agent(t, engine.on_repartition)

    inputs = set(engine.input_topics())

    @app.on_partitions_revoked.connect
    async def _revoked(_sender: Any, revoked: Any, **_kw: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked if tp.topic in inputs]
        if tps:
            await _drain_offline()
            engine.revoke(tps)

    @app.on_partitions_assigned.connect
    async def _assigned(_sender: Any, assigned: Any, **_kw: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned if tp.topic in inputs]
        seeks = engine.assign(tps)
        for (t, p), offset in seeks.items():
            await app.consumer.seek(TP(t, p), offset)
        _resume_at_durable_offsets(app.consumer)
        engine.last_input = time.time()
        clock["assigned"] = True
        log.info("assigned %d partitions; resuming at %s", len(seeks), seeks)

    def _export_lag() -> None:
        """Lag per partition from the high watermark carried in fetch responses (never
        ListOffsets: wrong on the embedded broker, INFRA.md D1)."""
        for (t, p), prog in list(engine.progress.items()):
            try:
                high = app.consumer.highwater(TP(t, p))
            except (KeyError, AssertionError, AttributeError):  # nothing fetched yet
                continue
            if high is not None and high >= 0:
                metrics.lag.labels(t, str(p)).set(max(0, high - prog.next))
                if prog.max_ts > NO_TS:
                    lateness = engine.lateness_ms.get(prog.source or "", 0)
                    metrics.watermark.labels(t, str(p)).set(prog.max_ts - lateness)

    def _resume_at_durable_offsets(consumer: Any) -> None:
        """Faust's recovery seeks every partition to the group's Kafka-committed offset
        *after* assignment (``perform_seek``), and Faust commits what its agents have
        seen, not what is durable: re-seek to the engine's durable positions after it."""
        if getattr(consumer, "_headrace_seek_wrapped", False):
            return
        original = consumer.perform_seek

        async def perform_seek() -> None:
            await original()
            for (t, p), offset in engine.resume_offsets().items():
                await consumer.seek(TP(t, p), offset)

        consumer.perform_seek = perform_seek
        consumer._headrace_seek_wrapped = True

    async def _drain_offline() -> None:
        fut = offline_task["fut"]
        if fut is not None:
            await fut
            offline_task["fut"] = None

    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)

    @app.timer(flush_s)
    async def _tick() -> None:
        maybe_flush()
        _export_lag()
        if until_idle is None or not clock["assigned"]:
            return
        if time.time() - engine.last_input >= until_idle:
            await _drain_offline()
            maybe_flush(force=True)
            await _drain_offline()
            log.info("idle for %.1fs: stopping", until_idle)
            asyncio.ensure_future(_stop())

    async def _stop() -> None:
        await worker.stop()
        fut = getattr(worker, "_starting_fut", None)
        if fut is not None:
            fut.cancel()

    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0)
    if stats_path:
        import json

        with open(stats_path, "w", encoding="utf-8") as fh:
            json.dump(engine.stats, fh)
    return code
