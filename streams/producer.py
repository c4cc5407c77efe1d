"""Publishing events to the ``impressions`` and ``clicks`` topics.

:class:`EventProducer` routes every event explicitly to
``partition_for(user_id or event_id, settings.partitions)`` (so a user's impressions and
clicks share a partition number), keeps the input order within each partition, and
encodes per ``settings.encoding`` (see :mod:`streams.codec`): one message per event for
``json``/``avro``, envelopes of up to ``settings.batch_events`` events per (topic,
partition) for ``arrow``/``avro-batch``.

The broker sits behind a three-method :class:`MessageSink`: :class:`KafkaSink`
(confluent-kafka) or :class:`MemorySink` (tests).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from feature_defs.layout import TOPIC_DLQ, partition_for
from headrace.core.errors import BrokerError, InputError, missing_extra
from streams.codec import BATCH_ENCODINGS, ENCODINGS, Encoding, encode_events
from streams.events import EVENT_SPECS, KINDS, EventKind, routing_key

if TYPE_CHECKING:
    from headrace.core.settings import ProducerSettings

__all__ = [
    "MessageSink",
    "SentMessage",
    "MemorySink",
    "KafkaSink",
    "ProduceCounts",
    "EventProducer",
]


class MessageSink(Protocol):
    """Where produced messages go."""

    def ensure_topics(self, topics: Sequence[str], partitions: int) -> None:
        """Create missing topics with ``partitions`` partitions; fail on a different count."""

    def send(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Queue one message for an explicit partition (order kept per partition)."""

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued message is delivered; raise ``BrokerError`` otherwise."""


@dataclass(frozen=True)
class SentMessage:
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class MemorySink:
    """An in-memory :class:`MessageSink` recording what would have been produced."""

    messages: list[SentMessage] = field(default_factory=list)
    topics: dict[str, int] = field(default_factory=dict)

    def ensure_topics(self, topics: Sequence[str], partitions: int) -> None:
        for topic in topics:
            self.topics.setdefault(topic, partitions)

    def send(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> None:
        self.messages.append(SentMessage(topic, partition, key, value, list(headers)))

    def flush(self, timeout_s: float) -> None:
        return None


class KafkaSink:
    """A :class:`MessageSink` over a confluent-kafka producer.

    Idempotence is switched on unless the settings say otherwise, so librdkafka retries
    cannot reorder messages within a partition (Tansu supports it; defect D3 is aiokafka's
    idempotence, see ``tests/integration/test_broker_contract.py``).
    """

    def __init__(self, settings: ProducerSettings) -> None:
        try:
            import confluent_kafka
        except ModuleNotFoundError as exc:
            raise missing_extra("confluent-kafka", "stream") from exc
        self._ck = confluent_kafka
        self._settings = settings
        conf = settings.confluent_producer()
        conf.setdefault("enable.idempotence", True)
        self._producer = confluent_kafka.Producer(conf)
        self._errors: list[str] = []

    def ensure_topics(self, topics: Sequence[str], partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient(self._settings.confluent_admin())
        try:
            existing = admin.list_topics(timeout=15).topics
        except self._ck.KafkaException as exc:
            raise BrokerError(
                f"cannot list topics at {self._settings.kafka_bootstrap}: {exc}"
            ) from exc
        missing = []
        for topic in dict.fromkeys(topics):
            meta = existing.get(topic)
            if meta is None or meta.error is not None:
                missing.append(topic)
            elif len(meta.partitions) != partitions:
                raise BrokerError(
                    f"topic {topic} has {len(meta.partitions)} partitions but HEADRACE_PARTITIONS "
                    f"is {partitions}; routing would differ, so delete the topic or fix the setting"
                )
        if not missing:
            return
        replication = 1 if self._settings.embedded else -1  # -1: the cluster's default
        futures = admin.create_topics(
            [
                NewTopic(t, num_partitions=partitions, replication_factor=replication)
                for t in missing
            ]
        )
        for topic, future in futures.items():
            try:
                future.result(timeout=30)
            except self._ck.KafkaException as exc:
                if exc.args and exc.args[0].code() == self._ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created concurrently by another process
                raise BrokerError(f"cannot create topic {topic}: {exc}") from exc

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None and len(self._errors) < 10:
            self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def send(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> None:
        hdrs: list[tuple[str, str | bytes | None]] = list(headers)
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=partition,
                    headers=hdrs,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.05)
            except self._ck.KafkaException as exc:
                raise BrokerError(f"cannot produce to {topic}[{partition}]: {exc}") from exc
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        remaining = self._producer.flush(timeout_s)
        if self._errors:
            raise BrokerError(f"delivery failed: {self._errors[0]}")
        if remaining:
            raise BrokerError(f"{remaining} message(s) not delivered within {timeout_s:g} s")


@dataclass
class ProduceCounts:
    """What a producer sent. ``json_fallbacks``: events that did not fit a typed encoding."""

    events: int = 0
    impressions: int = 0
    clicks: int = 0
    messages: int = 0
    json_fallbacks: int = 0

    def add(self, other: ProduceCounts) -> None:
        for name in ("events", "impressions", "clicks", "messages", "json_fallbacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Progress:
    """A one-line ``\\r`` progress display on stderr, redrawn at most every 0.5 s."""

    def __init__(
        self, enabled: bool, total: int | None, stream: IO[str], clock: Callable[[], float]
    ) -> None:
        self.enabled, self.total, self.stream, self.clock = enabled, total, stream, clock
        self.started = self.last = clock()
        self.drawn = False

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        self.stream.write(f"\rproduce: {done:,}{of} events  {rate:,.0f} events/s ")
        self.stream.flush()
        self.drawn = True

    def close(self, done: int) -> None:
        if self.drawn:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


class EventProducer:
    """Publishes impression and click events, routed and ordered per partition.

    Args:
        settings: Producer settings (topics, partitions, batch size, encoding, Kafka).
        encoding: Overrides ``settings.encoding`` (``json``, ``avro``, ``arrow``, ``avro-batch``).
        sink: Where messages go; default a :class:`KafkaSink` built from ``settings``.
        create_topics: Create missing ``impressions``, ``clicks`` and ``headrace-dlq`` topics.
        progress: Show a progress line on stderr; None means "when stderr is a terminal".
        total: Expected event count, for the progress line.
    """

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        encoding: Encoding | None = None,
        sink: MessageSink | None = None,
        create_topics: bool = True,
        progress: bool | None = None,
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.encoding: Encoding = encoding or settings.encoding
        if self.encoding not in ENCODINGS:
            raise InputError(
                f"unknown encoding {self.encoding!r}; choose one of {', '.join(ENCODINGS)}"
            )
        self.partitions = settings.partitions
        self.batch_events = settings.batch_events if self.encoding in BATCH_ENCODINGS else 1
        self.topics: dict[EventKind, str] = {k: settings.topic(EVENT_SPECS[k].topic) for k in KINDS}
        self.counts = ProduceCounts()
        self._sink: MessageSink = sink if sink is not None else KafkaSink(settings)
        if create_topics:
            self._sink.ensure_topics(
                [*self.topics.values(), settings.topic(TOPIC_DLQ)], self.partitions
            )
        enabled = sys.stderr.isatty() if progress is None else progress
        self._progress = _Progress(enabled, total, sys.stderr, clock)

    def send_events(self, events: Iterable[Mapping[str, Any]]) -> ProduceCounts:
        """Encode and queue ``events`` (dicts with ``type`` impression|click) in order.

        Partial envelopes are sent when ``events`` is exhausted. Call :meth:`flush` to wait
        for delivery.

        Returns:
            Counts for this call (also added to :attr:`counts`).

        Raises:
            InputError: An event has no valid ``type`` (events before it were queued).
            BrokerError: The broker refused a message.
        """
        counts = ProduceCounts()
        buffers: dict[tuple[EventKind, int], list[Mapping[str, Any]]] = {}
        try:
            for event in events:
                kind = cast(EventKind, event.get("type"))
                if kind not in EVENT_SPECS:
                    self._drain(buffers, counts)  # what came before still goes out, in order
                    raise InputError(
                        f"event {counts.events + 1} has type {kind!r}; expected impression or click"
                    )
                partition = partition_for(routing_key(event), self.partitions)
                buf = buffers.setdefault((kind, partition), [])
                buf.append(event)
                if len(buf) >= self.batch_events:
                    self._emit(kind, partition, buf, counts)
                    buf.clear()
                counts.events += 1
                if kind == "impression":
                    counts.impressions += 1
                else:
                    counts.clicks += 1
                self._progress.update(self.counts.events + counts.events)
            self._drain(buffers, counts)
        finally:
            self.counts.add(counts)
        return counts

    def _drain(
        self, buffers: dict[tuple[EventKind, int], list[Mapping[str, Any]]], counts: ProduceCounts
    ) -> None:
        for (kind, partition), buf in buffers.items():
            if buf:
                self._emit(kind, partition, buf, counts)
                buf.clear()

    def _emit(
        self,
        kind: EventKind,
        partition: int,
        events: list[Mapping[str, Any]],
        counts: ProduceCounts,
    ) -> None:
        topic = self.topics[kind]
        for msg in encode_events(kind, events, self.encoding):
            # Single-event messages carry their routing key; envelopes have none.
            key = routing_key(events[0]).encode("utf-8", "replace") if len(events) == 1 else None
            self._sink.send(topic, partition, key, msg.value, msg.headers)
            counts.messages += 1
            if msg.encoding != self.encoding:
                counts.json_fallbacks += msg.events

    def flush(self, timeout_s: float = 60.0) -> ProduceCounts:
        """Wait for delivery of everything queued; returns the totals.

        Raises:
            BrokerError: Some message was not delivered.
        """
        self._sink.flush(timeout_s)
        self._progress.close(self.counts.events)
        return self.counts
