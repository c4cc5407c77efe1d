"""The Faust worker: agents built from the definitions feed the :class:`Engine`.

One agent reads every source and repartition topic in short take windows
(``take_window_ms``); each batch is one cycle: source messages (forwarding to the
repartition topics at once), repartition messages, then an online flush when due
(:class:`~streams.pacing.FlushPacer`). Freshness is bounded by these waits and the Kafka hop of the
repartitioned views, not by capacity, so the waits are short and per-batch costs are
kept per call rather than per partition or message. While catching up on a backlog,
take windows are gathered into larger batches (throughput). Offline parts are written
in the background at a lower CPU priority, staggered across partitions
(:class:`~streams.pacing.OfflineSchedule`). Faust's windowed tables are deliberately not used (they
expire by wall clock; shared/reference/feature-platforms.md §3): the engine keeps
event-time tiles itself.

On assignment the engine's durable progress (Redis) decides where each partition
resumes: the agent seeks there, also right after Faust's recovery seeks to the group's
Kafka-committed offsets (which Faust advances before data is durable); Faust's own
commits only serve lag reporting.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from feature_defs.registry import Registry
from feature_defs.state import NO_TS
from headrace.core.settings import WorkerSettings
from streams.engine import Engine, RawMessage
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter, resolve_filesystem
from streams.online import RedisOnlineStore
from streams.pacing import FlushPacer, OfflineSchedule, catching_up
from streams.sides import KafkaSideOutputs

__all__ = ["build_engine", "ensure_topics", "run_worker"]

log = logging.getLogger(__name__)
_TAKE = 1024  # messages per agent batch
_GATHER_BYTES = 8 << 20  # most message bytes gathered into one batch while catching up


def build_engine(
    settings: WorkerSettings, registry: Registry, metrics: StreamMetrics | None = None
) -> Engine:
    """Wire the engine to the real Redis, offline store and Kafka side outputs."""
    fs, root = resolve_filesystem(settings.offline_uri, settings.pyarrow_s3())
    producer_conf = {**settings.confluent_producer(), "enable.idempotence": True}
    return Engine(
        registry=registry,
        store=RedisOnlineStore(settings.redis_url),
        background_writes=True,
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

    from headrace.core.errors import BrokerError

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
#: young collections between two collections of the middle generation. Each of those
#: scans everything promoted since the previous one: with 20 (up to 20 x 50k objects) it
#: stalled the loop ~100 ms here, a freshness outlier; with 2 the same work comes in
#: ~10 ms slices (objects still reach the old generation after one middle collection)
GC_GEN1_THRESHOLD = 2


def relax_gc() -> None:
    """Raise the GC's young-generation threshold to :data:`GC_GEN0_THRESHOLD` (never
    lowers a higher setting) with :data:`GC_GEN1_THRESHOLD` for the middle generation;
    process-wide, like any ``gc.set_threshold``."""
    gen0, _gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, gen2)


def warm_up() -> None:
    """Pay one-time lazy imports before the first batch, not inside it: pyarrow imports
    its pandas shim on the first ``pa.array`` call (0.3 s here, over 1 s on a loaded
    machine), which otherwise delays the first events' freshness."""
    import pyarrow as pa

    pa.array([0])


#: parts (of different partitions) written at once: a part's files are uploaded in
#: parallel already, but one part at a time left a small part (a few clicks spread over
#: many dates: many tiny files) holding up the next partition's, and a partition whose
#: part was due waited for every other partition's part to finish
OFFLINE_PARTS_IN_FLIGHT = 4

#: nice increment of the offline writer threads (Linux niceness is per thread, and the
#: threads a thread starts inherit it: the writer's own upload pool included)
OFFLINE_NICE = 10


