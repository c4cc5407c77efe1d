"""The hyperparameter search: up to :data:`DEFAULT_CANDIDATES` LightGBM candidates.

:func:`candidates` lists them, deterministically for a seed:

* candidates 0–7 are the 8 fixed combinations trained before this search existed
  (:data:`LEGACY_GRID`: learning rate 0.05/0.1 × leaves 15/63 × min rows 20/200, with
  ``feature_fraction`` 0.9, ``lambda_l2`` 1.0, no bagging); candidate 0 — learning rate
  0.05, 15 leaves, 20 rows per leaf — is the default. A search of >= 8 candidates
  therefore always contains the old search and can only be as good or better on
  validation log loss;
* the rest are drawn from ``numpy.random.default_rng(seed)``: ``learning_rate``
  log-uniform in [0.02, 0.3]; ``num_leaves`` log-uniform in [7, 255] and
  ``min_data_in_leaf`` in [10, 500] (rounded to integers); ``feature_fraction`` uniform
  in [0.5, 1.0]; ``bagging_freq`` 0 (off), 1 or 5 with equal chance and, when on,
  ``bagging_fraction`` uniform in [0.5, 1.0]; ``lambda_l2`` log-uniform in [1e-3, 10].

:func:`run_search` fits them in order, each early-stopped on the validation log loss,
and keeps the lowest validation log loss (ties: the earlier candidate). With a budget
(``budget_s`` seconds of wall clock) no new candidate starts once the budget is spent
(candidate 0 always runs); the outcome records how many ran and why it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offline.evaluation import TimeSplit, evaluate, fit_booster

__all__ = ["DEFAULT_CANDIDATES", "MAX_CANDIDATES", "BASE_PARAMS", "LEGACY_GRID",
           "SearchOutcome", "candidates", "run_search"]

DEFAULT_CANDIDATES = 50
MAX_CANDIDATES = 200
BASE_PARAMS: Mapping[str, Any] = {"feature_fraction": 0.9, "lambda_l2": 1.0}
LEGACY_GRID: tuple[Mapping[str, Any], ...] = tuple(
    {"learning_rate": lr, "num_leaves": leaves, "min_data_in_leaf": min_rows}
    for lr in (0.05, 0.1) for leaves in (15, 63) for min_rows in (20, 200)
)
#: the parameters every candidate sets (a candidate is a full combination, not a delta)
_NO_BAGGING: Mapping[str, Any] = {"bagging_fraction": 1.0, "bagging_freq": 0}


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw(rng: np.random.Generator) -> dict[str, Any]:
    """One random combination (always the same number of draws, in the same order)."""
    lr = _log_uniform(rng, 0.02, 0.3)
    leaves = int(round(_log_uniform(rng, 7, 255)))
    min_rows = int(round(_log_uniform(rng, 10, 500)))
    feature_fraction = float(rng.uniform(0.5, 1.0))
    freq = int(rng.choice(np.array([0, 1, 5])))
    fraction = float(rng.uniform(0.5, 1.0))
    l2 = _log_uniform(rng, 1e-3, 10.0)
    return {"learning_rate": round(lr, 5), "num_leaves": leaves, "min_data_in_leaf": min_rows,
            "feature_fraction": round(feature_fraction, 4),
            "bagging_fraction": round(fraction, 4) if freq else 1.0, "bagging_freq": freq,
            "lambda_l2": round(l2, 5)}


def candidates(n: int = DEFAULT_CANDIDATES, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` candidates for ``seed`` (see the module docstring).

    Raises:
        ValueError: ``n`` is not in ``[1, MAX_CANDIDATES]``.
    """
    if not 1 <= n <= MAX_CANDIDATES:
        raise ValueError(f"the search needs 1 to {MAX_CANDIDATES} candidates, not {n}")
    out = [{**combo, **BASE_PARAMS, **_NO_BAGGING} for combo in LEGACY_GRID[:n]]
    rng = np.random.default_rng(seed)
    while len(out) < n:
        out.append(_draw(rng))
    return out


@dataclass(frozen=True)
class SearchOutcome:
    """The winner and the record of the search.

    ``results``: one entry per candidate that ran (its parameters, ``best_iteration``,
    ``valid_auc``, ``valid_logloss``, ``seconds``); ``stopped``: ``"all"`` (every
    candidate ran) or ``"budget"`` (the wall-clock budget ran out first).
    """

    booster: Any
    params: dict[str, Any]
    best_index: int
    results: list[dict[str, Any]]
    planned: int
    stopped: str
    budget_s: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """``metadata["search"]``."""
        return {"selection": "lowest validation log loss", "best": self.params,
                "best_index": self.best_index, "planned": self.planned,
                "ran": len(self.results), "stopped": self.stopped, "budget_s": self.budget_s,
                "seconds": round(self.seconds, 3), "results": self.results}


def run_search(x: np.ndarray, y: np.ndarray, split: TimeSplit, features: Sequence[str], *,
               grid: Sequence[Mapping[str, Any]], seed: int = 0, num_threads: int = 1,
               budget_s: float | None = None, categorical: Sequence[str] = (),
               progress: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic) -> SearchOutcome:
    """Fit the ``grid`` combinations in order; keep the lowest validation log loss.

    Args:
        grid: the candidates (non-empty); each merged over ``seed``, ``num_threads``
            and ``deterministic=True``.
        budget_s: seconds (>= 0) after which no new candidate starts; None: no budget.
        categorical: names of ``features`` LightGBM treats as categoricals.
        progress: called with one line per finished candidate (for a human on stderr).
        clock: seconds, monotonic (injected by tests).

    Raises:
        ValueError: ``grid`` is empty or ``budget_s`` negative.
        InputError: LightGBM refused the data.
    """
    if not grid:
        raise ValueError("the search grid is empty")
    if budget_s is not None and not budget_s >= 0:
        raise ValueError("the search budget must be >= 0 seconds")
    began = clock()
    best: tuple[float, int, Any, dict[str, Any]] | None = None
    results: list[dict[str, Any]] = []
    stopped = "all"
    for i, combo in enumerate(grid):
        if i > 0 and budget_s is not None and clock() - began >= budget_s:
            stopped = "budget"
            break
        params = {**combo, "seed": seed, "num_threads": num_threads, "deterministic": True}
        started = clock()
        booster = fit_booster(x[split.train], y[split.train], x[split.valid], y[split.valid],
                              params, feature_names=features, categorical=categorical)
        m = evaluate(y[split.valid], booster.predict(x[split.valid],
                                                     num_iteration=booster.best_iteration))
        results.append({**combo, "best_iteration": int(booster.best_iteration),
                        "valid_auc": m.auc, "valid_logloss": m.logloss,
                        "seconds": round(clock() - started, 3)})
        if best is None or m.logloss < best[0]:
            best = (m.logloss, i, booster, params)
        if progress is not None:
            progress(f"candidate {i + 1}/{len(grid)}: valid log loss {m.logloss:.5f} "
                     f"(AUC {m.auc:.4f}, {int(booster.best_iteration)} trees, "
                     f"{clock() - started:.1f} s); best so far #{best[1]} {best[0]:.5f}")
    assert best is not None  # the first candidate always runs
    return SearchOutcome(best[2], best[3], best[1], results, len(grid), stopped, budget_s,
                         clock() - began)
