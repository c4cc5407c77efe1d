"""Training, evaluation, gates, the model registry and the cold-start model (no network).

Metrics are checked against brute-force oracles (pairwise AUC, a per-row log-loss loop,
sorting by hand); training runs on synthetic training sets with a known signal.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_defs.registry import load_registry
from headrace import cli
from headrace.core.errors import InputError
from headrace.model.artifact import (
    CHAMPION_FILE,
    ModelLoadError,
    champion_version,
    list_versions,
    load_champion,
    set_champion,
    version_key,
    write_artifact,
)
from headrace.model.booster import CategoryCodes
from headrace.model.coldstart import context_time, load_coldstart
from offline.evaluation import (
    CalibrationBin,
    Metrics,
    auc,
    baseline_raw,
    calibration_table,
    log_loss,
    time_split,
)
from offline.models import ChampionRef, GatePolicy, decide
from offline.train import train

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z, a Monday
REG = load_registry()
SMALL_GRID = ({"learning_rate": 0.1, "num_leaves": 15, "min_data_in_leaf": 100},
              {"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 200})


def clock_at(text: str) -> Any:
    when = datetime.fromisoformat(text)
    return lambda: when


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def synthetic_set(n: int = 60_000, seed: int = 0, *, days: int = 10, intercept: float = -1.3,
                  late_factor: float = 1.0, late_share: float = 0.2,
                  with_ad: bool = True) -> pa.Table:
    """A training set like the builder's: label-row columns, features, masks.

    The click probability is ``sigmoid(intercept + user + ad + device + hour)``; the
    served features are noisy per-row estimates of the user's and the ad's own rates
    (``user__ctr_24h`` null when the user had no impressions). ``late_factor`` multiplies
    the probability of the last ``late_share`` of rows (drift: with 0.1, only the later
    half of the validation rows, which neither the model nor its calibration map saw). ``days`` is a
    multiple of 5 so the held-out last 20 % covers whole days (the hour effect averages out).
    """
    rng = np.random.default_rng(seed)
    ts = np.sort(START + rng.integers(0, days * 86_400_000, n))
    users, ads = rng.integers(0, 3000, n), rng.integers(0, 400, n)
    u_eff, a_eff = rng.normal(0, 0.9, 3000)[users], rng.normal(0, 0.7, 400)[ads]
    device = rng.choice(np.array(["ios", "android", "desktop"]), n, p=[0.4, 0.4, 0.2])
    d_eff = np.select([device == "ios", device == "android"], [0.5, 0.0], -0.6)
    hour = (ts // 3_600_000) % 24
    p = sigmoid(intercept + u_eff + a_eff + d_eff + 0.3 * np.sin(hour / 24 * 2 * np.pi))
    late = np.arange(n) >= int((1.0 - late_share) * n)
    p = np.clip(np.where(late, p * late_factor, p), 0.0, 1.0)
    y = (rng.random(n) < p).astype(np.int8)
    imps = rng.poisson(15, n)
    u_ctr = rng.binomial(imps, sigmoid(intercept + u_eff)) / np.maximum(imps, 1)
    ad_imps = rng.poisson(150, n)
    cols: dict[str, Any] = {
        "impression_id": [f"i{i}" for i in range(n)],
        "user_id": [f"u{u}" for u in users], "ad_id": [f"a{a}" for a in ads],
        "campaign_id": [f"c{a % 40}" for a in ads], "publisher_id": [f"p{u % 60}" for u in users],
        "placement": pa.repeat("feed", n), "creative_type": pa.repeat("banner", n),
        "device_type": device, "country": pa.repeat("us", n), "bid_cpm": np.ones(n),
        "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")), "label": y,
        "user__impressions_24h": imps,
        "user__ctr_24h": pa.array(u_ctr, mask=imps == 0),
        "user_activity__is_default": imps == 0,
        "unrelated_numeric": rng.normal(size=n),
    }
    if with_ad:
        cols["ad__impressions_1h"] = ad_imps
        cols["ad__ctr_1h"] = rng.binomial(ad_imps, sigmoid(intercept + a_eff)) / ad_imps
        cols["ad_activity__is_default"] = np.zeros(n, bool)
    return pa.table(cols)


# -- metrics against brute force -----------------------------------------------------------


def pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    p = np.round(rng.random(n), int(rng.integers(0, 3)))  # coarse rounding: many ties
    assert auc(y, p) == pytest.approx(pairwise_auc(y, p), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.2, 0.9])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))


def test_log_loss_equals_row_loop_and_clips() -> None:
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 200), rng.random(200)
    direct = -sum(math.log(q) if t else math.log(1 - q) for t, q in zip(y, p, strict=True)) / 200
    assert log_loss(y, p) == pytest.approx(direct, rel=1e-12)
    worst = log_loss(np.array([1, 0]), np.array([0.0, 1.0]))
    assert worst == pytest.approx(-math.log(1e-15), rel=1e-4)


def test_calibration_table_is_deciles_by_prediction() -> None:
    rng = np.random.default_rng(4)
    p = rng.random(1003)
    y = (rng.random(1003) < p).astype(int)
    bins = calibration_table(y, p)
    assert [b.count for b in bins] == [101, 101, 101] + [100] * 7
    pairs = sorted(zip(p, y, strict=True), key=lambda t: t[0])
    at = 0
    for b in bins:
        chunk = pairs[at:at + b.count]
        at += b.count
        assert b.positives == sum(t for _, t in chunk)
        assert b.pred_mean == pytest.approx(sum(q for q, _ in chunk) / b.count)
        assert (b.pred_min, b.pred_max) == (chunk[0][0], chunk[-1][0])
        assert b.actual_rate == pytest.approx(b.positives / b.count)
    assert len(calibration_table(np.array([1, 0, 1]), np.array([0.1, 0.2, 0.3]))) == 3


def test_time_split_is_strictly_ordered_and_keeps_ties_together() -> None:
    rng = np.random.default_rng(5)
    ts = START + rng.integers(0, 500, 5000) * 1000  # shuffled, many equal timestamps
    split = time_split(ts)
    assert ts[split.train].max() < split.cutoff_ms <= ts[split.valid].min()
    assert sorted(np.r_[split.train, split.valid].tolist()) == list(range(5000))
    assert 0.19 < split.valid.size / 5000 < 0.23
    assert (np.diff(ts[split.train]) >= 0).all() and (np.diff(ts[split.valid]) >= 0).all()
    assert (ts[ts == split.cutoff_ms].size ==
            np.isin(split.valid, np.flatnonzero(ts == split.cutoff_ms)).sum())
    with pytest.raises(InputError, match="share the first timestamp"):
        time_split(np.full(10, START))
    with pytest.raises(InputError, match="need at least 2"):
        time_split(np.array([START]))


def test_category_codes_frequency_order_and_unseen_is_missing() -> None:
    t = pa.table({"c": ["b", "a", "b", None, "c", "b", "a"]})
    codes = CategoryCodes.fit(t, ["c"], max_categories=2)
    assert codes.categories["c"] == ("b", "a")
    out = codes.encode("c", ["a", "b", "c", None, "zzz"])
    assert out[:2].tolist() == [1.0, 0.0] and np.isnan(out[2:]).all()
    assert CategoryCodes.from_json(json.loads(json.dumps(codes.to_json()))) == codes


def test_baseline_raw_learns_a_categorical_signal_on_later_rows() -> None:
    rng = np.random.default_rng(6)
    n = 8000
    app = rng.choice(np.array(["1", "2", "3", "4"]), n)
    y = (rng.random(n) < np.select([app == "1", app == "2"], [0.6, 0.3], 0.05)).astype(np.int8)
    table = pa.table({"impression_id": [f"i{i}" for i in range(n)],
                      "ts": pa.array(START + np.arange(n) * 1000, pa.timestamp("ms", tz="UTC")),
                      "label": y, "app": app, "noise": rng.choice(np.array(["x", "y"]), n)})
    res = baseline_raw(table.slice(0, 6000), table.slice(6000))
    assert res["features"] == ["app", "noise"]
    assert res["auc_raw"] > 0.8 and 0 < res["logloss_raw"] < 0.6
    assert (res["rows_train"], res["rows_test"]) == (6000, 2000)


# -- gates ------------------------------------------------------------------------------------


def metrics(auc_value: float, bins: list[tuple[float, float, int, int]] | None = None) -> Metrics:
    """Metrics with calibration bins given as (pred_mean, actual_rate, rows, positives)."""
    cal = tuple(CalibrationBin(i, n, k, pm, pm, pm, ar)
                for i, (pm, ar, n, k) in enumerate(bins or [(0.1, 0.1, 5000, 500)]))
    return Metrics(50_000, 5000, 0.1, auc_value, 0.3, cal)


def test_gate_accepts_a_good_first_model() -> None:
    d = decide(metrics(0.7, [(0.10, 0.105, 5000, 525), (0.2, 0.19, 5000, 950)]), None)
    assert d.promote
    assert d.reasons[0].startswith("AUC 0.7000 >= floor") and "no champion yet" in d.reasons


@pytest.mark.parametrize(("auc_value", "bins", "champion", "why"), [
    (0.59, None, None, "below the floor"),
    (0.7, [(0.10, 0.10, 5000, 500), (0.24, 0.20, 5000, 1000)], None,
     "bin 1 predicts 0.2400 but observed 0.2000 (20% off)"),
    (0.704, None, ChampionRef("2024-01-01-00", 0.70, "same validation rows"), "< champion"),
])
def test_gate_rejects(auc_value: float, bins: Any, champion: ChampionRef | None,
                      why: str) -> None:
    d = decide(metrics(auc_value, bins), champion)
    assert not d.promote
    assert any(why in r for r in d.reasons), d.reasons


def test_gate_champion_rules() -> None:
    champ = ChampionRef("2024-01-01-00", 0.70, "stored metadata")
    assert decide(metrics(0.706), champ).promote  # >= 0.70 + 0.005
    assert decide(metrics(0.65), ChampionRef("v", 0.55, "stored metadata")).promote
    assert decide(metrics(0.65), ChampionRef("v", math.nan, "unreadable: x")).promote
    assert not decide(metrics(0.72), champ, GatePolicy(min_auc_gain=0.05)).promote


def test_gate_log_loss_no_worse_than_the_champion_on_the_same_rows() -> None:
    # metrics() has log loss 0.3; AUC 0.72 clears the champion's 0.70 + 0.005
    worse = decide(metrics(0.72), ChampionRef("v1", 0.70, "same validation rows", 0.29))
    assert not worse.promote
    assert "log loss 0.30000 > champion v1 log loss 0.29000" in worse.reasons
    better = decide(metrics(0.72), ChampionRef("v1", 0.70, "same validation rows", 0.31))
    assert better.promote
    assert "log loss 0.30000 <= champion v1 log loss 0.31000" in better.reasons
    assert decide(metrics(0.72), ChampionRef("v1", 0.70, "same validation rows", 0.3)).promote
    tolerant = GatePolicy(max_logloss_increase=0.02)
    assert decide(metrics(0.72), ChampionRef("v1", 0.70, "same validation rows", 0.29),
                  tolerant).promote
    stored = decide(metrics(0.72), ChampionRef("v1", 0.70, "stored metadata"))
    assert stored.promote
    assert any(r.startswith("log loss not compared with champion v1") for r in stored.reasons)


def test_gate_only_judges_bins_with_enough_positives() -> None:
    few = [(0.02, 0.01, 5000, 50), (0.5, 0.5, 300, 150)]  # 100 % off, but only 50 positives
    d = decide(metrics(0.7, few), None)
    assert d.promote and "calibration not checked" in d.reasons[1]
    assert not decide(metrics(0.7, few), None, GatePolicy(min_bin_positives=5)).promote
    small = [(0.5, 0.3, 99, 30)]  # fewer rows than min_bin_rows
    assert decide(metrics(0.7, small), None, GatePolicy(min_bin_positives=5)).promote


# -- registry ---------------------------------------------------------------------------------


def fill_ok(folder: Path, version: str) -> None:
    (folder / "metadata.json").write_text(json.dumps({"version": version}))


def test_versions_get_suffixes_and_sort_numerically(tmp_path: Path) -> None:
    now = datetime(2024, 5, 1, 15, 59, tzinfo=UTC).astimezone()  # any zone: named in UTC
    names = [write_artifact(tmp_path, now, fill_ok)[0] for _ in range(3)]
    assert names == ["2024-05-01-15", "2024-05-01-15-2", "2024-05-01-15-3"]
    assert json.loads((tmp_path / names[1] / "metadata.json").read_text())["version"] == names[1]
    assert list_versions(tmp_path) == names
    assert sorted(["2024-05-01-15-10", "2024-05-01-15-9", "2024-05-01-15", "2024-04-30-23"],
                  key=version_key) == ["2024-04-30-23", "2024-05-01-15", "2024-05-01-15-9",
                                       "2024-05-01-15-10"]
    with pytest.raises(ValueError, match="aware"):
        write_artifact(tmp_path, datetime(2024, 5, 1), fill_ok)  # noqa: DTZ001


def test_failed_write_leaves_nothing_and_frees_the_version(tmp_path: Path) -> None:
    now = datetime(2024, 5, 1, 15, tzinfo=UTC)

    def broken(folder: Path, version: str) -> None:
        (folder / "model.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path, now, broken)
    assert list(tmp_path.iterdir()) == []
    assert write_artifact(tmp_path, now, fill_ok)[0] == "2024-05-01-15"


def test_champion_pointer_is_replaced_atomically(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert champion_version(tmp_path) is None and load_champion(tmp_path) is None
    now = datetime(2024, 5, 1, 15, tzinfo=UTC)
    v1, _ = write_artifact(tmp_path, now, fill_ok)
    v2, _ = write_artifact(tmp_path, now, fill_ok)
    set_champion(tmp_path, v1)
    assert (tmp_path / CHAMPION_FILE).read_text() == f"{v1}\n"

    def crash(src: Any, dst: Any) -> None:
        raise OSError("crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        set_champion(tmp_path, v2)
    monkeypatch.undo()
    assert champion_version(tmp_path) == v1  # the old pointer, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHAMPION_FILE, v1, v2])
    set_champion(tmp_path, v2)
    assert champion_version(tmp_path) == v2
    with pytest.raises(ModelLoadError, match="incomplete"):
        set_champion(tmp_path, "2099-01-01-00")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_champion(tmp_path)  # v2 has metadata but no model.txt


# -- training end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, pa.Table]:
    out = tmp_path_factory.mktemp("models")
    table = synthetic_set()
    result = train(table, out, clock=clock_at("2024-02-01T10:30:00+00:00"), grid=SMALL_GRID,
                   registry=REG)
    return out, result, table


@pytest.mark.slow
def test_train_writes_a_promoted_versioned_artifact(trained: tuple[Path, Any, pa.Table]) -> None:
    out, result, table = trained
    assert result.version == "2024-02-01-10" and result.decision.promote, result.decision
    folder = out / result.version
    for name in ("model.txt", "metadata.json", "calibration.png", "importance.png",
                 "coldstart/model.txt", "coldstart/metadata.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "metadata.json").read_text())
    served = load_registry().feature_names()
    assert meta["features"] == [f for f in served if f in table.column_names]
    assert meta["features"] == ["user__impressions_24h", "user__ctr_24h", "ad__impressions_1h",
                                "ad__ctr_1h"]
    assert meta["data"]["train"]["max_ts_ms"] < meta["data"]["valid"]["min_ts_ms"]
    assert meta["data"]["valid"]["rows"] == 12_000
    assert 0.65 < meta["metrics"]["auc"] == pytest.approx(result.metrics.auc)
    # The metrics describe the later half of the validation rows by time (the earlier half
    # fitted the calibration map): the rows at or after the evaluation cut-off.
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    eval_from = meta["metrics_rows"]["min_ts_ms"]
    assert ts[47_999] < meta["data"]["valid"]["min_ts_ms"] <= ts[48_000]
    n_eval = int((ts >= eval_from).sum())
    assert n_eval == 6000 and ts[54_000] == eval_from > ts[53_999]  # no tie at the cut
    assert len(meta["metrics"]["calibration"]) == 10
    assert sum(b["count"] for b in meta["metrics"]["calibration"]) == n_eval
    assert meta["metrics"]["rows"] == meta["metrics_uncalibrated"]["rows"] == n_eval
    cal = meta["calibration_map"]
    assert cal["chosen"] in ("none", "platt", "isotonic")
    assert (folder / "calibration.json").is_file() == (cal["chosen"] != "none")
    assert cal["logloss_after"] <= cal["logloss_before"] == pytest.approx(
        meta["metrics_uncalibrated"]["logloss"])
    assert meta["metrics"]["logloss"] == pytest.approx(cal["logloss_after"])
    lookup = meta["baselines"]["lookup_table"]
    assert lookup["rows"] == n_eval and lookup["rows_fit"] == 48_000  # 10 days < 30 days
    assert 0.5 < lookup["auc"] < meta["metrics"]["auc"]
    assert next(iter(meta["importance_gain"])) == "user__ctr_24h"
    assert len(meta["search"]["results"]) == len(SMALL_GRID)
    assert meta["gate"]["promote"] and meta["gate"]["reasons"] == list(result.decision.reasons)
    assert champion_version(out) == result.version
    # The stored AUC is what an independent recomputation from the saved model gives.
    loaded = load_champion(out)
    assert loaded is not None and loaded.features == tuple(meta["features"])
    valid = table.filter(pa.array(ts >= eval_from))
    x = loaded.matrix(valid.select(list(loaded.features)).to_pylist())
    y = valid.column("label").to_numpy()
    p = loaded.predict(x)  # calibrated when the version has a map
    assert pairwise_auc_fast(y, p) == pytest.approx(meta["metrics"]["auc"])
    direct = -np.mean(np.where(y == 1, np.log(p), np.log1p(-p)))
    assert direct == pytest.approx(meta["metrics"]["logloss"], rel=1e-9)
    # The drift monitor's reference profile: the training rows (before the validation
    # cut-off), counted by hand on the stored edges, and the scores the model serves.
    profile = json.loads((folder / "reference_profile.json").read_text())
    assert profile["version"] == result.version and profile["rows"] == 48_000
    train_rows = table.filter(pa.array(ts < meta["data"]["valid"]["min_ts_ms"]))
    by_name = {f["name"]: f for f in profile["features"]}
    assert list(by_name) == meta["features"]
    for name in meta["features"]:
        stored = by_name[name]
        values = train_rows.column(name).cast(pa.float64()).to_pylist()
        edges = stored["edges"]
        want = [0] * (len(edges) + 2)
        for v in values:
            if v is None or v != v:
                want[-1] += 1
            else:
                want[sum(1 for e in edges if v >= e)] += 1
        assert stored["counts"] == want, name
    served = loaded.predict(loaded.matrix(train_rows.select(list(loaded.features)).to_pylist()))
    assert sum(profile["prediction"]["counts"]) == 48_000
    assert profile["prediction"]["edges"] == pytest.approx(
        list(np.unique(np.quantile(served, np.arange(1, 10) / 10))), rel=1e-9)
    context = {c["name"]: c["counts"] for c in profile["context"]}
    assert set(context) == {"country", "device_type", "placement", "creative_type",
                            "publisher_id"} & set(table.column_names)
    devices = train_rows.column("device_type").to_pylist()
    assert context["device_type"]["ios"] == devices.count("ios")


def pairwise_auc_fast(y: np.ndarray, p: np.ndarray) -> float:
    """Pairwise AUC by sorting negatives (an oracle independent of the rank code)."""
    neg = np.sort(p[y == 0])
    pos = p[y == 1]
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * equal).sum() / (pos.size * neg.size))


@pytest.mark.slow
def test_coldstart_model_trains_and_predicts_context(trained: tuple[Path, Any, pa.Table]) -> None:
    out, result, _ = trained
    assert result.coldstart is not None and result.coldstart.auc > 0.55
    cold = load_champion(out).coldstart  # type: ignore[union-attr]
    assert cold is not None
    rows = [{"ts": START + 13 * 3_600_000, "device_type": d, "placement": "feed",
             "creative_type": "banner", "country": "us", "publisher_id": "p1"}
            for d in ("ios", "android", "desktop", "never-seen")]
    rows.append({"device_type": "ios"})  # no ts, most context missing
    p = cold.predict_context(rows)
    assert p.shape == (5,) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    assert p[0] > p[1] > p[2]  # the device effect the data was generated with
    again = load_coldstart(out / result.version / "coldstart").predict_context(rows)
    assert np.array_equal(p, again)
    assert cold.predict_context([]).shape == (0,)
    hour, dow = context_time(np.array([START, START + 30 * 3_600_000, START - 1]))
    assert hour.tolist() == [0, 6, 23] and dow.tolist() == [0, 1, 6]  # Mon 00h, Tue 06h, Sun


@pytest.mark.slow
def test_same_model_again_is_rejected_and_a_better_one_promoted(tmp_path: Path) -> None:
    weak = synthetic_set(40_000, seed=1, with_ad=False)
    clock = clock_at("2024-03-01T08:00:00+00:00")
    first = train(weak, tmp_path, clock=clock, grid=SMALL_GRID[:1], registry=REG)
    assert first.decision.promote
    again = train(weak, tmp_path, clock=clock, grid=SMALL_GRID[:1], registry=REG)
    assert again.version == "2024-03-01-08-2" and not again.decision.promote
    assert any("same validation rows" in r and "<" in r for r in again.decision.reasons)
    assert champion_version(tmp_path) == first.version
    strong = synthetic_set(40_000, seed=1, with_ad=True)  # same rows plus the ad features
    better = train(strong, tmp_path, clock=clock, grid=SMALL_GRID[:1], registry=REG)
    assert better.metrics.auc > first.metrics.auc + 0.005
    assert better.decision.promote and champion_version(tmp_path) == better.version
    assert better.decision.champion is not None
    assert better.decision.champion.auc == pytest.approx(first.metrics.auc)


@pytest.mark.slow
def test_drifted_validation_fails_calibration_and_is_never_champion(tmp_path: Path) -> None:
    drifted = synthetic_set(60_000, seed=2, late_factor=1.5, late_share=0.1)
    result = train(drifted, tmp_path, clock=clock_at("2024-03-01T08:00:00+00:00"),
                   grid=SMALL_GRID[:1], registry=REG)
    assert result.metrics.auc > 0.6
    assert not result.decision.promote
    assert any(r.startswith("calibration outside ±10%") for r in result.decision.reasons)
    assert champion_version(tmp_path) is None
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["gate"]["promote"] is False


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.drop_columns(["user__impressions_24h", "user__ctr_24h", "ad__impressions_1h",
                               "ad__ctr_1h"]), "none of the 20 served feature columns"),
    (lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                            pa.array(np.full(t.num_rows, 2, np.int8))), "other than 0 and 1"),
    (lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                            pa.array(np.r_[np.arange(1600) % 2, np.zeros(400)].astype(np.int8))),
     "validation (last 20% by time) part has only negative"),
    (lambda t: t.set_column(t.schema.get_field_index("user__ctr_24h"), "user__ctr_24h",
                            pa.array(["x"] * t.num_rows)), "has type string"),
])
def test_bad_training_sets_raise_input_error(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        train(change(synthetic_set(2000)), tmp_path, grid=SMALL_GRID[:1], registry=REG)
    assert not any(tmp_path.iterdir())


# -- the command ------------------------------------------------------------------------------


@pytest.fixture
def with_train_command(monkeypatch: pytest.MonkeyPatch) -> None:
    if "headrace.commands.train" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES",
                            (*cli.COMMAND_MODULES, "headrace.commands.train"))


@pytest.mark.slow
@pytest.mark.usefixtures("with_train_command")
def test_train_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ts.parquet"
    pq.write_table(synthetic_set(20_000, seed=3), path)
    out = tmp_path / "models"
    assert cli.main(["train", "--training-set", str(path), "--out", str(out), "--json",
                     "--candidates", "8"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "candidate 1/" not in captured.err  # no progress lines in --json mode
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-\d{2}", summary["version"])
    assert summary["rows"] == 20_000 and summary["features"] == 4
    assert summary["promoted"] == (champion_version(out) == summary["version"])
    assert len(json.loads((out / summary["version"] / "metadata.json").read_text())
               ["search"]["results"]) == 8
    assert summary["candidates_ran"] == 8 and summary["search_stopped"] == "all"
    for key in ("auc_lookup_table", "logloss_lookup_table", "auc_uncalibrated"):
        assert 0 < summary[key] < 1, key


@pytest.mark.slow
@pytest.mark.usefixtures("with_train_command")
def test_train_command_budget_and_progress(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ts.parquet"
    pq.write_table(synthetic_set(5000, seed=3), path)
    argv = ["train", "--training-set", str(path), "--out", str(tmp_path / "models"),
            "--candidates", "3", "--search-budget", "0s"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "search: 1 of 3 candidates ran (stopped: budget)" in captured.out
    assert captured.err.count("[train] candidate ") == 1


@pytest.mark.usefixtures("with_train_command")
@pytest.mark.parametrize(("argv", "message"), [
    (["--training-set", "{tmp}/missing.parquet"], "cannot read the training set"),
    (["--training-set", "{tmp}/notparquet.parquet"], "cannot read the training set"),
    (["--training-set", "{tmp}/nofeatures.parquet"], "none of the 20 served feature columns"),
    (["--training-set", "{tmp}/nofeatures.parquet", "--auc-floor", "1.5"], "--auc-floor"),
    (["--training-set", "{tmp}/nofeatures.parquet", "--candidates", "0"],
     "--candidates must be between 1 and 200, not 0"),
    (["--training-set", "{tmp}/nofeatures.parquet", "--candidates", "201"], "--candidates"),
    (["--training-set", "{tmp}/nofeatures.parquet", "--search-budget", "ten"],
     "cannot read 'ten' as a duration"),
])
def test_train_command_bad_input_exits_2_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "notparquet.parquet").write_text("hello")
    pq.write_table(synthetic_set(500).select(["ts", "label"]), tmp_path / "nofeatures.parquet")
    out = tmp_path / "models"
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headrace train: ") and message in err and "\n" not in err
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_grid_has_six_to_eight_combinations() -> None:
    from offline.train import SEARCH_GRID

    assert 6 <= len(SEARCH_GRID) <= 8
    keys = {tuple(sorted(c)) for c in SEARCH_GRID}
    assert keys == {("learning_rate", "min_data_in_leaf", "num_leaves")}
    assert len({tuple(c.values()) for c in SEARCH_GRID}) == len(SEARCH_GRID)
