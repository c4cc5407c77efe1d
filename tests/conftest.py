"""Shared fixtures.

* ``stack`` (session): a real local stack (Tansu, redis-server, moto S3) started through
  :mod:`headrace.stack.local` in a temporary directory and stopped at the end of the session.
  A missing binary or package makes the requesting test *error* with a message naming
  what to install; nothing is skipped.
* ``ns`` (function): unique names for one test (topic/redis/offline prefixes) and the
  ``HEADRACE_*`` environment pointing at ``stack``; ``ns.settings(WorkerSettings)``
  builds any settings class from it without reading ``os.environ``.
* ``redis_client`` / ``s3fs_fs`` (function): clients on the stack, scoped to ``ns``.

Only integration tests (``tests/integration``, marked ``integration``) should request
these: unit tests need no services.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from headrace.core.settings import ENV_PREFIX, CommonSettings
from headrace.stack.local import OFFLINE_BUCKET, StackInfo, local_stack

S = TypeVar("S", bound=CommonSettings)


@dataclass(frozen=True)
class Namespace:
    """Unique names for one test, plus the environment that points at the stack.

    Attributes:
        id: 8 hex characters, unique per test.
        topic_prefix: ``t<id>.``; prepend to every topic (``ns.topic(name)`` does).
        redis_prefix: ``hr<id>``; prefix of every Redis key the test writes.
        offline_uri: ``s3://headrace-offline/<id>``.
        settings_env: The stack env (``HEADRACE_*`` and ``AWS_*``) with the three
            prefixes above as ``HEADRACE_TOPIC_PREFIX``/``HEADRACE_REDIS_PREFIX``/
            ``HEADRACE_OFFLINE_URI``.
        stack: The session stack.
    """

    id: str
    topic_prefix: str
    redis_prefix: str
    offline_uri: str
    settings_env: dict[str, str]
    stack: StackInfo = field(repr=False)

    def topic(self, name: str) -> str:
        """The test's unique name for topic ``name``."""
        return f"{self.topic_prefix}{name}"

    def settings(self, cls: type[S] | None = None, **overrides: Any) -> S:
        """Build ``cls`` (default :class:`CommonSettings`) from ``settings_env``.

        ``overrides`` are typed field values that win over the environment.
        """
        klass: type[Any] = cls or CommonSettings
        return klass.from_env(self.settings_env, **overrides)  # type: ignore[no-any-return]

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` plus ``settings_env`` (plus ``extra``), for CLI subprocesses."""
        return {**os.environ, **self.settings_env, **extra}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """The session's local stack; its state and logs are in ``Path(stack.dir)``."""
    root: Path = tmp_path_factory.mktemp("stack")
    with local_stack(root) as info:
        yield info


@pytest.fixture
def ns(stack: StackInfo) -> Namespace:
    """Unique per-test names and the settings environment for ``stack``."""
    uid = uuid.uuid4().hex[:8]
    topic_prefix = f"t{uid}."
    redis_prefix = f"hr{uid}"
    offline_uri = f"s3://{OFFLINE_BUCKET}/{uid}"
    env = dict(stack.env)
    env.update(
        {
            f"{ENV_PREFIX}TOPIC_PREFIX": topic_prefix,
            f"{ENV_PREFIX}REDIS_PREFIX": redis_prefix,
            f"{ENV_PREFIX}OFFLINE_URI": offline_uri,
        }
    )
    return Namespace(
        id=uid,
        topic_prefix=topic_prefix,
        redis_prefix=redis_prefix,
        offline_uri=offline_uri,
        settings_env=env,
        stack=stack,
    )


@pytest.fixture
def redis_client(ns: Namespace) -> Iterator[Any]:
    """A ``redis.Redis`` (bytes replies) on the stack; deletes ``ns.redis_prefix*`` after."""
    import redis

    client = redis.Redis.from_url(ns.stack.redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{ns.redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def s3fs_fs(ns: Namespace) -> Any:
    """An ``s3fs.S3FileSystem`` on the stack's S3 endpoint, its listing cache cleared.

    Paths are ``bucket/key``; this test's area is ``ns.settings().offline_path()``.
    Call ``invalidate_cache()`` after another client wrote.
    """
    import s3fs

    fs = s3fs.S3FileSystem(**ns.settings().storage_options())
    fs.invalidate_cache()
    return fs
