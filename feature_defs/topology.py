"""How events flow through a deployment's views, compiled once from its definitions.

Source events are partitioned by the contract's routing key (``user_id``,
:data:`feature_defs.contract.ROUTING_KEY`). A view whose entity is keyed by it is
*local*: it is applied where the source partition is consumed. Every other entity is
*repartitioned*: its rows are re-keyed to ``headrace-repartition-{entity}`` and applied by
whoever consumes that topic's partition. The stream engine, ``headrace apply``,
``headrace lag`` and the benchmarks read this one object (``Registry.topology``) instead
of deriving it again.

Fences. A view state keeps one replay fence per (source, source partition); its key is
``fence_key(i, partition)`` where ``i`` is the source's index in *that view's own*
``sources`` (:meth:`Topology.fence_source`). A source the view does not read has no
fence index: asking for one raises :class:`UnknownSourceError`, and rows of such a source
are never applied to the view (nor forwarded to an entity none of whose views read it,
:attr:`Topology.forward_sources`).

Lateness, per view. Per source (topic, partition) the watermark is the max event time
seen; an event whose ``ts`` is strictly below ``watermark - L`` on arrival is late for a
view of allowed lateness ``L``: not applied to that view (its state and its
``views/`` rows), while every view for which it is not late applies it. An event late
for *every* view reading its source (``ts < watermark - max L``, :attr:`Topology.
lateness_ms`) is published to the late topic, counted as late, and kept out of the
offline ``events/``; every other accepted event is in ``events/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from feature_defs.contract import FIELD_TYPES, ROUTING_KEYS, EventKind
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan
from feature_defs.windows import to_ms
from headrace.core.errors import HeadraceError

__all__ = ["Topology", "compile_topology", "UnknownSourceError"]


class UnknownSourceError(HeadraceError):
    """A row names a source that the view it would be applied to does not read.

    Raised instead of filing the row under some other source's fence (which would drop
    real events of that source as replays). ``view`` is the view id, ``source`` the name.
    """

    def __init__(self, view: str, source: str) -> None:
        self.view = view
        self.source = source
        super().__init__(f"view {view} does not read source {source!r}: no fence for it")


@dataclass(frozen=True)
class Topology:
    """The compiled topology of a set of views (built by :func:`compile_topology`).

    Attributes:
        routing_key: The event field every source topic is partitioned by.
        source_kinds: Source topic name (before the deployment prefix) -> the event kind
            it carries, in the order sources first appear in the definitions.
        routing_keys: Source topic name -> its kind's routing key (all equal to
            ``routing_key``).
        field_types: Per kind carried by a source: field -> type code (the contract's).
        local_views: Ids of the views keyed by the routing key, in definition order.
        repartitioned: Entity -> ids of its views, for every entity *not* keyed by the
            routing key, in definition order (these get a repartition topic).
        entity_keys: Entity -> its key field (a tuple for a composite key,
            :mod:`feature_defs.keys`).
        lateness_ms: Source -> the largest allowed lateness (ms) of the views it feeds: an
            event further behind the watermark is late for every one of them (the late
            topic, the ``late`` counter, the watermark metric).
        view_lateness_ms: View id -> its own allowed lateness (ms).
        mixed_lateness: Sources whose views do not all allow the same lateness (their
            accepted rows carry how far behind the watermark they arrived, so each view
            can drop what is late for it).
        source_index: View id -> source -> the source's index in the view's
            ``sources`` (the source part of its fence keys).
        forward_sources: Repartitioned entity -> the sources its views read (only their
            rows are forwarded to it).
        feed_fields: (view id, source) -> the event fields that source's measures of the
            view read, sorted (absent pairs read none).
        view_fields: View id -> every event field its measures read, sorted.
        last_views: Ids of the views with a LAST measure (they need the event id, the
            LAST tie-break, :func:`feature_defs.measures.last_tiebreaks`).
    """

    routing_key: str
    source_kinds: Mapping[str, EventKind]
    routing_keys: Mapping[str, str]
    field_types: Mapping[EventKind, Mapping[str, str]]
    local_views: tuple[str, ...]
    repartitioned: Mapping[str, tuple[str, ...]]
    entity_keys: Mapping[str, str | tuple[str, ...]]
    lateness_ms: Mapping[str, int]
    view_lateness_ms: Mapping[str, int]
    mixed_lateness: frozenset[str]
    source_index: Mapping[str, Mapping[str, int]]
    forward_sources: Mapping[str, frozenset[str]]
    feed_fields: Mapping[tuple[str, str], tuple[str, ...]]
    view_fields: Mapping[str, tuple[str, ...]]
    last_views: frozenset[str]

    @property
    def sources(self) -> tuple[str, ...]:
        """Source topic names (before the prefix), in definition order."""
        return tuple(self.source_kinds)

    @property
    def repartitioned_entities(self) -> tuple[str, ...]:
        """Entities applied from a repartition topic, in definition order."""
        return tuple(self.repartitioned)

    def is_local(self, view_id: str) -> bool:
        """Whether view ``view_id`` is applied where its source events are consumed."""
        return view_id in self.local_views

    def fence_source(self, view_id: str, source: str) -> int:
        """The index of ``source`` in view ``view_id``'s sources (its fence keys' source part).

        Raises:
            UnknownSourceError: the view does not read ``source`` (or is unknown).
        """
        try:
            return self.source_index[view_id][source]
        except KeyError:
            raise UnknownSourceError(view_id, source) from None

    def fields_of(self, view_id: str, source: str) -> tuple[str, ...]:
        """Event fields the measures of ``view_id`` fed by ``source`` read (sorted)."""
        return self.feed_fields.get((view_id, source), ())


def compile_topology(plans: Mapping[str, ViewPlan]) -> Topology:
    """Compile the topology of validated ``plans`` (view id -> plan, definition order).

    Raises:
        ValueError: the sources' kinds have different routing keys (the engine applies
            every source's local views by one key), or a source is declared with two
            kinds (the validator reports both first).
    """
    kinds: dict[str, EventKind] = {}
    for plan in plans.values():
        for src in plan.view.sources:
            kind = kinds.setdefault(src.name, src.kind)  # type: ignore[arg-type]
            if kind != src.kind:
                raise ValueError(f"source {src.name} is declared as {kind} and {src.kind}")
    routing = {s: ROUTING_KEYS[k] for s, k in kinds.items()}
    keys = set(routing.values())
    if len(keys) > 1:
        raise ValueError(f"sources are routed by different keys: {routing}")
    routing_key = keys.pop() if keys else next(iter(ROUTING_KEYS.values()))
    remote: dict[str, list[str]] = {}
    local: list[str] = []
    for vid, p in plans.items():
        if p.view.entity.key == routing_key:
            local.append(vid)
        else:
            remote.setdefault(p.view.entity.name, []).append(vid)
    feed_fields: dict[tuple[str, str], tuple[str, ...]] = {}
    view_fields: dict[str, tuple[str, ...]] = {}
    for vid, p in plans.items():
        for s, feeds in p.feeds.items():
            fields = tuple(sorted({f for _slot, _op, f in feeds if f}))
            if fields:
                feed_fields[(vid, s)] = fields
        view_fields[vid] = tuple(sorted({f for s in p.feeds
                                         for f in feed_fields.get((vid, s), ())}))
    view_lateness = {vid: to_ms(p.view.allowed_lateness) for vid, p in plans.items()}
    per_source = {s: {view_lateness[vid] for vid, p in plans.items() if s in p.feeds}
                  for s in kinds}
    lateness = {s: max(v) for s, v in per_source.items()}
    return Topology(
        routing_key=routing_key,
        source_kinds=MappingProxyType(kinds),
        routing_keys=MappingProxyType(routing),
        field_types=MappingProxyType({k: FIELD_TYPES[k] for k in dict.fromkeys(kinds.values())
                                      if k in FIELD_TYPES}),
        local_views=tuple(local),
        repartitioned=MappingProxyType({e: tuple(v) for e, v in remote.items()}),
        entity_keys=MappingProxyType({p.view.entity.name: p.view.entity.key
                                      for p in plans.values()}),
        lateness_ms=MappingProxyType(lateness),
        view_lateness_ms=MappingProxyType(view_lateness),
        mixed_lateness=frozenset(s for s, v in per_source.items() if len(v) > 1),
        source_index=MappingProxyType({
            vid: MappingProxyType({s.name: n for n, s in enumerate(p.view.sources)})
            for vid, p in plans.items()}),
        forward_sources=MappingProxyType({
            e: frozenset(s for v in vids for s in plans[v].feeds) for e, vids in remote.items()}),
        feed_fields=MappingProxyType(feed_fields),
        view_fields=MappingProxyType(view_fields),
        last_views=frozenset(vid for vid, p in plans.items()
                             if any(m.op is AggOp.LAST for m in p.measures)),
    )
