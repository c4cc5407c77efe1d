"""Brute-force oracle of ANY feature view described as plain data (the generic oracle).

:mod:`tests.oracle` recomputes the shipped views; this module recomputes any view whose
spec is written by hand as the frozen dataclasses below (:class:`View`,
:class:`Feature`, :class:`Measure`, :class:`Window`). Like :mod:`tests.oracle` it
imports no project package: it is written from the rule as the README and the
``feature_defs`` docstrings state it, with list comprehensions over the raw events.

The rule, as specified
----------------------
* Windows, as of ``T`` (epoch ms): sliding ``W``/``r`` holds the entity's applied
  events with ``ts < T`` and ``ts // r >= T // r - W // r + 1``; tumbling is ``r = W``;
  lifetime holds every applied event with ``ts < T``.
* Operators over the events of the measure's source type in the window; an event whose
  field is null or missing contributes nothing, except to COUNT (which has no field):

  ==================  ==========================================  ============
  op                  value                                       empty window
  ==================  ==========================================  ============
  ``count``           number of events (int)                      0
  ``sum``             sum of the values (float, exactly rounded)  0.0
  ``mean``            sum / number of non-null values             None
  ``min`` / ``max``   float                                       None
  ``last``            value of the greatest ``(ts, tiebreak)``,   None
                      tiebreak ``xxh64(event_id) >> 1``
  ``approx_distinct`` KMV estimate over ``str(value)`` (K = 512)  0
  ratio ``a / b``     null when ``b`` is 0 or null, or ``a`` null  None
  ==================  ==========================================  ============

* Defaults: every feature of the view takes its default (the spec's ``default``, else
  the empty-window value above) when the entity has no applied event with ``ts < T`` or
  ``T - latest >= TTL``; TTL is the declared one, else the longest window length + 1 day
  (lifetime windows have no length: a view with only lifetime windows has TTL 1 day).
* Lateness, per view: per (topic, partition), an arrival is late for a view when its
  ``ts`` is strictly below (max ts seen so far in that topic partition) − the view's
  allowed lateness. Partition = ``xxh64(user_id, else event_id) % partitions``.
* A view applies the accepted events of the source types it reads whose key field is
  not null.

Events are dicts as in :mod:`tests.oracle` (``type`` "impression" | "click", ``ts``,
``event_id`` and the contract fields, ``bid_cpm`` on impressions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from tests.oracle import DAY, HOUR, MINUTE, SECOND, TOPIC_OF, accepted_events, kmv_distinct

__all__ = [
    "OPS",
    "EMPTY",
    "UNSET",
    "Window",
    "sliding",
    "tumbling",
    "LIFETIME",
    "Measure",
    "Feature",
    "feature",
    "ratio",
    "View",
    "STANDARD_VIEWS",
    "in_window",
    "tiebreak",
    "measure_value",
    "applied_events",
    "ViewOracle",
]

#: op -> value of an empty window
EMPTY: dict[str, Any] = {"count": 0, "sum": 0.0, "mean": None, "min": None, "max": None,
                         "last": None, "approx_distinct": 0}
OPS = tuple(EMPTY)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: a feature without a declared default: the empty-window value is its default
UNSET: Any = _Unset()


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class Window:
    """``kind`` "sliding" (length and resolution), "tumbling" (length) or "lifetime"."""

    kind: str
    length_ms: int | None = None
    res_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "sliding":
            assert self.length_ms and self.res_ms and self.length_ms % self.res_ms == 0, self
        elif self.kind == "tumbling":
            assert self.length_ms and self.res_ms is None, self
        else:
            assert self.kind == "lifetime" and self.length_ms is self.res_ms is None, self


def sliding(length_ms: int, res_ms: int) -> Window:
    return Window("sliding", length_ms, res_ms)


def tumbling(length_ms: int) -> Window:
    return Window("tumbling", length_ms)


LIFETIME = Window("lifetime")


@dataclass(frozen=True)
class Measure:
    """``op`` over the events of type ``source``; ``field`` for every op but count."""

    op: str
    source: str
    field: str | None = None

    def __post_init__(self) -> None:
        assert self.op in OPS, self
        assert self.source in TOPIC_OF, self
        assert (self.field is None) == (self.op == "count"), self


@dataclass(frozen=True)
class Feature:
    """One output: its full name (``ad__bid_sum_1h``), one window, a measure or a ratio."""

    name: str
    window: Window
    measure: Measure | None = None
    ratio: tuple[Measure, Measure] | None = None
    default: Any = UNSET

    def __post_init__(self) -> None:
        assert (self.measure is None) != (self.ratio is None), self

    @property
    def measures(self) -> tuple[Measure, ...]:
        return (self.measure,) if self.measure is not None else self.ratio or ()

    @property
    def default_value(self) -> Any:
        if self.default is not UNSET:
            return self.default
        return EMPTY[self.measure.op] if self.measure is not None else None


def feature(name: str, op: str, source: str, field: str | None, window: Window,
            default: Any = UNSET) -> Feature:
    """A measure feature: ``feature("ad__bid_sum_1h", "sum", "impression", "bid_cpm", w)``."""
    return Feature(name, window, measure=Measure(op, source, field), default=default)


def ratio(name: str, num: Measure, den: Measure, window: Window,
          default: Any = UNSET) -> Feature:
    """A ratio feature ``num / den`` over one window."""
    return Feature(name, window, ratio=(num, den), default=default)


@dataclass(frozen=True)
class View:
    """A view: entity key field, event types read, features, lateness, declared TTL."""

    name: str
    key: str
    sources: tuple[str, ...]
    features: tuple[Feature, ...]
    lateness_ms: int = 60 * SECOND
    ttl_ms: int | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        assert len(set(names)) == len(names), names
        for f in self.features:
            for m in f.measures:
                assert m.source in self.sources, (self.name, f.name, m.source)

    @property
    def effective_ttl_ms(self) -> int:
        """The declared TTL, else the longest window length + 1 day."""
        if self.ttl_ms is not None:
            return self.ttl_ms
        return max((f.window.length_ms or 0 for f in self.features), default=0) + DAY

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default_value for f in self.features}


# --------------------------------------------------------------------------- the shipped set
def _standard(entity: str, key: str, counts: tuple[str, ...], ctrs: tuple[str, ...],
              distinct: tuple[str, ...] = ()) -> View:
    w = {"5m": sliding(5 * MINUTE, 5 * SECOND), "1h": sliding(HOUR, MINUTE),
         "24h": sliding(24 * HOUR, 15 * MINUTE), "7d": sliding(7 * DAY, HOUR)}
    imps, clicks = Measure("count", "impression"), Measure("count", "click")
    feats = [feature(f"{entity}__impressions_{x}", "count", "impression", None, w[x], 0)
             for x in counts]
    feats += [feature(f"{entity}__clicks_{x}", "count", "click", None, w[x], 0) for x in counts]
    feats += [ratio(f"{entity}__ctr_{x}", clicks, imps, w[x]) for x in ctrs]
    feats += [feature(f"{entity}__distinct_ads_{x}", "approx_distinct", "impression", "ad_id",
                      w[x], 0) for x in distinct]
    return View(f"{entity}_activity", key, ("impression", "click"), tuple(feats))


#: the shipped views (README "Feature definitions"), as specs
STANDARD_VIEWS = (
    _standard("user", "user_id", ("5m", "1h", "24h", "7d"), ("1h", "24h", "7d"), ("24h",)),
    _standard("ad", "ad_id", ("1h", "24h"), ("1h", "24h")),
    _standard("campaign", "campaign_id", (), ("24h",)),
    _standard("publisher", "publisher_id", (), ("24h",)),
)


# --------------------------------------------------------------------------- the rule
def in_window(ts: int, as_of: int, window: Window) -> bool:
    """The window rule for one event time."""
    if ts >= as_of:
        return False
    if window.kind == "lifetime":
        return True
    length = window.length_ms
    assert length is not None
    res = window.res_ms if window.kind == "sliding" else length
    assert res is not None
    return ts // res >= as_of // res - length // res + 1


def tiebreak(event_id: str) -> int:
    """LAST's tie-break between events at the same ts: ``xxh64(event_id) >> 1``."""
    return xxhash.xxh64_intdigest(event_id.encode("utf-8")) >> 1


