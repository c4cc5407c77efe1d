"""The historical-CTR lookup table: smoothed rates computed by hand, back-off for unseen
cells, the 30-day window and the missing-column fallback."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from headrace.core.errors import InputError
from offline.lookup_table import (
    TIME_BUCKET,
    evaluate_lookup_table,
    fit_lookup_table,
    time_bucket,
)

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HOUR, DAY = 3_600_000, 86_400_000
CUTOFF = START + 40 * DAY
AT_01H, AT_13H = START + 35 * DAY + 1 * HOUR, START + 35 * DAY + 13 * HOUR  # buckets 0, 2


def rows(items: list[tuple[str | None, int, str, int]]) -> pa.Table:
    """(device_type, ts, publisher_id, label) rows; no creative_type/placement columns."""
    return pa.table({"device_type": [d for d, _, _, _ in items],
                     "ts": pa.array([t for _, t, _, _ in items], pa.timestamp("ms", tz="UTC")),
                     "publisher_id": [p for _, _, p, _ in items],
                     "label": pa.array([y for _, _, _, y in items], pa.int8())})


HAND = rows([("ios", AT_01H, "p1", 1), ("ios", AT_01H, "p1", 1), ("ios", AT_01H, "p1", 0),
             ("ios", AT_01H, "p1", 0), ("ios", AT_01H, "p2", 1), ("ios", AT_13H, "p1", 0),
             ("ios", AT_13H, "p1", 0), ("ios", AT_13H, "p1", 0), ("android", AT_01H, "p1", 0),
             ("android", AT_01H, "p1", 1)])


def test_time_buckets_are_six_hours_utc() -> None:
    hours = np.array([0, 5, 6, 11, 12, 17, 18, 23, 24])
    assert time_bucket(START + hours * HOUR + 59_999).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]


def test_smoothed_rates_by_hand() -> None:
    # m = 2. Global: 4 clicks / 10 = 0.4.
    # device:  ios 3/8 -> (3 + 2 * .4) / 10 = .38;  android 1/2 -> (1 + .8) / 4 = .45
    # + bucket: ios/0 3/5 -> (3 + .76) / 7 = 3.76/7;  ios/2 0/3 -> (0 + .76) / 5 = .152;
    #           android/0 1/2 -> (1 + .9) / 4 = .475
    # + publisher: ios/0/p1 2/4 -> (2 + 2 * 3.76/7) / 6;  ios/0/p2 1/1 -> (1 + 2 * 3.76/7) / 3
    #              ios/2/p1 0/3 -> (0 + .304) / 5 = .0608;  android/0/p1 -> (1 + .95) / 4
    table = fit_lookup_table(HAND, cutoff_ms=CUTOFF, m=2.0)
    assert table.keys == ("device_type", TIME_BUCKET, "publisher_id")  # fallback: no
    assert table.global_rate == pytest.approx(0.4)  # creative_type / placement columns
    assert table.levels[0] == pytest.approx({("ios",): 0.38, ("android",): 0.45})
    assert table.levels[1] == pytest.approx({("ios", 0): 3.76 / 7, ("ios", 2): 0.152,
                                             ("android", 0): 0.475})
    assert table.levels[2] == pytest.approx({
        ("ios", 0, "p1"): (2 + 2 * 3.76 / 7) / 6, ("ios", 0, "p2"): (1 + 2 * 3.76 / 7) / 3,
        ("ios", 2, "p1"): 0.0608, ("android", 0, "p1"): 1.95 / 4})
    assert table.cells == 4 and table.rows == 10


def test_unseen_cells_back_off_to_their_parent() -> None:
    table = fit_lookup_table(HAND, cutoff_ms=CUTOFF, m=2.0)
    probe = rows([("ios", AT_01H, "p1", 0),       # a fitted cell
                  ("ios", AT_13H, "p9", 0),       # unseen publisher -> ios/bucket 2
                  ("android", AT_13H, "p1", 0),   # unseen bucket -> android
                  ("desktop", AT_01H, "p1", 0),   # unseen device -> global
                  (None, AT_01H, "p1", 0)])       # null is a category of its own -> global
    assert table.predict(probe) == pytest.approx(
        [(2 + 2 * 3.76 / 7) / 6, 0.152, 0.45, 0.4, 0.4])
    raw = fit_lookup_table(HAND, cutoff_ms=CUTOFF, m=0.0)  # m = 0: the cells' own rates
    assert raw.predict(probe)[:3] == pytest.approx([0.5, 0.0, 0.5])
    with pytest.raises(InputError, match="publisher_id"):
        table.predict(probe.drop_columns(["publisher_id"]))


def test_the_30_day_window_is_honoured() -> None:
    edge = CUTOFF - 30 * DAY
    t = rows([("ios", edge - 1, "p1", 1),    # 1 ms too old: out
              ("ios", edge, "p1", 0),        # the window's first instant: in
              ("ios", CUTOFF - 1, "p1", 1),  # in
              ("ios", CUTOFF, "p1", 1),      # the cut-off itself: out
              ("ios", edge + 5, "p1", 1)])   # in
    table = fit_lookup_table(t, cutoff_ms=CUTOFF, m=20.0)
    assert table.rows == 3 and table.global_rate == pytest.approx(2 / 3)
    short = fit_lookup_table(t, cutoff_ms=CUTOFF, window_days=1, m=20.0)
    assert short.rows == 1 and short.global_rate == 1.0
    with pytest.raises(InputError, match="no row in the 30 days"):
        fit_lookup_table(t, cutoff_ms=edge - 1)


def test_evaluate_scores_the_later_rows_once() -> None:
    later = rows([("ios", CUTOFF + HOUR, "p1", 1), ("ios", CUTOFF + 13 * HOUR, "p1", 0),
                  ("android", CUTOFF + HOUR, "p1", 0)])
    out = evaluate_lookup_table(HAND, later, cutoff_ms=CUTOFF, m=2.0)
    p = [(2 + 2 * 3.76 / 7) / 6, 0.0608, 1.95 / 4]  # bucket 0, bucket 2, android/0/p1
    want_loss = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(1 - p[2])) / 3
    assert out["logloss"] == pytest.approx(want_loss)
    assert out["auc"] == 1.0  # the click has the highest rate
    assert (out["cells"], out["rows"], out["rows_fit"], out["m"]) == (4, 3, 10, 2.0)
