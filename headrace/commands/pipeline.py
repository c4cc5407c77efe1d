"""``headrace pipeline run|status|schedule``: the automated retraining pipeline.

* ``run [--json] [--restart]``: run one pipeline run — labels, validation, training set,
  validation, training, gates, registration as challenger, the rollout's start — or
  resume the unfinished one from its last finished step (``--restart`` abandons it and
  starts anew). One line per step on stderr as it ends; ``--json`` prints one JSON
  summary on stdout. Exit 0 when the run went through (``succeeded``, or ``rejected``
  by the offline gates: a normal outcome); 2 with one sentence per problem when the data
  failed validation (champion and registry unchanged), or when another run holds the
  lock.
* ``status [--json]``: the last runs and the current one's steps.
* ``schedule``: the long-running trigger loop (:class:`~headrace.pipeline.service.
  Scheduler`); serves the metrics on ``HEADRACE_METRICS_PORT``.

Settings: :class:`~headrace.pipeline.settings.PipelineSettings` (``HEADRACE_PIPELINE_*``),
and for the rollout :class:`~headrace.rollout.settings.RolloutSettings`
(``HEADRACE_ROLLOUT_*``: policy, time scale, stats file, lock TTL).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.core.errors import InputError, UsageError

if TYPE_CHECKING:
    from headrace.pipeline.metrics import PipelineMetrics
    from headrace.pipeline.record import RunRecord, StepRecord
    from headrace.pipeline.runner import PipelineRunner
    from headrace.pipeline.settings import PipelineSettings
    from headrace.pipeline.steps import Pipeline
    from headrace.rollout.settings import RolloutSettings

__all__ = ["register", "handler", "build_pipeline", "build_runner"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pipeline", help="the automated retraining pipeline (labels to rollout)",
        description="Retrain with no human step: labels (IVT filtered) → validation → "
        "training set → validation → training with search → gates → challenger → the "
        "rollout's start. Settings: HEADRACE_MODELS_DIR, HEADRACE_OFFLINE_URI, "
        "HEADRACE_REDIS_URL, HEADRACE_PIPELINE_* (headrace/pipeline/settings.py).")
    sub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run one pipeline run, or resume the unfinished one")
    run.add_argument("--restart", action="store_true",
                     help="abandon the unfinished run and start a new one")
    status = sub.add_parser("status", help="the last runs and the current one's steps")
    status.add_argument("--last", type=int, default=10, metavar="N",
                        help="how many runs to list (default 10)")
    schedule = sub.add_parser("schedule", help="start runs on time and on alerts (loop)")
    schedule.add_argument("--once", action="store_true",
                          help="one look, then exit (for cron and tests)")
    for q in (run, status, schedule):
        q.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                       help="models folder (default HEADRACE_MODELS_DIR, else ./models)")
        q.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=handler)


def _settings(args: argparse.Namespace) -> PipelineSettings:

    from headrace.pipeline.settings import PipelineSettings

    settings = PipelineSettings.load()
    if args.models_dir is not None:
        settings = settings.model_copy(update={"models_dir": str(args.models_dir)})
    if problems := settings.check():
        raise UsageError("; ".join(problems))
    return settings


def handler(args: argparse.Namespace) -> int:
    """Dispatch ``headrace pipeline SUBCOMMAND``."""
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"run": _run, "status": _status,
            "schedule": _schedule}[args.pipeline_command](args, settings)


# ---------------------------------------------------------------------- building
def build_pipeline(settings: PipelineSettings, rollout: RolloutSettings) -> Pipeline:
    """The real steps: the definitions, the rollout's Redis keys, counts and runner."""
    from feature_defs.registry import registry_for
    from headrace.commands.rollout import _runner, _store, stats_source
    from headrace.pipeline.launch import load_policy
    from headrace.pipeline.steps import Pipeline

    policy = load_policy(rollout.rollout_policy_file, rollout.rollout_time_scale)
    stats_file = rollout.rollout_stats_file
    quiet = argparse.Namespace(json=False)
    return Pipeline(
        settings=settings, definitions=registry_for(settings),
        rollout_store=lambda: _store(rollout),
        stats_source=lambda rid: stats_source(rollout, rid, quiet, stats_file=stats_file),
        make_runner=lambda store, models, source, stored: _runner(
            quiet, rollout, store, models, source, stored, foreground=False),
        policy=policy, shadow_s=rollout.rollout_shadow_s if settings.pipeline_shadow else 0.0,
        stats_file=stats_file)


def build_runner(settings: PipelineSettings, pipeline: Pipeline, *,
                 metrics: PipelineMetrics | None = None, printer: Any = None
                 ) -> PipelineRunner:
    """The step runner with the settings' retries, back-off and test hook."""
    from headrace.core.retry import Backoff
    from headrace.pipeline.record import RunStore
    from headrace.pipeline.runner import PipelineRunner

    return PipelineRunner(
        RunStore(settings.models_dir), pipeline.steps(), retries=settings.pipeline_retries,
        backoff=Backoff(initial_s=settings.pipeline_retry_initial_s,
                        max_s=settings.pipeline_retry_max_s),
        metrics=metrics, on_step=printer, crash_after=settings.pipeline_crash_after or None)


def _rollout_settings() -> RolloutSettings:
    from headrace.rollout.settings import RolloutSettings

    rollout = RolloutSettings()
    if problems := rollout.check():
        raise UsageError("; ".join(problems))
    return rollout


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _step_line(step: StepRecord, run: RunRecord, *, with_error: bool = True) -> str:
    took = ("" if step.started_ms is None or step.finished_ms is None
            else f" in {(step.finished_ms - step.started_ms) / 1000:.1f} s")
    tries = f", {step.attempts} attempts" if step.attempts > 1 else ""
    out = step.outputs
    detail = next((f" ({k} {out[k]})" for k in ("version", "rollout_id", "rows", "promote")
                   if k in out), "")
    err = f": {step.error}" if step.error and with_error else ""
    return f"pipeline {run.run_id}: {step.name} {step.status.value}{took}{tries}{detail}{err}"


