"""The input contract, as data: event kinds, their fields and types, their topics, and the
key their events are partitioned by.

Written once here and read by every runtime: the definition validator
(:mod:`feature_defs.validate`: which fields a measure may read), the registry's compiled
:class:`~feature_defs.topology.Topology` (routing key, source kinds), and the stream codecs
(:mod:`streams.events` builds the Avro and Arrow schemas and the validation rules from
these types). The Avro schema files in ``streams/schemas/`` spell the same fields in the
same order; :mod:`streams.events` checks them against :data:`FIELD_TYPES` when it loads
them, so the two cannot drift.

Pure data: no I/O, nothing of ours imported but :mod:`feature_defs.layout`'s topic names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

from feature_defs.layout import TOPIC_CLICKS, TOPIC_IMPRESSIONS

__all__ = [
    "EventKind",
    "KINDS",
    "STRING",
    "TS",
    "DOUBLE",
    "NUMERIC_TYPES",
    "FIELD_TYPES",
    "NULLABLE_FIELDS",
    "NULLABLE_IN",
    "ADDED_FIELDS",
    "ID_FIELDS",
    "PROBABILITY_FIELDS",
    "KIND_TOPICS",
    "ROUTING_KEY",
    "ROUTING_KEYS",
    "ROUTING_FALLBACK",
    "string_fields",
    "numeric_fields",
]

EventKind = Literal["impression", "click"]
KINDS: Final[tuple[EventKind, ...]] = ("impression", "click")

#: Field type codes: a UTF-8 string, the event time (integer epoch milliseconds, UTC), and
#: a finite double.
STRING: Final = "string"
TS: Final = "ts"
DOUBLE: Final = "double"
#: type codes a numeric measure (SUM, MEAN, MIN, MAX, LAST) may read
NUMERIC_TYPES: Final = frozenset({TS, DOUBLE})

#: per kind, its fields in schema order with their type codes
FIELD_TYPES: Final[Mapping[EventKind, Mapping[str, str]]] = MappingProxyType({
    "impression": MappingProxyType({
        "event_id": STRING, "ts": TS, "user_id": STRING, "ad_id": STRING,
        "campaign_id": STRING, "publisher_id": STRING, "placement": STRING,
        "creative_type": STRING, "device_type": STRING, "country": STRING,
        "bid_cpm": DOUBLE,
        "prediction_id": STRING, "model_version": STRING, "p_ctr": DOUBLE,
    }),
    "click": MappingProxyType({
        "event_id": STRING, "ts": TS, "impression_id": STRING, "user_id": STRING,
        "ad_id": STRING, "campaign_id": STRING, "publisher_id": STRING,
        "prediction_id": STRING, "model_version": STRING, "p_ctr": DOUBLE,
        "device_type": STRING, "country": STRING,
    }),
})
#: per kind, the optional fields added after the first schema version, in schema order.
#: They close the schema (old records are a prefix of new ones: see
#: :mod:`streams.codec`), are nullable, and an absent one is null: producers that never
#: heard of them keep working unchanged. ``prediction_id``/``model_version``/``p_ctr``
#: name the Score answer that chose the ad (online evaluation per arm); a click's
#: ``p_ctr``, ``device_type`` and ``country`` repeat its impression's, so that a click
#: is counted in the same evaluation bucket and segments as its impression
#: (:mod:`feature_defs.evaluation`).
ADDED_FIELDS: Final[Mapping[EventKind, tuple[str, ...]]] = MappingProxyType({
    "impression": ("prediction_id", "model_version", "p_ctr"),
    "click": ("prediction_id", "model_version", "p_ctr", "device_type", "country"),
})
#: the fields that may be absent or null in every kind: an anonymous user, and the
#: added fields every kind has
NULLABLE_FIELDS: Final = frozenset({"user_id", "prediction_id", "model_version", "p_ctr"})
#: per kind, the fields that may be absent or null (an absent one is null)
NULLABLE_IN: Final[Mapping[EventKind, frozenset[str]]] = MappingProxyType({
    "impression": NULLABLE_FIELDS,
    "click": NULLABLE_FIELDS | {"device_type", "country"},
})
#: fields holding ids (checked with :func:`feature_defs.layout.entity_id_problem`)
ID_FIELDS: Final = ("event_id", "impression_id", "user_id", "ad_id", "campaign_id",
                    "publisher_id", "prediction_id", "model_version")
#: fields that are probabilities: finite and in [0, 1] when present
PROBABILITY_FIELDS: Final = frozenset({"p_ctr"})
#: the topic (before the deployment prefix) each kind arrives on by default
KIND_TOPICS: Final[Mapping[EventKind, str]] = MappingProxyType(
    {"impression": TOPIC_IMPRESSIONS, "click": TOPIC_CLICKS})

#: the field source events are partitioned by. Every kind shares it: the stream worker
#: applies the views keyed by it where the event is consumed, and re-keys events to the
#: other entities through a repartition topic (:class:`~feature_defs.topology.Topology`)
ROUTING_KEY: Final = "user_id"
#: the routing key of each kind (one key for all, see :data:`ROUTING_KEY`)
ROUTING_KEYS: Final[Mapping[EventKind, str]] = MappingProxyType(
    {k: ROUTING_KEY for k in KINDS})
#: the field that routes an event whose routing key is null (anonymous traffic)
ROUTING_FALLBACK: Final = "event_id"


def string_fields(kind: str) -> frozenset[str]:
    """String fields of ``kind`` (empty for an unknown kind)."""
    types = FIELD_TYPES.get(kind, {})  # type: ignore[call-overload]
    return frozenset(f for f, t in types.items() if t == STRING)


def numeric_fields(kind: str) -> frozenset[str]:
    """Numeric fields of ``kind``, the event time included (empty for an unknown kind)."""
    types = FIELD_TYPES.get(kind, {})  # type: ignore[call-overload]
    return frozenset(f for f, t in types.items() if t in NUMERIC_TYPES)
