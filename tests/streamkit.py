"""Helpers of the stream end-to-end tests: produce an adversarial stream, run workers,
read back every output (Redis through ``headrace get``, the dead-letter topics, the
offline store). The oracle's expectations and the comparisons are :mod:`tests.streamcheck`.

Nothing here computes a feature or judges a value: this module only moves bytes between
the test, the broker, the worker processes and the stores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests.adversarial import Arrival

__all__ = [
    "PARTITIONS",
    "TIMESTAMP_BASE",
    "Produced",
    "Worker",
    "Probe",
    "Record",
    "namespace_for",
    "fresh_namespace",
    "create_source_topics",
    "produce_arrivals",
    "worker_env",
    "commit_records",
    "read_topic",
    "side_records",
    "read_offline_events",
    "get_inprocess",
    "get_subprocess",
    "online_features",
    "timer",
]

PARTITIONS = 4
#: Kafka timestamp of the first produced message (2025-06-15T00:00:00Z)
TIMESTAMP_BASE = 1_749_945_600_000
_CLI = shutil.which("headrace", path=str(Path(sys.executable).parent))
CLI_BASE = [_CLI] if _CLI else [sys.executable, "-m", "headrace.cli"]


@contextlib.contextmanager
def timer(label: str, timings: dict[str, float]) -> Iterator[None]:
    """Record (and print) the wall time of a step."""
    start = time.monotonic()
    try:
        yield
    finally:
        timings[label] = round(time.monotonic() - start, 2)
        print(f"[timing] {label}: {timings[label]:.2f}s", flush=True)


# --------------------------------------------------------------------------- namespaces
def namespace_for(stack: Any) -> Any:
    """A namespace on ``stack`` (for module-scoped fixtures, where ``ns`` cannot be used)."""
    from tests.conftest import Namespace

    base = Namespace(id="", topic_prefix="", redis_prefix="", offline_uri=stack.offline_uri,
                     settings_env=dict(stack.env), stack=stack)
    return fresh_namespace(base)


def fresh_namespace(ns: Any) -> Any:
    """Another namespace on the same stack (fresh topic/Redis/offline prefixes), built the
    way the ``ns`` fixture builds one."""
    uid = uuid.uuid4().hex[:8]
    env = dict(ns.settings_env)
    topic_prefix, redis_prefix = f"t{uid}.", f"hr{uid}"
    bucket = ns.offline_uri[len("s3://") :].split("/", 1)[0]
    offline_uri = f"s3://{bucket}/{uid}"
    env.update({"HEADRACE_TOPIC_PREFIX": topic_prefix, "HEADRACE_REDIS_PREFIX": redis_prefix,
                "HEADRACE_OFFLINE_URI": offline_uri})
    return type(ns)(id=uid, topic_prefix=topic_prefix, redis_prefix=redis_prefix,
                    offline_uri=offline_uri, settings_env=env, stack=ns.stack)


def worker_env(ns: Any, tmp: Path, *, group: str | None = None, worker_id: str = "0",
               **extra: str) -> dict[str, str]:
    """Subprocess environment of a worker of ``ns`` (short flush intervals)."""
    data_dir = tmp / f"data-{ns.id}-{worker_id}"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "HEADRACE_GROUP_ID": group or f"g{ns.id}",
        "HEADRACE_PARTITIONS": str(PARTITIONS),
        "HEADRACE_FLUSH_INTERVAL_MS": "200",
        "HEADRACE_OFFLINE_FLUSH_INTERVAL_MS": "1000",
        "HEADRACE_DATA_DIR": str(data_dir),
        "HEADRACE_WORKER_ID": worker_id,
        "HEADRACE_LOG_LEVEL": "WARNING",
        **extra,
    }
    return ns.subprocess_env(**env)


# --------------------------------------------------------------------------- producing
def create_source_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    """Create topics, one per CreateTopics request (the embedded broker mis-parses more)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name in names:
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)


@dataclass
class Produced:
    """Where every arrival landed: arrival index -> (topic without the namespace prefix,
    partition, offset, index in the message)."""

    coords: dict[int, tuple[str, int, int, int]] = field(default_factory=dict)
    messages: int = 0
    envelopes: int = 0
    enveloped_events: int = 0
    timestamps: dict[int, int] = field(default_factory=dict)  # arrival index -> msg ts (ms)


def _plan_envelopes(arrivals: Sequence[Arrival], fraction: float, seed: int,
                    sizes: tuple[int, int]) -> dict[int, list[int]]:
    """Groups of consecutive valid arrivals of one (topic, partition) to send as one Arrow
    envelope, keyed by the arrival index of the group's LAST member (where it is sent)."""
    rng = random.Random(seed)
    per_tp: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, a in enumerate(arrivals):
        per_tp[(a.topic, a.partition)].append(i)
    groups: dict[int, list[int]] = {}
    for idxs in per_tp.values():
        j = 0
        while j < len(idxs):
            if rng.random() < fraction / ((sizes[0] + sizes[1]) / 2) * 1.0:
                size = rng.randint(*sizes)
                run: list[int] = []
                while j < len(idxs) and len(run) < size and arrivals[idxs[j]].event is not None:
                    run.append(idxs[j])
                    j += 1
                if len(run) >= 2:
                    groups[run[-1]] = run
                    continue
                if not run:
                    j += 1
            else:
                j += 1
    return groups


