"""Running one pipeline run under the lock (:func:`run_once`), and the trigger loop of
``headrace pipeline schedule`` (:class:`Scheduler`).

:func:`run_once` takes ``MODELS_DIR/pipeline/.lock`` (a second process is refused with
one sentence naming the holder), resumes the unfinished run (``running``: killed;
``failed``: a step failed) from its first step not done, or — with ``restart``, or when
there is none — starts a new one.

:class:`Scheduler` looks every ``HEADRACE_PIPELINE_POLL_S``: a run left ``running`` by a
killed process is resumed at once; otherwise :func:`~headrace.pipeline.trigger.decide`
says whether to start one (a ``failed`` run is then abandoned: the new run reads fresh
data). The run record is written before the alerts cursor moves past the alert that
triggered it, so a crash in between resumes that run rather than losing the trigger.
Errors of a look or a run are logged and the loop goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from headrace.core.errors import HeadraceError
from headrace.model.registry import ModelRegistry
from headrace.pipeline.record import RunRecord, RunStatus, RunStore, new_run_id
from headrace.pipeline.runner import PipelineRunner
from headrace.pipeline.trigger import Alert, AlertReader, Trigger, decide, next_cursor

__all__ = ["run_once", "rollout_in_progress", "abandon", "Look", "Scheduler"]

log = logging.getLogger(__name__)

#: run statuses that count as "the pipeline went through" for the time trigger
_WENT_THROUGH = (RunStatus.SUCCEEDED, RunStatus.REJECTED)


def abandon(store: RunStore, record: RunRecord, now_ms: int, why: str) -> None:
    """Mark an unfinished run ``abandoned`` (final)."""
    record.status, record.finished_ms = RunStatus.ABANDONED, now_ms
    record.problems = [*record.problems, why]
    store.save(record)


def run_once(store: RunStore, runner: PipelineRunner, trigger: Trigger, *,
             restart: bool = False, preflight: Callable[[], None] | None = None
             ) -> RunRecord:
    """Run or resume one run under the lock; returns its record as it ended.

    Args:
        preflight: called before a *new* run is created (not before a resume); raises
            InputError to refuse it (a rollout in progress), nothing changed.

    Raises:
        PipelineLocked: another process holds the lock (nothing changed).
        ValidationFailed / HeadraceError: as :meth:`PipelineRunner.run`.
    """
    with store.lock("headrace pipeline run"):
        current = store.unfinished()
        if current is None or restart:
            if preflight is not None:
                preflight()
            if current is not None:
                abandon(store, current, runner.clock_ms(),
                        "abandoned by pipeline run --restart")
            current = runner.new(new_run_id(runner.clock_ms()), trigger.to_dict())
        return runner.run(current)


def trained_ms(models_dir: Path, version: str | None) -> int | None:
    """When ``version`` was trained: its metadata's ``created_at`` (epoch ms), else the
    metadata file's modification time; None without a version or a readable file."""
    if version is None:
        return None
    meta = Path(models_dir) / version / "metadata.json"
    try:
        created = json.loads(meta.read_text(encoding="utf-8")).get("created_at")
        if isinstance(created, str):
            return int(datetime.fromisoformat(created).timestamp() * 1000)
        return int(meta.stat().st_mtime * 1000)
    except (OSError, ValueError, AttributeError):
        return None


def rollout_in_progress(models: ModelRegistry, rollout_running: Callable[[], bool]
                        ) -> str | None:
    """Why a new run must wait (a challenger in the registry, or a running rollout
    state), or None: the rollout's outcome decides the champion a new model must beat."""
    if (challenger := models.challenger()) is not None:
        return (f"model {challenger} is the challenger of a rollout in progress; a new "
                "pipeline run waits until it is promoted or rolled back (headrace rollout "
                "status)")
    if rollout_running():
        return ("a rollout is running (headrace rollout status); a new pipeline run waits "
                "until it ends")
    return None


