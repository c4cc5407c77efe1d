"""Training the CTR model from a training set, gating it and writing a versioned artifact.

The pipeline, each step a small function:

1. :func:`served_features` — the model's inputs are exactly the served feature names
   (registry order) that the training set has as columns; masks and label-row columns
   are never inputs. Nulls (ratios without impressions) become NaN, which LightGBM
   routes as missing — the same as a null served value.
2. :func:`~offline.evaluation.time_split` — the last 20 % of rows by ``ts`` validate.
3. :func:`search` — LightGBM (CPU, ``num_threads`` = 1 by default) over :data:`SEARCH_GRID` (8
   combinations of learning rate, leaves, min rows per leaf), each early-stopped on
   validation log loss; the lowest validation log loss wins (a proper scoring rule, so
   calibration counts, not only ranking). The winner is *kept*, not refitted on all rows:
   its stored metrics and calibration then describe exactly the shipped model. (The
   metrics are slightly optimistic: the same rows chose the iteration count and the
   combination.)
4. The cold-start model (:mod:`offline.coldstart_model`) on the same split.
5. Under the registry lock: compare with the champion (re-scored on the *same*
   validation rows when it can be, see :func:`champion_ref`), apply the gates
   (:func:`offline.models.decide`), write ``MODELS_DIR/<version>/`` and record it in
   the history (:mod:`headrace.model.registry`): ``failed`` when a gate fails, else
   ``champion`` — or ``candidate`` (for a rollout, or while another version is in one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_defs.registry import Registry
from headrace.core.errors import InputError
from headrace.core.jsonsafe import json_safe
from headrace.model.artifact import (
    ModelLoadError,
    champion_version,
    load_model,
    registry_lock,
    write_artifact,
)
from headrace.model.booster import lightgbm
from headrace.model.coldstart import ColdStartModel, save_coldstart
from headrace.model.registry import ModelRegistry, Role
from offline.coldstart_model import train_coldstart
from offline.evaluation import (
    CalibrationBin,
    Metrics,
    TimeSplit,
    evaluate,
    fit_booster,
    time_split,
)
from offline.models import DEFAULT_POLICY, ChampionRef, GateDecision, GatePolicy, decide
from offline.training_set import label_times

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = ["SEARCH_GRID", "BASE_PARAMS", "TrainResult", "served_features", "feature_matrix",
           "label_vector", "search", "champion_ref", "train", "read_training_set"]

SEARCH_GRID: tuple[Mapping[str, Any], ...] = tuple(
    {"learning_rate": lr, "num_leaves": leaves, "min_data_in_leaf": min_rows}
    for lr in (0.05, 0.1) for leaves in (15, 63) for min_rows in (20, 200)
)
BASE_PARAMS: Mapping[str, Any] = {"feature_fraction": 0.9, "lambda_l2": 1.0}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced; ``role``: the version's role in the registry."""

    version: str
    path: Path
    decision: GateDecision
    metrics: Metrics
    coldstart: Metrics | None
    metadata: Mapping[str, Any]
    seconds: float
    role: Role

    def summary(self) -> dict[str, Any]:
        """The ``--json`` output of ``headrace train``."""
        return {"version": self.version, "path": str(self.path),
                "promoted": self.role is Role.CHAMPION, "role": self.role.value,
                "reasons": list(self.decision.reasons), "auc": self.metrics.auc,
                "logloss": self.metrics.logloss,
                "coldstart_auc": self.coldstart.auc if self.coldstart else None,
                "features": len(self.metadata["features"]),
                "rows": self.metadata["data"]["rows"],
                "best_params": self.metadata["search"]["best"],
                "seconds": round(self.seconds, 3)}


def served_features(columns: Sequence[str], registry: Registry) -> list[str]:
    """Served feature names of ``registry`` present in ``columns``, in registry order.

    Raises:
        InputError: none is present.
    """
    names = registry.feature_names()
    found = [n for n in names if n in set(columns)]
    if not found:
        raise InputError(f"the training set has none of the {len(names)} served feature "
                         f"columns (e.g. {names[0]}); build it with headrace training-set")
    return found


