"""The off-policy gate before phase 1: the challenger's estimated CTR on logged traffic
must not be worse than the logged policy's beyond a margin (``Policy.ope_max_drop``;
None, the default, turns the gate off).

At the end of the shadow phase (phase 0: the challenger scored the champion's requests
and its shadow predictions went to the prediction log) the controller's runner asks an
evaluator (:mod:`headrace.commands.rollout` builds one on
:func:`offline.ope.evaluate`) for the doubly robust estimate of the CTR the challenger's
greedy policy would have had on the shadow phase's served decisions, and the CTR those
decisions actually had (the logged policy's value, the champion's with its exploration).
:func:`ope_breach` decides, purely:

* no estimate (no evaluator, too few decisions, no logged propensities, too little
  overlap: the evaluator's sentence) → breach ``ope``: the requirement is not met, the
  rollout rolls back before any user sees the challenger;
* ``value < logged_ctr · (1 − ope_max_drop)`` → breach ``ope`` with both figures;
* otherwise the rollout advances to phase 1 and the estimate is in the decision.

The point estimate decides (its 95 % interval is reported beside it). The gate needs the
shadow phase (``rollout start --shadow``) and logged propensities: with a greedy logger
(propensity 1) a challenger that ranks differently has no support, and the evaluator
says so. Exploration (``HEADRACE_EXPLORE``) is what gives it support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from headrace.rollout.gates import Breach

__all__ = ["OpeEstimate", "ope_breach"]


@dataclass(frozen=True)
class OpeEstimate:
    """An off-policy estimate of the challenger's CTR, or why there is none.

    Attributes:
        value, ci_low, ci_high: the doubly robust estimate and its 95 % interval.
        logged_ctr: the CTR of the same decisions as served.
        decisions: the decisions evaluated. ess: their effective sample size.
        problem: why no estimate could be made (then the figures are None).
    """

    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    logged_ctr: float | None = None
    decisions: int = 0
    ess: float | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return asdict(self)


def _f(x: float | None) -> str:
    return "?" if x is None else f"{x:.5f}"


def ope_breach(estimate: OpeEstimate | None, max_drop: float) -> Breach | None:
    """The breach of the off-policy gate, or None when the challenger may take traffic.

    Args:
        estimate: the evaluator's answer (None: no evaluator).
        max_drop: the largest relative CTR drop allowed, in [0, 1).
    """
    if estimate is None or estimate.problem is not None:
        why = "no off-policy evaluator" if estimate is None else estimate.problem
        return Breach("ope", {"problem": why},
                      f"the off-policy estimate before phase 1 is unavailable: {why}")
    value, logged = estimate.value, estimate.logged_ctr
    if value is None or logged is None or not (math.isfinite(value) and math.isfinite(logged)):
        return Breach("ope", estimate.to_dict(),
                      "the off-policy estimate before phase 1 is not a number")
    floor = logged * (1.0 - max_drop)
    if value < floor:
        return Breach("ope", {**estimate.to_dict(), "floor": floor},
                      f"the challenger's estimated CTR {value:.5f} (DR, 95 % "
                      f"{_f(estimate.ci_low)}-{_f(estimate.ci_high)}, {estimate.decisions} "
                      f"decisions) is below the logged CTR {logged:.5f} by more than "
                      f"{max_drop:.0%} (floor {floor:.5f})")
    return None
