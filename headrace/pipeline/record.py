"""The run records of the retraining pipeline and the one-run-at-a-time lock.

Layout under ``MODELS_DIR/pipeline/``::

    .lock                 fcntl.flock'ed by the process running a run; holds its name
    alerts.cursor         the last alerts-stream id ``schedule`` has read
    <run_id>/run.json     the record (:class:`RunRecord`), rewritten atomically
    <run_id>/labels.parquet, <run_id>/training_set.parquet   the steps' outputs

``run.json`` is rewritten whole at every change: a temporary file in the same folder,
fsync, ``os.replace``, fsync of the folder, so a reader (or a resumed run) sees either
the previous record or the new one, never a torn one. ``run_id`` is
``p-YYYYmmddTHHMMSSZ-<4 hex>``: sorting the names sorts the runs by start time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from headrace.core.errors import InputError
from headrace.core.jsonsafe import json_safe

__all__ = ["StepStatus", "RunStatus", "FINAL", "StepRecord", "RunRecord", "RunStore",
           "PipelineLocked", "new_run_id", "atomic_write_text"]

RECORD_FORMAT = 1


class StepStatus(StrEnum):
    """A step's status; ``skipped``: after a rejection, the steps that never run."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class RunStatus(StrEnum):
    """A run's status. ``running`` and ``failed`` are unfinished (``pipeline run``
    resumes them); the others are final."""

    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"  # a challenger registered and its rollout started
    REJECTED = "rejected"  # the model failed the offline gates (a normal outcome)
    INVALID = "invalid"  # the data failed validation (exit 2)
    ABANDONED = "abandoned"  # --restart gave it up


#: the statuses a run never leaves
FINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.REJECTED, RunStatus.INVALID,
                   RunStatus.ABANDONED})


def new_run_id(now_ms: int) -> str:
    """``p-YYYYmmddTHHMMSSZ-<4 hex>`` for ``now_ms`` (epoch ms UTC)."""
    stamp = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"p-{stamp}-{secrets.token_hex(2)}"


