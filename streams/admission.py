"""Admission and progress: which consumed rows the engine processes, and where each
partition stands.

Per assigned (topic, partition) a :class:`~streams.rows.PartitionProgress` holds the next
offset to process, the watermark (max accepted event time; minus the allowed lateness it
decides lateness) and the durable positions loaded from the partition's commit record.
:class:`Admission`

* resumes a newly assigned partition at the smaller of ``online_next`` and
  ``offline_next``, with the watermark recorded there, so lateness decisions replay
  identically, and removes the offline files a crashed attempt left past
  ``offline_next``, listing only the date partitions that can hold them
  (:meth:`Admission.assign`, :meth:`Admission.orphan_since`);
* skips messages below the next offset and never skips a gap silently: the partition is
  re-sought to the expected offset, a bounded number of times (:meth:`Admission.admit`);
* drops late rows (published to the ``late`` topic unless already published before the
  restart) and buffers the accepted ones for the next offline part
  (:meth:`Admission.accept`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.layout import commit_key
from feature_defs.state import NO_TS
from headrace.core.online_store import OnlineStore
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter
from streams.rows import BEHIND, PartitionProgress, RawMessage
from streams.run_stats import RunStats
from streams.sides import SideOutputs

__all__ = ["Admission", "MAX_GAP_SEEKS", "ORPHAN_SLACK_MS"]

log = logging.getLogger(__name__)

#: re-seeks tried before a gap in offsets the log could not be asked about is accepted
#: as real (e.g. transaction markers); with a :attr:`Admission.log_probe` the log says
MAX_GAP_SEEKS = 3
#: seconds between two re-seeks of a partition: the messages the consumer fetched
#: before a seek keep arriving for a while after it, and are dropped meanwhile
RESEEK_S = 1.0

#: extra event time (ms) searched for orphan offline parts before the earliest time they
#: can hold (:meth:`Admission.orphan_since`): one more date partition at most
ORPHAN_SLACK_MS = 86_400_000

TopicPartition = tuple[str, int]


class Admission:
    """Progress of the assigned partitions, and the admission of their messages and rows.

    Args:
        sources: Source topic (with the deployment prefix) -> source name.
        lateness_ms: Source name -> the largest allowed lateness (ms) of the views it
            feeds: rows further behind the watermark are late for every view.
        mixed_lateness: Sources whose views allow different lateness: their accepted
            rows get a :data:`~streams.rows.BEHIND` column (ms behind the watermark on
            arrival) by which each view drops what is late for it.
        store: Where commit records are read.
        writer: The offline writer (orphan parts of a resumed partition are removed),
            or None.
        sides: Where late rows are published.
        prefix: Redis key prefix; ``group``: the consumer group (commit record keys).
        metrics: Counters of events in, late rows and re-seeks.
        stats: Run statistics (events in, first input time).
        clock: Wall clock, epoch seconds.
    """

    def __init__(
        self,
        *,
        sources: Mapping[str, str],
        lateness_ms: Mapping[str, int],
        store: OnlineStore,
        writer: OfflineWriter | None,
        sides: SideOutputs,
        prefix: str,
        group: str,
        metrics: StreamMetrics,
        stats: RunStats,
        clock: Callable[[], float],
        mixed_lateness: Collection[str] = frozenset(),
    ) -> None:
        self.sources = sources
        self.lateness_ms = lateness_ms
        self.mixed_lateness = frozenset(mixed_lateness)
        self.store = store
        self.writer = writer
        self.sides = sides
        self.prefix = prefix
        self.group = group
        self.metrics = metrics
        self.stats = stats
        self.clock = clock
        #: called with a source topic whose progress Redis lost (a metric)
        self.on_lost: Callable[[str], None] | None = None
        #: (topic, partition, offset) -> the first offset at or after ``offset`` that the
        #: log holds, asked of the broker (None: it could not say): a gap in delivered
        #: offsets is accepted only when the log has nothing in it
        self.log_probe: Callable[[str, int, int], int | None] | None = None
        self.progress: dict[TopicPartition, PartitionProgress] = {}
        self._seek_requests: dict[TopicPartition, int] = {}

    # ---------------------------------------------------------------- assignment
    def assign(self, tps: Sequence[TopicPartition],
               log_starts: Mapping[TopicPartition, int] | None = None,
               redis_intact: bool = True) -> dict[TopicPartition, int]:
        """Load durable progress for newly assigned partitions; returns seek offsets.

        ``log_starts``: each partition's first retained offset, where known.
        ``redis_intact``: the group's epoch marker is in Redis (then a record without
        ``offline_next`` is a crash before the first part was recorded, and parts found
        are a crashed attempt's orphans). Without it, a source partition whose progress
        record lacks ``offline_next`` while the offline store holds its parts lost its
        progress (:mod:`streams.progress_guard`): its offline
        progress is recovered from the parts (nothing is deleted) and it resumes at the
        log's start. Orphan parts (at or past the durable offline progress) are removed
        only when the log still holds what will rewrite them.
        """
        starts = log_starts or {}
        new = [tp for tp in tps if tp not in self.progress]
        keys = [commit_key(self.prefix, self.group, t, p) for t, p in new]
        records = self.store.read_commits(keys) if keys else []
        seeks: dict[TopicPartition, int] = {}
        for (t, p), rec in zip(new, records, strict=True):
            source = self.sources.get(t)
            prog = PartitionProgress(t, p, source)
            prog.online_next = rec.get("online_next", 0)
            start = starts.get((t, p), 0)
            if source is None:
                prog.next = max(prog.online_next, start) if not rec else prog.online_next
            elif not redis_intact and "offline_next" not in rec and self.writer is not None \
                    and (found := self.writer.durable_end(t, p)) is not None:
                self._recover(prog, found, start, bool(rec))
            else:
                prog.offline_next = rec.get("offline_next", 0)
                prog.offline_wm = rec.get("offline_wm", NO_TS)
                if prog.offline_next <= prog.online_next:
                    prog.next, prog.max_ts = prog.offline_next, prog.offline_wm
                else:
                    prog.next, prog.max_ts = prog.online_next, rec.get("online_wm", NO_TS)
                if self.writer is not None:
                    self._remove_orphans(prog, source, start)
            prog.sides_next = prog.online_next
            self.progress[(t, p)] = prog
            seeks[(t, p)] = prog.next
        return seeks

    def _recover(self, prog: PartitionProgress, found: tuple[int, int], start: int,
                 partial: bool) -> None:
        """Progress records lost, parts in the store up to ``found[0]``: keep them, replay
        the online state from the log's ``start``, and record the offline progress."""
        end, newest = found
        t, p = prog.topic, prog.partition
        log.warning(
            "%s[%d]: the progress record is %s in Redis although the offline store holds "
            "parts up to offset %d: Redis lost its data. Rebuilding the online state from "
            "the log (offset %d on); the offline store is kept", t, p,
            "incomplete" if partial else "missing", end, start)
        if start > 0:
            log.warning("%s[%d]: the log starts at offset %d: rebuilt values lack the events "
                        "before it (the offline store holds them)", t, p, start)
        if start > end:
            log.error("%s[%d]: offsets %d..%d are neither in the offline store nor in the "
                      "log", t, p, end, start - 1)
        if self.on_lost is not None:
            self.on_lost(t)
        prog.offline_next, prog.offline_wm = end, newest
        prog.online_next = prog.next = start
        prog.max_ts = NO_TS
        # recorded at once: a crash before the next part must not read offline_next 0
        # (and delete every part as an orphan)
        self.store.write([], {commit_key(self.prefix, self.group, t, p): {
            "offline_next": end, "offline_wm": newest}})

    def _remove_orphans(self, prog: PartitionProgress, source: str, start: int) -> None:
        t, p = prog.topic, prog.partition
        assert self.writer is not None
        if start > prog.offline_next:
            log.warning("%s[%d]: the log starts at %d, past the durable offline progress %d: "
                        "parts past it are kept (the log could not rewrite them)", t, p,
                        start, prog.offline_next)
            return
        removed = self.writer.remove_orphans(
            t, p, prog.offline_next, since_ms=self.orphan_since(source, prog))
        if removed:
            log.info("removed %d orphan offline files of %s[%d]", removed, t, p)

    def rebuild(self, log_starts: Mapping[TopicPartition, int], now: float
                ) -> dict[TopicPartition, int]:
        """Replay every assigned partition from its log start (an online rebuild):
        online progress reset, offline progress kept, buffers dropped (re-read), side
        outputs not published again. Returns the seeks."""
        seeks = {}
        for tp, prog in self.progress.items():
            start = log_starts.get(tp, 0)
            prog.sides_next = max(prog.sides_next, prog.next)
            prog.next = prog.online_next = start
            prog.max_ts = NO_TS
            prog.buffer = []
            # the messages fetched before the seek arrive first: dropped, not a gap
            prog.gap_seeks, prog.seek_at, prog.probed = 0, now, None
            seeks[tp] = start
        return seeks

    def orphan_since(self, source: str, prog: PartitionProgress) -> int | None:
        """The earliest event time (epoch ms) a part at or after ``prog``'s durable
        ``offline_next`` can hold, or None when nothing is durable yet.

        Every attempt replays the partition from a durable point with the watermark
        recorded there, so at ``offline_next`` its watermark was ``offline_wm`` and then
        only grew; a row further behind it than the source's largest allowed lateness
        was late for every view and in no part. :data:`ORPHAN_SLACK_MS` more covers a
        lateness raised between the crash and this assignment.
        """
        if prog.offline_wm <= NO_TS:
            return None
        return prog.offline_wm - self.lateness_ms.get(source, 0) - ORPHAN_SLACK_MS

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        """Drop the progress of revoked partitions (after their data was flushed)."""
        for tp in tps:
            self.progress.pop(tp, None)

    def resume_offsets(self) -> dict[TopicPartition, int]:
        """Where each assigned partition continues (next offset to process)."""
        return {tp: p.next for tp, p in self.progress.items()}

    def take_seek_requests(self) -> dict[TopicPartition, int]:
        """Seeks the consumer must perform (see :meth:`admit`); clears them."""
        requests, self._seek_requests = self._seek_requests, {}
        return requests

    # ---------------------------------------------------------------- admission
    def admit(self, prog: PartitionProgress, msgs: Sequence[RawMessage]) -> list[RawMessage]:
        """Messages to process: already-processed ones are skipped; a jump past the next
        expected offset is never skipped on the consumer's word.

        A jump has two causes: the consumer skipped messages (fetched before a seek of
        ours took effect, or dropped around one), or the log has nothing there (a
        transaction marker, a retention or compaction hole). The log is asked
        (:attr:`log_probe`): when it holds an offset before the jump, the partition is
        re-sought (at most every :data:`RESEEK_S`) and the messages dropped until the
        expected one arrives; when it does not, the gap is real, logged and accepted.
        A log that cannot be asked gets :data:`MAX_GAP_SEEKS` spaced re-seeks first."""
        fresh = [m for m in msgs if m.offset >= prog.next]
        if not fresh or fresh[0].offset == prog.next:
            if fresh:
                prog.gap_seeks, prog.probed = 0, None
            return fresh
        first, now = fresh[0].offset, time.monotonic()
        if prog.probed is None or prog.probed[0] != prog.next:
            held = self.log_probe(prog.topic, prog.partition, prog.next) \
                if self.log_probe is not None else None
            prog.probed = (prog.next, held)
        held = prog.probed[1]
        if held is not None and held >= first:
            return self._accept_gap(prog, fresh, first)
        if now - prog.seek_at < RESEEK_S:
            return []  # still the messages fetched before the last seek
        if held is None:
            if prog.gap_seeks >= MAX_GAP_SEEKS:
                return self._accept_gap(prog, fresh, first)
            prog.gap_seeks += 1
        prog.seek_at = now
        self._seek_requests[(prog.topic, prog.partition)] = prog.next
        self.metrics.gaps.labels(prog.topic).inc()
        log.warning("%s[%d]: got offset %d, expected %d: seeking back", prog.topic,
                    prog.partition, first, prog.next)
        return []

    def _accept_gap(self, prog: PartitionProgress, fresh: list[RawMessage], first: int
                    ) -> list[RawMessage]:
        log.error("%s[%d]: offsets %d..%d are missing from the log%s; continuing",
                  prog.topic, prog.partition, prog.next, first - 1,
                  "" if prog.probed and prog.probed[1] is not None
                  else f" (the broker could not be asked; re-sought {prog.gap_seeks} times)")
        prog.gap_seeks, prog.probed = 0, None
        return fresh

    def accept(
        self,
        prog: PartitionProgress,
        source: str,
        table: pa.Table,
        msgs: Sequence[RawMessage],
    ) -> tuple[pa.Table, np.ndarray, pa.Table] | None:
        """Drop (and publish) rows late for every view of ``source``, buffer the rest for
        the offline store. Returns (accepted rows, their event times, the rows still to
        forward to the other entities: offsets >= ``online_next``), or None when nothing
        was accepted. For a source in ``mixed_lateness`` the accepted rows carry
        :data:`~streams.rows.BEHIND`; a view drops those with ``BEHIND > its lateness``."""
        self.metrics.events_in.labels(prog.topic).inc(table.num_rows)
        self.stats.events_in += table.num_rows
        if self.stats.first_input is None:
            self.stats.first_input = self.clock()
        ts = pc.cast(table["ts"], pa.int64()).to_numpy()
        before = np.maximum.accumulate(np.concatenate(([prog.max_ts], ts)))[:-1]
        late = ts < before - self.lateness_ms[source]
        prog.max_ts = int(max(prog.max_ts, int(ts.max())))
        offsets = table["_offset"].to_numpy()
        if late.any():
            late_rows = table.filter(pa.array(late))
            self.metrics.late.labels(prog.topic).inc(late_rows.num_rows)
            wm = before[late] - self.lateness_ms[source]
            for row, w in zip(late_rows.to_pylist(), wm.tolist(), strict=True):
                if row["_offset"] >= max(prog.online_next, prog.sides_next):
                    self.sides.late(prog.topic, row, int(w))
            keep = ~late
            table, ts, offsets = table.filter(pa.array(keep)), ts[keep], offsets[keep]
            before = before[keep]
        if table.num_rows == 0:
            return None
        if source in self.mixed_lateness:
            # not late for some view: how far behind the watermark it came decides which
            table = table.append_column(BEHIND, pa.array(before - ts, pa.int64()))
        ingest = {m.offset: m.timestamp_ms for m in msgs}
        table = table.append_column(
            "_ingest_ms", pa.array([ingest[o] for o in offsets.tolist()], pa.int64())
        )
        new = offsets >= prog.offline_next
        if new.all():
            prog.buffer.append(table)
        elif new.any():
            prog.buffer.append(table.filter(pa.array(new)))
        side = offsets >= prog.online_next
        return table, ts, table if side.all() else table.filter(pa.array(side))

    # ---------------------------------------------------------------- queries
    def source_partitions(self) -> list[TopicPartition]:
        """The assigned source partitions (those with offline parts)."""
        return [tp for tp, p in self.progress.items() if p.source is not None]

    def buffered_rows(self, tp: TopicPartition) -> int:
        """Events buffered for ``tp``'s next offline part (0 when not assigned)."""
        prog = self.progress.get(tp)
        return prog.buffered_rows() if prog is not None else 0

    def positions(self) -> Iterator[tuple[str, int, int, int | None]]:
        """Per assigned partition: (topic, partition, next offset, watermark in epoch ms
        or None before the first accepted event, or for a repartition topic)."""
        for (t, p), prog in list(self.progress.items()):
            wm = None
            if prog.max_ts > NO_TS:
                wm = prog.max_ts - self.lateness_ms.get(prog.source or "", 0)
            yield t, p, prog.next, wm