def feature_matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """``(rows, features)`` float64 matrix; nulls → NaN.

    Raises:
        InputError: a column is missing or not numeric.
    """
    cols = []
    for name in features:
        if name not in table.column_names:
            raise InputError(f"the rows have no '{name}' column")
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_boolean(col.type) or pa.types.is_null(col.type)):
            raise InputError(f"feature column '{name}' has type {col.type}; expected a number")
        cols.append(np.asarray(col.cast(pa.float64()).to_numpy(), dtype=np.float64))
    return np.column_stack(cols) if cols else np.empty((table.num_rows, 0))


def label_vector(table: pa.Table) -> np.ndarray:
    """The ``label`` column as float64 0/1. Raises InputError on nulls or other values."""
    if "label" not in table.column_names:
        raise InputError("the training set has no 'label' column")
    col = table.column("label")
    if col.null_count:
        raise InputError(f"the label column has {col.null_count} null value(s)")
    try:
        y = np.asarray(col.cast(pa.float64()).to_numpy(), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"the label column has type {col.type}; expected 0/1") from exc
    if not np.isin(y, (0.0, 1.0)).all():
        raise InputError("the label column holds values other than 0 and 1")
    return y


def search(x: np.ndarray, y: np.ndarray, split: TimeSplit, features: Sequence[str], *,
           grid: Sequence[Mapping[str, Any]] = SEARCH_GRID, seed: int = 0,
           num_threads: int = 1) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Fit every combination of ``grid``; return (best booster, its params, all results)."""
    best: tuple[float, Any, dict[str, Any]] | None = None
    results = []
    for combo in grid:
        params = {**BASE_PARAMS, **combo, "seed": seed, "num_threads": num_threads,
                  "deterministic": True}
        started = time.monotonic()
        booster = fit_booster(x[split.train], y[split.train], x[split.valid], y[split.valid],
                              params, feature_names=features)
        p = booster.predict(x[split.valid], num_iteration=booster.best_iteration)
        m = evaluate(y[split.valid], p)
        results.append({**combo, "best_iteration": int(booster.best_iteration),
                        "valid_auc": m.auc, "valid_logloss": m.logloss,
                        "seconds": round(time.monotonic() - started, 3)})
        if best is None or m.logloss < best[0]:
            best = (m.logloss, booster, params)
    if best is None:
        raise ValueError("the search grid is empty")
    return best[1], best[2], results


def champion_ref(models_dir: Path, table: pa.Table, y: np.ndarray, split: TimeSplit
                 ) -> ChampionRef | None:
    """The champion's AUC, on the candidate's validation rows when that is fair.

    Re-scoring is used when the champion's features are all columns of ``table`` and its
    training rows all precede ``split.cutoff_ms`` (it never saw these validation rows);
    otherwise its stored validation AUC. An unreadable champion counts as below the floor
    (NaN AUC), so a good model can replace it.
    """
    version = champion_version(models_dir)
    if version is None:
        return None
    try:
        champ = load_model(models_dir, version)
    except ModelLoadError as exc:
        return ChampionRef(version, math.nan, f"unreadable: {exc}")
    train_max = champ.metadata.get("data", {}).get("train", {}).get("max_ts_ms")
    if (set(champ.features) <= set(table.column_names) and train_max is not None
            and train_max < split.cutoff_ms):
        rows = table.take(pa.array(split.valid))
        p = champ.predict(feature_matrix(rows, champ.features))
        return ChampionRef(version, evaluate(y[split.valid], p).auc, "same validation rows")
    stored = champ.metadata.get("metrics", {}).get("auc")
    return ChampionRef(version, math.nan if stored is None else float(stored), "stored metadata")


def _span(ts: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")

    lo, hi = int(ts.min()), int(ts.max())
    return {"rows": int(ts.size), "positives": int(y.sum()), "min_ts_ms": lo, "max_ts_ms": hi,
            "min_ts": iso(lo), "max_ts": iso(hi)}


def _plot_calibration(bins: Sequence[CalibrationBin], policy: GatePolicy, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pred = [b.pred_mean for b in bins]
    hi = max([*pred, *(b.actual_rate for b in bins), 1e-6]) * 1.1
    grid = np.linspace(0, hi, 50)
    ax.plot(grid, grid, color="grey", lw=1, label="perfect")
    tol = policy.calibration_tolerance
    ax.fill_between(grid, grid * (1 - tol), grid * (1 + tol), color="grey", alpha=0.15,
                    label=f"±{tol:.0%}")
    ax.plot(pred, [b.actual_rate for b in bins], "-", color="C0")
    checked = [b.count >= policy.min_bin_rows and b.positives >= policy.min_bin_positives
               for b in bins]
    for flag, label, face in ((True, "deciles (checked)", "C0"),
                              (False, "deciles (too few positives)", "white")):
        sel = [b for b, c in zip(bins, checked, strict=True) if c == flag]
        if sel:
            ax.plot([b.pred_mean for b in sel], [b.actual_rate for b in sel], "o", color="C0",
                    markerfacecolor=face, label=label)
    for b in bins:
        ax.annotate(f"{b.count}/{b.positives}", (b.pred_mean, b.actual_rate), fontsize=6,
                    xytext=(3, -8), textcoords="offset points")
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="mean predicted probability",
           ylabel="observed click rate", title="Calibration (validation; rows/positives)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_importance(importance: Mapping[str, float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(importance)[::-1]
    fig = Figure(figsize=(6, 0.3 * len(names) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(names, [importance[n] for n in names])
    ax.set(xlabel="total gain", title="Feature importance (gain)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(table: pa.Table, out_dir: Path | str, *, policy: GatePolicy = DEFAULT_POLICY,
          seed: int = 0, clock: Callable[[], datetime] = _utcnow,
          grid: Sequence[Mapping[str, Any]] = SEARCH_GRID, num_threads: int = 1,
          valid_fraction: float = 0.2, registry: Registry,
          source: str | None = None, candidate: bool = False) -> TrainResult:
    """Train, evaluate, gate and save a model from a training-set table.

    Args:
        table: training-set rows (``ts``, ``label``, served feature columns, context).
        out_dir: the models folder (created if needed).
        policy: gate thresholds. seed: LightGBM seed. clock: UTC time of the version name.
        grid: hyperparameter combinations. num_threads: LightGBM threads.
        valid_fraction: share of the latest rows held out. source: recorded in metadata.
        candidate: a model that passes the gates stays ``candidate`` (for a rollout).
        registry: the definitions served (the model's inputs are their feature names);
            the command passes ``registry_for(settings, --definitions)``.

    Returns:
        The version written (promoted or not) with its decision and metrics.

    Raises:
        InputError: bad columns or labels, a split without both classes, a folder that
            cannot be written.
    """
    started = time.monotonic()
    out = Path(out_dir)
    features = served_features(table.column_names, registry)
    y = label_vector(table)
    if "ts" not in table.column_names:
        raise InputError("the training set has no 'ts' column")
    ts = label_times(table.column("ts"))
    x = feature_matrix(table, features)
    split = time_split(ts, valid_fraction)
    for part, idx in (("training", split.train), (f"validation (last {valid_fraction:.0%} by "
                                                  "time)", split.valid)):
        pos = int(y[idx].sum())
        if pos == 0 or pos == idx.size:
            raise InputError(f"the {part} part has only {'negative' if pos == 0 else 'positive'}"
                             f" labels ({idx.size} rows); AUC and training need both")
    booster, params, results = search(x, y, split, features, grid=grid, seed=seed,
                                      num_threads=num_threads)
    metrics = evaluate(y[split.valid], booster.predict(x[split.valid],
                                                       num_iteration=booster.best_iteration))
    fit = evaluate(y[split.train], booster.predict(x[split.train],
                                                   num_iteration=booster.best_iteration))
    gains = booster.feature_importance(importance_type="gain", iteration=booster.best_iteration)
    importance = dict(sorted(zip(features, map(float, gains), strict=True),
                             key=lambda kv: -kv[1]))
    cold: ColdStartModel | None = None
    cold_metrics, cold_error = None, None
    try:
        cold, cold_metrics = train_coldstart(table, ts, y, split, seed=seed,
                                             num_threads=num_threads)
    except InputError as exc:
        cold_error = str(exc)
    train_seconds = time.monotonic() - started
    with registry_lock(out):
        decision = decide(metrics, champion_ref(out, table, y, split), policy)
        metadata: dict[str, Any] = {}

        def fill(folder: Path, version: str) -> None:
            metadata.update(json_safe({
                "version": version, "created_at": clock().astimezone(UTC).isoformat(),
                "model": "lightgbm-binary", "lightgbm_version": lightgbm().__version__,
                "features": features, "label": "label",
                "metrics": metrics.to_dict(), "train_metrics": {"auc": fit.auc,
                                                                "logloss": fit.logloss},
                "importance_gain": importance,
                "data": {"source": source, "rows": int(y.size), "valid_fraction": valid_fraction,
                         "cutoff_ms": split.cutoff_ms, "train": _span(ts[split.train],
                                                                      y[split.train]),
                         "valid": _span(ts[split.valid], y[split.valid])},
                "params": params, "best_iteration": int(booster.best_iteration),
                "search": {"selection": "lowest validation log loss", "best": params,
                           "results": results},
                "gate": decision.to_dict(),
                "coldstart": {"trained": cold is not None, "error": cold_error,
                              "metrics": cold_metrics.to_dict() if cold_metrics else None},
                "calibration_bins": "predicted-probability deciles (equal row counts)",
                "training_seconds": round(train_seconds, 3),
            }))
            booster.save_model(str(folder / "model.txt"), num_iteration=booster.best_iteration)
            (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n",
                                                  encoding="utf-8")
            _plot_calibration(metrics.calibration, policy, folder / "calibration.png")
            _plot_importance(importance, folder / "importance.png")
            if cold is not None:
                save_coldstart(cold, folder / "coldstart")

        version, path = write_artifact(out, clock(), fill)
        role = _record(ModelRegistry(out, clock=lambda: int(clock().timestamp() * 1000)),
                       version, decision, metrics, candidate)
    return TrainResult(version, path, decision, metrics, cold_metrics, metadata,
                       time.monotonic() - started, role)


def _record(models: ModelRegistry, version: str, decision: GateDecision, metrics: Metrics,
            candidate: bool) -> Role:
    """Record the gate decision in the history (actor ``train``); returns the role."""
    hold = "--candidate" if candidate else models.challenger() and "a rollout is running"
    if not decision.promote:
        role, why = Role.FAILED, "failed the offline gates"
    else:
        role = Role.CANDIDATE if hold else Role.CHAMPION
        why = f"passed the offline gates{f', not promoted ({hold})' if hold else ''}"
    gates = {**decision.to_dict(), "auc": metrics.auc, "logloss": metrics.logloss}
    models.transition(version, role, f"{why}: {'; '.join(decision.reasons)}", gates,
                      actor="train")
    return role


def read_training_set(uri: str, settings: CommonSettings | None = None) -> pa.Table:
    """Read a training-set Parquet file (local path or ``s3://``).

    Raises:
        InputError: missing, unreadable or empty.
    """
    from offline.store import resolve_uri

    fs, path = resolve_uri(uri, settings)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read the training set {uri}: {first}") from exc
    if table.num_rows == 0:
        raise InputError(f"the training set {uri} has no rows")
    return table
