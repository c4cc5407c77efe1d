"""How events flow through a deployment's views, compiled once from its definitions.

Source events are partitioned by the contract's routing key (``user_id``,
:data:`feature_defs.contract.ROUTING_KEY`). A view whose entity is keyed by it is
*local*: it is applied where the source partition is consumed. Every other entity is
*repartitioned*: its rows are re-keyed to ``headrace-repartition-{entity}`` and applied by
whoever consumes that topic's partition. The stream engine, ``headrace apply``,
``headrace lag`` and the benchmarks read this one object (``Registry.topology``) instead
of deriving it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from feature_defs.contract import FIELD_TYPES, ROUTING_KEYS, EventKind
from feature_defs.model import AggOp
from feature_defs.plan import ViewPlan

__all__ = ["Topology", "compile_topology"]


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
        entity_keys: Entity -> its key field.
        lateness_ms: Source -> the largest allowed lateness (ms) of the views it feeds.
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
    entity_keys: Mapping[str, str]
    lateness_ms: Mapping[str, int]
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
    lateness = {
        s: max(int(p.view.allowed_lateness.total_seconds() * 1000)
               for p in plans.values() if s in p.feeds)
        for s in kinds
    }
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
        feed_fields=MappingProxyType(feed_fields),
        view_fields=MappingProxyType(view_fields),
        last_views=frozenset(vid for vid, p in plans.items()
                             if any(m.op is AggOp.LAST for m in p.measures)),
    )
