"""The worker's view-state cache: bounded by bytes, least recently used out first.

A worker holds the state of every entity it touched since its partitions were assigned
(a few KB each in memory), so without a bound its memory grows with the cardinality of
the stream. :class:`StateCache` keeps states under a byte budget
(``HEADRACE_STATE_CACHE_MB``): when over it, the least recently used states whose
changes are **durable** are dropped; a later touch loads them from the online store
again, with their fences, so a replay is still skipped and effectively-once holds.

A state is never evicted while it is

* **dirty**: changed since it was last taken for a write (:meth:`StateCache.take_dirty`);
* **in flight**: taken for a write that the store has not confirmed yet
  (:meth:`StateCache.written` releases it; a write that failed never does).

Evictions only run between batches (:meth:`StateCache.evict`, from the online flush),
so the states a batch loaded stay put until it is applied. Loads are batched: every
state a take misses, of every view, comes from one :meth:`~headrace.core.online_store.
OnlineStore.load` call (:meth:`StateCache.prefetch`).

**Unreadable states are quarantined, not fatal.** A stored state that
:meth:`ViewState.decode` rejects (:class:`~headrace.core.errors.StateFormatError`: junk
bytes, a truncated value, another view's layout) would otherwise stop the worker on the
entity's next event, and again after every restart. Instead the load publishes a
:class:`~streams.sides.CorruptState` dead letter (``headrace-dlq``, ``hr-reason:
corrupt_state: ...``, with the Redis key, the view id and the stored bytes), counts it
(``headrace_corrupt_states_total{view}``), logs a WARNING naming key and view, and
**resets** the state to an empty :class:`ViewState`, marked dirty, so the stream keeps
flowing and the next flush overwrites the junk.

Reset, not rebuilt: rebuilding one entity from the offline store or the log means a
scan of every part or offset that may hold it, on the hot path. The price: the entity's
history before the reset is lost. The state then holds only the events applied from the
batch that found the junk on (those a resumed worker replays included, once each: the
reset state has no fences), so its features count only those until its windows have
rolled past the reset (the longest, 7 days for the shipped user view).

Never lost, maybe twice: the dead letter is made durable by the online flush before the
reset state is written (:meth:`~streams.sides.SideOutputs.flush` comes first). A crash
before that write leaves the junk in Redis for the replay to find again, so the record
may be published twice, identical (key, view, bytes, ``hr-state-xxh64``: deduplicate on
those). Without side outputs (``sides=None``) there is nowhere to keep the bytes and the
error is raised as before.

The size of a state is estimated from its encoded size (:func:`resident_bytes`, an
affine fit of the measured Python memory of decoded states, their keys and this cache's
bookkeeping); a state loaded absent counts :data:`RESIDENT_BASE` until it is encoded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from feature_defs.layout import entity_key
from feature_defs.plan import ViewPlan
from feature_defs.state import ViewState
from headrace.core.errors import StateFormatError
from headrace.core.online_store import OnlineStore, StateWrite
from streams.metrics import StreamMetrics
from streams.run_stats import RunStats
from streams.sides import CorruptState, SideOutputs

__all__ = ["StateCache", "InFlight", "resident_bytes", "RESIDENT_BASE", "RESIDENT_FACTOR"]

log = logging.getLogger(__name__)

#: fixed memory per cached state (bytes): the ViewState and its rings, arrays and lists,
#: the entity id, and the entries in the cache's dicts. Fitted to tracemalloc figures of
#: the shipped user view's states (format 3): 3.0-4.4 KB decoded and 3.2-6.4 KB built
#: by updates, for 0.44-1.3 KB encoded; the fit errs on the high side
RESIDENT_BASE = 2000
#: memory per encoded byte: the tiles, prefix sums and per-tile states as Python objects
RESIDENT_FACTOR = 3

#: (view id, entity id): one cached state
Slot = tuple[str, str]


def resident_bytes(encoded: int) -> int:
    """Estimated memory (bytes) of a decoded state whose encoding is ``encoded`` bytes."""
    return RESIDENT_BASE + RESIDENT_FACTOR * encoded


@dataclass
class InFlight:
    """The states of one write, pinned in the cache until :meth:`StateCache.written`."""

    slots: list[tuple[Slot, int]] = field(default_factory=list)  # (slot, resident bytes)


class StateCache:
    """View states per view and entity id, their dirty sets, and a byte-bounded LRU.

    Args:
        plans: The views (view id -> plan).
        store: Where states missing from the cache are loaded.
        prefix: Redis key prefix.
        limit_bytes: The budget (estimated bytes, :func:`resident_bytes`); None: no
            bound (nothing is evicted).
        metrics: Cache gauges (bytes, entries) and counters (hits, misses, evictions,
            corrupt states).
        sides: Where an unreadable state is dead-lettered before it is reset (see the
            module docstring); None: an unreadable state raises ``StateFormatError``.

    Attributes:
        states: View id -> entity id -> state (what is cached).
        dirty: View id -> entity ids changed since the last :meth:`take_dirty` (the
            apply paths add to it).
        hits, misses, evictions: Totals since the start (also Prometheus counters).
        quarantined: Unreadable states dead-lettered and reset since the start.
    """

    def __init__(self, *, plans: Mapping[str, ViewPlan], store: OnlineStore, prefix: str,
                 limit_bytes: int | None, metrics: StreamMetrics,
                 sides: SideOutputs | None = None) -> None:
        self.plans = plans
        self.store = store
        self.prefix = prefix
        self.limit_bytes = limit_bytes
        self.metrics = metrics
        self.sides = sides
        self.states: dict[str, dict[str, ViewState]] = {vid: {} for vid in plans}
        self.dirty: dict[str, set[str]] = {vid: set() for vid in plans}
        #: every cached slot with its estimated bytes, least recently used first (an
        #: OrderedDict: a plain dict's deleted entries at its front would be rescanned by
        #: every eviction until the next resize)
        self._lru: OrderedDict[Slot, int] = OrderedDict()
        #: slots of writes not confirmed yet (count of such writes per slot)
        self._pinned: dict[Slot, int] = {}
        self.bytes = 0
        self._loaded = 0  # bytes loaded since the last evict()
        self.hits = self.misses = self.evictions = 0
        self.quarantined = 0
        if limit_bytes is not None:
            metrics.state_cache_limit.set(limit_bytes)

    # ---------------------------------------------------------------- reads
    def prefetch(self, wanted: Mapping[str, Iterable[str]]) -> None:
        """Touch the states of ``wanted`` (view id -> entity ids), loading every one not
        cached in ONE store call; counts a hit or a miss per distinct state."""
        lru = self._lru
        missing: list[Slot] = []
        hits = 0
        for vid, keys in wanted.items():
            cache = self.states[vid]
            for k in keys:
                slot = (vid, k)
                if slot in lru:
                    lru.move_to_end(slot)  # the most recently used end
                elif k in cache:  # put in ``states`` by hand (tests): now listed
                    lru[slot] = RESIDENT_BASE
                    self.bytes += RESIDENT_BASE
                else:
                    missing.append(slot)
                    continue
                hits += 1
        self.hits += hits
        self.metrics.state_cache_hits.inc(hits)
        if missing:
            self._load(missing)

    def get(self, plan: ViewPlan, keys: Sequence[str], *, count: bool = True
            ) -> list[ViewState]:
        """The states of the distinct ``keys`` of ``plan``'s view (loaded from the store
        when not cached, in one call). ``count=False``: already touched and counted by
        :meth:`prefetch`."""
        vid = plan.view.id
        cache = self.states[vid]
        if count:
            self.prefetch({vid: keys})
        else:
            missing = [(vid, k) for k in keys if k not in cache]
            if missing:  # a caller that prefetched other keys
                self._load(missing)
        return [cache[k] for k in keys]

    def _load(self, slots: list[Slot]) -> None:
        pairs = [(entity_key(self.prefix, self.plans[vid].view.entity.name, k), vid)
                 for vid, k in slots]
        blobs = self.store.load(pairs)
        lru, added = self._lru, 0
        for (vid, k), blob, (key, _vid) in zip(slots, blobs, pairs, strict=True):
            plan = self.plans[vid]
            if blob:
                try:
                    state, size = ViewState.decode(plan, blob), resident_bytes(len(blob))
                except StateFormatError as exc:
                    if self.sides is None:
                        raise
                    state, size = self._quarantine(plan, k, key, blob, exc), RESIDENT_BASE
            else:
                state, size = ViewState(plan), RESIDENT_BASE
            self.states[vid][k] = state
            lru[(vid, k)] = size
            added += size
        self.bytes += added
        self._loaded += added
        self.misses += len(slots)
        self.metrics.state_cache_misses.inc(len(slots))

    def _quarantine(self, plan: ViewPlan, entity_id: str, key: str, blob: bytes,
                    exc: StateFormatError) -> ViewState:
        """Dead-letter an unreadable state and return its replacement: an empty state,
        dirty, so the next flush overwrites the junk once the dead letter is durable."""
        assert self.sides is not None
        vid = plan.view.id
        self.sides.dead_letter(CorruptState(key=key, view=vid, error=str(exc),
                                            value=bytes(blob)))
        self.metrics.corrupt_states.labels(vid).inc()
        self.quarantined += 1
        self.dirty[vid].add(entity_id)
        log.warning("unreadable view state %s field %s (%d bytes: %s): dead-lettered "
                    "(corrupt_state) and reset to empty; the entity's history before now "
                    "is lost until its windows roll past it", key, vid, len(blob), exc)
        return ViewState(plan)

    # ---------------------------------------------------------------- writes
    def take_dirty(self) -> tuple[list[StateWrite], InFlight]:
        """The encoded states changed since the last call, with their TTLs, and the
        handle that releases them once written (clears the dirty sets; the states stay
        pinned until :meth:`written`)."""
        writes: list[StateWrite] = []
        flight = InFlight()
        lru, pinned, grown = self._lru, self._pinned, 0
        for vid, plan in self.plans.items():
            dirty, states = self.dirty[vid], self.states[vid]
            if not dirty:
                continue
            ttl_s = max(1, plan.ttl_ms // 1000)
            ent = plan.view.entity.name
            for k in dirty:
                value = states[k].encode()
                writes.append(StateWrite(entity_key(self.prefix, ent, k), vid, value, ttl_s))
                slot = (vid, k)
                size = resident_bytes(len(value))
                grown += size - lru.get(slot, 0)
                lru[slot] = size  # an existing slot keeps its place
                pinned[slot] = pinned.get(slot, 0) + 1
                flight.slots.append((slot, size))
            dirty.clear()
        self.bytes += grown
        return writes, flight

    def written(self, flight: InFlight) -> None:
        """The store confirmed ``flight``'s write: its states may be evicted (unless
        dirty again or in another write)."""
        pinned = self._pinned
        for slot, _size in flight.slots:
            n = pinned.pop(slot)
            if n > 1:
                pinned[slot] = n - 1
        flight.slots = []

    # ---------------------------------------------------------------- bounds
    def evict(self) -> int:
        """Drop least recently used durable states until within the budget, less room
        for the next batch's loads (as much as was loaded since the last call, at most
        half the budget): the budget bounds the states in memory, a batch's own loads
        included. Returns how many went. Call between batches only (never between a
        prefetch and its apply)."""
        limit, loaded, self._loaded = self.limit_bytes, self._loaded, 0
        if limit is None:
            self._export()
            return 0
        target = limit - min(loaded, limit // 2)
        if self.bytes <= target:
            self._export()
            return 0
        over = self.bytes - target
        victims: list[Slot] = []
        freed = 0
        dirty, pinned = self.dirty, self._pinned
        for slot, size in self._lru.items():
            if slot in pinned or slot[1] in dirty[slot[0]]:
                continue
            victims.append(slot)
            freed += size
            if freed >= over:
                break
        lru, states = self._lru, self.states
        for slot in victims:
            del lru[slot]
            del states[slot[0]][slot[1]]
        self.bytes -= freed
        self.evictions += len(victims)
        self.metrics.state_cache_evictions.inc(len(victims))
        self._export()
        return len(victims)

    def _export(self) -> None:
        self.metrics.state_cache_bytes.set(self.bytes)
        self.metrics.states_cached.set(len(self._lru))

    def record(self, stats: RunStats) -> None:
        """Copy the totals and the size into the run statistics (and the gauges)."""
        stats.state_cache_hits = self.hits
        stats.state_cache_misses = self.misses
        stats.state_cache_evictions = self.evictions
        stats.state_cache_bytes = self.bytes
        stats.states_cached = len(self._lru)
        self._export()

    def __len__(self) -> int:
        return len(self._lru)

    def reset(self) -> None:
        """Forget everything, changes not written included (an online rebuild replays
        them: :mod:`streams.progress_guard`)."""
        for dirty in self.dirty.values():
            dirty.clear()
        self._pinned.clear()
        self._loaded = 0
        self.clear()

    def clear(self) -> None:
        """Forget every cached state (a revocation: another worker owns some keys now).
        Dirty sets and pins are kept: the caller flushed first."""
        for states in self.states.values():
            states.clear()
        self._lru.clear()
        self.bytes = 0
        self._export()
