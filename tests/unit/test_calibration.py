"""Calibration maps: PAV and Platt against hand-computed values and a min-max oracle, the
choice rule, the saved map round trip, and both prediction paths (LoadedModel and the
server's ScoringModel/ScoringService) applying it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.coldstart import Priors
from feature_defs.layout import priors_key
from feature_defs.registry import load_registry
from headrace.core.online_store import MemoryOnlineStore
from headrace.model.artifact import (
    CALIBRATION_FILE,
    CalibrationKind,
    CalibrationMap,
    LoadedModel,
    ModelLoadError,
    load_calibration,
    load_model,
    save_calibration,
    write_artifact,
)
from offline.calibration import (
    calibration_halves,
    choose_calibration,
    fit_isotonic,
    fit_platt,
    pav,
)
from offline.evaluation import log_loss
from serving.breaker import CircuitBreaker
from serving.client import build_score_request
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.scoring import ScoringService

LN3 = math.log(3.0)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- PAV ---------------------------------------------------------------------------------


def test_pav_hand_examples() -> None:
    # [1, 3, 2]: 3 > 2 pools to 2.5; then 4; 4 > 3 pools to 3.5; then 5
    assert pav(np.array([1, 3, 2, 4, 3, 5.0])).tolist() == [1, 2.5, 2.5, 3.5, 3.5, 5]
    # [1, 5, 2]: pools 5, 2 -> 3.5; the next 2 < 3.5 pools (5 + 2 + 2) / 3 = 3
    assert pav(np.array([1, 5, 2, 2.0])).tolist() == [1, 3, 3, 3]
    assert pav(np.array([5, 4, 3, 2, 1.0])).tolist() == [3] * 5
    # weighted: (3 * 1 + 1 * 3) / (1 + 3) = 1.5
    assert pav(np.array([3, 1.0]), np.array([1, 3.0])).tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="positive weight"):
        pav(np.array([1.0, 2.0]), np.array([1.0, 0.0]))


@pytest.mark.parametrize("seed", range(5))
def test_pav_equals_the_min_max_formula(seed: int) -> None:
    """Oracle: the isotonic fit is f_i = max_{j<=i} min_{k>=i} mean_w(y[j..k])."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 25))
    y, w = rng.random(n).round(1), rng.integers(1, 4, n).astype(float)
    mean = [[float(np.dot(y[j:k + 1], w[j:k + 1]) / w[j:k + 1].sum()) if k >= j else 0.0
             for k in range(n)] for j in range(n)]
    oracle = [max(min(mean[j][k] for k in range(i, n)) for j in range(i + 1))
              for i in range(n)]
    assert pav(y, w) == pytest.approx(oracle, abs=1e-12)


def test_isotonic_map_by_hand() -> None:
    # equal scores pool first: x = .1 .2 .3 .4, rates .5 1 0 1, counts 2 1 2 1
    # PAV: 1 > 0 -> (1 + 0) / 3 = 1/3; .5 > 1/3 -> (2 * .5 + 3 * 1/3) / 5 = .4; then 1
    # clip to [1/12, 11/12] (n = 6 rows): the last block becomes 11/12
    p = np.array([0.1, 0.1, 0.2, 0.3, 0.3, 0.4])
    y = np.array([0, 1, 1, 0, 0, 1.0])
    m = fit_isotonic(p, y)
    assert m.kind is CalibrationKind.ISOTONIC
    assert m.x == pytest.approx((0.1, 0.3, 0.4)) and m.y == pytest.approx((0.4, 0.4, 11 / 12))
    # constant inside a block and outside the range, linear between blocks
    got = m.apply(np.array([0.0, 0.1, 0.25, 0.35, 0.4, 0.9]))
    assert got == pytest.approx([0.4, 0.4, 0.4, 0.4 + 0.5 * (11 / 12 - 0.4), 11 / 12, 11 / 12])


# -- Platt -------------------------------------------------------------------------------


