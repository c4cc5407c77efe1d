"""The stream engine: watermarks, lateness, fenced view updates, side outputs, flushes.

Independent of Faust (the worker, :mod:`streams.worker`, feeds it message batches), so
the same engine runs under tests with fakes and under the Faust worker with real
services.

Per source (topic, partition) the engine keeps a watermark (max event time seen); an
event with ``ts`` strictly below it minus a view's allowed lateness on arrival is late
for that view and not applied to it; late for every view reading the source, it is
counted, published to the ``late`` topic and kept out of the offline ``events/``
(:mod:`feature_defs.topology`). Accepted events are

* applied to the views keyed by the routing key (``user_id``) in this process;
* forwarded, re-keyed, to ``headrace-repartition-{entity}`` for the other entities with
  a view reading the source, carrying their source coordinates so the consumer can
  fence replays;
* buffered for the offline store.

Effectively once. Progress is recorded per partition in Redis *after* the data it
covers is durable: ``online_next``/``online_wm`` after view states and side outputs are
flushed, ``offline_next``/``offline_wm`` after a part is written. A restarted worker
resumes each partition at the smaller of the two with the watermark recorded there
(so lateness decisions replay identically), re-applies nothing twice (each view state
carries per-source fences), re-publishes no side output below ``online_next`` and
rewrites the part at ``offline_next`` under the same file names.

The concerns live in their own modules, composed here: admission and progress
(:mod:`streams.admission`), applying rows to view states (:mod:`streams.apply`), and
online and offline flushes (:mod:`streams.flush`); routing and source kinds come from the
registry's compiled topology (:class:`~feature_defs.topology.Topology`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from feature_defs.layout import TOPIC_DLQ, TOPIC_LATE, commit_key, repartition_topic
from feature_defs.registry import Registry
from headrace.core.online_store import OnlineStore
from streams.admission import MAX_GAP_SEEKS, Admission
from streams.apply import ViewApplier
from streams.flush import OfflineFlush, OfflinePart, OnlineFlush
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter
from streams.online import OnlineWrites
from streams.outages import Outages
from streams.progress_guard import ProgressGuard
from streams.rows import PartitionProgress, RawMessage, concat
from streams.run_stats import RunStats
from streams.sides import SideOutputs

__all__ = ["Engine", "RawMessage", "PartitionProgress", "RunStats", "MAX_GAP_SEEKS"]

TopicPartition = tuple[str, int]

log = logging.getLogger(__name__)


class Engine:
    """Turns message batches into view states, offline parts and side outputs.

    Args:
        registry: The views, their plans and topology.
        store: The online store (view states, commit records).
        writer: The offline Parquet writer, or None (no offline parts).
        sides: Side outputs (forwards, dead letters, late events).
        topic: Maps a topic name to the deployment's (prefixed) name.
        redis_prefix: Prefix of every Redis key.
        group: The consumer group (names the commit records).
        max_future_ms: How far past the wall clock an event time may lie.
        metrics: Prometheus metrics (a private set when None).
        clock: Wall clock, epoch seconds.
        background_writes: Run online writes on a background thread
            (:meth:`flush_online` with ``wait=False``).
        state_cache_bytes: Budget of the view-state cache in bytes (durable states
            beyond it are evicted, least recently used first, and reloaded from the
            store on their next touch: :mod:`streams.state_cache`); None: unbounded.
        outages: The dependencies' outage trackers (the calls made through ``store``,
            ``writer`` and ``sides`` retry on their own; the worker reads
            ``outages.stalled``); None: a private set, never stalled.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        store: OnlineStore,
        writer: OfflineWriter | None,
        sides: SideOutputs,
        topic: Callable[[str], str],
        redis_prefix: str,
        group: str,
        max_future_ms: int,
        metrics: StreamMetrics | None = None,
        clock: Callable[[], float] = time.time,
        background_writes: bool = False,
        state_cache_bytes: int | None = None,
        outages: Outages | None = None,
    ) -> None:
        topo = registry.topology
        self.registry = registry
        self.store = store
        self.redis_prefix = redis_prefix
        self.group = group
        self.topic = topic
        self.max_future_ms = max_future_ms
        self.metrics = metrics or StreamMetrics()
        self.outages = outages or Outages.for_metrics(self.metrics)
        self.clock = clock
        #: run statistics for benchmarks (``headrace worker --stats``)
        self.stats = RunStats()
        #: source topic (prefixed) -> source name; repartition topic -> entity
        self.sources = {topic(s): s for s in topo.sources}
        self.repartition = {topic(repartition_topic(e)): e for e in topo.repartitioned}
        self.kinds = topo.source_kinds
        #: source -> the repartitioned entities with a view reading it (forward targets)
        self._forward_to = {s: [e for e in topo.repartitioned if s in topo.forward_sources[e]]
                            for s in topo.sources}
        self.admission = Admission(
            sources=self.sources, lateness_ms=topo.lateness_ms, store=store, writer=writer,
            sides=sides, prefix=redis_prefix, group=group, metrics=self.metrics,
            stats=self.stats, clock=clock, mixed_lateness=topo.mixed_lateness)
        self.guard = ProgressGuard(store, redis_prefix, group, self.metrics)
        self.admission.on_lost = lambda t: self.guard.lost.labels(t).inc()
        self.views = ViewApplier(registry=registry, store=store, prefix=redis_prefix,
                                 metrics=self.metrics, cache_bytes=state_cache_bytes,
                                 sides=sides)  # unreadable states are dead-lettered
        self.sides = sides
        self.online = OnlineFlush(
            views=self.views, admission=self.admission, sides=sides,
            writes=OnlineWrites(store, background=background_writes, clock=clock,
                                observe=self.metrics.redis_write.observe,
                                failed=self.metrics.write_errors.labels("redis").inc),
            prefix=redis_prefix, group=group, metrics=self.metrics, stats=self.stats)
        self.online.guard = self.guard
        self.offline = OfflineFlush(
            registry=registry, admission=self.admission, writer=writer, store=store,
            prefix=redis_prefix, group=group, metrics=self.metrics, stats=self.stats,
            clock=clock)
        self.last_input = self.clock()

    # ---------------------------------------------------------------- topology
    def input_topics(self) -> list[str]:
        """Topics the worker consumes (prefixed): sources, then repartition topics."""
        return list(self.sources) + list(self.repartition)

    def side_topics(self) -> list[str]:
        """Topics the engine produces to (prefixed): dead letters, late, repartition."""
        return [self.topic(TOPIC_DLQ), self.topic(TOPIC_LATE), *self.repartition]

    @property
    def progress(self) -> dict[TopicPartition, PartitionProgress]:
        """Progress per assigned partition (read-only use)."""
        return self.admission.progress

    @property
    def online_writes(self) -> OnlineWrites:
        """The online write runner (tests replace it to gate writes)."""
        return self.online.writes

    @online_writes.setter
    def online_writes(self, writes: OnlineWrites) -> None:
        self.online.writes = writes

    # ---------------------------------------------------------------- assignment
    def assign(self, tps: Sequence[TopicPartition],
               log_starts: Mapping[TopicPartition, int] | None = None
               ) -> dict[TopicPartition, int]:
        """Load durable progress for newly assigned partitions (recovering partitions
        whose progress Redis lost: :meth:`Admission.assign`); returns seek offsets.
        Adopts the group's epoch marker (:mod:`streams.progress_guard`)."""
        seeks = self.admission.assign(tps, log_starts, redis_intact=self.guard.present())
        self.guard.adopt()
        return seeks

    def use_log_probe(self, probe: Callable[[str, int, int], int | None]) -> None:
        """Ask the log with ``probe`` before accepting a gap in delivered offsets
        (:attr:`streams.admission.Admission.log_probe`)."""
        self.admission.log_probe = probe

    def progress_intact(self) -> bool:
        """Whether Redis still holds the group's epoch marker (False: it lost its data
        under this worker; :meth:`rebuild_online` recovers). Waits for the write in
        flight first, so what it wrote is covered by the answer."""
        self.online.writes.finish()
        return self.guard.intact()

    def rebuild_online(self, log_starts: Mapping[TopicPartition, int], reason: str
                       ) -> dict[TopicPartition, int]:
        """Rebuild the online state from the log (:mod:`streams.progress_guard`): delete
        the states written since the epoch marker was last seen and the partitions'
        online progress, forget every cached state, replay every assigned partition
        from ``log_starts`` (offline progress kept: no part is deleted or rewritten).
        Call with no offline part in flight. Returns the seeks."""
        self.online.writes.finish()
        self.sides.flush()  # side outputs so far are out: the replay publishes none again
        stale = sorted(self.guard.written)
        commits = [commit_key(self.redis_prefix, self.group, t, p)
                   for t, p in self.admission.progress]
        self.store.delete(stale + commits)
        self.store.forget_expiries()
        self.views.reset()
        self.online.discard_pending()
        seeks = self.admission.rebuild(log_starts, time.monotonic())
        # the offline progress, recorded again (a crash must not read offline_next 0)
        self.store.write([], {
            commit_key(self.redis_prefix, self.group, p.topic, p.partition):
                {"offline_next": p.offline_next, "offline_wm": p.offline_wm}
            for p in self.admission.progress.values() if p.source is not None})
        self.guard.adopt()
        self.guard.rebuilds.inc()
        for t, _p in self.admission.progress:
            self.guard.lost.labels(t).inc()
        starts = {f"{t}/{p}": o for (t, p), o in seeks.items() if o}
        log.warning("%s: rebuilding the online state from the log (%d partitions, %d stale "
                    "keys deleted%s); the offline store is kept", reason, len(seeks),
                    len(stale), f"; log starts {starts}" if starts else "")
        return seeks

    def revoke(self, tps: Sequence[TopicPartition]) -> None:
        """Flush what was processed, then forget the partitions."""
        self.flush_online()
        self.flush_offline()
        self.admission.forget(tps)
        self.views.clear()  # another worker owns some keys now

    def take_seek_requests(self) -> dict[TopicPartition, int]:
        """Seeks the consumer must perform (re-seeks over a gap in offsets); clears them."""
        return self.admission.take_seek_requests()

    def resume_offsets(self) -> dict[TopicPartition, int]:
        """Where each assigned partition continues (next offset to process)."""
        return self.admission.resume_offsets()

    # ---------------------------------------------------------------- processing
    def on_messages(self, messages: Sequence[RawMessage]) -> None:
        """Process one batch of any input topics: source messages first (their forwards
        go out at once), then repartition messages, each topic's in arrival order. The
        states the batch misses are loaded in one round trip (:meth:`ViewApplier.batch`)."""
        by_topic: dict[str, list[RawMessage]] = {}
        for raw in messages:
            by_topic.setdefault(raw.topic, []).append(raw)
        with self.views.batch():
            for t, part in by_topic.items():
                if t in self.sources:
                    self.on_source(t, part)
            for t, part in by_topic.items():
                if t in self.repartition:
                    self.on_repartition(t, part)

    def on_source(self, topic: str, messages: Sequence[RawMessage]) -> None:
        """Process messages of one source topic (any partitions, in arrival order)."""
        from streams.codec import decode_batch

        source = self.sources[topic]
        kind = self.kinds[source]
        self.last_input = self.clock()
        by_part: dict[int, list[RawMessage]] = {}
        for m in messages:
            by_part.setdefault(m.partition, []).append(m)
        now_ms = int(self.clock() * 1000)
        admission = self.admission
        accepted: list[tuple[int, pa.Table, np.ndarray]] = []
        forwards: list[pa.Table] = []
        for part, msgs in by_part.items():
            prog = admission.progress.get((topic, part))
            if prog is None:
                continue  # not (or no longer) ours
            msgs = admission.admit(prog, msgs)
            if not msgs:
                continue
            decoded = decode_batch(kind, msgs, now_ms=now_ms, max_future_ms=self.max_future_ms)
            for dl in decoded.dead:
                self.metrics.dead.labels(topic, dl.reason.split(":", 1)[0]).inc()
                if dl.offset >= max(prog.online_next, prog.sides_next):
                    self.sides.dead_letter(dl)
            table = decoded.table
            if table.num_rows:
                kept = admission.accept(prog, source, table, msgs)
                if kept is not None:
                    table, ts, rows = kept
                    accepted.append((part, table, ts))
                    if rows.num_rows:
                        forwards.append(rows)
            prog.next = msgs[-1].offset + 1
        targets = self._forward_to[source]
        if forwards and targets:
            # one forward per entity for the whole call, not per partition: small batches
            # would otherwise multiply the repartition messages (and their fixed costs).
            # Sent before the local apply and at once: the other entities' values wait
            # for this Kafka round trip. Only to entities with a view reading the source
            rows = concat(forwards)
            for entity in targets:
                self.sides.forward(entity, self.views.forward_rows(entity, source, rows))
            self.sides.send()
        # every partition of the call at once: per call, not per event, costs dominate
        # the small batches that keep values fresh
        if accepted:
            self.views.apply_local(source, accepted)
            for _, _, ts in accepted:
                self.online.applied(ts)

    def on_repartition(self, topic: str, messages: Sequence[RawMessage]) -> None:
        """Apply forwarded rows (Arrow IPC envelopes) to the views of their entity."""
        entity = self.repartition[topic]
        self.last_input = self.clock()
        admission = self.admission
        tables: list[pa.Table] = []
        for m in messages:
            prog = admission.progress.get((topic, m.partition))
            if prog is None or not admission.admit(prog, [m]):
                continue
            if m.value:
                tables.append(pa.ipc.open_stream(m.value).read_all())
            prog.next = m.offset + 1
        tables = [t for t in tables if t.num_rows]
        if tables:
            # all messages at once (per message, the fixed costs dominated small batches)
            self.online.applied(self.views.apply_remote(entity, concat(tables)))

    # ---------------------------------------------------------------- flushing
    def flush_online(self, wait: bool = True) -> int:
        """Write dirty states, publish side outputs, then record progress. Returns #states.

        With ``wait=False`` (and an engine made with ``background_writes``) the Redis
        write runs in the background: its progress (``online_next``), commit time and
        freshness are recorded by the next flush (or ``online_writes.finish()``), which
        waits for it first; one write is in flight at most.
        """
        return self.online.flush(wait)

    def offline_batches(
        self, only: Collection[TopicPartition] | None = None
    ) -> list[OfflinePart]:
        """Detach buffered parts: (progress, start, next, max_ts, table) per partition
        (of the source partitions in ``only``, when given)."""
        return self.offline.batches(only)

    def write_offline(self, batch: OfflinePart) -> None:
        """Write one detached part, then record ``offline_next`` (callable from another
        thread: touches only the part and the progress fields it owns)."""
        self.offline.write(batch)

    def flush_offline(self) -> int:
        """Synchronously write every buffered part. Returns the number of parts."""
        return self.offline.flush()

    # ---------------------------------------------------------------- the worker's view
    def source_partitions(self) -> list[TopicPartition]:
        """The assigned source partitions (those that produce offline parts)."""
        return self.admission.source_partitions()

    def buffered_rows(self, tp: TopicPartition) -> int:
        """Events buffered for ``tp``'s next offline part."""
        return self.admission.buffered_rows(tp)

    def positions(self) -> Iterator[tuple[str, int, int, int | None]]:
        """(topic, partition, next offset, watermark ms or None) per assigned partition,
        for lag and watermark metrics."""
        return self.admission.positions()

    def not_durable(self, highwater: Callable[[str, int], int | None]
                    ) -> dict[str, str]:
        """Partitions whose durable progress does not reach their log end
        (``highwater(topic, partition)``: the next offset the log will take, None when
        unknown) or whose processed events are not all durable, online and (source
        partitions, with a writer) offline: ``topic/partition`` -> what is missing."""
        out: dict[str, str] = {}
        has_writer = self.offline.writer is not None
        for (t, p), prog in self.admission.progress.items():
            high = highwater(t, p)
            want = max(prog.next, high or 0)
            offline = prog.source is not None and has_writer
            if prog.online_next < want or (offline and prog.offline_next < want):
                out[f"{t}/{p}"] = (f"log end {high}, processed {prog.next}, online "
                                   f"{prog.online_next}, offline "
                                   f"{prog.offline_next if offline else '-'}")
        return out

    def cache_evictions(self) -> int:
        """States evicted from the state cache since the start."""
        return self.views.cache.evictions

    def cache_misses(self) -> int:
        """States loaded from the store since the start (the state cache's misses)."""
        return self.views.cache.misses

    def stalled(self) -> bool:
        """Whether a store call is waiting out an outage now (:mod:`streams.outages`)."""
        return self.outages.stalled

    def since_stall_s(self, now: float) -> float | None:
        """Seconds (monotonic ``now``) since the latest outage ended, or None."""
        return self.outages.since_stall_s(now)

    def mark_input(self) -> None:
        """Count now as the time of the last input (a fresh assignment, say)."""
        self.last_input = self.clock()

    def idle_s(self) -> float:
        """Seconds since the last input (or :meth:`mark_input`)."""
        return self.clock() - self.last_input

    def run_stats(self) -> RunStats:
        """The run statistics so far (see :class:`~streams.run_stats.RunStats`)."""
        return self.stats

    def close(self) -> None:
        """Wait for an online write in flight and stop its thread (the engine's durable
        progress is whatever was recorded by then)."""
        self.online.writes.close()
