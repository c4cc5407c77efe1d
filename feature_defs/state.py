"""Per-entity online state of one view: tile rings, the latest event, fences; and roll-up.

The state answers "the features as of T" exactly for any ``T >= max_ts`` (the latest
applied event time): tiles are kept while they can still fall inside a window as of
such a T, and the events *at* ``max_ts`` are held apart (``pending``) until a later
event arrives, because the window rule excludes events at T itself.

``fences`` make replays idempotent: for each source (topic, partition) the position
(offset, index-in-message) of the last event applied to this entity; an event at or
before its fence is skipped. Positions only grow within a source partition, and a
replay re-delivers a prefix-consistent sequence, so skipping by position is exact.

Serialized with :mod:`marshal` (fast, compact, plain values only) behind a format byte.
"""

from __future__ import annotations

import marshal
from typing import Any

from feature_defs.measures import MERGERS, finalize_state, init_state
from feature_defs.plan import ViewPlan

__all__ = ["NO_TS", "ViewState", "StateFields", "decode_fields", "fence_key", "fence_pos", "FORMAT"]

NO_TS = -(2**62)
FORMAT = 1
_INDEX_BITS = 20

#: the encoded fields of a state: (max_ts, prev_ts, pending, rings, fences)
StateFields = tuple[int, int, list[Any], list[dict[int, list[Any]]], dict[int, int]]


def fence_key(source_idx: int, partition: int) -> int:
    return (source_idx << 16) | partition


def fence_pos(offset: int, index: int) -> int:
    return (offset << _INDEX_BITS) | index


class ViewState:
    """Mutable state of one (view, entity). Use :meth:`apply` and :meth:`rollup`."""

    __slots__ = ("plan", "max_ts", "prev_ts", "pending", "rings", "fences")

    def __init__(self, plan: ViewPlan) -> None:
        self.plan = plan
        self.max_ts = NO_TS
        self.prev_ts = NO_TS  # the largest applied ts strictly below max_ts
        self.pending: list[Any] = [None] * len(plan.measures)
        self.rings: list[dict[int, list[Any]]] = [{} for _ in plan.rings]
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
            for slot, op, st in values:
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
        measures = self.plan.measures
        max_ts = self.max_ts
        for ring_plan, ring in zip(self.plan.rings, self.rings, strict=True):
            tile_ms = ring_plan.tile_ms
            tile = ts // tile_ms if tile_ms else 0
            if check_low and tile_ms and tile < max_ts // tile_ms - ring_plan.keep + 1:
                continue  # cannot fall inside any window as of T >= max_ts
            slots = ring_plan.slots
            cells = ring.get(tile)
            for slot, st in values:
                if st is None or slot not in slots:
                    continue
                if cells is None:
                    cells = ring[tile] = [None] * len(measures)
                cur = cells[slot]
                cells[slot] = st if cur is None else MERGERS[measures[slot].op](cur, st)

    def compact(self) -> None:
        """Drop tiles that can no longer fall inside a window as of any T >= max_ts."""
        self._evict()

    def _evict(self) -> None:
        max_ts = self.max_ts
        for ring_plan, ring in zip(self.plan.rings, self.rings, strict=True):
            if not ring_plan.tile_ms or not ring:
                continue
            low = max_ts // ring_plan.tile_ms - ring_plan.keep + 1
            stale = [t for t in ring if t < low]
            for t in stale:
                del ring[t]

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
            tile_ms = ring_plan.tile_ms
            low = o.window.lowest_tile(as_of_ms)
            accs: list[Any] = []
            for slot in o.slots:
                merge = MERGERS[measures[slot].op]
                acc = None
                for tile, cells in self.rings[o.ring].items():
                    if tile_ms and tile < low:
                        continue
                    st = cells[slot]
                    if st is not None:
                        acc = st if acc is None else merge(acc, st)
                if include_pending:
                    st = self.pending[slot]
                    ptile = self.max_ts // tile_ms if tile_ms else 0
                    if st is not None and (not tile_ms or ptile >= low):
                        acc = st if acc is None else merge(acc, st)
                accs.append(acc)
            if o.is_ratio:
                num = finalize_state(o.ops[0], accs[0])
                den = finalize_state(o.ops[1], accs[1])
                out[o.name] = None if not den or num is None else num / den
            else:
                out[o.name] = finalize_state(o.ops[0], accs[0])
        return out, False

    # ------------------------------------------------------------------ bytes
    def encode(self) -> bytes:
        self._evict()
        return bytes([FORMAT]) + marshal.dumps(
            (self.max_ts, self.prev_ts, self.pending, self.rings, self.fences)
        )

    @classmethod
    def decode(cls, plan: ViewPlan, data: bytes) -> ViewState:
        """The state encoded by :meth:`encode` (errors: see :func:`decode_fields`)."""
        st = cls.__new__(cls)
        st.plan = plan
        st.max_ts, st.prev_ts, st.pending, st.rings, st.fences = decode_fields(plan, data)
        return st


def decode_fields(plan: ViewPlan, data: bytes) -> StateFields:
    """The fields of an encoded state without building a :class:`ViewState`.

    The read path only rolls states up, so it skips the object (same bytes, same
    checks as :meth:`ViewState.decode`).

    Raises:
        ValueError: unknown format byte, or rings that do not match ``plan``.
        EOFError, TypeError: bytes that do not unmarshal into a state.
    """
    if not data or data[0] != FORMAT:
        raise ValueError(f"unknown view state format {data[:1]!r}")
    fields: StateFields = marshal.loads(data[1:])
    _max_ts, _prev_ts, _pending, rings, _fences = fields
    if len(rings) != len(plan.rings):
        raise ValueError("view state does not match the view's ring layout")
    return fields
