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
           "decode_fields", "fence_key", "fence_pos", "set_fence", "FORMAT"]

NO_TS = -(2**62)
FORMAT = 2
_V1 = 1
_INDEX_BITS = 20
_LITTLE = sys.byteorder == "little"
_FORMAT_BYTE = bytes([FORMAT])
_ZERO = (0,)
#: marshal format 2 has no back-references: from version 3 on, marshal flags every
#: object that something else also references (its refcount), so equal states written
#: from different code paths (a sketch shared by two tiles, or cached) got different
#: bytes. Version 2 is also faster here; every version reads back the same
_MARSHAL_VERSION = 2

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


def set_fence(fences: dict[int, int], fkey: int, pos: int) -> None:
    """Set the fence of ``fkey``, keeping the keys in ascending order: a state's bytes
    then do not depend on the order in which its sources first reached it."""
    if fkey in fences or not fences or fkey > next(reversed(fences)):
        fences[fkey] = pos
        return
    fences[fkey] = pos
    ordered = sorted(fences.items())
    fences.clear()
    fences.update(ordered)


class Ring:
    """Tiles of one resolution, ascending, with per-slot data (see the module docstring).

    ``tiles`` holds the ``n`` tile indexes; ``cums[k]`` (for ``plan.counts[k]``) the
    ``n + 1`` prefix sums, ``cums[k][i]`` = the base plus the counts of the tiles before
    tile ``i``; ``vals[j]`` (for ``plan.others[j]``) one state per tile (None: none).
    Encoded, the arrays are laid end to end (:func:`decode_fields`).
    """

    __slots__ = ("tiles", "cums", "vals")

    def __init__(self, plan: RingPlan) -> None:
        self.tiles = array("q")
        self.cums = [array("q", _ZERO) for _ in plan.counts]
        self.vals: list[list[Any]] = [[] for _ in plan.others]

    def index(self, tile: int) -> int:
        """Position of ``tile``, inserted (empty) when missing."""
        tiles = self.tiles
        if tiles:
            last = tiles[-1]
            if last == tile:
                return len(tiles) - 1
            if tile < last:
                i = bisect_left(tiles, tile)
                if tiles[i] != tile:
                    tiles.insert(i, tile)
                    for c in self.cums:
                        c.insert(i + 1, c[i])  # the new tile holds 0: repeat the sum before
                    for v in self.vals:
                        v.insert(i, None)
                return i
        tiles.append(tile)
        for c in self.cums:
            c.append(c[-1])
        for v in self.vals:
            v.append(None)
        return len(tiles) - 1

    def add_count(self, k: int, tile: int, count: int) -> None:
        """Add ``count`` to COUNT slot ``k`` of ``tile``."""
        self.add_count_at(self.index(tile), k, count)

    def add_count_at(self, i: int, k: int, count: int) -> None:
        """Add ``count`` to COUNT slot ``k`` of the tile at position ``i``."""
        cum = self.cums[k]
        end = len(cum)
        if i == end - 2:  # the newest tile: in-order traffic lands here
            cum[-1] += count
        else:
            for j in range(i + 1, end):
                cum[j] += count

    def merge(self, j: int, tile: int, state: Any, merge: Any) -> None:
        """Merge ``state`` into other-slot ``j`` of ``tile`` with ``merge``."""
        i = self.index(tile)
        vals = self.vals[j]
        cur = vals[i]
        vals[i] = state if cur is None else merge(cur, state)

    def evict_below(self, low: int) -> None:
        """Drop the tiles below ``low`` (prefix sums keep their differences)."""
        tiles = self.tiles
        if not tiles or tiles[0] >= low:
            return
        if tiles[-1] < low:  # every tile: start over (a prefix sum's base is arbitrary)
            del tiles[:]
            for c in self.cums:
                del c[1:]
            for v in self.vals:
                v.clear()
            return
        drop = bisect_left(tiles, low)
        del tiles[:drop]
        for c in self.cums:
            del c[:drop]
        for v in self.vals:
            del v[:drop]

    def normalize(self) -> None:
        """Rebase the prefix sums to start at 0."""
        for k, c in enumerate(self.cums):
            if c[0]:
                base = c[0]
                self.cums[k] = array("q", [x - base for x in c])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        self.normalize()
        other.normalize()
        return (self.tiles, self.cums, self.vals) == (other.tiles, other.cums, other.vals)

    def __repr__(self) -> str:
        return (f"Ring(tiles={self.tiles.tolist()}, cums={[c.tolist() for c in self.cums]}, "
                f"vals={self.vals})")


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
            set_fence(self.fences, fkey, pos)
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
            if check_low and tile_ms and tile < ring_plan.horizon(max_ts):
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
            tiles = ring.tiles
            if tiles and ring_plan.tile_ms:
                low = ring_plan.horizon(max_ts)
                if tiles[0] < low:
                    ring.evict_below(low)

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
            start = bisect_left(ring.tiles, low) if tile_ms else 0
            pending_in = include_pending and (not tile_ms or self.max_ts // tile_ms >= low)
            accs: list[Any] = []
            for slot in o.slots:
                merge = MERGERS[measures[slot].op]
                acc: Any = None
                if slot in ring_plan.counts:
                    cum = ring.cums[ring_plan.counts.index(slot)]
                    acc = cum[-1] - cum[start]
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
            rings.append((len(ints), len(ring.tiles), ring.vals))
            ints.extend(ring.tiles)
            for c in ring.cums:
                ints.extend(c)
        return ints, rings

    # ------------------------------------------------------------------ bytes
    def encode(self) -> bytes:
        """The state's bytes (format 2). Prefix sums keep their base: equal states may
        differ in bytes, never in any answer. Every update path keeps the state compact
        (tiles beyond the horizon dropped), so encoding does not scan for them again."""
        rings = self.rings
        if _LITTLE:
            ints_b = b"".join([a.tobytes() for r in rings for a in (r.tiles, *r.cums)])
        else:  # stored little-endian
            ints = array("q", self.ring_fields()[0])
            ints.byteswap()
            ints_b = ints.tobytes()
        return _FORMAT_BYTE + marshal.dumps((
            self.max_ts, self.prev_ts, self.pending, [len(r.tiles) for r in rings], ints_b,
            [r.vals for r in rings], self.fences), _MARSHAL_VERSION)

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
            ring.tiles = array("q", ints[off: off + n])
            off += n
            ring.cums = []
            for _ in rp.counts:
                ring.cums.append(array("q", ints[off: off + n + 1]))
                off += n + 1
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
