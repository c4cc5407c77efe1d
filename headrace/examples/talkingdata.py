"""The TalkingData example: do windowed stream features beat the raw columns?

On a throwaway embedded stack (:func:`headrace.stack.local.local_stack` in a temporary folder,
stopped at the end), every step runs the real ``headrace`` command in a subprocess, as
the demo does (:class:`headrace.demo._Runner`):

1. ``headrace produce --csv FILE --mapping talkingdata`` replays the sample in event-time
   order (:mod:`streams.csv_replay`: each row an impression, ``is_attributed = 1`` also a
   click at ``attributed_time``);
2. ``headrace worker --until-idle`` builds the online and offline features;
3. ``headrace labels --attribution 1d``: a download comes at most 12.9 h after its click
   in the sample, so a 1-day window labels exactly the rows with ``is_attributed = 1``
   (checked here row by row: ``labels_match_is_attributed``);
4. ``headrace training-set --features all``: point-in-time values of every feature.

Then, in this process, a time split holds out the LAST 24 HOURS of rows (every training
row is earlier than every test row) and three LightGBM models with the same parameters
(:data:`~offline.evaluation.RAW_PARAMS`, early-stopped on the last 20 % of the training
rows by time, one thread) are scored once on the test rows:

* ``windowed``: the 20 windowed features AND the raw columns (ip, app, device, os,
  channel as categoricals) — the fair comparison, same inputs plus history;
* ``windowed_only``: the windowed features alone;
* ``raw``: :func:`~offline.evaluation.baseline_raw`, the raw columns alone.

Beside them, on the same test rows:

* ``windowed_calibrated``: the ``windowed`` model with the calibration map of
  :func:`offline.calibration.choose_calibration` (fitted on the earlier half of its
  early-stopping rows by time, chosen on the later half);
* ``windowed_searched`` (and ``_calibrated``): the windowed + raw inputs through the
  hyperparameter search of :mod:`offline.search` (``candidates``, default 50, within an
  optional budget), then calibrated the same way — what ``headrace train`` ships;
* ``lookup_table``: the historical-CTR lookup table (:mod:`offline.lookup_table`) fitted on
  the training rows of the 30 days before the test cut-off.

The label is an app download (0.23 % of rows), not a click: published CTR figures do not
apply, and with ~50 positives in the test day the AUCs carry a standard error of a few
hundredths.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headrace.core.errors import InputError
from headrace.model.booster import CategoryCodes
from offline.calibration import eval_rows
from offline.evaluation import RAW_PARAMS, auc, baseline_raw, log_loss, time_split
from offline.lookup_table import evaluate_lookup_table
from offline.search import candidates, run_search

__all__ = ["ATTRIBUTION", "TEST_HOURS", "run_example", "subset_csv", "fit_and_score"]

ATTRIBUTION = "1d"
TEST_HOURS = 24
_HOUR_MS = 3_600_000


def subset_csv(source: Path, dest: Path, rows: int) -> Path:
    """The header and the first ``rows`` data rows of ``source`` (file order) at ``dest``."""
    with source.open(encoding="utf-8") as src, dest.open("w", encoding="utf-8") as out:
        for _, line in zip(range(rows + 1), src, strict=False):
            out.write(line)
    return dest


def fit_and_score(train: pa.Table, test: pa.Table, numeric: list[str], categorical: list[str],
                  *, seed: int = 0, threads: int = 1, search: int | None = None,
                  budget_s: float | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit on ``train`` (early stopping on its last 20 % by time), score ``test`` once.

    ``numeric`` columns are used as numbers (null → missing); ``categorical`` ones through
    :class:`~headrace.model.booster.CategoryCodes` fitted on ``train``. ``search``: None
    fits :data:`~offline.evaluation.RAW_PARAMS`; N searches N candidates
    (:func:`offline.search.candidates`) within ``budget_s`` seconds. The calibration map
    is fitted on the early-stopping rows (:func:`offline.calibration.eval_rows`).
    ``progress``: called with one line per search candidate.

    Returns:
        ``auc``, ``logloss`` (uncalibrated), ``auc_calibrated``, ``logloss_calibrated``,
        ``calibration`` (the map's kind or ``none``), ``best_iteration`` and ``search``
        (candidates planned/ran, why it stopped, seconds, the best parameters).
    """
    from offline.train import feature_matrix

    codes = CategoryCodes.fit(train, categorical, max_categories=1000)

    def matrix(t: pa.Table) -> np.ndarray:
        return np.column_stack([feature_matrix(t, numeric), codes.matrix(t.select(categorical))])

    x, x_test = matrix(train), matrix(test)
    y = np.asarray(train.column("label").to_numpy(), dtype=np.float64)
    y_test = np.asarray(test.column("label").to_numpy(), dtype=np.float64)
    ts = _ms(train)
    split = time_split(ts)
    grid = [dict(RAW_PARAMS)] if search is None else candidates(search, seed)
    found = run_search(x, y, split, numeric + categorical, grid=grid, seed=seed,
                       num_threads=threads, budget_s=budget_s, categorical=categorical,
                       progress=progress)
    booster = found.booster
    p = booster.predict(x_test, num_iteration=booster.best_iteration)
    rows = eval_rows(booster.predict(x[split.valid], num_iteration=booster.best_iteration),
                     y, ts, split)
    cal = rows.choice.map if rows.choice is not None else None
    p_cal = p if cal is None else cal.apply(p)
    return {"auc": auc(y_test, p), "logloss": log_loss(y_test, p),
            "auc_calibrated": auc(y_test, p_cal), "logloss_calibrated": log_loss(y_test, p_cal),
            "calibration": rows.choice.chosen if rows.choice is not None else "none",
            "best_iteration": int(booster.best_iteration),
            "search": {"planned": found.planned, "ran": len(found.results),
                       "stopped": found.stopped, "seconds": round(found.seconds, 1),
                       "best": {k: v for k, v in found.params.items()
                                if k not in ("seed", "num_threads", "deterministic")}}}


