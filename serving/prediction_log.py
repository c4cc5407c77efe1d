"""The prediction log: every ``Score`` answer (and shadow prediction) to Kafka, off the
RPC path.

:meth:`KafkaPredictionLog.log` only puts the record in a bounded in-memory buffer
(:class:`~serving.offpath.OffPath`): it never blocks and never raises. One thread
encodes each record (:func:`~feature_defs.predictions.encode_prediction`) and hands it
to a confluent-kafka producer, which batches and sends it. Nothing here can fail an RPC:

* buffer full → the record is dropped, ``headrace_prediction_log_total{outcome=
  "dropped_buffer"}``;
* the Kafka client's queue full (broker slow or away, ``HEADRACE_PREDICTION_LOG_QUEUE_KB``)
  → ``dropped_queue``;
* not delivered within ``HEADRACE_PREDICTION_LOG_TIMEOUT_MS`` → ``failed``;
* Kafka unreachable → one WARNING when the outage starts and one when it ends
  (:class:`~headrace.core.retry.Outage` ``kafka (prediction log)``), and
  ``headrace_prediction_log_available`` 0 meanwhile.

Records are keyed and partitioned like the input events (:data:`~feature_defs.contract.
ROUTING_KEY`: the user id, the prediction id for anonymous requests, xxh64 modulo the
partition count, :func:`~feature_defs.layout.partition_for`), so a user's predictions
sit in the same partition as that user's impressions and clicks. The topic is created
at the first record when missing (``HEADRACE_PARTITIONS`` partitions).

:class:`MemoryPredictionLog` is the in-memory fake for tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from feature_defs.layout import partition_for
from feature_defs.predictions import PredictionRecord, encode_prediction
from headrace.core.errors import BrokerError
from headrace.core.retry import Outage
from serving.metrics import ServingMetrics
from serving.offpath import OffPath

__all__ = ["PredictionSink", "KafkaPredictionLog", "MemoryPredictionLog"]

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection failures, retried by the client itself)
_RDKAFKA_LOG = logging.getLogger("headrace.prediction_log.kafka")

#: how long the client gathers records into one produce request: the log is read by
#: stream jobs, not people, and fewer, larger requests cost the serving host less CPU
#: (measured here: 20 ms batches added ~0.3 ms to Score's p99 on 2 cores, 100-200 ms none
#: beyond noise)
_LINGER_MS = 100
#: seconds between two drains of the buffer (see :class:`~serving.offpath.OffPath`)
_DRAIN_S = 0.05
#: seconds between two attempts to find or create the topic while Kafka is away
_TOPIC_RETRY_S = 5.0
#: librdkafka errors that mean the broker cannot be reached (an outage, not a bad record)
_UNREACHABLE = ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_MSG_TIMED_OUT", "_TIMED_OUT",
                "_RESOLVE")


class PredictionSink(Protocol):
    """Where ``Score`` sends its prediction records."""

    def log(self, record: PredictionRecord) -> None:
        """Take one record; never blocks, never raises."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class MemoryPredictionLog:
    """In-memory fake: keeps the records (at most ``maxsize``; more are dropped)."""

    def __init__(self, maxsize: int = 1_000_000) -> None:
        self.records: list[PredictionRecord] = []
        self.maxsize = maxsize
        self.dropped = 0

    def log(self, record: PredictionRecord) -> None:
        if len(self.records) >= self.maxsize:
            self.dropped += 1
            return
        self.records.append(record)

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


