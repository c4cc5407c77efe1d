"""The input contract: the two event kinds, their schemas and their validation rules.

Two kinds of events enter Headrace, each on its own topic (names before the deployment
prefix, from :mod:`feature_defs.layout`); their fields and types are the contract's
(:mod:`feature_defs.contract`), from which the schemas below are built:

* ``impression`` on ``impressions``: ``event_id``, ``ts``, ``user_id`` (null = anonymous),
  ``ad_id``, ``campaign_id``, ``publisher_id``, ``placement``, ``creative_type``,
  ``device_type``, ``country`` (strings) and ``bid_cpm`` (double).
* ``click`` on ``clicks``: ``event_id``, ``ts``, ``impression_id``, ``user_id`` (nullable),
  ``ad_id``, ``campaign_id``, ``publisher_id``.
* then, on both, the optional fields added in schema v2
  (:data:`feature_defs.contract.ADDED_FIELDS`; absent = null): ``prediction_id``,
  ``model_version`` (ids) and ``p_ctr`` (double); on clicks also ``device_type`` and
  ``country`` (those of the impression clicked).

``ts`` is the event time in integer epoch milliseconds, UTC (Avro ``long`` with logical
type ``timestamp-millis``; Arrow ``timestamp("ms", tz="UTC")``).

Validation rules (one reason per event, the first problem in schema field order, then the
value rules), written once here and applied by both the per-event path
(:func:`event_problem`) and the vectorized path (:func:`table_problems`):

* every field present and non-null, except ``user_id`` and the added fields (absent
  means null);
* the right type: strings are ``str``, ``ts`` an ``int`` (not ``bool``/``float``), ``bid_cpm``
  an ``int`` or ``float``; strings must be encodable as UTF-8;
* id fields (``event_id``, ``impression_id``, ``user_id``, ``ad_id``, ``campaign_id``,
  ``publisher_id``, ``prediction_id``, ``model_version``) pass
  :func:`feature_defs.layout.entity_id_problem`;
* ``bid_cpm`` finite and >= 0; ``p_ctr``, when present, finite and in [0, 1];
* ``MIN_TS_MS <= ts <= now_ms + max_future_ms`` (the caller injects ``now_ms``).

Reasons are ``"code: detail"``; the codes are listed in :data:`REASON_CODES`. Fields that are
not in the schema are ignored (forward compatibility), including the producer's ``type``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.contract import (
    ADDED_FIELDS,
    DOUBLE,
    FIELD_TYPES,
    ID_FIELDS,
    KIND_TOPICS,
    KINDS,
    NULLABLE_FIELDS,
    NULLABLE_IN,
    PROBABILITY_FIELDS,
    ROUTING_FALLBACK,
    ROUTING_KEY,
    STRING,
    TS,
    EventKind,
)
from feature_defs.layout import MAX_ID_LEN, TOPIC_DLQ, entity_id_problem

__all__ = [
    "EventKind",
    "KINDS",
    "EventSpec",
    "EVENT_SPECS",
    "TOPIC_DLQ",
    "MIN_TS_MS",
    "NULLABLE_FIELDS",
    "TS_TYPE",
    "STRING",
    "TS",
    "DOUBLE",
    "REASON_CODES",
    "spec_for",
    "kind_for_topic",
    "event_problem",
    "normalize_event",
    "conform_table",
    "table_problems",
    "rows_as_python",
    "routing_key",
]

#: 2000-01-01T00:00:00Z in epoch milliseconds: older event times are rejected.
MIN_TS_MS: Final = 946_684_800_000
TS_TYPE: Final = pa.timestamp("ms", tz="UTC")

#: Every reason code a dead letter can carry, in the order a message is checked.
REASON_CODES: Final[tuple[str, ...]] = (
    "empty_value",  # the Kafka message has no value (tombstone)
    "unknown_encoding",  # the hr-enc header names no encoding we know
    "undecodable",  # bytes are not valid Avro / Arrow / Avro container
    "bad_json",  # not JSON, or not a JSON object
    "wrong_kind",  # an envelope declares another event kind
    "missing_field",
    "null_field",
    "bad_type",
    "bad_value",  # bid_cpm negative or not finite, p_ctr outside [0, 1]; bad UTF-8
    "bad_id",
    "ts_too_old",
    "ts_in_future",
)

# Kinds, field types (STRING, TS, DOUBLE), nullable and id fields are the contract's
# (feature_defs.contract), re-exported here for the codecs.
# Ids unique per event: caching their verdicts would only fill the cache.
_UNCACHED_ID_FIELDS: Final = frozenset({"event_id", "impression_id"})
#: ASCII characters an id must not contain (RE2 syntax; see entity_id_problem)
_ASCII_BAD_ID: Final = r"[{} \x00-\x1f\x7f]"
#: probability fields every kind has (checked in this order)
_PROBABILITIES: Final = tuple(sorted(PROBABILITY_FIELDS))
_ARROW_TYPES: Final[dict[str, pa.DataType]] = {
    STRING: pa.string(),
    TS: TS_TYPE,
    DOUBLE: pa.float64(),
}


@dataclass(frozen=True, eq=False)
class EventSpec:
    """Everything the runtimes need to know about one event kind.

    Attributes:
        kind: ``impression`` or ``click``.
        topic: Topic name before the deployment prefix.
        fields: Field names in schema order.
        field_types: Field name -> type code (:data:`STRING`, :data:`TS`, :data:`DOUBLE`).
        required: Fields that must be present and non-null (all but :attr:`nullable`).
        nullable: Fields that may be absent or null (``user_id``, the added fields).
        id_fields: Fields checked with ``entity_id_problem``.
        avro_schema: Parsed Avro schema (``ts`` has logical type timestamp-millis).
        avro_raw_schema: The same without logical types, so ``ts`` reads as an ``int``.
        avro_v1_schema: The first schema version (without the added fields), as old
            producers wrote it.
        avro_v1_raw_schema: That without logical types: a single Avro event is read
            with it first; bytes left over are the added fields
            (``avro_tail_raw_schema``, :mod:`streams.codec`).
        avro_tail_raw_schema: A record of just the added fields.
        arrow_schema: Arrow schema of accepted events (required fields non-nullable).
        wire_arrow_schema: Arrow schema of envelopes on the wire (every field nullable, so a
            bad event still travels and is dead-lettered by the consumer).
    """

    kind: EventKind
    topic: str
    fields: tuple[str, ...]
    field_types: Mapping[str, str]
    required: tuple[str, ...]
    nullable: frozenset[str]
    id_fields: tuple[str, ...]
    avro_schema: dict[str, Any]
    avro_raw_schema: dict[str, Any]
    avro_v1_schema: dict[str, Any]
    avro_v1_raw_schema: dict[str, Any]
    avro_tail_raw_schema: dict[str, Any]
    arrow_schema: pa.Schema
    wire_arrow_schema: pa.Schema


def _strip_logical_types(schema: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(json.dumps(schema))
    for f in raw["fields"]:
        if isinstance(f["type"], dict) and "logicalType" in f["type"]:
            f["type"] = f["type"]["type"]
    raw["name"] = raw["name"] + "Raw"
    return raw


def _versions(schema: dict[str, Any], kind: EventKind) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the v1 schema, a record of the added fields): the schema split where the added
    fields begin (they must close it, else old records are not a prefix of new ones)."""
    added = ADDED_FIELDS[kind]
    n = len(schema["fields"]) - len(added)
    if tuple(f["name"] for f in schema["fields"][n:]) != added:
        raise RuntimeError(f"the {kind} schema must end with the added fields {added}")
    v1 = {**schema, "fields": schema["fields"][:n]}
    tail = {"type": "record", "name": schema["name"] + "V2Tail",
            "namespace": schema.get("namespace", ""), "fields": schema["fields"][n:]}
    return v1, tail


