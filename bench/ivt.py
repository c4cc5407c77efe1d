"""Benchmark: invalid-traffic filtering on the TalkingData sample, and what it does to the
model.

Same data and steps as ``headrace example talkingdata``
(:mod:`headrace.examples.talkingdata`): the CSV replayed through produce → worker →
labels (1-day attribution) → point-in-time training set on a throwaway local stack, the
last 24 hours held out, LightGBM with the example's parameters
(:func:`~headrace.examples.talkingdata.fit_and_score`: windowed features plus the raw
columns). Then:

* per rule set (``default``: the thresholds given, ip limit 60 a minute; ``strict``:
  :data:`STRICT`), ``flagged``: :func:`offline.ivt.filter_ivt` over the replayed events
  (the CSV mapped as :mod:`streams.csv_replay` maps it: each row an impression, a
  download a click), with TalkingData's ``ip`` as the ``ip`` column (it is also the
  ``user_id``): events flagged per rule.
* ``unfiltered`` (the reference, same run): the model trained on every training row.
* ``filtered``: the same split and parameters, trained on the training rows IVT kept,
  labelled from the clicks it kept (1-day attribution); the test rows are the same
  unfiltered rows. ``on_filtered_test`` adds both models scored on the test rows IVT
  kept (relabelled likewise).

The online features are computed from all traffic in both (as served). Also reported:
:func:`offline.validation.validate_training_set` on the training rows
(``validation_train``) and the test day's drift against them (``drift_test_vs_train``).
``model=false`` skips the stack and the models (flag counts only, seconds).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from headrace.core.errors import InputError
from offline.ivt import IvtRules, filter_ivt
from offline.validation import validate_training_set

__all__ = ["run", "flag_talkingdata", "filtered_rows", "STRICT"]

_NAME = ("talkingdata", "talkingdata_train_sample_100k.csv")
_DAY_MS = 86_400_000


def _default_csv() -> Path:
    root = Path(__file__).resolve().parents[1]
    for base in (root.parent / "shared" / "data", Path("/work/shared/data")):
        if base.joinpath(*_NAME).is_file():
            return base.joinpath(*_NAME)
    raise InputError("the TalkingData sample is not in ../shared/data or /work/shared/data; "
                     "pass --set csv=PATH")


def flag_talkingdata(csv: Path, rules: IvtRules) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """IVT over the replayed events of ``csv``: kept impressions, kept clicks, report."""
    from streams.csv_replay import load_csv

    replay = load_csv(csv, "talkingdata")
    imps = replay.impressions.select(["event_id", "ts", "user_id"])
    imps = imps.append_column("ip", imps.column("user_id"))
    clicks = replay.clicks.select(["event_id", "ts", "impression_id", "user_id"])
    clicks = clicks.append_column("ip", clicks.column("user_id"))
    kept_i, kept_c, report = filter_ivt(imps, clicks, rules)
    return kept_i, kept_c, report.to_dict()


def filtered_rows(rows: pa.Table, kept_imps: pa.Table, kept_clicks: pa.Table,
                  attribution_ms: int) -> pa.Table:
    """``rows`` (with ``impression_id``, ``ts``, ``label``) whose impression IVT kept,
    relabelled: 1 when a kept click on it has ``0 <= click.ts - imp.ts <= attribution``."""
    keep = pc.is_in(rows.column("impression_id"), value_set=kept_imps.column("event_id"))
    out = rows.filter(keep)
    pos = pc.index_in(kept_clicks.column("impression_id"), value_set=out.column("impression_id"))
    at = np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), np.int64)
    hit = at >= 0
    imp_ts = _ms(out.column("ts"))
    lag = _ms(kept_clicks.column("ts"))[hit] - imp_ts[at[hit]]
    label = np.zeros(out.num_rows, np.int8)
    label[at[hit][(lag >= 0) & (lag <= attribution_ms)]] = 1
    return out.set_column(out.schema.get_field_index("label"), "label",
                          pa.array(label, out.schema.field("label").type))


def _ms(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
    return np.asarray(col.to_numpy(), np.int64)


def _training_table(source: Path, tmp: str) -> tuple[pa.Table, pa.Table, list[str]]:
    """The example's pipeline on a local stack: (training set, raw rows, served names).

    Glue around the example's private ``_pipeline``, repeating :func:`run_example`'s
    stack set-up; a public hook in the example returning the training table would
    remove it."""
    from feature_defs.registry import definitions_spec, load_registry
    from headrace.core.settings import CommonSettings
    from headrace.demo import _Runner, definitions_env
    from headrace.examples.talkingdata import _pipeline
    from headrace.stack.local import local_stack
    from streams.csv_replay import csv_training_rows

    spec = definitions_spec(CommonSettings())
    served = load_registry(spec).feature_names()
    raw = csv_training_rows(source, "talkingdata")
    ts = _ms(raw.column("ts"))
    summary: dict[str, Any] = {}
    with local_stack(os.path.join(tmp, "stack")) as info:
        env = {**info.env, "HEADRACE_LOG_LEVEL": "WARNING",
               "HEADRACE_DATA_DIR": os.path.join(tmp, "worker"),
               "HEADRACE_PROGRESS": "false", **definitions_env(spec, os.getcwd())}
        training = _pipeline(_Runner(env, tmp), source, int(ts.min()), int(ts.max()),
                             lambda name, message: print(f"[bench ivt] {message}",
                                                         file=sys.stderr, flush=True),
                             summary)
        return pq.read_table(training), raw, served


#: a deliberately strict rule set: the 100k-row sample holds 1 row in ~1,850 of the full
#: data, so per-minute bursts of the default size cannot occur in it; this one shows what
#: filtering does to the model when it does remove traffic
STRICT = IvtRules(min_click_delay_ms=10_000, max_user_clicks_per_minute=1,
                  max_ip_events_per_minute=2, impossible_ctr_min_impressions=5,
                  impossible_ctr=0.2)


def run(rows: int | None = None, seed: int = 0, threads: int = 1, csv: str | None = None,
        model: bool = True, strict: bool = True, min_click_delay_ms: int = 1000,
        max_user_clicks_per_minute: int = 10, max_ip_events_per_minute: int | None = 60,
        impossible_ctr_min_impressions: int = 50, impossible_ctr: float = 0.5
        ) -> dict[str, Any]:
    """Run the benchmark (module docstring); ``rows`` = the first N CSV rows only; the
    rule thresholds set the ``default`` variant, ``strict`` adds :data:`STRICT`."""
    from headrace.core.timeparse import parse_duration
    from headrace.examples.talkingdata import ATTRIBUTION, TEST_HOURS, fit_and_score, subset_csv

    started = time.monotonic()
    variants = {"default": IvtRules(min_click_delay_ms, max_user_clicks_per_minute,
                                    max_ip_events_per_minute, impossible_ctr_min_impressions,
                                    impossible_ctr)}
    if strict:
        variants["strict"] = STRICT
    source = Path(csv) if csv else _default_csv()
    attribution = parse_duration(ATTRIBUTION)
    out: dict[str, Any] = {}
    kept: dict[str, tuple[pa.Table, pa.Table]] = {}
    with tempfile.TemporaryDirectory(prefix="headrace-bench-ivt-") as tmp:
        if rows is not None:
            source = subset_csv(source, Path(tmp) / source.name, rows)
        for name, rules in variants.items():
            t0 = time.monotonic()
            kept_i, kept_c, report = flag_talkingdata(source, rules)
            kept[name] = (kept_i, kept_c)
            out[name] = {"rules": rules.to_dict(), "flagged": report["counts"],
                         **{k: v for k, v in report.items() if k != "counts"},
                         "filter_seconds": round(time.monotonic() - t0, 2)}
        if not model:
            return {**out, "seconds": round(time.monotonic() - started, 1)}
        table, raw, served = _training_table(source, tmp)
    raw_cols = [c for c in raw.column_names if c not in ("impression_id", "ts", "label")]
    joined = table.join(raw.select(["impression_id", *raw_cols]), "impression_id")
    ts = _ms(joined.column("ts"))
    cutoff = int(ts.max()) - TEST_HOURS * 3_600_000 + 1
    train, test = joined.filter(pa.array(ts < cutoff)), joined.filter(pa.array(ts >= cutoff))
    features = [n for n in served if n in table.column_names]

    def score(tr: pa.Table, te: pa.Table) -> dict[str, float]:
        return fit_and_score(tr, te, features, raw_cols, seed=seed, threads=threads)

    def count(t: pa.Table) -> dict[str, int]:
        return {"rows": t.num_rows, "positives": int(pc.sum(t.column("label")).as_py() or 0)}

    base = score(train, test)
    checked = validate_training_set(train, features)
    drift = validate_training_set(test, features, previous=train, min_rows=1)
    out.update({"train": count(train), "test": count(test), "test_from_ms": cutoff,
                "features_windowed": len(features), "raw_columns": raw_cols,
                "unfiltered": base, "validation_train": checked.to_dict(),
                "drift_test_vs_train": {"counts": dict(drift.counts),
                                        "warnings": [w for w in drift.warnings
                                                     if w.startswith("drift")]}})
    for name, (kept_i, kept_c) in kept.items():
        train_f = filtered_rows(train, kept_i, kept_c, attribution)
        test_f = filtered_rows(test, kept_i, kept_c, attribution)
        filt = score(train_f, test)
        out[name].update({
            "train_filtered": count(train_f), "test_filtered": count(test_f),
            "filtered": filt, "auc_delta": filt["auc"] - base["auc"],
            "logloss_delta": filt["logloss"] - base["logloss"],
            "on_filtered_test": {"unfiltered": score(train, test_f),
                                 "filtered": score(train_f, test_f)},
        })
    out["seconds"] = round(time.monotonic() - started, 1)
    return out
