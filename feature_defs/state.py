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

Stored as format 3 (:mod:`feature_defs.state_codec`: explicit little-endian int64 /
float64 / uint64 words behind a documented header, no marshal), whose tiles and prefix
sums the read path bisects in place. Formats 1 and 2 (marshal, written by earlier
releases) are still read, so an upgrade keeps every entity's history; a state is
rewritten as format 3 at its next update (:meth:`ViewState.encode` writes only 3).
"""

from __future__ import annotations

import marshal
import struct
import sys
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from feature_defs.marshal_guard import check_marshal
from feature_defs.measures import MERGERS, finalize_state, init_state
from feature_defs.plan import RingPlan, ViewPlan
from feature_defs.state_codec import _CODECS, FORMAT, MAGIC, codec_for
from headrace.core.errors import StateFormatError

__all__ = ["NO_TS", "Ring", "ViewState", "StateFields", "RingFields", "RingsFields",
           "decode_fields", "fence_key", "fence_pos", "set_fence", "FORMAT",
           "StateFormatError"]

NO_TS = -(2**62)
_V1, _V2 = 1, 2
_INDEX_BITS = 20
_LITTLE = sys.byteorder == "little"
_ZERO_SUM = array("q", (0,))  # copied (sliced), never changed: a new prefix sum
#: what unmarshalling foreign bytes, or using what came out, can raise
_LEGACY_ERRORS = (ValueError, EOFError, TypeError, IndexError, KeyError, AttributeError,
                  OverflowError, struct.error)  # (struct: a time or count beyond int64)

#: one ring as the read path sees it: (off, n, cols): the ring's ``n`` tiles are at
#: ``ints[off:off + n]``, then per COUNT slot ``k`` its ``n + 1`` prefix sums at
#: ``off + n + k * (n + 1)``; per other slot ``j``, ``cols[j] = (oa, da)``: its ``n + 1``
#: entry offsets at ``ints[oa:oa + n + 1]`` and its entries from word ``da`` on (layout:
#: :mod:`feature_defs.state_codec`)
RingFields = tuple[int, int, Sequence[tuple[int, int]]]
#: every ring of a state: (ints, floats, hashes, one RingFields per ring): int64, float64
#: and uint64 views of the same words (floats / hashes None when the view has none)
RingsFields = tuple[Sequence[int], Any, Any, Sequence[RingFields]]
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

    ``cums`` is a tuple (of int64 arrays, changed in place): a state holds many rings, and
    a tuple of arrays is a container the cyclic GC stops tracking, a list is not.
    """

    __slots__ = ("tiles", "cums", "vals")

    def __init__(self, plan: RingPlan) -> None:
        self.tiles = array("q")
        self.cums: tuple[array[int], ...] = tuple([_ZERO_SUM[:] for _ in plan.counts])
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
        for c in self.cums:
            if c[0]:
                base = c[0]
                c[:] = array("q", [x - base for x in c])

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
        codec = _CODECS.get(id(plan))  # (codec_for(plan), inlined: a new entity's hot path)
        if codec is None or codec.plan is not plan:
            codec = codec_for(plan)
        self.plan = plan
        self.max_ts = NO_TS
        self.prev_ts = NO_TS  # the largest applied ts strictly below max_ts
        self.pending: list[Any] = [None] * len(plan.measures)
        self.rings: list[Ring] = codec.new_rings_fn(Ring)  # as Ring(rp) per ring
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
        """The rings as :func:`decode_fields` returns them (over a fresh encoding)."""
        return codec_for(self.plan).parse(self.encode())[3]

    # ------------------------------------------------------------------ bytes
    def encode(self) -> bytes:
        """The state's bytes, format 3 (:mod:`feature_defs.state_codec`). Prefix sums keep
        their base: equal states may differ in bytes, never in any answer. Every update
        path keeps the state compact (tiles beyond the horizon dropped), so encoding does
        not scan for them again."""
        return codec_for(self.plan).encode(self.max_ts, self.prev_ts, self.pending, self.rings,
                                           self.fences)

    @classmethod
    def decode(cls, plan: ViewPlan, data: bytes) -> ViewState:
        """The state encoded by :meth:`encode`, or by format 1 or 2 (earlier releases).

        Raises:
            StateFormatError: malformed bytes, or another view's layout (format 3: see
                :meth:`~feature_defs.state_codec.StateCodec.materialize`).
        """
        head = data[:1]
        if head != _V1_BYTE and head != _V2_BYTE:  # format 3 (else refused as unknown)
            codec = _CODECS.get(id(plan))  # (codec_for(plan), inlined)
            if codec is None or codec.plan is not plan:
                codec = codec_for(plan)
            st = _new(cls)
            st.plan = plan
            st.max_ts, st.prev_ts, st.pending, st.rings, st.fences = \
                codec.materialize_fn(data, Ring)  # .materialize(data, Ring), generated
            return st
        st = _new(cls)
        st.plan = plan
        if head == _V1_BYTE:
            try:
                st.max_ts, st.prev_ts, st.pending, old, st.fences = _loads_v1(plan, data)
                st.rings = [_ring_from_v1(rp, plan, cells)
                            for rp, cells in zip(plan.rings, old, strict=True)]
                st.fences = dict(sorted(st.fences.items()))
                codec_for(plan).materialize(st.encode())  # representable, and in order
            except StateFormatError:
                raise
            except _LEGACY_ERRORS as exc:
                raise StateFormatError(f"malformed view state (format 1): {exc}") from exc
            return st
        return _v2_state(plan, data)


