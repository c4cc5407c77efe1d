"""Making processed data durable, then recording progress past it.

Online (:class:`OnlineFlush`): dirty view states are written to Redis after the side
outputs (forwards, dead letters, late events) are delivered, and the partitions'
``online_next``/``online_wm`` are recorded in the same pipeline, after the states; the
freshness of what was written is sampled when the write completes. Offline
(:class:`OfflineFlush`): a partition's buffered rows are detached as a part, written
as Parquet, and only then is ``offline_next``/``offline_wm`` recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import numpy as np
import pyarrow as pa

from feature_defs.layout import commit_key
from feature_defs.registry import Registry
from headrace.core.online_store import OnlineStore
from streams.admission import Admission
from streams.apply import ViewApplier
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter
from streams.online import OnlineWrites
from streams.progress_guard import ProgressGuard
from streams.rows import PartitionProgress
from streams.run_stats import RunStats
from streams.sides import SideOutputs

__all__ = ["OnlineFlush", "OfflineFlush", "OfflinePart", "METRIC_STRIDE", "STATS_STRIDE",
           "FRESHNESS_SAMPLES_MAX"]

#: freshness values (one per event and view entity) sampled into the histogram / stats
METRIC_STRIDE = 16
STATS_STRIDE = 4
FRESHNESS_SAMPLES_MAX = 200_000

#: a detached offline part: (progress, first offset, next offset, watermark, rows)
OfflinePart = tuple[PartitionProgress, int, int, int, pa.Table]


class OnlineFlush:
    """Online flushes and the freshness samples of what they wrote.

    Args:
        views: Holds the dirty states.
        admission: Holds the partitions' progress.
        sides: Side outputs, delivered before progress is recorded past them.
        writes: Runs the Redis writes (in the background or not).
        prefix: Redis key prefix; ``group``: the consumer group (commit record keys).
        metrics: Freshness histogram and cached-state gauge.
        stats: Run statistics (last online commit, freshness samples).
    """

    def __init__(self, *, views: ViewApplier, admission: Admission, sides: SideOutputs,
                 writes: OnlineWrites, prefix: str, group: str, metrics: StreamMetrics,
                 stats: RunStats) -> None:
        self.views = views
        self.admission = admission
        self.sides = sides
        self.writes = writes
        self.prefix = prefix
        self.group = group
        self.metrics = metrics
        self.stats = stats
        self._pending: list[np.ndarray] = []  # event times applied since the last flush
        #: told the keys of every completed write (:mod:`streams.progress_guard`)
        self.guard: ProgressGuard | None = None
        self._freshness_seen = 0

    def applied(self, ts: np.ndarray) -> None:
        """Record the event times of rows just applied (their freshness is observed
        when the flush that writes them completes)."""
        self._pending.append(ts)

    def flush(self, wait: bool = True) -> int:
        """Write dirty states, publish side outputs, then record progress. Returns #states.

        With ``wait=False`` (and background ``writes``) the Redis write runs in the
        background: its progress (``online_next``), commit time and freshness are
        recorded by the next flush (or ``writes.finish()``), which waits for it first;
        one write is in flight at most.
        """
        self.writes.finish()
        # between batches, with the last write confirmed: bound the state cache (only
        # states whose changes are durable go; a later touch reloads them)
        self.views.evict()
        writes, flight = self.views.take_dirty()
        self.sides.flush()  # forwards, dead letters and late events are durable first
        covered = [(p, p.next) for p in self.admission.progress.values()
                   if p.next > p.online_next]
        commits = {commit_key(self.prefix, self.group, p.topic, p.partition):
                   p.commit_mapping() for p, _ in covered}
        if not writes and not commits:
            return 0
        fresh, self._pending = self._pending, []

        keys = [w.key for w in writes]

        def done(at: float) -> None:
            self.views.written(flight)
            if self.guard is not None:
                self.guard.note_written(keys)
            for p, nxt in covered:
                p.online_next = max(p.online_next, nxt)
            self.stats.last_online_commit = at
            self._observe_freshness(fresh, at)
            self.views.cache.record(self.stats)

        self.writes.submit(writes, commits, done)
        if wait:
            self.writes.finish()
        return len(writes)

    def discard_pending(self) -> None:
        """Forget the event times applied since the last flush (a rebuild replays them)."""
        self._pending = []

    def _observe_freshness(self, pending: list[np.ndarray], at: float) -> None:
        """Record freshness (``at``, when the write completed, - event time) of what was
        just written: a uniform sample of every value in arrival order (every
        :data:`METRIC_STRIDE`-th for the histogram, every :data:`STATS_STRIDE`-th for
        the run statistics), so large flushes weigh as much per event as small ones."""
        if not pending:
            return
        ts = np.concatenate(pending)
        now_ms = at * 1000
        first = self._freshness_seen
        self._freshness_seen += ts.size
        for lag in (now_ms - ts[(-first) % METRIC_STRIDE :: METRIC_STRIDE]).tolist():
            self.metrics.freshness.observe(max(0.0, lag / 1000.0))
        kept = self.stats.freshness_ms
        if len(kept) < FRESHNESS_SAMPLES_MAX:
            pick = ts[(-first) % STATS_STRIDE :: STATS_STRIDE]
            kept.extend((now_ms - pick).tolist())
            self.stats.freshness_ts_ms.extend(pick.tolist())


class OfflineFlush:
    """Offline parts: detached from the partitions' buffers, written, then recorded.

    Args:
        registry: The views (which of them a source feeds, and the fields they read).
        admission: Holds the partitions' progress and buffers.
        writer: The Parquet writer, or None (no offline store: nothing is written).
        store: Where ``offline_next``/``offline_wm`` are recorded.
        prefix: Redis key prefix; ``group``: the consumer group (commit record keys).
        metrics: Write latency and error counters.
        stats: Run statistics (last offline commit).
        clock: Wall clock, epoch seconds.
    """

    def __init__(self, *, registry: Registry, admission: Admission,
                 writer: OfflineWriter | None, store: OnlineStore, prefix: str, group: str,
                 metrics: StreamMetrics, stats: RunStats, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.admission = admission
        self.writer = writer
        self.store = store
        self.prefix = prefix
        self.group = group
        self.metrics = metrics
        self.stats = stats
        self.clock = clock

    def batches(self, only: Collection[tuple[str, int]] | None = None) -> list[OfflinePart]:
        """Detach buffered parts: (progress, start, next, max_ts, table) per partition
        (of the source partitions in ``only``, when given)."""
        out = []
        for tp, p in self.admission.progress.items():
            if p.source is None or not p.buffer or p.next <= p.offline_next or p.offline_busy:
                continue
            if only is not None and tp not in only:
                continue
            table = pa.concat_tables(p.buffer)
            p.buffer = []
            p.offline_busy = True  # until write() has recorded it (or failed)
            out.append((p, p.offline_next, p.next, p.max_ts, table))
        return out

    def write(self, batch: OfflinePart) -> None:
        """Write one detached part (its files verified, named by its whole offset range),
        then record ``offline_next`` (thread-safe enough: only touches the part and the
        progress fields it owns). At most one part per partition is detached at a time
        (:meth:`batches`), so no two parts ever share a start or a name."""
        prog, start, nxt, max_ts, table = batch
        assert self.writer is not None
        source = prog.source
        assert source is not None
        topo = self.registry.topology
        kind = topo.source_kinds[source]
        views = [
            (p, p.view.entity, topo.fields_of(p.view.id, source))
            for p in self.registry.plans.values()
            if source in p.feeds
        ]
        started = time.perf_counter()
        try:
            try:
                self.writer.write_part(prog.topic, kind, source, prog.partition, start, table,
                                       views, end=nxt)
            except Exception:
                self.metrics.write_errors.labels("offline").inc()
                raise
            self.metrics.s3_write.observe(time.perf_counter() - started)
            key = commit_key(self.prefix, self.group, prog.topic, prog.partition)
            self.store.write([], {key: {"offline_next": nxt, "offline_wm": max_ts}})
            prog.offline_next = nxt
            prog.offline_wm = max_ts
            self.stats.last_offline_commit = self.clock()
        finally:
            prog.offline_busy = False

    def flush(self) -> int:
        """Synchronously write every buffered part. Returns the number of parts."""
        if self.writer is None:
            return 0
        batches = self.batches()
        for b in batches:
            self.write(b)
        return len(batches)
