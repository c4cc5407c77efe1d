"""Promotion gates: which trained model may become champion.

The artifact folders and the champion pointer are :mod:`headrace.model.artifact`.

Gates (:func:`decide`) judge the metrics of the model AS SHIPPED — the booster followed
by its calibration map when it has one (:mod:`offline.calibration`) — on the evaluation
rows that :func:`offline.train.train` describes (the later half of the validation rows by
time). A model becomes champion only when

1. its validation AUC >= ``auc_floor`` (default 0.6);
2. every *checked* calibration bin (>= ``min_bin_rows`` rows and >= ``min_bin_positives``
   positives) has ``|pred_mean - actual_rate| <= calibration_tolerance * actual_rate``
   (default ±10 %). The default of 400 positives is where the ±10 % band is two
   binomial standard errors of the observed rate (``sqrt((1 - r) / positives) <= 5 %``);
   with fewer positives a perfectly calibrated model would fail by chance alone, so such
   bins are reported but not judged (a model with no checkable bin passes this gate);
3. there is no champion, the champion's AUC is below the floor, or the new AUC is at
   least the champion's + ``min_auc_gain`` (default 0.005);
4. its log loss is no worse than the champion's (+ ``max_logloss_increase``, default 0)
   when the champion was re-scored on the same evaluation rows. A champion known only
   by its stored metadata is not compared on log loss: a log loss depends on the base
   rate of the rows it was measured on, so two different periods do not compare.

A rejected model keeps its folder (with the decision in ``metadata.json``) but never
becomes champion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from offline.evaluation import CalibrationBin, Metrics

__all__ = [
    "GatePolicy",
    "DEFAULT_POLICY",
    "ChampionRef",
    "GateDecision",
    "calibration_problems",
    "decide",
]


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the promotion gates (see the module docstring)."""

    auc_floor: float = 0.6
    min_auc_gain: float = 0.005
    calibration_tolerance: float = 0.10
    min_bin_rows: int = 100
    min_bin_positives: int = 400
    max_logloss_increase: float = 0.0


@dataclass(frozen=True)
class ChampionRef:
    """The current champion as the gate sees it.

    ``auc_source``: ``"same validation rows"`` when the champion was re-scored on the
    candidate's validation rows, ``"stored metadata"`` when its own stored AUC is used.
    """

    version: str
    auc: float
    auc_source: str
    logloss: float = math.nan


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, with one human-readable reason per gate."""

    promote: bool
    reasons: tuple[str, ...]
    champion: ChampionRef | None = None
    policy: GatePolicy = field(default_factory=GatePolicy)

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": list(self.reasons),
                "champion": asdict(self.champion) if self.champion else None,
                "policy": asdict(self.policy)}


def calibration_problems(bins: Sequence[CalibrationBin], policy: GatePolicy
                         ) -> tuple[int, list[str]]:
    """``(bins checked, one message per checked bin outside the tolerance)``."""
    checked, problems = 0, []
    for b in bins:
        if b.count < policy.min_bin_rows or b.positives < policy.min_bin_positives:
            continue
        checked += 1
        off = abs(b.pred_mean - b.actual_rate)
        if off > policy.calibration_tolerance * b.actual_rate:
            problems.append(f"bin {b.index} predicts {b.pred_mean:.4f} but observed "
                            f"{b.actual_rate:.4f} ({off / b.actual_rate:.0%} off)")
    return checked, problems


#: The default thresholds (shared, immutable).
DEFAULT_POLICY = GatePolicy()


def decide(metrics: Metrics, champion: ChampionRef | None,
           policy: GatePolicy = DEFAULT_POLICY) -> GateDecision:
    """Apply the three gates to a candidate's validation metrics. Pure."""
    ok, reasons = True, []
    if metrics.auc >= policy.auc_floor:
        reasons.append(f"AUC {metrics.auc:.4f} >= floor {policy.auc_floor:.4f}")
    else:
        ok = False
        reasons.append(f"AUC {metrics.auc:.4f} is below the floor {policy.auc_floor:.4f}")
    checked, problems = calibration_problems(metrics.calibration, policy)
    need = f">= {policy.min_bin_rows} rows and >= {policy.min_bin_positives} positives"
    tol = f"±{policy.calibration_tolerance:.0%}"
    if problems:
        ok = False
        reasons.append(f"calibration outside {tol} in {len(problems)} of {checked} checked "
                       f"bin(s): {'; '.join(problems)}")
    elif checked:
        reasons.append(f"calibration within {tol} in all {checked} bin(s) with {need}")
    else:
        reasons.append(f"calibration not checked: no bin has {need}")
    if champion is None:
        reasons.append("no champion yet")
    elif not champion.auc >= policy.auc_floor:  # NaN (unreadable champion) counts as below
        reasons.append(f"champion {champion.version} AUC {champion.auc:.4f} "
                       f"({champion.auc_source}) is below the floor")
    else:
        need_auc = champion.auc + policy.min_auc_gain
        verdict = ">=" if metrics.auc >= need_auc else "<"
        ok = ok and metrics.auc >= need_auc
        reasons.append(f"AUC {metrics.auc:.4f} {verdict} champion {champion.version} AUC "
                       f"{champion.auc:.4f} ({champion.auc_source}) + {policy.min_auc_gain}")
        if math.isnan(champion.logloss):
            reasons.append(f"log loss not compared with champion {champion.version} "
                           f"({champion.auc_source}: not measured on these rows)")
        else:
            limit = champion.logloss + policy.max_logloss_increase
            worse = not metrics.logloss <= limit
            ok = ok and not worse
            reasons.append(f"log loss {metrics.logloss:.5f} {'>' if worse else '<='} champion "
                           f"{champion.version} log loss {champion.logloss:.5f}"
                           + (f" + {policy.max_logloss_increase}"
                              if policy.max_logloss_increase else ""))
    return GateDecision(ok, tuple(reasons), champion, policy)
