"""Brute-force oracle of the standard Headrace features: the project's correctness reference.

Written from the *rule*, not from ``feature_defs`` (nothing here imports a project
package), with the plainest code that can be checked by eye: list comprehensions over
the raw events, integer floor division, the KMV estimate from the sorted hashes.

The rule, as specified
----------------------
* A sliding window of length ``W`` with resolution ``r``, as of ``T`` (epoch ms),
  holds the entity's applied events with ``ts < T`` and
  ``floor(ts / r) >= floor(T / r) - W / r + 1``.
* Counts (and the distinct count) default to 0, ratios to null; a ratio is null when
  its denominator is 0.
* A view's features are all defaults (``is_default``) when the entity has no applied
  event with ``ts < T``, or when ``T - (latest applied ts < T) >= TTL`` with TTL the
  view's longest window + 1 day.
* ``distinct_ads_24h``: distinct ``ad_id`` of impressions in the window; exact below 512
  distinct values, else ``(512 - 1) / ((h_512 + 1) / 2**64)`` (rounded to the nearest
  integer) with ``h_512`` the 512th smallest distinct xxh64 of the UTF-8 value.
* Lateness: per (topic, partition), ``watermark = max ts seen so far - lateness``; an
  event with ``ts < watermark`` at its arrival is late and applied to no view. Events
  are routed to ``xxh64(user_id, else event_id) % partitions``.
* A null ``user_id`` (anonymous) applies to the ad, campaign and publisher views only.

Events are dicts with ``type`` ("impression" | "click"), ``ts`` (int epoch ms) and the
contract fields (``event_id``, ``user_id``, ``ad_id``, ``campaign_id``, ``publisher_id``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import xxhash

__all__ = [
    "ENTITY_KEYS",
    "TOPIC_OF",
    "TTL_MS",
    "KMV_K",
    "feature_names",
    "defaults",
    "partition_of",
    "accepted_events",
    "in_window",
    "kmv_distinct",
    "latest_before",
    "is_default",
    "features_as_of",
    "OracleIndex",
]

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

#: entity name -> the event field that keys it
ENTITY_KEYS = {"user": "user_id", "ad": "ad_id", "campaign": "campaign_id",
               "publisher": "publisher_id"}
#: event type -> its topic
TOPIC_OF = {"impression": "impressions", "click": "clicks"}

#: window label -> (length ms, resolution ms)
WINDOWS = {
    "5m": (5 * MINUTE, 5 * SECOND),
    "1h": (HOUR, MINUTE),
    "24h": (24 * HOUR, 15 * MINUTE),
    "7d": (7 * DAY, HOUR),
}

#: entity -> (count windows, ctr windows, distinct-ads windows)
_SPEC = {
    "user": (("5m", "1h", "24h", "7d"), ("1h", "24h", "7d"), ("24h",)),
    "ad": (("1h", "24h"), ("1h", "24h"), ()),
    "campaign": ((), ("24h",), ()),
    "publisher": ((), ("24h",), ()),
}

#: entity -> online TTL in ms (longest window + 1 day)
TTL_MS = {
    entity: max(WINDOWS[w][0] for group in spec for w in group) + DAY
    for entity, spec in _SPEC.items()
}

KMV_K = 512


def feature_names(entity: str) -> list[str]:
    """Every standard feature name of ``entity``."""
    counts, ctrs, distinct = _SPEC[entity]
    names = [f"{entity}__impressions_{w}" for w in counts]
    names += [f"{entity}__clicks_{w}" for w in counts]
    names += [f"{entity}__ctr_{w}" for w in ctrs]
    names += [f"{entity}__distinct_ads_{w}" for w in distinct]
    return names


def defaults(entity: str) -> dict[str, Any]:
    """The cold-start values: 0 for counts and distinct counts, None for ratios."""
    return {n: (None if "__ctr_" in n else 0) for n in feature_names(entity)}


# --------------------------------------------------------------------------- lateness
def partition_of(event: dict[str, Any], partitions: int) -> int:
    """Partition of an event: xxh64 of the UTF-8 user_id (else event_id) mod ``partitions``."""
    key = event["user_id"] if event.get("user_id") is not None else event["event_id"]
    return xxhash.xxh64_intdigest(key.encode("utf-8")) % partitions


def accepted_events(
    events_in_arrival_order: Iterable[dict[str, Any]],
    partitions: int,
    lateness_ms: int = 60_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split events (in arrival order) into (accepted, late), both in arrival order.

    Per (topic, partition): an event is late when its ts is strictly below the largest
    ts seen before it in that partition minus ``lateness_ms``.
    """
    accepted: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    max_seen: dict[tuple[str, int], int] = {}
    for event in events_in_arrival_order:
        where = (TOPIC_OF[event["type"]], partition_of(event, partitions))
        ts = event["ts"]
        if where in max_seen and ts < max_seen[where] - lateness_ms:
            late.append(event)
            continue
        accepted.append(event)
        max_seen[where] = max(max_seen.get(where, ts), ts)
    return accepted, late