def _load_spec(kind: EventKind, topic: str, avsc: str) -> EventSpec:
    text = (Path(__file__).parent / "schemas" / avsc).read_text("utf-8")
    schema = json.loads(text)
    fields = tuple(f["name"] for f in schema["fields"])
    types = FIELD_TYPES[kind]
    if fields != tuple(types):  # the Avro file and the contract must not drift
        raise RuntimeError(f"streams/schemas/{avsc} has fields {fields}; the contract "
                           f"(feature_defs.contract) has {tuple(types)}")
    nullable = NULLABLE_IN[kind]
    required = tuple(f for f in fields if f not in nullable)
    arrow = pa.schema(
        [pa.field(f, _ARROW_TYPES[types[f]], nullable=f in nullable) for f in fields]
    )
    v1, tail = _versions(schema, kind)
    wire = pa.schema([pa.field(f.name, f.type) for f in arrow], metadata={"hr-kind": kind})
    return EventSpec(
        kind=kind,
        topic=topic,
        fields=fields,
        field_types=dict(types),
        required=required,
        nullable=nullable,
        id_fields=tuple(f for f in fields if f in ID_FIELDS),
        avro_schema=cast(dict[str, Any], fastavro.parse_schema(schema)),
        avro_raw_schema=cast(dict[str, Any], fastavro.parse_schema(_strip_logical_types(schema))),
        avro_v1_schema=cast(dict[str, Any], fastavro.parse_schema(v1)),
        avro_v1_raw_schema=cast(dict[str, Any], fastavro.parse_schema(_strip_logical_types(v1))),
        avro_tail_raw_schema=cast(dict[str, Any], fastavro.parse_schema(tail)),
        arrow_schema=arrow,
        wire_arrow_schema=wire,
    )


