"""The traffic split shared through Redis, and the sticky assignment of a request to an arm.

The controller writes one :class:`SplitState` (JSON) at :func:`split_key`; every server
polls it, applies it and acknowledges what it applied at :func:`ack_key` (an
:class:`Ack`, expiring after :data:`ACK_TTL_S`). The formats are the package docstring's
(:mod:`headrace.rollout`); :meth:`SplitState.from_json` checks every field and reports
every problem at once.

Assignment: ``u = xxh64(f"{rollout_id}|{unit}") / 2**64`` (UTF-8 bytes, seed 0); the
request goes to the challenger iff ``u < share``. Sticky (a unit keeps its arm while
the rollout and share stay) and monotone in the share (a unit in the 3 % stays in at
10 %); a new ``rollout_id`` reshuffles. :func:`positions` computes ``u`` for many
units at once (benchmarks, tests, simulations).

Pure apart from :func:`read_split` and :func:`write_ack`, which take a redis-py client
(``get``/``set``) and turn its failures into
:class:`~headrace.core.errors.OnlineStoreError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import xxhash

from headrace.core.errors import InputError, OnlineStoreError

__all__ = ["MAX_SHARE", "ACK_TTL_S", "SplitState", "SplitStateError", "Ack", "split_key",
           "ack_key", "assign", "position", "positions", "read_split", "write_ack"]

#: the largest challenger share a split may carry (phase 5 of the rollout)
MAX_SHARE = 0.5
#: seconds an acknowledgement lives unless refreshed (each server refreshes it every poll)
ACK_TTL_S = 10
_SCALE = float(2**64)
_VERSION = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FIELDS = ("seq", "rollout_id", "champion", "challenger", "share", "shadow", "phase",
           "updated_ms")


class SplitStateError(InputError):
    """A split document that is not valid JSON or breaks the format; ``problems`` lists
    every problem, each naming its field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid split state: " + "; ".join(self.problems))


def _problem_int(doc: dict[str, Any], name: str, low: int, high: int | None = None) -> str | None:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name}: must be an integer, got {value!r}"
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        return f"{name}: must be {bound}, got {value}"
    return None


def _problem_version(doc: dict[str, Any], name: str, nullable: bool) -> str | None:
    value = doc.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or _VERSION.fullmatch(value) is None:
        what = "a model version (1-128 letters, digits, '.', '_', '-'; not starting with '.')"
        return f"{name}: must be {what}{' or null' if nullable else ''}, got {value!r}"
    return None


@dataclass(frozen=True)
class SplitState:
    """One split as the controller wrote it (see :mod:`headrace.rollout`).

    Attributes:
        seq: strictly increasing per write (>= 0).
        rollout_id: salts the assignment hash (non-empty).
        champion: informational; servers serve their own ``CHAMPION`` file.
        challenger: the version in rollout, None for 100 % champion.
        share: the challenger's share of traffic, 0 <= share <= :data:`MAX_SHARE`
            (0 when ``challenger`` is None).
        shadow: the challenger also scores the champion's requests, off the response
            path.
        phase: 0 (none, or shadow only) to 5.
        updated_ms: when it was written, epoch milliseconds.
    """

    seq: int
    rollout_id: str
    champion: str
    challenger: str | None
    share: float
    shadow: bool
    phase: int
    updated_ms: int

    @classmethod
    def from_json(cls, text: str | bytes) -> SplitState:
        """Parse and validate a split document.

        Raises:
            SplitStateError: not JSON, not an object, or any field missing, of the wrong
                type or out of range (every problem listed, each naming its field).
        """
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SplitStateError([f"not JSON: {exc}"]) from exc
        if not isinstance(doc, dict):
            raise SplitStateError([f"must be a JSON object, got {type(doc).__name__}"])
        problems = [f"{name}: missing" for name in _FIELDS if name not in doc]
        problems += [f"{name}: unknown field" for name in doc if name not in _FIELDS]
        present = [n for n in _FIELDS if n in doc]
        checks = {
            "seq": lambda: _problem_int(doc, "seq", 0),
            "phase": lambda: _problem_int(doc, "phase", 0, 5),
            "updated_ms": lambda: _problem_int(doc, "updated_ms", 0),
            "champion": lambda: _problem_version(doc, "champion", False),
            "challenger": lambda: _problem_version(doc, "challenger", True),
            "rollout_id": lambda: None if isinstance(doc["rollout_id"], str) and doc[
                "rollout_id"] else f"rollout_id: must be a non-empty string, got "
                                   f"{doc['rollout_id']!r}",
            "shadow": lambda: None if isinstance(doc["shadow"], bool)
            else f"shadow: must be true or false, got {doc['shadow']!r}",
            "share": lambda: _share_problem(doc["share"]),
        }
        problems += [p for n in present if (p := checks[n]()) is not None]
        if not problems and doc["challenger"] is None and doc["share"] != 0:
            problems.append(f"share: must be 0 when challenger is null, got {doc['share']}")
        if not problems and doc["challenger"] == doc["champion"]:
            problems.append(f"challenger: must differ from champion {doc['champion']!r}")
        if problems:
            raise SplitStateError(problems)
        return cls(doc["seq"], doc["rollout_id"], doc["champion"], doc["challenger"],
                   float(doc["share"]), doc["shadow"], doc["phase"], doc["updated_ms"])

    def to_json(self) -> str:
        """The document, fields in the format's order (compact JSON)."""
        return json.dumps({name: getattr(self, name) for name in _FIELDS},
                          separators=(",", ":"))