def produce_arrivals(bootstrap: str, topic_prefix: str, arrivals: Sequence[Arrival], *,
                     arrow_fraction: float = 0.2, seed: int = 7,
                     envelope_sizes: tuple[int, int] = (5, 60),
                     timestamp_base: int = TIMESTAMP_BASE,
                     pace: tuple[int, float] | None = None) -> Produced:
    """Produce ``arrivals`` in arrival order to the partitions they name.

    Most go as one raw message each (key = ``Arrival.key``, no headers); about
    ``arrow_fraction`` of the valid events go as Arrow envelopes (``hr-enc: arrow``) of
    consecutive events of one (topic, partition), sent where their last member arrives,
    so every partition's order is the arrival order. Every message carries the explicit
    Kafka timestamp ``timestamp_base + arrival index`` (of the last member for an
    envelope), so two namespaces fed the same arrivals hold identical records. Returns the
    coordinates of each arrival from the delivery reports.

    ``pace=(start, rate)`` sends the arrivals from index ``start`` on at ``rate`` per
    second (a live stream), the earlier ones at once.
    """
    from confluent_kafka import KafkaException, Producer

    from streams.codec import encode_events

    groups = _plan_envelopes(arrivals, arrow_fraction, seed, envelope_sizes)
    in_group = {i for g in groups.values() for i in g}
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                         "enable.idempotence": True, "batch.num.messages": 2000,
                         "queue.buffering.max.messages": 500_000})
    out = Produced()
    errors: list[str] = []

    def report(members: list[int]) -> Any:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
                return
            ts = msg.timestamp()[1]
            for n, i in enumerate(members):
                out.coords[i] = (msg.topic()[len(topic_prefix):], msg.partition(), msg.offset(),
                                 n)
                out.timestamps[i] = ts
        return cb

    def send(topic: str, partition: int, key: bytes, value: bytes,
             headers: list[tuple[str, bytes]] | None, members: list[int]) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition,
                                 headers=headers, on_delivery=report(members),
                                 timestamp=timestamp_base + members[-1])
                break
            except BufferError:
                producer.poll(0.05)
        out.messages += 1

    paced_from = time.monotonic()
    for i, a in enumerate(arrivals):
        if pace is not None and i >= pace[0]:
            ahead = paced_from + (i - pace[0]) / pace[1] - time.monotonic()
            if ahead > 0.02:
                producer.poll(0)
                time.sleep(ahead)
        elif pace is not None:
            paced_from = time.monotonic()
        topic = f"{topic_prefix}{a.topic}"
        if i in groups:
            members = groups[i]
            kind = "impression" if a.topic == "impressions" else "click"
            events = [arrivals[m].event for m in members]
            (msg,) = encode_events(kind, events, "arrow")  # type: ignore[arg-type]
            send(topic, a.partition, a.key, msg.value, msg.headers, members)
            out.envelopes += 1
            out.enveloped_events += len(members)
        elif i not in in_group:
            send(topic, a.partition, a.key, a.value, None, [i])
        if i % 5000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining or errors:
        raise KafkaException(f"produce failed: {remaining} pending, {errors[:3]}")
    assert len(out.coords) == len(arrivals), (len(out.coords), len(arrivals))
    return out


class Worker:
    """A ``headrace worker`` subprocess with its log in a file; always killed on exit."""

    def __init__(self, env: dict[str, str], log_path: Path, until_idle: float | None = None,
                 worker_id: str | None = None, extra_args: Sequence[str] = ()) -> None:
        args = [*CLI_BASE, "worker", *extra_args]
        if until_idle is not None:
            args += ["--until-idle", str(until_idle)]
        if worker_id is not None:
            args += ["--worker-id", worker_id]
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit on its own; raise (after killing it) on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker did not exit within {timeout}s; log tail:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the worker (its own process group: Faust may fork helpers)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def commit_records(redis_client: Any, redis_prefix: str, group: str) -> dict[str, dict[str, int]]:
    """The worker's durable progress records (``{prefix}:commit:{<group>}:topic:partition``)."""
    out: dict[str, dict[str, int]] = {}
    for key in redis_client.scan_iter(match=f"{redis_prefix}:commit:{{{group}}}:*", count=1000):
        raw = redis_client.hgetall(key)
        out[key.decode()] = {k.decode(): int(v) for k, v in raw.items()}
    return out


