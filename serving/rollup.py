"""Fast roll-up of selected outputs of one view: the same values as ``ViewState.rollup``.

:meth:`feature_defs.state.ViewState.rollup` walks every tile once per output and per
measure; a request needs many entities, so serving compiles a :class:`RollupProgram`
per (view, requested outputs) that walks each ring once per distinct window and
shares the measure accumulations between outputs (``ctr`` reuses the ``clicks`` and
``impressions`` sums).

Equality with ``ViewState.rollup`` is exact, not approximate:

* COUNT states are ints: their sum does not depend on order.
* APPROX_DISTINCT merges to "the K smallest distinct hashes of the union", which is
  associative and commutative, so one set union gives the identical sketch.
* Every other operator (SUM, MEAN, MIN, MAX, LAST: float or tie-order sensitive) is
  merged with the same merge function in the same order as ``ViewState.rollup``
  (ascending tile order, then the pending events at ``max_ts``).
* COUNT windows are differences of the ring's prefix sums at a bisected tile position.
* The other operators read one slice of each stored column (format 3: a window's
  entries are contiguous, nulls take no entry), in place: SUM / MEAN add the slice left
  to right (``functools.reduce``, not ``sum``, whose float summation differs between
  Python versions), MIN / MAX / LAST keep the first of equal candidates as the pairwise
  merges do.

The TTL / default rule and the "as_of before the latest event" error are the ones of
``ViewState.is_default`` and ``ViewState.last_before``.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Sequence
from enum import IntEnum
from functools import reduce
from operator import add, itemgetter
from typing import Any

from feature_defs.measures import KMV_K, MERGERS, finalize_state, kmv_estimate
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan
from feature_defs.state import NO_TS, RingsFields, ViewState

__all__ = ["Freshness", "RollupProgram"]


class Freshness(IntEnum):
    """Whether a state has data as of T."""

    OK = 0
    NO_DATA = 1  # no applied event before T (or no state at all)
    STALE = 2  # the latest event before T is at least the view TTL old
    #: the stored bytes cannot be decoded: never from a program, only from
    #: :class:`~serving.reader.OnlineReader` (its rows say so in ``EntityRow.corrupt``)
    UNREADABLE = 3


class RollupProgram:
    """Compiled roll-up of ``outputs`` (indexes into ``plan.outputs``) of one view.

    Build once per request shape; :meth:`run` (a :class:`ViewState`) and
    :meth:`run_fields` (the fields of :func:`~feature_defs.state.decode_fields`, what
    the read path uses) are called per entity and are thread-safe (no mutable state).
    """

    __slots__ = ("plan", "names", "defaults", "_groups", "_init", "_finalize", "_ratios",
                 "_pick", "_ttl")

    def __init__(self, plan: ViewPlan, outputs: Sequence[int]) -> None:
        self.plan = plan
        outs = [plan.outputs[i] for i in outputs]
        self.names: tuple[str, ...] = tuple(o.name for o in outs)
        self.defaults: tuple[Any, ...] = tuple(o.default for o in outs)
        self._ttl = plan.ttl_ms
        # one accumulation per distinct (ring, window length in tiles, measure slot),
        # grouped per (ring, window length) and split by how it accumulates
        accs: dict[tuple[int, int, int], int] = {}
        ops: list[AggOp] = []
        groups: dict[tuple[int, int], tuple[list[Any], list[Any], list[Any]]] = {}
        picks: list[int] = []
        ratios: list[tuple[int, int]] = []
        for o in outs:
            idx = []
            for slot in o.slots:
                key = (o.ring, o.window.n_tiles, slot)
                if key not in accs:
                    i = accs[key] = len(accs)
                    op = plan.measures[slot].op
                    ops.append(op)
                    counts, distincts, ordered = groups.setdefault(
                        (o.ring, o.window.n_tiles), ([], [], [])
                    )
                    ring_plan = plan.rings[o.ring]
                    if op is AggOp.COUNT:
                        counts.append((slot, ring_plan.counts.index(slot), i))
                    elif op is AggOp.APPROX_DISTINCT:
                        distincts.append((slot, ring_plan.others.index(slot), i))
                    else:
                        ordered.append((slot, ring_plan.others.index(slot), i, MERGERS[op],
                                        _ORDERED[op]))
                idx.append(accs[key])
            if o.is_ratio:
                ratios.append((idx[0], idx[-1]))
                picks.append(-len(ratios))  # resolved below, past the accumulations
            else:
                picks.append(idx[0])
        self._groups = tuple(
            (ring, plan.rings[ring].tile_ms, n_tiles, tuple(c), tuple(d), tuple(o))
            for (ring, n_tiles), (c, d, o) in groups.items()
        )
        n = len(ops)
        # ratio k lands at n + k
        self._ratios = tuple((n + k, num, den) for k, (num, den) in enumerate(ratios))
        positions = [p if p >= 0 else n - p - 1 for p in picks]
        self._pick = _picker(positions)
        # COUNT and APPROX_DISTINCT accumulate final values (0 when empty); the others
        # accumulate states, finalized at the end like ViewState.rollup does
        self._init = tuple(0 if op in _DIRECT else None for op in ops) + (None,) * len(ratios)
        self._finalize = tuple((i, op) for i, op in enumerate(ops) if op not in _DIRECT)

    def freshness(self, state: ViewState | None, as_of_ms: int) -> Freshness:
        """OK, NO_DATA or STALE as of ``as_of_ms`` (``ValueError`` if before max_ts)."""
        if state is None:
            return Freshness.NO_DATA
        return self._freshness(state.max_ts, state.prev_ts, as_of_ms)

    def _freshness(self, max_ts: int, prev_ts: int, as_of_ms: int) -> Freshness:
        if max_ts < as_of_ms:
            last = max_ts
        elif max_ts == as_of_ms:
            last = prev_ts
        else:
            raise ValueError("as_of before the latest applied event")
        if last == NO_TS:
            return _NO_DATA
        return _STALE if as_of_ms - last >= self._ttl else _OK

    def run(self, state: ViewState | None, as_of_ms: int) -> tuple[list[Any], Freshness]:
        """Values of the program's outputs as of ``as_of_ms`` and the state's freshness.

        Without data (NO_DATA or STALE) the values are the definitions' defaults.

        Raises:
            ValueError: ``as_of_ms`` is before the state's latest applied event.
        """
        if state is None:
            return list(self.defaults), Freshness.NO_DATA
        return self.run_fields(state.max_ts, state.prev_ts, state.pending, state.ring_fields(),
                               as_of_ms)

    def run_fields(
        self,
        max_ts: int,
        prev_ts: int,
        pending: list[Any],
        rings: RingsFields,
        as_of_ms: int,
    ) -> tuple[list[Any], Freshness]:
        """:meth:`run` on a state's fields (as :func:`~feature_defs.state.decode_fields`
        returns them), without a :class:`ViewState`."""
        fresh = self._freshness(max_ts, prev_ts, as_of_ms)
        if fresh is not _OK:
            return list(self.defaults), fresh
        return self._values(max_ts, pending, rings, as_of_ms), fresh

    def validity(self, state: ViewState, as_of_ms: int, fresh: Freshness) -> tuple[int, int] | None:
        """The as-of interval ``[lo, hi)`` around ``as_of_ms`` on which :meth:`run` gives
        exactly the same answer for this state, or None (``as_of_ms <= max_ts``).

        Inside it every input of the roll-up is the same: the freshness, whether the
        events at ``max_ts`` count, and each window's lowest tile.
        """
        return self.validity_at(state.max_ts, as_of_ms, fresh)

    def validity_at(self, max_ts: int, as_of_ms: int, fresh: Freshness) -> tuple[int, int] | None:
        """:meth:`validity` of a state whose latest applied event is at ``max_ts``."""
        if as_of_ms <= max_ts:
            return None
        if fresh is Freshness.STALE:  # stays stale: the latest event only gets older
            return max_ts + self._ttl, _FOREVER
        if fresh is not Freshness.OK:
            return None
        lo, hi = max_ts + 1, max_ts + self._ttl
        for _ring, tile_ms, *_rest in self._groups:
            if tile_ms:
                k = as_of_ms // tile_ms
                lo = max(lo, k * tile_ms)
                hi = min(hi, (k + 1) * tile_ms)
        return lo, hi

    def _values(
        self, max_ts: int, pending: list[Any], rings: RingsFields, as_of_ms: int
    ) -> list[Any]:
        pend = as_of_ms > max_ts  # the events at max_ts count only strictly before T
        acc: list[Any] = list(self._init)
        ints, floats, hashes, layout = rings
        for ring_idx, tile_ms, n_tiles, counts, distincts, ordered in self._groups:
            off, n, cols = layout[ring_idx]
            if tile_ms:
                low = as_of_ms // tile_ms - n_tiles + 1
                if max_ts // tile_ms < low:
                    continue  # every tile (and the pending events) is older than the window
                start = bisect_left(ints, low, off, off + n) - off if n and ints[off] < low else 0
            else:
                start = 0
            for slot, k, i in counts:  # prefix sums: one subtraction per window
                base = off + n + k * (n + 1)
                total = ints[base + n] - ints[base + start]
                if pend:
                    p = pending[slot]
                    if p:
                        total += p
                acc[i] = total
            for slot, j, i in distincts:  # one set union gives the merged sketch
                oa, da = cols[j]
                lo = ints[oa + start] if start else 0
                got: set[int] = set(hashes[da + lo: da + ints[oa + n]])
                if pend:
                    p = pending[slot]
                    if p:
                        got.update(p)
                acc[i] = _kmv_estimate(got)
            for slot, j, i, merge, kind in ordered:  # same merges, same order as ViewState
                oa, da = cols[j]
                e = ints[oa + n]
                lo = ints[oa + start] if start else 0
                a: Any = None
                if 0 <= lo < e:  # (corrupt offsets: a wrong value, never an exception)
                    if kind == _SUM:
                        a = reduce(add, floats[da + lo: da + e])
                    elif kind == _MIN:
                        a = min(floats[da + lo: da + e])
                    elif kind == _MAX:
                        a = max(floats[da + lo: da + e])
                    elif kind == _MEAN:
                        a = (reduce(add, floats[da + lo: da + e]),
                             sum(ints[da + e + lo: da + 2 * e]))
                    else:  # LAST: the largest (ts, tie-break), the first of equal ones
                        ts = ints[da + lo: da + e]
                        tb = ints[da + e + lo: da + 2 * e]
                        top = -max(zip(ts, tb, range(0, lo - e, -1), strict=True))[2]
                        a = (ts[top], tb[top], floats[da + 2 * e + lo + top])
                if pend:
                    p = pending[slot]
                    if p is not None:
                        a = p if a is None else merge(a, p)
                acc[i] = a
        for i, op in self._finalize:
            acc[i] = finalize_state(op, acc[i])
        for r, num, den in self._ratios:
            d = acc[den]
            n = acc[num]
            acc[r] = None if not d or n is None else n / d
        return self._pick(acc)


_DIRECT = (AggOp.COUNT, AggOp.APPROX_DISTINCT)
_SUM, _MEAN, _MIN, _MAX, _LAST = range(5)
_ORDERED = {AggOp.SUM: _SUM, AggOp.MEAN: _MEAN, AggOp.MIN: _MIN, AggOp.MAX: _MAX,
            AggOp.LAST: _LAST}
_FOREVER = 2**63
# module constants: an enum member lookup costs a class attribute lookup per use
_OK, _NO_DATA, _STALE = Freshness.OK, Freshness.NO_DATA, Freshness.STALE


def _picker(positions: list[int]) -> Callable[[list[Any]], list[Any]]:
    """``acc -> [acc[p] for p in positions]`` with one C-level gather."""
    if not positions:
        return lambda acc: []
    if len(positions) == 1:
        (only,) = positions
        return lambda acc: [acc[only]]
    gather = itemgetter(*positions)
    return lambda acc: list(gather(acc))


def _kmv_estimate(hashes: set[int]) -> int:
    """``kmv_estimate`` of the merged sketch of the tiles whose hashes are ``hashes``."""
    if len(hashes) < KMV_K:
        return len(hashes)  # fewer than K distinct hashes: the sketch holds them all
    return kmv_estimate(tuple(heapq.nsmallest(KMV_K, hashes)))
