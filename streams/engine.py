"""The stream engine: watermarks, lateness, fenced view updates, side outputs, flushes.

Independent of Faust (the agents in :mod:`streams.app` feed it message batches), so the
same engine runs under tests with fakes and under the Faust worker with real services.

Per source (topic, partition) the engine keeps a watermark (max event time seen −
allowed lateness); an event with ``ts`` strictly below it on arrival is late: counted,
published to the ``late`` topic, not applied. Accepted events are

* applied to the views keyed by the routing key (``user_id``) in this process;
* forwarded, re-keyed, to ``headrace-repartition-{entity}`` for the other entities,
  carrying their source coordinates so the consumer can fence replays;
* buffered for the offline store.

Effectively once. Progress is recorded per partition in Redis *after* the data it
covers is durable: ``online_next``/``online_wm`` after view states and side outputs are
flushed, ``offline_next``/``offline_wm`` after a part is written. A restarted worker
resumes each partition at the smaller of the two with the watermark recorded there
(so lateness decisions replay identically), re-applies nothing twice (each view state
carries per-source fences), re-publishes no side output below ``online_next`` and
rewrites the part at ``offline_next`` under the same file names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from feature_defs.batch import apply_batch
from feature_defs.layout import (
    TOPIC_DLQ,
    TOPIC_LATE,
    commit_key,
    entity_key,
    repartition_topic,
)
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan
from feature_defs.registry import Registry
from feature_defs.state import NO_TS, ViewState, fence_key
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter
from streams.online import OnlineStore, OnlineWrites, StateWrite
from streams.rows import (
    PartitionProgress,
    RawMessage,
    column_codes,
    concat,
    not_repeated,
    positions,
)
from streams.sides import SideOutputs

__all__ = ["Engine", "RawMessage", "ROUTING_KEY", "PartitionProgress"]

log = logging.getLogger(__name__)
ROUTING_KEY = "user_id"
#: re-seeks tried before a gap in offsets is accepted as real (e.g. transaction markers)
MAX_GAP_SEEKS = 3
_KIND_OF_SOURCE = {"impressions": "impression", "clicks": "click"}
#: freshness values (one per event and view entity) sampled into the histogram / stats
METRIC_STRIDE = 16
STATS_STRIDE = 4
FRESHNESS_SAMPLES_MAX = 200_000


class Engine:
    """Turns message batches into view states, offline parts and side outputs."""

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
    ) -> None:
        self.registry = registry
        self.store = store
        self.writer = writer
        self.sides = sides
        self.topic = topic
        self.prefix = redis_prefix
        self.group = group
        self.max_future_ms = max_future_ms
        self.metrics = metrics or StreamMetrics()
        self.clock = clock
        self.online_writes = OnlineWrites(
            store, background=background_writes, clock=clock,
            observe=self.metrics.redis_write.observe,
            failed=self.metrics.write_errors.labels("redis").inc)
        self.local: list[ViewPlan] = [
            p for p in registry.plans.values() if p.view.entity.key == ROUTING_KEY
        ]
        self.remote: dict[str, list[ViewPlan]] = {}
        for p in registry.plans.values():
            if p.view.entity.key != ROUTING_KEY:
                self.remote.setdefault(p.view.entity.name, []).append(p)
        self.entity_key_field = {
            e.name: e.key for e in (p.view.entity for p in registry.plans.values())
        }
        self.sources = {self.topic(s): s for s in registry.source_topics()}
        self.repartition = {self.topic(repartition_topic(e)): e for e in self.remote}
        self.lateness_ms = {
            s: max(
                int(p.view.allowed_lateness.total_seconds() * 1000)
                for p in registry.plans.values()
                if s in p.feeds
            )
            for s in registry.source_topics()
        }
        self.progress: dict[tuple[str, int], PartitionProgress] = {}
        self.states: dict[str, dict[str, ViewState]] = {
            p.view.id: {} for p in registry.plans.values()
        }
        self.dirty: dict[str, set[str]] = {p.view.id: set() for p in registry.plans.values()}
        self.pending_freshness: list[np.ndarray] = []
        self._freshness_seen = 0
        self.seek_requests: dict[tuple[str, int], int] = {}
        self.last_input = self.clock()
        #: run statistics for benchmarks: first input / last durable commit (wall s),
        #: events decoded, and a bounded uniform sample of freshness values (ms) with
        #: the event time (epoch ms) of each
        self.stats: dict[str, Any] = {"events_in": 0, "first_input": None,
                                      "last_online_commit": None, "last_offline_commit": None,
                                      "freshness_ms": [], "freshness_ts_ms": []}

    # ---------------------------------------------------------------- topology
    def input_topics(self) -> list[str]:
        return list(self.sources) + list(self.repartition)

    def side_topics(self) -> list[str]:
        return [self.topic(TOPIC_DLQ), self.topic(TOPIC_LATE), *self.repartition]

    def fields_of(self, plan: ViewPlan, source: str) -> tuple[str, ...]:
        return tuple(sorted({f for _s, _op, f in plan.feeds.get(source, ()) if f}))

    # ---------------------------------------------------------------- assignment
    def assign(self, tps: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Load durable progress for newly assigned partitions; returns seek offsets."""
        new = [tp for tp in tps if tp not in self.progress]
        keys = [commit_key(self.prefix, self.group, t, p) for t, p in new]
        records = self.store.read_commits(keys) if keys else []
        seeks: dict[tuple[str, int], int] = {}
        for (t, p), rec in zip(new, records, strict=True):
            source = self.sources.get(t)
            prog = PartitionProgress(t, p, source)
            prog.online_next = rec.get("online_next", 0)
            if source is None:
                prog.next = prog.online_next
            else:
                prog.offline_next = rec.get("offline_next", 0)
                prog.offline_wm = rec.get("offline_wm", NO_TS)
                if prog.offline_next <= prog.online_next:
                    prog.next, prog.max_ts = prog.offline_next, prog.offline_wm
                else:
                    prog.next, prog.max_ts = prog.online_next, rec.get("online_wm", NO_TS)
                if self.writer is not None:
                    removed = self.writer.remove_orphans(t, p, prog.offline_next)
                    if removed:
                        log.info("removed %d orphan offline files of %s[%d]", removed, t, p)
            self.progress[(t, p)] = prog
            seeks[(t, p)] = prog.next
        return seeks

    def revoke(self, tps: Sequence[tuple[str, int]]) -> None:
        """Flush what was processed, then forget the partitions."""
        self.flush_online()
        self.flush_offline()
        for tp in tps:
            self.progress.pop(tp, None)
        for states in self.states.values():  # another worker owns some keys now
            states.clear()

    # ---------------------------------------------------------------- processing
    def _states_for(self, plan: ViewPlan, keys: Sequence[str]) -> list[ViewState]:
        """The states of the distinct ``keys`` (loaded from the store when not cached)."""
        cache = self.states[plan.view.id]
        missing = [i for i in keys if i not in cache]
        if missing:
            ent = plan.view.entity.name
            blobs = self.store.load(
                [(entity_key(self.prefix, ent, i), plan.view.id) for i in missing]
            )
            for i, blob in zip(missing, blobs, strict=True):
                cache[i] = ViewState.decode(plan, blob) if blob else ViewState(plan)
        return [cache[i] for i in keys]

    def _admit(self, prog: PartitionProgress, msgs: Sequence[RawMessage]) -> list[RawMessage]:
        """Messages to process: already-processed ones are skipped; a jump past the next
        expected offset is never skipped silently: the partition is re-sought to it
        (bounded retries, then the gap is accepted as real and logged)."""
        fresh = [m for m in msgs if m.offset >= prog.next]
        if not fresh or fresh[0].offset == prog.next:
            prog.gap_seeks = 0
            return fresh
        tp = (prog.topic, prog.partition)
        if prog.gap_seeks < MAX_GAP_SEEKS:
            prog.gap_seeks += 1
            self.seek_requests[tp] = prog.next
            self.metrics.gaps.labels(prog.topic).inc()
            log.warning("%s[%d]: got offset %d, expected %d: seeking back", prog.topic,
                        prog.partition, fresh[0].offset, prog.next)
            return []
        log.error("%s[%d]: offsets %d..%d are missing from the log; continuing", prog.topic,
                  prog.partition, prog.next, fresh[0].offset - 1)
        prog.gap_seeks = 0
        return fresh

    def take_seek_requests(self) -> dict[tuple[str, int], int]:
        """Seeks the consumer must perform (see :meth:`_admit`); clears them."""
        requests, self.seek_requests = self.seek_requests, {}
        return requests

    def resume_offsets(self) -> dict[tuple[str, int], int]:
        """Where each assigned partition continues (next offset to process)."""
        return {tp: p.next for tp, p in self.progress.items()}

    def on_source(self, topic: str, messages: Sequence[RawMessage]) -> None:
        """Process messages of one source topic (any partitions, in arrival order)."""
        from streams.codec import decode_batch

        source = self.sources[topic]
        kind = _KIND_OF_SOURCE[source]
        self.last_input = self.clock()
        by_part: dict[int, list[RawMessage]] = {}
        for m in messages:
            by_part.setdefault(m.partition, []).append(m)
        now_ms = int(self.clock() * 1000)
        accepted: list[tuple[int, pa.Table, np.ndarray]] = []
        forwards: list[pa.Table] = []
        for part, msgs in by_part.items():
            prog = self.progress.get((topic, part))
            if prog is None:
                continue  # not (or no longer) ours
            msgs = self._admit(prog, msgs)
            if not msgs:
                continue
            decoded = decode_batch(kind, msgs, now_ms=now_ms, max_future_ms=self.max_future_ms)
            for dl in decoded.dead:
                self.metrics.dead.labels(topic, dl.reason.split(":", 1)[0]).inc()
                if dl.offset >= prog.online_next:
                    self.sides.dead_letter(dl)
            table = decoded.table
            if table.num_rows:
                kept = self._accept(prog, source, table, msgs)
                if kept is not None:
                    table, ts, rows = kept
                    accepted.append((part, table, ts))
                    if rows.num_rows:
                        forwards.append(rows)
            prog.next = msgs[-1].offset + 1
        if forwards and self.remote:
            # one forward per entity for the whole call, not per partition: small batches
            # would otherwise multiply the repartition messages (and their fixed costs).
            # Sent before the local apply and at once: the other entities' values wait
            # for this Kafka round trip
            rows = concat(forwards)
            for entity in self.remote:
                self.sides.forward(entity, self._forward_rows(entity, source, rows))
            self.sides.send()
        # every partition of the call at once: per call, not per event, costs dominate
        # the small batches that keep values fresh
        if accepted:
            self._apply_local(source, accepted)

    def _accept(
        self,
        prog: PartitionProgress,
        source: str,
        table: pa.Table,
        msgs: Sequence[RawMessage],
    ) -> tuple[pa.Table, np.ndarray, pa.Table] | None:
        """Drop (and publish) late rows, buffer the rest for the offline store. Returns
        (accepted rows, their event times, the rows still to forward to the other
        entities: offsets >= ``online_next``), or None when nothing was accepted."""
        self.metrics.events_in.labels(prog.topic).inc(table.num_rows)
        self.stats["events_in"] += table.num_rows
        if self.stats["first_input"] is None:
            self.stats["first_input"] = self.clock()
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
                if row["_offset"] >= prog.online_next:
                    self.sides.late(prog.topic, row, int(w))
            keep = ~late
            table, ts, offsets = table.filter(pa.array(keep)), ts[keep], offsets[keep]
        if table.num_rows == 0:
            return None
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

    def _apply_local(
        self, source: str, accepted: Sequence[tuple[int, pa.Table, np.ndarray]]
    ) -> None:
        """Apply accepted rows of one source, (partition, rows, event times) per partition,
        to the views keyed by the routing key."""
        table = concat([t for _, t, _ in accepted])
        part = np.repeat(np.array([p for p, _, _ in accepted], dtype=np.int64),
                         [t.num_rows for _, t, _ in accepted])
        table_k = table
        if table[ROUTING_KEY].null_count:
            valid = pc.is_valid(table[ROUTING_KEY])
            table_k = table.filter(valid)
            part = part[np.asarray(valid.to_numpy(), dtype=bool)]
        if table_k.num_rows:
            keys, codes = column_codes(table_k[ROUTING_KEY])
            ts_k = pc.cast(table_k["ts"], pa.int64()).to_numpy()
            pos = positions(table_k["_offset"], table_k["_index"])
            parts = np.unique(part).tolist()
            for plan in self.local:
                if source not in plan.feeds:
                    continue
                idx = plan.view.sources.index(plan.view.source(source))
                fkeys = np.empty(len(codes), dtype=np.int64)
                for p in parts:
                    fkeys[part == p] = fence_key(idx, p)
                self._apply(plan, table_k, keys, codes, ts_k, source, fkeys, pos)
        for _, _, ts in accepted:
            self.pending_freshness.append(ts)

    def _apply(self, plan: ViewPlan, table: pa.Table, keys: list[str], codes: np.ndarray,
               ts: np.ndarray, sources: str | np.ndarray, fkeys: np.ndarray,
               pos: np.ndarray) -> None:
        """Apply ``table``'s rows (entity ``keys[codes[row]]``) to ``plan``'s states."""
        states = self._states_for(plan, keys)
        fields = {f for s in plan.feeds for f in self.fields_of(plan, s)}
        cols = {f: table[f].to_pylist() for f in fields if f in table.column_names}
        tiebreaks = None
        if any(m.op is AggOp.LAST for m in plan.measures) and "event_id" in table.column_names:
            tiebreaks = [xxhash.xxh64_intdigest(v.encode("utf-8")) >> 1
                         for v in table["event_id"].to_pylist()]
        changed = apply_batch(plan, states, codes, ts, sources, fkeys, pos, cols, tiebreaks)
        self.dirty[plan.view.id].update([keys[c] for c in changed])
        self.metrics.applied.labels(plan.view.id).inc(len(codes))

    def _forward_rows(self, entity: str, source: str, rows: pa.Table) -> pa.Table:
        key = self.entity_key_field[entity]
        rows = rows.filter(pc.is_valid(rows[key]))
        fields = sorted({f for p in self.remote[entity] for f in self.fields_of(p, source)})
        cols: dict[str, Any] = {
            "entity_id": rows[key],
            "ts": pc.cast(rows["ts"], pa.int64()),
            "source": pa.repeat(pa.scalar(source, pa.string()), rows.num_rows),
            "src_partition": rows["_partition"],
            "src_offset": rows["_offset"],
            "src_index": rows["_index"],
        }
        for f in fields:
            cols[f] = rows[f]
        if any(m.op is AggOp.LAST for p in self.remote[entity] for m in p.measures):
            cols["event_id"] = rows["event_id"]
        return pa.table(cols)

    def on_repartition(self, topic: str, messages: Sequence[RawMessage]) -> None:
        """Apply forwarded rows (Arrow IPC envelopes) to the views of their entity."""
        entity = self.repartition[topic]
        self.last_input = self.clock()
        tables: list[pa.Table] = []
        for m in messages:
            prog = self.progress.get((topic, m.partition))
            if prog is None or not self._admit(prog, [m]):
                continue
            if m.value:
                tables.append(pa.ipc.open_stream(m.value).read_all())
            prog.next = m.offset + 1
        tables = [t for t in tables if t.num_rows]
        if tables:
            # all messages at once (per message, the fixed costs dominated small batches)
            self._apply_remote(entity, concat(tables))

    def _apply_remote(self, entity: str, rows: pa.Table) -> None:
        """Apply forwarded rows, possibly from several messages, in their order.

        The same as applying message by message: rows that a replayed forward repeats
        within ``rows`` are dropped here (the state's fences only know earlier batches).
        """
        keys, codes = column_codes(rows["entity_id"])
        ts = rows["ts"].to_numpy()
        src_names, src_codes = column_codes(rows["source"])
        srcs = np.asarray(src_names, dtype=object)[src_codes]
        parts = rows["src_partition"].to_numpy().astype(np.int64)
        pos = positions(rows["src_offset"], rows["src_index"])
        for plan in self.remote[entity]:
            src_index = {s.name: n for n, s in enumerate(plan.view.sources)}
            lut = np.array([src_index.get(s, 0) for s in src_names], dtype=np.int64)
            fkeys = (lut[src_codes] << 16) | parts
            keep = not_repeated(codes, fkeys, pos)
            if keep is None:
                self._apply(plan, rows, keys, codes, ts, srcs, fkeys, pos)
            elif keep.any():
                idx = np.flatnonzero(keep)
                self._apply(plan, rows.take(pa.array(idx)), keys, codes[idx], ts[idx],
                            srcs[idx], fkeys[idx], pos[idx])
        self.pending_freshness.append(ts)

    # ---------------------------------------------------------------- flushing
    def flush_online(self, wait: bool = True) -> int:
        """Write dirty states, publish side outputs, then record progress. Returns #states.

        With ``wait=False`` (and an engine made with ``background_writes``) the Redis
        write runs in the background: its progress (``online_next``), commit time and
        freshness are recorded by the next flush (or ``online_writes.finish()``), which
        waits for it first; one write is in flight at most.
        """
        self.online_writes.finish()
        writes: list[StateWrite] = []
        for plan in self.registry.plans.values():
            vid = plan.view.id
            dirty, states = self.dirty[vid], self.states[vid]
            if not dirty:
                continue
            ttl_s = max(1, plan.ttl_ms // 1000)
            ent = plan.view.entity.name
            writes.extend(
                StateWrite(entity_key(self.prefix, ent, k), vid, states[k].encode(), ttl_s)
                for k in dirty
            )
            dirty.clear()
        self.sides.flush()  # forwards, dead letters and late events are durable first
        covered = [(p, p.next) for p in self.progress.values() if p.next > p.online_next]
        commits = {commit_key(self.prefix, self.group, p.topic, p.partition):
                   p.commit_mapping() for p, _ in covered}
        if not writes and not commits:
            return 0
        fresh, self.pending_freshness = self.pending_freshness, []

        def done(at: float) -> None:
            for p, nxt in covered:
                p.online_next = max(p.online_next, nxt)
            self.stats["last_online_commit"] = at
            self._observe_freshness(fresh, at)
            self.metrics.states_cached.set(sum(len(s) for s in self.states.values()))

        self.online_writes.submit(writes, commits, done)
        if wait:
            self.online_writes.finish()
        return len(writes)

    def _observe_freshness(self, pending: list[np.ndarray], at: float) -> None:
        """Record freshness (``at``, when the write completed, - event time) of what was
        just written: a uniform sample of every value in arrival order (every
        :data:`METRIC_STRIDE`-th for the histogram, every :data:`STATS_STRIDE`-th for
        ``stats``), so large flushes weigh as much per event as small ones."""
        if not pending:
            return
        ts = np.concatenate(pending)
        now_ms = at * 1000
        first = self._freshness_seen
        self._freshness_seen += ts.size
        for lag in (now_ms - ts[(-first) % METRIC_STRIDE :: METRIC_STRIDE]).tolist():
            self.metrics.freshness.observe(max(0.0, lag / 1000.0))
        kept = self.stats["freshness_ms"]
        if len(kept) < FRESHNESS_SAMPLES_MAX:
            pick = ts[(-first) % STATS_STRIDE :: STATS_STRIDE]
            kept.extend((now_ms - pick).tolist())
            self.stats["freshness_ts_ms"].extend(pick.tolist())

    def offline_batches(
        self, only: Collection[tuple[str, int]] | None = None
    ) -> list[tuple[PartitionProgress, int, int, int, pa.Table]]:
        """Detach buffered parts: (progress, start, next, max_ts, table) per partition
        (of the source partitions in ``only``, when given)."""
        out = []
        for tp, p in self.progress.items():
            if p.source is None or not p.buffer or p.next <= p.offline_next:
                continue
            if only is not None and tp not in only:
                continue
            table = pa.concat_tables(p.buffer)
            p.buffer = []
            out.append((p, p.offline_next, p.next, p.max_ts, table))
        return out

    def write_offline(self, batch: tuple[PartitionProgress, int, int, int, pa.Table]) -> None:
        """Write one detached part, then record ``offline_next`` (thread-safe enough:
        only touches the part and the progress fields it owns)."""
        prog, start, nxt, max_ts, table = batch
        assert self.writer is not None
        source = prog.source
        assert source is not None
        kind = _KIND_OF_SOURCE[source]
        views = [
            (p, p.view.entity.key, self.fields_of(p, source))
            for p in self.registry.plans.values()
            if source in p.feeds
        ]
        started = time.perf_counter()
        try:
            self.writer.write_part(prog.topic, kind, source, prog.partition, start, table, views)
        except Exception:
            self.metrics.write_errors.labels("offline").inc()
            raise
        self.metrics.s3_write.observe(time.perf_counter() - started)
        key = commit_key(self.prefix, self.group, prog.topic, prog.partition)
        self.store.write([], {key: {"offline_next": nxt, "offline_wm": max_ts}})
        prog.offline_next = nxt
        prog.offline_wm = max_ts
        self.stats["last_offline_commit"] = self.clock()

    def flush_offline(self) -> int:
        """Synchronously write every buffered part. Returns the number of parts."""
        if self.writer is None:
            return 0
        batches = self.offline_batches()
        for b in batches:
            self.write_offline(b)
        return len(batches)
