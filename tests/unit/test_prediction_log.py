"""The prediction record's wire format and the off-path buffer of the prediction log
(no network: the Kafka client is built but never reaches a broker)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import threading
from typing import Any

import fastavro
import numpy as np
import pytest

from feature_defs.layout import TOPIC_PREDICTIONS
from feature_defs.predictions import (
    PREDICTION_SCHEMA,
    PREDICTION_SCHEMA_1,
    PREDICTION_SCHEMA_2,
    SCHEMA_ID,
    SCHEMAS,
    Arm,
    PredictionFormatError,
    PredictionRecord,
    decode_prediction,
    encode_prediction,
)
from serving.metrics import ServingMetrics
from serving.offpath import OffPath
from serving.prediction_log import KafkaPredictionLog, MemoryPredictionLog

#: sha256 of ``json.dumps(PREDICTION_SCHEMA_1, sort_keys=True)``, as committed at fa55974
SCHEMA_1_SHA256 = "98b98a7a0afc836e417e863a3ef2bff6db9eef1d902d709444acebbd6e55abcc"
#: sha256 of ``json.dumps(PREDICTION_SCHEMA_2, sort_keys=True)``, the id-2 schema as it was
#: the current one (before id 3 existed)
SCHEMA_2_SHA256 = "ac1784681d9e9ceaed6336e823edd6966c0018cf83b69076156d885fe490f58f"


def record(pid: str = "p-1", n: int = 4, **kw: Any) -> PredictionRecord:
    base: dict[str, Any] = dict(
        prediction_id=pid, ts=1_700_000_000_123, user_id="u1", publisher_id="pub1",
        country="US", device_type="mobile", placement=None, creative_type="video",
        ad_ids=[f"a{i}" for i in range(n)], campaign_ids=[f"c{i % 2}" for i in range(n)],
        p_ctr=np.linspace(0.01, 0.04, n), ranks=np.arange(n)[::-1].copy(), chosen_rank=0,
        arm=Arm.CHALLENGER, model_version="2026-01-01-00", shadow=False, latency_ms=1.25)
    base.update(kw)
    return PredictionRecord(**base)


# ---------------------------------------------------------------- the wire format
def test_round_trip() -> None:
    rec = record()
    value = encode_prediction(rec)
    assert value[0] == 0 and struct.unpack(">I", value[1:5])[0] == SCHEMA_ID == 3
    back = decode_prediction(value)
    assert back.p_ctr == tuple(rec.p_ctr.tolist())  # type: ignore[union-attr]
    assert back.ranks == (3, 2, 1, 0) and back.ad_ids == ("a0", "a1", "a2", "a3")
    assert back.campaign_ids == ("c0", "c1", "c0", "c1")
    for name in ("prediction_id", "ts", "user_id", "publisher_id", "country", "device_type",
                 "placement", "creative_type", "chosen_rank", "arm", "model_version",
                 "shadow", "latency_ms", "error", "propensity", "explored", "policy"):
        assert getattr(back, name) == getattr(rec, name), name
    assert isinstance(back.arm, Arm)


def test_round_trip_of_anonymous_shadow_and_error_records() -> None:
    anon = record(user_id=None, publisher_id=None, country=None, device_type=None,
                  creative_type=None, shadow=True, chosen_rank=2, arm=Arm.CHAMPION)
    assert decode_prediction(encode_prediction(anon)) == record(
        user_id=None, publisher_id=None, country=None, device_type=None, creative_type=None,
        shadow=True, chosen_rank=2, arm=Arm.CHAMPION, p_ctr=tuple(anon.p_ctr.tolist()),  # type: ignore[union-attr]
        ranks=(3, 2, 1, 0), ad_ids=("a0", "a1", "a2", "a3"),
        campaign_ids=("c0", "c1", "c0", "c1"))
    err = record(p_ctr=(), ranks=(), chosen_rank=None, error="model v cannot predict: x")
    back = decode_prediction(encode_prediction(err))
    assert back.error == err.error and back.p_ctr == () and back.chosen_rank is None
    assert len(back.ad_ids) == 4  # what was asked stays known


def test_round_trip_of_the_feature_row_with_nan() -> None:
    row = np.array([0.5, np.nan, -3.25, 1e300, 0.0])
    back = decode_prediction(encode_prediction(record(features=row)))
    assert len(back.features) == 5 and isinstance(back.features, tuple)
    assert back.features[0] == 0.5 and math.isnan(back.features[1])
    assert back.features[2:] == (-3.25, 1e300, 0.0)
    # a plain sequence works too, and no features is an empty tuple
    assert decode_prediction(encode_prediction(record(features=[1, 2.5]))).features == (1.0,
                                                                                        2.5)
    assert decode_prediction(encode_prediction(record())).features == ()


def test_a_schema_1_record_decodes_with_no_features() -> None:
    """Records written before schema id 2 (by the previous server) still read."""
    doc = record().to_avro()
    del doc["features"], doc["propensity"], doc["explored"], doc["policy"]
    buf = io.BytesIO()
    buf.write(struct.pack(">BI", 0, 1))
    fastavro.schemaless_writer(buf, SCHEMAS[1], doc)
    back = decode_prediction(buf.getvalue())
    assert back.features == ()
    assert back.ad_ids == ("a0", "a1", "a2", "a3") and back.model_version == "2026-01-01-00"
    assert back.ranks == (3, 2, 1, 0) and back.latency_ms == 1.25
    assert back.propensity is None and back.explored is False and back.policy is None


def test_round_trip_of_the_exploration_fields() -> None:
    """Schema id 3: propensity, explored and policy survive the wire exactly."""
    rec = record(propensity=0.0125, explored=True, policy="eps-greedy:0.05")
    back = decode_prediction(encode_prediction(rec))
    assert back.propensity == 0.0125 and back.explored is True
    assert back.policy == "eps-greedy:0.05"
    greedy = decode_prediction(encode_prediction(record(propensity=1.0, policy="greedy")))
    assert (greedy.propensity, greedy.explored, greedy.policy) == (1.0, False, "greedy")
    # the defaults (an old caller, an error record): null, false, null
    plain = decode_prediction(encode_prediction(record()))
    assert (plain.propensity, plain.explored, plain.policy) == (None, False, None)
    # a numpy scalar is written as a double
    assert decode_prediction(encode_prediction(record(
        propensity=np.float64(0.5)))).propensity == 0.5


def test_a_schema_2_record_decodes_with_no_propensity() -> None:
    """Records written by the previous server (id 2, with features) still read: the
    exploration fields take their defaults."""
    doc = record(features=[1.5, 2.0]).to_avro()
    del doc["propensity"], doc["explored"], doc["policy"]
    buf = io.BytesIO()
    buf.write(struct.pack(">BI", 0, 2))
    fastavro.schemaless_writer(buf, SCHEMAS[2], doc)
    back = decode_prediction(buf.getvalue())
    assert back.features == (1.5, 2.0) and back.arm is Arm.CHALLENGER
    assert back.propensity is None and back.explored is False and back.policy is None
    assert back.ranks == (3, 2, 1, 0) and back.model_version == "2026-01-01-00"


def test_schema_1_and_2_are_never_edited() -> None:
    """The id-1 and id-2 schemas as committed before the next id existed (hashes of
    their sorted JSON); id 3 only appends fields."""
    text = json.dumps(PREDICTION_SCHEMA_1, sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == SCHEMA_1_SHA256
    text = json.dumps(PREDICTION_SCHEMA_2, sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == SCHEMA_2_SHA256
    assert [f["name"] for f in PREDICTION_SCHEMA["fields"]] == [
        *(f["name"] for f in PREDICTION_SCHEMA_1["fields"]), "features", "propensity",
        "explored", "policy"]
    assert set(SCHEMAS) == {1, 2, 3}


def test_mismatched_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        encode_prediction(record(ranks=[0]))


@pytest.mark.parametrize(("value", "why"), [
    (b"", "shorter than the header"), (b"\x01\x00\x00\x00\x01xx", "magic"),
    (b"\x00\x00\x00\x00\x07xx", "unknown schema id 7"),
])
def test_bad_headers(value: bytes, why: str) -> None:
    with pytest.raises(PredictionFormatError, match=why):
        decode_prediction(value)


def test_truncated_and_trailing_bytes() -> None:
    value = encode_prediction(record())
    with pytest.raises(PredictionFormatError):
        decode_prediction(value[:-3])
    with pytest.raises(PredictionFormatError, match="trailing"):
        decode_prediction(value + b"\x00")


def test_an_older_schema_is_resolved_to_the_current_one(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Evolution: a record of a hypothetical earlier id without ``shadow`` and ``error``
    reads with their defaults."""
    old = dict(PREDICTION_SCHEMA)
    old["fields"] = [f for f in PREDICTION_SCHEMA["fields"] if f["name"] not in
                     ("shadow", "error")]
    parsed = fastavro.parse_schema(old)
    monkeypatch.setitem(SCHEMAS, 0, parsed)
    doc = record().to_avro()
    del doc["shadow"], doc["error"]
    buf = io.BytesIO()
    buf.write(struct.pack(">BI", 0, 0))
    fastavro.schemaless_writer(buf, parsed, doc)
    back = decode_prediction(buf.getvalue())
    assert back.shadow is False and back.error is None and back.ad_ids[0] == "a0"


