"""``headrace simulate rollout --scenario NAME``: a progressive rollout in a closed loop
on the embedded local stack (:mod:`headrace.simulate.rollout`); ``headrace simulate
drift``: a distribution shift found by the monitor and a retrained challenger registered
by the pipeline (:mod:`headrace.simulate.drift`). Progress on stderr, one JSON object on
stdout."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "handler"]


def register(subparsers: Any) -> None:
    from headrace.simulate.rollout import SCENARIOS

    p = subparsers.add_parser(
        "simulate", help="closed-loop simulations on the embedded local stack",
        description="Simulations through the real Score RPC, Kafka, the stream worker and "
        "the rollout controller, on a throwaway local stack.")
    sub = p.add_subparsers(dest="simulate_command", metavar="SUBCOMMAND")
    sub.required = True
    r = sub.add_parser("rollout", help="a challenger's progressive rollout, one scenario")
    r.add_argument("--scenario", required=True, choices=sorted(SCENARIOS),
                   help="good: promoted; constant, miscalibrated, errors, slow: rolled back")
    r.add_argument("--phase-seconds", type=float, default=25.0, metavar="N",
                   help="each phase's minimum duration (its last look at 2N; default 25)")
    r.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    r.add_argument("--rate", type=float, default=200.0,
                   help="Score requests per second of the ad server (default 200)")
    r.add_argument("--json", action="store_true", help="one JSON object (the default "
                   "output; the flag is accepted for symmetry)")
    d = sub.add_parser("drift", help="a mid-run shift of one country's share and CTR: "
                       "the monitor's alert, the pipeline's retrained challenger")
    d.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    d.add_argument("--rate", type=float, default=150.0,
                   help="Score requests per second of the ad server (default 150)")
    d.add_argument("--baseline-seconds", type=float, default=40.0, metavar="N",
                   help="seconds of traffic before the shift; the champion's reference "
                        "profile is built from them (default 40)")
    d.add_argument("--json", action="store_true", help="one JSON object (the default "
                   "output; the flag is accepted for symmetry)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run ``headrace simulate rollout|drift``; exit 0 when the outcome is the expected
    one, 1 when not."""
    from headrace.core.errors import UsageError
    from headrace.core.jsonsafe import json_safe

    if not args.rate > 0:
        raise UsageError("--rate must be positive")
    if args.simulate_command == "drift":
        from headrace.simulate.drift import run_drift_simulation

        if not args.baseline_seconds >= 10:
            raise UsageError("--baseline-seconds must be at least 10")
        doc = run_drift_simulation(args.seed, rate=args.rate,
                                   baseline_s=args.baseline_seconds)
    else:
        from headrace.simulate.rollout import run_simulation

        if not args.phase_seconds > 0:
            raise UsageError("--phase-seconds must be positive")
        doc = run_simulation(args.scenario, args.phase_seconds, args.seed, rate=args.rate)
    print(json.dumps(json_safe(doc)), flush=True)
    return 0 if doc["as_expected"] else 1
