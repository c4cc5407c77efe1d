"""Declarative, inert, frozen feature definitions.

A :class:`FeatureView` names an :class:`Entity` (its key), the source topics it reads,
and :class:`Feature` s, each an aggregation (:class:`Measure` or a ratio of two
measures) over one or more :class:`~feature_defs.windows.Window` s. Feature names are
derived: ``{entity}__{feature}_{window}`` (``user__clicks_1h``) and are the Redis
field, the Parquet column and the model feature name alike.

Window semantics are stated once, in :mod:`feature_defs.windows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

from feature_defs.windows import Window, WindowKind

__all__ = [
    "AggOp",
    "FeatureType",
    "Entity",
    "Source",
    "Measure",
    "Feature",
    "FeatureView",
    "feature_name",
]


class AggOp(Enum):
    """Aggregation operators; each has a mergeable per-tile state (feature_defs.measures)."""

    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    LAST = "last"
    APPROX_DISTINCT = "approx_distinct"


class FeatureType(Enum):
    INT = "int"
    FLOAT = "float"


@dataclass(frozen=True)
class Entity:
    """A keyed thing features describe: ``user`` keyed by ``user_id``.

    ``key`` is one event field, or a tuple of several (a composite key, e.g.
    ``("model_version", "publisher_id")``; its id is the parts joined by
    :data:`feature_defs.keys.SEPARATOR`, null when any part is null). A part may be a
    derived field (:data:`feature_defs.keys.DERIVED_FIELDS`, e.g. ``p_ctr_bucket``).
    """

    name: str
    key: str | tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Source:
    """A source topic of a view. ``name`` is the topic (before the deployment prefix)."""

    name: str
    kind: str  # "impression" | "click": the event kind the topic carries
    event_time: str = "ts"


@dataclass(frozen=True)
class Measure:
    """A per-tile aggregate of one source: ``Measure(COUNT, "clicks")``.

    ``field`` names the event field for SUM/MEAN/MIN/MAX/LAST (numeric) and
    APPROX_DISTINCT (any string field); COUNT takes none.
    """

    op: AggOp
    source: str
    field: str | None = None

    @property
    def key(self) -> str:
        """Stable identity used inside tile states."""
        return f"{self.op.value}:{self.source}:{self.field or ''}"


@dataclass(frozen=True)
class Feature:
    """One named aggregation over one or more windows.

    Exactly one of ``measure`` or ``ratio`` (numerator, denominator) is set. A ratio is
    null when its denominator is 0. ``default`` is the typed cold-start value served for
    an entity without data (no applied event before T, or older than the view's TTL).
    """

    name: str
    windows: tuple[Window, ...]
    measure: Measure | None = None
    ratio: tuple[Measure, Measure] | None = None
    default: float | int | None = None
    description: str = ""

    @property
    def dtype(self) -> FeatureType:
        if self.measure is not None and self.measure.op in (AggOp.COUNT, AggOp.APPROX_DISTINCT):
            return FeatureType.INT
        return FeatureType.FLOAT

    @property
    def measures(self) -> tuple[Measure, ...]:
        if self.measure is not None:
            return (self.measure,)
        return self.ratio if self.ratio is not None else ()


def feature_name(entity: str, feature: str, window: Window) -> str:
    """``{entity}__{feature}_{window}``, e.g. ``user__ctr_24h``."""
    return f"{entity}__{feature}_{window.label}"


@dataclass(frozen=True)
class FeatureView:
    """A set of features of one entity computed from one or more source topics.

    Attributes:
        name: view name (``user_activity``); with ``version`` it names the Redis field and
            the Parquet partition. A breaking change is a new version, not an edit.
        entity: the entity the view is keyed by.
        sources: source topics; every source event with a non-null key is applied.
        features: the features.
        allowed_lateness: an event with ``ts`` strictly below its source partition's
            watermark (max event time seen) minus this is late for this view: not
            applied to it. Other views of the source apply it unless it is late for
            them too; late for every view, it goes to the late topic (whole
            milliseconds; see :mod:`feature_defs.topology`).
        online_ttl: a view whose latest applied event before T is at least this old
            is served as defaults (and the Redis key expires this long after a write).
        version: integer version.
    """

    name: str
    entity: Entity
    sources: tuple[Source, ...]
    features: tuple[Feature, ...]
    allowed_lateness: timedelta = timedelta(seconds=60)
    online_ttl: timedelta | None = None
    version: int = 1
    description: str = ""
    tags: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        """``name@version``: the Redis hash field and Parquet partition of this view."""
        return f"{self.name}@{self.version}"

    @property
    def ttl(self) -> timedelta:
        """Online TTL: the declared one, else the longest window + 1 day."""
        if self.online_ttl is not None:
            return self.online_ttl
        longest = max(
            (w.length for f in self.features for w in f.windows if w.length is not None),
            default=timedelta(0),
        )
        return longest + timedelta(days=1)

    def feature_names(self) -> list[str]:
        """Every output feature name in definition order."""
        return [
            feature_name(self.entity.name, f.name, w) for f in self.features for w in f.windows
        ]

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)

    def has_lifetime(self) -> bool:
        return any(w.kind is WindowKind.LIFETIME for f in self.features for w in f.windows)
