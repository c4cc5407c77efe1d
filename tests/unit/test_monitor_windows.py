"""headrace.monitor.windows against a brute-force oracle: histograms counted value by
value with the profile's edges, PSI and KS written out by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from headrace.monitor.profile import NULL, OTHER, ReferenceProfile, build_profile
from headrace.monitor.windows import (
    DAY_MS,
    HOUR_MS,
    PREDICTION,
    DriftAggregator,
    served_prediction,
    window_drift,
    window_start,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
FEATURES = ("a", "b", "c")


@dataclass
class Rec:
    """The fields of a PredictionRecord the aggregation reads."""

    ts: int
    features: Any
    p_ctr: tuple[float, ...] = (0.02, 0.05, 0.01)
    ranks: tuple[int, ...] = (1, 0, 2)
    chosen_rank: int | None = 0
    model_version: str = "v1"
    shadow: bool = False
    error: str | None = None
    country: str | None = "us"
    device_type: str | None = "mobile"
    extra: dict[str, Any] = field(default_factory=dict)


def _profile(seed: int = 0) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    n = 2000
    x = np.column_stack([rng.normal(size=n), rng.exponential(size=n),
                         rng.integers(0, 4, size=n).astype(float)])
    x[rng.random(n) < 0.1, 1] = np.nan
    p = rng.uniform(0, 0.1, size=n)
    ctx = {"country": list(rng.choice(["us", "de", "fr"], size=n)),
           "device_type": list(rng.choice(["mobile", "desktop"], size=n))}
    return build_profile("v1", x, FEATURES, p, ctx, bins=10)


def _oracle_hist(edges: tuple[float, ...], values: list[float]) -> list[int]:
    out = [0] * (len(edges) + 2)
    for v in values:
        if math.isnan(v):
            out[-1] += 1
        else:
            out[sum(1 for e in edges if v >= e)] += 1
    return out


def _oracle_psi(e: list[int], a: list[int]) -> float:
    te, ta = sum(e), sum(a)
    total = 0.0
    for ei, ai in zip(e, a, strict=True):
        es = max(ei / te, 1e-4)
        as_ = max(ai / ta, 1e-4)
        total += (as_ - es) * math.log(as_ / es)
    return total


def _oracle_ks(e: list[int], a: list[int]) -> float:
    ce = ca = 0.0
    d = 0.0
    for ei, ai in zip(e, a, strict=True):
        ce += ei / sum(e)
        ca += ai / sum(a)
        d = max(d, abs(ce - ca))
    return d


def test_window_bounds_are_aligned_and_half_open() -> None:
    assert window_start(T0, HOUR_MS) == T0
    assert window_start(T0 + HOUR_MS - 1, HOUR_MS) == T0
    assert window_start(T0 + HOUR_MS, HOUR_MS) == T0 + HOUR_MS
    assert window_start(T0 + 5 * HOUR_MS + 7, DAY_MS) == T0
    assert window_start(T0 - 1, DAY_MS) == T0 - DAY_MS


def test_served_prediction_is_the_chosen_rank() -> None:
    assert served_prediction(Rec(T0, [0, 0, 0])) == 0.05  # type: ignore[arg-type]
    assert served_prediction(Rec(T0, [0, 0, 0], chosen_rank=2)) == 0.01  # type: ignore[arg-type]
    assert served_prediction(Rec(T0, [0, 0, 0], ranks=(1, 2, 3))) is None  # type: ignore[arg-type]


def test_histograms_and_drift_equal_the_oracle() -> None:
    prof = _profile()
    rng = np.random.default_rng(1)
    recs: list[Rec] = []
    for i in range(600):
        ts = T0 + int(rng.integers(0, 2 * HOUR_MS))
        f = [float(rng.normal(0.5)), float(rng.exponential(2.0)), float(rng.integers(0, 5))]
        if i % 7 == 0:
            f[1] = math.nan
        recs.append(Rec(ts, f, p_ctr=(float(rng.uniform(0, 0.2)), 0.3), ranks=(0, 1),
                        country=str(rng.choice(["us", "de", "jp"])) if i % 11 else None))
    # what must not count
    recs += [Rec(T0, [1.0, 1.0, 1.0], shadow=True), Rec(T0, [1.0, 1.0, 1.0], error="x"),
             Rec(T0, [1.0, 1.0]), Rec(T0, [1.0, 1.0, 1.0], model_version="v9"),
             Rec(T0, ())]
    agg = DriftAggregator(lambda v: prof if v == "v1" else None)
    out = agg.add(recs[:300])  # type: ignore[arg-type]
    out += agg.add(recs[300:])  # type: ignore[arg-type]
    assert out == {"ok": 600, "shadow": 1, "error": 1, "mismatched": 2, "no_profile": 1}
    assert set(agg.aggregates) == {("v1", "1h", T0), ("v1", "1h", T0 + HOUR_MS),
                                   ("v1", "24h", T0)}
    for (_, name, start), a in agg.aggregates.items():
        length = HOUR_MS if name == "1h" else DAY_MS
        mine = [r for r in recs[:600] if start <= r.ts < start + length]
        assert a.rows == len(mine)
        drifts = {d.feature: d for d in window_drift(a, prof)}
        for j, fname in enumerate(FEATURES):
            p = prof.features[fname]
            want = _oracle_hist(p.edges, [r.features[j] for r in mine])
            assert a.features[j].tolist() == want
            d = drifts[fname]
            assert d.psi == pytest.approx(_oracle_psi(list(p.counts), want), abs=1e-12)
            assert d.ks == pytest.approx(_oracle_ks(list(p.counts[:-1]), want[:-1]),
                                         abs=1e-12)
            assert d.null_share == want[-1] / len(mine)
            assert 0 <= d.ks_pvalue <= 1
        want_p = _oracle_hist(prof.prediction.edges, [r.p_ctr[0] for r in mine])
        assert a.prediction.tolist() == want_p
        assert drifts[PREDICTION].psi == pytest.approx(
            _oracle_psi(list(prof.prediction.counts), want_p), abs=1e-12)
        cp = prof.context["country"]
        want_c = {k: 0 for k in cp.counts}
        for r in mine:
            key = NULL if r.country is None else r.country if r.country in cp.counts else OTHER
            want_c[key] += 1
        assert dict(a.context["country"]) == want_c
        d = drifts["context:country"]
        assert d.psi == pytest.approx(_oracle_psi(list(cp.counts.values()),
                                                  list(want_c.values())), abs=1e-12)
        assert math.isnan(d.ks) and d.null_share == want_c[NULL] / len(mine)


def test_span_counts_one_range_window_and_skips_outside() -> None:
    prof = _profile()
    recs = [Rec(T0 + i * 60_000, [0.1 * i, 1.0, 2.0]) for i in range(100)]
    agg = DriftAggregator(lambda v: prof, span=(T0 + 10 * 60_000, T0 + 20 * 60_000))
    assert agg.add(recs) == {"ok": 10}  # type: ignore[arg-type]
    (key, a), = agg.aggregates.items()
    assert key == ("v1", "range", T0 + 10 * 60_000) and a.rows == 10
    assert a.features[0].tolist() == _oracle_hist(prof.features["a"].edges,
                                                  [0.1 * i for i in range(10, 20)])


def test_same_distribution_has_small_psi_and_shift_is_large() -> None:
    prof = _profile()
    rng = np.random.default_rng(2)
    same = [Rec(T0 + i, [float(rng.normal()), float(rng.exponential()), 1.0])
            for i in range(5000)]
    shifted = [Rec(T0 + HOUR_MS + i, [float(rng.normal(2.0)), float(rng.exponential()), 1.0])
               for i in range(5000)]
    agg = DriftAggregator(lambda v: prof, windows={"1h": HOUR_MS})
    agg.add(same + shifted)  # type: ignore[arg-type]
    psi_same = window_drift(agg.aggregates[("v1", "1h", T0)], prof)[0].psi
    psi_shift = window_drift(agg.aggregates[("v1", "1h", T0 + HOUR_MS)], prof)[0].psi
    assert psi_same < 0.02 and psi_shift > 1.0
    assert agg.evict_before(T0 + HOUR_MS) == 1
    assert list(agg.aggregates) == [("v1", "1h", T0 + HOUR_MS)]
