"""Fitting the calibration map of a trained model on its time-ordered validation rows.

A booster early-stopped and chosen on log loss can still be mis-calibrated (boosting
pushes rare-event probabilities towards the extremes). :func:`choose_calibration` fits
both maps on the EARLIER half of the validation rows (by time,
:func:`calibration_halves`) and judges them on the LATER half:

* Platt scaling (:func:`fit_platt`): ``sigmoid(a * logit(p) + b)``, the 2-parameter
  logistic regression of the label on ``logit(p)``, fitted by Newton's method;
* isotonic regression (:func:`pav`, :func:`fit_isotonic`): the non-decreasing step
  function of ``p`` closest to the labels in squared error (pool-adjacent-violators),
  stored as points interpolated linearly, its values kept within
  ``[1 / (2n), 1 - 1 / (2n)]`` (``n`` rows fitted) so an empty-of-clicks block does not
  predict exactly 0.

The map with the lower log loss on the later half is kept only when it beats "no map"
there; otherwise the model ships uncalibrated. The choice is honest for the later half
only in part: the booster's iteration count and its hyperparameters were chosen on the
whole validation split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.core.errors import InputError
from headrace.model.artifact import CalibrationKind, CalibrationMap
from offline.evaluation import TimeSplit, log_loss, time_split

__all__ = ["PLATT_MAX_ITER", "CalibrationChoice", "EvalRows", "pav", "fit_platt",
           "fit_isotonic", "calibration_halves", "choose_calibration", "eval_rows"]

PLATT_MAX_ITER = 100
_EPS = 1e-15


def pav(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence ``f`` minimising
    ``sum(w * (y - f) ** 2)`` for values ``y`` already in the order of their scores.

    Adjacent blocks whose means decrease are merged into their weighted mean until none
    does. ``w`` defaults to ones; weights must be positive. O(n) amortised.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if w.shape != y.shape or (w <= 0).any():
        raise ValueError("pav needs one positive weight per value")
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        means.append(value)
        weights.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, s2 = means.pop(), weights.pop(), sizes.pop()
            total = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / total
            weights[-1] = total
            sizes[-1] += s2
    return np.repeat(np.array(means), np.array(sizes, dtype=np.intp))


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> CalibrationMap:
    """Isotonic map of labels ``y`` on scores ``p`` (equal scores pooled first).

    Each PAV block becomes two points (its lowest and highest score, both at the block's
    rate), so :meth:`CalibrationMap.apply` is constant inside a block and linear between
    blocks. Values are clipped to ``[1 / (2n), 1 - 1 / (2n)]``.
    """
    p, y = _pair(p, y)
    xs, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    rates = np.bincount(inverse, weights=y) / counts
    fitted = pav(rates, counts.astype(np.float64))
    floor = 0.5 / p.size
    fitted = np.clip(fitted, floor, 1.0 - floor)
    keep = np.r_[True, fitted[1:] != fitted[:-1]] | np.r_[fitted[1:] != fitted[:-1], True]
    return CalibrationMap(CalibrationKind.ISOTONIC, x=tuple(xs[keep].tolist()),
                          y=tuple(fitted[keep].tolist()))


def fit_platt(p: np.ndarray, y: np.ndarray, max_iter: int = PLATT_MAX_ITER) -> CalibrationMap:
    """Platt map: ``a``, ``b`` maximising the likelihood of ``y`` under
    ``sigmoid(a * logit(p) + b)`` (Newton's method with step halving, from a=1, b=0).

    With perfectly separable data the optimum is at infinity; the iteration then stops
    after ``max_iter`` steps with a steep, still finite map.
    """
    p, y = _pair(p, y)
    q = np.clip(p, _EPS, 1.0 - _EPS)
    z = np.log(q / (1.0 - q))
    theta = np.array([1.0, 0.0])
    design = np.column_stack([z, np.ones_like(z)])

    def loss(t: np.ndarray) -> float:
        s = design @ t
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    current = loss(theta)
    for _ in range(max_iter):
        s = design @ theta
        mu = 1.0 / (1.0 + np.exp(-s))
        grad = design.T @ (mu - y) / y.size
        hess = (design * (mu * (1.0 - mu))[:, None]).T @ design / y.size
        try:
            step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        except np.linalg.LinAlgError:
            break
        scale, improved = 1.0, False
        while scale > 1e-6:
            trial = theta - scale * step
            value = loss(trial)
            if value <= current:
                improved = True
                break
            scale /= 2.0
        if not improved:
            break
        converged = current - value < 1e-12
        theta, current = trial, value
        if converged:
            break
    return CalibrationMap(CalibrationKind.PLATT, a=float(theta[0]), b=float(theta[1]))


def calibration_halves(ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``ts_ms``) of the earlier and the later half of the rows by time;
    rows sharing the cut-off timestamp all go to the later half (:func:`time_split`).

    Raises:
        InputError: the rows cannot be split in time (fewer than 2, or one timestamp).
    """
    split = time_split(ts_ms, 0.5)
    return split.train, split.valid


@dataclass(frozen=True)
class CalibrationChoice:
    """The map kept (None: ship the booster's probabilities) and why.

    ``logloss``: log loss on the evaluation rows of ``none`` (no map), ``platt`` and
    ``isotonic``; ``chosen``: the key of the one shipped.
    """

    map: CalibrationMap | None
    chosen: str
    logloss: Mapping[str, float]
    fit_rows: int
    eval_rows: int

    def to_dict(self) -> dict[str, Any]:
        """``metadata["calibration_map"]``."""
        return {"chosen": self.chosen, "map": self.map.to_json() if self.map else None,
                "logloss_eval_half": dict(self.logloss),
                "logloss_before": self.logloss["none"],
                "logloss_after": self.logloss[self.chosen],
                "fit_rows": self.fit_rows, "eval_rows": self.eval_rows,
                "rule": "fitted on the earlier half of the validation rows by time; the "
                        "lower log loss on the later half wins, kept only if it beats none"}


def choose_calibration(p_fit: np.ndarray, y_fit: np.ndarray, p_eval: np.ndarray,
                       y_eval: np.ndarray) -> CalibrationChoice:
    """Fit Platt and isotonic maps on (``p_fit``, ``y_fit``), keep the one with the lowest
    log loss on (``p_eval``, ``y_eval``) if it beats no map (ties keep no map).

    Raises:
        InputError: the fitting rows are empty.
    """
    p_fit, y_fit = _pair(p_fit, y_fit)
    p_eval, y_eval = _pair(p_eval, y_eval)
    if p_fit.size == 0:
        raise InputError("no rows to fit a calibration map on")
    maps: dict[str, CalibrationMap | None] = {"none": None, "platt": fit_platt(p_fit, y_fit),
                                              "isotonic": fit_isotonic(p_fit, y_fit)}
    losses = {k: log_loss(y_eval, p_eval if m is None else m.apply(p_eval))
              for k, m in maps.items()}
    chosen = "none"
    for k in ("platt", "isotonic"):
        if math.isfinite(losses[k]) and losses[k] < losses[chosen]:
            chosen = k
    return CalibrationChoice(maps[chosen], chosen, losses, int(p_fit.size), int(p_eval.size))


@dataclass(frozen=True)
class EvalRows:
    """The rows ``metrics`` describe, and the calibration fitted before them.

    ``fit``/``eval``: row indices (time order) of the calibration-fit half and the
    evaluation half of the validation split (``fit`` empty when no map could be fitted;
    ``eval`` is then the whole split). ``note``: which rows, in words.
    """

    fit: np.ndarray
    eval: np.ndarray
    choice: CalibrationChoice | None
    note: str


def eval_rows(p_valid: np.ndarray, y: np.ndarray, ts: np.ndarray, split: TimeSplit) -> EvalRows:
    """Halve the validation rows by time and choose the map (:mod:`offline.train`, step 4).

    ``p_valid``: the booster's probabilities of ``split.valid``, in that order.
    """
    valid = split.valid
    try:
        first, second = calibration_halves(ts[valid])
    except InputError as exc:
        return EvalRows(valid[:0], valid, None, f"all validation rows (no calibration: {exc})")
    for part, idx in (("earlier", first), ("later", second)):
        pos = int(y[valid[idx]].sum())
        if pos == 0 or pos == idx.size:
            return EvalRows(valid[:0], valid, None, f"all validation rows (no calibration: "
                            f"the {part} half has only one class)")
    choice = choose_calibration(p_valid[first], y[valid[first]], p_valid[second],
                                y[valid[second]])
    return EvalRows(valid[first], valid[second], choice,
                    "the later half of the validation rows by time (the earlier half "
                    "fitted the calibration map)")


def _pair(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) differ in length")
    return p, y
