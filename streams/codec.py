"""Wire encodings of events, and the one decoder every consumer uses.

The encoders live in :mod:`streams.encode` and are re-exported here, so ``streams.codec``
is the one import for both directions.

The encoding of a Kafka message is named by its ``hr-enc`` header:

* ``json``: one event, a UTF-8 JSON object (``ts`` epoch milliseconds as an integer);
* ``avro``: one event, schemaless Avro with the topic's schema (:mod:`streams.events`);
* ``arrow``: an envelope, one Arrow IPC stream holding one record batch of many events of
  one kind that were all routed to the same partition (schema metadata ``hr-kind``);
* ``avro-batch``: an envelope, an Avro object container file with many records.

A message without the header is sniffed: an Avro container (``Obj\\x01``) or Arrow stream
(``0xFFFFFFFF``) magic is recognised, a value starting with ``{`` is JSON, anything else is
single-event Avro. (Neither magic can start a valid single Avro event.)

:func:`decode_batch` never raises on input: every event is either a row of the returned
table or a :class:`DeadLetter`. Whole messages that cannot be decoded (or an envelope whose
columns do not fit the schema) become one dead letter holding the raw bytes with
``index == -1``; a single event that fails validation keeps its raw bytes (``index == 0``);
one bad event inside a decodable envelope becomes a dead letter holding that event
re-encoded as JSON (``index`` = its position), and the other events are kept.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Final, NamedTuple, cast

import fastavro
import numpy as np
import pyarrow as pa

from streams.encode import (
    BATCH_ENCODINGS,
    ENCODING_HEADER,
    ENCODINGS,
    EncodedMessage,
    Encoding,
    encode_arrow,
    encode_avro,
    encode_avro_batch,
    encode_events,
    encode_json,
    event_json,
    wire_conforms,
)
from streams.events import (
    DOUBLE,
    EVENT_SPECS,
    EventKind,
    conform_table,
    event_problem,
    rows_as_python,
    table_problems,
)

__all__ = [
    "ENCODING_HEADER",
    "Encoding",
    "ENCODINGS",
    "BATCH_ENCODINGS",
    "RawMessage",
    "DeadLetter",
    "DecodedBatch",
    "EncodedMessage",
    "decoded_schema",
    "sniff_encoding",
    "decode_batch",
    "dead_letter_headers",
    "encode_json",
    "encode_avro",
    "encode_arrow",
    "encode_avro_batch",
    "encode_events",
    "wire_conforms",
]

_ARROW_MAGIC: Final = b"\xff\xff\xff\xff"
_AVRO_CONTAINER_MAGIC: Final = b"Obj\x01"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


class RawMessage(NamedTuple):
    """A consumed Kafka message as the decoder needs it (any object with these attributes,
    or with confluent-kafka style methods of these names, works too)."""

    value: bytes | None
    headers: Any = None  # list of (str, bytes) pairs, a dict, or None
    topic: str = ""
    partition: int = 0
    offset: int = -1


@dataclass(frozen=True)
class DeadLetter:
    """An event (or a whole message) that could not be accepted.

    Attributes:
        reason: ``"code: detail"``; codes are :data:`streams.events.REASON_CODES`.
        value: The offending event as JSON when its envelope decoded, else the raw bytes.
        topic, partition, offset: Where the carrying message was consumed.
        index: Position of the event in its envelope; 0 for a single event; -1 when
            ``value`` is a whole undecodable envelope.
        encoding: Encoding of ``value`` (``json`` for re-encoded events), None if unknown.
    """

    reason: str
    value: bytes
    topic: str
    partition: int
    offset: int
    index: int
    encoding: str | None = None

    @property
    def code(self) -> str:
        """The machine code part of ``reason`` (a metric label)."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class DecodedBatch:
    """What :func:`decode_batch` returns.

    Attributes:
        table: Accepted events in arrival order, schema :func:`decoded_schema`.
        dead: Dead letters in arrival order.
        messages: Number of messages decoded.
    """

    table: pa.Table
    dead: list[DeadLetter]
    messages: int


