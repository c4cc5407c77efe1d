"""Point-in-time values of one view's features for many (entity, T) queries, vectorized.

Invariant: the value of a feature as of T equals the online roll-up
(:meth:`feature_defs.state.ViewState.rollup`) of the view's applied events with
``ts < T`` under the window rule of :mod:`feature_defs.windows`, the view TTL honoured
(every feature of the view takes its declared default when no applied event is before T
or the latest one is at least the TTL old) and a ratio null when its denominator is 0.

How (all numpy, no per-row Python):

* applied rows are sorted by the composite int64 key ``code << bits | (ts - base)``; a
  query's rows before T, and those from a window's lower bound
  (:meth:`Window.lower_bounds_ms`), are two ``searchsorted`` positions ``a <= b``;
* count / sum / mean are differences of prefix sums at ``b`` and ``a``;
* an exact distinct count of values in rows ``[a, b)`` is ``(b - a) -`` the number of
  consecutive same-value pairs with both ends inside. Counting only pairs whose tiles are
  at most ``n_tiles - 1`` apart (the only pairs that can share a window) makes every
  pair with ``p < a`` also have ``j < b``, so that number is ``#{j < b} - #{p < a}``:
  two more searches instead of a 2-D dominance count;
* the rest (min, max, last, KMV sketches past ``KMV_K`` distinct values, and with
  ``as_of_known`` queries that have rows not yet ingested at T) is computed exactly by
  gathering each such query's rows in bounded batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.measures import KMV_K, distinct_hash, kmv_estimate
from feature_defs.model import AggOp, Measure
from feature_defs.plan import OutputPlan, ViewPlan
from feature_defs.windows import Window, WindowKind

__all__ = ["ViewRows", "ViewResult", "evaluate_view", "read_bounds", "is_int_output"]

_SLOW_OPS = (AggOp.MIN, AggOp.MAX, AggOp.LAST)
_BATCH_ROWS = 4_000_000  # rows gathered at once by the exact path


def is_int_output(o: OutputPlan) -> bool:
    """Counts and distinct counts are integers; everything else is a float."""
    return not o.is_ratio and o.ops[0] in (AggOp.COUNT, AggOp.APPROX_DISTINCT)


def read_bounds(plan: ViewPlan, outputs: Sequence[OutputPlan], t_min: int, t_max: int
                ) -> tuple[int | None, int]:
    """Event-time range ``[lo, hi)`` of applied rows needed for queries with T in
    ``[t_min, t_max]``: the earliest window lower bound or ``T - TTL`` (``lo`` is None
    when a lifetime window needs everything) through ``t_max`` (rows at T never count)."""
    lows = [t_min - plan.ttl_ms + 1]
    for o in outputs:
        if o.window.kind is WindowKind.LIFETIME:
            return None, t_max
        lows.append(int(o.window.lower_bounds_ms(np.array([t_min]))[0]))
    return min(lows), t_max


@dataclass
class _Field:
    values: np.ndarray  # float64, or int64 dictionary codes for distinct counts
    valid: np.ndarray
    hashes: np.ndarray | None = None  # uint64 distinct_hash per dictionary code


@dataclass
class ViewRows:
    """Applied rows of one view, restricted to the query entities, sorted by (code, ts).

    ``code`` is the row's entity position in the query key dictionary; ``key`` the
    sorted composite ``code << bits | (ts - base)``.
    """

    plan: ViewPlan
    base: int
    hi: int
    bits: int
    code: np.ndarray
    ts: np.ndarray
    source: np.ndarray
    key: np.ndarray
    fields: dict[str, _Field]
    vis: np.ndarray | None = None  # max(ts + 1, _ingest_ms): first T the row is known at
    tiebreak: np.ndarray | None = None
    _cache: dict[object, object] = field(default_factory=dict)

    @classmethod
    def from_table(cls, plan: ViewPlan, table: pa.Table, keys: pa.Array, base: int, hi: int,
                   measures: Sequence[Measure], *, as_of_known: bool = False) -> ViewRows:
        """Build from rows read by :meth:`offline.store.OfflineStore.read_view`.

        Rows whose entity is not in ``keys`` are dropped; ``[base, hi)`` is the range read.
        """
        n = table.num_rows
        bits = max(int(hi) + 2 - int(base), 2).bit_length()
        if bits + max(len(keys), 1).bit_length() > 62:
            raise ValueError("time range and entity count do not fit a 63-bit sort key")
        if n == 0:
            empty = np.zeros(0, np.int64)
            return cls(plan, int(base), int(hi), bits, empty, empty, empty.astype(np.int8),
                       empty, {})
        code = _lookup(table.column("entity_id"), keys)
        source = _lookup(table.column("source"), pa.array([s.name for s in plan.view.sources]))
        keep = np.flatnonzero((code >= 0) & (source >= 0))
        ts = _ms(table.column("ts"))
        order = keep[np.argsort((code[keep] << bits) | (ts[keep] - base))]
        code, ts, src = code[order], ts[order], source[order].astype(np.int8)
        fields = {}
        for m in measures:
            if m.field is not None and m.field not in fields:
                fields[m.field] = _field(table.column(m.field), order,
                                         m.op is AggOp.APPROX_DISTINCT)
        rows = cls(plan, int(base), int(hi), bits, code, ts, src, (code << bits) | (ts - base),
                   fields)
        if as_of_known:
            ing = _np_index(table.column("_ingest_ms").combine_chunks())[order]
            rows.vis = np.minimum(np.maximum(ts + 1, ing), hi + 1)
        if any(m.op is AggOp.LAST for m in measures):
            ids = table.column("event_id").take(pa.array(order)).to_pylist()
            rows.tiebreak = np.array([distinct_hash(i or "") for i in ids], dtype=np.uint64)
        return rows

    @property
    def size(self) -> int:
        return len(self.ts)

    def qkey(self, code: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Composite key of (entity code, time), times clipped into the key's range."""
        return (code << self.bits) | (np.clip(t, self.base, self.hi + 1) - self.base)

    def source_of(self, m: Measure) -> int:
        return [s.name for s in self.plan.view.sources].index(m.source)

    def member(self, m: Measure) -> np.ndarray:
        """Rows feeding measure ``m``: its source, and a non-null field value."""
        mask = self.source == self.source_of(m)
        if m.op is not AggOp.COUNT and m.field is not None:
            mask &= self.fields[m.field].valid
        return mask

    def prefix(self, m: Measure, what: str) -> np.ndarray:
        """Prefix count (``what="n"``) or long-double prefix sum (``"sum"``) of ``m``."""
        ck = (m.op is AggOp.COUNT, m.source, m.field, what)
        if ck not in self._cache:
            mask = self.member(m)
            if what == "n":
                acc = np.cumsum(mask, dtype=np.int64)
            else:
                vals = np.where(mask, self.fields[m.field or ""].values, 0.0)
                acc = np.cumsum(vals.astype(np.longdouble))
            self._cache[ck] = np.concatenate([np.zeros(1, acc.dtype), acc])
        return self._cache[ck]  # type: ignore[return-value]

    def pair_ends(self, m: Measure, w: Window) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions ``(p, j)`` of consecutive same-(entity, value) rows of ``m``
        whose tiles are close enough to share a window ``w``."""
        ck = ("pairs", m, w)
        if ck not in self._cache:
            p, j = self._pairs(m)
            if w.kind is not WindowKind.LIFETIME:
                tile = w.tile_ms
                close = self.ts[j] // tile - self.ts[p] // tile <= w.n_tiles - 1
                p, j = p[close], j[close]
            self._cache[ck] = (np.sort(p), np.sort(j))
        return self._cache[ck]  # type: ignore[return-value]

    def _pairs(self, m: Measure) -> tuple[np.ndarray, np.ndarray]:
        ck = ("pairs", m)
        if ck not in self._cache:
            rows = np.flatnonzero(self.member(m))
            fld = self.fields[m.field or ""]
            nvals = max(len(fld.hashes) if fld.hashes is not None else 1, 1)
            pair = self.code[rows] * nvals + fld.values[rows]
            rbits = max(len(rows), 1).bit_length()
            if int(pair.max(initial=0)).bit_length() + rbits <= 63:
                packed = np.sort((pair << rbits) | np.arange(len(rows)))
                pos, grp = packed & ((1 << rbits) - 1), packed >> rbits
            else:
                pos = np.lexsort((np.arange(len(rows)), pair))
                grp = pair[pos]
            same = grp[1:] == grp[:-1]
            self._cache[ck] = (rows[pos[:-1][same]], rows[pos[1:][same]])
        return self._cache[ck]  # type: ignore[return-value]


def _lookup(col: pa.ChunkedArray, keys: pa.Array) -> np.ndarray:
    """Position of each value in ``keys`` (-1 when absent or null); dictionary-aware."""
    parts = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            mapped = _np_index(pc.index_in(chunk.dictionary.cast(keys.type), value_set=keys))
            idx = _np_index(chunk.indices)
            parts.append(np.where(idx >= 0, mapped[np.maximum(idx, 0)], -1) if len(mapped)
                         else np.full(len(idx), -1, np.int64))
        else:
            parts.append(_np_index(pc.index_in(chunk.cast(keys.type), value_set=keys)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _np_index(arr: pa.Array) -> np.ndarray:
    filled = pc.fill_null(arr, -1) if arr.null_count else arr
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=np.int64)


def _ms(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy(),
                      dtype=np.int64)


def _field(col: pa.ChunkedArray, order: np.ndarray, categorical: bool) -> _Field:
    """Measure field values in row ``order``: float64, or dictionary codes + hashes."""
    if not categorical:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        arr = col.combine_chunks().take(pa.array(order))
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        vals = pc.fill_null(arr.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        return _Field(np.asarray(vals, dtype=np.float64), valid)
    if pa.types.is_timestamp(col.type):  # a distinct count of times hashes epoch ms
        col = col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    unified = pa.table({"c": col}).unify_dictionaries().column("c")
    dictionary = unified.chunk(0).dictionary if unified.num_chunks else pa.array([], pa.string())
    codes = np.concatenate([_np_index(c.indices) for c in unified.chunks])[order]
    hashes = np.array([distinct_hash(str(v)) for v in dictionary.to_pylist()], dtype=np.uint64)
    return _Field(codes, codes >= 0, hashes)


@dataclass
class ViewResult:
    """Per output name: values and validity (False = null); the view's default mask."""

    values: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    is_default: np.ndarray


