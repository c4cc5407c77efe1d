"""The wire codec: every encoding round-trips; every malformed input becomes a dead letter
with the right reason and nothing is lost (accepted + dead == events sent)."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import fastavro
import pyarrow as pa
import pytest

from streams.codec import (
    ENCODINGS,
    RawMessage,
    dead_letter_headers,
    decode_batch,
    decoded_schema,
    encode_arrow,
    encode_avro,
    encode_avro_batch,
    encode_events,
    encode_json,
)
from streams.events import EVENT_SPECS, event_problem

NOW = 1_700_000_000_000
FUTURE = 60_000


def impression(i: int = 0, **over: Any) -> dict[str, Any]:
    event = {
        "type": "impression",
        "event_id": f"imp-{i}",
        "ts": NOW - 1000 + i,
        "user_id": f"u{i % 7}",
        "ad_id": f"ad{i % 5}",
        "campaign_id": "cmp1",
        "publisher_id": "pub1",
        "placement": "feed",
        "creative_type": "banner",
        "device_type": "mobile",
        "country": "US",
        "bid_cpm": 1.25 + i,
    }
    event.update(over)
    return event


def click(i: int = 0, **over: Any) -> dict[str, Any]:
    event = {
        "type": "click",
        "event_id": f"clk-{i}",
        "ts": NOW - 500 + i,
        "impression_id": f"imp-{i}",
        "user_id": None,
        "ad_id": "ad1",
        "campaign_id": "cmp1",
        "publisher_id": "pub1",
    }
    event.update(over)
    return event


def as_rows(table: pa.Table) -> list[dict[str, Any]]:
    t = table.set_column(1, "ts", table.column("ts").cast(pa.int64()))
    return t.drop_columns(["_partition", "_offset", "_index"]).to_pylist()


def strip(event: dict[str, Any], kind: str) -> dict[str, Any]:
    return {f: event.get(f) for f in EVENT_SPECS[kind].fields}  # type: ignore[index]


def decode(kind: str, messages: list[Any]) -> Any:
    return decode_batch(kind, messages, now_ms=NOW, max_future_ms=FUTURE)  # type: ignore[arg-type]


def msgs(
    kind: str, events: list[dict[str, Any]], encoding: str, partition: int = 3
) -> list[RawMessage]:
    encoded = encode_events(kind, events, encoding)  # type: ignore[arg-type]
    return [RawMessage(m.value, m.headers, "t", partition, 100 + o) for o, m in enumerate(encoded)]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["impression", "click"])
def test_round_trip(kind: str, encoding: str) -> None:
    make = impression if kind == "impression" else click
    events = [make(i) for i in range(20)] + [make(20, user_id=None)]
    batch = decode(kind, msgs(kind, events, encoding))
    assert batch.dead == []
    assert batch.table.schema == decoded_schema(kind)  # type: ignore[arg-type]
    assert as_rows(batch.table) == [strip(e, kind) for e in events]
    assert set(batch.table.column("_partition").to_pylist()) == {3}
    if encoding in ("arrow", "avro-batch"):
        assert batch.messages == 1
        assert batch.table.column("_index").to_pylist() == list(range(21))
        assert set(batch.table.column("_offset").to_pylist()) == {100}
    else:
        assert batch.messages == 21
        assert batch.table.column("_offset").to_pylist() == list(range(100, 121))
        assert set(batch.table.column("_index").to_pylist()) == {0}


def test_big_integer_bid_is_a_float() -> None:
    batch = decode("impression", msgs("impression", [impression(0, bid_cpm=10**20)], "json"))
    assert batch.dead == [] and batch.table.column("bid_cpm").to_pylist() == [1e20]


def test_sniffing_without_header() -> None:
    events = [impression(i) for i in range(3)]
    values = [
        encode_json(events[0]),
        encode_avro("impression", events[1]),
        encode_arrow("impression", events[2:]),
        encode_avro_batch("impression", events[:1]),
    ]
    batch = decode("impression", [RawMessage(v, None, "t", 0, o) for o, v in enumerate(values)])
    assert batch.dead == []
    assert as_rows(batch.table) == [strip(e, "impression") for e in events + events[:1]]


def test_arrival_order_across_singles_and_envelopes() -> None:
    events = [impression(i) for i in range(9)]
    stream = (
        msgs("impression", events[:2], "json")
        + msgs("impression", events[2:5], "arrow")
        + msgs("impression", events[5:6], "avro")
        + msgs("impression", events[6:], "avro-batch")
    )
    batch = decode("impression", stream)
    assert [r["event_id"] for r in as_rows(batch.table)] == [e["event_id"] for e in events]


BAD_SINGLE = [
    ("missing_field: ad_id", {"ad_id": KeyError}),
    ("null_field: country", {"country": None}),
    ("bad_type: bid_cpm is str", {"bid_cpm": "1.0"}),
    ("bad_type: ts is float", {"ts": float(NOW)}),
    ("bad_type: ts is bool", {"ts": True}),
    ("bad_type: placement is int", {"placement": 3}),
    ("bad_value: bid_cpm is negative", {"bid_cpm": -0.5}),
    ("bad_value: bid_cpm is not finite", {"bid_cpm": float("nan")}),
    ("bad_value: bid_cpm is not finite", {"bid_cpm": float("inf")}),
    ("bad_value: country is not encodable", {"country": "\ud800"}),
    ("bad_id: user_id", {"user_id": "a b"}),
    ("bad_id: user_id", {"user_id": ""}),
    ("bad_id: event_id", {"event_id": "x{1}"}),
    ("bad_id: ad_id", {"ad_id": "a" * 300}),
    ("ts_too_old", {"ts": 5}),
    ("ts_in_future", {"ts": NOW + FUTURE + 1}),
]


def mutate(event: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(event)
    for key, value in change.items():
        if value is KeyError:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("reason", "change"), BAD_SINGLE, ids=[r for r, _ in BAD_SINGLE])
def test_bad_json_event_is_dead_with_raw_bytes(reason: str, change: dict[str, Any]) -> None:
    good, bad = impression(1), mutate(impression(2), change)
    stream = msgs("impression", [good, bad], "json")
    batch = decode("impression", stream)
    assert batch.table.num_rows == 1 and len(batch.dead) == 1
    dl = batch.dead[0]
    assert dl.reason.startswith(reason), dl.reason
    assert (dl.value, dl.offset, dl.index, dl.partition) == (stream[1].value, 101, 0, 3)


# Typed columns cannot hold a wrong type per row (see WHOLE_MESSAGE for column types).
# Arrow strings are UTF-8, so a lone surrogate cannot travel either.
BAD_ROW = [
    (r, c)
    for r, c in BAD_SINGLE
    if not r.startswith("bad_type") and "UTF" not in r and "encodable" not in r
]


@pytest.mark.parametrize(("reason", "change"), BAD_ROW, ids=[r for r, _ in BAD_ROW])
def test_bad_row_in_arrow_envelope_keeps_the_others(reason: str, change: dict[str, Any]) -> None:
    events = [impression(i) for i in range(5)]
    bad = mutate(events[2], change)
    # encode_events would send a non-conforming event as JSON; force it into the envelope
    # where Arrow can carry it, as a foreign producer might.
    value = encode_arrow("impression", events[:2] + [bad] + events[3:])
    batch = decode("impression", [RawMessage(value, [("hr-enc", b"arrow")], "t", 1, 7)])
    assert batch.table.column("_index").to_pylist() == [0, 1, 3, 4]
    assert len(batch.dead) == 1
    dl = batch.dead[0]
    # a row cannot lack a column: an absent field travels as null
    assert dl.reason.startswith(reason.replace("missing_field", "null_field")), dl.reason
    assert (dl.index, dl.offset, dl.encoding) == (2, 7, "json")
    carried = json.loads(dl.value)  # the event itself, re-encoded: nothing lost
    assert carried["event_id"] == bad.get("event_id")


@pytest.mark.parametrize("encoding", ["avro", "avro-batch"])
def test_valid_avro_with_bad_value(encoding: str) -> None:
    events = [impression(0), impression(1, bid_cpm=-2.0), impression(2)]
    value = (
        encode_avro_batch("impression", events)
        if encoding == "avro-batch"
        else encode_avro("impression", events[1])
    )
    batch = decode("impression", [RawMessage(value, [("hr-enc", encoding.encode())], "t", 0, 0)])
    assert [d.code for d in batch.dead] == ["bad_value"]
    if encoding == "avro-batch":
        assert batch.table.num_rows == 2 and batch.dead[0].index == 1
        assert json.loads(batch.dead[0].value)["bid_cpm"] == -2.0
    else:
        assert batch.dead[0].value == value


def envelope(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def base_table() -> pa.Table:
    return pa.Table.from_pylist(
        [strip(impression(i), "impression") for i in range(3)],
        schema=EVENT_SPECS["impression"].wire_arrow_schema,
    )


WHOLE_MESSAGE = [
    ("empty_value", None, None),
    ("empty_value", b"", [("hr-enc", b"json")]),
    ("unknown_encoding: protobuf", b"\x00", [("hr-enc", b"protobuf")]),
    ("bad_json", b"{not json", None),
    ("bad_json: expected an object, got list", b"[1, 2]", [("hr-enc", b"json")]),
    ("undecodable: not UTF-8", b"\xff\xfe{", [("hr-enc", b"json")]),
    ("undecodable: avro", b"\x01", None),
    ("undecodable: avro has", encode_avro("impression", impression()) + b"zz", None),
    ("undecodable: arrow", b"\xff\xff\xff\xffgarbage", None),
    ("undecodable: arrow", encode_arrow("impression", [impression()])[:-30], None),
    ("undecodable: avro-batch", b"Obj\x01broken", None),
    ("wrong_kind: envelope holds click", encode_arrow("click", [click()]), None),
    ("missing_field: bid_cpm", envelope(base_table().drop_columns(["bid_cpm"])), None),
    (
        "bad_type: bid_cpm is string",
        envelope(base_table().set_column(10, "bid_cpm", pa.array(["1", "2", "3"]))),
        None,
    ),
    (
        "bad_type: ts is timestamp[ms]",
        envelope(
            base_table().set_column(1, "ts", base_table().column("ts").cast(pa.timestamp("ms")))
        ),
        None,
    ),
]


@pytest.mark.parametrize(
    ("reason", "value", "headers"),
    WHOLE_MESSAGE,
    ids=[f"{i}-{r}" for i, (r, _, _) in enumerate(WHOLE_MESSAGE)],
)
def test_whole_message_dead(reason: str, value: bytes | None, headers: Any) -> None:
    batch = decode("impression", [RawMessage(value, headers, "topic-a", 2, 42)])
    assert batch.table.num_rows == 0
    assert len(batch.dead) == 1
    dl = batch.dead[0]
    assert dl.reason.startswith(reason), dl.reason
    assert dl.value == (value or b"")
    assert (dl.topic, dl.partition, dl.offset) == ("topic-a", 2, 42)


def test_arrow_envelope_tolerates_compatible_types_and_extra_columns() -> None:
    t = base_table()
    t = t.set_column(1, "ts", t.column("ts").cast(pa.int64()))
    t = t.set_column(0, "event_id", t.column("event_id").cast(pa.large_string()))
    t = t.drop_columns(["user_id"]).append_column("extra", pa.array([1, 2, 3]))
    batch = decode("impression", [RawMessage(envelope(t), None, "t", 0, 0)])
    assert batch.dead == [] and batch.table.num_rows == 3
    assert batch.table.column("user_id").null_count == 3


def test_accepted_plus_dead_equals_input() -> None:
    rng = random.Random(5)
    events, sent = [impression(i) for i in range(300)], 0
    stream: list[RawMessage] = []
    for i, e in enumerate(events):
        if rng.random() < 0.3:
            events[i] = mutate(e, rng.choice(BAD_SINGLE)[1])
    for enc in ENCODINGS:
        stream += msgs("impression", events, enc)
        sent += len(events)
    stream.append(RawMessage(b"{oops", None, "t", 0, 999))
    batch = decode("impression", stream)
    assert batch.table.num_rows + len(batch.dead) == sent + 1
    assert batch.table.num_rows == 4 * sum(
        event_problem("impression", e, now_ms=NOW, max_future_ms=FUTURE) is None for e in events
    )


def test_vectorized_and_per_event_paths_agree() -> None:
    rng = random.Random(11)
    events = []
    for i in range(400):
        e = impression(i)
        if rng.random() < 0.4:
            e = mutate(e, rng.choice(BAD_SINGLE)[1])
        events.append(e)
    single = decode("impression", msgs("impression", events, "json"))
    # an absent field travels as null in Arrow
    arrow_ok = [strip(e, "impression") for e in events if _arrow_can_carry(e)]
    env = decode("impression", [RawMessage(encode_arrow("impression", arrow_ok), None, "t", 0, 0)])
    expected = {
        e["event_id"]: event_problem("impression", e, now_ms=NOW, max_future_ms=FUTURE)
        for e in arrow_ok
        if isinstance(e.get("event_id"), str)
    }
    got = {json.loads(d.value)["event_id"]: d.reason for d in env.dead}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert len(single.dead) == sum(
        event_problem("impression", e, now_ms=NOW, max_future_ms=FUTURE) is not None for e in events
    )


def _arrow_can_carry(event: dict[str, Any]) -> bool:
    """Arrow holds the event as it is (no coercion of a wrong type)."""
    try:
        encode_arrow("impression", [event])
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError, OverflowError):
        return False
    reason = event_problem("impression", event, now_ms=NOW, max_future_ms=FUTURE) or ""
    return not reason.startswith("bad_type")


def test_encode_events_sends_non_conforming_event_as_json_in_place() -> None:
    events = [impression(0), impression(1, bid_cpm="oops"), impression(2), impression(3)]
    for encoding in ("arrow", "avro-batch", "avro"):
        encoded = encode_events("impression", events, encoding)  # type: ignore[arg-type]
        kinds = [(m.encoding, m.events) for m in encoded]
        if encoding == "avro":
            assert kinds == [("avro", 1), ("json", 1), ("avro", 1), ("avro", 1)]
        else:
            assert kinds == [(encoding, 1), ("json", 1), (encoding, 2)]
        batch = decode(
            "impression", [RawMessage(m.value, m.headers, "t", 0, o) for o, m in enumerate(encoded)]
        )
        assert [d.reason for d in batch.dead] == ["bad_type: bid_cpm is str"]
        assert batch.table.column("event_id").to_pylist() == ["imp-0", "imp-2", "imp-3"]


class ConfluentLike:
    """Messages with accessor methods, as confluent-kafka returns them."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return [("hr-enc", b"json")]

    def topic(self) -> str:
        return "impressions"

    def partition(self) -> int:
        return 1

    def offset(self) -> int:
        return 9


