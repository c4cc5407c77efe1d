"""``headrace models list|history``: the model registry and its history.

* ``list``: every version with its role, creation time, validation AUC and log loss and
  whether its offline gates passed (from ``metadata.json``). ``--json`` prints one
  object::

      {"models_dir": "models", "champion": "…", "challenger": null,
       "rollback_target": "…", "models": [{"version", "role", "created_at", "auc",
       "logloss", "gates_passed"}, …]}

* ``history``: the events of ``MODELS_DIR/HISTORY.jsonl`` (``--version V``: V's role
  changes and the splits naming it); ``--json`` prints ``{"models_dir", "version",
  "events": [history line objects]}``. ``--at TIME`` (epoch ms or ISO-8601 UTC) answers
  which versions served at that time, at which share: ``{"models_dir", "at_ms", "at",
  "serving": {version: share}}`` (with ``--version``, that version's share only, 0 when
  it did not serve).

The models folder is ``--models-dir``, else ``HEADRACE_MODELS_DIR`` (the server's). A
missing folder or an unknown version exits 2 with one sentence.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.core.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from headrace.model.registry import HistoryEvent, ModelRegistry

__all__ = ["register", "handler", "list_rows"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="model versions, their roles and history",
        description="List model versions with their roles, or print the append-only history "
        "of role changes and traffic splits (MODELS_DIR/HISTORY.jsonl).",
    )
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    ls = sub.add_parser("list", help="versions with role, metrics and offline gate result")
    hist = sub.add_parser("history", help="role changes and traffic splits, oldest first")
    hist.add_argument("--version", default=None, metavar="V", help="only this version")
    hist.add_argument("--at", default=None, metavar="TIME",
                      help="which versions served at TIME (epoch ms or ISO-8601 UTC), at "
                           "which share")
    for q in (ls, hist):
        q.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                       help="models folder (default HEADRACE_MODELS_DIR, else ./models)")
        q.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=handler)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds"
                                                            ).replace("+00:00", "Z")


def _open(args: argparse.Namespace, clock: Callable[[], int] | None) -> ModelRegistry:
    from headrace.model.registry import ModelRegistry

    folder = args.models_dir
    if folder is None:
        from headrace.core.settings import ServeSettings

        folder = Path(ServeSettings().models_dir)
    if not folder.is_dir():
        raise InputError(f"the models folder {folder} does not exist; train a model with "
                         f"headrace train --out {folder} or pass --models-dir")
    return ModelRegistry(folder) if clock is None else ModelRegistry(folder, clock=clock)


def list_rows(models: ModelRegistry) -> list[dict[str, Any]]:
    """One row per version (oldest first) for ``headrace models list``."""
    rows = []
    for version, role in models.roles().items():
        meta = models.metadata(version)
        found = meta.get("metrics")
        metrics: dict[str, Any] = found if isinstance(found, dict) else {}
        rows.append({"version": version, "role": role.value,
                     "created_at": meta.get("created_at"), "auc": metrics.get("auc"),
                     "logloss": metrics.get("logloss"),
                     "gates_passed": models.gate_passed(version)})
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_list(models: ModelRegistry, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"no models in {models.models_dir}")
        return
    print(f"{'VERSION':<18} {'ROLE':<10} {'CREATED':<25} {'AUC':>7} {'LOGLOSS':>8}  GATES")
    for r in rows:
        gates = {True: "passed", False: "failed", None: "-"}[r["gates_passed"]]
        print(f"{r['version']:<18} {r['role']:<10} {r['created_at'] or '-':<25} "
              f"{_fmt(r['auc']):>7} {_fmt(r['logloss']):>8}  {gates}")


def _print_event(e: HistoryEvent) -> None:
    from headrace.model.registry import RoleEvent

    where = "".join(f" {k}={v}" for k, v in (("rollout", e.rollout_id), ("phase", e.phase))
                    if v is not None)
    if isinstance(e, RoleEvent):
        change = f"{e.version} {e.previous.value if e.previous else 'new'} -> {e.role.value}"
    else:
        change = "split " + ", ".join(f"{v}={s:.1%}" for v, s in e.shares.items())
    print(f"{e.seq:>5} {_iso(e.at_ms)} {e.actor:<9} {change}{where}: {e.reason}")


def handler(args: argparse.Namespace, *, clock: Callable[[], int] | None = None) -> int:
    """Run ``headrace models list|history``. ``clock`` (epoch ms) is injectable for tests.

    Raises:
        InputError: the models folder is missing, ``--version`` is unknown or ``--at``
            cannot be read as a time.
    """
    models = _open(args, clock)
    if args.models_command == "list":
        rows = list_rows(models)
        if args.json:
            print(json.dumps({"models_dir": str(models.models_dir),
                              "champion": models.champion(),
                              "challenger": models.challenger(),
                              "rollback_target": models.rollback_target(), "models": rows}))
        else:
            _print_list(models, rows)
        return 0
    events = models.history(args.version)  # raises for an unknown version
    if args.at is not None:
        from headrace.core.timeparse import parse_time

        at_ms = parse_time(args.at)
        serving = models.serving_at(at_ms)
        if args.version is not None:
            serving = {args.version: serving.get(args.version, 0.0)}
        if args.json:
            print(json.dumps({"models_dir": str(models.models_dir), "at_ms": at_ms,
                              "at": _iso(at_ms), "serving": serving}))
        else:
            shares = ", ".join(f"{v} {s:.1%}" for v, s in serving.items()) or "no model"
            print(f"at {_iso(at_ms)}: {shares}")
        return 0
    if args.json:
        print(json.dumps({"models_dir": str(models.models_dir), "version": args.version,
                          "events": [e.to_dict() for e in events]}))
    elif not events:
        print(f"no history in {models.models_dir}")
    else:
        for e in events:
            _print_event(e)
    return 0