@dataclass
class StepRecord:
    """One step of a run. Times are epoch ms UTC; ``attempts`` counts every try (a
    retried transient failure and a resumed run each add one)."""

    name: str
    status: StepStatus = StepStatus.PENDING
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    started_ms: int | None = None
    finished_ms: int | None = None
    attempts: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON."""
        return {"name": self.name, "status": self.status.value, "inputs": self.inputs,
                "outputs": self.outputs, "started_ms": self.started_ms,
                "finished_ms": self.finished_ms, "attempts": self.attempts,
                "error": self.error}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StepRecord:
        """The inverse of :meth:`to_dict` (KeyError/ValueError on a malformed one)."""
        return cls(str(doc["name"]), StepStatus(doc["status"]), dict(doc.get("inputs") or {}),
                   dict(doc.get("outputs") or {}), doc.get("started_ms"),
                   doc.get("finished_ms"), int(doc.get("attempts", 0)), doc.get("error"))


@dataclass
class RunRecord:
    """One pipeline run: why it started, its steps and how it ended.

    Attributes:
        run_id: the folder's name. trigger: ``{"kind": "manual"|"schedule"|"drift"|
            "performance", …}``. created_ms: when it was created; the data window is
            fixed from it, so a resumed run reads the same data.
        status: :class:`RunStatus`; problems: one sentence per problem when it ended
            ``invalid``, ``rejected`` or ``failed``.
    """

    run_id: str
    trigger: dict[str, Any]
    created_ms: int
    steps: list[StepRecord]
    status: RunStatus = RunStatus.RUNNING
    finished_ms: int | None = None
    problems: list[str] = field(default_factory=list)

    def step(self, name: str) -> StepRecord:
        """The step called ``name`` (KeyError when there is none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def output(self, name: str) -> dict[str, Any]:
        """The outputs of the step ``name`` (``{}`` before it is done, or when the run
        has no such step: a record of another pipeline version)."""
        return next((s.outputs for s in self.steps if s.name == name), {})

    @property
    def finished(self) -> bool:
        """Whether the run ended for good."""
        return self.status in FINAL

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (``run.json``)."""
        return json_safe({"format": RECORD_FORMAT, "run_id": self.run_id,
                          "trigger": self.trigger, "created_ms": self.created_ms,
                          "status": self.status.value, "finished_ms": self.finished_ms,
                          "problems": list(self.problems),
                          "steps": [s.to_dict() for s in self.steps]})

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RunRecord:
        """The inverse of :meth:`to_dict`. Raises InputError for a malformed record."""
        try:
            return cls(str(doc["run_id"]), dict(doc.get("trigger") or {}),
                       int(doc["created_ms"]), [StepRecord.from_dict(s) for s in doc["steps"]],
                       RunStatus(doc["status"]), doc.get("finished_ms"),
                       list(doc.get("problems") or []))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid pipeline run record: {exc!r}") from exc

    @classmethod
    def new(cls, run_id: str, trigger: Mapping[str, Any], created_ms: int,
            steps: Sequence[str]) -> RunRecord:
        """A fresh run with every step pending."""
        return cls(run_id, dict(trigger), created_ms, [StepRecord(s) for s in steps])


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PipelineLocked(InputError):
    """Another process runs a pipeline run (exit 2, the message names it)."""


class RunStore:
    """The run records under ``MODELS_DIR/pipeline/`` (module docstring).

    Args:
        models_dir: the models folder.
    """

    def __init__(self, models_dir: Path | str) -> None:
        self.models_dir = Path(models_dir)
        self.root = self.models_dir / "pipeline"
        self.lock_path = self.root / ".lock"
        self.cursor_path = self.root / "alerts.cursor"

    def run_dir(self, run_id: str) -> Path:
        """The folder of ``run_id`` (created)."""
        folder = self.root / run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save(self, record: RunRecord) -> None:
        """Rewrite ``<run_id>/run.json`` atomically."""
        text = json.dumps(record.to_dict(), indent=1, allow_nan=False) + "\n"
        atomic_write_text(self.run_dir(record.run_id) / "run.json", text)

    def load(self, run_id: str) -> RunRecord:
        """The record of ``run_id``. Raises InputError when missing or malformed."""
        path = self.root / run_id / "run.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the pipeline run record {path}: {exc}") from exc
        return RunRecord.from_dict(doc)

    def runs(self) -> list[RunRecord]:
        """Every run with a readable record, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(p for p in self.root.iterdir()
                             if p.is_dir() and p.name.startswith("p-")):
            with contextlib.suppress(InputError):
                out.append(self.load(folder.name))
        return out

    def unfinished(self) -> RunRecord | None:
        """The newest run that is ``running`` or ``failed``, or None."""
        return next((r for r in reversed(self.runs()) if not r.finished), None)

    def last(self, *statuses: RunStatus) -> RunRecord | None:
        """The newest run with one of ``statuses`` (any status when none given)."""
        return next((r for r in reversed(self.runs())
                     if not statuses or r.status in statuses), None)

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def lock(self, what: str = "a pipeline run") -> Iterator[None]:
        """Hold ``.lock`` (``fcntl.flock``, exclusive, non-blocking) for the block; the
        file then names the holder (``host:pid``, what it runs). The kernel releases it
        when the process dies, however it dies.

        Raises:
            PipelineLocked: another process holds it (the message names the holder).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fh: IO[str] = open(self.lock_path, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                raise PipelineLocked(f"another pipeline run holds {self.lock_path} "
                                     f"(holder {holder}); wait for it to finish") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{socket.gethostname()}:{os.getpid()} {what}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fh.flush()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()

    # ------------------------------------------------------------------ alerts cursor
    def cursor(self) -> str | None:
        """The last alerts-stream id read by ``schedule``, or None."""
        try:
            text = self.cursor_path.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return text or None

    def save_cursor(self, stream_id: str) -> None:
        """Remember ``stream_id`` (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cursor_path, stream_id + "\n")
