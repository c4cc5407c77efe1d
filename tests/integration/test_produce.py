"""``headrace produce`` against the real local broker: topics created with the configured
partition count, every event routed to ``partition_for(user_id or event_id)``, file order
kept within each partition, and everything decodes back."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from feature_defs.layout import partition_for
from headrace.cli import build_parser
from headrace.core.settings import ProducerSettings
from streams.codec import RawMessage, decode_batch
from streams.synthetic import generate, write_jsonl

if TYPE_CHECKING:
    from conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

START = 1_704_067_200_000
PARTITIONS = 3


def _consume_all(settings: ProducerSettings, topic: str, want_events: int, kind: str) -> Any:
    """Read every message of ``topic`` (all partitions, from the start) until ``want_events``
    events decoded; never asks ListOffsets for the end (broker defect D1)."""
    consumer = Consumer(settings.confluent_consumer(f"{settings.topic_prefix}reader-{kind}"))
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        raw: list[RawMessage] = []
        decoded = 0
        deadline = time.monotonic() + 30
        while decoded < want_events and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    raise KafkaException(msg.error())
                raw.append(
                    RawMessage(
                        msg.value(), msg.headers(), msg.topic(), msg.partition(), msg.offset()
                    )
                )
            decoded = decode_batch(kind, raw, now_ms=START + 10**10, max_future_ms=0).table.num_rows  # type: ignore[arg-type]
        return decode_batch(kind, raw, now_ms=START + 10**10, max_future_ms=0)  # type: ignore[arg-type]
    finally:
        consumer.close()


@pytest.mark.parametrize("encoding", ["arrow", "json"])
def test_produce_file_routes_and_orders_per_partition(
    ns: Namespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    events = generate(30, 400, seed=8, start_ms=START, days=1).events
    path = tmp_path / "events.jsonl.gz"
    write_jsonl(path, events)
    settings = ns.settings(ProducerSettings, partitions=PARTITIONS, batch_events=25)
    args = build_parser().parse_args(
        ["produce", "--file", str(path), "--encoding", encoding, "--json", "--no-progress"]
    )
    assert args.func(args, settings=settings) == 0
    summary = json.loads(capsys.readouterr().out)
    n_clicks = sum(e["type"] == "click" for e in events)
    assert (summary["events"], summary["clicks"]) == (400, n_clicks)

    topics = AdminClient(settings.confluent_admin()).list_topics(timeout=10).topics
    for name in ("impressions", "clicks", "headrace-dlq"):
        assert len(topics[settings.topic(name)].partitions) == PARTITIONS

    expected: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in events:
        key = e["user_id"] if e["user_id"] is not None else e["event_id"]
        expected[(e["type"], partition_for(key, PARTITIONS))].append(e["event_id"])
    for kind, topic, count in (
        ("impression", "impressions", 400 - n_clicks),
        ("click", "clicks", n_clicks),
    ):
        batch = _consume_all(settings, settings.topic(topic), count, kind)
        assert batch.dead == []
        assert batch.table.num_rows == count
        got: dict[int, list[str]] = defaultdict(list)
        for row in batch.table.select(["event_id", "_partition"]).to_pylist():
            got[row["_partition"]].append(row["event_id"])
        for partition, ids in got.items():
            assert ids == expected[(kind, partition)], (kind, partition)
        assert sum(len(v) for v in got.values()) == count