def test_message_objects_with_methods() -> None:
    batch = decode("impression", [ConfluentLike(encode_json(impression()))])
    assert batch.table.column("_offset").to_pylist() == [9]


def test_other_message_shapes() -> None:
    from collections import namedtuple
    from dataclasses import dataclass

    Other = namedtuple("Other", "topic partition offset value headers")

    @dataclass
    class Record:
        value: bytes
        headers: list[tuple[str, bytes]] | None
        topic: str
        partition: int
        offset: int

    value = encode_json(impression())
    batch = decode(
        "impression",
        [
            Other("a", 1, 5, value, None),
            Record(value, None, "b", 2, 6),
            (value, {"hr-enc": "json"}, "c", 3, 7),
        ],
    )
    assert batch.dead == []
    assert batch.table.column("_partition").to_pylist() == [1, 2, 3]
    assert batch.table.column("_offset").to_pylist() == [5, 6, 7]


def test_dead_letter_headers() -> None:
    batch = decode("impression", [RawMessage(b"{x", None, "hr.impressions", 2, 17)])
    headers = dict(dead_letter_headers(batch.dead[0]))
    assert headers["hr-reason"].startswith(b"bad_json: ")
    assert headers["hr-source-topic"] == b"hr.impressions"
    assert (headers["hr-source-partition"], headers["hr-source-offset"]) == (b"2", b"17")
    assert (headers["hr-index"], headers["hr-enc"]) == (b"0", b"json")


def test_avro_container_with_another_writer_schema_is_resolved() -> None:
    schema = json.loads(json.dumps(EVENT_SPECS["click"].avro_schema))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "user_id"]
    schema["fields"][1]["type"] = "long"
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(schema), [strip(click(1), "click")])
    batch = decode("click", [RawMessage(buf.getvalue(), None, "t", 0, 0)])
    assert batch.dead == []
    assert as_rows(batch.table) == [strip(click(1), "click")]


def test_empty_input() -> None:
    batch = decode("click", [])
    assert batch.table.num_rows == 0 and batch.table.schema == decoded_schema("click")