def measure_value(m: Measure, events: Iterable[dict[str, Any]], as_of: int,
                  window: Window) -> Any:
    """The value of one measure over the (one entity's applied) ``events`` as of ``as_of``."""
    evs = [e for e in events if e["type"] == m.source and in_window(e["ts"], as_of, window)]
    if m.op == "count":
        return len(evs)
    assert m.field is not None
    has = [e for e in evs if e.get(m.field) is not None]
    if m.op == "approx_distinct":
        return kmv_distinct(str(e[m.field]) for e in has)
    if m.op == "sum":
        return math.fsum(float(e[m.field]) for e in has)
    if not has:
        return None
    values = [float(e[m.field]) for e in has]
    if m.op == "mean":
        return math.fsum(values) / len(values)
    if m.op == "min":
        return min(values)
    if m.op == "max":
        return max(values)
    assert m.op == "last"
    return float(max(has, key=lambda e: (e["ts"], tiebreak(e["event_id"])))[m.field])


def _value(f: Feature, events: Sequence[dict[str, Any]], as_of: int) -> Any:
    if f.measure is not None:
        return measure_value(f.measure, events, as_of, f.window)
    assert f.ratio is not None
    num = measure_value(f.ratio[0], events, as_of, f.window)
    den = measure_value(f.ratio[1], events, as_of, f.window)
    return None if num is None or den is None or den == 0 else num / den


