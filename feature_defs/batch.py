"""Apply a batch of events to many entity states at once (the stream engine's hot path).

Equivalent to calling :meth:`ViewState.apply` for each event in arrival order, and
tested to give byte-identical states (after :meth:`ViewState.compact`). It relies on two
facts of the state's design:

* every per-tile merge is commutative and associative, so the order of events inside a
  batch does not matter — only which tile (or the ``pending`` slot of events at the
  entity's latest time) each event lands in, and that depends only on the entity's
  latest event time after the batch;
* tiles older than the ring's horizon relative to the latest event cannot fall inside any
  window as of ``T >= max_ts``, so they are dropped against the entity's latest event
  time *after* the batch: rows below that horizon are never added (per ring, with
  numpy), and tiles that fall below it are evicted once per entity, not at each event.
  Rings therefore never grow past their horizon however much event time a batch spans
  (catching up on a backlog, or views fed by several source partitions that progress
  unevenly, where an entity's rows arrive out of order).

Rows are grouped by (entity, tile) with numpy; Python runs once per group, not per
event, for counts; other operators merge per row within their ring only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from feature_defs.measures import MERGERS, init_state
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan
from feature_defs.state import NO_TS, ViewState, set_fence

__all__ = ["apply_batch"]

_SHIFT = 40  # entity code << 40 | tile offset (tile offsets stay far below 2**40)
_FENCE_BITS = 24  # entity code << 24 | fence key (source index << 16 | partition)


def _group_counts(e: np.ndarray, tile: np.ndarray, weight: np.ndarray | None
                  ) -> tuple[list[int], list[int], list[int]]:
    """Distinct (entity, tile) pairs with their row counts (or summed row weights)."""
    base = int(tile.min())
    keys = (e.astype(np.int64) << _SHIFT) | (tile - base)
    if weight is None:
        uniq, counts = np.unique(keys, return_counts=True)
    else:
        uniq, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=weight).astype(np.int64)  # exact below 2**53
    return ((uniq >> _SHIFT).tolist(), ((uniq & ((1 << _SHIFT) - 1)) + base).tolist(),
            counts.tolist())


def _advance_fences(fences: list[dict[int, int]], e: np.ndarray, fkeys: np.ndarray,
                    pos: np.ndarray) -> np.ndarray | None:
    """Drop rows at or before their (entity, fence key) fence (replays) and advance the
    fences to the last row kept. Python runs per (entity, fence key) pair, not per row.
    Returns the keep mask, or None when every row is kept."""
    pair = (e << _FENCE_BITS) | fkeys
    uniq, inverse = np.unique(pair, return_inverse=True)
    ents = (uniq >> _FENCE_BITS).tolist()
    keys = (uniq & ((1 << _FENCE_BITS) - 1)).tolist()
    old = np.fromiter((fences[c].get(k, -1) for c, k in zip(ents, keys, strict=True)),
                      dtype=np.int64, count=len(ents))
    keep = pos > old[inverse]
    new = old.copy()
    # positions grow within (entity, fence key): the last row kept is the largest
    np.maximum.at(new, inverse[keep], pos[keep])
    for g in np.flatnonzero(new > old).tolist():
        set_fence(fences[ents[g]], keys[g], int(new[g]))
    return None if keep.all() else keep


def apply_batch(
    plan: ViewPlan,
    states: Sequence[ViewState],
    codes: np.ndarray,
    ts: np.ndarray,
    sources: str | Sequence[str] | np.ndarray,
    fkeys: np.ndarray,
    pos: np.ndarray,
    columns: dict[str, Sequence[Any]] | None = None,
    tiebreaks: Sequence[int] | None = None,
) -> list[int]:
    """Apply rows to entity ``states``; returns the codes of the states that changed.

    Args:
        states: one state per entity; ``codes`` gives each row's entity as an index into
            it.
        codes, ts, fkeys, pos: per row the entity code, event time (int64 ms), fence key
            and fence position (see :func:`feature_defs.state.fence_key`).
        sources: the rows' source name, or per row the source name.
        columns: per field named by the view's measures, the row values.
        tiebreaks: per row tie-break for LAST (defaults to 0).
    """
    n = len(codes)
    if n == 0:
        return []
    columns = columns or {}
    e = np.asarray(codes, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    # 1. fences: drop rows already applied (replays), advance the fences
    keep = _advance_fences([s.fences for s in states], e, np.asarray(fkeys, np.int64),
                           np.asarray(pos, np.int64))
    if keep is not None:
        idx = np.flatnonzero(keep)
        if not len(idx):
            return []
        e, ts = e[idx], ts[idx]
        rows_kept = idx.tolist()
        if not isinstance(sources, str):
            sources = np.asarray(sources, dtype=object)[idx]
        columns = {k: [v[r] for r in rows_kept] for k, v in columns.items()}
        if tiebreaks is not None:
            tiebreaks = [tiebreaks[r] for r in rows_kept]
    # 2. latest event time per entity, and which rows sit at it
    old_max = np.array([s.max_ts for s in states], dtype=np.int64)
    new_max = old_max.copy()
    np.maximum.at(new_max, e, ts)
    at_max = ts == new_max[e]
    below = ~at_max
    prev = np.array([s.prev_ts for s in states], dtype=np.int64)
    advanced = new_max > old_max
    prev = np.where(advanced & (old_max != NO_TS), np.maximum(prev, old_max), prev)
    if below.any():
        np.maximum.at(prev, e[below], ts[below])
    # 3. entities whose latest time advanced: old pending goes into its tiles (counts
    #    ride along with the batch's rows below, as weighted rows at the old latest time)
    measures = plan.measures
    nslots = len(measures)
    count_slots = [slot for slot, m in enumerate(measures) if m.op is AggOp.COUNT]
    carried: dict[int, list[tuple[int, int, int]]] = {slot: [] for slot in count_slots}
    others_at = plan.others_at
    for c in np.flatnonzero(advanced).tolist():
        st = states[c]
        if st.max_ts != NO_TS:
            pend = st.pending
            for slot in count_slots:
                if pend[slot]:
                    carried[slot].append((c, st.max_ts, pend[slot]))
            latest = int(new_max[c])
            for slot, places in others_at.items():
                v = pend[slot]
                if v is not None:
                    merge = MERGERS[measures[slot].op]
                    for ri, j in places:
                        rp = plan.rings[ri]
                        if not rp.tile_ms:
                            st.rings[ri].merge(j, 0, v, merge)
                            continue
                        tile = st.max_ts // rp.tile_ms
                        if tile >= rp.horizon(latest):
                            st.rings[ri].merge(j, tile, v, merge)
        st.pending = [None] * nslots
        st.max_ts = int(new_max[c])
        st.prev_ts = int(prev[c])
        st.compact()
    for c in np.flatnonzero(~advanced).tolist():
        states[c].prev_ts = int(prev[c])
    # 4. per measure: rows below the max go to tiles, rows at the max to pending
    src_arr = None if isinstance(sources, str) else np.asarray(sources, dtype=object)
    everything = np.ones(len(e), dtype=bool)
    for slot, m in enumerate(measures):
        if src_arr is None:
            rows = everything if m.source == sources else ~everything
        else:
            rows = src_arr == m.source
        if m.op is AggOp.COUNT:
            extra = carried[slot]
            if rows.any() or extra:
                _counts(plan, states, slot, e, ts, rows & below, rows & at_max, extra,
                        new_max)
        elif rows.any():
            _generic(plan, states, slot, m.op, e, ts, rows, at_max,
                     columns.get(m.field or "", None), tiebreaks, new_max)
    return np.unique(e).tolist()


def _counts(plan: ViewPlan, st_by_code: Sequence[ViewState], slot: int, e: np.ndarray,
            ts: np.ndarray, to_tiles: np.ndarray, to_pending: np.ndarray,
            extra: list[tuple[int, int, int]], new_max: np.ndarray) -> None:
    """COUNT ``slot``: rows ``to_tiles`` (and ``extra`` (code, ts, count) rows) into
    their tiles (those within each ring's horizon of ``new_max``, the entity's latest
    event time), rows ``to_pending`` into the pending events."""
    if to_tiles.any() or extra:
        e_t, ts_t = e[to_tiles], ts[to_tiles]
        weight = None
        if extra:
            more = np.array(extra, dtype=np.int64)
            e_t = np.concatenate([e_t, more[:, 0]])
            ts_t = np.concatenate([ts_t, more[:, 1]])
            weight = np.concatenate([np.ones(len(e_t) - len(more)), more[:, 2]])
        for ri, ring_plan in enumerate(plan.rings):
            if slot not in ring_plan.counts:
                continue
            k = ring_plan.counts.index(slot)
            e_r, w_r = e_t, weight
            if ring_plan.tile_ms:
                tiles = ts_t // ring_plan.tile_ms
                inside = tiles >= ring_plan.horizon(new_max)[e_t]
                if not inside.all():
                    e_r, tiles = e_t[inside], tiles[inside]
                    w_r = None if weight is None else weight[inside]
                    if not len(e_r):
                        continue
            else:
                tiles = np.zeros_like(ts_t)
            for c, tile, cnt in zip(*_group_counts(e_r, tiles, w_r), strict=True):
                st_by_code[c].rings[ri].add_count(k, tile, cnt)
    if to_pending.any():
        codes, counts = np.unique(e[to_pending], return_counts=True)
        for c, cnt in zip(codes.tolist(), counts.tolist(), strict=True):
            pending = st_by_code[c].pending
            cur = pending[slot]
            pending[slot] = cnt if cur is None else cur + cnt


def _row_states(op: AggOp, values: Sequence[Any] | None, ts_l: list[int],
                tiebreaks: Sequence[int] | None, idx: list[int]) -> list[Any]:
    """The one-event state of each row in ``idx`` (``init_state``). A distinct-count
    state depends on the value alone: hashed once per distinct value."""
    if op is AggOp.APPROX_DISTINCT and values is not None:
        memo: dict[Any, Any] = {}
        out = []
        for r in idx:
            v = values[r]
            st = memo.get(v)
            if st is None and v is not None:
                st = memo[v] = init_state(op, v, 0, 0)
            out.append(st)
        return out
    return [init_state(op, values[r] if values is not None else None, ts_l[r],
                       tiebreaks[r] if tiebreaks else 0) for r in idx]


def _generic(plan: ViewPlan, st_by_code: Sequence[ViewState], slot: int, op: AggOp,
             e: np.ndarray, ts: np.ndarray, rows: np.ndarray, at_max: np.ndarray,
             values: Sequence[Any] | None, tiebreaks: Sequence[int] | None,
             new_max: np.ndarray) -> None:
    merge = MERGERS[op]
    rings = [(ri, rp.tile_ms, rp.others.index(slot),
              rp.horizon(new_max).tolist() if rp.tile_ms else [])
             for ri, rp in enumerate(plan.rings) if slot in rp.others]
    e_l, ts_l, at_l = e.tolist(), ts.tolist(), at_max.tolist()
    idx = np.flatnonzero(rows).tolist()
    for r, st_val in zip(idx, _row_states(op, values, ts_l, tiebreaks, idx), strict=True):
        if st_val is None:
            continue
        c = e_l[r]
        st = st_by_code[c]
        if at_l[r]:
            cur = st.pending[slot]
            st.pending[slot] = st_val if cur is None else merge(cur, st_val)
            continue
        for ri, tile_ms, j, low in rings:
            if tile_ms:
                tile = ts_l[r] // tile_ms
                if tile >= low[c]:
                    st.rings[ri].merge(j, tile, st_val, merge)
            else:
                st.rings[ri].merge(j, 0, st_val, merge)
