"""``headrace stack`` end to end: real processes, started by the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from headrace.stack import proc as _stackproc
from headrace.stack.local import OFFLINE_BUCKET, LocalStack

if TYPE_CHECKING:
    from conftest import Namespace

pytestmark = pytest.mark.integration

_CLI = shutil.which("headrace", path=str(Path(sys.executable).parent))
_BASE = [_CLI] if _CLI else [sys.executable, "-m", "headrace.cli"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*_BASE, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"headrace {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def _up_json(root: Path, *extra: str) -> dict[str, Any]:
    return json.loads(_cli("stack", "up", "--dir", str(root), "--json", *extra).stdout)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _port(url: str) -> int:
    port = urlsplit(url if "://" in url else f"tcp://{url}").port
    assert port is not None
    return port


def _assert_answers(info: dict[str, Any]) -> None:
    import boto3
    import redis
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": info["kafka_bootstrap"]}).list_topics(timeout=10)
    assert metadata.brokers, "the broker lists no brokers"
    client = redis.Redis.from_url(info["redis_url"])
    assert client.ping() is True
    client.close()
    env = info["env"]
    s3 = boto3.client(
        "s3", endpoint_url=info["s3_endpoint"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    assert OFFLINE_BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    """A stack directory that is torn down after the test, whatever state it is in."""
    root = tmp_path / "stack"
    yield root
    if (root / "stack.json").exists():
        LocalStack.down(root)


def test_up_json_serves_kafka_redis_s3(stack_dir: Path) -> None:
    info = _up_json(stack_dir)
    assert set(info["pids"]) == {"kafka", "redis", "s3"}
    assert info["offline_uri"] == "s3://headrace-offline"
    assert info["dir"] == str(stack_dir.resolve())
    env = info["env"]
    assert env["HEADRACE_BROKER_PROFILE"] == "embedded"
    assert env["HEADRACE_KAFKA_BOOTSTRAP"] == info["kafka_bootstrap"]
    assert env["HEADRACE_REDIS_URL"] == info["redis_url"]
    assert env["HEADRACE_S3_ENDPOINT"] == info["s3_endpoint"]
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    _assert_answers(info)
    for name, pid in info["pids"].items():
        assert (stack_dir / f"{name}.pid").read_text().strip() == str(pid)
        assert (stack_dir / f"{name}.log").exists()


def test_second_up_reports_the_running_stack(stack_dir: Path) -> None:
    first = _up_json(stack_dir)
    second = _up_json(stack_dir)
    assert second["pids"] == first["pids"]
    assert second["reused"] is True
    assert {k: v for k, v in second.items() if k != "reused"} == {
        k: v for k, v in first.items() if k != "reused"
    }
    human = _cli("stack", "up", "--dir", str(stack_dir)).stdout
    assert "already running" in human
    assert f"export HEADRACE_KAFKA_BOOTSTRAP={first['kafka_bootstrap']}" in human


def test_down_leaves_no_process_alive(stack_dir: Path) -> None:
    info = _up_json(stack_dir)
    status = json.loads(_cli("stack", "status", "--dir", str(stack_dir), "--json").stdout)
    assert status["running"] is True
    _cli("stack", "down", "--dir", str(stack_dir))
    for name, pid in info["pids"].items():
        assert not _alive(pid), f"{name} (pid {pid}) survived stack down"
        assert not (stack_dir / f"{name}.pid").exists()
    again = _cli("stack", "down", "--dir", str(stack_dir), check=False)
    assert again.returncode != 0
    assert "no Headrace stack recorded" in again.stderr


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _s3(info: dict[str, Any]) -> Any:
    import boto3

    env = info["env"]
    return boto3.client(
        "s3", endpoint_url=info["s3_endpoint"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _write_data(info: dict[str, Any]) -> dict[bytes, bytes]:
    """One record per key in a new topic ``kept``, an S3 object, a Redis key."""
    import redis
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from headrace.core.settings import CommonSettings

    settings = CommonSettings.from_env(info["env"])
    admin = AdminClient(settings.confluent_admin())
    admin.create_topics([NewTopic("kept", 1, 1)])["kept"].result(timeout=10)
    producer = Producer(settings.confluent_producer())
    sent = {b"k%d" % i: b"v%d" % i for i in range(5)}
    for key, value in sent.items():
        producer.produce("kept", key=key, value=value, partition=0)
    assert producer.flush(10) == 0
    _s3(info).put_object(Bucket=OFFLINE_BUCKET, Key="kept/part.txt", Body=b"offline rows")
    client = redis.Redis.from_url(info["redis_url"])
    client.set("hr:kept", b"1")
    client.close()
    return sent


def _read_topic(info: dict[str, Any], want: int) -> dict[bytes, bytes]:
    from confluent_kafka import Consumer, TopicPartition

    from headrace.core.settings import CommonSettings

    consumer = Consumer(CommonSettings.from_env(info["env"]).confluent_consumer("kept-reader"))
    got: dict[bytes, bytes] = {}
    try:
        consumer.assign([TopicPartition("kept", 0, 0)])
        deadline = time.monotonic() + 20
        while len(got) < want and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=want, timeout=0.5):
                assert msg.error() is None, msg.error()
                got[msg.key()] = msg.value()
    finally:
        consumer.close()
    return got


def test_up_restarts_only_the_service_that_is_down(stack_dir: Path) -> None:
    """Redis died: ``up`` restarts redis alone; the broker and S3 keep pid and data."""
    import redis

    first = _up_json(stack_dir)
    sent = _write_data(first)
    _kill(first["pids"]["redis"])
    assert _cli("stack", "status", "--dir", str(stack_dir), check=False).returncode == 1

    up = _cli("stack", "up", "--dir", str(stack_dir), "--json")
    second = json.loads(up.stdout)
    assert second["pids"]["kafka"] == first["pids"]["kafka"]
    assert second["pids"]["s3"] == first["pids"]["s3"]
    assert second["pids"]["redis"] != first["pids"]["redis"] and _alive(second["pids"]["redis"])
    assert second["reused"] is True
    # same endpoints (redis is back on its recorded port), so exported variables stay valid
    assert {k: v for k, v in second.items() if k not in ("pids", "reused")} == {
        k: v for k, v in first.items() if k not in ("pids", "reused")}
    assert f"redis is down (pid {first['pids']['redis']} is no longer running)" in up.stderr
    assert "restarting only redis; kafka, s3 keep running with their data" in up.stderr
    assert "stopping" not in up.stderr
    for name, pid in second["pids"].items():
        assert (stack_dir / f"{name}.pid").read_text().strip() == str(pid)

    assert _read_topic(second, len(sent)) == sent  # the broker's data is intact
    body = _s3(second).get_object(Bucket=OFFLINE_BUCKET, Key="kept/part.txt")["Body"].read()
    assert body == b"offline rows"  # and S3's
    client = redis.Redis.from_url(second["redis_url"])
    assert client.ping() is True
    assert client.get("hr:kept") is None  # redis-server runs without persistence
    client.close()
    _assert_answers(second)
    status = json.loads(_cli("stack", "status", "--dir", str(stack_dir), "--json").stdout)
    assert status["running"] is True
    human = _cli("stack", "up", "--dir", str(stack_dir)).stdout
    assert "already running" in human


def test_up_never_stops_a_service_that_is_alive_but_silent(stack_dir: Path) -> None:
    first = _up_json(stack_dir)
    redis_pid = first["pids"]["redis"]
    os.kill(redis_pid, signal.SIGSTOP)  # hung: alive, answers nothing
    try:
        up = _cli("stack", "up", "--dir", str(stack_dir), check=False)
        assert up.returncode != 0
        assert (f"redis (pid {redis_pid}) is running but does not answer on port "
                f"{_port(first['redis_url'])}; nothing was stopped or started") in up.stderr
        assert "--restart" in up.stderr
        assert all(_alive(pid) for pid in first["pids"].values())
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    again = _up_json(stack_dir)
    assert again["pids"] == first["pids"] and again["reused"] is True


def test_a_failed_restart_leaves_the_healthy_services_alone(
    stack_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headrace.core.errors import StackError
    from headrace.stack import services

    first = LocalStack.up(stack_dir)
    before = (stack_dir / "stack.json").read_text()
    _kill(first.pids["redis"])
    monkeypatch.setitem(services.ARGV, "redis", lambda port: ["/bin/false"])
    notes: list[str] = []
    with pytest.raises(StackError, match="exited with status 1"):
        LocalStack.up(stack_dir, progress=notes.append)
    assert "start failed; stopping what this call started (kafka, s3 left running)" in notes
    assert _alive(first.pids["kafka"]) and _alive(first.pids["s3"])
    assert (stack_dir / "stack.json").read_text() == before  # the record is put back
    monkeypatch.undo()
    second = LocalStack.up(stack_dir)
    assert second.started == ["redis"] and second.reused
    assert {n: p for n, p in second.pids.items() if n != "redis"} == {
        n: p for n, p in first.pids.items() if n != "redis"}
    _assert_answers(second.to_json())


def test_restart_flag_stops_everything_and_starts_fresh(stack_dir: Path) -> None:
    first = _up_json(stack_dir)
    os.kill(first["pids"]["redis"], signal.SIGKILL)
    status = _cli("stack", "status", "--dir", str(stack_dir), check=False)
    assert status.returncode == 1
    up = _cli("stack", "up", "--dir", str(stack_dir), "--json", "--restart")
    second = json.loads(up.stdout)
    assert "--restart: stopping every service" in up.stderr
    assert second["reused"] is False
    assert set(second["pids"].values()).isdisjoint(first["pids"].values())
    for pid in first["pids"].values():
        assert not _alive(pid)
    _assert_answers(second)


def test_taken_preferred_ports_are_skipped(stack_dir: Path) -> None:
    taken = [socket.socket() for _ in range(3)]
    try:
        for sock in taken:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ports = [sock.getsockname()[1] for sock in taken]
        info = _up_json(stack_dir, "--kafka-port", str(ports[0]), "--redis-port",
                        str(ports[1]), "--s3-port", str(ports[2]))
        used = [_port(info["kafka_bootstrap"]), _port(info["redis_url"]),
                _port(info["s3_endpoint"])]
        assert set(used).isdisjoint(ports)
        _assert_answers(info)
    finally:
        for sock in taken:
            sock.close()


def test_port_taken_after_the_check_is_retried(
    stack_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: a port is free when chosen and taken when the service binds it."""
    monkeypatch.setattr(_stackproc, "port_free", lambda port: True)
    taken = [socket.socket() for _ in range(3)]
    try:
        for sock in taken:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ports = [sock.getsockname()[1] for sock in taken]
        notes: list[str] = []
        started = time.monotonic()
        preferred = dict(zip(("kafka", "redis", "s3"), ports, strict=True))
        info = LocalStack.up(stack_dir, ports=preferred, progress=notes.append)
        assert time.monotonic() - started < 30
        assert sum("was taken meanwhile" in line for line in notes) == 3, notes
        used = [_port(info.kafka_bootstrap), _port(info.redis_url), _port(info.s3_endpoint)]
        assert set(used).isdisjoint(ports)
        _assert_answers(info.to_json())
    finally:
        for sock in taken:
            sock.close()


