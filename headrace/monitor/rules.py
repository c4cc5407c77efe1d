"""When the monitor alerts, as a pure decision over the series of its evaluations.

**Levels** (per feature and window, :func:`level`): PSI >= :data:`~headrace.monitor.
stats.PSI_ALERT` (0.25) is ``alert``, >= :data:`~headrace.monitor.stats.PSI_WARN`
(0.1) ``warn``, else ``ok``; a window with fewer than ``min_rows`` rows (500) is
``ok`` whatever its PSI (a handful of rows always looks shifted), as is a NaN PSI.

**The combination rule (why one noisy signal does not page anyone).** A *drift alert*
— the retraining trigger — needs two things at once:

1. *importance*: the feature is among the model's ``top_k`` (5) features by
   ``importance_gain`` (its training metadata). A shift in a feature the model hardly
   uses does not move its predictions; it is shown (the gauges, the level) but never
   alerts. The served prediction (``__prediction__``) always counts: its own shift
   is the model's output moving.
2. *persistence*: its level is ``alert`` in ``consecutive`` (3) evaluations in a row
   of the same window (every tick is one evaluation of the open 1 h and 24 h
   windows; a new window starts a new count). One spike — or two, then a tick
   below — restarts the count; a window with too few rows counts as below, so a
   freshly opened hourly window cannot fire.

It fires once per (model version, feature, window length, window start): the same
breach is not re-sent at every tick; the next window, if it still breaches for
``consecutive`` evaluations, fires again.

A *performance alert* comes from the closed windows (their clicks all in,
:mod:`headrace.monitor.auc`) with at least ``min_rows`` impressions: the AUC below
the model's validation AUC minus ``auc_margin`` (0.02) in ``auc_consecutive`` (2)
closed windows in a row of one window length (``feature`` ``auc``), or its
calibration ratio (Σ pCTR / clicks) outside ``[calibration_low, calibration_high]``
(0.85–1.15, the rollout's band) in one closed window (``feature`` ``calibration``).
A window with too few impressions, or a NaN AUC (one class only), is skipped: it
neither breaks nor extends the series. Once per (version, feature, window, start).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from headrace.monitor.stats import PSI_ALERT, PSI_WARN
from headrace.monitor.windows import PREDICTION

__all__ = ["Level", "RuleConfig", "level", "top_features", "Evaluation", "Performance",
           "Alert", "AlertRules", "decide"]

Level = Literal["ok", "warn", "alert"]
DRIFT: Final = "drift"
PERFORMANCE: Final = "performance"


@dataclass(frozen=True)
class RuleConfig:
    """The thresholds (module docstring), from ``HEADRACE_MONITOR_*``.

    Attributes:
        min_rows: rows (drift) or impressions (performance) a window needs, >= 1.
        top_k: features by importance that may raise a drift alert, >= 1.
        consecutive: evaluations in a row at ``alert`` level, >= 1.
        auc_margin: how far below the validation AUC a closed window's AUC must be.
        auc_consecutive: closed windows in a row below that, >= 1.
        calibration_low, calibration_high: the calibration ratio's band.
    """

    min_rows: int = 500
    top_k: int = 5
    consecutive: int = 3
    auc_margin: float = 0.02
    auc_consecutive: int = 2
    calibration_low: float = 0.85
    calibration_high: float = 1.15


def level(psi: float, rows: int, min_rows: int) -> Level:
    """``alert`` / ``warn`` / ``ok`` of one feature in one window (module docstring)."""
    if rows < min_rows or not math.isfinite(psi):
        return "ok"
    if psi >= PSI_ALERT:
        return "alert"
    return "warn" if psi >= PSI_WARN else "ok"


def top_features(importance: Mapping[str, float], k: int) -> frozenset[str]:
    """The ``k`` features of largest importance (ties: the name, ascending)."""
    ranked = sorted(importance.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    return frozenset(name for name, _ in ranked[:k])


@dataclass(frozen=True)
class Evaluation:
    """One tick's drift of one model's open window: feature -> (psi, rows)."""

    model_version: str
    window: str
    window_start_ms: int
    psi: Mapping[str, float]
    rows: int


@dataclass(frozen=True)
class Performance:
    """One closed window's AUC and calibration."""

    model_version: str
    window: str
    window_start_ms: int
    impressions: int
    auc: float
    calibration_ratio: float


