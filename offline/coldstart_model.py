"""The cold-start model: click probability from the request context alone.

Served when the scorer has no usable entity features (a new user, ad or publisher, or
the online store is down). Its inputs are only what every request carries:

* ``hour_of_day`` (0–23) and ``day_of_week`` (0 = Monday … 6 = Sunday), both UTC, from
  the request's ``ts`` (epoch milliseconds) — numeric, so trees can split on ranges;
* ``device_type``, ``placement``, ``creative_type``, ``country``, ``publisher_id`` —
  LightGBM categoricals through a stored :class:`~offline.evaluation.CategoryCodes`
  mapping (the 1,000 most frequent values seen at least 5 times in the training part;
  anything else, unseen values included, is missing).

It is trained in the same ``headrace train`` run, on the same time split, and saved as
``<version>/coldstart/model.txt`` + ``metadata.json`` beside the main model. It is not
gated on its own: it ships with the version the main model's gate promotes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from headrace.errors import InputError
from offline.evaluation import CategoryCodes, Metrics, TimeSplit, evaluate, fit_booster, lightgbm

__all__ = [
    "CONTEXT_CATEGORICAL",
    "CONTEXT_NUMERIC",
    "CONTEXT_FEATURES",
    "COLDSTART_PARAMS",
    "ColdStartModel",
    "context_time",
    "train_coldstart",
    "save_coldstart",
    "load_coldstart",
    "predict_context",
]

CONTEXT_NUMERIC = ("hour_of_day", "day_of_week")
CONTEXT_CATEGORICAL = ("device_type", "placement", "creative_type", "country", "publisher_id")
CONTEXT_FEATURES = CONTEXT_NUMERIC + CONTEXT_CATEGORICAL
COLDSTART_PARAMS: Mapping[str, Any] = {"learning_rate": 0.05, "num_leaves": 31,
                                       "min_data_in_leaf": 50, "cat_smooth": 10.0}
_MAX_CATEGORIES, _MIN_COUNT = 1000, 5
_HOUR_MS, _DAY_MS = 3_600_000, 86_400_000


def context_time(ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTC hour of day and day of week (Monday = 0) of epoch-millisecond times."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    # 1970-01-01 was a Thursday (weekday 3).
    return (ts // _HOUR_MS) % 24, (ts // _DAY_MS + 3) % 7


@dataclass(frozen=True)
class ColdStartModel:
    """A loaded or freshly trained cold-start booster with its category mapping."""

    booster: Any
    codes: CategoryCodes
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def _matrix(self, ts_ms: np.ndarray | None, columns: Mapping[str, Any], n: int) -> np.ndarray:
        if ts_ms is None:
            hour = dow = np.full(n, np.nan)
        else:
            hour, dow = (a.astype(np.float64) for a in context_time(ts_ms))
        cols = [hour, dow]
        for name in CONTEXT_CATEGORICAL:
            values = columns.get(name)
            cols.append(np.full(n, np.nan) if values is None else self.codes.encode(name, values))
        return np.column_stack(cols)

    def predict_table(self, table: pa.Table, ts_ms: np.ndarray) -> np.ndarray:
        """Probabilities for the rows of ``table`` (context columns; absent = missing)."""
        cols = {c: table.column(c) for c in CONTEXT_CATEGORICAL if c in table.column_names}
        x = self._matrix(ts_ms, cols, table.num_rows)
        return np.asarray(self.booster.predict(x), dtype=np.float64)

    def predict_context(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probabilities for request contexts.

        Args:
            rows: mappings with ``ts`` (epoch ms, int) and any of ``device_type``,
                ``placement``, ``creative_type``, ``country``, ``publisher_id``; a missing
                key or ``None`` is a missing value, an unseen category too.

        Returns:
            float64 array of click probabilities, one per row (empty for no rows).
        """
        n = len(rows)
        if n == 0:
            return np.empty(0, dtype=np.float64)
        ts = [r.get("ts") for r in rows]
        hour = dow = np.full(n, np.nan)
        known = np.array([t is not None for t in ts])
        if known.any():
            h, d = context_time(np.array([t if t is not None else 0 for t in ts], np.int64))
            hour, dow = np.where(known, h, np.nan), np.where(known, d, np.nan)
        cols = [hour, dow] + [self.codes.encode(c, [r.get(c) for r in rows])
                              for c in CONTEXT_CATEGORICAL]
        return np.asarray(self.booster.predict(np.column_stack(cols)), dtype=np.float64)


def predict_context(model: ColdStartModel, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Module-level form of :meth:`ColdStartModel.predict_context` (for the scorer)."""
    return model.predict_context(rows)


def train_coldstart(table: pa.Table, ts_ms: np.ndarray, y: np.ndarray, split: TimeSplit, *,
                    seed: int = 0, num_threads: int = 1) -> tuple[ColdStartModel, Metrics]:
    """Fit the cold-start model on ``split.train`` rows, early-stopped and evaluated on
    ``split.valid`` (the same split as the main model).

    Raises:
        InputError: a context column is missing, or LightGBM refused the data.
    """
    missing = [c for c in CONTEXT_CATEGORICAL if c not in table.column_names]
    if missing:
        raise InputError(f"the training set has no {', '.join(missing)} column(s), which the "
                         "cold-start model needs")
    train_rows = table.take(pa.array(split.train))
    codes = CategoryCodes.fit(train_rows, CONTEXT_CATEGORICAL, max_categories=_MAX_CATEGORIES,
                              min_count=_MIN_COUNT)
    draft = ColdStartModel(None, codes)
    cols = {c: table.column(c) for c in CONTEXT_CATEGORICAL}
    x = draft._matrix(ts_ms, cols, table.num_rows)
    params = {**COLDSTART_PARAMS, "seed": seed, "num_threads": num_threads,
              "deterministic": True}
    booster = fit_booster(x[split.train], y[split.train], x[split.valid], y[split.valid], params,
                          feature_names=list(CONTEXT_FEATURES),
                          categorical=list(CONTEXT_CATEGORICAL))
    p = booster.predict(x[split.valid], num_iteration=booster.best_iteration)
    metrics = evaluate(y[split.valid], p)
    metadata = {
        "features": list(CONTEXT_FEATURES),
        "categorical": list(CONTEXT_CATEGORICAL),
        "categories": codes.to_json(),
        "params": params,
        "best_iteration": int(booster.best_iteration),
        "metrics": metrics.to_dict(),
    }
    return ColdStartModel(booster, codes, metadata), metrics


def save_coldstart(model: ColdStartModel, directory: Path) -> None:
    """Write ``model.txt`` (best iteration only) and ``metadata.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.booster.save_model(str(directory / "model.txt"),
                             num_iteration=model.metadata.get("best_iteration") or None)
    (directory / "metadata.json").write_text(json.dumps(model.metadata, indent=2) + "\n",
                                             encoding="utf-8")


def load_coldstart(directory: Path) -> ColdStartModel:
    """Load a model saved by :func:`save_coldstart`.

    Raises:
        InputError: the files are missing or unreadable.
    """
    lgb = lightgbm()
    try:
        metadata = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
        booster = lgb.Booster(model_file=str(directory / "model.txt"))
        codes = CategoryCodes.from_json(metadata["categories"])
    except (OSError, ValueError, KeyError, lgb.basic.LightGBMError) as exc:
        raise InputError(f"cannot load the cold-start model in {directory}: {exc}") from exc
    return ColdStartModel(booster, codes, metadata)
