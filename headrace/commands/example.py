"""``headrace example NAME``: end-to-end examples on public datasets, on a throwaway stack.

    headrace example talkingdata --csv talkingdata_train_sample_100k.csv [--rows N] [--json]

``talkingdata`` (:mod:`headrace.examples.talkingdata`) replays the TalkingData sample
through the stream worker, builds labels and a point-in-time training set, and compares
LightGBM on the windowed features (with and without the raw columns) against LightGBM on
the raw columns alone, on the last 24 hours — plus the windowed model calibrated, the
same inputs through the ``--candidates`` search (and calibrated), and the historical-CTR
lookup table. Progress goes to stderr; the summary to stdout (``--json``: one object).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "handler"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("example", help="end-to-end examples on public datasets",
                       description="Run an end-to-end example on a throwaway local stack "
                                   "(started in a temporary folder and stopped at the end).")
    examples = p.add_subparsers(dest="example", metavar="NAME")
    examples.required = True
    t = examples.add_parser(
        "talkingdata", help="windowed features vs raw columns on the TalkingData sample",
        description="Replay the TalkingData CSV, run the worker, build labels (1-day "
                    "attribution: label = is_attributed) and the point-in-time training "
                    "set, then compare LightGBM on windowed features (+ raw columns) with "
                    "LightGBM on the raw columns alone on the last 24 hours.")
    t.add_argument("--csv", required=True, type=Path, metavar="FILE",
                   help="TalkingData CSV (ip,app,device,os,channel,click_time,"
                        "attributed_time,is_attributed)")
    t.add_argument("--rows", type=int, default=None, metavar="N",
                   help="use only the first N data rows (default: the whole file)")
    t.add_argument("--candidates", type=int, default=50, metavar="N",
                   help="hyperparameter candidates of the searched windowed model, 1-200 "
                        "(default 50)")
    t.add_argument("--search-budget", default=None, metavar="DURATION",
                   help="wall-clock budget of that search, e.g. 5m (default: none)")
    t.add_argument("--seed", type=int, default=0, help="LightGBM seed (default 0)")
    t.add_argument("--threads", type=int, default=1, help="LightGBM threads (default 1)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run ``headrace example talkingdata``."""
    from headrace.core.errors import UsageError
    from headrace.examples.talkingdata import run_example

    if args.rows is not None and args.rows < 100:
        raise UsageError("--rows must be at least 100")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if not 1 <= args.candidates <= 200:
        raise UsageError(f"--candidates must be between 1 and 200, not {args.candidates}")
    budget_s = None
    if args.search_budget is not None:
        from headrace.core.timeparse import parse_duration

        budget_s = parse_duration(args.search_budget) / 1000.0
    summary: dict[str, Any] = run_example(args.csv, rows=args.rows, seed=args.seed,
                                          threads=args.threads,
                                          search_candidates=args.candidates,
                                          search_budget_s=budget_s)
    if args.json:
        print(json.dumps(summary))
        return 0
    for key, value in summary.items():
        if isinstance(value, float):
            value = round(value, 4)
        print(f"{key:28} {value}")
    return 0
