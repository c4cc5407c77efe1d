"""``headrace produce --csv`` with the real TalkingData and Avazu samples against the real
local broker: every event arrives once, decodes valid, and matches the mapping."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from headrace.core.settings import ProducerSettings
from streams.codec import RawMessage, decode_batch
from streams.csv_replay import iter_csv_events
from streams.events import rows_as_python
from tests.shared_data import data_file, require

if TYPE_CHECKING:
    from conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TALKINGDATA = data_file("talkingdata", "talkingdata_train_sample_100k.csv")
AVAZU = data_file("avazu", "avazu_train_head_8999.csv")
NOW_MS = 2_000_000_000_000  # 2033: every sample event lies before it


def consume(settings: ProducerSettings, topic: str, kind: str, want: int) -> list[dict[str, Any]]:
    """Every event of ``topic`` (all partitions, from offset 0) once ``want`` decoded; the
    end is never taken from ListOffsets (broker defect D1, README "Stream workers")."""
    consumer = Consumer(settings.confluent_consumer(f"{settings.topic_prefix}reader-{kind}"))
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
        raw: list[RawMessage] = []
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while len(rows) < want and time.monotonic() < deadline:
            got = consumer.consume(num_messages=1000, timeout=0.5)
            for msg in got:
                if msg.error():
                    raise KafkaException(msg.error())
                raw.append(RawMessage(msg.value(), msg.headers(), msg.topic(), msg.partition(),
                                      msg.offset()))
            if got:
                batch = decode_batch(kind, raw, now_ms=NOW_MS, max_future_ms=0)  # type: ignore[arg-type]
                assert batch.dead == []
                rows = rows_as_python(batch.table)
        return rows
    finally:
        consumer.close()


def produce(ns: Namespace, path: Path, mapping: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "headrace.cli", "produce", "--csv", str(path), "--mapping",
         mapping, "--json", "--no-progress"],
        env=ns.subprocess_env(), capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


@pytest.mark.parametrize(("source", "mapping", "rows"), [
    (TALKINGDATA, "talkingdata", 2000),
    (AVAZU, "avazu", None),
])
def test_replay_sample_to_the_broker(ns: Namespace, tmp_path: Path, source: Path, mapping: str,
                                     rows: int | None) -> None:
    path = require(source)
    if rows is not None:  # the first rows (plus header), written outside the repository
        path = tmp_path / source.name
        with source.open() as src, path.open("w") as dst:
            for _, line in zip(range(rows + 1), src, strict=False):
                dst.write(line)
    expected = list(iter_csv_events(path, mapping))
    n_clicks = sum(e["type"] == "click" for e in expected)
    summary = produce(ns, path, mapping)
    assert summary["rows"] == summary["impressions"] == len(expected) - n_clicks
    assert summary["clicks"] == n_clicks > 0
    if mapping == "avazu":
        assert (summary["rows"], summary["clicks"]) == (8999, 1563)

    settings = ns.settings(ProducerSettings)
    by_id = {e["event_id"]: e for e in expected}
    for kind, topic, count in (("impression", "impressions", summary["impressions"]),
                               ("click", "clicks", summary["clicks"])):
        got = consume(settings, settings.topic(topic), kind, count)
        assert len(got) == count
        assert {r["event_id"] for r in got} == {e for e, v in by_id.items() if v["type"] == kind}
        for row in got[:: max(1, count // 25)]:  # a spread of events, field by field
            want = by_id[row["event_id"]]
            for name, value in want.items():
                if name != "type":
                    assert row[name] == value, (row["event_id"], name)
        # Within a partition the replay is in event-time order.
        per_partition: dict[int, list[int]] = {}
        for r in got:
            per_partition.setdefault(r["_partition"], []).append(r["ts"])
        assert all(ts == sorted(ts) for ts in per_partition.values())
