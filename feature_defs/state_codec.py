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


#: n -> the offsets ``0 .. n`` of a column with one entry in every tile (``n`` up to
#: 1024, filled as met: a ring holds at most its ``keep`` tiles)
_IOTA: dict[int, bytes] = {}


def _iota(n: int) -> bytes:
    """The offsets ``0 .. n`` of a column with one entry in every tile."""
    offs = array("q", range(n + 1)).tobytes()
    if n <= 1024:
        _IOTA[n] = offs
    return offs


class StateCodec:
    """Format-3 encoder and parser of one view's states (see the module docstring).

    Built once per plan (:func:`codec_for`); immutable, thread-safe.
    """

    __slots__ = ("plan", "schema", "ring_shapes", "_schema_stop", "_after", "_min_size",
                 "_pending_kinds", "_rings", "_columns", "_floats", "_hashes", "_lifetime",
                 "_n_rings", "_n_counts", "_col_specs", "_col_kinds", "materialize_fn",
                 "new_rings_fn", "encode_fn")

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
        # every other-slot column, in stored order: (ring, j, kind)
        self._columns = tuple(
            (r, j, _KIND[ops[slot]])
            for r, rp in enumerate(plan.rings) for j, slot in enumerate(rp.others)
        )
        #: per ring (COUNT slots, other slots): the shape of a new state's ring
        self.ring_shapes = tuple((len(rp.counts), len(rp.others)) for rp in plan.rings)
        self._n_rings = n_rings
        self._n_counts = sum(self._rings)  # + 1 prefix sum per COUNT slot
        #: per column (ring, most entries per tile, words per entry), and its kind
        self._col_specs = tuple((r, _PER_TILE[kind], _WIDTH[kind])
                                for r, _j, kind in self._columns)
        self._col_kinds = tuple(kind for _r, _j, kind in self._columns)
        kinds = set(self._pending_kinds)
        self._floats = bool(kinds & {_SCALAR, _MEAN, _LAST})
        self._hashes = _DISTINCT in kinds
        #: generated for the view: :meth:`encode`, :meth:`materialize`, :meth:`new_rings`
        self.encode_fn = _encoder(self)
        self.materialize_fn = _materializer(self)
        self.new_rings_fn = _new_rings_fn(self)

    # -------------------------------------------------------------- encode
    def encode(
        self,
        max_ts: int,
        prev_ts: int,
        pending: Sequence[Any],
        rings: Sequence[Any],
        fences: dict[int, int],
    ) -> bytes:
        """The format-3 bytes of a state's fields (straight-line code generated for the
        view: :func:`_encoder`).

        Args:
            rings: per ring an object with ``tiles`` (int64 array), ``cums`` (int64
                arrays) and ``vals`` (per other slot, one state or None per tile), as
                :class:`~feature_defs.state.Ring`.
            fences: fence key → position, keys ascending (``set_fence`` keeps them so).
        """
        return self.encode_fn(max_ts, prev_ts, pending, rings, fences)  # generated

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
                for r, _j, kind in self._columns:
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

    def materialize(self, data: bytes, ring_type: type | None = None,
                    ) -> tuple[int, int, list[Any], list[Any], dict[int, int]]:
        """:meth:`parse`, then the rings as (tiles, prefix sums, per-tile states) Python
        objects for a mutable state, checking the orders the parse leaves alone.

        The same checks as :meth:`parse`, in the same order (so the same errors), then
        the orders; the words are read once into an int64 array (and float64 / uint64
        ones when the view has such entries) whose slices are the tiles and prefix sums.
        The code is generated for the view (:func:`_materializer`): no loop over rings,
        slots or columns at run time.

        Args:
            ring_type: when given, each ring comes back as an instance of it (made
                without calling ``__init__``) with ``tiles``, ``cums`` and ``vals`` set,
                as :class:`~feature_defs.state.Ring`; otherwise as a (tiles, cums, vals)
                tuple. ``cums`` is a tuple of int64 arrays, ``vals`` a list of lists.

        Raises:
            StateFormatError: as :meth:`parse`; tiles not strictly ascending, column
                offsets decreasing or over the operator's bound, fence keys out of order.
        """
        return self.materialize_fn(data, ring_type)

    def new_rings(self, ring_type: type) -> list[Any]:
        """The empty rings of a new state, instances of ``ring_type`` (made without
        calling ``__init__``): empty ``tiles``, a ``[0]`` prefix sum per COUNT slot, an
        empty list per other slot (straight-line code generated for the view)."""
        return self.new_rings_fn(ring_type)


