"""The rollout controller's Redis keys (``prefix`` is ``HEADRACE_REDIS_PREFIX``).

* ``{prefix}:rollout:state`` — the controller's document: ``{"format": 1, "state":
  RolloutState.to_dict(), "policy": Policy.to_dict(), "stats_file": …,
  "updated_ms": …}``; written before a decision's actions run and after each.
* ``{prefix}:rollout:lock`` — ``SET NX PX`` with a random token naming its holder
  (``host:pid:hex``), renewed at every tick by a Lua compare-and-expire, released by a
  compare-and-delete: a second controller refuses to start; a killed one's lock
  expires after its TTL.
* ``{prefix}:rollout:seq`` — ``INCR``-ed for every split: ``seq`` strictly increases
  across rollouts and controller restarts.
* ``{prefix}:rollout:abort`` — ``{"rollout_id", "reason", "requested_ms"}``: an abort
  request, acted on at the controller's next tick.
* ``{prefix}:rollout:split`` and ``{prefix}:rollout:ack:*`` — the split and the
  servers' acknowledgements (:mod:`headrace.rollout.split`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from headrace.core.errors import InputError, OnlineStoreError
from headrace.core.jsonsafe import json_safe
from headrace.rollout.controller import RolloutState
from headrace.rollout.policy import Policy
from headrace.rollout.split import Ack, SplitState, split_key

__all__ = ["Stored", "RolloutStore", "new_token"]

log = logging.getLogger(__name__)

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")


def new_token() -> str:
    """A lock token naming its holder: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Stored:
    """The controller document: the state, the policy it runs and its stats file."""

    state: RolloutState
    policy: Policy
    stats_file: str | None = None


class RolloutStore:
    """The controller's Redis keys (module docstring). Every Redis failure becomes a
    transient :class:`~headrace.core.errors.OnlineStoreError`.

    Args:
        client: a redis-py client (bytes replies) with a socket timeout.
        prefix: the deployment's key prefix.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.state_key = f"{prefix}:rollout:state"
        self.lock_key = f"{prefix}:rollout:lock"
        self.seq_key = f"{prefix}:rollout:seq"
        self.abort_key = f"{prefix}:rollout:abort"

    @contextmanager
    def _redis(self, what: str) -> Iterator[None]:
        from redis.exceptions import RedisError

        from headrace.core.redis_conn import auth_error, client_endpoint

        try:
            yield
        except (RedisError, OSError) as exc:
            denied = auth_error(exc, client_endpoint(self.client))
            if denied is not None:  # one sentence, exit 2: retrying cannot help
                raise denied from exc
            raise OnlineStoreError(f"cannot {what} in redis: {exc}", transient=True) from exc

    def load(self) -> Stored | None:
        """The controller document, or None. Raises InputError when it is malformed."""
        with self._redis("read the rollout state"):
            raw = self.client.get(self.state_key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return Stored(RolloutState.from_dict(doc["state"]), Policy.from_dict(doc["policy"]),
                          doc.get("stats_file"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"the rollout state at {self.state_key} is unreadable: {exc!r}"
                             ) from exc

    def save(self, stored: Stored, now_ms: int) -> None:
        """Write the controller document."""
        doc = json_safe({"format": 1, "state": stored.state.to_dict(),
                         "policy": stored.policy.to_dict(), "stats_file": stored.stats_file,
                         "updated_ms": now_ms})
        text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
        with self._redis("write the rollout state"):
            self.client.set(self.state_key, text)

    def acquire(self, token: str, ttl_ms: int) -> bool:
        """Take the lock if free."""
        with self._redis("take the rollout lock"):
            return bool(self.client.set(self.lock_key, token, nx=True, px=ttl_ms))

    def renew(self, token: str, ttl_ms: int) -> bool:
        """Extend the lock if ``token`` still holds it."""
        with self._redis("renew the rollout lock"):
            return bool(self.client.eval(_RENEW, 1, self.lock_key, token, ttl_ms))

    def release(self, token: str) -> bool:
        """Delete the lock if ``token`` still holds it."""
        with self._redis("release the rollout lock"):
            return bool(self.client.eval(_RELEASE, 1, self.lock_key, token))

    def holder(self) -> tuple[str, int] | None:
        """(the lock's token, milliseconds until it expires), or None when free."""
        with self._redis("read the rollout lock"):
            token, ttl = self.client.get(self.lock_key), self.client.pttl(self.lock_key)
        return None if token is None else (token.decode(errors="replace"), int(ttl))

    def write_split(self, make: Callable[[int], SplitState]) -> SplitState:
        """Write ``make(seq)`` with the next ``seq`` (``INCR``)."""
        with self._redis("write the split"):
            split = make(int(self.client.incr(self.seq_key)))
            self.client.set(split_key(self.prefix), split.to_json())
        return split

    def acks(self) -> dict[str, Ack]:
        """The live servers' acknowledgements (an expired one is gone: not live)."""
        head = f"{self.prefix}:rollout:ack:"
        with self._redis("read the split acknowledgements"):
            keys = list(self.client.scan_iter(match=head + "*", count=500))
            values = self.client.mget(keys) if keys else []
        out = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            name = key.decode(errors="replace")[len(head):]
            try:
                out[name] = Ack.from_json(raw)
            except InputError as exc:
                log.warning("ignoring the malformed acknowledgement of %s: %s", name, exc)
        return out

    def abort_request(self, rollout_id: str) -> str | None:
        """The reason of an abort request for ``rollout_id``, or None."""
        with self._redis("read the abort request"):
            raw = self.client.get(self.abort_key)
        try:
            doc = json.loads(raw) if raw is not None else None
        except ValueError:
            return "abort requested (unreadable request)"
        if not isinstance(doc, dict) or doc.get("rollout_id") != rollout_id:
            return None
        return str(doc.get("reason") or "abort requested")

    def request_abort(self, rollout_id: str, reason: str, now_ms: int) -> None:
        """Ask the running controller of ``rollout_id`` to roll back."""
        doc = {"rollout_id": rollout_id, "reason": reason, "requested_ms": now_ms}
        with self._redis("write the abort request"):
            self.client.set(self.abort_key, json.dumps(doc))

    def clear_abort(self) -> None:
        """Forget an abort request (a new rollout starts clean)."""
        with self._redis("clear the abort request"):
            self.client.delete(self.abort_key)
