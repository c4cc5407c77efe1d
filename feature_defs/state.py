"""Per-entity online state of one view: tile rings, the latest event, fences; and roll-up.

The state answers "the features as of T" exactly for any ``T >= max_ts`` (the latest
applied event time): tiles are kept while they can still fall inside a window as of
such a T, and the events *at* ``max_ts`` are held apart (``pending``) until a later
event arrives, because the window rule excludes events at T itself.

Each ring (:class:`Ring`) holds its tiles in ascending order, and per measure slot:

* COUNT: prefix sums (the counts of the tiles before tile ``i``, plus a base), so
  the count of any window is one subtraction at a bisected position — no walk over
  tiles on the read path;
* every other operator: one mergeable state per tile (:mod:`feature_defs.measures`),
  merged in ascending tile order.

``fences`` make replays idempotent: for each source (topic, partition) the position
(offset, index-in-message) of the last event applied to this entity; an event at or
before its fence is skipped. Positions only grow within a source partition, and a
replay re-delivers a prefix-consistent sequence, so skipping by position is exact.

Serialized with :mod:`marshal` behind a format byte. Format 2 stores each ring's tiles
and prefix sums as raw little-endian int64 bytes (the read path bisects them in place,
without building an object per tile); format 1 (tile → cells dicts, written by earlier
releases) is still read, so an upgrade keeps every entity's history.
"""

from __future__ import annotations

import marshal
import sys
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from feature_defs.measures import MERGERS, finalize_state, init_state
from feature_defs.plan import RingPlan, ViewPlan

__all__ = ["NO_TS", "Ring", "ViewState", "StateFields", "RingFields", "RingsFields",
           "decode_fields", "fence_key", "fence_pos", "FORMAT"]  # fmt: skip

NO_TS = -(2**62)
FORMAT = 2
_V1 = 1
_INDEX_BITS = 20
_LITTLE = sys.byteorder == "little"
_FORMAT_BYTE = bytes([FORMAT])

#: one ring as the read path sees it: (off, n, vals): the ring's ``n`` tiles are at
#: ``ints[off:off + n]``, then per COUNT slot ``k`` its ``n + 1`` prefix sums at
#: ``off + n + k * (n + 1)``; ``vals`` holds the per-tile states of the other slots
RingFields = tuple[int, int, Sequence[list[Any]]]
#: every ring of a state: (ints, one RingFields per ring)
RingsFields = tuple[Sequence[int], Sequence[RingFields]]
#: the fields of a state: (max_ts, prev_ts, pending, rings, fences)
StateFields = tuple[int, int, list[Any], RingsFields, dict[int, int]]


def fence_key(source_idx: int, partition: int) -> int:
    return (source_idx << 16) | partition


def fence_pos(offset: int, index: int) -> int:
    return (offset << _INDEX_BITS) | index


