"""Compiled form of a :class:`FeatureView`: which tiles (rings) to keep and how to roll up.

A *ring* holds the tiles of one resolution for the measures that need it, keeping the
``keep`` most recent tiles relative to the entity's latest event (older tiles cannot
fall inside any window evaluated at or after that event). Lifetime windows use a ring
with tile size 0 and a single tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from feature_defs.model import AggOp, Feature, FeatureView, Measure, feature_name
from feature_defs.windows import Window

__all__ = ["RingPlan", "OutputPlan", "ViewPlan", "compile_view"]


@dataclass(frozen=True)
class RingPlan:
    tile_ms: int  # 0 = lifetime
    keep: int  # tiles kept behind (and including) the latest event's tile
    slots: tuple[int, ...]  # measure slots (indices into ViewPlan.measures) this ring holds
    counts: tuple[int, ...] = ()  # the COUNT slots among them (prefix-summed in the state)
    others: tuple[int, ...] = ()  # the other slots (one state per tile)

    def horizon(self, latest: Any) -> Any:
        """The oldest tile a window as of any ``T >= latest`` can still reach (tiles below
        it can be dropped); ``latest`` an int or a numpy array of them. Tiled rings only
        (``tile_ms > 0``)."""
        return latest // self.tile_ms - self.keep + 1


@dataclass(frozen=True)
class OutputPlan:
    """One output feature: a measure or ratio over one window, read from one ring."""

    name: str
    window: Window
    ring: int
    slots: tuple[int, ...]  # one slot (measure) or two (numerator, denominator)
    ops: tuple[AggOp, ...]
    is_ratio: bool
    default: float | int | None


@dataclass(frozen=True)
class ViewPlan:
    view: FeatureView
    measures: tuple[Measure, ...]
    rings: tuple[RingPlan, ...]
    outputs: tuple[OutputPlan, ...]
    #: per source name: (slot, op, field) of the measures that source feeds
    feeds: dict[str, tuple[tuple[int, AggOp, str | None], ...]]
    ttl_ms: int
    #: per non-COUNT slot: (ring index, position in that ring's ``others``) of every ring
    #: holding it
    others_at: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.outputs]


def _measure_slots(features: tuple[Feature, ...]) -> dict[Measure, int]:
    slots: dict[Measure, int] = {}
    for feat in features:
        for m in feat.measures:
            slots.setdefault(m, len(slots))
    return slots


def compile_view(view: FeatureView) -> ViewPlan:
    """Compile a (validated) view into its ring layout and output plan."""
    slots = _measure_slots(view.features)
    ring_slots: dict[int, set[int]] = {}
    ring_keep: dict[int, int] = {}
    for feat in view.features:
        for w in feat.windows:
            tile = w.tile_ms
            ring_slots.setdefault(tile, set()).update(slots[m] for m in feat.measures)
            ring_keep[tile] = max(ring_keep.get(tile, 1), w.n_tiles)
    tiles = sorted(ring_slots)
    ops = {slot: m.op for m, slot in slots.items()}
    rings = tuple(
        RingPlan(t, ring_keep[t], tuple(sorted(ring_slots[t])),
                 tuple(s for s in sorted(ring_slots[t]) if ops[s] is AggOp.COUNT),
                 tuple(s for s in sorted(ring_slots[t]) if ops[s] is not AggOp.COUNT))
        for t in tiles
    )
    ring_index = {t: i for i, t in enumerate(tiles)}
    outputs = []
    for feat in view.features:
        for w in feat.windows:
            ms = feat.measures
            outputs.append(
                OutputPlan(
                    name=feature_name(view.entity.name, feat.name, w),
                    window=w,
                    ring=ring_index[w.tile_ms],
                    slots=tuple(slots[m] for m in ms),
                    ops=tuple(m.op for m in ms),
                    is_ratio=feat.ratio is not None,
                    default=feat.default,
                )
            )
    feeds: dict[str, list[tuple[int, AggOp, str | None]]] = {s.name: [] for s in view.sources}
    for m, slot in slots.items():
        feeds.setdefault(m.source, []).append((slot, m.op, m.field))
    ttl = view.ttl
    ttl_ms = (ttl.days * 86_400 + ttl.seconds) * 1000 + ttl.microseconds // 1000
    others_at = {slot: tuple((ri, rp.others.index(slot)) for ri, rp in enumerate(rings)
                             if slot in rp.others)
                 for slot in slots.values() if any(slot in rp.others for rp in rings)}
    return ViewPlan(
        view=view,
        measures=tuple(slots),
        rings=rings,
        outputs=tuple(outputs),
        feeds={k: tuple(v) for k, v in feeds.items()},
        ttl_ms=ttl_ms,
        others_at=others_at,
    )
