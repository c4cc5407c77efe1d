"""Helpers of the stream end-to-end tests: produce an adversarial stream, run workers,
read back every output (Redis through ``headrace get``, the dead-letter topics, the
offline store) and build the oracle's expectations.

Nothing here computes a feature: expectations come from :mod:`tests.oracle`; this module
only moves bytes between the test, the broker, the worker processes and the stores.
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
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests.adversarial import Arrival, Stream
from tests.oracle import OracleIndex, accepted_events, features_as_of

__all__ = [
    "PARTITIONS",
    "TIMESTAMP_BASE",
    "Produced",
    "Expected",
    "Worker",
    "Probe",
    "Record",
    "namespace_for",
    "fresh_namespace",
    "create_source_topics",
    "produce_arrivals",
    "expectations",
    "worker_env",
    "commit_records",
    "read_topic",
    "side_records",
    "read_offline_events",
    "get_inprocess",
    "get_subprocess",
    "online_features",
    "feature_problems",
    "late_problems",
    "reason_code",
    "dead_problems",
    "offline_problems",
    "offline_rows",
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


# --------------------------------------------------------------------------- expectations
@dataclass
class Expected:
    """The oracle's view of one produced stream."""

    stream: Stream
    produced: Produced
    accepted: list[dict[str, Any]]
    late: list[dict[str, Any]]
    index: OracleIndex
    #: event_id -> (topic, partition, offset, index)
    coords_of: dict[str, tuple[str, int, int, int]]
    #: (topic, partition, offset, index) -> expected reason code of each malformed arrival
    dead: dict[tuple[str, int, int, int], str]
    #: event_id -> its index in ``stream.arrivals``
    arrival_of: dict[str, int]

    def late_coords(self) -> set[tuple[str, int, int, int]]:
        return {self.coords_of[e["event_id"]] for e in self.late}

    def features(self, entity: str, eid: str, as_of: int) -> dict[str, Any]:
        return features_as_of(self.index, entity, eid, as_of)


def expectations(stream: Stream, produced: Produced) -> Expected:
    accepted, late = accepted_events(stream.events, stream.partitions)
    coords_of: dict[str, tuple[str, int, int, int]] = {}
    arrival_of: dict[str, int] = {}
    dead: dict[tuple[str, int, int, int], str] = {}
    for i, a in enumerate(stream.arrivals):
        if a.event is not None:
            coords_of[a.event["event_id"]] = produced.coords[i]
            arrival_of[a.event["event_id"]] = i
        else:
            assert a.reason is not None
            dead[produced.coords[i]] = a.reason
    return Expected(stream, produced, accepted, late, OracleIndex(accepted), coords_of, dead,
                    arrival_of)


