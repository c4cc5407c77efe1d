"""The Faust worker: one agent reads every input topic and feeds the :class:`Engine`.

One agent reads every source and repartition topic in short take windows
(``take_window_ms``); each batch is one cycle: source messages (forwarding to the
repartition topics at once), repartition messages, then an online flush when due
(:class:`~streams.pacing.FlushPacer`). Freshness is bounded by these waits and the Kafka
hop of the repartitioned views, not by capacity, so the waits are short and per-batch
costs are kept per call rather than per partition or message. While catching up on a
backlog, take windows are gathered into larger batches (throughput). Offline parts are
written in the background at a lower CPU priority, staggered across partitions
(:class:`~streams.pacing.OfflineSchedule`). Faust's windowed tables are deliberately not
used (they expire by wall clock; shared/reference/feature-platforms.md §3): the engine
keeps event-time tiles itself.

On assignment the engine's durable progress (Redis) decides where each partition
resumes: the agent seeks there, also right after Faust's recovery seeks to the group's
Kafka-committed offsets (which Faust advances before data is durable,
:func:`~streams.faust_adapter.resume_at_durable_offsets`); Faust's own commits only
serve lag reporting. Every Faust work-around is in :mod:`streams.faust_adapter`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from headrace.core.settings import WorkerSettings
from streams import faust_adapter as fa
from streams.engine import Engine
from streams.memory import RELEASE_AFTER_EVICTIONS, RELEASE_EVERY_S, GcFreezer, release_memory
from streams.metrics import StreamMetrics
from streams.pacing import FlushPacer, OfflineSchedule, catching_up
from streams.progress_guard import CHECK_EVERY_S
from streams.rows import RawMessage

__all__ = ["Worker", "TAKE", "GATHER_BYTES", "APPLY_BYTES", "SLICE_LOADS",
           "OFFLINE_PARTS_IN_FLIGHT", "OFFLINE_NICE", "apply_slices", "background_priority"]

log = logging.getLogger(__name__)

TAKE = 1024  #: messages per agent batch
GATHER_BYTES = 8 << 20  #: most message bytes gathered into one batch while catching up
#: states a slice of a batch may load (cache misses) before the worker applies batches
#: in smaller slices. Every state a batch touches and the cache lacks is loaded for it,
#: and stays until its write is confirmed: a gathered backlog over millions of users
#: (8 MB, ~100k events) loaded ~100k states (~400 MB) above the cache's budget. After
#: a slice that loaded more than this, the next batches are applied in slices sized to
#: load about this many (each flushed, in the background, before the next is applied);
#: after slices that load less, the slices grow back to whole batches. A stream with
#: locality (states cached) never slices: it would write each state once per slice
SLICE_LOADS = 20_000
#: the smallest slice (message bytes)
APPLY_BYTES = 256 << 10

#: parts (of different partitions) written at once: a part's files are uploaded in
#: parallel already, but one part at a time left a small part (a few clicks spread over
#: many dates: many tiny files) holding up the next partition's, and a partition whose
#: part was due waited for every other partition's part to finish
OFFLINE_PARTS_IN_FLIGHT = 4
#: seconds a gap check waits for the log's answer (:meth:`Worker.first_offset_at`)
PROBE_S = 5.0

#: nice increment of the offline writer threads (Linux niceness is per thread, and the
#: threads a thread starts inherit it: the writer's own upload pool included)
OFFLINE_NICE = 10

TopicPartition = tuple[str, int]


def background_priority(increment: int = OFFLINE_NICE) -> None:
    """Lower the calling thread's CPU priority by ``increment`` (best effort: a no-op
    where per-thread priorities are unsupported)."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except (AttributeError, OSError):  # pragma: no cover - platform dependent
        log.debug("cannot lower the offline writer's priority", exc_info=True)


def apply_slices(msgs: list[RawMessage], most_bytes: int) -> list[list[RawMessage]]:
    """``msgs`` in order, cut into slices of at most ``most_bytes`` value bytes (a
    message larger than that is a slice of its own)."""
    slices: list[list[RawMessage]] = []
    part: list[RawMessage] = []
    size = 0
    for m in msgs:
        n = len(m.value or b"")
        if part and size + n > most_bytes:
            slices.append(part)
            part, size = [], 0
        part.append(m)
        size += n
    if part:
        slices.append(part)
    return slices


