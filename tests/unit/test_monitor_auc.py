"""headrace.monitor.auc against brute force: AUC by counting pairs, labels by scanning
every click, windows closed by the clicks' watermark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from headrace.monitor.auc import LabelJoin, auc_exact, calibration_ratio
from headrace.monitor.windows import HOUR_MS

T0 = 1_767_225_600_000


def _pairs_auc(s: list[float], y: list[int]) -> float:
    pos = [a for a, b in zip(s, y, strict=True) if b]
    neg = [a for a, b in zip(s, y, strict=True) if not b]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_pair_counting_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = [float(v) for v in rng.integers(0, 6, size=80) / 10]  # many ties
    y = [int(v) for v in rng.random(80) < 0.3]
    assert auc_exact(np.asarray(s), np.asarray(y)) == pytest.approx(_pairs_auc(s, y),
                                                                     abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc_exact([0.1, 0.9], [0, 1]) == 1.0
    assert auc_exact([0.9, 0.1], [0, 1]) == 0.0
    assert auc_exact([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(auc_exact([0.1, 0.2], [1, 1]))
    assert math.isnan(auc_exact([], []))
    assert calibration_ratio(3.0, 2) == 1.5
    assert calibration_ratio(0.5, 0) == math.inf and calibration_ratio(0.0, 0) == 1.0


def test_label_join_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    attr = 1_800_000
    imps = [(f"i{k}", T0 + int(rng.integers(0, 2 * HOUR_MS)), "v1",
             float(rng.uniform(0, 0.2))) for k in range(400)]
    clicks = []
    for eid, ts, _, p in imps:
        if rng.random() < 0.3 + p:  # some inside, some too late, some before
            clicks.append((eid, ts + int(rng.choice([0, 1000, attr, attr + 1, -1]))))
    join = LabelJoin(attribution_ms=attr, windows={"1h": HOUR_MS})
    # clicks first for half of them: arrival order must not matter
    for eid, ts in clicks[: len(clicks) // 2]:
        join.click(eid, ts)
    for eid, ts, v, p in imps:
        assert join.impression(eid, ts, v, p)
    for eid, ts in clicks[len(clicks) // 2:]:
        join.click(eid, ts)
    assert not join.impression("x", T0, None, 0.1) and not join.impression("y", T0, "v1", None)
    assert join.close(T0 + HOUR_MS + attr - 1) == []  # the first hour's clicks may come
    first = join.close(T0 + HOUR_MS + attr)
    assert [(w.window, w.start_ms) for w in first] == [("1h", T0)]
    assert join.close(T0 + HOUR_MS + attr) == []  # once
    second = join.close(T0 + 10 * HOUR_MS)
    assert [w.start_ms for w in second] == [T0 + HOUR_MS]
    for w in first + second:
        mine = [(eid, ts, p) for eid, ts, _, p in imps if w.start_ms <= ts < w.start_ms + HOUR_MS]
        y = [int(any(c_eid == eid and ts <= c_ts <= ts + attr for c_eid, c_ts in clicks))
             for eid, ts, _ in mine]
        s = [p for _, _, p in mine]
        assert w.impressions == len(mine) and w.clicks == sum(y)
        assert w.auc == pytest.approx(_pairs_auc(s, y), abs=1e-12)
        assert w.calibration_ratio == pytest.approx(sum(s) / sum(y), rel=1e-12)
    assert join.open_windows == 0
    # an impression of a closed window comes too late
    assert not join.impression("late", T0 + 5, "v1", 0.1)