# --------------------------------------------------------------------------- workers
class Worker:
    """A ``headrace worker`` subprocess with its log in a file; always killed on exit."""

    def __init__(self, env: dict[str, str], log_path: Path, until_idle: float | None = None,
                 worker_id: str | None = None) -> None:
        args = [*CLI_BASE, "worker"]
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
    cached (fetch) watermark; ListOffsets is never asked (INFRA D1)."""
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
def get_inprocess(env: dict[str, str], entity: str, ids: Sequence[str], at: int) -> tuple[
        int, list[dict[str, Any]]]:
    """Run ``headrace get --entity E --id ... --at T --json`` in this process (the CLI's
    own entry point, settings from the environment) and parse its lines."""
    from headrace.cli import main

    argv = ["get", "--entity", entity, "--at", str(at), "--json"]
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


def _same(got: Any, want: Any) -> bool:
    """Exact equality, types included (an int count is not a float 3.0)."""
    return type(got) is type(want) and got == want


def online_features(env: dict[str, str], probes: Sequence[Probe]) -> tuple[
        dict[Probe, dict[str, Any] | str], int]:
    """Features of every probe through ``headrace get --json`` (in-process entry point).

    Returns (probe -> features or an error string, number of CLI invocations)."""
    out: dict[Probe, dict[str, Any] | str] = {}
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for entity, eid, at in probes:
        groups[(entity, at)].append(eid)
    for (entity, at), ids in groups.items():
        code, lines = get_inprocess(env, entity, ids, at)
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


def feature_problems(exp: Expected, got: dict[Probe, dict[str, Any] | str],
                     limit: int = 30) -> list[str]:
    """Every probe whose features differ from the oracle (feature by feature)."""
    problems: list[str] = []
    for (entity, eid, at), features in got.items():
        want = exp.features(entity, eid, at)
        if isinstance(features, str):
            problems.append(f"{entity} {eid} @ {at}: {features}")
            continue
        diff = {n: (features.get(n, "<missing>"), w) for n, w in want.items()
                if not _same(features.get(n, "<missing>"), w)}
        extra = set(features) - set(want)
        if diff or extra:
            latest = exp.index.latest(entity, eid)
            problems.append(f"{entity} {eid} @ {at} (latest event {latest}): "
                            f"(got, oracle) {diff}" + (f" extra {extra}" if extra else ""))
    more = [f"... {len(problems) - limit} more"] if len(problems) > limit else []
    return problems[:limit] + more


Record = tuple[tuple[str, int, int, int], str, bytes]


def late_problems(exp: Expected, records: Sequence[Record], *,
                  allow_duplicates: bool) -> tuple[list[str], int]:
    """The late topic against the oracle's late events. Returns (problems, #duplicates)."""
    problems: list[str] = []
    want = exp.late_coords()
    by_coords: dict[tuple[str, int, int, int], list[Record]] = defaultdict(list)
    for r in records:
        by_coords[r[0]].append(r)
    got = set(by_coords)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        problems.append(f"late topic: {len(missing)} oracle-late events missing {missing[:5]}, "
                        f"{len(extra)} records that are not late {extra[:5]}")
    event_at = {c: e for e in exp.late for c in [exp.coords_of[e["event_id"]]]}
    n_dup = 0
    for coords, recs in by_coords.items():
        if len(recs) > 1:
            n_dup += len(recs) - 1
            if not allow_duplicates:
                problems.append(f"late topic: {len(recs)} records for {coords}")
            elif len({(r[1], r[2]) for r in recs}) > 1:
                problems.append(f"late topic: differing duplicates for {coords}: {recs}")
        event = event_at.get(coords)
        if event is None:
            continue
        reason, value = recs[0][1], recs[0][2]
        if reason.split(":", 1)[0] != "late":
            problems.append(f"late topic: {coords} has reason {reason!r}")
        try:
            body = json.loads(value)
        except ValueError:
            problems.append(f"late topic: {coords} value is not JSON: {value[:80]!r}")
            continue
        if body.get("event_id") != event["event_id"] or body.get("ts") != event["ts"]:
            problems.append(f"late topic: {coords} holds {body.get('event_id')}@{body.get('ts')}"
                            f", the event there is {event['event_id']}@{event['ts']}")
    return problems[:30], n_dup


def reason_code(reason: str) -> str:
    """The code of an ``hr-reason`` header (its first token)."""
    return reason.split(":", 1)[0].strip()


def dead_problems(exp: Expected, records: Sequence[Record], *, allow_duplicates: bool,
                  check_codes: bool = True) -> tuple[list[str], int]:
    """The dead-letter topic against the malformed arrivals. Returns (problems, #dups).

    ``check_codes=False`` skips comparing reason codes with the generator's (for tests
    that compare reasons with a reference run instead)."""
    problems: list[str] = []
    by_coords: dict[tuple[str, int, int, int], list[Record]] = defaultdict(list)
    for r in records:
        by_coords[r[0]].append(r)
    missing = sorted(set(exp.dead) - set(by_coords))
    extra = sorted(set(by_coords) - set(exp.dead))
    if missing:
        problems.append(f"dlq: {len(missing)} malformed messages missing: "
                        + ", ".join(f"{c} ({exp.dead[c]})" for c in missing[:8]))
    if extra:
        problems.append(f"dlq: {len(extra)} unexpected records: "
                        + ", ".join(f"{c} {by_coords[c][0][1][:80]!r}" for c in extra[:8]))
    raw_at = {exp.produced.coords[i]: a.value for i, a in enumerate(exp.stream.arrivals)
              if a.event is None}
    wrong: list[str] = []
    n_dup = 0
    for coords, recs in by_coords.items():
        if len(recs) > 1:
            n_dup += len(recs) - 1
            if not allow_duplicates:
                problems.append(f"dlq: {len(recs)} records for {coords}")
            elif len({(reason_code(r[1]), r[2]) for r in recs}) > 1:
                # the reason's detail may hold the wall clock (ts_in_future): codes only
                problems.append(f"dlq: differing duplicates for {coords}: {recs}")
        want = exp.dead.get(coords)
        if want is None:
            continue
        code = reason_code(recs[0][1])
        if check_codes and code != want:
            wrong.append(f"{coords} expected {want}, got {recs[0][1][:120]!r} "
                         f"(value {raw_at[coords][:60]!r})")
        if recs[0][2] != raw_at[coords]:
            problems.append(f"dlq: {coords} value is not the raw message")
    if wrong:
        problems.append(f"dlq: {len(wrong)} wrong reason codes: " + "; ".join(wrong[:10]))
    return problems[:30], n_dup


