"""Format 3 of a stored view state: explicit little-endian 8-byte words, no marshal.

Every field is one or more 8-byte little-endian words: ``i64`` (two's complement),
``u64`` or ``f64`` (IEEE 754 binary64). The whole value is ``8 * W`` bytes, so a
reader can view it as one int64 array (and, over the same bytes, float64 and uint64
arrays) and index every field in place. Any language can read it; no field depends on
the Python version. ``S`` = measure slots, ``R`` = rings, ``F`` = fences, ``n_r`` =
tiles of ring ``r``, ``nc_r`` / ``no_r`` = its COUNT / other slots.

=========================  =========  ===================================================
words                      type       content
=========================  =========  ===================================================
0                          bytes      magic ``03 48 52 53 54 41 54 45`` (``\\x03HRSTATE``):
                                      format 3 (the first byte; 1 and 2 were marshal)
1                          i64        ``max_ts``: latest applied event time (epoch ms;
                                      ``-2**62`` = none)
2                          i64        ``prev_ts``: latest applied time below ``max_ts``
3                          i64        ``S``
4                          i64        ``R``
next S                     i64        op code of each slot: 0 COUNT, 1 SUM, 2 MEAN,
                                      3 MIN, 4 MAX, 5 LAST, 6 APPROX_DISTINCT
per ring r                 i64        ``tile_ms`` (0 = lifetime), ``nc_r``, ``no_r``,
                                      then ``nc_r`` COUNT slot numbers, ``no_r`` others
                                      (words 3 up to here: the view's *schema*, the same
                                      for every state of the view)
next 1                     i64        ``F``
next R                     i64        ``n_r``, per ring (0 or 1 for a lifetime ring)
pending, per slot s        i64 + ...  ``m`` (entries; 0 = null), then the entries of the
                                      events at ``max_ts`` (layout below)
ints block, per ring r     i64        ``n_r`` tile indexes, strictly ascending; then per
                                      COUNT slot its ``n_r + 1`` prefix sums (``p[i]`` =
                                      a base plus the counts of tiles ``< i``)
columns, per ring r,       i64 + ...  ``n_r + 1`` entry offsets ``o`` (``o[0] = 0``; tile
per other slot                        ``i`` holds entries ``o[i] .. o[i+1]``, none =
                                      null), then the ``E = o[n_r]`` entries (below)
last 2F                    i64 pairs  (fence key, position), keys ascending
=========================  =========  ===================================================

Entries, ``E`` of them, stored column by column (each column ``E`` words):

===================  ==========================================  =======================
op                   columns                                     entries per tile/event
===================  ==========================================  =======================
COUNT (pending)      i64 count                                   0 or 1
SUM, MIN, MAX        f64 value                                   0 or 1
MEAN                 f64 sum, then i64 count                     0 or 1
LAST                 i64 ts, then i64 tie-break, then f64 value  0 or 1
APPROX_DISTINCT      u64 hash (ascending within a tile)          0 .. 512 (an empty
                                                                 sketch is stored null)
===================  ==========================================  =======================

A window count is ``p[n_r] - p[bisect(tiles, low)]`` and a window's entries are one
slice ``o[start] .. o[n_r]`` of each column: the read path does neither a per-tile
decode nor a per-tile walk (:mod:`serving.rollup`).

:meth:`StateCodec.parse` checks the structure before returning anything: the size (a
whole number of words), the magic, the schema (against the view's), every count
(non-negative, within its bound, inside the buffer) and the exact end (no trailing
words). Orders (ascending tiles and fence keys, non-decreasing offsets) are checked by
:meth:`StateCodec.materialize`, which builds the mutable state; the read path does not
walk the tiles, and bad orders there give wrong numbers, never an exception.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import accumulate, chain
from operator import lt, sub
from typing import Any

from feature_defs.measures import KMV_K
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan
from headrace.core.errors import StateFormatError

__all__ = ["MAGIC", "FORMAT", "OP_CODES", "StateCodec", "codec_for"]

FORMAT = 3
MAGIC = b"\x03HRSTATE"
OP_CODES: dict[AggOp, int] = {
    AggOp.COUNT: 0, AggOp.SUM: 1, AggOp.MEAN: 2, AggOp.MIN: 3, AggOp.MAX: 4,
    AggOp.LAST: 5, AggOp.APPROX_DISTINCT: 6,
}
_LITTLE = sys.byteorder == "little"
# entry kinds: how a slot's entries are laid out
_COUNT, _SCALAR, _MEAN, _LAST, _DISTINCT = range(5)
_KIND = {AggOp.COUNT: _COUNT, AggOp.SUM: _SCALAR, AggOp.MIN: _SCALAR, AggOp.MAX: _SCALAR,
         AggOp.MEAN: _MEAN, AggOp.LAST: _LAST, AggOp.APPROX_DISTINCT: _DISTINCT}
_WIDTH = {_SCALAR: 1, _MEAN: 2, _LAST: 3, _DISTINCT: 1}  # words per entry
_PER_TILE = {_SCALAR: 1, _MEAN: 1, _LAST: 1, _DISTINCT: KMV_K}  # most entries per tile

_QQ = struct.Struct("=qq").pack
_NULL = bytes(8)
_ONE_COUNT = struct.Struct("=qq").pack
_ONE_SCALAR = struct.Struct("=qd").pack
_ONE_MEAN = struct.Struct("=qdq").pack
_ONE_LAST = struct.Struct("=qqqd").pack
_Q = struct.Struct("=q").pack


def _bad(why: str) -> StateFormatError:
    return StateFormatError(f"malformed view state: {why}")


def _swap(data: Any) -> bytes:
    """8-byte words in the other byte order (big-endian hosts only)."""
    a = array("q")
    a.frombytes(data)
    a.byteswap()
    return a.tobytes()


@lru_cache(maxsize=64)
def _iota(n: int) -> bytes:
    """The offsets ``0 .. n`` of a column with one entry in every tile."""
    return array("q", range(n + 1)).tobytes()


# ------------------------------------------------------------------ encoders
def _column_encoder(kind: int) -> Callable[[list[Any]], list[Any]]:
    """``col`` (one state or None per tile) → [offsets, entry columns...] buffers."""
    if kind == _DISTINCT:
        def distinct(col: list[Any]) -> list[Any]:
            if None in col:
                col = [t or () for t in col]
            # (lists first: array() converts a list in one C loop, an iterator per item)
            return [array("q", list(accumulate(map(len, col), initial=0))),
                    array("Q", list(chain.from_iterable(col)))]
        return distinct

    def present(col: list[Any]) -> tuple[Any, list[Any]]:
        if None not in col:
            return _iota(len(col)), col
        return (array("q", list(accumulate((x is not None for x in col), initial=0))),
                [x for x in col if x is not None])

    if kind == _SCALAR:
        def scalar(col: list[Any]) -> list[Any]:
            offs, got = present(col)
            return [offs, array("d", got)]
        return scalar
    if kind == _MEAN:
        def mean(col: list[Any]) -> list[Any]:
            offs, got = present(col)
            return [offs, array("d", [t[0] for t in got]), array("q", [t[1] for t in got])]
        return mean

    def last(col: list[Any]) -> list[Any]:
        offs, got = present(col)
        return [offs, array("q", [t[0] for t in got]), array("q", [t[1] for t in got]),
                array("d", [t[2] for t in got])]
    return last


# ------------------------------------------------------------------ decoders
def _column_decoder(kind: int) -> Callable[[Any, Any, Any, int, int, int], list[Any]]:
    """(q, d, u, offsets word, entries word, n) → one state or None per tile, checking
    the offsets (non-decreasing, at most the kind's entries per tile)."""
    most = _PER_TILE[kind]

    def offsets(q: Any, oa: int, n: int) -> tuple[list[int], int]:
        o = q[oa: oa + n + 1].tolist()
        if n:
            steps = list(map(sub, o[1:], o))
            if min(steps) < 0 or max(steps) > most:
                raise _bad("column offsets out of order")
        return o, o[-1]

    def spread(o: list[int], got: list[Any], n: int) -> list[Any]:
        if len(got) == n:
            return got
        col: list[Any] = [None] * n
        for i in range(n):
            if o[i + 1] != o[i]:
                col[i] = got[o[i]]
        return col

    if kind == _DISTINCT:
        def distinct(q: Any, d: Any, u: Any, oa: int, da: int, n: int) -> list[Any]:
            o, e = offsets(q, oa, n)
            hs = u[da: da + e].tolist()
            return [tuple(hs[a:b]) if b > a else None for a, b in zip(o, o[1:], strict=False)]
        return distinct
    if kind == _SCALAR:
        def scalar(q: Any, d: Any, u: Any, oa: int, da: int, n: int) -> list[Any]:
            o, e = offsets(q, oa, n)
            return spread(o, d[da: da + e].tolist(), n)
        return scalar
    if kind == _MEAN:
        def mean(q: Any, d: Any, u: Any, oa: int, da: int, n: int) -> list[Any]:
            o, e = offsets(q, oa, n)
            got = list(zip(d[da: da + e].tolist(), q[da + e: da + 2 * e].tolist(),
                           strict=True))
            return spread(o, got, n)
        return mean

    def last(q: Any, d: Any, u: Any, oa: int, da: int, n: int) -> list[Any]:
        o, e = offsets(q, oa, n)
        got = list(zip(q[da: da + e].tolist(), q[da + e: da + 2 * e].tolist(),
                       d[da + 2 * e: da + 3 * e].tolist(), strict=True))
        return spread(o, got, n)
    return last


class StateCodec:
    """Format-3 encoder and parser of one view's states (see the module docstring).

    Built once per plan (:func:`codec_for`); immutable, thread-safe.
    """

    __slots__ = ("plan", "schema", "_schema_stop", "_after", "_min_size", "_pending_kinds",
                 "_rings", "_columns", "_floats", "_hashes", "_lifetime")

    def __init__(self, plan: ViewPlan) -> None:
        self.plan = plan
        ops = [m.op for m in plan.measures]
        words = [len(ops), len(plan.rings), *(OP_CODES[op] for op in ops)]
        for rp in plan.rings:
            words += [rp.tile_ms, len(rp.counts), len(rp.others), *rp.counts, *rp.others]
        self.schema = array("q", words).tobytes()  # native order (compared after a swap)
        self._schema_stop = 24 + len(self.schema)
        self._after = 3 + len(words)  # the word holding F
        n_rings = len(plan.rings)
        self._min_size = 8 * (self._after + 1 + n_rings + len(ops))
        self._pending_kinds = tuple(_KIND[op] for op in ops)
        self._rings = tuple(len(rp.counts) for rp in plan.rings)
        self._lifetime = tuple(r for r, rp in enumerate(plan.rings) if not rp.tile_ms)
        # every other-slot column, in stored order: (ring, j, kind, encoder, decoder)
        self._columns = tuple(
            (r, j, _KIND[ops[slot]], _column_encoder(_KIND[ops[slot]]),
             _column_decoder(_KIND[ops[slot]]))
            for r, rp in enumerate(plan.rings) for j, slot in enumerate(rp.others)
        )
        kinds = set(self._pending_kinds)
        self._floats = bool(kinds & {_SCALAR, _MEAN, _LAST})
        self._hashes = _DISTINCT in kinds

    # -------------------------------------------------------------- encode
    def encode(
        self,
        max_ts: int,
        prev_ts: int,
        pending: Sequence[Any],
        rings: Sequence[Any],
        fences: dict[int, int],
    ) -> bytes:
        """The format-3 bytes of a state's fields.

        Args:
            rings: per ring an object with ``tiles`` (int64 array), ``cums`` (int64
                arrays) and ``vals`` (per other slot, one state or None per tile), as
                :class:`~feature_defs.state.Ring`.
            fences: fence key → position, keys ascending (``set_fence`` keeps them so).
        """
        counts = [len(fences)]
        for r in rings:
            counts.append(len(r.tiles))
        parts: list[Any] = [MAGIC, _QQ(max_ts, prev_ts), self.schema, array("q", counts)]
        add = parts.append
        for kind, v in zip(self._pending_kinds, pending, strict=True):
            if v is None:
                add(_NULL)
            elif kind == _COUNT:
                add(_ONE_COUNT(1, v))
            elif kind == _DISTINCT:
                add(_Q(len(v)) + array("Q", v).tobytes() if v else _NULL)
            elif kind == _SCALAR:
                add(_ONE_SCALAR(1, v))
            elif kind == _MEAN:
                add(_ONE_MEAN(1, v[0], v[1]))
            else:
                add(_ONE_LAST(1, v[0], v[1], v[2]))
        for r in rings:
            add(r.tiles)
            parts += r.cums
        for ri, j, _kind, enc, _dec in self._columns:
            parts += enc(rings[ri].vals[j])
        if fences:
            add(array("q", chain.from_iterable(fences.items())))
        if _LITTLE:
            return b"".join(parts)
        return MAGIC + _swap(b"".join(parts)[8:])

    # -------------------------------------------------------------- parse
    def parse(self, data: bytes) -> tuple[int, int, list[Any], tuple[Any, Any, Any, Any],
                                          dict[int, int]]:
        """The fields of format-3 ``data``, read in place (see ``decode_fields``).

        Raises:
            StateFormatError: a structural problem (see the module docstring).
        """
        size = len(data)
        if data[:8] != MAGIC:
            raise _bad(f"unknown format or magic {bytes(data[:8])!r}")
        if size & 7:
            raise _bad(f"{size} bytes is not a whole number of 8-byte words")
        if size < self._min_size:
            raise _bad(f"truncated ({size} bytes)")
        if not _LITTLE:
            data = MAGIC + _swap(data[8:])
        if data[24: self._schema_stop] != self.schema:
            raise _bad(f"not the measure and ring layout of view {self.plan.view.id}")
        raw = memoryview(data)
        q = raw.cast("q")
        d = raw.cast("d") if self._floats else None
        u = raw.cast("Q") if self._hashes else None
        total = size >> 3
        a = self._after
        try:
            nf = q[a]
            ns = q[a + 1: a + 1 + len(self._rings)]
            w = a + 1 + len(self._rings)
            pending: list[Any] = []
            add = pending.append
            for kind in self._pending_kinds:
                m = q[w]
                if not m:
                    add(None)
                    w += 1
                elif kind == _DISTINCT:
                    if not 0 < m <= KMV_K:
                        raise _bad(f"{m} pending distinct hashes")
                    add(tuple(u[w + 1: w + 1 + m]))  # type: ignore[index]
                    w += 1 + m
                elif m != 1:
                    raise _bad(f"{m} pending entries of a single-valued operator")
                elif kind == _COUNT:
                    add(q[w + 1])
                    w += 2
                elif kind == _SCALAR:
                    add(d[w + 1])  # type: ignore[index]
                    w += 2
                elif kind == _MEAN:
                    add((d[w + 1], q[w + 2]))  # type: ignore[index]
                    w += 3
                else:
                    add((q[w + 1], q[w + 2], d[w + 3]))  # type: ignore[index]
                    w += 4
            layout: list[Any] = []
            for r, nc in enumerate(self._rings):
                n = ns[r]
                if n < 0:
                    raise _bad(f"ring {r} has {n} tiles")
                layout.append((w, n, ()))
                w += n + nc * (n + 1)
            for r in self._lifetime:
                if ns[r] > 1:
                    raise _bad(f"lifetime ring {r} has {ns[r]} tiles")
            if self._columns:
                cols: dict[int, list[tuple[int, int]]] = {}
                for r, _j, kind, _enc, _dec in self._columns:
                    n = ns[r]
                    e = q[w + n]
                    if q[w] or not 0 <= e <= n * _PER_TILE[kind]:
                        raise _bad(f"ring {r}: column offsets {q[w]}..{e} for {n} tiles")
                    cols.setdefault(r, []).append((w, w + n + 1))
                    w += n + 1 + _WIDTH[kind] * e
                for r, c in cols.items():
                    layout[r] = (layout[r][0], layout[r][1], c)
        except IndexError:
            raise _bad(f"truncated ({size} bytes)") from None
        end = w + 2 * nf
        if nf < 0 or end > total:
            raise _bad(f"truncated ({size} bytes, {8 * end} needed)")
        if end < total:
            raise _bad(f"{8 * (total - end)} trailing bytes")
        fences = dict(zip(q[w::2], q[w + 1::2], strict=True)) if nf else {}
        return q[1], q[2], pending, (q, d, u, layout), fences

    def materialize(self, data: bytes) -> tuple[int, int, list[Any], list[Any], dict[int, int]]:
        """:meth:`parse`, then the rings as (tiles, prefix sums, per-tile states) Python
        objects for a mutable state, checking the orders the parse leaves alone.

        Raises:
            StateFormatError: as :meth:`parse`; tiles not strictly ascending, column
                offsets decreasing or over the operator's bound, fence keys out of order.
        """
        max_ts, prev_ts, pending, (q, d, u, layout), fences = self.parse(data)
        raw = memoryview(data if _LITTLE else MAGIC + _swap(data[8:]))
        rings: list[Any] = []
        for r, (off, n, _cols) in enumerate(layout):
            tiles = array("q")
            tiles.frombytes(raw[8 * off: 8 * (off + n)])
            if n > 1 and not all(map(lt, tiles, tiles[1:])):
                raise _bad(f"ring {r}: tiles not ascending")
            cums = []
            at = off + n
            for _ in range(self._rings[r]):
                c = array("q")
                c.frombytes(raw[8 * at: 8 * (at + n + 1)])
                cums.append(c)
                at += n + 1
            rings.append((tiles, cums, []))
        for r, _j, _kind, _enc, dec in self._columns:
            _off, n, cols = layout[r]
            oa, da = cols[len(rings[r][2])]
            rings[r][2].append(dec(q, d, u, oa, da, n))
        keys = list(fences)
        if len(keys) > 1 and not all(map(lt, keys, keys[1:])):
            raise _bad("fence keys not ascending")
        return max_ts, prev_ts, pending, rings, fences


_CODECS: dict[int, StateCodec] = {}


def codec_for(plan: ViewPlan) -> StateCodec:
    """The (cached) codec of ``plan``."""
    c = _CODECS.get(id(plan))
    if c is None or c.plan is not plan:
        if len(_CODECS) > 256:  # plans built on the fly (tests): do not grow forever
            _CODECS.clear()
        c = _CODECS[id(plan)] = StateCodec(plan)
    return c
