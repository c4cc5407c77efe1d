"""``headrace train``: train, gate and version a CTR model from a training set.

Reads a training-set Parquet file (local or ``s3://``, as written by the training-set
builder), trains the LightGBM model and the cold-start model (:mod:`offline.train`),
writes ``MODELS_DIR/<version>/`` and moves ``MODELS_DIR/CHAMPION`` to it only when every
gate passes (:mod:`offline.models`); ``--candidate`` registers a passing model as a
candidate for a rollout instead. The decision and its reasons are printed, stored in the
version's ``metadata.json`` and recorded in ``MODELS_DIR/HISTORY.jsonl``
(:mod:`headrace.model.registry`; a rejected model is ``failed``). A rejected model is a
normal outcome (exit 0; the ``--json`` summary says ``"promoted": false``); bad input
exits 2 with one sentence.

``--candidates N`` (1–200, default 50) sets the size of the hyperparameter search and
``--search-budget 10m`` a wall-clock budget after which no new candidate starts; a human
run prints one line per candidate on stderr (``--json`` prints only the summary).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.core.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from headrace.core.settings import OfflineSettings

__all__ = ["register", "handler"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train, gate and version a CTR model",
        description="Train a LightGBM CTR model (and the cold-start model) on a training set "
        "with a time-ordered validation split, write MODELS_DIR/<version>/ and promote it to "
        "champion when it passes the gates.",
    )
    p.add_argument("--training-set", required=True, metavar="TS.parquet",
                   help="training-set Parquet file (local path or s3://)")
    p.add_argument("--out", required=True, type=Path, metavar="MODELS_DIR",
                   help="models folder (versions and the CHAMPION pointer)")
    p.add_argument("--auc-floor", type=float, default=0.6,
                   help="minimum validation AUC to promote (default 0.6)")
    p.add_argument("--min-auc-gain", type=float, default=0.005,
                   help="AUC improvement over the champion needed to promote (default 0.005)")
    p.add_argument("--min-bin-positives", type=int, default=400,
                   help="positives a calibration bin needs to be checked (default 400)")
    p.add_argument("--candidate", action="store_true",
                   help="register a model that passes the gates as a candidate (for "
                        "headrace rollout) instead of promoting it to champion")
    p.add_argument("--candidates", type=int, default=50, metavar="N",
                   help="hyperparameter candidates to search, 1-200 (default 50; the first "
                        "8 are the old fixed grid)")
    p.add_argument("--search-budget", default=None, metavar="DURATION",
                   help="wall-clock budget of the search, e.g. 10m or 90s: no new candidate "
                        "starts once it is spent (default: none)")
    p.add_argument("--seed", type=int, default=0,
                   help="LightGBM seed and the search's draws (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="LightGBM threads (default 1; more can be slower on a busy machine)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.set_defaults(func=handler)


def handler(
    args: argparse.Namespace,
    *,
    settings: OfflineSettings | None = None,
    clock: Callable[[], datetime] | None = None,
) -> int:
    """Run ``headrace train``. ``settings`` and ``clock`` are injectable for tests.

    Raises:
        UsageError: an option is out of range.
        InputError: the training set is missing, unreadable or unusable; the models folder
            cannot be written.
    """
    if not 0.0 <= args.auc_floor <= 1.0:
        raise UsageError("--auc-floor must be between 0 and 1")
    if args.min_auc_gain < 0 or args.min_bin_positives < 1 or args.threads < 1 or args.seed < 0:
        raise UsageError("--min-auc-gain and --seed must be >= 0, --min-bin-positives and "
                         "--threads >= 1")
    if not 1 <= args.candidates <= 200:
        raise UsageError(f"--candidates must be between 1 and 200, not {args.candidates}")
    budget_s = None
    if args.search_budget is not None:
        from headrace.core.timeparse import parse_duration

        budget_s = parse_duration(args.search_budget) / 1000.0
    from feature_defs.registry import registry_for
    from offline.models import GatePolicy
    from offline.train import read_training_set, train

    if settings is None:
        from headrace.core.settings import OfflineSettings

        settings = OfflineSettings()
    registry = registry_for(settings, args.definitions)
    table = read_training_set(args.training_set, settings)
    policy = GatePolicy(auc_floor=args.auc_floor, min_auc_gain=args.min_auc_gain,
                        min_bin_positives=args.min_bin_positives)
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    if not args.json:
        kwargs["progress"] = _progress
    result = train(table, args.out, policy=policy, seed=args.seed, num_threads=args.threads,
                   registry=registry, source=args.training_set, candidate=args.candidate,
                   search_candidates=args.candidates, search_budget_s=budget_s, **kwargs)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    verdict = {"champion": "PROMOTED to champion",
               "candidate": "PASSED, registered as candidate (champion unchanged)"}.get(
        result.role.value, "REJECTED, recorded as failed (champion unchanged)")
    cold = f", cold-start AUC {result.coldstart.auc:.4f}" if result.coldstart else ""
    print(f"model {result.version}: validation AUC {result.metrics.auc:.4f}, log loss "
          f"{result.metrics.logloss:.4f}{cold} ({result.metadata['data']['rows']:,} rows, "
          f"{len(result.metadata['features'])} features, {result.seconds:.1f} s)",
          file=sys.stdout)
    search = result.metadata["search"]
    lookup = result.metadata["baselines"]["lookup_table"]
    cal = result.metadata["calibration_map"]
    print(f"search: {search['ran']} of {search['planned']} candidates ran (stopped: "
          f"{search['stopped']}); calibration: {cal['chosen']}; metrics on "
          f"{result.metrics.rows:,} evaluation rows", file=sys.stdout)
    if "auc" in lookup:
        print(f"lookup-table baseline: AUC {lookup['auc']:.4f}, log loss "
              f"{lookup['logloss']:.4f} ({lookup['cells']:,} cells)", file=sys.stdout)
    print(f"{verdict}:", file=sys.stdout)
    for reason in result.decision.reasons:
        print(f"  - {reason}", file=sys.stdout)
    if result.metadata["coldstart"]["error"]:
        print(f"cold-start model skipped: {result.metadata['coldstart']['error']}",
              file=sys.stdout)
    print(f"artifact: {result.path}", file=sys.stdout)
    return 0


def _progress(line: str) -> None:
    print(f"[train] {line}", file=sys.stderr, flush=True)
