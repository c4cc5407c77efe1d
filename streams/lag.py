"""Consumer lag from the *fetch* high watermark.

ListOffsets(latest) is wrong on the embedded broker (defect D1, pinned by
``tests/integration/test_broker_contract.py``: it answers the base offset of the last
batch + 1), so the end of a partition is read from a fetch response:
assign the partition near its end, poll once, and take librdkafka's cached watermark.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PartitionLag", "consumer_lag"]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    group: str
    committed: int | None
    end: int
    lag: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def consumer_lag(consumer_config: dict[str, Any], group: str, topics: list[str],
                 timeout_s: float = 10.0) -> list[PartitionLag]:
    """Lag of ``group`` on every partition of ``topics`` (committed offsets from Kafka)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    from headrace.core.errors import BrokerError

    conf = {**consumer_config, "group.id": group, "enable.auto.commit": False,
            "enable.partition.eof": True}
    consumer = Consumer(conf)
    try:
        meta = consumer.list_topics(timeout=timeout_s)
        tps = [TopicPartition(t, p) for t in topics if t in meta.topics
               for p in sorted(meta.topics[t].partitions)]
        if not tps:
            return []
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in consumer.committed(tps, timeout=timeout_s)}
        # start at the committed offset (or the beginning): the first fetch reports the HW
        consumer.assign([TopicPartition(tp.topic, tp.partition,
                                        committed[(tp.topic, tp.partition)]
                                        if committed[(tp.topic, tp.partition)] >= 0
                                        else OFFSET_BEGINNING) for tp in tps])
        ends: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(tps) and time.monotonic() < deadline:
            consumer.poll(0.2)
            for tp in tps:
                key = (tp.topic, tp.partition)
                if key in ends:
                    continue
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high is not None and high >= 0:
                    ends[key] = high
        out = []
        for tp in tps:
            key = (tp.topic, tp.partition)
            c = committed[key]
            end = ends.get(key, -1)
            pos = c if c is not None and c >= 0 else 0
            out.append(PartitionLag(tp.topic, tp.partition, group,
                                    c if c is not None and c >= 0 else None, end,
                                    max(0, end - pos) if end >= 0 else -1))
        return out
    except KafkaException as exc:
        raise BrokerError(f"cannot read consumer lag: {exc}") from exc
    finally:
        consumer.close()
