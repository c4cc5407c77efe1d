"""Applying accepted rows to view states: locally, by forwarding, and from forwards.

The views keyed by the routing key are applied where the source partition is consumed
(:meth:`ViewApplier.apply_local`). For every other (repartitioned) entity the accepted
rows are re-keyed into forward tables (:meth:`ViewApplier.forward_rows`) that carry
their source coordinates, published to ``headrace-repartition-{entity}``, and applied
by the consumer of that partition (:meth:`ViewApplier.apply_remote`); the coordinates
are the states' replay fences. Both paths are vectorized per call (numpy and Arrow);
the per-entity work is in :func:`feature_defs.batch.apply_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.batch import apply_batch
from feature_defs.layout import entity_key
from feature_defs.measures import last_tiebreaks
from feature_defs.plan import ViewPlan
from feature_defs.registry import Registry
from feature_defs.state import ViewState, fence_key
from headrace.core.online_store import OnlineStore, StateWrite
from streams.metrics import StreamMetrics
from streams.rows import column_codes, concat, not_repeated, positions

__all__ = ["ViewApplier"]


class ViewApplier:
    """View states (cached per view and entity id), their dirty sets, and the apply paths.

    Args:
        registry: The views and their compiled topology.
        store: Where states missing from the cache are loaded.
        prefix: Redis key prefix.
        metrics: The ``applied`` counter.
    """

    def __init__(self, *, registry: Registry, store: OnlineStore, prefix: str,
                 metrics: StreamMetrics) -> None:
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
        self.states: dict[str, dict[str, ViewState]] = {vid: {} for vid in self.plans}
        self.dirty: dict[str, set[str]] = {vid: set() for vid in self.plans}

    # ---------------------------------------------------------------- states
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

    def take_dirty(self) -> list[StateWrite]:
        """The encoded states changed since the last call, with their TTLs (clears the
        dirty sets)."""
        writes: list[StateWrite] = []
        for vid, plan in self.plans.items():
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
        return writes

    def cached(self) -> int:
        """States held in memory (all views)."""
        return sum(len(s) for s in self.states.values())

    def clear(self) -> None:
        """Forget every cached state (after a revocation another worker owns some keys)."""
        for states in self.states.values():
            states.clear()

    # ---------------------------------------------------------------- apply
    def _apply(self, plan: ViewPlan, table: pa.Table, keys: list[str], codes: np.ndarray,
               ts: np.ndarray, sources: str | np.ndarray, fkeys: np.ndarray,
               pos: np.ndarray) -> None:
        """Apply ``table``'s rows (entity ``keys[codes[row]]``) to ``plan``'s states."""
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
        parts = np.unique(part).tolist()
        for plan in self.local:
            if source not in plan.feeds:
                continue
            idx = plan.view.sources.index(plan.view.source(source))
            fkeys = np.empty(len(codes), dtype=np.int64)
            for p in parts:
                fkeys[part == p] = fence_key(idx, p)
            self._apply(plan, table_k, keys, codes, ts_k, source, fkeys, pos)

    def forward_rows(self, entity: str, source: str, rows: pa.Table) -> pa.Table:
        """The forward table of ``entity`` for accepted ``rows`` of ``source``: entity id,
        event time, source coordinates and the fields its views read (rows without an
        entity id dropped)."""
        topo = self.topology
        key = topo.entity_keys[entity]
        rows = rows.filter(pc.is_valid(rows[key]))
        plans = self.remote[entity]
        fields = sorted({f for p in plans for f in topo.fields_of(p.view.id, source)})
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
        if any(p.view.id in topo.last_views for p in plans):
            cols["event_id"] = rows["event_id"]
        return pa.table(cols)

    def apply_remote(self, entity: str, rows: pa.Table) -> np.ndarray:
        """Apply forwarded rows, possibly from several messages, in their order; returns
        their event times.

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
            # a source the view does not read falls back to fence index 0 (issue 12)
            lut = np.array([src_index.get(s, 0) for s in src_names], dtype=np.int64)
            fkeys = (lut[src_codes] << 16) | parts
            keep = not_repeated(codes, fkeys, pos)
            if keep is None:
                self._apply(plan, rows, keys, codes, ts, srcs, fkeys, pos)
            elif keep.any():
                idx = np.flatnonzero(keep)
                self._apply(plan, rows.take(pa.array(idx)), keys, codes[idx], ts[idx],
                            srcs[idx], fkeys[idx], pos[idx])
        return ts