class Ring:
    """Tiles of one resolution, ascending, with per-slot data (see the module docstring).

    One int64 array holds the ``n`` tiles, then per COUNT slot ``k`` (``plan.counts[k]``)
    its ``n + 1`` prefix sums at ``n + k * (n + 1)`` — the layout that is stored, so
    encoding is one copy. ``vals[j]`` belongs to ``plan.others[j]`` and is aligned with
    the tiles (None: no state in that tile).
    """

    __slots__ = ("ints", "n", "c", "vals")

    def __init__(self, plan: RingPlan) -> None:
        self.c = len(plan.counts)
        self.ints = array("q", bytes(8 * self.c))
        self.n = 0
        self.vals: list[list[Any]] = [[] for _ in plan.others]

    @property
    def tiles(self) -> array:
        return self.ints[: self.n]

    def index(self, tile: int) -> int:
        """Position of ``tile``, inserted (empty) when missing."""
        ints, n = self.ints, self.n
        if n and ints[n - 1] == tile:
            return n - 1
        i = n if not n or tile > ints[n - 1] else bisect_left(ints, tile, 0, n)
        if i < n and ints[i] == tile:
            return i
        ints.insert(i, tile)
        n += 1
        for k in range(self.c):  # segment k starts at n + k * (n + 1) once extended
            at = n + k * (n + 1) + i + 1
            ints.insert(at, ints[at - 1])  # the new tile holds 0: repeat the sum before it
        for v in self.vals:
            v.insert(i, None)
        self.n = n
        return i

    def add_count(self, k: int, tile: int, count: int) -> None:
        """Add ``count`` to COUNT slot ``k`` of ``tile``."""
        self.add_count_at(self.index(tile), k, count)

    def add_count_at(self, i: int, k: int, count: int) -> None:
        """Add ``count`` to COUNT slot ``k`` of the tile at position ``i``."""
        n = self.n
        end = n + k * (n + 1) + n  # the segment's last sum
        if i == n - 1:  # the newest tile: in-order traffic lands here
            self.ints[end] += count
        else:
            ints = self.ints
            for j in range(end - n + i + 1, end + 1):
                ints[j] += count

    def merge(self, j: int, tile: int, state: Any, merge: Any) -> None:
        """Merge ``state`` into other-slot ``j`` of ``tile`` with ``merge``."""
        i = self.index(tile)
        vals = self.vals[j]
        cur = vals[i]
        vals[i] = state if cur is None else merge(cur, state)

    def evict_below(self, low: int) -> None:
        """Drop the tiles below ``low`` (prefix sums keep their differences)."""
        ints, n = self.ints, self.n
        if not n or ints[0] >= low:
            return
        if ints[n - 1] < low:  # every tile: start over (sums from 0, nothing to rebase)
            self.ints = array("q", bytes(8 * self.c))
            self.n = 0
            for v in self.vals:
                v.clear()
            return
        drop = bisect_left(ints, low, 0, n)
        if drop:
            for k in reversed(range(self.c)):
                at = n + k * (n + 1)
                del ints[at: at + drop]
            del ints[:drop]
            self.n = n - drop
            for v in self.vals:
                del v[:drop]

    def normalize(self) -> None:
        """Rebase the prefix sums to start at 0 (equal states give equal bytes)."""
        ints, n = self.ints, self.n
        for k in range(self.c):
            at = n + k * (n + 1)
            base = ints[at]
            if base:
                ints[at: at + n + 1] = array("q", [x - base for x in ints[at: at + n + 1]])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        self.normalize()
        other.normalize()
        return (self.ints, self.vals) == (other.ints, other.vals)

    def __repr__(self) -> str:
        return f"Ring(n={self.n}, ints={self.ints.tolist()}, vals={self.vals})"