EVENT_SPECS: Final[Mapping[EventKind, EventSpec]] = {
    k: _load_spec(k, KIND_TOPICS[k], f"{k}.avsc") for k in KINDS
}


def spec_for(kind: str) -> EventSpec:
    """The spec of ``kind``. Raises ``KeyError`` naming the kind when it is unknown."""
    try:
        return EVENT_SPECS[kind]  # type: ignore[index]
    except KeyError:
        raise KeyError(f"unknown event kind {kind!r} (expected impression or click)") from None


def kind_for_topic(name: str) -> EventKind | None:
    """The kind carried by topic ``name`` (before the prefix), or None."""
    for spec in EVENT_SPECS.values():
        if spec.topic == name:
            return spec.kind
    return None


_ID_CACHE: dict[str, bool] = {}
_ID_CACHE_MAX = 262_144  # ~30 MB of short ids; cleared when full


def _id_ok(value: str) -> bool:
    ok = _ID_CACHE.get(value)
    if ok is None:
        if len(_ID_CACHE) >= _ID_CACHE_MAX:
            _ID_CACHE.clear()
        ok = _ID_CACHE[value] = entity_id_problem(value) is None
    return ok


def _type_name(value: object) -> str:
    return type(value).__name__


def event_problem(
    kind: EventKind, event: Mapping[str, Any], *, now_ms: int, max_future_ms: int
) -> str | None:
    """The reason ``event`` breaks the contract of ``kind``, or None when it is valid.

    Args:
        kind: The event kind the topic carries.
        event: A decoded event (JSON object, Avro record, or Arrow row with ``ts`` as int).
        now_ms: Current time, epoch milliseconds (injected; never read here).
        max_future_ms: How far past ``now_ms`` an event time may lie.

    Returns:
        ``"code: detail"`` for the first problem found, or None. Never raises.
    """
    spec = EVENT_SPECS[kind]
    for name, ftype in spec.field_types.items():
        value = event.get(name)
        if value is None:
            if name in spec.nullable:
                continue
            return f"null_field: {name}" if name in event else f"missing_field: {name}"
        if ftype == STRING:
            if type(value) is not str:
                return f"bad_type: {name} is {_type_name(value)}"
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return f"bad_value: {name} is not encodable as UTF-8"
        elif ftype == TS:
            if type(value) is not int:
                return f"bad_type: {name} is {_type_name(value)}"
        elif type(value) is not int and type(value) is not float:
            return f"bad_type: {name} is {_type_name(value)}"
    for name in spec.id_fields:
        value = event.get(name)
        if value is None:
            continue
        if name in _UNCACHED_ID_FIELDS:
            problem = entity_id_problem(value)
        elif _id_ok(value):
            continue
        else:
            problem = entity_id_problem(value)
        if problem is not None:
            return f"bad_id: {name} {problem}"
    if "bid_cpm" in spec.fields:
        try:
            bid = float(event["bid_cpm"])
        except OverflowError:
            bid = math.inf
        if not math.isfinite(bid):
            return f"bad_value: bid_cpm is not finite ({bid})"
        if bid < 0:
            return f"bad_value: bid_cpm is negative ({bid})"
    for name in _PROBABILITIES:
        p = event.get(name)
        if p is None:
            continue
        try:
            prob = float(p)
        except OverflowError:
            prob = math.inf
        if not 0.0 <= prob <= 1.0:  # NaN fails both comparisons
            return f"bad_value: {name} is not in [0, 1] ({prob})"
    ts: int = event["ts"]
    if ts < MIN_TS_MS:
        return f"ts_too_old: ts {ts} is before 2000-01-01 ({MIN_TS_MS})"
    if ts > now_ms + max_future_ms:
        return f"ts_in_future: ts {ts} is {ts - now_ms} ms after now (limit {max_future_ms} ms)"
    return None