# ------------------------------------------------------------------ generated code
def _compile(src: str, name: str, **env: Any) -> Any:
    ns: dict[str, Any] = {"MAGIC": MAGIC, "_LITTLE": _LITTLE, "_swap": _swap, "_bad": _bad,
                          "array": array, "lt": lt, "sub": sub, "new": object.__new__,
                          "IndexError": IndexError, **env}
    exec(compile(src, f"<state_codec {name}>", "exec"), ns)  # noqa: S102 (our own source)
    return ns[name]


def _new_rings_fn(c: StateCodec) -> Callable[[type], list[Any]]:
    """``new_rings(ring_type)`` for ``c``'s view: per ring ``new(ring_type)`` and three
    attribute sets, fresh arrays copied from the empty and the ``[0]`` templates."""
    lines = ["def new_rings(ring_type):"]
    for r, (nc, no) in enumerate(c.ring_shapes):
        cums = "".join("z(), " for _ in range(nc))
        vals = ", ".join("[]" for _ in range(no))
        lines += [f"    r{r} = new(ring_type)", f"    r{r}.tiles = e()",
                  f"    r{r}.cums = ({cums})", f"    r{r}.vals = [{vals}]"]
    names = ", ".join(f"r{r}" for r in range(len(c.ring_shapes)))
    lines.append(f"    return [{names}]")
    return _compile("\n".join(lines) + "\n", "new_rings", e=array("q").__copy__,
                    z=array("q", (0,)).__copy__)


def _encoder(c: StateCodec) -> Callable[..., bytes]:
    """``encode(max_ts, prev_ts, pending, rings, fences)`` for ``c``'s view, written out:
    the parts of the documented layout joined once (per kind the same packing calls as
    ever: identical bytes)."""
    R, S = c._n_rings, len(c._pending_kinds)
    rs = "".join(f"r{r}, " for r in range(R))
    ps = "".join(f"p{s}, " for s in range(S))
    L = ["def encode(max_ts, prev_ts, pending, rings, fences):",
         f"    ({rs}) = rings", f"    ({ps}) = pending"]
    L += [f"    t{r} = r{r}.tiles" for r in range(R)]
    counts = "".join(f"len(t{r}), " for r in range(R))
    L.append(f"    parts = [MAGIC, QQ(max_ts, prev_ts), SCHEMA, "
             f"array('q', (len(fences), {counts}))]")
    for s, kind in enumerate(c._pending_kinds):
        v = f"p{s}"
        L.append("    parts.append(" + {
            _COUNT: f"NULL if {v} is None else ONE_COUNT(1, {v})",
            _DISTINCT: f"Q(len({v})) + array('Q', {v}).tobytes() if {v} else NULL",
            _SCALAR: f"NULL if {v} is None else ONE_SCALAR(1, {v})",
            _MEAN: f"NULL if {v} is None else ONE_MEAN(1, {v}[0], {v}[1])",
            _LAST: f"NULL if {v} is None else ONE_LAST(1, {v}[0], {v}[1], {v}[2])"}[kind] + ")")
    for r in range(R):
        L += [f"    parts.append(t{r})", f"    parts += r{r}.cums"]
    for ri, j, kind in c._columns:
        L.append(f"    col = r{ri}.vals[{j}]")
        if kind == _DISTINCT:
            L += ["    if len(col) == 1 and col[0]:",
                  "        parts.append(QQ(0, len(col[0])))",
                  "        parts.append(array('Q', col[0]))",
                  "    else:",
                  "        if None in col:",
                  "            col = [t or () for t in col]",
                  "        parts.append(array('q', list(accumulate(map(len, col), initial=0))))",
                  "        parts.append(array('Q', list(chain.from_iterable(col))))"]
            continue
        L += ["    if None not in col:",
              "        parts.append(IOTA.get(len(col)) or iota(len(col)))",
              "    else:",
              "        parts.append(array('q', list(accumulate((x is not None for x in col),"
              " initial=0))))",
              "        col = [x for x in col if x is not None]"]
        L += {_SCALAR: ["    parts.append(array('d', col))"],
              _MEAN: ["    parts.append(array('d', [t[0] for t in col]))",
                      "    parts.append(array('q', [t[1] for t in col]))"],
              _LAST: ["    parts.append(array('q', [t[0] for t in col]))",
                      "    parts.append(array('q', [t[1] for t in col]))",
                      "    parts.append(array('d', [t[2] for t in col]))"]}[kind]
    L += ["    if len(fences) == 1:",
          "        parts.append(array('q', [*fences.items()][0]))",
          "    elif fences:",
          "        parts.append(array('q', chain.from_iterable(fences.items())))",
          "    if _LITTLE:",
          "        return b''.join(parts)",
          "    return MAGIC + _swap(b''.join(parts)[8:])"]
    return _compile("\n".join(L) + "\n", "encode", SCHEMA=c.schema, QQ=_QQ, Q=_Q,
                    NULL=_NULL, ONE_COUNT=_ONE_COUNT, ONE_SCALAR=_ONE_SCALAR,
                    ONE_MEAN=_ONE_MEAN, ONE_LAST=_ONE_LAST, IOTA=_IOTA, iota=_iota,
                    accumulate=accumulate, chain=chain)


