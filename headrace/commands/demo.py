"""``headrace demo``: the whole path on a real local stack, in one command.

First version: start the local stack (Tansu, redis-server, moto S3) in a temporary
directory, produce a few JSON ad-impression events with confluent-kafka, consume them
back, print a report and stop the stack (always, also on error). Progress goes to
stderr; the report (human lines, or one JSON object with ``--json``) to stdout.

Later steps (features in Redis, training sets, serving) are added as further steps that
receive the same settings object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

from headrace.errors import BrokerError, UsageError, missing_extra

if TYPE_CHECKING:
    from headrace.settings import CommonSettings

__all__ = ["register", "make_events"]

_DEFAULT_EVENTS = 20
_CONSUME_TIMEOUT_S = 30.0
DEMO_PROGRESS_PREFIX = "[demo]"


def _say(line: str) -> None:
    print(f"{DEMO_PROGRESS_PREFIX} {line}", file=sys.stderr, flush=True)


def _stack_say(line: str) -> None:
    print(f"[stack] {line}", file=sys.stderr, flush=True)


def make_events(n: int, start_ms: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` synthetic ad impressions, one per 100 ms from ``start_ms`` (epoch ms, UTC).

    Deterministic for a given seed; about 1 in 10 impressions is clicked.
    """
    rng = random.Random(seed)
    return [
        {
            "event_id": f"e{i:06d}",
            "ts_ms": start_ms + i * 100,
            "user_id": f"u{rng.randrange(5)}",
            "ad_id": f"a{rng.randrange(8)}",
            "clicked": int(rng.random() < 0.1),
        }
        for i in range(n)
    ]


def _create_topic(settings: CommonSettings, topic: str) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    # log_level 4: hide librdkafka's info line about purging the admin's background queue.
    admin = AdminClient({**settings.confluent_admin(), "log_level": 4})
    future = admin.create_topics([NewTopic(topic, settings.partitions, 1)])[topic]
    try:
        future.result(timeout=10)
    except KafkaException as exc:
        raise BrokerError(f"cannot create topic {topic}: {exc}") from exc


def _produce(settings: CommonSettings, topic: str, events: list[dict[str, Any]]) -> int:
    from confluent_kafka import KafkaException, Producer

    delivered = 0
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            errors.append(str(err))

    producer = Producer(settings.confluent_producer())
    try:
        for event in events:
            producer.produce(topic, key=event["user_id"].encode(),
                             value=json.dumps(event).encode(), timestamp=event["ts_ms"],
                             on_delivery=on_delivery)  # fmt: skip
        remaining = producer.flush(10)
    except KafkaException as exc:
        raise BrokerError(f"producing to {topic} failed: {exc}") from exc
    if remaining or errors:
        raise BrokerError(f"{remaining} event(s) undelivered to {topic}: {errors[:3]}")
    return delivered


def _consume(settings: CommonSettings, topic: str, want: int) -> list[dict[str, Any]]:
    from confluent_kafka import Consumer, KafkaException

    consumer = Consumer(settings.confluent_consumer(f"{topic}.reader"))
    got: list[dict[str, Any]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + _CONSUME_TIMEOUT_S
        while len(got) < want and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=want, timeout=0.5):
                if msg.error():
                    raise KafkaException(msg.error())
                got.append(json.loads(msg.value()))
        if got:
            consumer.commit(asynchronous=False)
    except KafkaException as exc:
        raise BrokerError(f"consuming {topic} failed: {exc}") from exc
    finally:
        consumer.close()
    return got


def _run(settings: CommonSettings, n_events: int) -> dict[str, Any]:
    topic = settings.topic(f"demo.impressions-{uuid.uuid4().hex[:8]}")
    _say(f"creating topic {topic} ({settings.partitions} partitions)")
    _create_topic(settings, topic)
    events = make_events(n_events, start_ms=time.time_ns() // 1_000_000)
    _say(f"producing {len(events)} JSON events")
    produced = _produce(settings, topic, events)
    _say("consuming them back (consumer group join takes ~1 s)")
    started = time.monotonic()
    consumed = _consume(settings, topic, produced)
    ids_match = sorted(e["event_id"] for e in consumed) == sorted(e["event_id"] for e in events)
    return {
        "topic": topic,
        "partitions": settings.partitions,
        "events_produced": produced,
        "events_consumed": len(consumed),
        "events_match": ids_match,
        "consume_s": round(time.monotonic() - started, 3),
    }


def _demo(args: argparse.Namespace) -> int:
    if args.events < 1:
        raise UsageError("--events must be at least 1")
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        raise missing_extra("confluent-kafka", "local") from exc
    from headrace.settings import CommonSettings
    from headrace.stack import local_stack

    started = time.monotonic()
    keep = args.keep_stack is not None
    with tempfile.TemporaryDirectory(prefix="headrace-demo-") as tmp:
        root = args.keep_stack if keep else tmp
        _say(f"starting the local stack in {root}")
        with local_stack(root, progress=_stack_say, keep=keep) as info:
            # The stack's own env wins over anything exported in this shell.
            settings = CommonSettings.from_env(info.env)
            report = _run(settings, args.events)
            report.update(
                kafka_bootstrap=info.kafka_bootstrap, redis_url=info.redis_url,
                s3_endpoint=info.s3_endpoint, offline_uri=info.offline_uri,
                stack_dir=info.dir, stack_kept=keep or info.reused,
            )  # fmt: skip
            if not report["stack_kept"]:
                _say("stopping the local stack")
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    ok = report["events_match"] and report["events_consumed"] == report["events_produced"]
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_human(report)
    return 0 if ok else 1


def _print_human(report: dict[str, Any]) -> None:
    match = "all ids match" if report["events_match"] else "IDS DIFFER"
    print("Headrace demo")
    print(f"  kafka     {report['kafka_bootstrap']} (Tansu)")
    print(f"  topic     {report['topic']} ({report['partitions']} partitions)")
    print(f"  produced  {report['events_produced']} events")
    print(f"  consumed  {report['events_consumed']} events ({match}) in {report['consume_s']} s")
    if report["stack_kept"]:
        print(f"  stack     still running in {report['stack_dir']}; stop it with: "
              f"headrace stack down --dir {report['stack_dir']}")  # fmt: skip
    else:
        print("  stack     stopped")
    print(f"  total     {report['elapsed_s']} s")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the pipeline end to end on a throwaway local stack",
        description="Start a local stack, produce events, consume them back, report, and "
        "stop the stack again (also on error) unless --keep-stack is given.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--keep-stack", metavar="DIR", default=None,
        help="run the stack in DIR and leave it running afterwards",
    )  # fmt: skip
    parser.add_argument(
        "--events", type=int, default=_DEFAULT_EVENTS, metavar="N",
        help=f"events to produce (default: {_DEFAULT_EVENTS})",
    )  # fmt: skip
    parser.set_defaults(func=_demo)
