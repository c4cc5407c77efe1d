"""Held-out evaluation on a time-ordered split: metrics, the split, fitting, raw baseline.

Everything here is plain numpy (no scikit-learn), so every number the gates use is
computed by code we can read and test against brute force:

* :func:`auc` — area under the ROC curve via the Mann-Whitney rank statistic; tied
  scores get their average rank, so a tie between a positive and a negative counts 1/2
  (the same value as the pairwise definition).
* :func:`log_loss` — mean binary cross-entropy, probabilities clipped to
  ``[1e-15, 1 - 1e-15]`` so a confident mistake costs ~34.5 nats, not infinity.
* :func:`calibration_table` — :data:`CALIBRATION_BINS` bins of (about) equal row counts
  by *predicted-probability deciles* (rows sorted by prediction, ties broken by row
  order). Deciles, not fixed-width bins: CTRs are small, so fixed-width bins over
  ``[0, 1]`` would put almost every row in the first bin and leave the rest empty.

:func:`time_split` is the only split used for training, search, early stopping, gates
and the raw baseline. Invariant: every training row is strictly earlier than every
validation row (rows sharing the cut-off timestamp all go to validation), so nothing
from the validation period leaks backwards in time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from headrace.core.errors import InputError
from headrace.model.booster import CategoryCodes, lightgbm
from headrace.monitor import stats

__all__ = [
    "CALIBRATION_BINS",
    "LOGLOSS_EPS",
    "CalibrationBin",
    "Metrics",
    "TimeSplit",
    "auc",
    "log_loss",
    "calibration_table",
    "evaluate",
    "time_split",
    "fit_booster",
    "baseline_raw",
    "RAW_PARAMS",
    "plot_calibration",
    "plot_importance",
]

CALIBRATION_BINS = 10
LOGLOSS_EPS = 1e-15
#: columns of ``csv_training_rows`` tables that are never raw features
_NOT_FEATURES = frozenset({"ts", "label", "impression_id", "event_id"})


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    return y, p


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of scores ``p`` for 0/1 labels ``y`` (ties count 1/2).

    Returns NaN when ``y`` holds only one class (AUC is undefined then).
    """
    y, p = _check(y, p)
    return stats.auc(p, y > 0.5)


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy in nats, ``p`` clipped to ``[eps, 1 - eps]``."""
    y, p = _check(y, p)
    if y.size == 0:
        return math.nan
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


@dataclass(frozen=True)
class CalibrationBin:
    """One predicted-probability decile: its rows, mean prediction and observed rate."""

    index: int
    count: int
    positives: int
    pred_min: float
    pred_max: float
    pred_mean: float
    actual_rate: float


def calibration_table(
    y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Predicted vs observed rate in ``bins`` equal-count bins of rows sorted by ``p``.

    Bin sizes differ by at most one row; rows with equal predictions may straddle a bin
    edge (ties are broken by row order, so the table is deterministic). With fewer rows
    than bins, empty bins are omitted.
    """
    y, p = _check(y, p)
    order = np.argsort(p, kind="stable")
    table = []
    for i, idx in enumerate(np.array_split(order, bins)):
        if idx.size == 0:
            continue
        pb, yb = p[idx], y[idx]
        table.append(CalibrationBin(
            index=i, count=int(idx.size), positives=int(yb.sum()),
            pred_min=float(pb.min()), pred_max=float(pb.max()),
            pred_mean=float(pb.mean()), actual_rate=float(yb.mean()),
        ))
    return table


