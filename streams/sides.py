"""Side outputs of the engine: dead letters, late events, re-keyed forwards.

Dead letters are malformed events (:class:`streams.codec.DeadLetter`) and quarantined
view states (:class:`CorruptState`: state bytes in Redis that cannot be decoded), both
on ``headrace-dlq`` with an ``hr-reason`` header whose first token is the reason code.

Everything goes through one confluent-kafka producer (its idempotent mode works on the
embedded broker, unlike aiokafka's: defect D3 in the README's paragraph on the embedded
broker's known defects, pinned by ``tests/integration/test_broker_contract.py``) and is
made durable by :meth:`flush` before the engine records progress past it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from feature_defs.layout import TOPIC_DLQ, TOPIC_LATE, repartition_topic
from headrace.core.errors import BrokerError
from headrace.core.retry import Outage

__all__ = ["SideOutputs", "KafkaSideOutputs", "MemorySideOutputs", "encode_arrow",
           "CorruptState", "CORRUPT_STATE", "CORRUPT_VALUE_MAX"]


#: most rows in one forwarded message (~80 bytes each: well below a 1 MB message limit)
FORWARD_ROWS = 8192

#: reason code of a quarantined view state (the first token of its ``hr-reason``)
CORRUPT_STATE: Final = "corrupt_state"
#: most bytes of a quarantined state's value published (below the broker's 1 MB message
#: limit, headers included): a larger value is cut there, its full size and digest are
#: in the headers. An undeliverable dead letter would stop the worker again
CORRUPT_VALUE_MAX: Final = 512 * 1024
#: seconds :meth:`KafkaSideOutputs.flush` waits per round while the broker is away
FLUSH_WAIT_S: Final = 5.0
#: seconds after which a flush without an outage tracker gives up
FLUSH_GIVE_UP_S: Final = 30.0


@dataclass(frozen=True)
class CorruptState:
    """A view state in the online store that cannot be decoded, as a dead letter.

    Published to ``headrace-dlq`` with the Redis key as the message key (every record of
    one state lands in one partition) and these headers: ``hr-reason``
    (``corrupt_state: <the decoder's sentence>``), ``hr-state-key``, ``hr-state-view``,
    ``hr-state-bytes`` (the stored value's full length), ``hr-state-xxh64`` (hex digest
    of the full stored value: the key of deduplication) and, so that readers of event
    dead letters parse every record alike, ``hr-source-topic`` empty and
    ``hr-source-partition`` / ``hr-source-offset`` / ``hr-index`` ``-1`` (no source
    message: a stored state, not an event). The value is the stored bytes (the first
    :data:`CORRUPT_VALUE_MAX` of them).

    Attributes:
        key: The Redis key (``hr:user:{u1}``).
        view: The view id, the hash field (``user_activity@1``).
        error: Why it cannot be decoded (the ``StateFormatError`` sentence).
        value: The stored bytes, whole.
    """

    key: str
    view: str
    error: str
    value: bytes

    @property
    def reason(self) -> str:
        """``"corrupt_state: <error>"``."""
        return f"{CORRUPT_STATE}: {self.error}"

    @property
    def code(self) -> str:
        """The reason code (a metric label), :data:`CORRUPT_STATE`."""
        return CORRUPT_STATE

    def digest(self) -> str:
        """xxh64 of the full stored value, 16 hex digits."""
        return xxhash.xxh64_hexdigest(self.value)

    def payload(self) -> bytes:
        """The published value: the stored bytes, cut at :data:`CORRUPT_VALUE_MAX`."""
        return self.value[:CORRUPT_VALUE_MAX]

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers (see the class docstring)."""
        return [
            ("hr-reason", self.reason.encode("utf-8", "replace")),
            ("hr-state-key", self.key.encode("utf-8", "replace")),
            ("hr-state-view", self.view.encode("utf-8", "replace")),
            ("hr-state-bytes", str(len(self.value)).encode("ascii")),
            ("hr-state-xxh64", self.digest().encode("ascii")),
            ("hr-source-topic", b""),
            ("hr-source-partition", b"-1"),
            ("hr-source-offset", b"-1"),
            ("hr-index", b"-1"),
        ]


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
    def dead_letter(self, dl: Any) -> None:
        """Queue a :class:`~streams.codec.DeadLetter` or a :class:`CorruptState` for
        ``headrace-dlq`` (durable after :meth:`flush`)."""
        ...

    def late(self, topic: str, row: dict[str, Any], watermark_ms: int) -> None: ...
    def forward(self, entity: str, rows: pa.Table) -> None: ...
    def send(self) -> None: ...
    def flush(self) -> None: ...


class KafkaSideOutputs:
    """Side outputs on Kafka (confluent-kafka).

    With an ``outage``, a broker that is away is waited out: librdkafka keeps every
    message and retries it (``message.timeout.ms`` 0: no give-up), and :meth:`flush`
    waits for delivery however long it takes, logging the outage's start and end
    (:class:`~headrace.core.retry.Outage`). Without one, :meth:`flush` gives up after
    :data:`FLUSH_GIVE_UP_S`. A delivery error librdkafka will not retry (a message too
    large, a missing topic, no authorization) is raised either way.
    """

    def __init__(
        self, producer_config: dict[str, Any], topic: Callable[[str], str], partitions: int,
        outage: Outage | None = None,
    ) -> None:
        from confluent_kafka import Producer

        self.outage = outage
        if outage is not None:
            producer_config = {**producer_config, "message.timeout.ms": 0}
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

        if isinstance(dl, CorruptState):
            self._produce(self._topic(TOPIC_DLQ), dl.payload(), dl.headers(),
                          key=dl.key.encode("utf-8", "replace"))
            return
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
        remaining = self._producer.flush(FLUSH_WAIT_S if self.outage else FLUSH_GIVE_UP_S)
        if remaining and not self._errors and self.outage is not None:
            outage = self.outage
            outage.begin()
            ok = False
            try:
                while remaining and not self._errors:
                    outage.failed("deliver side outputs",
                                  BrokerError(f"{remaining} messages not delivered after "
                                              f"{FLUSH_WAIT_S:.0f} s"), FLUSH_WAIT_S)
                    remaining = self._producer.flush(FLUSH_WAIT_S)
                ok = not remaining
            finally:
                outage.end(ok)
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