def test_local_stack_context_manager_stops_on_error(tmp_path: Path) -> None:
    from headrace.stack.local import local_stack

    pids: dict[str, int] = {}
    with pytest.raises(RuntimeError, match="boom"):
        with local_stack(tmp_path / "ctx") as info:
            pids = info.pids
            raise RuntimeError("boom")
    assert pids and not any(_alive(pid) for pid in pids.values())
    assert not (tmp_path / "ctx" / "stack.json").exists()


def test_session_fixtures_and_settings_reach_the_stack(
    ns: Namespace, redis_client: Any, s3fs_fs: Any
) -> None:
    """The conftest fixtures, and settings built from ``ns``, talk to the session stack."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from headrace.core.settings import ServeSettings, WorkerSettings

    worker = ns.settings(WorkerSettings)
    assert worker.broker_profile == "embedded"
    assert worker.topic("events") == f"t{ns.id}.events"
    assert ns.settings(ServeSettings, max_ids=7).max_ids == 7
    assert worker.offline_uri == f"s3://{OFFLINE_BUCKET}/{ns.id}"

    key = f"{ns.redis_prefix}:probe"
    redis_client.hset(key, mapping={"a": "1"})
    assert redis_client.hgetall(key) == {b"a": b"1"}

    # pyarrow writes through settings.pyarrow_s3(); s3fs (storage_options) reads it back.
    path = f"{worker.offline_path()}/probe.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=worker.pyarrow_s3())
    s3fs_fs.invalidate_cache()
    with s3fs_fs.open(path, "rb") as handle:
        assert pq.read_table(handle).column("x").to_pylist() == [1, 2, 3]
    assert s3fs_fs.ls(worker.offline_path()) == [path]
