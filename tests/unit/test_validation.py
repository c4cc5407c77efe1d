"""Training-set and labels validation: each rule on a hand-made table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.registry import Registry
from feature_defs.windows import sliding
from offline.validation import psi, validate_labels, validate_training_set

T0 = 1_767_225_600_000
N = 1000
TS_RULES = {"schema", "min_rows", "label_values", "label_rate", "all_null", "null_share",
            "non_finite", "range", "ratio_above_1", "outliers", "drift"}


def _table(n: int = N, **cols: object) -> pa.Table:
    base: dict[str, object] = {
        "ts": pa.array(np.arange(n, dtype=np.int64) + T0).cast(pa.timestamp("ms", tz="UTC")),
        "label": pa.array((np.arange(n) % 10 == 0).astype(np.int8)),
        "user__clicks_1h": pa.array(np.arange(n) % 5, pa.int64()),
        "user__ctr_1h": pa.array((np.arange(n) % 4) / 4.0),
    }
    base.update(cols)
    return pa.table(base)


FEATURES = ["user__clicks_1h", "user__ctr_1h"]


def test_a_clean_table_passes_with_every_rule_counted() -> None:
    report = validate_training_set(_table(), FEATURES)
    assert report.ok and report.problems == () and report.warnings == ()
    assert set(report.counts) == TS_RULES and set(report.counts.values()) == {0}
    assert report.to_dict() == {"ok": True, "problems": [], "warnings": [],
                                "counts": dict.fromkeys(sorted(TS_RULES), 0)} | {
        "counts": dict(report.counts)}


def test_schema_names_every_missing_or_non_numeric_column() -> None:
    table = _table().drop_columns(["ts"]).append_column("user__ad", pa.array(["a"] * N))
    report = validate_training_set(table, [*FEATURES, "user__nope", "user__ad"])
    assert not report.ok and report.counts["schema"] == 3
    assert "schema: the training set has no 'ts' column" in report.problems
    assert "schema: feature user__nope is not a column of the training set" in report.problems
    assert "schema: feature user__ad has type string, not a number" in report.problems


def test_min_rows_counts_the_shortfall() -> None:
    report = validate_training_set(_table(400), FEATURES)
    assert report.counts["min_rows"] == 600
    assert report.problems == ("min_rows: 400 rows, fewer than the 1,000 required",)


@pytest.mark.parametrize(("labels", "sentence"), [
    (np.zeros(N, np.int8), "label_rate: the label rate is 0 (0 positives in 1,000 rows)"),
    (np.ones(N, np.int8), "label_rate: the label rate is 1 (1,000 positives in 1,000 rows)"),
])
def test_constant_labels_block(labels: np.ndarray, sentence: str) -> None:
    report = validate_training_set(_table(label=pa.array(labels)), FEATURES)
    assert report.counts["label_rate"] == N
    assert len(report.problems) == 1 and report.problems[0].startswith(sentence)


def test_label_values_other_than_0_1_or_null() -> None:
    y = [0, 1, 2, None] + [0, 1] * 498
    report = validate_training_set(_table(label=pa.array(y, pa.int8())), FEATURES)
    assert report.counts["label_values"] == 2 and report.counts["label_rate"] == 0
    assert report.problems == ("label_values: 2 of 1,000 labels are null or not 0/1 (1 null)",)


def test_all_null_and_null_share() -> None:
    clicks = pa.array([None] * N, pa.int64())
    ctr = pa.array([0.5] * 5 + [None] * (N - 5), pa.float64())  # 99.5 % null
    report = validate_training_set(_table(user__clicks_1h=clicks, user__ctr_1h=ctr), FEATURES)
    assert report.counts["all_null"] == 1 and report.counts["null_share"] == 1
    assert "all_null: feature user__clicks_1h is null in all 1,000 rows" in report.problems
    assert ("null_share: feature user__ctr_1h is null in 995 of 1,000 rows (99.50 %), above "
            "the 0.99 allowed") in report.problems
    assert validate_training_set(_table(user__ctr_1h=ctr), FEATURES,
                                 max_null_share=0.996).ok


def test_ranges_come_from_the_definitions() -> None:
    clicks = pa.array([-1, -2] + [1] * (N - 2), pa.int64())
    ctr = pa.array([-0.5] + [1.5] * 3 + [0.5] * (N - 4))
    report = validate_training_set(_table(user__clicks_1h=clicks, user__ctr_1h=ctr), FEATURES)
    assert report.counts["range"] == 3 and report.counts["ratio_above_1"] == 3
    assert ("range: feature user__clicks_1h (a count) has 2 values outside >= 0 (min -2, "
            "max 1)") in report.problems
    assert ("range: feature user__ctr_1h (a ratio of count / count) has 1 values outside "
            ">= 0 (min -0.5, max 1.5)") in report.problems
    assert ("ratio_above_1: ratio feature user__ctr_1h (a ratio of count / count) is above 1 "
            "in 3 rows (max 1.5)") in report.warnings


def test_probability_field_range_and_undefined_features() -> None:
    w = sliding(timedelta(hours=1), timedelta(minutes=1))
    view = FeatureView(name="scores", entity=Entity("user", "user_id"),
                       sources=(Source("impressions", "impression"),),
                       features=(Feature("p_ctr_mean", (w,),
                                         measure=Measure(AggOp.MEAN, "impressions", "p_ctr")),
                                 Feature("bid_sum", (w,),
                                         measure=Measure(AggOp.SUM, "impressions", "bid_cpm"))))
    registry = Registry.build([view])
    table = _table(user__p_ctr_mean_1h=pa.array([1.2] + [0.1] * (N - 1)),
                   user__bid_sum_1h=pa.array([-3.0] * N), raw=pa.array([-1.0] * N))
    report = validate_training_set(table, ["user__p_ctr_mean_1h", "user__bid_sum_1h", "raw"],
                                   registry=registry)
    assert report.counts["range"] == 1  # a SUM of bid_cpm has no range; raw is undefined
    assert ("range: feature user__p_ctr_mean_1h (a mean of the probability p_ctr) has 1 "
            "values outside [0, 1] (min 0.1, max 1.2)") in report.problems
    assert ("range: 1 feature(s) have no definition in the registry, so their ranges were "
            "not checked (e.g. raw)") in report.warnings


def test_non_finite_values_block() -> None:
    ctr = pa.array([math.nan, math.inf] + [0.5] * (N - 2))
    report = validate_training_set(_table(user__ctr_1h=ctr), FEATURES)
    assert report.counts["non_finite"] == 2
    assert "non_finite: feature user__ctr_1h holds 2 NaN or infinite values" in report.problems


def test_outliers_warn_only() -> None:
    # median 2, MAD 1 (values 0..4 evenly): 23 is 21 MAD away, 22 is exactly 20: not beyond
    clicks = pa.array([23, 22] + [int(v) for v in np.arange(N - 2) % 5], pa.int64())
    report = validate_training_set(_table(user__clicks_1h=clicks), FEATURES)
    assert report.ok and report.counts["outliers"] == 1
    assert report.warnings == ("outliers: feature user__clicks_1h has 1 values more than 20 "
                               "MAD from its median 2 (MAD 1, max 23)",)


def test_drift_is_a_warning_with_the_psi() -> None:
    prev = _table()
    same = validate_training_set(_table(), FEATURES, previous=prev)
    assert same.counts["drift"] == 0
    shifted = _table(user__clicks_1h=pa.array(np.arange(N) % 5 + 10, pa.int64()))
    report = validate_training_set(shifted, FEATURES, previous=prev)
    assert report.ok and report.counts["drift"] == 1
    (warning,) = [w for w in report.warnings if w.startswith("drift")]
    # previous: values 0..4, 200 each; decile edges 0, .8, 1, 1.6, 2, 2.4, 3, 3.2, 4 put
    # each value alone in a bin of share 0.2 (5 bins), 5 bins empty, null bin empty;
    # current: every value >= 4, one bin of share 1 (the one that held the 4s). Empty bins
    # on both sides add 0, so only these 7 terms matter:
    p = np.array([1e-4, 0.2, 0.2, 0.2, 0.2, 0.2, 1e-4])
    c = np.array([1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1.0, 1e-4])
    assert warning == ("drift: feature user__clicks_1h drifted from the previous training set: "
                       f"PSI {float(np.sum((c - p) * np.log(c / p))):.3f} >= 0.25")


def test_psi_by_hand() -> None:
    prev = np.arange(100, dtype=np.float64)  # deciles: edges 9.9, 19.8, ...
    assert psi(prev, prev) == 0.0
    cur = np.concatenate([np.arange(50, dtype=np.float64), np.full(50, np.nan)])
    # current: first 5 bins 0.1 each ... bin 4 holds 40..49 (edge 39.6..49.5): 10 values
    got = psi(prev, cur)
    p = np.array([0.1] * 10 + [1e-4])
    edges = np.quantile(prev, np.arange(1, 10) / 10)
    counts = np.bincount(np.searchsorted(edges, np.arange(50), side="right"), minlength=10)
    c = np.maximum(np.append(counts / 100, 0.5), 1e-4)
    assert got == pytest.approx(float(np.sum((c - p) * np.log(c / p))))
    assert got > 1.0


def test_every_problem_at_once() -> None:
    table = _table(300, label=pa.array(np.zeros(300, np.int8)),
                   user__ctr_1h=pa.array([None] * 300, pa.float64()))
    report = validate_training_set(table, [*FEATURES, "gone"])
    assert {p.split(":")[0] for p in report.problems} == {"schema", "min_rows", "label_rate",
                                                          "all_null"}


def _labels(ids: Sequence[str | None], y: Sequence[int | None]) -> pa.Table:
    n = len(ids)
    return pa.table({"impression_id": pa.array(ids, pa.string()),
                     "ts": pa.array([T0 + i for i in range(n)], pa.int64()),
                     "label": pa.array(y, pa.int8())})


def test_validate_labels() -> None:
    ids = [f"i{i}" for i in range(N)]
    y = [i % 2 for i in range(N)]
    assert validate_labels(_labels(ids, y)).ok
    report = validate_labels(_labels(["i0", "i0", *ids[2:]], [None, 3, *y[2:]]), min_rows=2000)
    assert report.counts == {"schema": 0, "min_rows": 1000, "null_ts": 0,
                             "duplicate_impression_id": 1, "label_values": 2, "label_rate": 0}
    assert "duplicate_impression_id: 1 labels repeat an earlier row's impression_id" \
        in report.problems
    missing = validate_labels(_labels(ids, y).drop_columns(["impression_id"]))
    assert missing.problems == ("schema: the labels have no 'impression_id' column",)
    strings = validate_labels(_labels(ids, y).set_column(2, "label", pa.array(["1"] * N)))
    assert strings.problems == ("schema: the label column has type string, not a number",)
