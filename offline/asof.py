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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.measures import KMV_K, distinct_hash, kmv_estimate, last_tiebreaks
from feature_defs.model import AggOp, Measure
from feature_defs.plan import OutputPlan, ViewPlan
from feature_defs.windows import Window, WindowKind
from offline.store import dictionary_codes, flat_dictionary

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
    dictionary: pa.Array | None = None  # distinct values by code

    @property
    def hashes(self) -> np.ndarray:
        """uint64 :func:`distinct_hash` per dictionary code (computed on first use)."""
        if not hasattr(self, "_hashes"):
            values = [] if self.dictionary is None else self.dictionary.to_pylist()
            self._hashes = np.array([distinct_hash(str(v)) for v in values], dtype=np.uint64)
        return self._hashes


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
    code_map: np.ndarray  # query key position -> row code (-1: no rows); last entry -1
    code: np.ndarray
    ts: np.ndarray
    source: np.ndarray
    key: np.ndarray
    fields: dict[tuple[str, bool], _Field]  # (field, as distinct codes?) -> values
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
        code = _lookup(table.column("entity_id"), keys) if n else np.zeros(0, np.int64)
        src = _lookup(table.column("source"), pa.array([s.name for s in plan.view.sources])
                      ) if n else code
        keep = (code >= 0) & (src >= 0)
        ts = _ms(table.column("ts")) if n else code
        # narrow the key: times from the first row read, codes dense over present entities
        code_map = np.full(len(keys) + 1, -1, np.int64)
        if keep.any():
            base = max(int(base), int(ts[keep].min()))
            present = np.zeros(len(keys) + 1, bool)
            present[code[keep]] = True
            code_map[present] = np.arange(int(present.sum()))
            code = code_map[code]
        bits = max(int(hi) + 2 - int(base), 2).bit_length()
        max_code = int(code_map.max())
        if bits + max(max_code, 1).bit_length() > 62:
            raise ValueError("time range and entity count do not fit a 63-bit sort key")
        if max_code < 0:
            empty = np.zeros(0, np.int64)
            return cls(plan, int(base), int(hi), bits, code_map, empty, empty,
                       empty.astype(np.int8), empty, {})
        cats = {m.field: dictionary_codes(_hashable(table.column(m.field)))
                for m in measures if m.op is AggOp.APPROX_DISTINCT and m.field}
        key = (code << bits) | (ts - base)
        payload = [(src, max(len(plan.view.sources) - 1, 1).bit_length())] + [
            (c + 1, (len(d) + 1).bit_length()) for c, d in cats.values()]
        width = sum(w for _, w in payload) + bits + max(max_code, 1).bit_length()
        if not as_of_known and width <= 63 and all(
                m.field is None or m.op is AggOp.APPROX_DISTINCT for m in measures):
            # pack everything the standard ops need into the key: one SIMD np.sort instead
            # of an arg-sort and a gather per column
            for values, w in payload:
                key = (key << w) | values
            packed = np.sort(key[keep])
            unpacked = []
            for _, w in reversed(payload):
                unpacked.append(packed & ((1 << w) - 1))
                packed >>= w
            unpacked.reverse()
            order = None
            key, src = packed, unpacked[0].astype(np.int8)
            code, ts = key >> bits, (key & ((1 << bits) - 1)) + base
            codes = [u - 1 for u in unpacked[1:]]
        else:
            keep_idx = np.flatnonzero(keep)
            order = keep_idx[np.argsort(key[keep_idx])]
            key, code, ts, src = key[order], code[order], ts[order], src[order].astype(np.int8)
            codes = [c[order] for c, _ in cats.values()]
        fields = {(f, True): _Field(c, c >= 0, d) for f, c, (_, d) in
                  zip(cats, codes, cats.values(), strict=True)}
        for m in measures:
            if m.field is not None and (m.field, False) not in fields and \
                    m.op is not AggOp.APPROX_DISTINCT:
                assert order is not None
                fields[(m.field, False)] = _numeric(table.column(m.field), order)
        rows = cls(plan, int(base), int(hi), bits, code_map, code, ts, src, key, fields)
        if as_of_known:
            ing = _np_index(table.column("_ingest_ms").combine_chunks())[order]
            rows.vis = np.minimum(np.maximum(ts + 1, ing), hi + 1)
        if any(m.op is AggOp.LAST for m in measures):
            ids = table.column("event_id").take(pa.array(order)).to_pylist()
            # ties on ts: the stream worker's tiebreak
            rows.tiebreak = np.array(last_tiebreaks(ids), np.int64)
        return rows

    @property
    def size(self) -> int:
        return len(self.ts)

    def qkey(self, code: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Composite key of (entity code, time), times clipped into the key's range."""
        return (code << self.bits) | (np.clip(t, self.base, self.hi + 1) - self.base)

    def source_of(self, m: Measure) -> int:
        return [s.name for s in self.plan.view.sources].index(m.source)

    def field(self, m: Measure) -> _Field:
        """The values of ``m``'s field: dictionary codes for distinct counts, else floats."""
        return self.fields[(m.field or "", m.op is AggOp.APPROX_DISTINCT)]

    def member(self, m: Measure) -> np.ndarray:
        """Rows feeding measure ``m``: its source, and a non-null field value."""
        mask = self.source == self.source_of(m)
        if m.op is not AggOp.COUNT and m.field is not None:
            mask &= self.field(m).valid
        return mask

    def prefix(self, m: Measure, what: str) -> np.ndarray:
        """Prefix count (``what="n"``) or long-double prefix sum (``"sum"``) of ``m``."""
        ck = (m.op is AggOp.COUNT, m.source, m.field, what)
        if ck not in self._cache:
            mask = self.member(m)
            if what == "n":
                acc = np.cumsum(mask, dtype=np.int32 if len(mask) < 2**31 else np.int64)
            else:
                vals = np.where(mask, self.field(m).values, 0.0)
                acc = np.cumsum(vals.astype(np.longdouble))
            self._cache[ck] = np.concatenate([np.zeros(1, acc.dtype), acc])
        return self._cache[ck]  # type: ignore[return-value]

    def pair_keys(self, m: Measure, w: Window) -> tuple[np.ndarray, np.ndarray]:
        """Sorted row keys of the earlier (``p``) and later (``j``) rows of consecutive
        same-(entity, value) rows of ``m`` whose tiles are close enough to share a window
        ``w``; ``#{j < key(T)} - #{p < key(lo)}`` pairs have both ends in ``[lo, T)``."""
        ck = ("pairs", m, w)
        if ck not in self._cache:
            code, tp, tj = self._pairs(m)
            if w.kind is not WindowKind.LIFETIME:
                tile = w.tile_ms
                close = (tj + self.base) // tile - (tp + self.base) // tile <= w.n_tiles - 1
                code, tp, tj = code[close], tp[close], tj[close]
            high = code << self.bits
            self._cache[ck] = (np.sort(high | tp), np.sort(high | tj))
        return self._cache[ck]  # type: ignore[return-value]

    def _pairs(self, m: Measure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code, earlier ts - base, later ts - base) of consecutive same-value rows."""
        ck = ("pairs", m)
        if ck not in self._cache:
            mask = self.member(m)
            code, val = self.code[mask], self.field(m).values[mask]
            t = self.ts[mask] - self.base
            vbits = max(int(val.max(initial=0)), 1).bit_length()
            if max(int(self.code_map.max()), 1).bit_length() + vbits + self.bits <= 63:
                packed = np.sort((((code << vbits) | val) << self.bits) | t)
                grp = packed >> self.bits
                t = packed & ((1 << self.bits) - 1)
                same = grp[1:] == grp[:-1]
                code = grp >> vbits
            else:
                order = np.lexsort((t, val, code))
                code, val, t = code[order], val[order], t[order]
                same = (code[1:] == code[:-1]) & (val[1:] == val[:-1])
            self._cache[ck] = (code[1:][same], t[:-1][same], t[1:][same])
        return self._cache[ck]  # type: ignore[return-value]


def _lookup(col: pa.ChunkedArray, keys: pa.Array) -> np.ndarray:
    """Position of each value in ``keys`` (-1 when absent or null): one hash-set build."""
    pos, values = flat_dictionary(col)
    mapped = _np_index(pc.index_in(values.cast(keys.type), value_set=keys))
    return np.append(mapped, -1)[pos]


def _np_index(arr: pa.Array) -> np.ndarray:
    filled = pc.fill_null(arr, -1) if arr.null_count else arr
    return np.asarray(filled.to_numpy(zero_copy_only=False), dtype=np.int64)


def _ms(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy(),
                      dtype=np.int64)


def _numeric(col: pa.ChunkedArray, order: np.ndarray) -> _Field:
    """A numeric measure field in row ``order`` (float64; nulls flagged invalid)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    arr = col.combine_chunks().take(pa.array(order))
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    vals = pc.fill_null(arr.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    return _Field(np.asarray(vals, dtype=np.float64), valid)


def _hashable(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Distinct counts of times hash their epoch ms, like the online path."""
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    return col


@dataclass
class ViewResult:
    """Per output name: values and validity (False = null); the view's default mask."""

    values: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    is_default: np.ndarray


def evaluate_view(rows: ViewRows, q_code: np.ndarray, q_t: np.ndarray,
                  outputs: Sequence[OutputPlan], *, as_of_known: bool = False,
                  workers: int = 2) -> ViewResult:
    """Values of ``outputs`` as of ``q_t`` (epoch ms) for entity codes ``q_code``.

    ``q_code`` is the position of the query's entity in the ``keys`` given to
    :meth:`ViewRows.from_table`, -1 for a null entity; entities without rows get
    defaults. With ``as_of_known`` a row only counts once ingested (``_ingest_ms <= T``).
    ``workers > 1`` builds distinct-count pairs in a second thread.
    """
    n = len(q_t)
    res = ViewResult({o.name: np.zeros(n, np.int64 if is_int_output(o) else np.float64)
                      for o in outputs}, {o.name: np.zeros(n, bool) for o in outputs},
                     np.ones(n, bool))
    q_code = rows.code_map[q_code]  # -1 (null key) maps through the trailing -1
    qi = np.flatnonzero(q_code >= 0)
    if qi.size:
        kt = rows.qkey(q_code[qi], q_t[qi])
        order = np.argsort(kt)  # sorted queries make every searchsorted cache-friendly
        qi, kt = qi[order], kt[order]
        _fast(rows, q_code[qi], q_t[qi], kt, qi, outputs, res, as_of_known, workers)
    for o in outputs:  # the TTL/default rule, exactly as ViewState.rollup
        d = res.is_default
        res.values[o.name][d] = 0 if o.default is None else o.default
        res.valid[o.name][d] = o.default is not None
    return res


def _fast(rows: ViewRows, qc: np.ndarray, qt: np.ndarray, kt: np.ndarray, qi: np.ndarray,
          outputs: Sequence[OutputPlan], res: ViewResult, as_of_known: bool,
          workers: int) -> None:
    pending = {(rows.plan.measures[s], o.window) for o in outputs for s in o.slots
               if rows.plan.measures[s].op is AggOp.APPROX_DISTINCT}
    pool = ThreadPoolExecutor(1) if pending and workers > 1 else None
    try:  # distinct pairs need no row positions: build them beside the searches below
        pairs = {job: pool.submit(rows.pair_keys, *job) for job in pending} if pool else {}
        b = np.searchsorted(rows.key, kt)
        last = np.maximum(b - 1, 0)
        res.is_default[qi] = (b == 0) | (rows.code[last] != qc) | (
            qt - rows.ts[last] >= rows.plan.ttl_ms)
        lows: dict[Window, tuple[np.ndarray, np.ndarray]] = {}
        exact_all: list[OutputPlan] = []
        exact_some: dict[str, np.ndarray] = {}
        for o in outputs:
            if any(op in _SLOW_OPS for op in o.ops):
                exact_all.append(o)
                continue
            if o.window not in lows:
                ka = rows.qkey(qc, o.window.lower_bounds_ms(qt))
                lows[o.window] = ka, np.searchsorted(rows.key, ka)
            ka, a = lows[o.window]
            parts, big = [], np.zeros(len(qi), bool)
            for s in o.slots:
                m = rows.plan.measures[s]
                n = rows.prefix(m, "n")
                count = n[b] - n[a]
                if m.op is AggOp.APPROX_DISTINCT:
                    pk, jk = pairs[(m, o.window)].result() if pool else rows.pair_keys(
                        m, o.window)
                    count = count - (np.searchsorted(jk, kt) - np.searchsorted(pk, ka))
                    big |= count >= KMV_K
                parts.append(_fast_measure(rows, m, count, a, b))
            res.values[o.name][qi], res.valid[o.name][qi] = _combine(o, parts)
            if big.any():
                exact_some[o.name] = big
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    redo = np.zeros(len(qi), bool)
    if as_of_known and rows.vis is not None:  # rows before T not yet ingested at T:
        # #{ts < T} - #{vis <= T}
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


def _fast_measure(rows: ViewRows, m: Measure, count: np.ndarray, a: np.ndarray, b: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Value of ``m`` over rows ``[a, b)`` given its row (or distinct value) ``count``."""
    if m.op in (AggOp.COUNT, AggOp.APPROX_DISTINCT):
        return count, np.ones(len(a), bool)
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
    fld = rows.field(m)
    if m.op is AggOp.APPROX_DISTINCT:
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
