"""Online reads: request-shape plans, one round trip for all entities, exact roll-ups.

A :class:`ReadPlan` is compiled once per request shape (entity, feature names): which
view fields to HMGET and a :class:`~serving.rollup.RollupProgram` per view for just the
outputs asked for (plus ``user__impressions_7d``, the cold-start history, for users).
The services read every entity's views with one pipelined round trip
(:class:`~serving.fetch.StoreFetch` over :meth:`OnlineStore.read_hashes`, keys from
:meth:`OnlineReader.keys`); :class:`OnlineReader` rolls each state up as of the
request time.

A state whose bytes cannot be decoded (junk written over a field, a truncated value) is
not a cold start: its row names the unreadable views in :attr:`EntityRow.corrupt`, and
the services answer that entity as their fallback row with reason ``CORRUPT_STATE``
(never ``NONE``), counted in ``headrace_serving_corrupt_states_total{view}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feature_defs.coldstart import HISTORY_FEATURE, USER_ENTITY
from feature_defs.layout import entity_key
from feature_defs.registry import Registry
from feature_defs.state import decode_fields
from headrace.core.online_store import OnlineStore
from serving.rollup import Freshness, RollupProgram

__all__ = ["ReadPlan", "EntityRow", "AsOfTooEarly", "compile_read_plan", "OnlineReader"]

log = logging.getLogger(__name__)
#: bad state bytes: StateFormatError (a ValueError), or marshal's errors (formats 1-2)
_CORRUPT = (ValueError, EOFError, TypeError)
_UNREADABLE = Freshness.UNREADABLE


class AsOfTooEarly(Exception):
    """An explicit as-of time is before an entity's latest applied event."""

    def __init__(self, index: int, max_ts: int) -> None:
        self.index = index
        self.max_ts = max_ts
        super().__init__(f"ids[{index}]: latest applied event at {max_ts}")


@dataclass(frozen=True)
class ReadPlan:
    """How to answer one request shape. Immutable; shared by concurrent requests.

    Attributes:
        entity: entity name.
        names: requested feature names, in response order.
        fields: view ids to HMGET, one per view involved.
        programs: a roll-up program per field.
        positions: per requested name, (field index, index in that program's outputs).
        history: (field index, output index) of the user's history feature, or None.
        defaults: the definitions' defaults, per requested name.
        direct: one view whose program outputs are the requested names in order.
    """

    entity: str
    names: tuple[str, ...]
    fields: tuple[str, ...]
    programs: tuple[RollupProgram, ...]
    positions: tuple[tuple[int, int], ...]
    history: tuple[int, int] | None
    defaults: tuple[Any, ...]
    direct: bool  # one view, outputs already in request order: no reordering needed


@dataclass(slots=True)
class EntityRow:
    """One entity's answer before cold start: values in request order."""

    values: list[Any]
    freshness: Freshness  # OK if any view has data; else STALE if any is stale
    history: int | None  # the user's 7-day impressions (None for other entities)
    partial: tuple[Freshness, ...] | None = None  # per value, when views disagree
    #: view ids whose stored state cannot be decoded; when any, ``values`` are the
    #: defaults and the services answer the entity as their fallback row
    corrupt: tuple[str, ...] = ()


def compile_read_plan(registry: Registry, entity: str, names: Sequence[str]) -> ReadPlan:
    """Compile the plan for ``names`` (validated: features of ``entity``)."""
    wanted: dict[str, list[str]] = {}  # view id -> output names (request order, + history)
    for name in names:
        plan, _out = registry.by_feature[name]
        wanted.setdefault(plan.view.id, [])
        if name not in wanted[plan.view.id]:
            wanted[plan.view.id].append(name)
    hist_view = None
    if entity == USER_ENTITY and HISTORY_FEATURE in registry.by_feature:
        hist_view = registry.by_feature[HISTORY_FEATURE][0].view.id
        outs = wanted.setdefault(hist_view, [])
        if HISTORY_FEATURE not in outs:
            outs.append(HISTORY_FEATURE)
    fields = tuple(wanted)
    programs = []
    index: dict[str, tuple[int, int]] = {}
    for fi, view_id in enumerate(fields):
        vplan = registry.plans[view_id]
        by_name = {o.name: i for i, o in enumerate(vplan.outputs)}
        programs.append(RollupProgram(vplan, [by_name[n] for n in wanted[view_id]]))
        for oi, n in enumerate(wanted[view_id]):
            index[n] = (fi, oi)
    positions = tuple(index[n] for n in names)
    return ReadPlan(
        entity=entity,
        names=tuple(names),
        fields=fields,
        programs=tuple(programs),
        positions=positions,
        history=index[HISTORY_FEATURE] if hist_view is not None else None,
        defaults=tuple(registry.by_feature[n][1].default for n in names),
        direct=len(fields) == 1 and all(p == (0, i) for i, p in enumerate(positions)),
    )