def _summary(run: RunRecord) -> dict[str, Any]:
    train, start = run.output("train"), run.output("start_rollout")
    return {"run_id": run.run_id, "status": run.status.value, "trigger": run.trigger,
            "created_ms": run.created_ms, "finished_ms": run.finished_ms,
            "problems": run.problems, "version": train.get("version"),
            "rollout_id": start.get("rollout_id"),
            "steps": [{"name": s.name, "status": s.status.value, "attempts": s.attempts,
                       "seconds": None if s.started_ms is None or s.finished_ms is None
                       else round((s.finished_ms - s.started_ms) / 1000, 3),
                       "error": s.error} for s in run.steps]}


# ---------------------------------------------------------------------- commands
def _run(args: argparse.Namespace, settings: PipelineSettings) -> int:
    from headrace.commands.rollout import _store
    from headrace.model.registry import ModelRegistry
    from headrace.pipeline.launch import running
    from headrace.pipeline.record import RunStatus, RunStore
    from headrace.pipeline.runner import ValidationFailed
    from headrace.pipeline.service import rollout_in_progress, run_once
    from headrace.pipeline.trigger import Trigger

    def show(step: StepRecord, run: RunRecord) -> None:  # the error follows on its own
        print(_step_line(step, run, with_error=False), file=sys.stderr, flush=True)

    rollout = _rollout_settings()
    runner = build_runner(settings, build_pipeline(settings, rollout), printer=show)
    store = RunStore(settings.models_dir)
    models = ModelRegistry(settings.models_dir)
    rollout_store = _store(rollout)

    def preflight() -> None:
        why = rollout_in_progress(models, lambda: running(rollout_store.load()))
        if why is not None:
            raise InputError(why)

    try:
        run = run_once(store, runner, Trigger("manual", "headrace pipeline run"),
                       restart=args.restart, preflight=preflight)
    except ValidationFailed as exc:
        if args.json:
            last = store.last()
            print(json.dumps(_summary(last) if last else {"problems": list(exc.problems)}))
        raise
    if args.json:
        print(json.dumps(_summary(run)))
    else:
        tail = {RunStatus.SUCCEEDED: "succeeded", RunStatus.REJECTED: "ended: the model "
                "was rejected by the offline gates (champion unchanged)"}.get(
            run.status, run.status.value)
        print(f"pipeline {run.run_id}: {tail}" + "".join(f"\n  - {p}" for p in run.problems),
              file=sys.stderr)
    return 0


def _status(args: argparse.Namespace, settings: PipelineSettings) -> int:
    from headrace.pipeline.record import RunStore

    runs = RunStore(settings.models_dir).runs()
    shown = runs[-max(args.last, 1):]
    current = next((r for r in reversed(runs) if not r.finished), None)
    if args.json:
        print(json.dumps({"runs": [_summary(r) for r in shown],
                          "current": None if current is None else current.to_dict()}))
        return 0
    if not runs:
        print(f"no pipeline runs in {Path(settings.models_dir) / 'pipeline'}")
        return 0
    for r in shown:
        version = r.output("train").get("version")
        print(f"{r.run_id}  {r.status.value:<9}  {r.trigger.get('kind', '?'):<11}  "
              f"started {_iso(r.created_ms)}  ended {_iso(r.finished_ms)}"
              + (f"  version {version}" if version else ""))
    focus = current or runs[-1]
    print(f"\nrun {focus.run_id} ({focus.status.value}):")
    for s in focus.steps:
        print("  " + _step_line(s, focus).split(": ", 1)[1])
    for p in focus.problems:
        print(f"  problem: {p}")
    return 0


def _schedule(args: argparse.Namespace, settings: PipelineSettings) -> int:
    from headrace.commands.rollout import _store
    from headrace.model.registry import ModelRegistry
    from headrace.pipeline.launch import running
    from headrace.pipeline.metrics import PipelineMetrics
    from headrace.pipeline.record import RunStore
    from headrace.pipeline.service import Scheduler
    from headrace.pipeline.trigger import AlertReader

    rollout = _rollout_settings()

    def show(step: StepRecord, run: RunRecord) -> None:
        log.info("%s", _step_line(step, run))

    metrics = PipelineMetrics()
    if settings.metrics_port_or_none is not None and not args.once:
        metrics.serve(settings.metrics_port_or_none)
    runner = build_runner(settings, build_pipeline(settings, rollout), metrics=metrics,
                          printer=show)
    store = _store(rollout)
    scheduler = Scheduler(
        RunStore(settings.models_dir), runner, ModelRegistry(settings.models_dir),
        AlertReader(store.client, settings.redis_prefix),
        rollout_running=lambda: running(store.load()), every_ms=settings.every_ms,
        cooldown_ms=settings.retry_after_ms, poll_s=settings.pipeline_poll_s)
    if args.once:
        look = scheduler.look()
        doc = {"action": look.action,
               "trigger": None if look.trigger is None else look.trigger.to_dict(),
               "run": None if look.run is None else _summary(look.run)}
        print(json.dumps(doc) if args.json else f"pipeline schedule: {look.action}"
              + (f" run {look.run.run_id} ({look.run.status.value})" if look.run else ""))
        return 0
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("pipeline schedule: looking every %g s (every %s, retry after %s)",
             settings.pipeline_poll_s, settings.pipeline_every, settings.pipeline_retry_after)
    scheduler.loop(stop)
    return 0
