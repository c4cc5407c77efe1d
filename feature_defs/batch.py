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
from feature_defs.plan import RingPlan, ViewPlan
from feature_defs.state import NO_TS, ViewState

__all__ = ["apply_batch"]

_SHIFT = 40  # entity code << 40 | tile offset (tile offsets stay far below 2**40)


def _group_counts(e: np.ndarray, tile: np.ndarray, weight: np.ndarray | None
                  ) -> tuple[list[int], list[int], list[int]]:  # fmt: skip
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


def _horizon(ring_plan: RingPlan, latest: np.ndarray) -> np.ndarray:
    """Per entity, the oldest tile of the ring that a window as of ``T >= latest`` can
    still reach (``ViewState.compact`` drops the tiles below it)."""
    return latest // ring_plan.tile_ms - ring_plan.keep + 1


def apply_batch(
    plan: ViewPlan,
    states: dict[str, ViewState],
    ids: Sequence[str],
    ts: np.ndarray,
    sources: Sequence[str],
    fkeys: np.ndarray,
    pos: np.ndarray,
    columns: dict[str, Sequence[Any]] | None = None,
    tiebreaks: Sequence[int] | None = None,
) -> set[str]:
    """Apply rows to ``states`` (which must hold a state for every id); returns changed ids.

    Args:
        ids, ts, sources, fkeys, pos: per row the entity id, event time (int64 ms), source
            name, fence key and fence position (see :func:`feature_defs.state.fence_key`).
        columns: per field named by the view's measures, the row values.
        tiebreaks: per row tie-break for LAST (defaults to 0).
    """
    n = len(ids)
    if n == 0:
        return set()
    columns = columns or {}
    code: dict[str, int] = {}
    e_list = [code.setdefault(i, len(code)) for i in ids]
    st_by_code = [states[i] for i in code]
    fences = [s.fences for s in st_by_code]
    fk_list = fkeys.tolist()
    pos_list = pos.tolist()
    # 1. fences: drop rows already applied (replays), advance the fences
    keep = [pos_list[r] > fences[e_list[r]].get(fk_list[r], -1) for r in range(n)]
    if not all(keep):
        idx = [r for r in range(n) if keep[r]]
        if not idx:
            return set()
        sel = np.asarray(idx)
        e_list = [e_list[r] for r in idx]
        ts = ts[sel]
        sources = [sources[r] for r in idx]
        fk_list = [fk_list[r] for r in idx]
        pos_list = [pos_list[r] for r in idx]
        columns = {k: [v[r] for r in idx] for k, v in columns.items()}
        if tiebreaks is not None:
            tiebreaks = [tiebreaks[r] for r in idx]
        n = len(idx)
    for r in range(n):  # positions grow within (entity, fence key): the last one wins
        fences[e_list[r]][fk_list[r]] = pos_list[r]
    e = np.asarray(e_list, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    # 2. latest event time per entity, and which rows sit at it
    old_max = np.array([s.max_ts for s in st_by_code], dtype=np.int64)
    new_max = old_max.copy()
    np.maximum.at(new_max, e, ts)
    at_max = ts == new_max[e]
    below = ~at_max
    prev = np.array([s.prev_ts for s in st_by_code], dtype=np.int64)
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
        st = st_by_code[c]
        if st.max_ts != NO_TS:
            pend = st.pending
            for slot in count_slots:
                if pend[slot]:
                    carried[slot].append((c, st.max_ts, pend[slot]))
            for slot, places in others_at.items():
                v = pend[slot]
                if v is not None:
                    merge = MERGERS[measures[slot].op]
                    for ri, j in places:
                        tile_ms = plan.rings[ri].tile_ms
                        st.rings[ri].merge(j, st.max_ts // tile_ms if tile_ms else 0, v, merge)
        st.pending = [None] * nslots
        st.max_ts = int(new_max[c])
        st.prev_ts = int(prev[c])
        st.compact()
    for c in np.flatnonzero(~advanced).tolist():
        st_by_code[c].prev_ts = int(prev[c])
    # 4. per measure: rows below the max go to tiles, rows at the max to pending
    src_arr = np.asarray(sources, dtype=object)
    for slot, m in enumerate(measures):
        rows = src_arr == m.source
        if m.op is AggOp.COUNT:
            extra = carried[slot]
            if rows.any() or extra:
                _counts(plan, st_by_code, slot, e, ts, rows & below, rows & at_max, extra,
                        new_max)
        elif rows.any():
            _generic(plan, st_by_code, slot, m.op, e, ts, rows, at_max,
                     columns.get(m.field or "", None), tiebreaks, new_max)
    return set(code)


def _counts(plan: ViewPlan, st_by_code: list[ViewState], slot: int, e: np.ndarray,
            ts: np.ndarray, to_tiles: np.ndarray, to_pending: np.ndarray,
            extra: list[tuple[int, int, int]], new_max: np.ndarray) -> None:  # fmt: skip
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
                inside = tiles >= _horizon(ring_plan, new_max)[e_t]
                if not inside.all():
                    e_r, tiles = e_t[inside], tiles[inside]
                    w_r = None if weight is None else weight[inside]
                    if not len(e_r):
                        continue
            else:
                tiles = np.zeros_like(ts_t)
            for c, tile, cnt in zip(*_group_counts(e_r, tiles, w_r), strict=True):
                ring = st_by_code[c].rings[ri]
                t = ring.tiles
                if t and t[-1] == tile:  # the newest tile (in-order traffic): one add
                    ring.cums[k][-1] += cnt
                else:
                    ring.add_count(k, tile, cnt)
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
                       tiebreaks[r] if tiebreaks else 0) for r in idx]  # fmt: skip


def _generic(plan: ViewPlan, st_by_code: list[ViewState], slot: int, op: AggOp,
             e: np.ndarray, ts: np.ndarray, rows: np.ndarray, at_max: np.ndarray,
             values: Sequence[Any] | None, tiebreaks: Sequence[int] | None,
             new_max: np.ndarray) -> None:
    merge = MERGERS[op]
    rings = [(ri, rp.tile_ms, rp.others.index(slot),
              _horizon(rp, new_max).tolist() if rp.tile_ms else None)
             for ri, rp in enumerate(plan.rings) if slot in rp.others]  # fmt: skip
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
