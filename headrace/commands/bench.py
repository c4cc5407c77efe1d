"""``headrace bench NAME [--json]``: benchmarks with a same-run reference.

Each benchmark prints its figures and a reference measured in the same run on the same
machine (machines are shared and noisy: ratios hold, absolute times drift).
"""

from __future__ import annotations

import argparse
import importlib
import json

__all__ = ["register", "BENCHMARKS"]

#: name → (module, one-line description)
BENCHMARKS = {
    "stream": ("bench.stream", "worker events/s vs a plain consumer; freshness at 5k events/s"),
    "training-set": ("bench.training_set", "point-in-time join vs DuckDB ASOF JOIN"),
    "lookup": ("bench.lookup", "gRPC feature lookup p50/p99 vs echo and raw Redis floors"),
    "score": ("bench.score", "Score RPC p99 for 100 candidates vs LightGBM predict alone"),
    "memory": ("bench.memory", "worker RSS and events/s over 2M+ distinct users (bounded "
                               "state cache) vs the unbounded cache on a smaller stream"),
    "rollout": ("bench.rollout", "rollout decision engine over simulated schedules: promote "
                                 "and false-rollback rates at +5 %, -2 % and equal CTR"),
    "ivt": ("bench.ivt", "TalkingData: events flagged per invalid-traffic rule, and the "
                         "model's test-day AUC/log loss trained with vs without the filter"),
    "ope": ("bench.ope", "off-policy estimators (IPS, SNIPS, DR) on a synthetic bandit with a "
                         "known policy value: CI coverage and RMSE over seeds"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark",
                       description="Run a benchmark; each reports a reference measured in the "
                                   "same run. Benchmarks: " + "; ".join(
                                       f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="override a benchmark parameter (e.g. --set events=100000)")
    p.set_defaults(func=_run)


def _params(pairs: list[str]) -> dict[str, object]:
    from headrace.core.errors import UsageError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects PARAM=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _find_benchmarks() -> None:
    """Make ``bench`` importable, here and in the benchmarks' child processes.

    The benchmarks live in the source tree, not in the wheel: an editable install finds
    them beside the ``headrace`` package (the checkout's root); otherwise the current
    directory is tried. Nothing in the product imports them.
    """
    import os
    import sys
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bench" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            path = os.environ.get("PYTHONPATH", "")
            if str(root) not in path.split(os.pathsep):
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), path) if p)
            return


def _run(args: argparse.Namespace) -> int:
    from headrace.core.errors import MissingDependencyError, UsageError

    module_name, _ = BENCHMARKS[args.name]
    _find_benchmarks()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, "bench"):
            raise MissingDependencyError(
                f"benchmark {args.name} needs a source checkout: the benchmarks (bench/) are "
                "not part of the installed package; run it from a clone of the repository"
            ) from exc
        raise
    try:
        result = module.run(**_params(args.set))
    except TypeError as exc:
        raise UsageError(f"bad --set parameter for {args.name}: {exc}") from exc
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 0