def test_platt_by_hand() -> None:
    # 4 rows at logit 0 with 1 click (rate 1/4), 4 at logit 1 with 3 (rate 3/4): the MLE
    # fits both rates exactly: b = logit(1/4) = -ln 3, a + b = logit(3/4) = ln 3
    p = sigmoid(np.array([0, 0, 0, 0, 1, 1, 1, 1.0]))
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0.0])
    m = fit_platt(p, y)
    assert m.kind is CalibrationKind.PLATT
    assert (m.a, m.b) == pytest.approx((2 * LN3, -LN3), abs=1e-8)
    assert m.apply(p[[0, 4]]) == pytest.approx([0.25, 0.75], abs=1e-9)
    # a map from parameters, checked by the formula written out
    hand = CalibrationMap(CalibrationKind.PLATT, a=0.5, b=-1.0)
    q = np.array([1e-20, 0.01, 0.5, 0.9])
    zq = np.log(np.clip(q, 1e-15, 1 - 1e-15) / (1 - np.clip(q, 1e-15, 1 - 1e-15)))
    assert hand.apply(q) == pytest.approx(1 / (1 + np.exp(-(0.5 * zq - 1.0))), rel=1e-12)


def test_platt_stays_finite_on_separable_data() -> None:
    m = fit_platt(np.array([0.2, 0.3, 0.7, 0.8]), np.array([0, 0, 1, 1.0]))
    assert math.isfinite(m.a) and math.isfinite(m.b) and m.a > 1


# -- the choice --------------------------------------------------------------------------


def miscalibrated(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """True click probability sigmoid(z - 3 + shift); the model says sigmoid(2z - 2):
    over-confident and biased."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < sigmoid(z - 3 + shift)).astype(float)
    return sigmoid(2 * z - 2), y


def test_a_miscalibrated_model_gets_a_lower_log_loss_after_the_map() -> None:
    p_fit, y_fit = miscalibrated(20_000, 1)
    p_eval, y_eval = miscalibrated(20_000, 2)
    choice = choose_calibration(p_fit, y_fit, p_eval, y_eval)
    assert choice.chosen in ("platt", "isotonic") and choice.map is not None
    after = log_loss(y_eval, choice.map.apply(p_eval))
    assert after == pytest.approx(choice.logloss[choice.chosen])
    assert after < log_loss(y_eval, p_eval) - 0.01 == choice.logloss["none"] - 0.01
    platt = fit_platt(p_fit, y_fit)  # sigmoid(a (2z - 2) + b) = sigmoid(z - 3): a = .5, b = -2
    assert (platt.a, platt.b) == pytest.approx((0.5, -2.0), abs=0.1)
    d = choice.to_dict()
    assert d["logloss_before"] > d["logloss_after"] and d["fit_rows"] == 20_000
    assert json.loads(json.dumps(d))["map"]["kind"] == choice.chosen


def test_no_map_is_kept_when_none_beats_it_on_the_later_half() -> None:
    p_fit, y_fit = miscalibrated(5000, 3, shift=2.5)  # the earlier half clicks far more
    rng = np.random.default_rng(4)
    p_eval = rng.uniform(0.01, 0.3, 5000)
    y_eval = (rng.random(5000) < p_eval).astype(float)  # perfectly calibrated later half
    choice = choose_calibration(p_fit, y_fit, p_eval, y_eval)
    assert choice.chosen == "none" and choice.map is None
    assert choice.logloss["none"] < min(choice.logloss["platt"], choice.logloss["isotonic"])


def test_calibration_halves_split_by_time_with_ties_in_the_later_half() -> None:
    ts = np.array([5, 1, 3, 3, 2, 4, 3, 6])
    first, second = calibration_halves(ts)
    assert ts[first].tolist() == [1, 2] and sorted(ts[second].tolist()) == [3, 3, 3, 4, 5, 6]


# -- the saved map and the two prediction paths ------------------------------------------


class Booster:
    """A booster on one column: p = x0 (clipped), recording its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, x: np.ndarray, **_: Any) -> np.ndarray:
        self.calls += 1
        return np.clip(np.nan_to_num(np.asarray(x, dtype=float)[:, 0], nan=0.05), 0, 1)


