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
from offline.evaluation import RAW_PARAMS, auc, baseline_raw, fit_booster, log_loss, time_split

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
                  *, seed: int = 0, threads: int = 1) -> dict[str, float]:
    """Fit on ``train`` (early stopping on its last 20 % by time), score ``test`` once.

    ``numeric`` columns are used as numbers (null → missing); ``categorical`` ones through
    :class:`~headrace.model.booster.CategoryCodes` fitted on ``train``.
    """
    from offline.train import feature_matrix

    codes = CategoryCodes.fit(train, categorical, max_categories=1000)

    def matrix(t: pa.Table) -> np.ndarray:
        return np.column_stack([feature_matrix(t, numeric), codes.matrix(t.select(categorical))])

    x, x_test = matrix(train), matrix(test)
    y = np.asarray(train.column("label").to_numpy(), dtype=np.float64)
    y_test = np.asarray(test.column("label").to_numpy(), dtype=np.float64)
    split = time_split(_ms(train))
    params = {**RAW_PARAMS, "seed": seed, "num_threads": threads, "deterministic": True}
    booster = fit_booster(x[split.train], y[split.train], x[split.valid], y[split.valid],
                          params, feature_names=numeric + categorical, categorical=categorical)
    p = booster.predict(x_test, num_iteration=booster.best_iteration)
    return {"auc": auc(y_test, p), "logloss": log_loss(y_test, p),
            "best_iteration": int(booster.best_iteration)}


def _ms(table: pa.Table) -> np.ndarray:
    col = table.column("ts")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _say(line: str) -> None:
    print(f"[example] {line}", file=sys.stderr, flush=True)


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
                threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run the example (see the module docstring); returns the summary.

    Args:
        csv: the TalkingData CSV (read in place, never copied into the repository).
        rows: use only the first ``rows`` data rows (default: the whole file).
        seed, threads: LightGBM seed and threads.
        progress: progress lines on stderr.

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
        step("evaluate", f"fitting three models, scoring the last {TEST_HOURS} hours")
        summary.update(_evaluate(table, raw, registry.feature_names(), seed, threads))
    step("done")
    return {**summary, "timings": timings, "seconds": round(time.monotonic() - started, 1)}


def _evaluate(table: pa.Table, raw: pa.Table, served: list[str], seed: int,
              threads: int) -> dict[str, Any]:
    """Join raw columns by impression id, check labels, split in time, fit the three."""
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
        "best_iterations": {"windowed": windowed["best_iteration"],
                            "windowed_only": only["best_iteration"],
                            "raw": base["best_iteration"]},
    }