def evaluate_view(rows: ViewRows, q_code: np.ndarray, q_t: np.ndarray,
                  outputs: Sequence[OutputPlan], *, as_of_known: bool = False) -> ViewResult:
    """Values of ``outputs`` as of ``q_t`` (epoch ms) for entity codes ``q_code``.

    ``q_code`` is -1 for a query whose entity is null or has no rows: it gets defaults.
    With ``as_of_known`` a row only counts once ingested: ``_ingest_ms <= T``.
    """
    n = len(q_t)
    res = ViewResult({o.name: np.zeros(n, np.int64 if is_int_output(o) else np.float64)
                      for o in outputs}, {o.name: np.zeros(n, bool) for o in outputs},
                     np.ones(n, bool))
    qi = np.flatnonzero(q_code >= 0) if rows.size else np.zeros(0, np.int64)
    if qi.size:
        kt = rows.qkey(q_code[qi], q_t[qi])
        order = np.argsort(kt)  # sorted queries make every searchsorted cache-friendly
        qi, kt = qi[order], kt[order]
        _fast(rows, q_code[qi], q_t[qi], kt, qi, outputs, res, as_of_known)
    for o in outputs:  # the TTL/default rule, exactly as ViewState.rollup
        d = res.is_default
        res.values[o.name][d] = 0 if o.default is None else o.default
        res.valid[o.name][d] = o.default is not None
    return res