def test_topic_name() -> None:
    assert TOPIC_PREDICTIONS == "headrace-predictions"


# ---------------------------------------------------------------- the buffer
def unreachable_log(buffer: int, metrics: ServingMetrics) -> KafkaPredictionLog:
    # port 9 on loopback: nothing listens; the thread is never started here
    conf = {"bootstrap.servers": "127.0.0.1:9"}
    return KafkaPredictionLog(conf, conf, "t.headrace-predictions", partitions=2,
                              buffer=buffer, metrics=metrics)


def test_a_full_buffer_drops_counted_and_never_blocks() -> None:
    metrics = ServingMetrics()
    log = unreachable_log(5, metrics)
    done = threading.Event()

    def flood() -> None:
        for i in range(1000):  # the sending thread is not started: nothing drains
            log.log(record(f"p{i}"))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(10), "log() blocked on a full buffer"
    assert metrics.value("headrace_prediction_log_total", outcome="dropped_buffer") == 995
    assert metrics.value("headrace_prediction_log_available") == 1  # nothing tried yet


def test_offpath_works_items_off_and_survives_a_failing_one() -> None:
    seen: list[int] = []

    def work(i: int) -> None:
        if i == 3:
            raise RuntimeError("boom")
        seen.append(i)

    q: OffPath[int] = OffPath("t", work, maxsize=100)
    q.start()
    for i in range(10):
        assert q.offer(i)
    q.stop()
    assert seen == [0, 1, 2, 4, 5, 6, 7, 8, 9] and q.dropped == 0


def test_offpath_stop_with_a_full_queue_drops_the_rest() -> None:
    gate = threading.Event()
    def work(_i: int) -> None:
        gate.wait(5)

    q: OffPath[int] = OffPath("t", work, maxsize=2)
    q.start()
    for i in range(5):
        q.offer(i)
    assert q.dropped >= 2
    gate.set()
    q.stop(1.0)  # returns although the queue was full when it was called


def test_memory_log_is_bounded() -> None:
    log = MemoryPredictionLog(maxsize=2)
    for i in range(5):
        log.log(record(f"p{i}"))
    assert [r.prediction_id for r in log.records] == ["p0", "p1"] and log.dropped == 3