_KIND_FIELDS = {
    "impression": ("event_id", "ts", "user_id", "ad_id", "campaign_id", "publisher_id",
                   "placement", "creative_type", "device_type", "country", "bid_cpm"),
    "click": ("event_id", "ts", "impression_id", "user_id", "ad_id", "campaign_id",
              "publisher_id"),
}


def offline_problems(exp: Expected, tables: dict[str, pa.Table]) -> list[str]:
    """The ``events/`` rows against the oracle's accepted events: no duplicates, nothing
    late or malformed, every column equal to the event and its source coordinates."""
    problems: list[str] = []
    accepted_ids = {e["event_id"] for e in exp.accepted}
    late_ids = {e["event_id"] for e in exp.late}
    for kind, table in tables.items():
        want = {e["event_id"]: e for e in exp.accepted if e["type"] == kind}
        rows = table.to_pylist() if table.num_rows else []
        coords = Counter((r["_partition"], r["_offset"], r["_index"]) for r in rows)
        dups = {c: n for c, n in coords.items() if n > 1}
        if dups:
            problems.append(f"offline {kind}: {len(dups)} duplicated (_partition,_offset,_index)"
                            f", e.g. {sorted(dups.items())[:5]}")
        ids = Counter(r["event_id"] for r in rows)
        got_ids = set(ids)
        if got_ids != set(want):
            missing = sorted(set(want) - got_ids)
            extra = sorted(got_ids - set(want))
            problems.append(
                f"offline {kind}: {len(missing)} accepted events missing {missing[:5]}, "
                f"{len(extra)} extra ({len(set(extra) & late_ids)} late, "
                f"{len(set(extra) - accepted_ids - late_ids)} unknown) {extra[:5]}")
        bad: list[str] = []
        for r in rows:
            e = want.get(r["event_id"])
            if e is None:
                continue
            i = exp.arrival_of[e["event_id"]]
            topic, part, off, idx = exp.produced.coords[i]
            expect = {f: e[f] for f in _KIND_FIELDS[kind]}
            expect.update(_partition=part, _offset=off, _index=idx,
                          _ingest_ms=exp.produced.timestamps[i])
            diff = {k: (r.get(k), v) for k, v in expect.items() if r.get(k) != v}
            date = time.strftime("%Y-%m-%d", time.gmtime(e["ts"] // 1000))
            if f"/date={date}/" not in r["_file"]:
                diff["_file"] = (r["_file"], f"date={date}")
            if diff:
                bad.append(f"{e['event_id']}: (got, want) {diff}")
        if bad:
            problems.append(f"offline {kind}: {len(bad)} rows differ from their event: {bad[:5]}")
    return problems


def offline_rows(tables: dict[str, pa.Table]) -> dict[str, list[tuple[Any, ...]]]:
    """Every offline row as a sorted tuple of (column, value) pairs, per kind (no ``_file``)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for kind, table in tables.items():
        rows = table.drop_columns(["_file"]).to_pylist() if table.num_rows else []
        out[kind] = sorted(tuple(sorted(r.items())) for r in rows)
    return out
