"""Pins every Faust work-around in :mod:`streams.faust_adapter` (no broker needed).

Per work-around two tests, like ``tests/integration/test_broker_contract.py`` pins the
broker's defects: one asserts Faust still behaves the way that makes the work-around
necessary (it fails when a Faust upgrade fixes it: drop the work-around then), one that
the work-around takes effect. Faust's own objects are built for real (an ``App`` and its
consumer; nothing connects before ``start``).
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

faust = pytest.importorskip("faust")

from faust.transport.drivers import aiokafka as faust_aiokafka  # noqa: E402
from faust.types import TP  # noqa: E402

from headrace.core.settings import WorkerSettings  # noqa: E402
from streams import faust_adapter as fa  # noqa: E402

BROKER = "kafka://127.0.0.1:1"  # never contacted: consumers are built, not started


@pytest.fixture
def app(tmp_path: Any) -> Any:
    return faust.App("adapter-test", broker=BROKER, web_enabled=False, loghandlers=[],
                     datadir=str(tmp_path), topic_disable_leader=True)


@pytest.fixture
def driver_consumer_class() -> Iterator[None]:
    """Restore the driver module's consumer class after a test (the patch is global)."""
    original = faust_aiokafka.aiokafka.AIOKafkaConsumer
    yield
    faust_aiokafka.aiokafka.AIOKafkaConsumer = original


def _fetch_waits(app: Any) -> tuple[int, int]:
    """``fetch_max_wait_ms`` of the worker and the client consumer, as Faust's consumer
    thread builds them (closed again unstarted)."""
    thread = app.consumer._thread

    async def build() -> tuple[int, int]:
        worker = thread._create_worker_consumer(app.transport)
        client = thread._create_client_consumer(app.transport)
        waits = (worker._fetch_max_wait_ms, client._fetch_max_wait_ms)
        await worker.stop()
        await client.stop()
        return waits

    return asyncio.run(build())


# ------------------------------------------------------------------ short_fetch_wait
def test_faust_still_hardcodes_the_worker_fetch_wait(app: Any,
                                                     driver_consumer_class: None) -> None:
    """Needed while Faust builds its worker consumer with a fixed 1500 ms fetch wait and
    has no setting for it (fails when either changes: use the setting, drop the patch)."""
    worker_wait, _client_wait = _fetch_waits(app)
    assert worker_wait == fa.FAUST_FETCH_MAX_WAIT_MS == 1500
    settings = [n for n in dir(faust.Settings) if "fetch" in n and "wait" in n]
    assert settings == []
    assert WorkerSettings.model_fields["fetch_max_wait_ms"].default < fa.FAUST_FETCH_MAX_WAIT_MS


def test_short_fetch_wait_reaches_the_worker_consumer_only(app: Any,
                                                           driver_consumer_class: None) -> None:
    fa.short_fetch_wait(37)
    patched = faust_aiokafka.aiokafka.AIOKafkaConsumer
    fa.short_fetch_wait(37)  # idempotent: no second subclass
    assert faust_aiokafka.aiokafka.AIOKafkaConsumer is patched
    worker_wait, client_wait = _fetch_waits(app)
    assert worker_wait == 37
    default = inspect.signature(patched.__mro__[1].__init__).parameters["fetch_max_wait_ms"]
    assert client_wait == default.default  # Faust's client consumer untouched


# ------------------------------------------------------------------ resume_at_durable_offsets
class _Recorder:
    """Stands in for the broker side of a real Faust consumer's seeks."""

    def __init__(self, consumer: Any) -> None:
        self.calls: list[tuple[str, Any]] = []
        consumer.seek_to_committed = self._seek_to_committed
        consumer.seek = self._seek

    async def _seek_to_committed(self) -> dict[TP, int]:
        self.calls.append(("committed", None))
        return {TP("t", 0): 99}

    async def _seek(self, tp: TP, offset: int) -> None:
        self.calls.append(("seek", (tp, offset)))


def test_faust_recovery_still_seeks_to_kafka_committed_offsets(app: Any) -> None:
    """Needed while Faust's recovery calls ``perform_seek`` after an assignment and that
    seeks to the group's Kafka-committed offsets (fails when either changes)."""
    from faust.tables.recovery import Recovery

    resume = inspect.getsource(Recovery._resume_streams)
    assert "consumer.perform_seek()" in resume
    consumer = app.consumer
    rec = _Recorder(consumer)
    asyncio.run(consumer.perform_seek())
    assert rec.calls == [("committed", None)]  # Faust's seek, and nothing after it