def _fast(rows: ViewRows, qc: np.ndarray, qt: np.ndarray, kt: np.ndarray, qi: np.ndarray,
          outputs: Sequence[OutputPlan], res: ViewResult, as_of_known: bool) -> None:
    b = np.searchsorted(rows.key, kt)
    last = np.maximum(b - 1, 0)
    res.is_default[qi] = (b == 0) | (rows.code[last] != qc) | (qt - rows.ts[last] >=
                                                                rows.plan.ttl_ms)
    lows: dict[Window, np.ndarray] = {}

    def a_of(w: Window) -> np.ndarray:
        if w not in lows:
            lows[w] = np.searchsorted(rows.key, rows.qkey(qc, w.lower_bounds_ms(qt)))
        return lows[w]

    exact_all: list[OutputPlan] = []
    exact_some: dict[str, np.ndarray] = {}
    for o in outputs:
        if any(op in _SLOW_OPS for op in o.ops):
            exact_all.append(o)
            continue
        a = a_of(o.window)
        parts = [_fast_measure(rows, rows.plan.measures[s], o.window, a, b) for s in o.slots]
        v, ok = _combine(o, parts)
        res.values[o.name][qi], res.valid[o.name][qi] = v, ok
        big = np.zeros(len(qi), bool)
        for s, (pv, _) in zip(o.slots, parts, strict=True):
            if rows.plan.measures[s].op is AggOp.APPROX_DISTINCT:
                big |= pv >= KMV_K
        if big.any():
            exact_some[o.name] = big
    redo = np.zeros(len(qi), bool)
    if as_of_known:  # rows with ts < T not yet ingested at T: #{ts < T} - #{vis <= T}
        vkey = np.sort((rows.code << rows.bits) | (rows.vis - rows.base))
        redo = b - np.searchsorted(vkey, kt, side="right") > 0
        if redo.any():
            sel = np.flatnonzero(redo)
            vals, oks, dflt = _exact(rows, qc[sel], qt[sel], outputs, visible=True)
            res.is_default[qi[sel]] = dflt
            for o in outputs:
                res.values[o.name][qi[sel]], res.valid[o.name][qi[sel]] = vals[o.name], oks[o.name]
    for o in exact_all:
        sel = np.flatnonzero(~res.is_default[qi] & ~redo)
        _exact_into(rows, qc, qt, qi, sel, o, res)
    for name, big in exact_some.items():
        o = next(x for x in outputs if x.name == name)
        _exact_into(rows, qc, qt, qi, np.flatnonzero(big & ~redo), o, res)