@cache
def _canonical_of(schema_json: str) -> str:
    return fastavro.schema.to_parsing_canonical_form(json.loads(schema_json))


def _canonical(schema: Any) -> str:
    return _canonical_of(json.dumps(schema, sort_keys=True))


@cache
def decoded_schema(kind: EventKind) -> pa.Schema:
    """The kind's Arrow schema plus ``_partition`` int32, ``_offset`` int64, ``_index`` int32."""
    extra = [
        pa.field("_partition", pa.int32(), nullable=False),
        pa.field("_offset", pa.int64(), nullable=False),
        pa.field("_index", pa.int32(), nullable=False),
    ]
    return pa.schema(list(EVENT_SPECS[kind].arrow_schema) + extra)


# ---------------------------------------------------------------------------------- decode


def _is_text(value: bytes) -> bool:
    """Printable UTF-8 text (what a JSON producer sends), as opposed to binary Avro."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable() or all(c.isprintable() or c in "\t\r\n" for c in text)


def sniff_encoding(value: bytes) -> Encoding:
    """Guess the encoding of a message without an ``hr-enc`` header."""
    head = bytes(value[:4])
    if head == _AVRO_CONTAINER_MAGIC:
        return "avro-batch"
    if head == _ARROW_MAGIC:
        return "arrow"
    return "json" if bytes(value[:64]).lstrip()[:1] == b"{" else "avro"


def _find_header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for item in items:
        key, val = item[0], item[1]
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if key == name and val is not None:
            return (
                val.decode("utf-8", "replace") if isinstance(val, bytes | bytearray) else str(val)
            )
    return None


def _unpack(msg: Any) -> tuple[Any, Any, str, int, int]:
    if type(msg) is RawMessage or (isinstance(msg, tuple) and not hasattr(msg, "_fields")):
        value, headers, topic, partition, offset = msg[:5]  # other named tuples: by name
    else:
        parts = []
        for name in ("value", "headers", "topic", "partition", "offset"):
            attr = getattr(msg, name, None)
            parts.append(attr() if callable(attr) else attr)
        value, headers, topic, partition, offset = parts
    return value, headers, topic or "", int(partition or 0), int(-1 if offset is None else offset)


class _Rows:
    """Accepted single events (json, avro, avro-batch), buffered as columns."""

    def __init__(self, kind: EventKind) -> None:
        self.kind = kind
        self.fields = EVENT_SPECS[kind].fields
        self.doubles = frozenset(f for f, t in EVENT_SPECS[kind].field_types.items()
                                 if t == DOUBLE and f not in EVENT_SPECS[kind].nullable)
        #: nullable doubles (``p_ctr``): converted only when present
        self.opt_doubles = frozenset(f for f, t in EVENT_SPECS[kind].field_types.items()
                                     if t == DOUBLE and f in EVENT_SPECS[kind].nullable)
        self.cols: dict[str, list[Any]] = {f: [] for f in (*self.fields, "_p", "_o", "_i")}

    def add(self, event: Mapping[str, Any], partition: int, offset: int, index: int) -> None:
        """Append a valid event (an int ``bid_cpm`` becomes a float: Arrow refuses big ints)."""
        for f in self.fields:
            value: Any = event.get(f)
            if f in self.doubles or (value is not None and f in self.opt_doubles):
                value = float(value)
            self.cols[f].append(value)
        self.cols["_p"].append(partition)
        self.cols["_o"].append(offset)
        self.cols["_i"].append(index)

    def take(self) -> pa.Table | None:
        if not self.cols["_p"]:
            return None
        schema = decoded_schema(self.kind)
        arrays = [
            pa.array(self.cols[k], type=f.type) for k, f in zip(self.cols, schema, strict=True)
        ]
        for values in self.cols.values():
            values.clear()
        return pa.Table.from_arrays(arrays, schema=schema)


_Die = Callable[[str, "str | None", int], None]


class _Decoder:
    def __init__(self, kind: EventKind, now_ms: int, max_future_ms: int) -> None:
        self.kind = kind
        self.spec = EVENT_SPECS[kind]
        self.now_ms = now_ms
        self.max_future_ms = max_future_ms
        self.rows = _Rows(kind)
        self.segments: list[pa.Table] = []
        self.dead: list[DeadLetter] = []

    def problem(self, event: Mapping[str, Any]) -> str | None:
        return event_problem(self.kind, event, now_ms=self.now_ms, max_future_ms=self.max_future_ms)

    def message(self, value: bytes, headers: Any, topic: str, partition: int, offset: int) -> None:
        def die(reason: str, enc: str | None, index: int) -> None:
            self.dead.append(DeadLetter(reason, value, topic, partition, offset, index, enc))

        if not value:
            return die("empty_value: message has no value", None, 0)
        declared = _find_header(headers, ENCODING_HEADER)
        enc = declared or sniff_encoding(value)
        if enc == "arrow":
            return self.arrow(value, topic, partition, offset, die)
        if enc == "avro-batch":
            return self.avro_batch(value, topic, partition, offset, die)
        if enc == "json":
            try:
                event = json.loads(value)
            except UnicodeDecodeError as exc:  # bytes that are not text at all
                return die(f"undecodable: not UTF-8 ({exc.reason} at byte {exc.start})", "json", 0)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError
                return die(f"bad_json: {exc}", "json", 0)
            if not isinstance(event, dict):
                return die(f"bad_json: expected an object, got {type(event).__name__}", "json", 0)
        elif enc == "avro":
            buf = io.BytesIO(value)
            try:
                # Schemaless: no writer schema travels. A v1 record is a prefix of a v2
                # one (the added fields close the schema), so read v1, then the added
                # fields from whatever is left: old producers' bytes decode unchanged.
                event = cast(dict[str, Any],
                             fastavro.schemaless_reader(buf, self.spec.avro_v1_raw_schema))
                if buf.tell() != len(value):
                    event.update(cast(dict[str, Any], fastavro.schemaless_reader(
                        buf, self.spec.avro_tail_raw_schema)))
            except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is the input's
                if declared is None and _is_text(value):  # unframed text: a broken JSON producer
                    return die("bad_json: not a JSON object", "json", 0)
                return die(f"undecodable: avro {type(exc).__name__} {exc}".rstrip(), "avro", 0)
            if buf.tell() != len(value):
                extra = len(value) - buf.tell()
                return die(f"undecodable: avro has {extra} trailing bytes", "avro", 0)
        else:
            return die(f"unknown_encoding: {enc[:64]}", None, -1)
        reason = self.problem(event)
        if reason is not None:
            return die(reason, enc, 0)
        self.rows.add(event, partition, offset, 0)

    def avro_batch(self, value: bytes, topic: str, partition: int, offset: int, die: _Die) -> None:
        try:
            reader = fastavro.reader(io.BytesIO(value))
            writer = _canonical(reader.writer_schema)
            # The v1 schema (old producers) is a subset: its records lack the added
            # fields, which from_pylist fills with nulls, so it needs no resolution.
            if writer not in (_canonical(self.spec.avro_schema),
                              _canonical(self.spec.avro_v1_schema)):
                # Another writer schema: let fastavro resolve it (slower, rare).
                reader = fastavro.reader(io.BytesIO(value), reader_schema=self.spec.avro_schema)
            records = cast(list[dict[str, Any]], list(reader))
            for rec in records:
                ts = rec.get("ts")
                if isinstance(ts, datetime):  # the reader applies the logical type
                    rec["ts"] = (ts - _EPOCH) // _ONE_MS
            table = pa.Table.from_pylist(records, schema=self.spec.wire_arrow_schema)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is the input's
            return die(
                f"undecodable: avro-batch {type(exc).__name__} {exc}".rstrip(), "avro-batch", -1
            )
        return self.accept_table(table, topic, partition, offset)

    def arrow(self, value: bytes, topic: str, partition: int, offset: int, die: _Die) -> None:
        try:
            table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
            table.validate(full=True)  # e.g. invalid UTF-8 in a string column
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is the input's
            return die(f"undecodable: arrow {type(exc).__name__} {exc}".rstrip(), "arrow", -1)
        declared = (table.schema.metadata or {}).get(b"hr-kind")
        if declared is not None and declared != self.kind.encode():
            return die(
                f"wrong_kind: envelope holds {declared.decode('utf-8', 'replace')} events",
                "arrow",
                -1,
            )
        conformed, problem = conform_table(self.kind, table)
        if conformed is None:
            return die(problem or "bad_type", "arrow", -1)
        return self.accept_table(conformed, topic, partition, offset)

    def accept_table(self, conformed: pa.Table, topic: str, partition: int, offset: int) -> None:
        """Validate an envelope's table (wire schema); keep good rows, dead-letter bad ones."""
        reasons = table_problems(
            self.kind, conformed, now_ms=self.now_ms, max_future_ms=self.max_future_ms
        )
        index = np.arange(conformed.num_rows, dtype=np.int32)
        if reasons:
            bad = sorted(reasons)
            for i, row in zip(bad, rows_as_python(conformed.take(bad)), strict=True):
                self.dead.append(
                    DeadLetter(reasons[i], event_json(row), topic, partition, offset, i, "json")
                )
            keep = np.ones(conformed.num_rows, dtype=bool)
            keep[bad] = False
            conformed = conformed.filter(pa.array(keep))
            index = index[keep]
        if not len(index):
            return None
        self.flush_rows()
        n = len(index)
        columns = [
            *conformed.columns,
            pa.array(np.full(n, partition, dtype=np.int32)),
            pa.array(np.full(n, offset, dtype=np.int64)),
            pa.array(index),
        ]
        self.segments.append(pa.Table.from_arrays(columns, schema=decoded_schema(self.kind)))
        return None

    def flush_rows(self) -> None:
        table = self.rows.take()
        if table is not None:
            self.segments.append(table)


