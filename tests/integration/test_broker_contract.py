"""Contract of the local Kafka-protocol broker (Tansu 0.6) that Headrace relies on.

Passing tests pin what works. The known defects D1-D4 (the README's paragraph on the
embedded broker's known defects lists them) are tests that assert
the *correct* Kafka behaviour, marked ``xfail(strict=True)``: if a Tansu upgrade fixes
one, its test XPASSes and the suite fails, so the workaround can be removed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka.errors import KafkaError as AIOKafkaError
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic, OffsetSpec

if TYPE_CHECKING:
    from conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

N = 10
TS0 = 1_700_000_000_000  # epoch ms, 2023-11-14T22:13:20Z


@pytest.fixture
def admin(ns: Namespace) -> AdminClient:
    return AdminClient(ns.settings().confluent_admin())


def _create(admin: AdminClient, topic: str, partitions: int = 1) -> str:
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=10)
    return topic


def _produce(ns: Namespace, topic: str, n: int = N, one_batch: bool = True, **conf: object) -> None:
    """``n`` records to partition 0 with timestamps TS0 + i s: one batch, or one per batch."""
    settings = ns.settings()
    producer = Producer({**settings.confluent_producer(), "linger.ms": 200 if one_batch else 0,
                         **conf})
    for i in range(n):
        producer.produce(topic, key=b"k%d" % i, value=b"v%d" % i, partition=0,
                         timestamp=TS0 + i * 1000)
        if not one_batch:
            producer.flush(10)
    assert producer.flush(10) == 0


@pytest.fixture
def consumer(ns: Namespace) -> Iterator[Consumer]:
    c = Consumer(ns.settings().confluent_consumer(f"{ns.topic_prefix}g"))
    yield c
    c.close()


def _drain(c: Consumer, want: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for msg in c.consume(num_messages=want, timeout=0.5):
            if msg.error():
                raise KafkaException(msg.error())
            got.append(msg)
    return got


# -- what works ----------------------------------------------------------------------------


def test_produce_consume_round_trip(ns: Namespace, admin: AdminClient) -> None:
    topic = _create(admin, ns.topic("round-trip"), partitions=4)
    producer = Producer(ns.settings().confluent_producer())
    sent = {b"k%d" % i: b"v%d" % i for i in range(100)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0
    c = Consumer(ns.settings().confluent_consumer(f"{ns.topic_prefix}rt"))
    try:
        c.subscribe([topic])
        got = _drain(c, len(sent), timeout=20)
    finally:
        c.close()
    assert {m.key(): m.value() for m in got} == sent
    assert {m.partition() for m in got} == {0, 1, 2, 3}


def test_fetch_high_watermark_is_correct(
    ns: Namespace,
    admin: AdminClient,
    consumer: Consumer,
) -> None:
    """Use this (or consumer lag statistics) for "end of topic", never ListOffsets (D1)."""
    topic = _create(admin, ns.topic("hw"))
    _produce(ns, topic)
    consumer.assign([TopicPartition(topic, 0, 0)])
    assert len(_drain(consumer, N)) == N
    assert consumer.get_watermark_offsets(TopicPartition(topic, 0), cached=True) == (0, N)


def test_list_offsets_is_correct_with_one_record_per_batch(
    ns: Namespace,
    admin: AdminClient,
    consumer: Consumer,
) -> None:
    """D1 disappears when every batch holds one record: tells a broker defect from a bug."""
    topic = _create(admin, ns.topic("one-per-batch"))
    _produce(ns, topic, one_batch=False)
    tp = TopicPartition(topic, 0)
    assert consumer.get_watermark_offsets(tp, timeout=10, cached=False) == (0, N)


def test_record_timestamps_round_trip(
    ns: Namespace,
    admin: AdminClient,
    consumer: Consumer,
) -> None:
    topic = _create(admin, ns.topic("ts"))
    _produce(ns, topic)
    consumer.assign([TopicPartition(topic, 0, 0)])
    stamps = [m.timestamp() for m in _drain(consumer, N)]
    assert stamps == [(1, TS0 + i * 1000) for i in range(N)]  # 1 = TIMESTAMP_CREATE_TIME


def test_two_consumers_in_a_group_split_partitions(ns: Namespace, admin: AdminClient) -> None:
    topic = _create(admin, ns.topic("group"), partitions=4)
    conf = ns.settings().confluent_consumer(f"{ns.topic_prefix}split")
    members = [Consumer(conf), Consumer(conf)]
    try:
        for c in members:
            c.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for c in members:
                c.poll(0.2)
            parts = [{tp.partition for tp in c.assignment()} for c in members]
            if all(parts) and parts[0] | parts[1] == {0, 1, 2, 3}:
                break
        assert all(parts), f"a member got no partitions: {parts}"
        assert parts[0].isdisjoint(parts[1])
        assert parts[0] | parts[1] == {0, 1, 2, 3}
    finally:
        for c in members:
            c.close()


def test_confluent_transactions_work(ns: Namespace, admin: AdminClient, consumer: Consumer) -> None:
    topic = _create(admin, ns.topic("tx"))
    producer = Producer({**ns.settings().confluent_producer(),
                         "transactional.id": f"{ns.topic_prefix}tx"})
    producer.init_transactions(10)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed", partition=0)
    producer.commit_transaction(10)
    consumer.assign([TopicPartition(topic, 0, 0)])
    assert [m.value() for m in _drain(consumer, 1)] == [b"committed"]


def test_create_topics_honours_partitions_and_rejects_duplicates(
    ns: Namespace,
    admin: AdminClient,
) -> None:
    topic = _create(admin, ns.topic("created"), partitions=3)
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 3
    with pytest.raises(KafkaException) as err:
        _create(admin, topic, partitions=3)
    assert err.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS


def test_observed_auto_creation(ns: Namespace, admin: AdminClient) -> None:
    """Tansu quirk, pinned: producing to (or asking metadata for) an unknown topic creates
    it with 4 partitions (Kafka's default is num.partitions=1); a consumer subscription
    does not create it. Create topics explicitly with their final partition count."""
    topic = ns.topic("auto")
    producer = Producer(ns.settings().confluent_producer())
    producer.produce(topic, value=b"x")
    assert producer.flush(10) == 0
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 4


# -- known defects: correct Kafka behaviour, expected to fail on Tansu 0.6 -----------------


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="D1: ListOffsets(latest) = base "
                   "offset of the last batch + 1 when a batch holds several records")
def test_d1_list_offsets_latest_is_end_of_topic(ns: Namespace, admin: AdminClient) -> None:
    topic = _create(admin, ns.topic("d1"))
    _produce(ns, topic)
    tp = TopicPartition(topic, 0)
    result = admin.list_offsets({tp: OffsetSpec.latest()}, request_timeout=10)[tp].result()
    assert result.offset == N


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="D2: offsets_for_times always returns offset 0")
def test_d2_offsets_for_times(ns: Namespace, admin: AdminClient, consumer: Consumer) -> None:
    topic = _create(admin, ns.topic("d2"))
    _produce(ns, topic)
    found = consumer.offsets_for_times([TopicPartition(topic, 0, TS0 + 5000)], timeout=10)
    assert found[0].offset == 5


@pytest.mark.xfail(strict=True, raises=AIOKafkaError, reason="D3: aiokafka idempotent producer "
                   "fails at start (InitProducerId), so Faust exactly_once crashes")
def test_d3_aiokafka_idempotent_producer(ns: Namespace, admin: AdminClient) -> None:
    from aiokafka import AIOKafkaProducer

    topic = _create(admin, ns.topic("d3"))

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=ns.stack.kafka_bootstrap,
                                    enable_idempotence=True, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(producer.start(), 10)
            await producer.send_and_wait(topic, b"x", partition=0)
        finally:
            await producer.stop()

    asyncio.run(send())


@pytest.mark.xfail(strict=True, raises=AIOKafkaError,
                   reason="D3: aiokafka transactional producer fails at start")
def test_d3_aiokafka_transactional_producer(ns: Namespace) -> None:
    from aiokafka import AIOKafkaProducer

    async def start() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=ns.stack.kafka_bootstrap,
                                    transactional_id=f"{ns.topic_prefix}aiotx",
                                    request_timeout_ms=5000)
        try:
            await asyncio.wait_for(producer.start(), 10)
        finally:
            await producer.stop()

    asyncio.run(start())


@pytest.mark.xfail(strict=True, raises=KafkaException, reason="D4: CreatePartitions unsupported "
                   "(_UNSUPPORTED_FEATURE): create topics with their final count")
def test_d4_create_partitions(ns: Namespace, admin: AdminClient) -> None:
    topic = _create(admin, ns.topic("d4p"))
    admin.create_partitions([NewPartitions(topic, 3)], request_timeout=10)[topic].result()
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 3


@pytest.mark.xfail(strict=True, raises=KafkaException,
                   reason="D4: DeleteRecords drops the connection")
def test_d4_delete_records(ns: Namespace, consumer: Consumer) -> None:
    deleting = AdminClient(ns.settings().confluent_admin())  # its connection gets dropped
    topic = _create(deleting, ns.topic("d4d"))
    _produce(ns, topic, one_batch=False)
    tp = TopicPartition(topic, 0, 5)
    deleting.delete_records([tp], request_timeout=10)[tp].result()
    low, _ = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    assert low == 5
