"""Encoders of the wire formats (re-exported by :mod:`streams.codec`, which decodes them).

``json`` and ``avro`` messages carry one event; ``arrow`` and ``avro-batch`` envelopes carry
many events of one kind bound for one partition. Every message names its encoding in the
``hr-enc`` header. An event that does not fit a typed encoding (a string where a number
belongs, a null in a required Avro field) is sent as JSON in its place, so nothing is
lost and the consumer dead-letters it with the real reason.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple

import fastavro
import pyarrow as pa

from streams.events import EVENT_SPECS, STRING, TS, EventKind

__all__ = [
    "ENCODING_HEADER",
    "Encoding",
    "ENCODINGS",
    "BATCH_ENCODINGS",
    "EncodedMessage",
    "event_json",
    "encode_json",
    "encode_avro",
    "encode_arrow",
    "encode_avro_batch",
    "encode_events",
    "wire_conforms",
]

ENCODING_HEADER: Final = "hr-enc"
Encoding = Literal["json", "avro", "arrow", "avro-batch"]
ENCODINGS: Final[tuple[Encoding, ...]] = ("json", "avro", "arrow", "avro-batch")
BATCH_ENCODINGS: Final = frozenset({"arrow", "avro-batch"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class EncodedMessage(NamedTuple):
    """One Kafka message value ready to produce."""

    value: bytes
    headers: list[tuple[str, bytes]]
    events: int
    encoding: Encoding


def event_json(event: Mapping[str, Any]) -> bytes:
    """Compact JSON of a dict, valid UTF-8 always (non-JSON values as ``str``). Never raises."""
    # ensure_ascii keeps the output valid UTF-8 even for lone surrogates (rejected later).
    return json.dumps(event, separators=(",", ":"), default=str).encode("ascii")


def encode_json(event: Mapping[str, Any]) -> bytes:
    """One event as a compact JSON object (the producer's ``type`` field dropped). Never raises."""
    return event_json({k: v for k, v in event.items() if k != "type"})


def encode_avro(kind: EventKind, event: Mapping[str, Any]) -> bytes:
    """One event as schemaless Avro. Raises ``ValueError``/``TypeError`` if it does not fit."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, EVENT_SPECS[kind].avro_schema, dict(event))
    return buf.getvalue()


def encode_arrow(kind: EventKind, events: Sequence[Mapping[str, Any]]) -> bytes:
    """Many events as one Arrow IPC stream with one record batch (wire schema, all nullable).

    Raises:
        pyarrow.ArrowInvalid / ArrowTypeError: an event does not fit (see :func:`wire_conforms`).
    """
    schema = EVENT_SPECS[kind].wire_arrow_schema
    batch = pa.RecordBatch.from_pylist(list(events), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def encode_avro_batch(kind: EventKind, events: Sequence[Mapping[str, Any]]) -> bytes:
    """Many events as one Avro object container (no compression).

    Raises like :func:`encode_avro`.
    """
    buf = io.BytesIO()
    fastavro.writer(buf, EVENT_SPECS[kind].avro_schema, [dict(e) for e in events])
    return buf.getvalue()


def wire_conforms(kind: EventKind, event: Mapping[str, Any], *, nulls_allowed: bool) -> bool:
    """Whether ``event`` can be written in a typed encoding (Avro, Arrow) without loss.

    ``nulls_allowed`` is True for Arrow (its wire schema is all-nullable). An event that
    does not conform is sent as JSON instead, so the consumer dead-letters it with a reason.
    """
    spec = EVENT_SPECS[kind]
    for name, ftype in spec.field_types.items():
        value = event.get(name)
        if value is None:
            if nulls_allowed or name in spec.nullable:
                continue
            return False
        if ftype == STRING:
            if type(value) is not str:
                return False
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif ftype == TS:
            if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
                return False
        elif type(value) is float:
            continue
        elif type(value) is not int or not -(2**53) <= value <= 2**53:
            return False
    return True


def _header(encoding: Encoding) -> list[tuple[str, bytes]]:
    return [(ENCODING_HEADER, encoding.encode("ascii"))]


def encode_events(
    kind: EventKind, events: Sequence[Mapping[str, Any]], encoding: Encoding
) -> list[EncodedMessage]:
    """Encode events of one kind, bound for one partition, in order.

    ``json``/``avro`` give one message per event; ``arrow``/``avro-batch`` give one envelope
    for all of ``events`` (the caller sizes the batch). An event that does not fit a typed
    encoding is sent as a single JSON message in its place, splitting the envelope, so
    order is kept and the consumer reports the real problem. Never raises.
    """
    if encoding == "json":
        return [EncodedMessage(encode_json(e), _header("json"), 1, "json") for e in events]
    nulls_allowed = encoding == "arrow"
    out: list[EncodedMessage] = []
    run: list[Mapping[str, Any]] = []

    def close_run() -> None:
        if run:
            if encoding == "arrow":
                value = encode_arrow(kind, run)
            else:
                value = encode_avro_batch(kind, run)
            out.append(EncodedMessage(value, _header(encoding), len(run), encoding))
            run.clear()

    for event in events:
        if not wire_conforms(kind, event, nulls_allowed=nulls_allowed):
            close_run()
            out.append(EncodedMessage(encode_json(event), _header("json"), 1, "json"))
        elif encoding == "avro":
            out.append(EncodedMessage(encode_avro(kind, event), _header("avro"), 1, "avro"))
        else:
            run.append(event)
    close_run()
    return out
