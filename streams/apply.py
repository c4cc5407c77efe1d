"""Applying accepted rows to view states: locally, by forwarding, and from forwards.

The views keyed by the routing key are applied where the source partition is consumed
(:meth:`ViewApplier.apply_local`). For every other (repartitioned) entity the accepted
rows are re-keyed into forward tables (:meth:`ViewApplier.forward_rows`) that carry
their source coordinates, published to ``headrace-repartition-{entity}``, and applied
by the consumer of that partition (:meth:`ViewApplier.apply_remote`); the coordinates
are the states' replay fences. A view applies only rows of the sources it reads, under
fence keys of its own sources (``Topology.fence_source``), and only rows not late for
its own allowed lateness (:func:`streams.rows.admitted_by`). Both paths are vectorized
per call (numpy and Arrow); the per-entity work is in
:func:`feature_defs.batch.apply_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.batch import apply_batch
from feature_defs.keys import entity_ids
from feature_defs.measures import last_tiebreaks
from feature_defs.plan import ViewPlan
from feature_defs.registry import Registry
from feature_defs.state import ViewState, fence_key
from feature_defs.topology import UnknownSourceError
from headrace.core.online_store import OnlineStore, StateWrite
from streams.metrics import StreamMetrics
from streams.rows import BEHIND, admitted_by, column_codes, concat, not_repeated, positions
from streams.sides import SideOutputs
from streams.state_cache import InFlight, StateCache

__all__ = ["ViewApplier"]


class ViewApplier:
    """View states (cached per view and entity id), their dirty sets, and the apply paths.

    Args:
        registry: The views and their compiled topology.
        store: Where states missing from the cache are loaded.
        prefix: Redis key prefix.
        metrics: The ``applied`` counter and the cache's metrics.
        cache_bytes: Budget of the state cache (:class:`~streams.state_cache.StateCache`:
            durable states are evicted, least recently used first, and reloaded on a
            miss); None: unbounded.
        sides: Where the cache dead-letters a state it cannot decode before resetting
            it (:mod:`streams.state_cache`); None: such a state raises.
    """

    def __init__(self, *, registry: Registry, store: OnlineStore, prefix: str,
                 metrics: StreamMetrics, cache_bytes: int | None = None,
                 sides: SideOutputs | None = None) -> None:
        topo = registry.topology
        self.plans = registry.plans
        self.topology = topo
        self.store = store
        self.prefix = prefix
        self.metrics = metrics
        self.routing_key = topo.routing_key
        self.local: list[ViewPlan] = [self.plans[v] for v in topo.local_views]
        self.remote: dict[str, list[ViewPlan]] = {
            e: [self.plans[v] for v in vids] for e, vids in topo.repartitioned.items()
        }
        self.cache = StateCache(plans=self.plans, store=store, prefix=prefix,
                                limit_bytes=cache_bytes, metrics=metrics, sides=sides)
        self.states: dict[str, dict[str, ViewState]] = self.cache.states
        self.dirty: dict[str, set[str]] = self.cache.dirty
        #: ``_apply`` calls queued by :meth:`batch` (None: apply at once)
        self._deferred: list[tuple[Any, ...]] | None = None
        self._prefetched = False  # the queued applies run: their states are touched

    # ---------------------------------------------------------------- states
    def _states_for(self, plan: ViewPlan, keys: Sequence[str]) -> list[ViewState]:
        """The states of the distinct ``keys`` (loaded from the store when not cached)."""
        return self.cache.get(plan, keys, count=not self._prefetched)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Apply the rows given inside the block at its end, after loading every state
        they miss, of every view, in ONE store call (one round trip per take). The
        applies run in the order given (also when the block raises, then re-raised)."""
        if self._deferred is not None:  # nested: the outer block applies
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            queued, self._deferred = self._deferred, None
            wanted: dict[str, dict[str, None]] = {}  # ordered: a deterministic LRU
            for plan, _table, keys, *_ in queued:
                wanted.setdefault(plan.view.id, {}).update(dict.fromkeys(keys))
            if wanted:
                self.cache.prefetch(wanted)
            self._prefetched = True
            try:
                for args in queued:
                    self._apply(*args)
            finally:
                self._prefetched = False

    def take_dirty(self) -> tuple[list[StateWrite], InFlight]:
        """The encoded states changed since the last call, with their TTLs (clears the
        dirty sets), and the handle to pass to :meth:`written` once the store confirmed
        them (until then they are never evicted)."""
        return self.cache.take_dirty()

    def written(self, flight: InFlight) -> None:
        """The write of ``flight`` is durable: its states may be evicted."""
        self.cache.written(flight)

    def evict(self) -> int:
        """Bound the cache (between batches): drop durable least recently used states."""
        return self.cache.evict()

    def cached(self) -> int:
        """States held in memory (all views)."""
        return len(self.cache)

    def clear(self) -> None:
        """Forget every cached state (after a revocation another worker owns some keys)."""
        self.cache.clear()

    def reset(self) -> None:
        """Forget every cached state and every change not written (an online rebuild)."""
        self.cache.reset()

    # ---------------------------------------------------------------- apply
    def _apply(self, plan: ViewPlan, table: pa.Table, keys: list[str], codes: np.ndarray,
               ts: np.ndarray, sources: str | np.ndarray, fkeys: np.ndarray,
               pos: np.ndarray) -> None:
        """Apply ``table``'s rows (entity ``keys[codes[row]]``) to ``plan``'s states."""
        if self._deferred is not None:
            self._deferred.append((plan, table, keys, codes, ts, sources, fkeys, pos))
            return
        vid = plan.view.id
        states = self._states_for(plan, keys)
        cols = {f: table[f].to_pylist() for f in self.topology.view_fields[vid]
                if f in table.column_names}
        tiebreaks = None
        if vid in self.topology.last_views and "event_id" in table.column_names:
            tiebreaks = last_tiebreaks(table["event_id"].to_pylist())
        changed = apply_batch(plan, states, codes, ts, sources, fkeys, pos, cols, tiebreaks)
        self.dirty[vid].update([keys[c] for c in changed])
        self.metrics.applied.labels(vid).inc(len(codes))

    def apply_local(self, source: str, accepted: Sequence[tuple[int, pa.Table, Any]]) -> None:
        """Apply accepted rows of one source, (partition, rows, event times) per partition,
        to the views keyed by the routing key."""
        rk = self.routing_key
        table = concat([t for _, t, _ in accepted])
        part = np.repeat(np.array([p for p, _, _ in accepted], dtype=np.int64),
                         [t.num_rows for _, t, _ in accepted])
        table_k = table
        if table[rk].null_count:
            valid = pc.is_valid(table[rk])
            table_k = table.filter(valid)
            part = part[np.asarray(valid.to_numpy(), dtype=bool)]
        if not table_k.num_rows:
            return
        keys, codes = column_codes(table_k[rk])
        ts_k = pc.cast(table_k["ts"], pa.int64()).to_numpy()
        pos = positions(table_k["_offset"], table_k["_index"])
        topo = self.topology
        for plan in self.local:
            vid = plan.view.id
            if source not in plan.feeds:
                continue
            fkeys = _fence_keys(topo.fence_source(vid, source), part)
            ok = admitted_by(table_k, topo.view_lateness_ms[vid])
            if ok is None:
                self._apply(plan, table_k, keys, codes, ts_k, source, fkeys, pos)
            elif ok.any():
                idx = np.flatnonzero(ok)
                sub_keys, sub_codes = _recode(keys, codes[idx])
                self._apply(plan, table_k.take(pa.array(idx)), sub_keys, sub_codes, ts_k[idx],
                            source, fkeys[idx], pos[idx])

    def forward_rows(self, entity: str, source: str, rows: pa.Table) -> pa.Table:
        """The forward table of ``entity`` for accepted ``rows`` of ``source``: entity id,
        event time, source coordinates and the fields its views read (rows without an
        entity id, and rows late for every view of the entity reading ``source``,
        dropped; ``behind_ms`` when those views allow different lateness).

        Raises:
            UnknownSourceError: none of the entity's views reads ``source`` (the engine
                forwards only :attr:`~feature_defs.topology.Topology.forward_sources`).
        """
        topo = self.topology
        plans = [p for p in self.remote[entity] if source in p.feeds]
        if not plans:
            raise UnknownSourceError(self.remote[entity][0].view.id, source)
        ids = entity_ids(plans[0].view.entity, rows)  # a composite key: its joined parts
        valid = pc.is_valid(ids)
        lateness = {topo.view_lateness_ms[p.view.id] for p in plans}
        ok = admitted_by(rows, max(lateness))
        if ok is not None:
            valid = pc.and_(valid, pa.array(ok))
        rows = rows.filter(valid)
        fields = sorted({f for p in plans for f in topo.fields_of(p.view.id, source)})
        cols: dict[str, Any] = {
            "entity_id": ids.filter(valid),
            "ts": pc.cast(rows["ts"], pa.int64()),
            "source": pa.repeat(pa.scalar(source, pa.string()), rows.num_rows),
            "src_partition": rows["_partition"],
            "src_offset": rows["_offset"],
            "src_index": rows["_index"],
        }
        for f in fields:
            cols[f] = rows[f]
        if any(p.view.id in topo.last_views for p in plans):
            cols["event_id"] = rows["event_id"]
        if len(lateness) > 1:
            cols["behind_ms"] = rows[BEHIND]
        return pa.table(cols)

    def apply_remote(self, entity: str, rows: pa.Table) -> np.ndarray:
        """Apply forwarded rows, possibly from several messages, in their order; returns
        their event times.

        The same as applying message by message: rows that a replayed forward repeats
        within ``rows`` are dropped here (the state's fences only know earlier batches).
        Each view applies only the rows of the sources it reads (a sibling view of the
        entity may read others; a worker before issue 12 forwarded every source), under
        its own fence keys, and only those not late for it (``behind_ms``).

        Raises:
            UnknownSourceError: a row names a source no view of the deployment reads.
        """
        topo = self.topology
        keys, codes = column_codes(rows["entity_id"])
        ts = rows["ts"].to_numpy()
        src_names, src_codes = column_codes(rows["source"])
        for s in src_names:
            if s not in topo.source_kinds:
                raise UnknownSourceError(self.remote[entity][0].view.id, s)
        srcs = np.asarray(src_names, dtype=object)[src_codes]
        parts = rows["src_partition"].to_numpy().astype(np.int64)
        pos = positions(rows["src_offset"], rows["src_index"])
        behind = None
        if "behind_ms" in rows.column_names:
            behind = pc.fill_null(rows["behind_ms"], 0).to_numpy()
        for plan in self.remote[entity]:
            vid = plan.view.id
            # -1: a source this view does not read (its rows are not this view's)
            lut = np.array([topo.fence_source(vid, s) if s in plan.feeds else -1
                            for s in src_names], dtype=np.int64)
            src_idx = lut[src_codes]
            ok = src_idx >= 0
            if behind is not None:
                ok &= behind <= topo.view_lateness_ms[vid]
            fkeys = _fence_keys(np.maximum(src_idx, 0), parts)
            if ok.all():
                keep = not_repeated(codes, fkeys, pos)
                if keep is None:
                    self._apply(plan, rows, keys, codes, ts, srcs, fkeys, pos)
                    continue
                idx = np.flatnonzero(keep)
                sub_keys, sub_codes = keys, codes[idx]
            else:
                idx = np.flatnonzero(ok)
                keep = not_repeated(codes[idx], fkeys[idx], pos[idx])
                if keep is not None:
                    idx = idx[keep]
                sub_keys, sub_codes = _recode(keys, codes[idx])
            if len(idx):
                self._apply(plan, rows.take(pa.array(idx)), sub_keys, sub_codes, ts[idx],
                            srcs[idx], fkeys[idx], pos[idx])
        return ts


def _fence_keys(source_idx: int | np.ndarray, parts: np.ndarray) -> np.ndarray:
    """:func:`~feature_defs.state.fence_key` per row (its bit operations work on arrays)."""
    return np.asarray(fence_key(source_idx, parts), dtype=np.int64)  # type: ignore[arg-type]


def _recode(keys: list[str], codes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(the distinct ids among ``codes``, the rows' codes into them): a subset of rows
    loads and caches only the states of its own entities."""
    uniq, inverse = np.unique(codes, return_inverse=True)
    return [keys[c] for c in uniq.tolist()], inverse.astype(np.int64)