class KafkaPredictionLog:
    """The prediction log on Kafka (see the module docstring).

    Args:
        producer_config: librdkafka settings
            (:meth:`~headrace.core.settings.CommonSettings.confluent_producer`).
        admin_config: librdkafka settings of the admin client that creates the topic.
        topic: the full topic name (with the deployment's prefix).
        partitions: the partition count to create the topic with (and to route by
            until the topic's metadata says otherwise).
        buffer: most records waiting in memory.
        queue_kb: most KiB the Kafka client queues.
        timeout_ms: how long the client retries one record before it fails.
        metrics: the server's metrics.
        clock: monotonic seconds.
    """

    def __init__(self, producer_config: dict[str, Any], admin_config: dict[str, Any],
                 topic: str, *, partitions: int, buffer: int = 10_000,
                 queue_kb: int = 32_768, timeout_ms: int = 30_000,
                 metrics: ServingMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.metrics = ServingMetrics() if metrics is None else metrics
        m = self.metrics
        self._counts = {o: m.prediction_log.labels(outcome=o) for o in
                        ("sent", "dropped_buffer", "dropped_queue", "failed")}
        self.outage = Outage("kafka (prediction log)",
                             on_available=lambda up: m.prediction_log_available.set(int(up)))
        self._down = False
        self._partitions = partitions
        self._admin_config = {**admin_config, "logger": _RDKAFKA_LOG,
                              "log.connection.close": False}
        self._admin: Any = None
        self._topic_ready = False
        self._topic_tried = -_TOPIC_RETRY_S
        self._clock = clock
        conf = {**producer_config, "linger.ms": _LINGER_MS,
                "queue.buffering.max.kbytes": queue_kb, "message.timeout.ms": timeout_ms,
                "error_cb": self._on_error, "logger": _RDKAFKA_LOG,
                "log.connection.close": False}
        self._producer = Producer(conf)
        self._queue: OffPath[PredictionRecord] = OffPath(
            "prediction-log", self._send, maxsize=buffer,
            on_drop=self._counts["dropped_buffer"].inc, idle=self._poll,
            batch_s=_DRAIN_S)

    # ------------------------------------------------------------------ RPC side
    def log(self, record: PredictionRecord) -> None:
        """Buffer ``record`` for sending; a full buffer drops it (counted). Never blocks."""
        self._queue.offer(record)

    # ------------------------------------------------------------------ the thread
    def _send(self, record: PredictionRecord) -> None:
        from confluent_kafka import KafkaException

        if not self._topic_ready and self._clock() - self._topic_tried >= _TOPIC_RETRY_S:
            self._ensure_topic()
        try:
            value = encode_prediction(record)
        except (ValueError, TypeError) as exc:  # a bug upstream: say so, keep serving
            self._counts["failed"].inc()
            log.error("prediction %s cannot be encoded: %s", record.prediction_id, exc)
            return
        key = record.user_id or record.prediction_id
        try:
            self._producer.produce(self.topic, value, key.encode(),
                                   partition=partition_for(key, self._partitions),
                                   on_delivery=self._on_delivery)
        except BufferError:  # the client's queue is full: the broker is slow or away
            self._counts["dropped_queue"].inc()
        except KafkaException as exc:
            self._counts["failed"].inc()
            self._unavailable("produce", exc)
        self._producer.poll(0)

    def _poll(self) -> None:
        self._producer.poll(0)

    def _ensure_topic(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        self._topic_tried = self._clock()
        if self._admin is None:
            self._admin = AdminClient(self._admin_config)
        admin = self._admin
        try:
            meta = admin.list_topics(topic=self.topic, timeout=2).topics.get(self.topic)
            if meta is not None and meta.error is None and meta.partitions:
                self._partitions = len(meta.partitions)
                self._topic_ready = True
                return
            admin.create_topics([NewTopic(self.topic, self._partitions, 1)])[self.topic].result(5)
            self._topic_ready = True
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" in str(exc):
                self._topic_ready = True
            else:
                self._unavailable("create topic", exc)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is None:
            self._counts["sent"].inc()
            if self._down:
                self._down = False
                self.outage.end(True)
            return
        self._counts["failed"].inc()
        if err.name() in _UNREACHABLE:
            self._unavailable("deliver", err)
        else:
            log.error("prediction record not delivered to %s: %s", self.topic, err)

    def _on_error(self, err: Any) -> None:
        if err.name() in _UNREACHABLE:
            self._unavailable("connect", err)

    def _unavailable(self, what: str, exc: object) -> None:
        if self._down:
            return
        self._down = True
        self.outage.begin()
        # Score keeps answering; records are kept up to the client's limits, then dropped
        self.outage.failed(f"prediction log {what}", BrokerError(str(exc)), 0.0)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the sending thread."""
        self._queue.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is buffered for at most ``timeout_s`` seconds, then stop (what is
        still queued then is lost, as it is when the process dies)."""
        self._queue.stop(timeout_s)
        self._producer.flush(timeout_s)