def normalize_event(kind: EventKind, event: Mapping[str, Any]) -> dict[str, Any]:
    """A valid event reduced to its schema fields (``bid_cpm`` float, absent ``user_id`` None)."""
    row: dict[str, Any] = {name: event.get(name) for name in EVENT_SPECS[kind].fields}
    if "bid_cpm" in row:
        row["bid_cpm"] = float(row["bid_cpm"])
    return row


# pyarrow >= 16 only; the project allows 15.
_is_string_view = getattr(pa.types, "is_string_view", lambda _t: False)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    if pa.types.is_null(source):
        return True
    if pa.types.is_dictionary(source):
        source = source.value_type
    if target == pa.string():
        return bool(
            pa.types.is_string(source)
            or pa.types.is_large_string(source)
            or _is_string_view(source)
        )
    if target == TS_TYPE:
        # Naive timestamps are refused: event time is UTC by contract, never guessed.
        return bool(
            pa.types.is_integer(source) or (pa.types.is_timestamp(source) and source.tz is not None)
        )
    return bool(pa.types.is_integer(source) or pa.types.is_floating(source))


def conform_table(kind: EventKind, table: pa.Table) -> tuple[pa.Table | None, str | None]:
    """Cast an envelope's table to the kind's wire schema (extra columns dropped).

    Returns ``(table, None)``, or ``(None, reason)`` when a required column is missing or a
    column has a type that does not cast safely (the whole envelope is then dead).
    """
    spec = EVENT_SPECS[kind]
    names = table.schema.names
    columns: list[pa.ChunkedArray | pa.Array] = []
    for field in spec.wire_arrow_schema:
        if field.name not in names:
            if field.name in spec.nullable:
                columns.append(pa.nulls(table.num_rows, field.type))
                continue
            return None, f"missing_field: {field.name}"
        col = table.column(field.name)
        if col.type != field.type:
            if not _castable(col.type, field.type):
                return None, f"bad_type: {field.name} is {col.type}"
            try:
                col = pc.cast(col, field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                return None, f"bad_type: {field.name} is {col.type} ({exc})"
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=spec.wire_arrow_schema), None


def _plainly_fine(col: pa.ChunkedArray) -> bool:
    """True when no string of ``col`` can be a bad id, from its raw buffers: every byte is
    printable ASCII other than a space and ``{`` to ``~`` (a superset of what the rule
    rejects), and every non-null string has 1 to MAX_ID_LEN bytes. Two numpy passes over
    the bytes: about 20x cheaper than the Arrow checks below on clean input."""
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        if chunk.type != pa.string():
            return False
        _validity, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
            chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]] \
            if data_buf is not None else np.empty(0, np.uint8)
        if (data <= 0x20).any() or (data >= 0x7B).any():
            return False
        lengths = np.diff(offsets)
        if chunk.null_count:
            lengths = lengths[np.asarray(chunk.is_valid())]
        if lengths.size and (lengths.min() < 1 or lengths.max() > MAX_ID_LEN):
            return False
    return True


