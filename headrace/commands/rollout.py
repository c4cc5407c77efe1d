"""``headrace rollout start|run|status|abort``: the progressive rollout of a challenger.

* ``start --challenger V``: checks that V is a known version that never failed, that a
  champion exists and that no other rollout runs (each refusal: exit 2, one sentence,
  nothing changed), then makes V the registry's challenger, writes the controller state
  and the phase-1 split (phase 0 with ``--shadow``) and runs the controller in the
  foreground until V is promoted or rolled back (exit 0 either way; ``--json`` prints
  one JSON line per decision, ``{"event": "started"|"advance"|"hold"|"promoted"|
  "rolled_back"|"finished", …}``).
* ``run``: resume the running rollout's controller (after a crash or a restart): the
  same phase, its start time and its baseline; a half-done decision is completed, never
  taken twice.
* ``status``: the controller state, who holds its lock, the split and each live
  server's acknowledgement.
* ``abort [--reason TEXT]``: a running controller rolls back within a tick (guardrail
  ``aborted``); with none running, this command rolls back itself.

The counts come from :func:`stats_source`: ``--stats-file`` (:class:`~headrace.rollout.
source.JsonFileStatsSource`) when given, else the servers' per-arm counts in Redis
(:class:`~headrace.rollout.serving_counts.ServingStatsSource`) merged with the
stream-computed per-arm views when the definitions run them (:func:`_stream_source`).
Settings: :class:`~headrace.rollout.settings.RolloutSettings` (``HEADRACE_*``).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.core.errors import InputError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from headrace.model.registry import ModelRegistry
    from headrace.rollout.controller import RolloutState
    from headrace.rollout.gates import ArmStats
    from headrace.rollout.ope_gate import OpeEstimate
    from headrace.rollout.runner import Runner
    from headrace.rollout.settings import RolloutSettings
    from headrace.rollout.source import StatsSource
    from headrace.rollout.store import RolloutStore, Stored

__all__ = ["register", "handler", "stats_source"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rollout", help="progressive rollout of a challenger model (five phases, guardrails)",
        description="Roll a challenger out through five phases (3, 10, 20, 40, 50 %% of "
        "traffic) with continuous guardrails and phase-end gates; roll back automatically "
        "on a breach. Settings: HEADRACE_REDIS_URL, HEADRACE_REDIS_PREFIX, "
        "HEADRACE_MODELS_DIR, HEADRACE_ROLLOUT_* (headrace/rollout/settings.py).")
    sub = p.add_subparsers(dest="rollout_command", metavar="SUBCOMMAND")
    sub.required = True
    start = sub.add_parser("start", help="start a rollout and run its controller")
    start.add_argument("--challenger", required=True, metavar="V", help="the model version")
    start.add_argument("--shadow", action="store_true",
                       help="begin with a shadow phase (share 0, the challenger scores off "
                            "the response path) of HEADRACE_ROLLOUT_SHADOW_S (24 h)")
    start.add_argument("--shadow-seconds", type=float, default=None, metavar="S",
                       help="the shadow phase's production length (implies --shadow)")
    start.add_argument("--time-scale", type=float, default=None, metavar="X",
                       help="multiply every duration (default HEADRACE_ROLLOUT_TIME_SCALE, 1)")
    start.add_argument("--policy", default=None, metavar="POLICY.json",
                       help="thresholds and durations (Policy.to_dict shape; default: the "
                            "built-in policy)")
    start.add_argument("--rollout-id", default=None, metavar="ID",
                       help="the rollout's id (default r-<random>)")
    run = sub.add_parser("run", help="resume the running rollout's controller")
    for q in (start, run):
        q.add_argument("--stats-file", default=None, metavar="PATH",
                       help="per-arm cumulative counts, JSON (default "
                            "HEADRACE_ROLLOUT_STATS_FILE; run: the one it started with; "
                            "none: the servers' per-arm counts in Redis)")
    status = sub.add_parser("status", help="the rollout, its lock, the split and the acks")
    abort = sub.add_parser("abort", help="roll the running rollout back now")
    abort.add_argument("--reason", default="aborted by an operator", help="why (recorded)")
    abort.add_argument("--wait-s", type=float, default=10.0,
                       help="how long to wait for a running controller to act (default 10)")
    for q in (start, run, status, abort):
        q.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                       help="models folder (default HEADRACE_MODELS_DIR, else ./models)")
        q.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Dispatch ``headrace rollout SUBCOMMAND``."""
    from headrace.rollout.settings import RolloutSettings

    settings = RolloutSettings()
    if problems := settings.check():
        raise UsageError("; ".join(problems))
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"start": _start, "run": _run, "status": _status,
            "abort": _abort}[args.rollout_command](args, settings)