def applied_events(events_in_arrival_order: Iterable[dict[str, Any]], view: View,
                   partitions: int) -> list[dict[str, Any]]:
    """The events ``view`` applies, in arrival order: accepted under the view's own allowed
    lateness (the watermark of each topic partition moves with every event of the topic,
    whatever its key), of a source type the view reads, with a non-null key."""
    accepted, _late = accepted_events(events_in_arrival_order, partitions, view.lateness_ms)
    return [e for e in accepted if e["type"] in view.sources and e.get(view.key) is not None]


class ViewOracle:
    """The applied events of one view grouped by entity id, and the brute force per probe.

    Args:
        view: the spec.
        applied: the events the view applies (see :func:`applied_events`), any order;
            events of other types or with a null key are ignored.
    """

    def __init__(self, view: View, applied: Iterable[dict[str, Any]]) -> None:
        self.view = view
        self._by: dict[str, list[dict[str, Any]]] = {}
        for e in applied:
            if e["type"] in view.sources and e.get(view.key) is not None:
                self._by.setdefault(e[view.key], []).append(e)

    def events_of(self, entity_id: str) -> list[dict[str, Any]]:
        return self._by.get(entity_id, [])

    def ids(self) -> list[str]:
        """Every entity id with at least one applied event, sorted."""
        return sorted(self._by)

    def latest(self, entity_id: str) -> int | None:
        """Latest applied event time of the entity (None when it has none)."""
        evs = self.events_of(entity_id)
        return max(e["ts"] for e in evs) if evs else None

    def latest_before(self, entity_id: str, as_of: int) -> int | None:
        """Latest applied event time strictly before ``as_of`` (None if none)."""
        before = [e["ts"] for e in self.events_of(entity_id) if e["ts"] < as_of]
        return max(before) if before else None

    def is_default(self, entity_id: str, as_of: int) -> bool:
        """No applied event before ``as_of``, or the latest one at least the TTL old."""
        last = self.latest_before(entity_id, as_of)
        return last is None or as_of - last >= self.view.effective_ttl_ms

    def features_as_of(self, entity_id: str, as_of: int) -> dict[str, Any]:
        """Every feature of the view as of ``as_of`` (epoch ms), by name, in spec order."""
        if self.is_default(entity_id, as_of):
            return self.view.defaults()
        evs = self.events_of(entity_id)
        return {f.name: _value(f, evs, as_of) for f in self.view.features}