def decode_batch(
    kind: EventKind, messages: Iterable[Any], *, now_ms: int, max_future_ms: int
) -> DecodedBatch:
    """Decode and validate consumed messages of one kind's topic.

    Args:
        kind: ``impression`` or ``click`` (the kind the topic carries).
        messages: :class:`RawMessage` tuples, or objects with ``value``, ``headers``,
            ``topic``, ``partition``, ``offset`` attributes or methods (aiokafka records,
            confluent-kafka messages).
        now_ms: Current time, epoch milliseconds (injected clock).
        max_future_ms: Events later than ``now_ms + max_future_ms`` are dead-lettered.

    Returns:
        Accepted rows in arrival order and the dead letters. Never raises on bad input.
    """
    decoder = _Decoder(kind, now_ms, max_future_ms)
    count = 0
    for msg in messages:
        count += 1
        value, headers, topic, partition, offset = _unpack(msg)
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        decoder.message(bytes(value or b""), headers, topic, partition, offset)
    decoder.flush_rows()
    if not decoder.segments:
        table = decoded_schema(kind).empty_table()
    elif len(decoder.segments) == 1:
        table = decoder.segments[0]
    else:
        table = pa.concat_tables(decoder.segments)
    return DecodedBatch(table=table, dead=decoder.dead, messages=count)


def dead_letter_headers(dl: DeadLetter) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead-letter message: reason, source topic/partition/offset, index,
    and ``hr-enc`` (the encoding of the value) when known."""
    headers = [
        ("hr-reason", dl.reason.encode("utf-8", "replace")),
        ("hr-source-topic", dl.topic.encode("utf-8", "replace")),
        ("hr-source-partition", str(dl.partition).encode("ascii")),
        ("hr-source-offset", str(dl.offset).encode("ascii")),
        ("hr-index", str(dl.index).encode("ascii")),
    ]
    if dl.encoding is not None:
        headers.append((ENCODING_HEADER, dl.encoding.encode("ascii")))
    return headers