def test_resume_at_durable_offsets_reseeks_after_faust(app: Any) -> None:
    consumer = app.consumer
    rec = _Recorder(consumer)
    durable = {("t", 0): 7, ("u", 2): 0}
    fa.resume_at_durable_offsets(consumer, lambda: durable)
    fa.resume_at_durable_offsets(consumer, lambda: {("x", 0): 1})  # idempotent
    asyncio.run(consumer.perform_seek())
    assert rec.calls == [("committed", None), ("seek", (TP("t", 0), 7)),
                         ("seek", (TP("u", 2), 0))]
    durable[("t", 0)] = 11  # read at each seek, not at wrapping
    rec.calls.clear()
    asyncio.run(consumer.perform_seek())
    assert rec.calls[1] == ("seek", (TP("t", 0), 11))


def test_faust_still_drops_messages_below_its_read_offset(app: Any) -> None:
    """Needed while Faust's fetch loop drops a message below the partition's read offset
    (binding the mapping's lookup once) and a seek sets that offset: a seek during a
    batch hand-over is undone by the batch, and the re-fetched messages are dropped."""
    from faust.transport.consumer import Consumer

    drain = inspect.getsource(Consumer._drain_messages)
    assert "get_read_offset = self._read_offset.__getitem__" in drain
    assert "offset >= r_offset" in drain and "set_read_offset(tp, offset)" in drain
    seek = inspect.getsource(Consumer.seek)
    assert "self._read_offset[" in seek


def test_deliver_every_message_leaves_no_read_offset(app: Any) -> None:
    consumer = app.consumer
    _Recorder(consumer)
    fa.deliver_every_message(consumer)
    table = consumer._read_offset
    fa.deliver_every_message(consumer)  # idempotent
    assert consumer._read_offset is table
    asyncio.run(consumer.seek(TP("t", 0), 40))
    table[TP("t", 0)] = 99  # what the fetch loop writes per message
    assert table[TP("t", 0)] is None  # so "r_offset is None": never dropped
    table.pop(TP("t", 0), None)  # what a revoke does
    table.update({TP("t", 1): 5})  # what Faust's recovery seek does
    assert table[TP("t", 1)] is None


# ------------------------------------------------------------------ stopping (dropped)
_STOP_FROM_A_TASK = textwrap.dedent("""
    import asyncio, time, mode

    class Service(mode.Service):
        async def on_start(self):
            asyncio.ensure_future(self.later())

        async def later(self):
            await asyncio.sleep(0.2)
            await worker.stop()  # what the worker does once idle: no _starting_fut cancel

    worker = mode.Worker(Service(), loglevel="WARNING", quiet=True)
    started = time.monotonic()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        print("exit", exc.code, round(time.monotonic() - started, 1))
""")


def test_stop_from_a_task_ends_execute_from_commandline() -> None:
    """The dropped work-around (cancel mode's ``_starting_fut`` after ``stop()``) stays
    unneeded while this passes; if it fails, restore it in the adapter."""
    proc = subprocess.run([sys.executable, "-c", _STOP_FROM_A_TASK], capture_output=True,
                          text=True, timeout=30, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("exit")]
    assert line, proc.stdout + proc.stderr
    _, code, seconds = line[0].split()
    assert code == "0" and float(seconds) < 10


# ------------------------------------------------------------------ plain adaptation
class _Msg:
    def __init__(self, headers: Any, timestamp: float | None) -> None:
        self.value, self.headers, self.topic = b"v", headers, "t"
        self.partition, self.offset, self.timestamp = 3, 42, timestamp


class _Event:
    def __init__(self, msg: _Msg) -> None:
        self.message = msg


def test_raw_message_normalizes_headers_and_timestamp() -> None:
    raw = fa.raw_message(_Event(_Msg({"hr-enc": b"arrow"}, 1_700_000_000.123)))
    assert raw.headers == [("hr-enc", b"arrow")] and raw.timestamp_ms == 1_700_000_000_123
    assert (raw.topic, raw.partition, raw.offset, raw.value) == ("t", 3, 42, b"v")
    assert fa.raw_message(_Event(_Msg([("a", b"b")], None))).timestamp_ms == 0


def test_highwater_is_none_before_the_first_fetch() -> None:
    class Fetched:
        def highwater(self, tp: TP) -> int:
            return {TP("t", 0): 5, TP("t", 1): -1}[tp]

    assert fa.highwater(Fetched(), "t", 0) == 5
    assert fa.highwater(Fetched(), "t", 1) is None
    assert fa.highwater(Fetched(), "t", 2) is None  # KeyError: not fetched
