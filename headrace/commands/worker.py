"""``headrace worker``: run a stream worker (Faust agents → Redis + Parquet)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a stream worker",
                       description="Consume the source topics and maintain online (Redis) and "
                                   "offline (Parquet) features. Settings come from HEADRACE_* "
                                   "variables (see `headrace stack up --json`).")
    p.add_argument("--until-idle", type=float, metavar="S", default=None,
                   help="exit once no new input arrived for S seconds (after flushing)")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.add_argument("--stats", default=None, metavar="FILE",
                   help="write a JSON run summary here at exit (benchmarks)")
    p.add_argument("--worker-id", default=None, help="replica id (state directory name)")
    p.add_argument("--rebuild-online", action="store_true",
                   help="rebuild the online state (view states and online progress) of the "
                        "assigned partitions from the log's first retained offset, keeping "
                        "the offline store (a worker also does this by itself when Redis "
                        "lost its data)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    from feature_defs.registry import registry_for
    from headrace.core.settings import WorkerSettings
    from streams.app import run_worker

    settings = WorkerSettings()
    if args.worker_id:
        settings = settings.model_copy(update={"worker_id": args.worker_id})
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = registry_for(settings, args.definitions)
    return run_worker(settings, registry, until_idle=args.until_idle,
                      stats_path=args.stats, rebuild_online=args.rebuild_online)