# --------------------------------------------------------------------------- windows
def in_window(ts: int, as_of: int, label: str) -> bool:
    """The window rule for one event time."""
    length, res = WINDOWS[label]
    return ts < as_of and ts // res >= as_of // res - length // res + 1


def kmv_distinct(values: Iterable[str]) -> int:
    """Distinct count, exact below 512 values, else the KMV estimate (exact arithmetic)."""
    hashes = sorted({xxhash.xxh64_intdigest(v.encode("utf-8")) for v in set(values)})
    if len(hashes) < KMV_K:
        return len(hashes)
    return round(Fraction((KMV_K - 1) * 2**64, hashes[KMV_K - 1] + 1))


# --------------------------------------------------------------------------- features
def _events_of(accepted: Sequence[dict[str, Any]] | OracleIndex, entity: str,
               entity_id: str) -> list[dict[str, Any]]:
    if isinstance(accepted, OracleIndex):
        return accepted.events_of(entity, entity_id)
    key = ENTITY_KEYS[entity]
    return [e for e in accepted if e.get(key) is not None and e[key] == entity_id]


def latest_before(accepted: Sequence[dict[str, Any]] | OracleIndex, entity: str,
                  entity_id: str, as_of: int) -> int | None:
    """Latest applied event time of the entity strictly before ``as_of`` (None if none)."""
    before = [e["ts"] for e in _events_of(accepted, entity, entity_id) if e["ts"] < as_of]
    return max(before) if before else None


def is_default(accepted: Sequence[dict[str, Any]] | OracleIndex, entity: str,
               entity_id: str, as_of: int) -> bool:
    """True when the entity's features as of ``as_of`` are all defaults."""
    last = latest_before(accepted, entity, entity_id, as_of)
    return last is None or as_of - last >= TTL_MS[entity]


def features_as_of(accepted: Sequence[dict[str, Any]] | OracleIndex, entity: str,
                   entity_id: str, as_of: int) -> dict[str, Any]:
    """Every standard feature of one entity as of ``as_of`` (epoch ms), by name.

    ``accepted`` is the list of applied events (any order) or an :class:`OracleIndex`
    of it (same answers, faster for many probes).
    """
    if is_default(accepted, entity, entity_id, as_of):
        return defaults(entity)
    evs = _events_of(accepted, entity, entity_id)
    imps = [e for e in evs if e["type"] == "impression"]
    clicks = [e for e in evs if e["type"] == "click"]
    counts, ctrs, distinct = _SPEC[entity]
    out: dict[str, Any] = {}
    for w in counts:
        out[f"{entity}__impressions_{w}"] = sum(1 for e in imps if in_window(e["ts"], as_of, w))
        out[f"{entity}__clicks_{w}"] = sum(1 for e in clicks if in_window(e["ts"], as_of, w))
    for w in ctrs:
        n_imps = sum(1 for e in imps if in_window(e["ts"], as_of, w))
        n_clicks = sum(1 for e in clicks if in_window(e["ts"], as_of, w))
        out[f"{entity}__ctr_{w}"] = n_clicks / n_imps if n_imps else None
    for w in distinct:
        out[f"{entity}__distinct_ads_{w}"] = kmv_distinct(
            e["ad_id"] for e in imps if in_window(e["ts"], as_of, w)
        )
    return out


class OracleIndex:
    """The accepted events grouped by (entity, id): the same brute force, per entity.

    Grouping only narrows which events a probe scans; every answer is still computed by
    :func:`features_as_of` over the entity's full list of events.
    """

    def __init__(self, accepted: Iterable[dict[str, Any]]) -> None:
        self._by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for e in accepted:
            for entity, key in ENTITY_KEYS.items():
                if e.get(key) is not None:
                    self._by.setdefault((entity, e[key]), []).append(e)

    def events_of(self, entity: str, entity_id: str) -> list[dict[str, Any]]:
        return self._by.get((entity, entity_id), [])

    def ids(self, entity: str) -> list[str]:
        """Every id of ``entity`` with at least one applied event, sorted."""
        return sorted(i for (ent, i) in self._by if ent == entity)

    def latest(self, entity: str, entity_id: str) -> int | None:
        """Latest applied event time of the entity (None when it has none)."""
        evs = self.events_of(entity, entity_id)
        return max(e["ts"] for e in evs) if evs else None