class OnlineReader:
    """Keys and roll-ups of entities for a :class:`ReadPlan`.

    Roll-up memo: decoding and rolling up a state costs tens of microseconds, and hot
    entities (an ad in every ranking request) are read far more often than they are
    written. The reader keeps the last answers keyed by the *exact state bytes* and
    the request shape, each with the as-of interval on which it is exact
    (:meth:`RollupProgram.validity`). A write changes the bytes, so a memoized answer
    can never be stale; an as-of outside the interval recomputes. ``memo_entries``
    bounds it (oldest out first; 0 disables it).

    Args:
        store: the online store.
        prefix: Redis key prefix.
        memo_entries: most memoized (state, request shape) answers.
    """

    def __init__(self, store: OnlineStore, prefix: str, memo_entries: int = 8192) -> None:
        self.store = store
        self.prefix = prefix
        self.memo_entries = memo_entries
        self._memo: dict[tuple[RollupProgram, bytes], tuple[int, int, list[Any], Freshness]]
        self._memo = {}

    def keys(self, entity: str, ids: Sequence[str]) -> list[str]:
        """The Redis keys of ``ids`` of ``entity``, in order (read them through
        :class:`~serving.fetch.StoreFetch`: breaker, budget and metrics)."""
        prefix = self.prefix
        return [entity_key(prefix, entity, i) for i in ids]

    def rollup(
        self,
        plan: ReadPlan,
        rows: Sequence[Sequence[bytes | None]],
        as_of_ms: int,
        explicit: bool,
    ) -> list[EntityRow]:
        """Roll every entity's states up as of ``as_of_ms``.

        When a state's latest event is after ``as_of_ms``: an ``explicit`` as-of raises
        :class:`AsOfTooEarly`; the server's own clock (not explicit) is behind the
        event times, so that entity is evaluated as of its latest event instead.

        A state that cannot be decoded gives a row whose ``corrupt`` names its view
        (``freshness`` NO_DATA, ``values`` the defaults); the others are unaffected.
        """
        out: list[EntityRow] = []
        if plan.direct:
            prog = plan.programs[0]
            vplan = prog.plan
            hist = plan.history
            for i, row in enumerate(rows):
                vals, fresh = self._run(prog, vplan, row[0], as_of_ms, explicit, i)
                if fresh is _UNREADABLE:
                    out.append(EntityRow(vals[: len(plan.names)], Freshness.NO_DATA,
                                         None if hist is None else 0, None,
                                         (vplan.view.id,)))
                    continue
                h = None if hist is None else (vals[hist[1]] if fresh is Freshness.OK else 0)
                if len(vals) != len(plan.names):
                    vals = vals[: len(plan.names)]
                out.append(EntityRow(vals, fresh, h))
            return out
        for i, row in enumerate(rows):
            results = [
                self._run(prog, prog.plan, blob, as_of_ms, explicit, i)
                for prog, blob in zip(plan.programs, row, strict=True)
            ]
            vals = [results[f][0][o] for f, o in plan.positions]
            freshes = [r[1] for r in results]
            if _UNREADABLE in freshes:
                corrupt = tuple(p.plan.view.id for p, f in zip(plan.programs, freshes,
                                                                strict=True)
                                if f is _UNREADABLE)
                out.append(EntityRow(vals, Freshness.NO_DATA,
                                     None if plan.history is None else 0, None, corrupt))
                continue
            fresh = min(freshes)  # OK < NO_DATA < STALE
            if fresh is not Freshness.OK and Freshness.STALE in freshes:
                fresh = Freshness.STALE
            partial = None
            if fresh is Freshness.OK and any(f is not Freshness.OK for f in freshes):
                partial = tuple(freshes[f] for f, _o in plan.positions)
            h = None
            if plan.history is not None:
                f, o = plan.history
                h = results[f][0][o] if results[f][1] is Freshness.OK else 0
            out.append(EntityRow(vals, fresh, h, partial))
        return out

    def _run(
        self,
        prog: RollupProgram,
        vplan: Any,
        blob: bytes | None,
        as_of_ms: int,
        explicit: bool,
        index: int,
    ) -> tuple[list[Any], Freshness]:
        """One state's values (a list the caller must not mutate) and freshness."""
        if blob is None:
            return list(prog.defaults), Freshness.NO_DATA
        memo = self._memo if self.memo_entries else None
        if memo is not None:
            key = (prog, blob)
            hit = memo.get(key)
            if hit is not None and hit[0] <= as_of_ms < hit[1]:
                return hit[2], hit[3]
        try:
            max_ts, prev_ts, pending, rings, _fences = decode_fields(vplan, blob)
        except _CORRUPT as exc:
            log.warning("unreadable state of %s for ids[%d]: %s", vplan.view.id, index, exc)
            return list(prog.defaults), _UNREADABLE
        if max_ts > as_of_ms:
            if explicit:
                raise AsOfTooEarly(index, max_ts)
            as_of_ms = max_ts
        vals, fresh = prog.run_fields(max_ts, prev_ts, pending, rings, as_of_ms)
        if memo is not None:
            bounds = prog.validity_at(max_ts, as_of_ms, fresh)
            if bounds is not None:
                if len(memo) >= self.memo_entries:
                    with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                        del memo[next(iter(memo))]  # a racing thread may beat us to it
                memo[key] = (bounds[0], bounds[1], vals, fresh)
        return vals, fresh