def _share_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"share: must be a number, got {value!r}"
    if not (math.isfinite(value) and 0.0 <= value <= MAX_SHARE):
        return f"share: must be from 0 to {MAX_SHARE}, got {value}"
    return None


@dataclass(frozen=True)
class Ack:
    """What one server applies (written at :func:`ack_key`).

    Attributes:
        seq: the ``seq`` of the last split read and acted on (-1: none in Redis).
        applied_ms: when it was applied, epoch milliseconds.
        share: the challenger share actually served (0 when the challenger is not
            loaded or Redis is unreadable).
        challenger: the challenger version actually served, or None.
    """

    seq: int
    applied_ms: int
    share: float
    challenger: str | None

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "applied_ms": self.applied_ms,
                           "share": self.share, "challenger": self.challenger},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Ack:
        """Parse an acknowledgement (the controller's side).

        Raises:
            InputError: not an acknowledgement document.
        """
        try:
            doc = json.loads(text)
            return cls(int(doc["seq"]), int(doc["applied_ms"]), float(doc["share"]),
                       doc["challenger"])
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"invalid split acknowledgement: {exc}") from exc


def split_key(prefix: str) -> str:
    """The Redis key of the split state: ``{prefix}:rollout:split``."""
    return f"{prefix}:rollout:split"


def ack_key(prefix: str, server_id: str) -> str:
    """The Redis key of one server's acknowledgement: ``{prefix}:rollout:ack:{server_id}``."""
    return f"{prefix}:rollout:ack:{server_id}"


def position(rollout_id: str, unit: str) -> float:
    """The unit's point in [0, 1): ``xxh64(f"{rollout_id}|{unit}") / 2**64``."""
    return xxhash.xxh64_intdigest(f"{rollout_id}|{unit}".encode()) / _SCALE


def assign(rollout_id: str, unit: str, share: float) -> bool:
    """Whether ``unit`` (the user id, or the request id when anonymous) goes to the
    challenger at ``share``: ``position(rollout_id, unit) < share``.

    Sticky for a given (rollout, unit), monotone in ``share``; False for ``share`` 0.
    """
    return xxhash.xxh64_intdigest(f"{rollout_id}|{unit}".encode()) / _SCALE < share


def positions(rollout_id: str, units: Iterable[str]) -> np.ndarray:
    """:func:`position` of many units (float64 array, the units' order); compare it with a
    share to assign them all: ``positions(r, ids) < 0.1``."""
    salt = f"{rollout_id}|"
    digest = xxhash.xxh64_intdigest
    hashes = np.fromiter((digest((salt + u).encode()) for u in units), dtype=np.uint64)
    # uint64 -> float64 rounds like the scalar int / 2**64 does (to the nearest double)
    return hashes.astype(np.float64) / _SCALE


class _Redis(Protocol):
    def get(self, name: str) -> Any: ...

    def set(self, name: str, value: str, ex: int | None = None) -> Any: ...


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def read_split(client: _Redis, prefix: str) -> SplitState | None:
    """The split in Redis, or None when there is none (100 % champion).

    Raises:
        OnlineStoreError: Redis cannot answer (transient).
        SplitStateError: the stored document is invalid.
    """
    try:
        raw = client.get(split_key(prefix))
    except _redis_errors() as exc:
        raise OnlineStoreError(f"cannot read the split: {exc!r}", transient=True) from exc
    return None if raw is None else SplitState.from_json(raw)


def write_ack(client: _Redis, prefix: str, server_id: str, ack: Ack,
              ttl_s: int = ACK_TTL_S) -> None:
    """Write (refresh) one server's acknowledgement, expiring after ``ttl_s`` seconds.

    Raises:
        OnlineStoreError: Redis cannot answer (transient).
    """
    try:
        client.set(ack_key(prefix, server_id), ack.to_json(), ex=ttl_s)
    except _redis_errors() as exc:
        raise OnlineStoreError(f"cannot write the split ack: {exc!r}", transient=True) from exc