def _exact_into(rows: ViewRows, qc: np.ndarray, qt: np.ndarray, qi: np.ndarray,
                sel: np.ndarray, o: OutputPlan, res: ViewResult) -> None:
    if sel.size:
        vals, oks, _ = _exact(rows, qc[sel], qt[sel], [o], visible=False)
        res.values[o.name][qi[sel]], res.valid[o.name][qi[sel]] = vals[o.name], oks[o.name]


def _fast_measure(rows: ViewRows, m: Measure, w: Window, a: np.ndarray, b: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    n = rows.prefix(m, "n")
    count = n[b] - n[a]
    if m.op is AggOp.COUNT:
        return count, np.ones(len(a), bool)
    if m.op is AggOp.APPROX_DISTINCT:
        p, j = rows.pair_ends(m, w)
        return count - (np.searchsorted(j, b) - np.searchsorted(p, a)), np.ones(len(a), bool)
    s = rows.prefix(m, "sum")
    total = (s[b] - s[a]).astype(np.float64)
    if m.op is AggOp.SUM:
        return total, np.ones(len(a), bool)
    return total / np.maximum(count, 1), count > 0  # MEAN


def _combine(o: OutputPlan, parts: list[tuple[np.ndarray, np.ndarray]]
             ) -> tuple[np.ndarray, np.ndarray]:
    """A measure's value, or a ratio: null when a side is null or the denominator is 0."""
    if not o.is_ratio:
        return parts[0]
    (num, nok), (den, dok) = parts
    ok = nok & dok & (den != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(ok, num / np.where(ok, den, 1), 0.0)
    return value.astype(np.float64), ok


def _batches(lengths: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    ends = np.cumsum(lengths)
    start = 0
    while start < len(lengths):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + limit, side="right")), start + 1)
        yield start, stop
        start = stop


