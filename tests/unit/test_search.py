"""The hyperparameter search: its candidates, determinism, budget and selection rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from feature_defs.registry import load_registry
from headrace.core.errors import InputError
from offline.evaluation import log_loss, time_split
from offline.search import LEGACY_GRID, candidates, run_search
from offline.train import train

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def small_problem(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, 0] - 1.0)))).astype(np.float64)
    ts = START + np.arange(n) * 60_000
    return x, y, ts


def test_candidate_zero_is_the_old_default_and_the_old_grid_comes_first() -> None:
    cands = candidates(50, seed=0)
    assert len(cands) == 50
    assert cands[0] == {"learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
                        "feature_fraction": 0.9, "lambda_l2": 1.0, "bagging_fraction": 1.0,
                        "bagging_freq": 0}
    assert [{k: c[k] for k in ("learning_rate", "num_leaves", "min_data_in_leaf")}
            for c in cands[:8]] == [dict(g) for g in LEGACY_GRID]
    assert all(c["feature_fraction"] == 0.9 and c["lambda_l2"] == 1.0 for c in cands[:8])
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == 50  # no duplicates


def test_candidates_are_deterministic_for_a_seed_and_within_the_ranges() -> None:
    assert candidates(50, seed=7) == candidates(50, seed=7)
    assert candidates(20, seed=7) == candidates(50, seed=7)[:20]  # a prefix, not a reshuffle
    assert candidates(50, seed=7)[8:] != candidates(50, seed=8)[8:]
    assert candidates(50, seed=7)[:8] == candidates(50, seed=8)[:8]
    drawn = [c for s in range(4) for c in candidates(200, seed=s)[8:]]
    assert len(drawn) == 4 * 192
    for c in drawn:
        assert 0.02 <= c["learning_rate"] <= 0.3
        assert 7 <= c["num_leaves"] <= 255 and isinstance(c["num_leaves"], int)
        assert 10 <= c["min_data_in_leaf"] <= 500
        assert 0.5 <= c["feature_fraction"] <= 1.0 and 1e-3 <= c["lambda_l2"] <= 10.0
        assert c["bagging_freq"] in (0, 1, 5)
        assert (c["bagging_fraction"] == 1.0) if c["bagging_freq"] == 0 else (
            0.5 <= c["bagging_fraction"] <= 1.0)
    # log-uniform: about half the learning rates below the geometric mean of the bounds
    below = np.mean([c["learning_rate"] < math.sqrt(0.02 * 0.3) for c in drawn])
    assert 0.42 < below < 0.58
    for bad in (0, 201):
        with pytest.raises(ValueError, match="1 to 200 candidates"):
            candidates(bad)


def test_search_is_deterministic_and_keeps_the_lowest_validation_log_loss() -> None:
    x, y, ts = small_problem(1500)
    split = time_split(ts)
    grid = [candidates(9, seed=5)[i] for i in (4, 5, 8)]  # two of the old grid, one drawn
    assert grid[2]["bagging_freq"] == 5  # bagging is seeded too
    first = run_search(x, y, split, ["a", "b"], grid=grid, seed=5)
    again = run_search(x, y, split, ["a", "b"], grid=grid, seed=5)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first.results]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again.results]
    assert first.best_index == again.best_index and first.stopped == "all"
    losses = [r["valid_logloss"] for r in first.results]
    assert first.best_index == int(np.argmin(losses)) and len(losses) == 3
    # the winner's loss, recomputed from its own predictions
    p = first.booster.predict(x[split.valid], num_iteration=first.booster.best_iteration)
    assert log_loss(y[split.valid], p) == pytest.approx(min(losses), rel=1e-12)
    assert first.params == {**grid[first.best_index], "seed": 5, "num_threads": 1,
                            "deterministic": True}


def test_budget_stops_starting_candidates_once_spent() -> None:
    x, y, ts = small_problem(1500)
    split = time_split(ts)
    now = [0.0]
    lines: list[str] = []

    def progress(line: str) -> None:  # each finished candidate "takes" 10 s
        lines.append(line)
        now[0] += 10.0

    out = run_search(x, y, split, ["a", "b"], grid=candidates(6), budget_s=25.0,
                     progress=progress, clock=lambda: now[0])
    # starts at t=0, 10, 20 (< 25); at t=30 the budget is spent
    assert (len(out.results), out.stopped, out.planned) == (3, "budget", 6)
    assert len(lines) == 3 and lines[0].startswith("candidate 1/6: valid log loss")
    zero = run_search(x, y, split, ["a", "b"], grid=candidates(6), budget_s=0.0)
    assert (len(zero.results), zero.stopped, zero.best_index) == (1, "budget", 0)
    with pytest.raises(ValueError, match="empty"):
        run_search(x, y, split, ["a", "b"], grid=[])


def _table(n: int = 1200) -> pa.Table:
    x, y, ts = small_problem(n, seed=1)
    return pa.table({"ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
                     "label": y.astype(np.int8), "user__ctr_24h": x[:, 0],
                     "user__impressions_24h": np.round(np.exp(x[:, 1]) * 10)})


@pytest.mark.slow
def test_train_records_the_search_and_its_budget(tmp_path: Path) -> None:
    reg = load_registry()
    res = train(_table(), tmp_path / "a", registry=reg, search_candidates=3)
    search = res.metadata["search"]
    assert (search["planned"], search["ran"], search["stopped"]) == (3, 3, "all")
    assert [r["learning_rate"] for r in search["results"]] == [0.05, 0.05, 0.05]
    assert search["best"] == {**candidates(3)[search["best_index"]], "seed": 0,
                              "num_threads": 1, "deterministic": True}
    spent = train(_table(), tmp_path / "b", registry=reg, search_candidates=3,
                  search_budget_s=0.0)
    assert (spent.metadata["search"]["ran"], spent.metadata["search"]["stopped"]) == (1,
                                                                                      "budget")
    explicit = train(_table(), tmp_path / "c", registry=reg, grid=[{"num_leaves": 7}],
                     search_candidates=40)
    assert explicit.metadata["search"]["ran"] == 1  # an explicit grid is exactly that grid
    assert explicit.metadata["search"]["best"]["num_leaves"] == 7
    for kwargs, message in (({"search_candidates": 0}, "1 to 200 candidates, not 0"),
                            ({"search_budget_s": -1.0}, ">= 0 seconds")):
        with pytest.raises(InputError, match=message):
            train(_table(), tmp_path / "d", registry=reg, **kwargs)