def background_priority(increment: int = OFFLINE_NICE) -> None:
    """Lower the calling thread's CPU priority by ``increment`` (best effort: a no-op
    where per-thread priorities are unsupported)."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except (AttributeError, OSError):  # pragma: no cover - platform dependent
        log.debug("cannot lower the offline writer's priority", exc_info=True)


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
        from headrace.core.errors import missing_extra

        raise missing_extra("faust-streaming", "stream") from exc

    _short_fetch_wait(settings.fetch_max_wait_ms)
    relax_gc()  # process-wide: a worker process holds millions of long-lived tile cells
    warm_up()
    metrics = StreamMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    engine = build_engine(settings, registry, metrics)
    ensure_topics(settings, engine.input_topics() + engine.side_topics())

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
    take_s = settings.take_window_ms / 1000
    offline_s = settings.offline_flush_interval_ms / 1000
    pacer = FlushPacer(settings.flush_min_interval_ms / 1000, flush_s)
    offline_schedule = OfflineSchedule(offline_s, settings.partitions,
                                       settings.offline_part_rows)
    clock = {"active": time.monotonic(), "assigned": False}
    # the part being written per source partition (one at a time per partition: its
    # offline_next must advance in order); parts of different partitions overlap
    offline_inflight: dict[tuple[str, int], asyncio.Future] = {}
    # Parquet encoding and S3 uploads are background work: at a lower CPU priority they
    # cannot starve the loop that makes values fresh (the part is durable all the same)
    offline_pool = ThreadPoolExecutor(
        OFFLINE_PARTS_IN_FLIGHT, thread_name_prefix="headrace-offline",
        initializer=background_priority,
    )

    def maybe_flush(force: bool = False) -> None:
        now = time.monotonic()
        if (force or pacer.due(now)) and engine.flush_online(wait=force):
            pacer.flushed(now, time.monotonic())
        for tp, fut in list(offline_inflight.items()):
            if fut.done():
                del offline_inflight[tp]
                fut.result()  # surface an offline write error
        # input paused (the agent has had no data for flush_s since it last took or
        # processed a batch): write now. Not from the start of the last batch: a busy
        # loop is no pause, and a misfire writes tiny parts that cost the loop as much
        # as full ones
        paused = time.monotonic() - clock["active"] >= flush_s
        sources = [tp for tp, prog in engine.progress.items()
                   if prog.source is not None and tp not in offline_inflight]
        due = sources if force or paused else offline_schedule.due(
            sources, now, lambda tp: engine.progress[tp].buffered_rows())
        if due:
            offline_schedule.detached(due, now)
            loop = asyncio.get_running_loop()
            for batch in engine.offline_batches(set(due)):
                tp = (batch[0].topic, batch[0].partition)
                offline_inflight[tp] = loop.run_in_executor(
                    offline_pool, engine.write_offline, batch)

    # One agent reads every input topic, so a batch is one cycle: source messages (which
    # forward to the repartition topics at once), repartition messages, then a flush.
    # Per-topic agents each waited out their own take window and flush turn.
    source = app.topic(
        *engine.input_topics(),
        value_type=bytes,
        key_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
    )
    backlog: dict[str, Any] = {"msgs": [], "since": 0.0, "bytes": 0}

    async def process_backlog() -> None:
        msgs, backlog["msgs"] = backlog["msgs"], []
        if not msgs:
            return
        by_topic: dict[str, list[RawMessage]] = {}
        for raw in msgs:
            by_topic.setdefault(raw.topic, []).append(raw)
        for t, part in by_topic.items():
            if t in engine.sources:
                engine.on_source(t, part)
        for t, part in by_topic.items():
            if t in engine.repartition:
                engine.on_repartition(t, part)
        for (t, p), offset in engine.take_seek_requests().items():
            await app.consumer.seek(TP(t, p), offset)
        clock["active"] = time.monotonic()
        maybe_flush()

    @app.agent(source, name="agent_inputs")
    async def agent_inputs(stream: Any) -> None:
        async for events in stream.take_events(_TAKE, within=take_s):
            msgs = [_raw(e) for e in events]
            clock["active"] = time.monotonic()
            if not backlog["msgs"]:
                backlog["since"] = time.monotonic()
                backlog["bytes"] = 0
            backlog["msgs"].extend(msgs)
            backlog["bytes"] += sum(len(m.value or b"") for m in msgs)
            # Live traffic is processed at once. While catching up on a backlog, take
            # windows are gathered into one batch (up to flush_s, _TAKE messages and
            # _GATHER_BYTES), so the per-batch costs stay small per event. Faust acks (and
            # may commit) gathered messages early: harmless, a restart resumes at durable
            # progress.
            if (
                catching_up(msgs, time.time() * 1000)
                and len(backlog["msgs"]) < _TAKE
                and backlog["bytes"] < _GATHER_BYTES
                and time.monotonic() - backlog["since"] < flush_s
            ):
                continue
            await process_backlog()

    inputs = set(engine.input_topics())

    @app.on_partitions_revoked.connect
    async def _revoked(_sender: Any, revoked: Any, **_kw: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked if tp.topic in inputs]
        if tps:
            await process_backlog()
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
        while offline_inflight:
            _tp, fut = offline_inflight.popitem()
            await fut

    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)

    @app.task
    async def _flusher() -> None:
        """Flushes what the last batch left once it is due (a timer would warn about
        overlapping runs at this interval), and offline parts once input pauses."""
        while True:
            wait = pacer.last + pacer.gap() - time.monotonic()
            await asyncio.sleep(max(wait, pacer.min_s))
            if backlog["msgs"] and time.monotonic() - backlog["since"] >= flush_s:
                await process_backlog()  # the gathered batch got no more input
            maybe_flush()

    @app.timer(flush_s)
    async def _tick() -> None:
        _export_lag()
        if until_idle is None or not clock["assigned"]:
            return
        if time.time() - engine.last_input >= until_idle and not backlog["msgs"]:
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
    finally:
        offline_pool.shutdown(wait=True)
        engine.online_writes.close()
    if stats_path:
        import json

        with open(stats_path, "w", encoding="utf-8") as fh:
            json.dump(engine.stats, fh)
    return code