def _exact(rows: ViewRows, qc: np.ndarray, qt: np.ndarray, outputs: Sequence[OutputPlan], *,
           visible: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Exact values by gathering each query's rows (in batches of ~4M rows)."""
    nq = len(qt)
    lows = {o.window: o.window.lower_bounds_ms(qt) for o in outputs}
    start = qt - rows.plan.ttl_ms + 1  # the TTL rule needs the rows in (T - TTL, T)
    for lo in lows.values():
        start = np.minimum(start, lo)
    s = np.searchsorted(rows.key, rows.qkey(qc, start))
    e = np.searchsorted(rows.key, rows.qkey(qc, qt))
    vals = {o.name: np.zeros(nq, np.int64 if is_int_output(o) else np.float64) for o in outputs}
    oks = {o.name: np.zeros(nq, bool) for o in outputs}
    dflt = np.ones(nq, bool)
    for q0, q1 in _batches(e - s, _BATCH_ROWS):
        lens = (e - s)[q0:q1]
        qid = np.repeat(np.arange(q1 - q0), lens)
        idx = np.arange(len(qid)) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(
            s[q0:q1], lens)
        t = qt[q0:q1]
        if visible and rows.vis is not None:
            keep = rows.vis[idx] <= t[qid]
            qid, idx = qid[keep], idx[keep]
        latest = np.full(q1 - q0, np.iinfo(np.int64).min)
        np.maximum.at(latest, qid, rows.ts[idx])
        dflt[q0:q1] = (latest == np.iinfo(np.int64).min) | (t - latest >= rows.plan.ttl_ms)
        ts = rows.ts[idx]
        for o in outputs:
            inside = ts >= lows[o.window][q0:q1][qid]
            parts = [_group_measure(rows, rows.plan.measures[sl], qid, idx, inside, q1 - q0)
                     for sl in o.slots]
            vals[o.name][q0:q1], oks[o.name][q0:q1] = _combine(o, parts)
    return vals, oks, dflt


def _group_measure(rows: ViewRows, m: Measure, qid: np.ndarray, idx: np.ndarray,
                   inside: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Value of measure ``m`` per query over the gathered rows flagged ``inside``."""
    sel = inside & rows.member(m)[idx]
    g, r = qid[sel], idx[sel]
    count = np.bincount(g, minlength=nq)
    has = count > 0
    if m.op is AggOp.COUNT:
        return count, np.ones(nq, bool)
    fld = rows.fields[m.field or ""]
    if m.op is AggOp.APPROX_DISTINCT:
        assert fld.hashes is not None
        nvals = max(len(fld.hashes), 1)
        uniq = np.unique(g.astype(np.int64) * nvals + fld.values[r])
        ug, uv = uniq // nvals, uniq % nvals
        out = np.bincount(ug, minlength=nq).astype(np.int64)
        starts = np.searchsorted(ug, np.arange(nq))
        for q in np.flatnonzero(out >= KMV_K):
            h = np.sort(fld.hashes[uv[starts[q]:starts[q] + out[q]]])[:KMV_K]
            out[q] = kmv_estimate([int(x) for x in h])
        return out, np.ones(nq, bool)
    v = fld.values[r]
    if m.op is AggOp.SUM:
        return np.bincount(g, weights=v, minlength=nq), np.ones(nq, bool)
    if m.op is AggOp.MEAN:
        return np.bincount(g, weights=v, minlength=nq) / np.maximum(count, 1), has
    if m.op in (AggOp.MIN, AggOp.MAX):
        fn = np.minimum if m.op is AggOp.MIN else np.maximum
        out_f = np.full(nq, np.inf if m.op is AggOp.MIN else -np.inf)
        fn.at(out_f, g, v)
        return np.where(has, out_f, 0.0), has
    assert rows.tiebreak is not None  # LAST: latest (ts, tiebreak) wins
    order = np.lexsort((rows.tiebreak[r], rows.ts[r], g))
    g_sorted = g[order]
    ends = np.flatnonzero(np.append(g_sorted[1:] != g_sorted[:-1], True)) if len(g) else order
    out_l = np.zeros(nq)
    out_l[g_sorted[ends]] = v[order][ends]
    return out_l, has
