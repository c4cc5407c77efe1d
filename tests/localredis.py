"""A private redis-server on a port of its own, for tests that stop, freeze or kill it
(the session's shared one must stay up for the other tests)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["start_redis"]


def start_redis(port: int, data_dir: Path, *, persistent: bool = False,
                password: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``redis-server`` on 127.0.0.1:``port`` with its files in ``data_dir`` and
    return once it answers PING (AssertionError after ~10 s). ``persistent``: an
    append-only file fsynced at every write (a restart on the same ``data_dir`` keeps
    the data); else no persistence at all. ``password``: started with ``--requirepass``."""
    import redis

    from headrace.stack.services import _redis_binary

    argv = [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(data_dir)]
    argv += (["--appendonly", "yes", "--appendfsync", "always"] if persistent
             else ["--appendonly", "no"])
    if password is not None:
        argv += ["--requirepass", password]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password)
    try:
        for _ in range(500):
            try:
                client.ping()
                return proc
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
    finally:
        client.close()
    proc.kill()
    proc.wait()
    raise AssertionError("redis-server did not start")
