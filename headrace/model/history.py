"""The model history file: ``MODELS_DIR/HISTORY.jsonl``, one JSON object per line per
event, never rewritten (the format is in :mod:`headrace.model.registry`).

:class:`HistoryFile` owns the file's I/O: a writer holds an ``fcntl.flock`` on
``.history.lock`` (:meth:`HistoryFile.lock`) around "read, validate, append", and
:meth:`HistoryFile.append` writes the lines of one decision in one ``O_APPEND`` write,
then fsyncs. :meth:`HistoryFile.read` skips a torn last line (a crash mid-write) with a
warning; the next append starts a new line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from headrace.core.errors import InputError

__all__ = ["HISTORY_FILE", "Role", "RoleEvent", "SplitEvent", "HistoryEvent", "HistoryFile"]

log = logging.getLogger(__name__)

HISTORY_FILE = "HISTORY.jsonl"
_LOCK_FILE = ".history.lock"


class Role(StrEnum):
    """The role of a model version."""

    CANDIDATE = "candidate"
    CHALLENGER = "challenger"
    CHAMPION = "champion"
    RETIRED = "retired"
    FAILED = "failed"


@dataclass(frozen=True)
class RoleEvent:
    """A version moved to ``role`` (``previous`` None: its first event)."""

    seq: int
    at_ms: int
    version: str
    role: Role
    previous: Role | None
    reason: str
    gates: Mapping[str, Any] = field(default_factory=dict)
    actor: str = "cli"
    rollout_id: str | None = None
    phase: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The history line's object."""
        return _line(self, "role")


@dataclass(frozen=True)
class SplitEvent:
    """Traffic shares (version -> share of requests, summing to 1) from ``at_ms`` on."""

    seq: int
    at_ms: int
    shares: Mapping[str, float]
    reason: str
    actor: str = "rollout"
    rollout_id: str | None = None
    phase: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The history line's object."""
        return _line(self, "split")


HistoryEvent = RoleEvent | SplitEvent


def _line(event: HistoryEvent, kind: str) -> dict[str, Any]:
    values = {f.name: getattr(event, f.name) for f in fields(event)}
    plain = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    return {"seq": plain.pop("seq"), "at_ms": plain.pop("at_ms"), "kind": kind, **plain}


def _parse(obj: Any) -> HistoryEvent:
    """One history line's object as an event. Raises KeyError/TypeError/ValueError."""
    common = {"seq": int(obj["seq"]), "at_ms": int(obj["at_ms"]), "reason": str(obj["reason"]),
              "actor": str(obj["actor"]), "rollout_id": obj.get("rollout_id"),
              "phase": obj.get("phase")}
    if obj["kind"] == "role":
        prev = obj.get("previous")
        return RoleEvent(version=str(obj["version"]), role=Role(obj["role"]),
                         previous=None if prev is None else Role(prev),
                         gates=dict(obj.get("gates") or {}), **common)
    if obj["kind"] == "split":
        return SplitEvent(shares={str(k): float(v) for k, v in obj["shares"].items()}, **common)
    raise ValueError(f"unknown kind {obj['kind']!r}")


class HistoryFile:
    """The history of ``models_dir`` on disk (the folder need not exist for reads)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.path = models_dir / HISTORY_FILE

    def read(self) -> list[HistoryEvent]:
        """Every complete event in file order (a torn or invalid line is skipped)."""
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        events: list[HistoryEvent] = []
        for n, line in enumerate(data.split(b"\n"), 1):
            try:
                if line.strip():
                    events.append(_parse(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("%s line %d is not a complete history event (a torn write?); "
                            "skipped: %s", self.path, n, exc)
        return events

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """Writers: an exclusive flock. Readers: shared, when the lock file exists (then
        they never see a line being written)."""
        lock = self.models_dir / _LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
        except FileNotFoundError:
            if exclusive:
                raise InputError(f"the models folder {self.models_dir} does not exist") from None
            fd = -1
        except OSError as exc:
            raise InputError(f"cannot lock {lock}: {exc.strerror or exc}") from exc
        if fd < 0:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def append(self, events: Sequence[HistoryEvent]) -> None:
        """One O_APPEND write of whole lines, then fsync (caller holds the lock)."""
        payload = "".join(json.dumps(e.to_dict(), allow_nan=False, separators=(",", ":"))
                          + "\n" for e in events).encode("utf-8")
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    payload = b"\n" + payload  # after a torn line: start a new one
                written = os.write(fd, payload)
                while written < len(payload):  # short write (disk full): we hold the lock
                    written += os.write(fd, payload[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise InputError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):  # make a new file's name durable
            if created:
                dfd = os.open(self.models_dir, os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
