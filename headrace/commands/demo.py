"""``headrace demo``: the whole loop on a throwaway local stack (see :mod:`headrace.demo`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole platform end to end on a local stack",
        description="Start a local stack (Kafka-protocol broker, redis-server, S3), send "
                    "synthetic ad traffic through a stream worker, read online features, "
                    "measure freshness on live traffic, build priors, labels and a "
                    "point-in-time training set, train LightGBM, serve and score, then stop "
                    "the stack. Progress goes to stderr.")
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--events", type=int, default=120_000)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep-stack", metavar="DIR", default=None,
                   help="run the stack in DIR and leave it running afterwards")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from headrace.core.errors import UsageError
    from headrace.demo import DemoConfig, run_demo

    if args.events < 1000 or args.users < 10 or args.days < 2:
        raise UsageError("the demo needs --events >= 1000, --users >= 10 and --days >= 2")
    summary = run_demo(DemoConfig(users=args.users, events=args.events, days=args.days,
                                  seed=args.seed), keep_stack=args.keep_stack,
                         definitions=args.definitions)
    if args.json:
        print(json.dumps(summary))
    else:
        print("Headrace demo summary")
        for key, value in summary.items():
            print(f"  {key:24} {value}")
    return 0