def _materializer(c: StateCodec) -> Callable[[Any, type | None], Any]:
    """``materialize(data, ring_type)`` for ``c``'s view, written out: the checks of
    :meth:`StateCodec.parse` in its order, with the view's constants (slot kinds, ring
    shapes, column kinds) folded in, then the rings and the order checks."""
    R = c._n_rings
    a = c._after
    L = ["def materialize(data, ring_type):",
         "    size = len(data)",
         "    if data[:8] != MAGIC:",
         "        raise _bad(f'unknown format or magic {bytes(data[:8])!r}')",
         "    if size & 7:",
         "        raise _bad(f'{size} bytes is not a whole number of 8-byte words')",
         f"    if size < {c._min_size}:",
         "        raise _bad(f'truncated ({size} bytes)')",
         "    if not _LITTLE:",
         "        data = MAGIC + _swap(data[8:])",
         f"    if data[24:{c._schema_stop}] != SCHEMA:",
         "        raise _bad(LAYOUT)",
         "    q = array('q')",
         "    q.frombytes(data)"]
    if c._floats:
        L += ["    d = array('d')", "    d.frombytes(data)"]
    if c._hashes:
        L += ["    u = array('Q')", "    u.frombytes(data)"]
    L += ["    total = size >> 3", f"    nf = q[{a}]"]
    L += [f"    n{r} = q[{a + 1 + r}]" for r in range(R)]
    L += [f"    w = {a + 1 + R}", "    try:"]
    for s, kind in enumerate(c._pending_kinds):
        L += ["        m = q[w]", "        if not m:", f"            p{s} = None",
              "            w += 1"]
        if kind == _DISTINCT:
            L += [f"        elif not 0 < m <= {KMV_K}:",
                  "            raise _bad(f'{m} pending distinct hashes')",
                  "        else:", f"            p{s} = tuple(u[w + 1: w + 1 + m])",
                  "            w += 1 + m"]
            continue
        L += ["        elif m != 1:",
              "            raise _bad(f'{m} pending entries of a single-valued operator')",
              "        else:"]
        L += {_COUNT: [f"            p{s} = q[w + 1]", "            w += 2"],
              _SCALAR: [f"            p{s} = d[w + 1]", "            w += 2"],
              _MEAN: [f"            p{s} = (d[w + 1], q[w + 2])", "            w += 3"],
              _LAST: [f"            p{s} = (q[w + 1], q[w + 2], d[w + 3])",
                      "            w += 4"]}[kind]
    for r in range(R):
        L += [f"        if n{r} < 0:", f"            raise _bad(f'ring {r} has {{n{r}}} tiles')"]
    for r in c._lifetime:
        L += [f"        if n{r} > 1:",
              f"            raise _bad(f'lifetime ring {r} has {{n{r}}} tiles')"]
    L.append("        ints = w")
    if R:
        words = " + ".join(f"n{r}" if nc == 0 else f"{1 + nc} * n{r}"
                           for r, nc in enumerate(c._rings))
        L.append(f"        w += {words} + {c._n_counts}")
    for i, (r, most, width) in enumerate(c._col_specs):
        L += [f"        e = q[w + n{r}]",
              f"        if q[w] or not 0 <= e <= n{r} * {most}:",
              f"            raise _bad(f'ring {r}: column offsets {{q[w]}}..{{e}} for "
              f"{{n{r}}} tiles')",
              f"        o{i} = w",
              f"        w += n{r} + 1 + {width} * e"]
    L += ["    except IndexError:",
          "        raise _bad(f'truncated ({size} bytes)') from None",
          "    end = w + 2 * nf",
          "    if nf < 0 or end > total:",
          "        raise _bad(f'truncated ({size} bytes, {8 * end} needed)')",
          "    if end < total:",
          "        raise _bad(f'{8 * (total - end)} trailing bytes')",
          "    fw = w",
          "    w = ints"]
    for r, nc in enumerate(c._rings):
        L.append(f"    t{r} = q[w: w + n{r}]")
        if r not in c._lifetime:  # (a lifetime ring has at most 1 tile: checked above)
            L += [f"    if n{r} > 1 and not all(map(lt, t{r}, t{r}[1:])):",
                  f"        raise _bad('ring {r}: tiles not ascending')"]
        L.append(f"    w += n{r}")
        if nc:
            L.append(f"    z = n{r} + 1")
            at = ["w", "w + z", *(f"w + {k} * z" for k in range(2, nc + 1))]
            sums = "".join(f"q[{at[k]}: {at[k + 1]}], " for k in range(nc))
            L.append(f"    c{r} = ({sums})")
            L.append(f"    w += {nc} * z")
        else:
            L.append(f"    c{r} = ()")
    for i, ((r, most, _w), kind) in enumerate(zip(c._col_specs, c._col_kinds, strict=True)):
        L += [f"    n = n{r}", f"    da = o{i} + n + 1", "    e = q[da - 1]",
              "    if n > 1:", f"        o = q[o{i}: da].tolist()",
              "        s = list(map(sub, o[1:], o))",
              f"        if min(s) < 0 or max(s) > {most}:",
              "            raise _bad('column offsets out of order')"]
        if kind == _DISTINCT:
            L += ["        hs = u[da: da + e].tolist()",
                  f"        v{i} = [tuple(hs[x:y]) if y > x else None"
                  " for x, y in zip(o, o[1:])]",
                  "    elif n:", f"        v{i} = [tuple(u[da: da + e])] if e else [None]",
                  "    else:", f"        v{i} = []"]
            continue
        L.append({_SCALAR: f"    v{i} = d[da: da + e].tolist()",
                  _MEAN: f"    v{i} = list(zip(d[da: da + e].tolist(),"
                         " q[da + e: da + 2 * e].tolist()))",
                  _LAST: f"    v{i} = list(zip(q[da: da + e].tolist(),"
                         " q[da + e: da + 2 * e].tolist(),"
                         " d[da + 2 * e: da + 3 * e].tolist()))"}[kind])
        L += ["    if e != n:  # some tiles hold none",
              "        if n > 1:", f"            g = iter(v{i})",
              f"            v{i} = [next(g) if y > x else None for x, y in zip(o, o[1:])]",
              "        else:", f"            v{i} = [None]"]
    L += ["    if nf == 1:", "        fences = {q[fw]: q[fw + 1]}",
          "    elif nf:", "        fences = dict(zip(q[fw: end: 2], q[fw + 1: end: 2]))",
          "        keys = list(fences)",
          "        if len(keys) > 1 and not all(map(lt, keys, keys[1:])):",
          "            raise _bad('fence keys not ascending')",
          "    else:", "        fences = {}"]
    cols: dict[int, list[str]] = {r: [] for r in range(R)}
    for i, (r, _j, _k) in enumerate(c._columns):
        cols[r].append(f"v{i}")
    vals = [", ".join(cols[r]) for r in range(R)]
    as_tuples = ", ".join(f"(t{r}, c{r}, [{vals[r]}])" for r in range(R))
    L += ["    if ring_type is None:", f"        rings = [{as_tuples}]", "    else:"]
    for r in range(R):
        L += [f"        r{r} = new(ring_type)", f"        r{r}.tiles = t{r}",
              f"        r{r}.cums = c{r}", f"        r{r}.vals = [{vals[r]}]"]
    names = ", ".join(f"r{r}" for r in range(R))
    pend = "".join(f"p{s}, " for s in range(len(c._pending_kinds)))
    L += [f"        rings = [{names}]", f"    return q[1], q[2], [{pend}], rings, fences"]
    return _compile("\n".join(L) + "\n", "materialize", SCHEMA=c.schema,
                    LAYOUT=f"not the measure and ring layout of view {c.plan.view.id}")


_CODECS: dict[int, StateCodec] = {}


def codec_for(plan: ViewPlan) -> StateCodec:
    """The (cached) codec of ``plan``."""
    c = _CODECS.get(id(plan))
    if c is None or c.plan is not plan:
        if len(_CODECS) > 256:  # plans built on the fly (tests): do not grow forever
            _CODECS.clear()
        c = _CODECS[id(plan)] = StateCodec(plan)
    return c
