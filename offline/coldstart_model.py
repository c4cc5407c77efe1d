"""The cold-start model: click probability from the request context alone.

Served when the scorer has no usable entity features (a new user, ad or publisher, or
the online store is down). Its inputs are only what every request carries:

* ``hour_of_day`` (0–23) and ``day_of_week`` (0 = Monday … 6 = Sunday), both UTC, from
  the request's ``ts`` (epoch milliseconds) — numeric, so trees can split on ranges;
* ``device_type``, ``placement``, ``creative_type``, ``country``, ``publisher_id`` —
  LightGBM categoricals through a stored :class:`~headrace.model.booster.CategoryCodes`
  mapping (the 1,000 most frequent values seen at least 5 times in the training part;
  anything else, unseen values included, is missing).

It is trained in the same ``headrace train`` run, on the same time split, and saved as
``<version>/coldstart/model.txt`` + ``metadata.json`` beside the main model. It is not
gated on its own: it ships with the version the main model's gate promotes.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from headrace.core.errors import InputError
from headrace.model.booster import CategoryCodes
from headrace.model.coldstart import CONTEXT_CATEGORICAL, CONTEXT_FEATURES, ColdStartModel
from offline.evaluation import Metrics, TimeSplit, evaluate, fit_booster

__all__ = ["COLDSTART_PARAMS", "train_coldstart"]

COLDSTART_PARAMS: Mapping[str, Any] = {"learning_rate": 0.05, "num_leaves": 31,
                                       "min_data_in_leaf": 50, "cat_smooth": 10.0}
_MAX_CATEGORIES, _MIN_COUNT = 1000, 5


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