_new = object.__new__


def decode_fields(plan: ViewPlan, data: bytes) -> StateFields:
    """The fields of an encoded state without building a :class:`ViewState`.

    The read path only rolls states up: the rings come back as int64 (and float64,
    uint64) memoryviews over the stored bytes (no object per tile) with each ring's
    word offsets (:data:`RingsFields`). Formats 1 and 2 are converted to format 3 first.

    Raises:
        StateFormatError: malformed bytes, or another view's layout (a structural check;
            the orders of tiles and offsets are checked by :meth:`ViewState.decode`).
    """
    if data[:1] == _V3_BYTE:
        return codec_for(plan).parse(data)
    if data[:1] in (_V1_BYTE, _V2_BYTE):
        return codec_for(plan).parse(ViewState.decode(plan, data).encode())
    raise StateFormatError(f"malformed view state: unknown format {bytes(data[:1])!r}")


# ---------------------------------------------------------------------- formats 1 and 2
_V1_BYTE, _V2_BYTE, _V3_BYTE = bytes([_V1]), bytes([_V2]), MAGIC[:1]
assert FORMAT == MAGIC[0] == 3


def _v2_state(plan: ViewPlan, data: bytes) -> ViewState:
    """The state in format-2 bytes: marshal (version 2) of (max_ts, prev_ts, pending,
    tiles per ring, the ints block as little-endian int64 bytes, per-tile states per
    ring, fences). Checked as format 3 is: every field must encode as format 3.

    Raises:
        StateFormatError: bytes that are not such a state of ``plan``.
    """
    try:
        check_marshal(data)  # bounded allocations (see feature_defs.marshal_guard)
        max_ts, prev_ts, pending, ns, ints_b, vals, fences = marshal.loads(data[1:])
        layout = plan.rings
        if (len(ns) != len(layout) or len(vals) != len(layout) or len(ints_b) % 8
                or len(pending) != len(plan.measures)):
            raise StateFormatError("malformed view state: not the layout of view "
                                   f"{plan.view.id} (format 2)")
        ints = array("q")
        ints.frombytes(ints_b)
        if not _LITTLE:
            ints.byteswap()
        st = ViewState.__new__(ViewState)
        st.plan, st.max_ts, st.prev_ts, st.pending = plan, max_ts, prev_ts, list(pending)
        st.fences = dict(sorted(fences.items()))
        st.rings = []
        off = 0
        for rp, n, v in zip(layout, ns, vals, strict=True):
            if n < 0 or len(v) != len(rp.others) or any(len(col) != n for col in v):
                raise StateFormatError("malformed view state: not the layout of view "
                                       f"{plan.view.id} (format 2)")
            ring = Ring.__new__(Ring)
            ring.tiles = ints[off: off + n]
            off += n
            cums = []
            for _ in rp.counts:
                cums.append(ints[off: off + n + 1])
                off += n + 1
            ring.cums = tuple(cums)
            ring.vals = [list(col) for col in v]
            st.rings.append(ring)
        if off != len(ints):
            raise StateFormatError("malformed view state: ints of another length (format 2)")
        codec_for(plan).materialize(st.encode())  # representable, and in order
        return st
    except StateFormatError:
        raise
    except _LEGACY_ERRORS as exc:
        raise StateFormatError(f"malformed view state (format 2): {exc}") from exc


def _loads_v1(plan: ViewPlan, data: bytes) -> tuple[Any, ...]:
    check_marshal(data)  # bounded allocations (see feature_defs.marshal_guard)
    fields = marshal.loads(data[1:])
    if len(fields) != 5 or len(fields[3]) != len(plan.rings) \
            or len(fields[2]) != len(plan.measures):
        raise StateFormatError("malformed view state: not the layout of view "
                               f"{plan.view.id} (format 1)")
    return tuple(fields)


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