# ---------------------------------------------------------------------- helpers
def _store(settings: RolloutSettings) -> RolloutStore:
    from headrace.rollout.store import RolloutStore

    timeout = settings.redis_timeout_ms / 1000
    client = settings.redis_config().client(socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
    return RolloutStore(client, settings.redis_prefix)


def _registry(args: argparse.Namespace, settings: RolloutSettings) -> ModelRegistry:
    from headrace.model.registry import ModelRegistry

    folder = Path(args.models_dir or settings.models_dir)
    if not folder.is_dir():
        raise InputError(f"the models folder {folder} does not exist; pass --models-dir or "
                         "set HEADRACE_MODELS_DIR")
    return ModelRegistry(folder)


def _stream_source(settings: RolloutSettings, rollout_id: str) -> StatsSource | None:
    """The stream-computed per-arm counts (impressions, clicks, Σ pCTR, pCTR buckets,
    segments: :class:`serving.arm_stats.ViewStatsSource`), or None when the deployment's
    definitions (``HEADRACE_DEFINITIONS``) do not run the evaluation views
    (``feature_defs.evaluation``): then only the servers' counts are judged, and the
    gates that need impressions and clicks hold the rollout in phase 1."""
    from feature_defs.evaluation import EVALUATION_VIEWS
    from feature_defs.registry import load_registry
    from headrace.core.online_store import RedisOnlineStore
    from serving.arm_stats import ViewStatsSource
    from serving.reader import OnlineReader

    registry = load_registry(settings.definitions)
    if any(v.id not in registry.plans for v in EVALUATION_VIEWS):
        log.warning("the definitions %s do not run the evaluation views "
                    "(feature_defs.evaluation): impressions, clicks and calibration are "
                    "not counted, so the rollout cannot pass phase 1", settings.definitions)
        return None
    # no retries here: a failed read is StatsUnavailable, and the controller skips the tick
    store = RedisOnlineStore(settings.redis_config(), timeout_ms=settings.redis_timeout_ms)
    return ViewStatsSource(registry, OnlineReader(store, settings.redis_prefix),
                           segments=settings.rollout_segments)


#: seconds ``rollout start`` retries the first read of the counts (the baseline)
FIRST_READ_S = 30.0


def _first_read(source: StatsSource, champion: str, challenger: str
                ) -> tuple[ArmStats, ArmStats]:
    """The counts at the start (:func:`headrace.pipeline.launch.first_read`, for
    :data:`FIRST_READ_S` seconds)."""
    from headrace.pipeline.launch import first_read

    return first_read(source, champion, challenger, within_s=FIRST_READ_S)


def stats_source(settings: RolloutSettings, rollout_id: str, args: argparse.Namespace,
                 *, stats_file: str | None = None) -> StatsSource:
    """Where the controller of ``rollout_id`` reads each arm's counts.

    ``stats_file`` (the caller resolves ``--stats-file``, the stored rollout's file and
    ``HEADRACE_ROLLOUT_STATS_FILE``) when given; else
    :class:`~headrace.rollout.source.MergedStatsSource` of the servers' counts in Redis
    (:class:`~headrace.rollout.serving_counts.ServingStatsSource`: requests, errors,
    latency, pCTR range, publisher errors) and the stream source
    (:func:`_stream_source`), when there is one.

    Raises:
        InputError: ``stats_file`` names no file.
    """
    from headrace.rollout.serving_counts import ServingStatsSource
    from headrace.rollout.source import JsonFileStatsSource, MergedStatsSource

    if stats_file:
        if not Path(stats_file).is_file():
            raise InputError(f"the stats file {stats_file} does not exist")
        return JsonFileStatsSource(stats_file)
    serving = ServingStatsSource(_store(settings).client, settings.redis_prefix, rollout_id)
    stream = _stream_source(settings, rollout_id)
    return serving if stream is None else MergedStatsSource(serving, stream)


def _printer(as_json: bool) -> Any:
    from headrace.core.jsonsafe import json_safe

    def show(event: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(json_safe(event), separators=(",", ":")), flush=True)
            return
        kind = event.get("event")
        decision = event.get("decision") or {}
        detail = decision.get("message") or (event.get("breach") or {}).get("message") or ""
        where = f"phase {event.get('phase')}"
        if "share" in event:
            where += f" ({100 * float(event['share']):g} %)"
        secs = event.get("rollback_seconds")
        tail = f"; 100 % champion everywhere after {secs:.2f} s" if secs is not None else ""
        print(f"rollout {event.get('rollout_id')}: {kind} at {where}"
              + (f": {detail}" if detail else "") + tail, flush=True)

    return show


def _runner(args: argparse.Namespace, settings: RolloutSettings, store: RolloutStore,
            registry: ModelRegistry, source: StatsSource, stored: Stored, *,
            foreground: bool = True) -> Runner:
    """The controller runner; ``foreground`` False (the pipeline's start, which only
    commits the first state): no metrics endpoint and no printed events."""
    from headrace.rollout.alerts import RolloutMetrics, WebhookAlerter
    from headrace.rollout.runner import Runner

    metrics = RolloutMetrics()
    if settings.metrics_port_or_none is not None and foreground:
        metrics.serve(settings.metrics_port_or_none)
    return Runner(store, registry, source, stored, tick_ms=settings.rollout_tick_ms,
                  lock_ttl_ms=settings.rollout_lock_ttl_ms,
                  ack_timeout_ms=int(settings.rollout_ack_timeout_s * 1000),
                  ack_poll_ms=settings.rollout_ack_poll_ms,
                  alerter=WebhookAlerter(settings.webhook_url), metrics=metrics,
                  on_event=_printer(getattr(args, "json", False)) if foreground else None,
                  ope=ope_evaluator(settings, stored.policy.ope_attribution_ms))


def ope_evaluator(settings: RolloutSettings, attribution_ms: int
                  ) -> Callable[[RolloutState], OpeEstimate]:
    """The off-policy gate's evaluator (:mod:`headrace.rollout.ope_gate`): the doubly
    robust estimate of the challenger's greedy policy on the served decisions of the
    shadow phase, ``[phase start, now)``, from the prediction log and the clicks
    (:func:`headrace.commands.evaluate_policy.evaluate_range`). Clicks are read up to
    now: the last decisions' clicks may not have come yet, which lowers the estimate
    and the logged CTR alike (both are computed from the same decisions and clicks)."""
    from headrace.rollout.ope_gate import OpeEstimate

    def evaluate(state: RolloutState) -> OpeEstimate:
        from headrace.commands.evaluate_policy import evaluate_range

        now = time.time_ns() // 1_000_000
        ns = argparse.Namespace(log=f"{state.phase_started_ms}..{now}",
                                model=state.challenger, policy="greedy",
                                attribution=str(attribution_ms), grace="0", timeout=30.0,
                                min_ess=None, min_support=None, clip=None)
        try:
            rep = evaluate_range(ns, settings)
        except InputError as exc:
            return OpeEstimate(problem=str(exc))
        dr = rep["dr"]
        return OpeEstimate(dr["value"], dr["ci_low"], dr["ci_high"], rep["logged_ctr"],
                           rep["decisions"], rep["ess"])

    return evaluate


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _drive(runner: Runner, args: argparse.Namespace) -> int:
    """Run the controller in the foreground (lock held), release the lock at the end."""
    signal.signal(signal.SIGTERM, _interrupt)  # state is persisted: `rollout run` resumes
    try:
        final = runner.run()
    finally:
        runner.release()
    _printer(args.json)({"event": "finished", "rollout_id": final.rollout_id,
                         "status": final.status.value, "phase": final.phase,
                         "breach": final.breach, "rollback_seconds": final.rollback_seconds,
                         "problems": list(final.problems)})
    return 0


def _running(stored: Stored | None) -> bool:
    from headrace.pipeline.launch import running

    return running(stored)


# ---------------------------------------------------------------------- commands
def _start(args: argparse.Namespace, settings: RolloutSettings) -> int:
    from headrace.pipeline.launch import load_policy, start_rollout

    version = args.challenger
    time_scale = args.time_scale if args.time_scale is not None else settings.rollout_time_scale
    policy = load_policy(args.policy or settings.rollout_policy_file, time_scale)
    stats_file = args.stats_file or settings.rollout_stats_file
    rid = args.rollout_id or f"r-{secrets.token_hex(4)}"
    source = stats_source(settings, rid, args, stats_file=stats_file)
    registry = _registry(args, settings)
    store = _store(settings)
    shadow_s = args.shadow_seconds if args.shadow_seconds is not None else (
        settings.rollout_shadow_s if args.shadow else 0.0)
    if policy.ope_max_drop is not None and not shadow_s > 0:
        raise InputError("the policy's off-policy gate (ope_max_drop) judges the "
                         "challenger's shadow predictions: start with --shadow")
    runner, _ = start_rollout(
        store, registry, source,
        lambda stored: _runner(args, settings, store, registry, source, stored),
        version=version, rollout_id=rid, policy=policy, shadow_s=shadow_s,
        stats_file=stats_file, within_s=FIRST_READ_S)
    return _drive(runner, args)


def _run(args: argparse.Namespace, settings: RolloutSettings) -> int:
    store = _store(settings)
    stored = store.load()
    if not _running(stored):
        raise InputError(f"no rollout is running under the redis prefix "
                         f"{settings.redis_prefix}; start one with headrace rollout start")
    assert stored is not None
    stats_file = args.stats_file or stored.stats_file or settings.rollout_stats_file
    source = stats_source(settings, stored.state.rollout_id, args, stats_file=stats_file)
    runner = _runner(args, settings, store, _registry(args, settings), source,
                     replace(stored, stats_file=stats_file))
    runner.acquire()
    return _drive(runner, args)


def _status(args: argparse.Namespace, settings: RolloutSettings) -> int:
    from headrace.core.jsonsafe import json_safe
    from headrace.rollout.split import read_split

    store = _store(settings)
    stored = store.load()
    held = store.holder()
    split = read_split(store.client, store.prefix)
    acks = store.acks()
    doc = {"rollout": None if stored is None else stored.state.to_dict(),
           "controller": None if held is None else {"holder": held[0],
                                                    "expires_in_ms": held[1]},
           "split": None if split is None else json.loads(split.to_json()),
           "servers": {k: json.loads(a.to_json()) for k, a in sorted(acks.items())}}
    if stored is not None:
        for key in ("baseline_champion", "baseline_challenger"):
            doc["rollout"].pop(key, None)  # type: ignore[union-attr]
    if args.json:
        print(json.dumps(json_safe(doc)))
        return 0
    if stored is None:
        print(f"no rollout under the redis prefix {settings.redis_prefix}")
        return 0
    s = stored.state
    print(f"rollout {s.rollout_id}: {s.challenger} vs champion {s.champion}, {s.status.value}, "
          f"phase {s.phase}" + (f", breach {s.breach['name']}" if s.breach else "")
          + (f", rollback {s.rollback_seconds:.2f} s" if s.rollback_seconds is not None else ""))
    print("controller: " + (f"{held[0]} (lock for {held[1] / 1000:.1f} s)" if held else "none"))
    if split is not None:
        print(f"split seq {split.seq}: {split.challenger or 'no challenger'} at "
              f"{100 * split.share:g} %" + (" (shadow)" if split.shadow else ""))
    for name, ack in sorted(acks.items()):
        print(f"server {name}: seq {ack.seq}, challenger {ack.challenger or '-'} at "
              f"{100 * ack.share:g} %")
    return 0


def _abort(args: argparse.Namespace, settings: RolloutSettings) -> int:
    from headrace.rollout.source import MemoryStatsSource

    store = _store(settings)
    stored = store.load()
    if not _running(stored):
        raise InputError(f"no rollout is running under the redis prefix "
                         f"{settings.redis_prefix}; nothing to abort")
    assert stored is not None
    rid = stored.state.rollout_id
    store.request_abort(rid, args.reason, time.time_ns() // 1_000_000)
    deadline = time.monotonic() + args.wait_s
    while (held := store.holder()) is not None:  # a running controller acts at its tick
        now = store.load()
        if now is not None and not _running(now):
            _printer(args.json)({"event": "aborted", "rollout_id": rid, "by": held[0],
                                 "status": now.state.status.value, "phase": now.state.phase,
                                 "rollback_seconds": now.state.rollback_seconds})
            return 0
        if time.monotonic() >= deadline:
            print(f"headrace rollout abort: requested; the controller {held[0]} has not "
                  f"finished the rollback within {args.wait_s:g} s (see headrace rollout "
                  "status)", file=sys.stderr)
            return 1
        time.sleep(0.05)
    stored = store.load() or stored  # no controller (or its lock expired): roll back here
    runner = _runner(args, settings, store, _registry(args, settings), MemoryStatsSource(),
                     stored)
    runner.acquire()
    try:
        final = runner.tick()
        for _ in range(3):  # a half-done decision is completed first, then the abort
            if not _running(runner.stored):
                break
            final = runner.tick()
    finally:
        runner.release()
    _printer(args.json)({"event": "aborted", "rollout_id": rid, "by": "this command",
                         "status": final.status.value, "phase": final.phase,
                         "rollback_seconds": final.rollback_seconds})
    return 0