@dataclass
class _Backlog:
    """Messages taken but not processed yet (gathered while catching up)."""

    msgs: list[RawMessage] = field(default_factory=list)
    since: float = 0.0  # monotonic time the first of them was taken
    bytes: int = 0


class Worker:
    """One stream worker: a Faust app whose agent, signals, task and timer drive an
    :class:`Engine` through its methods.

    Args:
        settings: The worker's settings (broker, timings, data directory).
        engine: The engine, wired to its stores (``streams.app.build_engine``).
        metrics: The engine's metrics (lag and watermark gauges are set here).
        until_idle: Stop (after flushing everything) once no input arrived for this
            many seconds after the first assignment; None runs until stopped.
        rebuild_online: Rebuild the online state from the log once assigned.
        own_process: The process is this worker's own (``headrace worker``): process-wide
            tuning may apply (the automatic cyclic GC is off while catching up on a
            backlog, :meth:`~streams.memory.GcFreezer.backlog`).
    """

    def __init__(self, settings: WorkerSettings, engine: Engine, metrics: StreamMetrics,
                 *, until_idle: float | None = None, rebuild_online: bool = False,
                 own_process: bool = False) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.until_idle = until_idle
        self.flush_s = settings.flush_interval_ms / 1000
        self.take_s = settings.take_window_ms / 1000
        self.pacer = FlushPacer(settings.flush_min_interval_ms / 1000, self.flush_s)
        #: when freed memory was last handed back (:mod:`streams.memory`), and whether
        #: a hand-back is running
        self._released, self._releasing = time.monotonic(), False
        self._evicted = 0  # the state cache's evictions at the last hand-back
        #: keeps the cyclic GC off the cached states (and, in a process of its own, off
        #: while catching up: :meth:`GcFreezer.backlog`)
        self.gc = GcFreezer(pause_in_backlog=own_process)
        self._offsets_client: Any = None  # asks the log directly (_log_client)
        self._offline_paused = False  # no offline part starts (a rebuild is waiting)
        engine.use_log_probe(self.first_offset_at)
        #: message bytes of the slices a batch is applied in (:data:`SLICE_LOADS`): small
        #: at first (the first batch of a backlog over millions of users would load a
        #: whole batch's states), doubling while slices load few states
        self._slice_bytes = 4 * APPLY_BYTES
        #: ``--rebuild-online``: rebuild once the partitions are assigned
        self._rebuild_requested = rebuild_online
        self._epoch_checked = time.monotonic()  # when the epoch marker was last read
        #: when the worker first found itself idle but not durable up to the log end
        self._behind_since: float | None = None
        self.offline_schedule = OfflineSchedule(settings.offline_flush_interval_ms / 1000,
                                                settings.partitions,
                                                settings.offline_part_rows)
        self.inputs = set(engine.input_topics())
        self._backlog = _Backlog()
        self._active = time.monotonic()  # when the agent last took or processed a batch
        self._assigned = False
        # the part being written per source partition (one at a time per partition: its
        # offline_next must advance in order); parts of different partitions overlap
        self._offline_inflight: dict[TopicPartition, asyncio.Future[None]] = {}
        self._offline_pool: ThreadPoolExecutor | None = None
        self.app: Any = None
        self._faust_worker: Any = None

    # ---------------------------------------------------------------- running
    def run(self) -> int:
        """Run until stopped (or idle for ``until_idle`` seconds). Returns the exit code."""
        faust = fa.require_faust()
        s = self.settings
        fa.short_fetch_wait(s.fetch_max_wait_ms)
        datadir = f"{s.data_dir}/{s.worker_id}"
        os.makedirs(datadir, exist_ok=True)
        self.app = faust.App(
            s.group_id,
            **s.faust_broker_kwargs(),
            value_serializer="raw",
            key_serializer="raw",
            web_enabled=False,
            datadir=datadir,
            topic_partitions=s.partitions,
            topic_allow_declare=False,
            topic_disable_leader=True,
            store="memory://",
            stream_buffer_maxsize=16 * TAKE,
            broker_max_poll_records=4 * TAKE,
            consumer_max_fetch_size=8 * 1024 * 1024,
            broker_commit_interval=1.0,
            loghandlers=[],
        )
        self._wire(self.app)
        # Parquet encoding and S3 uploads are background work: at a lower CPU priority
        # they cannot starve the loop that makes values fresh (durable all the same)
        self._offline_pool = ThreadPoolExecutor(
            OFFLINE_PARTS_IN_FLIGHT, thread_name_prefix="headrace-offline",
            initializer=background_priority,
        )
        self._faust_worker = faust.Worker(self.app, loglevel=s.log_level, quiet=True)
        code = 0
        try:
            self._faust_worker.execute_from_commandline()
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            self.gc.resume()
            self._offline_pool.shutdown(wait=True)
            self.engine.close()
            if self._offsets_client is not None:
                self._offsets_client.close()
        return code

    def _wire(self, app: Any) -> None:
        """Register the agent, the rebalance handlers, the flusher task and the timer."""
        # One agent reads every input topic, so a batch is one cycle: source messages
        # (which forward to the repartition topics at once), repartition messages, then
        # a flush. Per-topic agents each waited out their own take window and flush turn.
        source = app.topic(*self.engine.input_topics(), value_type=bytes, key_type=bytes,
                           value_serializer="raw", key_serializer="raw")
        app.agent(source, name="agent_inputs")(self._agent)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.task(self._flusher)
        app.timer(self.flush_s)(self._tick)

    # ---------------------------------------------------------------- the agent
    async def _agent(self, stream: Any) -> None:
        backlog = self._backlog
        async for events in stream.take_events(TAKE, within=self.take_s):
            msgs = [fa.raw_message(e) for e in events]
            self._active = time.monotonic()
            if not backlog.msgs:
                backlog.since = time.monotonic()
                backlog.bytes = 0
            backlog.msgs.extend(msgs)
            backlog.bytes += sum(len(m.value or b"") for m in msgs)
            # Live traffic is processed at once. While catching up on a backlog, take
            # windows are gathered into one batch (up to flush_s, TAKE messages and
            # GATHER_BYTES), so the per-batch costs stay small per event. Faust acks (and
            # may commit) gathered messages early: harmless, a restart resumes at durable
            # progress.
            behind = catching_up(msgs, time.time() * 1000)
            self.gc.backlog(behind)  # no automatic collections while catching up
            if (
                behind
                and len(backlog.msgs) < TAKE
                and backlog.bytes < GATHER_BYTES
                and time.monotonic() - backlog.since < self.flush_s
            ):
                continue
            await self.process_backlog()

    async def process_backlog(self) -> None:
        """Process the gathered messages as one batch, perform the re-seeks it asks
        for, then flush what is due."""
        msgs, self._backlog.msgs = self._backlog.msgs, []
        if not msgs:
            return
        engine = self.engine
        slices = apply_slices(msgs, self._slice_bytes)
        for i, part in enumerate(slices):
            if i:  # bound the states outside the cache: write the previous slice's
                started = time.monotonic()
                engine.flush_online(wait=False)
                self.pacer.flushed(started, time.monotonic())
            misses = engine.cache_misses()
            engine.on_messages(part)
            self._fit_slices(sum(len(m.value or b"") for m in part),
                             engine.cache_misses() - misses)
            for (t, p), offset in engine.take_seek_requests().items():
                await self.app.consumer.seek(fa.topic_partition(t, p), offset)
        self._active = time.monotonic()
        self.maybe_flush()

    def _fit_slices(self, size: int, loads: int) -> None:
        """Size the next slices from the last one: ``size`` message bytes that loaded
        ``loads`` states (:data:`SLICE_LOADS`)."""
        if loads > SLICE_LOADS:
            self._slice_bytes = max(APPLY_BYTES, int(size * SLICE_LOADS / loads))
        elif loads < SLICE_LOADS // 2:
            self._slice_bytes = min(GATHER_BYTES, self._slice_bytes * 2)

    # ---------------------------------------------------------------- flushes
    def maybe_flush(self, force: bool = False) -> None:
        """Flush online when the pacer says so (or ``force``), surface offline write
        errors, and start the offline parts that are due."""
        engine, now = self.engine, time.monotonic()
        if (force or self.pacer.due(now)) and engine.flush_online(wait=force):
            self.pacer.flushed(now, time.monotonic())
        inflight = self._offline_inflight
        for tp, fut in list(inflight.items()):
            if fut.done():
                del inflight[tp]
                fut.result()  # surface an offline write error
        # input paused (the agent has had no data for flush_s since it last took or
        # processed a batch): write now. Not from the start of the last batch: a busy
        # loop is no pause, and a misfire writes tiny parts that cost the loop as much
        # as full ones
        paused = time.monotonic() - self._active >= self.flush_s
        if self._offline_paused:
            return  # a rebuild waits for the parts in flight
        sources = [tp for tp in engine.source_partitions() if tp not in inflight]
        due = sources if force or paused else self.offline_schedule.due(
            sources, now, engine.buffered_rows)
        if due:
            self.offline_schedule.detached(due, now)
            loop = asyncio.get_running_loop()
            for batch in engine.offline_batches(set(due)):
                tp = (batch[0].topic, batch[0].partition)
                inflight[tp] = loop.run_in_executor(
                    self._offline_pool, engine.write_offline, batch)

    async def drain_offline(self) -> None:
        """Wait for every offline part in flight (re-raising a write error). A part
        stays listed until it is done, so nothing detaches a second part of its
        partition meanwhile (the engine refuses to as well)."""
        inflight = self._offline_inflight
        while inflight:
            tp, fut = next(iter(inflight.items()))
            try:
                await asyncio.shield(fut)
            finally:
                if fut.done() and inflight.get(tp) is fut:
                    del inflight[tp]

    async def _flusher(self) -> None:
        """Flushes what the last batch left once it is due (a timer would warn about
        overlapping runs at this interval), and offline parts once input pauses."""
        pacer, backlog = self.pacer, self._backlog
        while True:
            wait = pacer.last + pacer.gap() - time.monotonic()
            await asyncio.sleep(max(wait, pacer.min_s))
            if backlog.msgs and time.monotonic() - backlog.since >= self.flush_s:
                await self.process_backlog()  # the gathered batch got no more input
            self.maybe_flush()

    # ---------------------------------------------------------------- rebalances
    async def _on_revoked(self, _sender: Any, revoked: Any, **_kw: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked if tp.topic in self.inputs]
        if tps:
            await self.process_backlog()
            await self.drain_offline()
            self.engine.revoke(tps)

    def _log_client(self) -> Any:
        """A consumer of the worker's own that joins no group: asks the log directly
        (:meth:`log_starts`, :meth:`first_offset_at`)."""
        if self._offsets_client is None:
            from confluent_kafka import Consumer

            conf = {**self.settings.confluent_common(),
                    "group.id": f"{self.settings.group_id}.log-starts",
                    "enable.auto.commit": False, "auto.offset.reset": "earliest",
                    "isolation.level": "read_uncommitted",  # as Faust's consumer reads
                    "enable.partition.eof": True}
            conf.pop("session.timeout.ms", None)
            conf.pop("heartbeat.interval.ms", None)
            self._offsets_client = Consumer(conf)
        return self._offsets_client

    def first_offset_at(self, topic: str, partition: int, offset: int) -> int | None:
        """The first offset at or after ``offset`` that the log of ``topic[partition]``
        holds (its start when ``offset`` is before it), read with a fetch; None when the
        broker does not answer within :data:`PROBE_S` or holds nothing there."""
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        try:
            client = self._log_client()
            client.assign([TopicPartition(topic, partition, offset)])
            try:
                deadline = time.monotonic() + PROBE_S
                while (left := deadline - time.monotonic()) > 0:
                    msg = client.poll(min(left, 0.5))
                    if msg is None:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return None
                        continue
                    if msg.topic() == topic and msg.partition() == partition:
                        return int(msg.offset())
                return None
            finally:
                client.unassign()
        except (KafkaException, RuntimeError) as exc:
            log.warning("cannot ask the log of %s[%d] (gap unverified): %s", topic,
                        partition, exc)
            return None

    def log_starts(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The first retained offset of each partition, asked synchronously of a
        consumer of its own that joins no group ({} where the broker will not say:
        then 0 is assumed). Synchronous on purpose: awaiting Faust here let its recovery
        seek run before the engine knew the partitions, and the worker resumed at the
        group's Kafka commit, past what is durable."""
        if not tps:
            return {}
        from confluent_kafka import KafkaException, TopicPartition

        try:
            client = self._log_client()
            out = {}
            for t, p in tps:
                low, _high = client.get_watermark_offsets(
                    TopicPartition(t, p), timeout=5, cached=False)
                if low is not None and low >= 0:
                    out[(t, p)] = int(low)
            return out
        except (KafkaException, RuntimeError) as exc:
            log.warning("cannot read the log start offsets (0 assumed): %s", exc)
            return {}

    async def rebuild_online(self, reason: str) -> None:
        """Rebuild the online state from the log (:meth:`Engine.rebuild_online`):
        offline parts in flight finish first (no new one starts meanwhile), then, with
        no await in between, the gathered batch is dropped (re-read) and the engine
        rebuilt: messages gathered while waiting would otherwise be lost, or applied
        after the rebuild as if they followed the log's start."""
        self._offline_paused = True
        try:
            await self.drain_offline()
        finally:
            self._offline_paused = False
        self._backlog.msgs = []
        tps = list(self.engine.resume_offsets())
        seeks = self.engine.rebuild_online(self.log_starts(tps), reason)
        consumer = self.app.consumer
        for (t, p), offset in seeks.items():
            await consumer.seek(fa.topic_partition(t, p), offset)
        self.engine.mark_input()

    async def _on_assigned(self, _sender: Any, assigned: Any, **_kw: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned if tp.topic in self.inputs]
        seeks = self.engine.assign(tps, self.log_starts(tps))
        consumer = self.app.consumer
        for (t, p), offset in seeks.items():
            await consumer.seek(fa.topic_partition(t, p), offset)
        fa.resume_at_durable_offsets(consumer, self.engine.resume_offsets)
        fa.deliver_every_message(consumer)
        self.engine.mark_input()
        self._assigned = True
        log.info("assigned %d partitions; resuming at %s", len(seeks), seeks)
        if self._rebuild_requested and seeks:
            self._rebuild_requested = False
            await self.rebuild_online("--rebuild-online")

    # ---------------------------------------------------------------- the timer
    def not_durable(self) -> dict[str, str]:
        """Partitions not durable up to their log end (see :meth:`Engine.not_durable`):
        empty when an idle worker may stop."""
        consumer = self.app.consumer
        return self.engine.not_durable(lambda t, p: fa.highwater(consumer, t, p))

    def _release_done(self, fut: Any) -> None:
        self._releasing = False
        if fut.exception() is not None:
            log.warning("returning freed memory failed: %s", fut.exception())

    def export_lag(self) -> None:
        """Lag and watermark gauges per partition, from the high watermark carried in
        fetch responses (:func:`~streams.faust_adapter.highwater`)."""
        consumer = self.app.consumer
        for t, p, nxt, watermark in self.engine.positions():
            high = fa.highwater(consumer, t, p)
            if high is None:
                continue
            self.metrics.lag.labels(t, str(p)).set(max(0, high - nxt))
            if watermark is not None:
                self.metrics.watermark.labels(t, str(p)).set(watermark)

    async def _tick(self) -> None:
        self.gc.tick()
        self.export_lag()
        if self.engine.stalled():
            # waiting for a store is not idleness: --until-idle counts from its end
            self.engine.mark_input()
        elif self._assigned and time.monotonic() - self._epoch_checked >= CHECK_EVERY_S:
            self._epoch_checked = time.monotonic()
            if not self.engine.progress_intact():
                await self.rebuild_online("Redis lost the group's progress (its epoch "
                                          "marker is gone)")
        now = time.monotonic()
        evicted = self.engine.cache_evictions()
        if (now - self._released >= RELEASE_EVERY_S and not self._releasing
                and evicted - self._evicted >= RELEASE_AFTER_EVICTIONS):
            self._released, self._releasing, self._evicted = now, True, evicted
            fut = asyncio.get_running_loop().run_in_executor(None, release_memory)
            fut.add_done_callback(self._release_done)
        if self.until_idle is None or not self._assigned:
            return
        idle = self.engine.idle_s()
        since_stall = self.engine.since_stall_s(time.monotonic())
        if since_stall is not None:  # a stall that blocked the loop was no idle time either
            idle = min(idle, since_stall)
        if idle >= self.until_idle and not self._backlog.msgs:
            await self.drain_offline()
            self.maybe_flush(force=True)
            await self.drain_offline()
            self.maybe_flush(force=True)  # parts the first round could not detach
            await self.drain_offline()
            behind = self.not_durable()
            if behind:
                now = time.monotonic()
                if self._behind_since is None:
                    self._behind_since = now
                # the log end can be out of reach (records a fetch never returns): wait
                # a while for it, then stop with a warning rather than run forever
                if now - self._behind_since < max(self.until_idle, 30.0):
                    log.info("idle, but not yet durable up to the log end: %s", behind)
                    self.engine.mark_input()
                    return
                log.warning("stopping idle although not durable up to the log end: %s",
                            behind)
            log.info("idle for %.1fs: stopping", self.until_idle)
            # stop() alone ends execute_from_commandline (pinned in the adapter's tests)
            asyncio.ensure_future(self._faust_worker.stop())