# --------------------------------------------------------------------------- read back
def read_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS,
               timeout: float = 60.0) -> list[Any]:
    """Every message of ``topic`` (all partitions, from offset 0) up to the FETCH high
    watermark: partition EOF is reported from fetch responses and confirmed against the
    cached (fetch) watermark; ListOffsets is never asked (defect D1, pinned by
    tests/integration/test_broker_contract.py)."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "enable.partition.eof": True})
    out: list[Any] = []
    next_off = dict.fromkeys(range(partitions), 0)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < partitions:
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic}: no EOF on {set(range(partitions)) - done}")
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        p = msg.partition()
                        _lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                 cached=True)
                        if hi < 0 or next_off[p] >= hi:
                            done.add(p)
                        continue
                    raise KafkaException(err)
                done.discard(msg.partition())
                next_off[msg.partition()] = msg.offset() + 1
                out.append(msg)
    finally:
        consumer.close()
    return out


def _headers(msg: Any) -> dict[str, str]:
    return {k: (v.decode("utf-8", "replace") if v is not None else "")
            for k, v in (msg.headers() or [])}


def side_records(bootstrap: str, topic_prefix: str, name: str) -> list[
        tuple[tuple[str, int, int, int], str, bytes]]:
    """(source coords, hr-reason, value) of every record of the dead-letter/late topic
    ``name`` of a namespace; source topics are named without the namespace prefix."""
    out = []
    for msg in read_topic(bootstrap, f"{topic_prefix}{name}"):
        h = _headers(msg)
        source = h["hr-source-topic"]
        if source.startswith(topic_prefix):
            source = source[len(topic_prefix):]
        coords = (source, int(h["hr-source-partition"]),
                  int(h["hr-source-offset"]), int(h["hr-index"]))
        out.append((coords, h["hr-reason"], msg.value() or b""))
    return out


def read_offline_events(settings: Any, kind: str) -> pa.Table:
    """Every row of ``events/{kind}/`` (all files, concatenated; ``ts`` as int64 ms), plus
    a ``_file`` column naming the file it came from."""
    fs = settings.pyarrow_s3()
    root = settings.offline_path()
    if fs is None:
        fs = pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/events/{kind}", recursive=True,
                                               allow_not_found=True))
    tables = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        t = pq.read_table(info.path, filesystem=fs)
        t = t.set_column(t.schema.get_field_index("ts"), "ts", pc.cast(t["ts"], pa.int64()))
        t = t.append_column("_file", pa.array([info.path] * t.num_rows, pa.string()))
        tables.append(t.replace_schema_metadata(None))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


# --------------------------------------------------------------------------- headrace get
def get_inprocess(env: dict[str, str], entity: str, ids: Sequence[str], at: int,
                  extra_args: Sequence[str] = ()) -> tuple[int, list[dict[str, Any]]]:
    """Run ``headrace get --entity E --id ... --at T --json`` in this process (the CLI's
    own entry point, settings from the environment) and parse its lines."""
    from headrace.cli import main

    argv = ["get", "--entity", entity, "--at", str(at), "--json", *extra_args]
    for i in ids:
        argv += ["--id", i]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def get_subprocess(env: dict[str, str], entity: str, ids: Sequence[str], at: int,
                   timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    """The same through a real ``headrace get`` subprocess."""
    argv = [*CLI_BASE, "get", "--entity", entity, "--at", str(at), "--json"]
    for i in ids:
        argv += ["--id", i]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


# --------------------------------------------------------------------------- checks
# Each check returns a list of human-readable problems (empty = as the oracle says), so a
# test can report every kind of defect of one run at once.
Probe = tuple[str, str, int]
Record = tuple[tuple[str, int, int, int], str, bytes]


def _same(got: Any, want: Any) -> bool:
    """Exact equality, types included (an int count is not a float 3.0)."""
    return type(got) is type(want) and got == want


def online_features(env: dict[str, str], probes: Sequence[Probe],
                    extra_args: Sequence[str] = ()) -> tuple[
        dict[Probe, dict[str, Any] | str], int]:
    """Features of every probe through ``headrace get --json`` (in-process entry point).

    Returns (probe -> features or an error string, number of CLI invocations)."""
    out: dict[Probe, dict[str, Any] | str] = {}
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for entity, eid, at in probes:
        groups[(entity, at)].append(eid)
    for (entity, at), ids in groups.items():
        code, lines = get_inprocess(env, entity, ids, at, extra_args)
        by_id = {line["id"]: line for line in lines}
        for eid in ids:
            line = by_id.get(eid)
            if line is None:
                out[(entity, eid, at)] = f"no output line (exit {code})"
            elif "features" not in line:
                out[(entity, eid, at)] = f"error (exit {code}): {line.get('error')}"
            else:
                out[(entity, eid, at)] = line["features"]
    return out, len(groups)
