"""Side outputs of the engine: dead letters, late events, re-keyed forwards.

Everything goes through one confluent-kafka producer (its idempotent mode works on the
embedded broker, unlike aiokafka's: defect D3 in the README's paragraph on the embedded
broker's known defects, pinned by ``tests/integration/test_broker_contract.py``) and is
made durable by :meth:`flush` before the engine records progress past it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from feature_defs.layout import TOPIC_DLQ, TOPIC_LATE, repartition_topic
from headrace.core.errors import BrokerError

__all__ = ["SideOutputs", "KafkaSideOutputs", "MemorySideOutputs", "encode_arrow"]


#: most rows in one forwarded message (~80 bytes each: well below a 1 MB message limit)
FORWARD_ROWS = 8192


def encode_arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _json_default(value: Any) -> Any:
    if hasattr(value, "timestamp"):  # event times travel as epoch ms
        return round(value.timestamp() * 1000)
    return value if isinstance(value, int) else str(value)


def _late_value(row: dict[str, Any]) -> bytes:
    event = {k: v for k, v in row.items() if not k.startswith("_")}
    return json.dumps(event, default=_json_default, separators=(",", ":")).encode()


class SideOutputs(Protocol):
    def dead_letter(self, dl: Any) -> None: ...
    def late(self, topic: str, row: dict[str, Any], watermark_ms: int) -> None: ...
    def forward(self, entity: str, rows: pa.Table) -> None: ...
    def send(self) -> None: ...
    def flush(self) -> None: ...


class KafkaSideOutputs:
    def __init__(
        self, producer_config: dict[str, Any], topic: Callable[[str], str], partitions: int
    ) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(producer_config)
        self._topic = topic
        self._partitions = partitions
        self._errors: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _produce(
        self,
        topic: str,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        key: bytes | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"value": value, "on_delivery": self._on_delivery}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        if key is not None:
            kwargs["key"] = key
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def dead_letter(self, dl: Any) -> None:
        from streams.codec import dead_letter_headers

        self._produce(self._topic(TOPIC_DLQ), dl.value or b"", dead_letter_headers(dl))

    def late(self, topic: str, row: dict[str, Any], watermark_ms: int) -> None:
        headers = [
            (
                "hr-reason",
                f"late: ts {_json_default(row['ts'])} < watermark {watermark_ms}".encode(),
            ),
            ("hr-source-topic", topic.encode()),
            ("hr-source-partition", str(row["_partition"]).encode()),
            ("hr-source-offset", str(row["_offset"]).encode()),
            ("hr-index", str(row["_index"]).encode()),
        ]
        self._produce(self._topic(TOPIC_LATE), _late_value(row), headers)

    def forward(self, entity: str, rows: pa.Table) -> None:
        # same partitions as ``partition_for`` (xxh64 of the UTF-8 id modulo the count)
        # hashed once per distinct id (an ad or campaign appears in many rows)
        h = xxhash.xxh64_intdigest
        ids = rows["entity_id"]
        uniq = pc.unique(ids)
        uniq_parts = np.fromiter((h(i.encode("utf-8")) for i in uniq.to_pylist()),
                                 dtype=np.uint64, count=len(uniq)) % np.uint64(self._partitions)
        parts = uniq_parts[pc.index_in(ids, value_set=uniq).to_numpy()]
        topic = self._topic(repartition_topic(entity))
        order = np.argsort(parts, kind="stable")  # keeps arrival order within a partition
        sorted_parts = parts[order]
        uniq, starts = np.unique(sorted_parts, return_index=True)
        bounds = [*starts.tolist(), len(parts)]
        by_part = rows.take(pa.array(order)) if len(uniq) > 1 else rows  # one take, slices
        for k, p in enumerate(uniq.tolist()):
            # consecutive messages of at most FORWARD_ROWS rows: a batch caught up on a
            # backlog would otherwise exceed the broker's message size
            for start in range(bounds[k], bounds[k + 1], FORWARD_ROWS):
                chunk = by_part.slice(start, min(FORWARD_ROWS, bounds[k + 1] - start))
                self._produce(topic, encode_arrow(chunk), [("hr-enc", b"arrow")], p)

    def send(self) -> None:
        """Start sending what is queued now (no linger), without waiting for delivery."""
        self._producer.flush(0)

    def flush(self) -> None:
        remaining = self._producer.flush(30)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise BrokerError(
                f"side outputs not delivered ({remaining} pending): {'; '.join(errors[:3])}"
            )


class MemorySideOutputs:
    """In-memory fake (unit tests)."""

    def __init__(self) -> None:
        self.dead: list[Any] = []
        self.lates: list[tuple[str, dict[str, Any], int]] = []
        self.forwards: list[tuple[str, pa.Table]] = []
        self.flushes = 0

    def dead_letter(self, dl: Any) -> None:
        self.dead.append(dl)

    def late(self, topic: str, row: dict[str, Any], watermark_ms: int) -> None:
        self.lates.append((topic, row, watermark_ms))

    def forward(self, entity: str, rows: pa.Table) -> None:
        self.forwards.append((entity, rows))

    def send(self) -> None:
        pass

    def flush(self) -> None:
        self.flushes += 1