@dataclass(frozen=True)
class Look:
    """What one look of the scheduler did: ``action`` is ``resumed``, ``started`` or
    ``none``; ``trigger``: why it started one; ``run``: the record as it ended."""

    action: str
    trigger: Trigger | None = None
    run: RunRecord | None = None


class Scheduler:
    """The trigger loop (module docstring).

    Args:
        store: the run records; runner: the steps' runner.
        models: the registry (the champion, a challenger in rollout).
        alerts: the alerts stream (None: only the time trigger).
        rollout_running: whether the rollout controller's state is a running rollout.
        every_ms / cooldown_ms / poll_s: the rules' periods and the look interval.
        clock_ms: epoch ms UTC (tests pin it).
    """

    def __init__(self, store: RunStore, runner: PipelineRunner, models: ModelRegistry,
                 alerts: AlertReader | None, *, rollout_running: Callable[[], bool],
                 every_ms: int, cooldown_ms: int, poll_s: float,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.store, self.runner, self.models, self.alerts = store, runner, models, alerts
        self.rollout_running = rollout_running
        self.every_ms, self.cooldown_ms, self.poll_s = every_ms, cooldown_ms, poll_s
        self.clock_ms = clock_ms or runner.clock_ms

    def look(self) -> Look:
        """One look: resume a killed run, or decide and maybe start one.

        Raises:
            PipelineLocked: another process runs a run now.
            HeadraceError: a look's Redis read or the run failed.
        """
        with self.store.lock("headrace pipeline schedule"):
            current = self.store.unfinished()
            if current is not None and current.status is RunStatus.RUNNING:
                log.info("pipeline: resuming run %s (it was interrupted)", current.run_id)
                return Look("resumed", None, self.runner.run(current))
            cursor = self.store.cursor()
            alerts: list[Alert] = []
            last_seen: str | None = None
            if self.alerts is not None:
                if cursor is None:  # the first start: only alerts from now on count
                    cursor = self.alerts.last_id()
                    self.store.save_cursor(cursor)
                alerts, last_seen = self.alerts.read(cursor)
            champion = self.models.champion()
            in_rollout = rollout_in_progress(self.models, self.rollout_running) is not None
            runs = [r for r in self.store.runs() if r.status is not RunStatus.ABANDONED]
            ok = [r for r in runs if r.status in _WENT_THROUGH]
            trigger = decide(self.clock_ms(), champion=champion, alerts=alerts,
                             last_success_ms=ok[-1].created_ms if ok else None,
                             last_run_ms=runs[-1].created_ms if runs else None,
                             every_ms=self.every_ms, cooldown_ms=self.cooldown_ms,
                             rollout_in_progress=in_rollout,
                             champion_since_ms=trained_ms(self.models.models_dir, champion))
            record = None
            if trigger is not None:
                if current is not None:
                    abandon(self.store, current, self.clock_ms(),
                            f"abandoned: a new run started ({trigger.reason})")
                record = self.runner.new(new_run_id(self.clock_ms()), trigger.to_dict())
            moved = next_cursor(cursor, last_seen, alerts, champion, trigger is not None)
            if moved is not None and moved != cursor:
                self.store.save_cursor(moved)
            if record is None:
                return Look("none")
            log.info("pipeline: starting run %s: %s", record.run_id, trigger.reason
                     if trigger else "")
            return Look("started", trigger, self.runner.run(record))

    def loop(self, stop: threading.Event, sleep: Callable[[float], bool] | None = None) -> None:
        """Look every ``poll_s`` until ``stop`` is set; errors are logged, never fatal."""
        wait = sleep or stop.wait
        last_error: str | None = None
        while not stop.is_set():
            started = time.monotonic()
            try:
                look = self.look()
                last_error = None
                if look.run is not None:
                    log.info("pipeline: run %s ended %s", look.run.run_id,
                             look.run.status.value)
            except HeadraceError as exc:
                if str(exc) != last_error:  # an outage: one line, not one per look
                    log.warning("pipeline schedule: %s", exc)
                last_error = str(exc)
            wait(max(0.0, self.poll_s - (time.monotonic() - started)))