def test_map_round_trips_and_bad_files_are_load_errors(tmp_path: Path) -> None:
    for m in (CalibrationMap(CalibrationKind.PLATT, a=0.7, b=-0.2),
              CalibrationMap(CalibrationKind.ISOTONIC, x=(0.0, 0.5), y=(0.1, 0.2))):
        save_calibration(m, tmp_path)
        assert load_calibration(tmp_path) == m
    (tmp_path / CALIBRATION_FILE).write_text('{"kind": "isotonic", "x": [0.2, 0.1], '
                                             '"y": [0.1, 0.2]}')
    with pytest.raises(ModelLoadError, match="non-decreasing"):
        load_calibration(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text('{"kind": "spline"}')
    with pytest.raises(ModelLoadError, match="calibration map"):
        load_calibration(tmp_path)
    assert load_calibration(tmp_path / "nowhere") is None


def _version(models: Path, cal: CalibrationMap | None, seed: int) -> str:
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    x = rng.random((300, 1))
    y = (rng.random(300) < 0.05 + 0.5 * x[:, 0]).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1},
                        lgb.Dataset(x, y, feature_name=["bid_cpm"]), 5)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({"features": ["bid_cpm"]}))
        if cal is not None:
            save_calibration(cal, folder)

    return write_artifact(models, datetime(2024, 5, 1, 13, tzinfo=UTC), fill)[0]


def test_loaded_model_and_scoring_model_apply_the_saved_map(tmp_path: Path) -> None:
    cal = CalibrationMap(CalibrationKind.PLATT, a=0.5, b=-1.0)
    with_map, without = _version(tmp_path, cal, 1), _version(tmp_path, None, 1)
    x = np.array([[0.1], [0.5], [0.9]])
    plain = load_model(tmp_path, without)
    raw = np.asarray(plain.booster.predict(x))
    assert plain.calibration is None and np.array_equal(plain.predict(x), raw)
    loaded = load_model(tmp_path, with_map)
    assert loaded.calibration == cal
    want = 1 / (1 + np.exp(-(0.5 * np.log(raw / (1 - raw)) - 1.0)))  # same trees, same seed
    assert loaded.predict(x) == pytest.approx(want, rel=1e-12)
    served = ScoringModel.compile(loaded, load_registry())
    assert served.predict(x) == pytest.approx(want, rel=1e-12)
    assert ScoringModel.compile(plain, load_registry()).predict(x) == pytest.approx(raw)


def test_the_server_answers_calibrated_p_ctr(tmp_path: Path) -> None:
    reg = load_registry()
    cal = CalibrationMap(CalibrationKind.ISOTONIC, x=(0.0, 1.0, 3.0), y=(0.01, 0.02, 0.2))
    booster = Booster()
    models = {"v1": LoadedModel("v1", booster, ("bid_cpm",), {}, None, cal)}
    store = MemoryOnlineStore()
    store.set(priors_key("hr"), Priors().to_json())
    metrics = ServingMetrics()
    cache = PriorsCache(store, "hr", metrics=metrics)
    cache.refresh()
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp_path, lambda m: ScoringModel.compile(m, reg), load=lambda _d, v: models[v])
    (tmp_path / "CHAMPION").write_text("v1\n")
    watcher.refresh()
    clock: Callable[[], float] = lambda: 0.0  # noqa: E731
    svc = ScoringService(reg, OnlineReader(store, "hr"), cache,
                         CircuitBreaker(failures=2, reset_s=1.0, clock=clock), watcher,
                         budget_ms=10.0, clock_ms=lambda: 1_700_000_000_001, timer=clock,
                         metrics=metrics)
    bids = [0.5, 2.0, 0.0]  # the booster says p = min(bid, 1): .5, 1, 0
    req = build_score_request("u1", [{"ad_id": f"a{i}", "campaign_id": "c", "bid_cpm": b}
                                     for i, b in enumerate(bids)])
    resp = svc.score(req)
    # the map by hand: .5 -> .01 + .5 * (.02 - .01) = .015; 1 -> .02; 0 -> .01
    by_ad = dict(zip(resp.ad_ids, resp.p_ctr, strict=True))
    assert by_ad == pytest.approx({"a0": 0.015, "a1": 0.02, "a2": 0.01}, rel=1e-12)