class ViewState:
    """Mutable state of one (view, entity). Use :meth:`apply` and :meth:`rollup`."""

    __slots__ = ("plan", "max_ts", "prev_ts", "pending", "rings", "fences")

    def __init__(self, plan: ViewPlan) -> None:
        self.plan = plan
        self.max_ts = NO_TS
        self.prev_ts = NO_TS  # the largest applied ts strictly below max_ts
        self.pending: list[Any] = [None] * len(plan.measures)
        self.rings: list[Ring] = [Ring(rp) for rp in plan.rings]
        self.fences: dict[int, int] = {}

    # ------------------------------------------------------------------ updates
    def seen(self, fkey: int, pos: int) -> bool:
        """True when the event at ``pos`` of source ``fkey`` was already applied."""
        last = self.fences.get(fkey)
        return last is not None and pos <= last

    def apply(
        self,
        source: str,
        ts: int,
        event: dict[str, Any] | None = None,
        *,
        tiebreak: int = 0,
        fkey: int | None = None,
        pos: int | None = None,
    ) -> bool:
        """Apply one event of ``source`` at event time ``ts`` (epoch ms).

        Returns False (and changes nothing) when the fence says it was applied before.
        ``event`` supplies the measure fields (unused for counts).
        """
        if fkey is not None and pos is not None:
            last = self.fences.get(fkey)
            if last is not None and pos <= last:
                return False
            self.fences[fkey] = pos
        feeds = self.plan.feeds.get(source, ())
        values = [
            (slot, op, init_state(op, None if fld is None or event is None else event.get(fld),
                                  ts, tiebreak))
            for slot, op, fld in feeds
        ]
        if ts > self.max_ts:
            if self.max_ts != NO_TS:
                self._merge_into_rings(self.max_ts, list(enumerate(self.pending)))
                self.prev_ts = self.max_ts
            self.max_ts = ts
            pending = [None] * len(self.plan.measures)
            for slot, _op, st in values:
                pending[slot] = st
            self.pending = pending
            self._evict()
        elif ts == self.max_ts:
            measures = self.plan.measures
            pending = self.pending
            for slot, _op, st in values:
                if st is not None:
                    cur = pending[slot]
                    pending[slot] = st if cur is None else MERGERS[measures[slot].op](cur, st)
        else:
            if ts > self.prev_ts:
                self.prev_ts = ts
            self._merge_into_rings(ts, [(slot, st) for slot, _op, st in values], check_low=True)
        return True

    def _merge_into_rings(
        self, ts: int, values: list[tuple[int, Any]], check_low: bool = False
    ) -> None:
        given = {slot: st for slot, st in values if st is not None}
        if not given:
            return
        measures = self.plan.measures
        max_ts = self.max_ts
        for ring_plan, ring in zip(self.plan.rings, self.rings, strict=True):
            tile_ms = ring_plan.tile_ms
            tile = ts // tile_ms if tile_ms else 0
            if check_low and tile_ms and tile < max_ts // tile_ms - ring_plan.keep + 1:
                continue  # cannot fall inside any window as of T >= max_ts
            i = -1
            for k, slot in enumerate(ring_plan.counts):
                st = given.get(slot)
                if st is not None:
                    if i < 0:
                        i = ring.index(tile)
                    ring.add_count_at(i, k, st)
            for j, slot in enumerate(ring_plan.others):
                st = given.get(slot)
                if st is not None:
                    ring.merge(j, tile, st, MERGERS[measures[slot].op])

    def compact(self) -> None:
        """Drop tiles that can no longer fall inside a window as of any T >= max_ts."""
        self._evict()

    def _evict(self) -> None:
        max_ts = self.max_ts
        for ring_plan, ring in zip(self.plan.rings, self.rings, strict=True):
            if ring_plan.tile_ms and ring.n:
                ring.evict_below(max_ts // ring_plan.tile_ms - ring_plan.keep + 1)

    # ------------------------------------------------------------------ reads
    def last_before(self, as_of_ms: int) -> int:
        """Latest applied event time strictly before ``as_of_ms`` (NO_TS if none)."""
        if self.max_ts < as_of_ms:
            return self.max_ts
        if self.max_ts == as_of_ms:
            return self.prev_ts
        raise ValueError("as_of before the latest applied event")

    def is_default(self, as_of_ms: int) -> bool:
        """No applied event before T, or the latest one is at least the view TTL old."""
        last = self.last_before(as_of_ms)
        return last == NO_TS or as_of_ms - last >= self.plan.ttl_ms

    def rollup(self, as_of_ms: int) -> tuple[dict[str, Any], bool]:
        """Feature values as of ``as_of_ms`` (must be ``>= max_ts``) and the default flag.

        The reference roll-up: one output and one measure at a time, straight from the
        rule (``serving.rollup.RollupProgram`` is the fast one, tested equal to this).

        Raises:
            ValueError: ``as_of_ms`` is before the latest applied event (ask the offline
                store for earlier times).
        """
        plan = self.plan
        if self.is_default(as_of_ms):
            return {o.name: o.default for o in plan.outputs}, True
        measures = plan.measures
        include_pending = as_of_ms > self.max_ts
        out: dict[str, Any] = {}
        for o in plan.outputs:
            ring_plan = plan.rings[o.ring]
            ring = self.rings[o.ring]
            tile_ms = ring_plan.tile_ms
            low = o.window.lowest_tile(as_of_ms)
            start = bisect_left(ring.ints, low, 0, ring.n) if tile_ms else 0
            pending_in = include_pending and (not tile_ms or self.max_ts // tile_ms >= low)
            accs: list[Any] = []
            for slot in o.slots:
                merge = MERGERS[measures[slot].op]
                acc: Any = None
                if slot in ring_plan.counts:
                    n = ring.n
                    at = n + ring_plan.counts.index(slot) * (n + 1)
                    acc = ring.ints[at + n] - ring.ints[at + start]
                else:
                    for st in ring.vals[ring_plan.others.index(slot)][start:]:
                        if st is not None:
                            acc = st if acc is None else merge(acc, st)
                st = self.pending[slot]
                if pending_in and st is not None:
                    acc = st if acc is None else merge(acc, st)
                accs.append(acc)
            if o.is_ratio:
                num = finalize_state(o.ops[0], accs[0])
                den = finalize_state(o.ops[1], accs[1])
                out[o.name] = None if not den or num is None else num / den
            else:
                out[o.name] = finalize_state(o.ops[0], accs[0])
        return out, False

    def ring_fields(self) -> RingsFields:
        """The rings as :func:`decode_fields` returns them (a copy of the ints)."""
        ints = array("q")
        rings = []
        for ring in self.rings:
            rings.append((len(ints), ring.n, ring.vals))
            ints.extend(ring.ints)
        return ints, rings

    # ------------------------------------------------------------------ bytes
    def encode(self) -> bytes:
        self._evict()
        for ring in self.rings:
            ints, n = ring.ints, ring.n
            for k in range(ring.c):
                if ints[n + k * (n + 1)]:  # tiles were evicted: rebase the sums
                    ring.normalize()
                    break
        rings = self.rings
        ints_b = b"".join([r.ints.tobytes() for r in rings]) if _LITTLE else _swapped(rings)
        return _FORMAT_BYTE + marshal.dumps((
            self.max_ts, self.prev_ts, self.pending, [r.n for r in rings], ints_b,
            [r.vals for r in rings], self.fences))  # fmt: skip

    @classmethod
    def decode(cls, plan: ViewPlan, data: bytes) -> ViewState:
        """The state encoded by :meth:`encode`, or by format 1 (errors: see
        :func:`decode_fields`)."""
        st = cls.__new__(cls)
        st.plan = plan
        if data and data[0] == _V1:
            st.max_ts, st.prev_ts, st.pending, old, st.fences = _loads_v1(plan, data)
            st.rings = [_ring_from_v1(rp, plan, cells)
                        for rp, cells in zip(plan.rings, old, strict=True)]
            return st
        st.max_ts, st.prev_ts, st.pending, (ints, rings), st.fences = decode_fields(plan, data)
        st.rings = []
        for rp, (off, n, vals) in zip(plan.rings, rings, strict=True):
            ring = Ring.__new__(Ring)
            ring.c = len(rp.counts)
            ring.n = n
            ring.ints = array("q", ints[off: off + n + ring.c * (n + 1)])
            ring.vals = list(vals)
            st.rings.append(ring)
        return st


def decode_fields(plan: ViewPlan, data: bytes) -> StateFields:
    """The fields of an encoded state without building a :class:`ViewState`.

    The read path only rolls states up: the rings come back as ONE int64 memoryview over
    the stored bytes (no object per tile) with each ring's offset. Same checks as
    :meth:`ViewState.decode`.

    Raises:
        ValueError: unknown format byte, or rings that do not match ``plan``.
        EOFError, TypeError: bytes that do not unmarshal into a state.
    """
    if data and data[0] == _V1:
        st = ViewState.decode(plan, data)
        return st.max_ts, st.prev_ts, st.pending, st.ring_fields(), st.fences
    if not data or data[0] != FORMAT:
        raise ValueError(f"unknown view state format {data[:1]!r}")
    max_ts, prev_ts, pending, ns, ints_b, vals, fences = marshal.loads(memoryview(data)[1:])
    layout = plan.rings
    if len(ns) != len(layout) or len(vals) != len(layout) or len(ints_b) % 8:
        raise ValueError("view state does not match the view's ring layout")
    rings = []
    off = 0
    for rp, n, v in zip(layout, ns, vals, strict=True):
        if len(v) != len(rp.others):
            raise ValueError("view state does not match the view's ring layout")
        for col in v:
            if len(col) != n:
                raise ValueError("view state does not match the view's ring layout")
        rings.append((off, n, v))
        off += n + len(rp.counts) * (n + 1)
    ints = memoryview(ints_b).cast("q") if _LITTLE else _unpack(ints_b)
    if off != len(ints):
        raise ValueError("view state does not match the view's ring layout")
    return max_ts, prev_ts, pending, (ints, rings), fences


# ---------------------------------------------------------------------- encoding helpers
def _swapped(rings: Sequence[Ring]) -> bytes:
    """The rings' ints as little-endian bytes on a big-endian host."""
    out = array("q")
    for r in rings:
        out.extend(r.ints)
    out.byteswap()
    return out.tobytes()


def _unpack(data: bytes) -> array:
    out = array("q")
    out.frombytes(data)
    if not _LITTLE:
        out.byteswap()
    return out


def _loads_v1(plan: ViewPlan, data: bytes) -> tuple[Any, ...]:
    fields = marshal.loads(data[1:])
    if len(fields[3]) != len(plan.rings):
        raise ValueError("view state does not match the view's ring layout")
    return fields


def _ring_from_v1(rp: RingPlan, plan: ViewPlan, cells_by_tile: dict[int, list[Any]]) -> Ring:
    """A format-1 ring (tile → per-slot cells) as a :class:`Ring`."""
    ring = Ring(rp)
    for tile in sorted(cells_by_tile):
        cells = cells_by_tile[tile]
        for k, slot in enumerate(rp.counts):
            if cells[slot] is not None:
                ring.add_count(k, tile, cells[slot])
        for j, slot in enumerate(rp.others):
            if cells[slot] is not None:
                ring.merge(j, tile, cells[slot], MERGERS[plan.measures[slot].op])
        ring.index(tile)  # a tile with only empty cells still counts as present
    return ring