@dataclass(frozen=True)
class Metrics:
    """Held-out metrics of one model on one set of rows."""

    rows: int
    positives: int
    base_rate: float
    auc: float
    logloss: float
    calibration: tuple[CalibrationBin, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = [asdict(b) for b in self.calibration]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        bins = tuple(CalibrationBin(**b) for b in d.get("calibration", ()))
        return cls(int(d["rows"]), int(d["positives"]), float(d["base_rate"]),
                   float(d["auc"]), float(d["logloss"]), bins)


def evaluate(y: np.ndarray, p: np.ndarray) -> Metrics:
    """AUC, log loss and the calibration table of predictions ``p`` for labels ``y``."""
    y, p = _check(y, p)
    return Metrics(
        rows=int(y.size), positives=int(y.sum()),
        base_rate=float(y.mean()) if y.size else math.nan,
        auc=auc(y, p), logloss=log_loss(y, p), calibration=tuple(calibration_table(y, p)),
    )


@dataclass(frozen=True)
class TimeSplit:
    """Row indices (each in time order) of the training and validation parts.

    ``cutoff_ms``: every training row has ``ts < cutoff_ms`` <= every validation ``ts``.
    """

    train: np.ndarray
    valid: np.ndarray
    cutoff_ms: int


def time_split(ts_ms: np.ndarray, valid_fraction: float = 0.2) -> TimeSplit:
    """Hold out the last ``valid_fraction`` of rows by event time (never a random split).

    The cut-off is the timestamp of the first held-out row in time order; all rows at
    that timestamp are held out too, so validation can be slightly larger than asked.

    Raises:
        InputError: the rows cannot be split (too few rows or distinct timestamps).
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError("valid_fraction must be in (0, 1)")
    ts = np.asarray(ts_ms, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    n_valid = max(1, int(round(ts.size * valid_fraction)))
    if ts.size < 2 or n_valid >= ts.size:
        raise InputError(f"cannot split {ts.size} row(s) in time; need at least 2")
    cutoff = int(ts[order[ts.size - n_valid]])
    is_valid = ts[order] >= cutoff
    train, valid = order[~is_valid], order[is_valid]
    if train.size == 0:
        raise InputError("cannot split the rows in time: the last "
                         f"{valid_fraction:.0%} share the first timestamp")
    return TimeSplit(train, valid, cutoff)


def fit_booster(
    x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
    params: Mapping[str, Any], *, feature_names: Sequence[str],
    categorical: Sequence[str] = (), num_boost_round: int = 1000,
    early_stopping_rounds: int = 50,
) -> Any:
    """Train a binary LightGBM booster, early-stopped on validation log loss.

    ``params`` are merged over binary/logloss defaults; ``num_threads``, ``seed`` and
    ``deterministic`` should be in them. Returns the booster; ``best_iteration`` is set.

    Raises:
        InputError: LightGBM refused the data.
    """
    lgb = lightgbm()
    full = {"objective": "binary", "metric": "binary_logloss", "verbosity": -1,
            "force_col_wise": True, **params}
    cats = list(categorical) or "auto"
    try:
        dtrain = lgb.Dataset(x_train, label=y_train, feature_name=list(feature_names),
                             categorical_feature=cats)
        dvalid = lgb.Dataset(x_valid, label=y_valid, reference=dtrain)
        booster = lgb.train(full, dtrain, num_boost_round=num_boost_round, valid_sets=[dvalid],
                            callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)])
    except lgb.basic.LightGBMError as exc:
        raise InputError(f"LightGBM could not train on these rows: {exc}") from exc
    return booster



RAW_PARAMS: Mapping[str, Any] = {"learning_rate": 0.05, "num_leaves": 31,
                                 "min_data_in_leaf": 50, "cat_smooth": 10.0}


def _ts_ms(table: pa.Table) -> np.ndarray:
    col = table.column("ts")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    return np.asarray(col.to_numpy(), dtype=np.int64)


def baseline_raw(train_rows: pa.Table, test_rows: pa.Table, *, seed: int = 0,
                 num_threads: int = 1, max_categories: int = 1000) -> dict[str, Any]:
    """A LightGBM on the raw CSV columns alone, as the bar the feature model must beat.

    Every column except ``ts``, ``label``, ``impression_id`` and ``event_id`` is a
    categorical (codes fitted on ``train_rows``; unseen → missing). Early stopping uses
    the last 20 % of ``train_rows`` by time (:func:`time_split`), so ``test_rows`` — the
    caller's held-out, later rows — are scored only once.

    Returns:
        ``auc_raw``, ``logloss_raw``, ``rows_train``, ``rows_test``, ``best_iteration``
        and ``features``.

    Raises:
        InputError: no raw columns, or the rows cannot be split or trained on.
    """
    features = [c for c in train_rows.column_names if c not in _NOT_FEATURES]
    if not features:
        raise InputError("the raw rows have no feature columns")
    codes = CategoryCodes.fit(train_rows, features, max_categories=max_categories)
    x, x_test = codes.matrix(train_rows), codes.matrix(test_rows.select(features))
    y = np.asarray(train_rows.column("label").to_numpy(), dtype=np.float64)
    y_test = np.asarray(test_rows.column("label").to_numpy(), dtype=np.float64)
    split = time_split(_ts_ms(train_rows))
    params = {**RAW_PARAMS, "seed": seed, "num_threads": num_threads, "deterministic": True}
    booster = fit_booster(x[split.train], y[split.train], x[split.valid], y[split.valid], params,
                          feature_names=features, categorical=features)
    p = booster.predict(x_test, num_iteration=booster.best_iteration)
    return {"auc_raw": auc(y_test, p), "logloss_raw": log_loss(y_test, p),
            "rows_train": int(y.size), "rows_test": int(y_test.size),
            "best_iteration": int(booster.best_iteration), "features": features}


def plot_calibration(bins: Sequence[CalibrationBin], policy: Any, path: Path) -> None:
    """The calibration plot (PNG at ``path``); ``policy``: an :class:`offline.models.GatePolicy`
    (its tolerance band and which bins are checked)."""
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


def plot_importance(importance: Mapping[str, float], path: Path) -> None:
    """Horizontal bars of total gain per feature (PNG at ``path``)."""
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