def _ms(table: pa.Table) -> np.ndarray:
    col = table.column("ts")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _say(line: str) -> None:
    print(f"[example] {line}", file=sys.stderr, flush=True)


def _candidate_line(line: str) -> None:
    _say(f"  {line}")


def _pipeline(run: Any, csv: Path, begin_ms: int, end_ms: int,
              step: Callable[[str, str], None], summary: dict[str, Any]) -> Path:
    """produce → worker → labels → training set; returns the training-set path."""
    wd = Path(run.workdir)
    step("produce", "replaying the CSV into the broker")
    produced = run.json("produce", "--csv", str(csv), "--mapping", "talkingdata", "--json",
                        "--no-progress", timeout=900)
    summary["events_produced"] = produced.get("events")
    step("worker", "stream worker until idle")
    stats = wd / "worker-stats.json"
    run.cli("worker", "--until-idle", "3", "--stats", str(stats), timeout=1800)
    import json

    summary["worker_events_in"] = json.loads(stats.read_text(encoding="utf-8"))["events_in"]
    step("labels", f"labels ({ATTRIBUTION} attribution)")
    labels = wd / "labels.parquet"
    run.cli("labels", "--from", str(begin_ms), "--to", str(end_ms + 1), "--attribution",
            ATTRIBUTION, "--out", str(labels))
    step("training_set", "point-in-time training set (all features)")
    training = wd / "training.parquet"
    run.cli("training-set", "--labels", str(labels), "--features", "all", "--out",
            str(training), timeout=1800)
    return training


def run_example(csv: Path | str, *, rows: int | None = None, seed: int = 0,
                threads: int = 1, progress: bool = True, search_candidates: int = 50,
                search_budget_s: float | None = None) -> dict[str, Any]:
    """Run the example (see the module docstring); returns the summary.

    Args:
        csv: the TalkingData CSV (read in place, never copied into the repository).
        rows: use only the first ``rows`` data rows (default: the whole file).
        seed, threads: LightGBM seed and threads.
        progress: progress lines on stderr.
        search_candidates: candidates of the ``windowed_searched`` model (1–200).
        search_budget_s: wall-clock budget of that search in seconds (None: none).

    Raises:
        InputError: unreadable CSV, or rows that cannot be split or trained on.
        HeadraceError: a step failed (its stderr in the message).
    """
    from feature_defs.registry import definitions_spec, load_registry
    from headrace.core.settings import CommonSettings
    from headrace.demo import _Runner, definitions_env
    from headrace.stack.local import local_stack
    from streams.csv_replay import csv_training_rows

    started = time.monotonic()
    timings: dict[str, float] = {}
    current: list[Any] = [started, ""]  # when the running step began, its name

    def step(name: str, message: str = "") -> None:
        now = time.monotonic()
        if current[1]:
            timings[f"{current[1]}_s"] = round(now - current[0], 1)
        current[:] = [now, name]
        if progress and message:
            _say(message)

    summary: dict[str, Any] = {}
    spec = definitions_spec(CommonSettings())  # HEADRACE_DEFINITIONS, for every step
    registry = load_registry(spec)  # checked before anything starts
    source = Path(csv).resolve()  # the steps run in a temporary working directory
    if not source.is_file():
        raise InputError(f"file {csv} does not exist")
    with tempfile.TemporaryDirectory(prefix="headrace-example-") as tmp:
        step("stack", f"starting the local stack in {tmp}")
        if rows is not None:
            source = subset_csv(source, Path(tmp) / source.name, rows)
        raw = csv_training_rows(source, "talkingdata")
        ts = _ms(raw)
        begin, end = int(ts.min()), int(ts.max())
        with local_stack(os.path.join(tmp, "stack")) as info:
            env = {**info.env, "HEADRACE_LOG_LEVEL": "WARNING",
                   "HEADRACE_DATA_DIR": os.path.join(tmp, "worker"),
                   "HEADRACE_PROGRESS": "false", **definitions_env(spec, os.getcwd())}
            training = _pipeline(_Runner(env, tmp), source, begin, end, step, summary)
            table = pq.read_table(training)
        step("evaluate", f"fitting the models and the lookup table, scoring the last "
                         f"{TEST_HOURS} hours ({search_candidates} search candidates)")
        summary.update(_evaluate(table, raw, registry.feature_names(), seed, threads,
                                 search_candidates, search_budget_s,
                                 _candidate_line if progress else None))
    step("done")
    return {**summary, "timings": timings, "seconds": round(time.monotonic() - started, 1)}


