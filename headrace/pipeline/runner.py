"""The step runner: a run is a fixed sequence of named steps, each recorded in
``run.json`` before and after it runs, so a killed run resumes after its last finished
step.

For each step not yet ``done``: mark it ``running`` (attempts + 1), call it, record its
outputs and ``done``. A step that fails *transiently* (:func:`is_transient`: a Redis,
S3 or Kafka outage) is retried with :class:`~headrace.core.retry.Backoff` up to
``retries`` tries, each counted in the record and in
``headrace_pipeline_retries_total``. Three ways a run ends early:

* :class:`ValidationFailed` — the data is unusable: the step ``failed``, the run
  ``invalid`` (final), one sentence per problem; an :class:`~headrace.core.errors.
  InputError`, so the command exits 2.
* :class:`Rejected` — the model failed the offline gates: the step ``done``, the rest
  ``skipped``, the run ``rejected`` (final, a normal outcome).
* any other error — the step and the run ``failed`` (resumable: ``pipeline run``
  picks it up again at that step), and the error propagates.

Steps must be idempotent on a redo of the step that was running when the process died:
each looks for its own earlier effect first (the train step finds its model by its
``source``, the rollout steps read the registry and the rollout state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headrace.core.errors import BackendError, HeadraceError, InputError, OfflineStoreError
from headrace.core.retry import Backoff
from headrace.pipeline.metrics import PipelineMetrics
from headrace.pipeline.record import RunRecord, RunStatus, RunStore, StepRecord, StepStatus

__all__ = ["STEP_BACKOFF", "StepFn", "Step", "StepContext", "ValidationFailed", "Rejected",
           "is_transient", "PipelineRunner"]

log = logging.getLogger(__name__)


class ValidationFailed(InputError):
    """The step's data failed validation; ``problems``: one sentence each."""

    def __init__(self, what: str, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        super().__init__(f"the {what} failed validation ({n} problem{'s' * (n != 1)}; the "
                         "champion and the registry are unchanged):" + "".join(
                             f"\n  - {p}" for p in self.problems))


class Rejected(Exception):  # noqa: N818 - an outcome, not an error
    """The model failed the offline gates: the run ends ``rejected``.

    Args:
        reasons: the gates' reasons; outputs: the step's outputs (the version).
    """

    def __init__(self, reasons: Sequence[str], outputs: Mapping[str, Any]) -> None:
        self.reasons = tuple(reasons)
        self.outputs = dict(outputs)
        super().__init__("; ".join(self.reasons))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may help: a :class:`~headrace.core.errors.BackendError`
    marked ``transient`` (Redis, Kafka), or an offline-store error caused by an I/O
    failure (S3 unreachable or timing out; pyarrow raises those as ``OSError``) other
    than a missing file or a refused permission."""
    if isinstance(exc, BackendError) and exc.transient:
        return True
    cause = exc.__cause__
    return (isinstance(exc, OfflineStoreError) and isinstance(cause, OSError)
            and not isinstance(cause, FileNotFoundError | PermissionError))


@dataclass
class StepContext:
    """What a step sees: its run, its own record and the run's folder."""

    run: RunRecord
    step: StepRecord
    folder: Path
    store: RunStore

    def record_inputs(self, **inputs: Any) -> None:
        """Record the step's inputs now (before its work, so a crash shows them)."""
        self.step.inputs.update(inputs)
        self.store.save(self.run)


#: a step: its context in, its outputs (strict JSON values) out
StepFn = Callable[[StepContext], Mapping[str, Any]]


@dataclass(frozen=True)
class Step:
    """A named step of the pipeline."""

    name: str
    fn: StepFn


#: the default back-off between tries of a step: 0.5 s doubling to 30 s
STEP_BACKOFF = Backoff(initial_s=0.5, max_s=30.0)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class PipelineRunner:
    """Runs (or resumes) one run's steps in order (module docstring).

    Args:
        store: the run records.
        steps: the steps, in order (their names must be the record's).
        retries: most tries of a step failing transiently (>= 1).
        backoff: the delays between those tries.
        metrics: the Prometheus metrics (default: a private registry).
        on_step: called with each step's record when it ends (the CLI prints it).
        crash_after: test only: ``os._exit(137)`` right after this step is saved done.
        clock_ms: epoch ms UTC; sleep: seconds -> None (tests pin both).
    """

    def __init__(self, store: RunStore, steps: Sequence[Step], *, retries: int = 5,
                 backoff: Backoff = STEP_BACKOFF,
                 metrics: PipelineMetrics | None = None,
                 on_step: Callable[[StepRecord, RunRecord], None] | None = None,
                 crash_after: str | None = None, clock_ms: Callable[[], int] = _wall_ms,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if retries < 1:
            raise ValueError("retries must be >= 1")
        self.store, self.steps, self.retries, self.backoff = store, tuple(steps), retries, backoff
        self.metrics = metrics or PipelineMetrics()
        self.on_step = on_step
        self.crash_after = crash_after or None
        self.clock_ms, self.sleep = clock_ms, sleep

    @property
    def names(self) -> tuple[str, ...]:
        """The step names, in order."""
        return tuple(s.name for s in self.steps)

    def new(self, run_id: str, trigger: Mapping[str, Any]) -> RunRecord:
        """Create and save a fresh run of these steps."""
        record = RunRecord.new(run_id, trigger, self.clock_ms(), self.names)
        self.store.save(record)
        return record

    def run(self, record: RunRecord) -> RunRecord:
        """Run ``record``'s unfinished steps; returns the record as it ended.

        Raises:
            ValidationFailed: the run ended ``invalid``.
            HeadraceError: a step failed (the run is ``failed``, resumable).
        """
        if record.finished:
            return record
        if [s.name for s in record.steps] != list(self.names):
            raise InputError(f"the pipeline run {record.run_id} has the steps "
                             f"{[s.name for s in record.steps]}, not {list(self.names)}; "
                             "abandon it with headrace pipeline run --restart")
        record.status, record.problems = RunStatus.RUNNING, []
        self.store.save(record)
        for step in self.steps:
            rec = record.step(step.name)
            if rec.status in (StepStatus.DONE, StepStatus.SKIPPED):
                continue
            try:
                rec.outputs = dict(self._attempt(step, rec, record))
            except Rejected as exc:
                self._done(rec, record, exc.outputs)
                for later in record.steps:
                    if later.status is StepStatus.PENDING:
                        later.status = StepStatus.SKIPPED
                return self._end(record, RunStatus.REJECTED, list(exc.reasons))
            except ValidationFailed as exc:
                self._failed(rec, exc)
                self._end(record, RunStatus.INVALID, list(exc.problems))
                raise
            except BaseException as exc:
                self._failed(rec, exc)
                self._end(record, RunStatus.FAILED, [_sentence(exc)])
                raise
            self._done(rec, record, rec.outputs)
        return self._end(record, RunStatus.SUCCEEDED, [])

    # ------------------------------------------------------------------ internals
    def _attempt(self, step: Step, rec: StepRecord, record: RunRecord) -> Mapping[str, Any]:
        ctx = StepContext(record, rec, self.store.run_dir(record.run_id), self.store)
        rec.status, rec.started_ms, rec.finished_ms = StepStatus.RUNNING, self.clock_ms(), None
        tries = 0
        while True:
            rec.attempts += 1
            tries += 1
            self.store.save(record)
            started = time.monotonic()
            try:
                out = step.fn(ctx)
            except (Rejected, ValidationFailed):
                self.metrics.step_seconds.labels(step=step.name).set(time.monotonic() - started)
                raise
            except HeadraceError as exc:
                if not is_transient(exc) or tries >= self.retries:
                    raise
                wait = self.backoff.delay(tries - 1)
                rec.error = f"attempt {rec.attempts}: {_sentence(exc)}"
                self.metrics.retries.labels(step=step.name).inc()
                log.warning("pipeline %s: step %s failed transiently (%s); retrying in "
                            "%.1f s", record.run_id, step.name, exc, wait)
                self.store.save(record)
                self.sleep(wait)
                continue
            self.metrics.step_seconds.labels(step=step.name).set(time.monotonic() - started)
            return out

    def _done(self, rec: StepRecord, record: RunRecord, outputs: Mapping[str, Any]) -> None:
        rec.status, rec.outputs, rec.error = StepStatus.DONE, dict(outputs), None
        rec.finished_ms = self.clock_ms()
        self.store.save(record)
        if self.on_step is not None:
            self.on_step(rec, record)
        if self.crash_after == rec.name:
            log.warning("pipeline %s: HEADRACE_PIPELINE_CRASH_AFTER=%s: exiting with 137 "
                        "(a test hook)", record.run_id, rec.name)
            os._exit(137)

    def _failed(self, rec: StepRecord, exc: BaseException) -> None:
        rec.status, rec.error, rec.finished_ms = StepStatus.FAILED, _sentence(exc), self.clock_ms()

    def _end(self, record: RunRecord, status: RunStatus, problems: list[str]) -> RunRecord:
        record.status, record.problems = status, problems
        record.finished_ms = self.clock_ms()
        self.store.save(record)
        failed = [s for s in record.steps if s.status is StepStatus.FAILED]
        if failed and self.on_step is not None:
            self.on_step(failed[0], record)
        self.metrics.runs.labels(outcome=status.value,
                                 trigger=str(record.trigger.get("kind", "manual"))).inc()
        if status in (RunStatus.SUCCEEDED, RunStatus.REJECTED):
            self.metrics.last_success.set(record.finished_ms / 1000)
        return record


def _sentence(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, HeadraceError) else f"{type(exc).__name__}: {text}"