def _bad_id_mask(name: str, col: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Rows whose id ``col`` is invalid (None when every row is fine).

    Clean columns are recognized from their bytes (:func:`_plainly_fine`). Otherwise
    Arrow finds the suspects in C: non-ASCII strings (Python's whitespace class is
    Unicode-wide), empty or over-long ones, and ASCII braces, spaces and control
    characters. Only the distinct suspects meet :func:`entity_id_problem`, so the verdict
    is exactly the per-event one.
    """
    if _plainly_fine(col):
        return None
    length = pc.utf8_length(col)
    suspect = pc.or_(
        pc.or_(pc.invert(pc.string_is_ascii(col)), pc.match_substring_regex(col, _ASCII_BAD_ID)),
        pc.or_(pc.equal(length, 0), pc.greater(length, MAX_ID_LEN)),
    )
    if not pc.any(suspect).as_py():
        return None
    candidates = pc.unique(pc.filter(col, suspect)).to_pylist()
    bad = [v for v in candidates if v is not None and entity_id_problem(v) is not None]
    if not bad:
        return None
    return pc.is_in(col, value_set=pa.array(bad, pa.string()))


def table_problems(
    kind: EventKind, table: pa.Table, *, now_ms: int, max_future_ms: int
) -> dict[int, str]:
    """Vectorized :func:`event_problem` over a table in the kind's wire schema.

    Cheap column-wide checks find the candidate rows; only those rows are converted to
    Python and given their reason by :func:`event_problem`, so both paths agree.

    Returns:
        ``{row index: reason}`` for every invalid row (empty when all are valid).
    """
    spec = EVENT_SPECS[kind]
    masks: list[Any] = []
    for name in spec.required:
        col = table.column(name)
        if col.null_count:
            masks.append(pc.is_null(col))
    for name in spec.id_fields:
        mask = _bad_id_mask(name, table.column(name))
        if mask is not None:
            masks.append(mask)
    if "bid_cpm" in spec.fields:
        bid = table.column("bid_cpm")
        ok = pc.and_(pc.is_finite(bid), pc.greater_equal(bid, 0.0))
        if not pc.all(ok, skip_nulls=True).as_py():
            masks.append(pc.invert(ok))
    for name in _PROBABILITIES:
        col = table.column(name)
        if col.null_count < len(col):  # old producers: all null, nothing to check
            ok = pc.and_(pc.greater_equal(col, 0.0), pc.less_equal(col, 1.0))  # NaN: false
            if not pc.all(ok, skip_nulls=True).as_py():
                masks.append(pc.invert(ok))
    ts = table.column("ts").cast(pa.int64())
    bounds = pc.min_max(ts).as_py()
    if bounds["min"] is not None and (
        bounds["min"] < MIN_TS_MS or bounds["max"] > now_ms + max_future_ms
    ):
        masks.append(pc.or_(pc.less(ts, MIN_TS_MS), pc.greater(ts, now_ms + max_future_ms)))
    if not masks:
        return {}
    bad = masks[0]
    for mask in masks[1:]:
        bad = pc.or_kleene(bad, mask)
    indices = pc.indices_nonzero(pc.fill_null(bad, False)).to_pylist()
    reasons: dict[int, str] = {}
    for i, row in zip(indices, rows_as_python(table.take(indices)), strict=True):
        reason = event_problem(kind, row, now_ms=now_ms, max_future_ms=max_future_ms)
        if reason is not None:
            reasons[i] = reason
    return reasons


def rows_as_python(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts with ``ts`` as epoch-millisecond ints (for JSON and validation)."""
    if "ts" in table.schema.names:
        i = table.schema.get_field_index("ts")
        table = table.set_column(i, "ts", table.column(i).cast(pa.int64()))
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def routing_key(event: Mapping[str, Any]) -> str:
    """The partition routing key: ``user_id``, or ``event_id`` for an anonymous user.

    Malformed events still get a key (``""`` at worst) so they travel to a consumer that
    dead-letters them.
    """
    user = event.get(ROUTING_KEY)
    if isinstance(user, str):
        return user
    event_id = event.get(ROUTING_FALLBACK)
    return event_id if isinstance(event_id, str) else ""