def _evaluate(table: pa.Table, raw: pa.Table, served: list[str], seed: int,
              threads: int, search: int = 50, budget_s: float | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Join raw columns by impression id, check labels, split in time, fit and score."""
    raw_cols = [c for c in raw.column_names if c not in ("impression_id", "ts", "label")]
    if table.num_rows != raw.num_rows:
        raise InputError(f"{raw.num_rows} CSV rows but {table.num_rows} labelled impressions: "
                         "the stream lost or dead-lettered some (see headrace-dlq)")
    joined = table.join(raw.select(["impression_id", "label", *raw_cols])
                        .rename_columns(["impression_id", "is_attributed", *raw_cols]),
                        "impression_id")
    mismatches = int(np.sum(joined.column("label").to_numpy().astype(np.int64)
                            != joined.column("is_attributed").to_numpy().astype(np.int64)))
    ts = _ms(joined)
    cutoff = int(ts.max()) - TEST_HOURS * _HOUR_MS + 1
    train = joined.filter(pa.array(ts < cutoff))
    test = joined.filter(pa.array(ts >= cutoff))
    features = [n for n in served if n in table.column_names]
    windowed = fit_and_score(train, test, features, raw_cols, seed=seed, threads=threads)
    only = fit_and_score(train, test, features, [], seed=seed, threads=threads)
    base = baseline_raw(train.select(["ts", "label", *raw_cols]),
                        test.select(["ts", "label", *raw_cols]), seed=seed, num_threads=threads)
    searched = fit_and_score(train, test, features, raw_cols, seed=seed, threads=threads,
                             search=search, budget_s=budget_s, progress=progress)
    lookup = evaluate_lookup_table(train, test, cutoff_ms=cutoff)
    y_test = test.column("label").to_numpy()
    return {
        "rows": joined.num_rows, "positives": int(joined.column("label").to_numpy().sum()),
        "labels_match_is_attributed": mismatches == 0, "label_mismatches": mismatches,
        "train_rows": train.num_rows, "test_rows": test.num_rows,
        "test_positives": int(y_test.sum()), "test_from_ms": cutoff,
        "features_windowed": len(features), "raw_columns": raw_cols,
        "auc_windowed": windowed["auc"], "logloss_windowed": windowed["logloss"],
        "auc_windowed_only": only["auc"], "logloss_windowed_only": only["logloss"],
        "auc_raw": base["auc_raw"], "logloss_raw": base["logloss_raw"],
        "auc_windowed_calibrated": windowed["auc_calibrated"],
        "logloss_windowed_calibrated": windowed["logloss_calibrated"],
        "auc_windowed_searched": searched["auc"], "logloss_windowed_searched": searched["logloss"],
        "auc_windowed_searched_calibrated": searched["auc_calibrated"],
        "logloss_windowed_searched_calibrated": searched["logloss_calibrated"],
        "auc_lookup_table": lookup["auc"], "logloss_lookup_table": lookup["logloss"],
        "lookup_table": {k: lookup[k] for k in ("cells", "keys", "m", "window_days",
                                                "rows_fit")},
        "calibration": {"windowed": windowed["calibration"],
                        "windowed_searched": searched["calibration"]},
        "search": searched["search"],
        "best_iterations": {"windowed": windowed["best_iteration"],
                            "windowed_only": only["best_iteration"],
                            "raw": base["best_iteration"],
                            "windowed_searched": searched["best_iteration"]},
    }
