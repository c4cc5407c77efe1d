"""Every work-around Headrace needs in Faust (faust-streaming) and its aiokafka consumer.

Faust stays the worker's runtime (agents, group membership, rebalances); these are the
places where its behaviour does not fit an effectively-once, low-latency worker. Each
names the defect or limitation it works around and is pinned by
``tests/unit/test_stream_faust_adapter.py``, which fails when Faust no longer behaves the
way that makes the work-around necessary (drop it then) or when the work-around stops
taking effect (the model is ``tests/integration/test_broker_contract.py``, which pins the
embedded broker's defects D1-D4 the same way):

* :func:`short_fetch_wait`: Faust hardcodes ``fetch_max_wait_ms=1500`` for its worker
  consumer (``AIOKafkaConsumerThread._create_worker_consumer``), with no setting.
* :func:`resume_at_durable_offsets`: Faust's table recovery seeks every assigned
  partition to the group's Kafka-committed offset (``Consumer.perform_seek``) *after*
  the partitions-assigned signal, and Faust commits offsets its agents acked, ahead of
  what is durable. No hook runs after that seek.

Dropped: stopping the worker from a task of its own loop used to cancel mode's private
``Worker._starting_fut`` after ``worker.stop()`` (as mode's signal handler does) so that
``execute_from_commandline`` would return. With mode-streaming 0.7 ``stop()`` alone makes
it return (measured: the same 1.4 s from stop to exit with and without the cancel), so
the worker calls ``stop()`` only; the adapter test fails if that stops being true.

Plain adaptation (no work-around) lives here too, so no other module touches Faust's
message or consumer types: :func:`raw_message`, :func:`highwater`, :func:`topic_partition`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from streams.rows import RawMessage

__all__ = [
    "require_faust",
    "short_fetch_wait",
    "resume_at_durable_offsets",
    "raw_message",
    "highwater",
    "topic_partition",
    "FAUST_FETCH_MAX_WAIT_MS",
]

#: the fetch wait Faust hardcodes for its worker consumer (what :func:`short_fetch_wait`
#: replaces; its pinning test fails when Faust's value changes)
FAUST_FETCH_MAX_WAIT_MS = 1500


def require_faust() -> Any:
    """Import and return the ``faust`` module.

    Raises:
        MissingDependencyError: faust-streaming is not installed (the ``stream`` extra).
    """
    try:
        import faust
    except ImportError as exc:  # pragma: no cover - dependency guard
        from headrace.core.errors import missing_extra

        raise missing_extra("faust-streaming", "stream") from exc
    return faust


def short_fetch_wait(wait_ms: int) -> None:
    """Make Faust's worker consumer wait at most ``wait_ms`` per fetch (process-wide).

    Limitation worked around: Faust builds its worker consumer with a hardcoded
    ``fetch_max_wait_ms=1500`` and offers no setting for it. A broker that holds a fetch
    that long when little data is waiting (the embedded one does) adds up to 1.5 s to
    every event's freshness and starves the agents between fetches. Faust looks the
    consumer class up on its driver module at each creation, so a subclass there that
    overrides the argument for group consumers only (the worker's; Faust's client
    consumer has no group) is enough. Idempotent for the same ``wait_ms``.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    base = faust_aiokafka.aiokafka.AIOKafkaConsumer
    if getattr(base, "_headrace_wait_ms", None) == wait_ms:
        return

    class _Consumer(base):  # type: ignore[misc, valid-type]
        _headrace_wait_ms = wait_ms

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("group_id"):  # the worker consumer, not Faust's client consumer
                kwargs["fetch_max_wait_ms"] = wait_ms
            super().__init__(*args, **kwargs)

    faust_aiokafka.aiokafka.AIOKafkaConsumer = _Consumer


def resume_at_durable_offsets(
    consumer: Any, offsets: Callable[[], Mapping[tuple[str, int], int]]
) -> None:
    """Re-seek every partition to ``offsets()`` right after Faust's recovery seek.

    Limitation worked around: after an assignment Faust's recovery calls
    ``consumer.perform_seek()``, which seeks every partition to the group's
    Kafka-committed offset, after the partitions-assigned signal where the worker made
    its own seeks; and Faust commits what its agents have seen, not what is durable, so
    resuming there loses the events between durable progress and the commit after a
    crash. Wrapping the consumer's ``perform_seek`` (an instance attribute, so only this
    consumer) runs the durable re-seek after Faust's. Idempotent per consumer.

    Args:
        consumer: Faust's consumer (``app.consumer``).
        offsets: (topic, partition) -> next offset to process, read at each seek.
    """
    if getattr(consumer, "_headrace_seek_wrapped", False):
        return
    from faust.types import TP

    original = consumer.perform_seek

    async def perform_seek() -> None:
        await original()
        for (t, p), offset in offsets().items():
            await consumer.seek(TP(t, p), offset)

    consumer.perform_seek = perform_seek
    consumer._headrace_seek_wrapped = True


class _NoReadOffsets(dict[Any, Any]):
    """Faust's per-partition read offsets, always unknown (see
    :func:`deliver_every_message`)."""

    def __getitem__(self, _tp: Any) -> None:
        return None


def deliver_every_message(consumer: Any) -> None:
    """Make Faust's consumer hand every fetched message to the agents.

    Limitation worked around: Faust drops a fetched message whose offset is below the
    partition's "read offset", which its fetch loop raises message by message while it
    hands a fetched batch over, and which a seek sets. A seek made while a batch is
    being handed over is undone by the rest of that batch, and the re-fetched messages
    are then dropped: the worker sees a jump in offsets that is not in the log (and
    after a few re-seeks took it for a real gap). The worker's admission decides what
    to skip (replays by offset, gaps only when the log confirms them), so Faust's
    read offsets are replaced by a mapping that never knows one. Faust reads them only
    to drop messages and to record gaps for its own commits, which the worker does not
    resume from. Must run before Faust's fetch loop starts (it binds the mapping
    once); idempotent.
    """
    if not isinstance(consumer._read_offset, _NoReadOffsets):
        consumer._read_offset = _NoReadOffsets()


def raw_message(event: Any) -> RawMessage:
    """The engine's record of a Faust event (headers as a list of pairs, the Kafka
    timestamp in epoch ms, 0 when absent)."""
    msg = event.message
    headers = msg.headers
    if isinstance(headers, dict):
        headers = list(headers.items())
    return RawMessage(
        msg.value,
        headers,
        msg.topic,
        msg.partition,
        msg.offset,
        int(msg.timestamp * 1000) if msg.timestamp else 0,
    )


def topic_partition(topic: str, partition: int) -> Any:
    """Faust's ``TP`` for (topic, partition)."""
    from faust.types import TP

    return TP(topic, partition)


def highwater(consumer: Any, topic: str, partition: int) -> int | None:
    """The high watermark of a partition from the last fetch response (never
    ListOffsets: wrong on the embedded broker, defect D1 in the README and
    ``tests/integration/test_broker_contract.py``), or None before the first fetch
    (aiokafka raises then)."""
    try:
        high = consumer.highwater(topic_partition(topic, partition))
    except (KeyError, AssertionError, AttributeError):  # nothing fetched yet
        return None
    return high if high is not None and high >= 0 else None
