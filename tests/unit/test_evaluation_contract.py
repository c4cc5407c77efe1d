"""The input contract's optional evaluation fields (schema v2): old producers keep working
(JSON without them, Avro bytes written with the v1 schemas), new values are validated."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import fastavro
import pytest

from streams.codec import RawMessage, decode_batch, encode_events
from streams.events import EVENT_SPECS, event_problem

NOW = 1_700_000_000_000
TS = NOW - 60_000

# The v1 schemas exactly as producers had them before the evaluation fields (written
# out here, not taken from the code, so the test pins the old wire format).
V1_IMPRESSION = {
    "type": "record", "name": "Impression", "namespace": "headrace.events", "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "user_id", "type": ["null", "string"], "default": None},
        {"name": "ad_id", "type": "string"}, {"name": "campaign_id", "type": "string"},
        {"name": "publisher_id", "type": "string"}, {"name": "placement", "type": "string"},
        {"name": "creative_type", "type": "string"}, {"name": "device_type", "type": "string"},
        {"name": "country", "type": "string"}, {"name": "bid_cpm", "type": "double"}]}
V1_CLICK = {
    "type": "record", "name": "Click", "namespace": "headrace.events", "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "impression_id", "type": "string"},
        {"name": "user_id", "type": ["null", "string"], "default": None},
        {"name": "ad_id", "type": "string"}, {"name": "campaign_id", "type": "string"},
        {"name": "publisher_id", "type": "string"}]}


def _imp(**extra: Any) -> dict[str, Any]:
    return {"event_id": "i1", "ts": TS, "user_id": "u1", "ad_id": "a1", "campaign_id": "c1",
            "publisher_id": "p1", "placement": "feed", "creative_type": "banner",
            "device_type": "mobile", "country": "US", "bid_cpm": 1.5, **extra}


def _click(**extra: Any) -> dict[str, Any]:
    return {"event_id": "k1", "ts": TS, "impression_id": "i1", "user_id": None, "ad_id": "a1",
            "campaign_id": "c1", "publisher_id": "p1", **extra}


def _decode(kind: str, value: bytes, enc: str) -> Any:
    msg = RawMessage(value, [("hr-enc", enc.encode())], kind + "s", 0, 7)
    return decode_batch(kind, [msg], now_ms=NOW, max_future_ms=3_600_000)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "schema", "event"), [
    ("impression", V1_IMPRESSION, _imp()), ("click", V1_CLICK, _click())])
def test_schemaless_avro_written_with_the_v1_schema_decodes(kind: str, schema: dict,
                                                             event: dict) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), event)
    out = _decode(kind, buf.getvalue(), "avro")
    assert out.dead == []
    row = out.table.to_pylist()[0]
    assert row["event_id"] == event["event_id"] and row["model_version"] is None
    assert row["p_ctr"] is None and row["prediction_id"] is None


@pytest.mark.parametrize(("kind", "schema", "event"), [
    ("impression", V1_IMPRESSION, _imp()), ("click", V1_CLICK, _click())])
def test_avro_containers_written_with_the_v1_schema_decode(kind: str, schema: dict,
                                                            event: dict) -> None:
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(schema), [event, {**event, "event_id": "e2"}])
    out = _decode(kind, buf.getvalue(), "avro-batch")
    assert out.dead == [] and out.table.num_rows == 2
    assert out.table.column("model_version").null_count == 2


def test_v2_avro_round_trips_the_new_fields_single_and_batched() -> None:
    ev = _imp(prediction_id="pr-1", model_version="v4", p_ctr=0.0125)
    for enc in ("avro", "avro-batch", "arrow", "json"):
        (msg,) = encode_events("impression", [ev], enc)  # type: ignore[arg-type]
        out = _decode("impression", msg.value, enc)
        assert out.dead == [], (enc, out.dead)
        row = out.table.to_pylist()[0]
        assert (row["prediction_id"], row["model_version"], row["p_ctr"]) == \
            ("pr-1", "v4", 0.0125), enc
    clk = _click(model_version="v4", p_ctr=0.5, device_type="mobile", country="US")
    (msg,) = encode_events("click", [clk], "avro")
    row = _decode("click", msg.value, "avro").table.to_pylist()[0]
    assert (row["model_version"], row["p_ctr"], row["device_type"]) == ("v4", 0.5, "mobile")


def test_json_without_the_fields_is_accepted_unchanged() -> None:
    out = _decode("impression", json.dumps(_imp()).encode(), "json")
    assert out.dead == [] and out.table.column("model_version").null_count == 1
    assert EVENT_SPECS["impression"].arrow_schema.field("p_ctr").nullable


@pytest.mark.parametrize(("extra", "reason"), [
    ({"p_ctr": 1.5}, "bad_value: p_ctr is not in [0, 1] (1.5)"),
    ({"p_ctr": -0.01}, "bad_value: p_ctr is not in [0, 1] (-0.01)"),
    ({"p_ctr": math.nan}, "bad_value: p_ctr is not in [0, 1] (nan)"),
    ({"p_ctr": 10**400}, "bad_value: p_ctr is not in [0, 1] (inf)"),
    ({"p_ctr": "0.1"}, "bad_type: p_ctr is str"),
    ({"model_version": "v 4"}, "bad_id: model_version contains a brace, whitespace or a "
                               "control character"),
    ({"model_version": "v4}{x"}, "bad_id: model_version contains a brace, whitespace or a "
                                 "control character"),
    ({"prediction_id": ""}, "bad_id: prediction_id must not be empty"),
    ({"model_version": 4}, "bad_type: model_version is int"),
])
def test_invalid_new_fields_are_dead_lettered_with_a_reason(extra: dict, reason: str) -> None:
    ev = _imp(**extra)
    assert event_problem("impression", ev, now_ms=NOW, max_future_ms=0) == reason
    if "10**400" in repr(extra) or isinstance(extra.get("p_ctr"), int):
        return  # not JSON-encodable as a number
    out = _decode("impression", json.dumps(ev).encode(), "json")
    assert [d.reason for d in out.dead] == [reason] and out.table.num_rows == 0


def test_the_vectorized_path_agrees_on_p_ctr_bounds() -> None:
    events = [_imp(event_id=f"i{i}", p_ctr=p, model_version="v4")
              for i, p in enumerate([0.0, 1.0, 1.0000001, None, -0.0, 0.3])]
    (msg,) = encode_events("impression", events, "arrow")
    out = _decode("impression", msg.value, "arrow")
    assert [(d.index, d.reason) for d in out.dead] == [
        (2, "bad_value: p_ctr is not in [0, 1] (1.0000001)")]
    assert out.table.column("p_ctr").to_pylist() == [0.0, 1.0, None, -0.0, 0.3]


def test_trailing_garbage_after_a_v1_record_is_still_undecodable() -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(V1_CLICK), _click())
    out = _decode("click", buf.getvalue() + b"\x02", "avro")  # union index 1, no string
    assert out.table.num_rows == 0 and out.dead[0].reason.startswith("undecodable: avro")
