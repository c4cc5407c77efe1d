"""The cold-start model as served: click probability from the request context alone.

Served when the scorer has no usable entity features (a new user, ad or publisher, or
the online store is down). Its inputs are only what every request carries:

* ``hour_of_day`` (0–23) and ``day_of_week`` (0 = Monday … 6 = Sunday), both UTC, from
  the request's ``ts`` (epoch milliseconds) — numeric, so trees can split on ranges;
* ``device_type``, ``placement``, ``creative_type``, ``country``, ``publisher_id`` —
  LightGBM categoricals through a stored :class:`~headrace.model.booster.CategoryCodes`
  mapping (anything unseen is missing).

Saved as ``<version>/coldstart/model.txt`` + ``metadata.json`` beside the main model;
trained by :func:`offline.coldstart_model.train_coldstart`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from headrace.core.errors import InputError
from headrace.model.booster import CategoryCodes, lightgbm

__all__ = [
    "CONTEXT_CATEGORICAL",
    "CONTEXT_NUMERIC",
    "CONTEXT_FEATURES",
    "ColdStartModel",
    "context_time",
    "save_coldstart",
    "load_coldstart",
    "predict_context",
]

CONTEXT_NUMERIC = ("hour_of_day", "day_of_week")
CONTEXT_CATEGORICAL = ("device_type", "placement", "creative_type", "country", "publisher_id")
CONTEXT_FEATURES = CONTEXT_NUMERIC + CONTEXT_CATEGORICAL
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
