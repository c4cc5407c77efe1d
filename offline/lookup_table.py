"""The historical-CTR lookup table: the first baseline every model must beat.

The estimate of a row is the click rate of its cell — ``device_type`` × time-of-day
bucket × ``creative_type`` × ``placement`` × ``publisher_id`` — over the rows of the past
:data:`WINDOW_DAYS` days before a cut-off, smoothed towards its parent cell:

    rate(level k) = (clicks_k + m · rate(level k − 1)) / (impressions_k + m)

where level k keys on the first k of :data:`KEYS` (general → specific), level 0 is the
global rate ``clicks / impressions`` of the window and ``m`` (:data:`PRIOR_STRENGTH`,
in impressions) the prior strength. A cell never seen (0 impressions) therefore gets its
parent's rate exactly, and the back-off is automatic: the most specific key
(``publisher_id``) is dropped first, then ``placement``, ``creative_type``, the
time-of-day bucket and ``device_type``, down to the global rate.

* Time-of-day bucket: ``hour(ts, UTC) // 6`` — 0 = 00–06 h, 1 = 06–12 h, 2 = 12–18 h,
  3 = 18–24 h.
* Fallback for missing columns: a key whose column the table lacks is left out of the
  hierarchy (the levels are the keys that exist, in the same order; the time-of-day
  bucket always exists). A null value is a category of its own.
* Window: the fitted rows have ``cutoff − WINDOW_DAYS days <= ts < cutoff`` (ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from headrace.core.errors import InputError
from offline.evaluation import auc, log_loss

__all__ = ["KEYS", "TIME_BUCKET", "WINDOW_DAYS", "PRIOR_STRENGTH", "LookupTable",
           "time_bucket", "fit_lookup_table", "evaluate_lookup_table"]

TIME_BUCKET = "time_bucket"
#: the hierarchy, general → specific (``time_bucket`` is computed from ``ts``)
KEYS: tuple[str, ...] = ("device_type", TIME_BUCKET, "creative_type", "placement",
                         "publisher_id")
WINDOW_DAYS = 30
PRIOR_STRENGTH = 20.0
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000


def time_bucket(ts_ms: np.ndarray) -> np.ndarray:
    """``hour_of_day(ts, UTC) // 6`` (0–3) of epoch-millisecond timestamps."""
    return (np.asarray(ts_ms, dtype=np.int64) // _HOUR_MS) % 24 // 6


def _ts_ms(table: pa.Table) -> np.ndarray:
    if "ts" not in table.column_names:
        raise InputError("the rows have no 'ts' column")
    col = table.column("ts")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _key_columns(table: pa.Table, keys: Sequence[str]) -> list[list[Any]]:
    """One Python list per key (``time_bucket`` from ``ts``); values as strings or None."""
    cols: list[list[Any]] = []
    for k in keys:
        if k == TIME_BUCKET:
            cols.append(time_bucket(_ts_ms(table)).tolist())
        else:
            cols.append([None if v is None else str(v) for v in table.column(k).to_pylist()])
    return cols


@dataclass(frozen=True)
class LookupTable:
    """Smoothed click rates per cell; ``levels[k]`` maps a k+1-key tuple to its rate.

    ``keys``: the hierarchy used (those of :data:`KEYS` the fitted table had).
    ``global_rate``: level 0. ``m``: prior strength. ``rows``: rows fitted.
    """

    keys: tuple[str, ...]
    global_rate: float
    levels: tuple[dict[tuple[Any, ...], float], ...]
    m: float
    rows: int

    @property
    def cells(self) -> int:
        """Cells of the most specific level (observed combinations of all keys)."""
        return len(self.levels[-1])

    def predict(self, table: pa.Table) -> np.ndarray:
        """The smoothed rate of each row's most specific cell that was fitted (its
        parent's, ..., the global rate for unseen cells).

        Raises:
            InputError: a key column is missing from ``table``.
        """
        missing = [k for k in self.keys if k != TIME_BUCKET and k not in table.column_names]
        if missing:
            raise InputError(f"the rows have no {', '.join(missing)} column(s) that the "
                             "lookup table keys on")
        cols = _key_columns(table, self.keys)
        out = np.full(table.num_rows, self.global_rate)
        for i, row in enumerate(zip(*cols, strict=True)):
            for k in range(len(self.keys), 0, -1):
                rate = self.levels[k - 1].get(row[:k])
                if rate is not None:
                    out[i] = rate
                    break
        return out


def fit_lookup_table(table: pa.Table, *, cutoff_ms: int, window_days: float = WINDOW_DAYS,
                     m: float = PRIOR_STRENGTH) -> LookupTable:
    """Fit on the rows of ``table`` with ``cutoff − window_days <= ts < cutoff`` (ms).

    Args:
        table: rows with ``ts``, 0/1 ``label`` and any of the :data:`KEYS` columns.
        cutoff_ms: the end (exclusive) of the window, epoch ms.
        window_days: the window's length in days (> 0).
        m: prior strength in impressions (>= 0; 0 = raw cell rates).

    Raises:
        InputError: no ``label``/``ts`` column, bad arguments, or no row in the window.
    """
    if window_days <= 0 or m < 0:
        raise InputError("the lookup table needs window_days > 0 and m >= 0")
    if "label" not in table.column_names:
        raise InputError("the rows have no 'label' column")
    ts = _ts_ms(table)
    inside = (ts >= cutoff_ms - int(window_days * _DAY_MS)) & (ts < cutoff_ms)
    if not inside.any():
        raise InputError(f"no row in the {window_days:g} days before the lookup table's "
                         "cut-off")
    rows = table.filter(pa.array(inside))
    y = np.asarray(rows.column("label").cast(pa.float64()).to_numpy(), dtype=np.float64)
    keys = tuple(k for k in KEYS if k == TIME_BUCKET or k in rows.column_names)
    cols = _key_columns(rows, keys)
    global_rate = float(y.mean())
    levels: list[dict[tuple[Any, ...], float]] = []
    parent: dict[tuple[Any, ...], float] = {(): global_rate}
    for k in range(1, len(keys) + 1):
        clicks: dict[tuple[Any, ...], float] = {}
        imps: dict[tuple[Any, ...], int] = {}
        for cell, label in zip(zip(*cols[:k], strict=True), y.tolist(), strict=True):
            clicks[cell] = clicks.get(cell, 0.0) + label
            imps[cell] = imps.get(cell, 0) + 1
        level = {cell: (clicks[cell] + m * parent[cell[:-1]]) / (n + m)
                 for cell, n in imps.items()}
        levels.append(level)
        parent = level
    return LookupTable(keys, global_rate, tuple(levels), float(m), int(y.size))


def evaluate_lookup_table(fit_rows: pa.Table, eval_rows: pa.Table, *, cutoff_ms: int,
                          window_days: float = WINDOW_DAYS,
                          m: float = PRIOR_STRENGTH) -> dict[str, Any]:
    """Fit on ``fit_rows`` (the window before ``cutoff_ms``), score ``eval_rows`` once.

    Returns:
        ``auc``, ``logloss``, ``cells`` (most specific level), ``keys``, ``m``,
        ``window_days``, ``rows_fit``, ``rows`` (evaluated) and ``global_rate``.
    """
    lookup = fit_lookup_table(fit_rows, cutoff_ms=cutoff_ms, window_days=window_days, m=m)
    p = lookup.predict(eval_rows)
    y = np.asarray(eval_rows.column("label").cast(pa.float64()).to_numpy(), dtype=np.float64)
    return {"auc": auc(y, p), "logloss": log_loss(y, p), "cells": lookup.cells,
            "keys": list(lookup.keys), "m": lookup.m, "window_days": window_days,
            "rows_fit": lookup.rows, "rows": int(y.size), "global_rate": lookup.global_rate}