@dataclass(frozen=True)
class Alert:
    """One alert (the JSON of the Redis stream entry, minus ``at_ms``)."""

    signal: str
    model_version: str
    feature: str
    value: float
    threshold: float
    window: str
    window_start_ms: int
    detail: str

    def to_dict(self, at_ms: int) -> dict[str, Any]:
        """The stream entry's JSON object (non-finite values as None)."""
        def fin(x: float) -> float | None:
            return x if math.isfinite(x) else None
        return {"at_ms": at_ms, "signal": self.signal, "model_version": self.model_version,
                "feature": self.feature, "value": fin(self.value),
                "threshold": fin(self.threshold), "window": self.window,
                "window_start_ms": self.window_start_ms, "detail": self.detail}


@dataclass
class AlertRules:
    """The decision state: consecutive counts and what already fired. No I/O.

    Args:
        config: the thresholds.
        importance: model version -> feature -> ``importance_gain``.
        validation_auc: model version -> its validation AUC (absent: no AUC alert).
    """

    config: RuleConfig
    importance: Mapping[str, Mapping[str, float]]
    validation_auc: Mapping[str, float]
    _streak: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    _auc_streak: dict[tuple[str, str], int] = field(default_factory=dict)
    _fired: set[tuple[str, str, str, str, int]] = field(default_factory=set)

    def mark_fired(self, keys: Iterable[tuple[str, str, str, str, int]]) -> None:
        """Treat these (signal, version, feature, window, start) as already fired (the
        alerts a previous run sent, read back from the stream)."""
        self._fired.update(keys)

    def _once(self, alert: Alert) -> list[Alert]:
        key = (alert.signal, alert.model_version, alert.feature, alert.window,
               alert.window_start_ms)
        if key in self._fired:
            return []
        self._fired.add(key)
        return [alert]

    def drift(self, ev: Evaluation) -> list[Alert]:
        """The drift alerts of one evaluation (each at most once)."""
        cfg = self.config
        top = top_features(self.importance.get(ev.model_version, {}), cfg.top_k)
        out: list[Alert] = []
        for feature, value in ev.psi.items():
            key = (ev.model_version, ev.window, feature)
            if level(value, ev.rows, cfg.min_rows) != "alert":
                self._streak[key] = (ev.window_start_ms, 0)
                continue
            start, n = self._streak.get(key, (ev.window_start_ms, 0))
            n = n + 1 if start == ev.window_start_ms else 1
            self._streak[key] = (ev.window_start_ms, n)
            if n >= cfg.consecutive and (feature in top or feature == PREDICTION):
                out += self._once(Alert(
                    DRIFT, ev.model_version, feature, value, PSI_ALERT, ev.window,
                    ev.window_start_ms,
                    f"PSI {value:.4f} >= {PSI_ALERT} in {n} consecutive evaluations of "
                    f"the {ev.window} window ({ev.rows} rows); "
                    + ("the served prediction" if feature == PREDICTION else
                       f"a top-{cfg.top_k} feature by importance_gain")))
        return out

    def performance(self, perf: Performance) -> list[Alert]:
        """The performance alerts of one closed window (each at most once); call in
        window order per window length."""
        cfg = self.config
        if perf.impressions < cfg.min_rows:
            return []
        out: list[Alert] = []
        c = perf.calibration_ratio
        if not cfg.calibration_low <= c <= cfg.calibration_high:
            bound = cfg.calibration_low if c < cfg.calibration_low else cfg.calibration_high
            out += self._once(Alert(
                PERFORMANCE, perf.model_version, "calibration", c, bound, perf.window,
                perf.window_start_ms,
                f"calibration ratio {c:.4f} outside [{cfg.calibration_low}, "
                f"{cfg.calibration_high}] over {perf.impressions} impressions"))
        val = self.validation_auc.get(perf.model_version)
        if val is None or not math.isfinite(perf.auc):
            return out
        key = (perf.model_version, perf.window)
        threshold = val - cfg.auc_margin
        if perf.auc >= threshold:
            self._auc_streak[key] = 0
            return out
        n = self._auc_streak[key] = self._auc_streak.get(key, 0) + 1
        if n >= cfg.auc_consecutive:
            out += self._once(Alert(
                PERFORMANCE, perf.model_version, "auc", perf.auc, threshold, perf.window,
                perf.window_start_ms,
                f"AUC {perf.auc:.4f} < validation {val:.4f} - {cfg.auc_margin} in {n} "
                f"consecutive closed {perf.window} windows"))
        return out


def decide(rules: AlertRules, series: Iterable[Evaluation | Performance]
           ) -> list[Alert]:
    """Every alert of ``series`` (evaluations and closed windows, in time order)."""
    out: list[Alert] = []
    for item in series:
        out += rules.drift(item) if isinstance(item, Evaluation) else rules.performance(item)
    return out
