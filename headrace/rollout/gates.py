"""Guardrails and phase-end gates: pure functions from per-arm counts to a decision.

:func:`guardrails` is the continuous safety check (call it at every evaluation, every
few seconds: its checks are gross failures with minimum samples, so repeated looks do
not make them fire on noise). :func:`phase_end` is the phase's comparative decision,
called when the phase reaches its minimum duration and, while it holds, again up to
its maximum (``final=True`` at the last look: a hold becomes a rollback). It runs the
guardrails too, so a phase never advances past a breach.

Names (stable; logged, exported as gauges, written to the model history): guardrails
``error_rate``, ``latency_p99``, ``click_floor``, ``segment_errors``,
``prediction_range``, ``constant_predictions``, ``calibration_collapse``; phase-end
gates ``min_impressions``, ``calibration``, ``calibration_bucket``, ``p_worse``,
``segment_degraded``, ``p_better``, ``lift``; passing: ``passed``, ``inconclusive``
(phase 3 below its P(better) without a rollback gate), ``promote``.

Every threshold is :class:`~headrace.rollout.policy.Policy`'s. Bounds follow the
issue's wording: "error rate < 0.1 %" fails at exactly 0.1 %, "≥ 1 click per 10,000"
passes at exactly 1e-4, "P(better) > 0.85" fails at exactly 0.85, a calibration ratio
on a bound passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from headrace.core.errors import InputError
from headrace.rollout import stats
from headrace.rollout.policy import Policy

__all__ = ["Action", "ArmStats", "Breach", "Decision", "PctrBucket", "SegmentStats",
           "guardrails", "phase_end"]


def _num(x: float) -> float | None:
    """A float for JSON: None for ±inf and NaN."""
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class SegmentStats:
    """One segment's counts (e.g. publisher ``p7``) for one arm.

    ``requests`` 0 means unknown: ``impressions + errors`` stands for it.
    """

    impressions: int = 0
    clicks: int = 0
    errors: int = 0
    requests: int = 0

    @property
    def calls(self) -> int:
        """Requests, or impressions + errors when not counted."""
        return self.requests or self.impressions + self.errors


@dataclass(frozen=True)
class PctrBucket:
    """One predicted-CTR bucket: predictions in [``low``, ``high``) (pCTR units)."""

    low: float
    high: float
    impressions: int = 0
    clicks: int = 0
    sum_pctr: float = 0.0


@dataclass(frozen=True)
class ArmStats:
    """One arm's counts over the window the gates judge (the current phase, from its
    start: :mod:`headrace.rollout.policy` says why).

    Attributes:
        impressions: shown ads scored by this arm.
        clicks: their clicks.
        sum_pctr: Σ of their predicted CTR (so ``sum_pctr / clicks`` is the
            calibration ratio, predicted / actual).
        requests: Score calls answered by this arm; errors: those that failed.
        latency_p99_ms: the p99 Score latency, if known directly ...
        latency_bounds_ms: ... or a histogram: ascending bucket upper bounds (ms; the
            last may be ``inf``) and ``latency_counts``, one count per bucket (not
            cumulative). The p99 interpolates linearly in its bucket (as Prometheus'
            ``histogram_quantile``).
        buckets: the predicted-CTR bucket table.
        min_pctr / max_pctr: the smallest and largest prediction served (None: none).
        segments: dimension (``publisher``, ``device_type``, ``country``) → value →
            :class:`SegmentStats`.

    Raises:
        InputError: negative counts, more clicks than impressions, more errors than
            requests, or a histogram whose lengths or bounds disagree.
    """

    impressions: int = 0
    clicks: int = 0
    sum_pctr: float = 0.0
    requests: int = 0
    errors: int = 0
    latency_p99_ms: float | None = None
    latency_bounds_ms: tuple[float, ...] = ()
    latency_counts: tuple[int, ...] = ()
    buckets: tuple[PctrBucket, ...] = ()
    min_pctr: float | None = None
    max_pctr: float | None = None
    segments: dict[str, dict[str, SegmentStats]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [n for n in ("impressions", "clicks", "requests", "errors")
               if getattr(self, n) < 0]
        if self.clicks > self.impressions:
            bad.append("clicks (more than impressions)")
        if self.errors > self.requests:
            bad.append("errors (more than requests)")
        if len(self.latency_bounds_ms) != len(self.latency_counts):
            bad.append("latency_counts (one per latency_bounds_ms)")
        if list(self.latency_bounds_ms) != sorted(self.latency_bounds_ms):
            bad.append("latency_bounds_ms (not ascending)")
        if any(b.clicks > b.impressions or b.clicks < 0 for b in self.buckets):
            bad.append("buckets (clicks out of range)")
        if bad:
            raise InputError(f"invalid arm statistics: {', '.join(bad)}")

    @property
    def error_rate(self) -> float:
        """errors / requests (0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def calibration_ratio(self) -> float:
        """Σ pCTR / clicks (inf with no clicks and predictions, 1.0 with neither)."""
        if self.clicks:
            return self.sum_pctr / self.clicks
        return math.inf if self.sum_pctr > 0 else 1.0

    def p99_ms(self) -> float | None:
        """``latency_p99_ms`` if set, else the histogram's p99, else None."""
        if self.latency_p99_ms is not None:
            return self.latency_p99_ms
        total = sum(self.latency_counts)
        if not total:
            return None
        rank, seen, low = 0.99 * total, 0, 0.0
        for i, (high, count) in enumerate(zip(self.latency_bounds_ms, self.latency_counts,
                                              strict=True)):
            if count and seen + count >= rank:
                if math.isinf(high):  # the open bucket: its lower bound, as Prometheus
                    return self.latency_bounds_ms[i - 1] if i else math.inf
                return low + (high - low) * (rank - seen) / count
            seen += count
            low = high
        return low

    def to_dict(self) -> dict[str, Any]:
        """The headline counts, JSON-able (what a decision logs per arm)."""
        return {"impressions": self.impressions, "clicks": self.clicks,
                "sum_pctr": self.sum_pctr, "requests": self.requests, "errors": self.errors,
                "ctr": self.clicks / self.impressions if self.impressions else None,
                "calibration_ratio": _num(self.calibration_ratio),
                "p99_ms": _num(p) if (p := self.p99_ms()) is not None else None,
                "min_pctr": self.min_pctr, "max_pctr": self.max_pctr}


class Action(StrEnum):
    """What the controller does after a decision."""

    ADVANCE = "advance"
    HOLD = "hold"
    ROLLBACK = "rollback"
    PROMOTE = "promote"


@dataclass(frozen=True)
class Breach:
    """A guardrail that failed: its stable ``name``, the values behind it, a sentence."""

    name: str
    values: dict[str, Any]
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {"name": self.name, "values": self.values, "message": self.message}


@dataclass(frozen=True)
class Decision:
    """A phase-end decision: the ``action``, the gate that decided it (``name``), the
    values behind it, a sentence, and every guardrail breach found."""

    action: Action
    phase: int
    name: str
    values: dict[str, Any]
    message: str
    breaches: tuple[Breach, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {"action": self.action.value, "phase": self.phase, "name": self.name,
                "values": self.values, "message": self.message,
                "breaches": [b.to_dict() for b in self.breaches]}


def guardrails(phase: int, champion: ArmStats, challenger: ArmStats, policy: Policy
               ) -> list[Breach]:
    """The continuous safety checks of the challenger, in a fixed order; [] when safe.

    Args:
        phase: the current phase (1..5), logged with each breach.
        champion: the champion's counts, logged beside the challenger's for context.
        challenger: the counts judged.
        policy: the thresholds.

    Raises:
        InputError: no such phase.
    """
    p, c, ch = policy, challenger, champion
    policy.phase(phase)
    out: list[Breach] = []

    def breach(name: str, message: str, **values: Any) -> None:
        out.append(Breach(name, {"phase": phase, **values}, message))

    if c.errors >= p.error_min_errors and c.error_rate >= p.error_rate_max:
        breach("error_rate", f"challenger error rate {c.error_rate:.4%} is not below "
               f"{p.error_rate_max:.4%}", error_rate=c.error_rate, errors=c.errors,
               requests=c.requests, threshold=p.error_rate_max,
               champion_error_rate=ch.error_rate)
    p99, ch_p99 = c.p99_ms(), ch.p99_ms()
    rel = p.latency_vs_champion_ms
    if (p99 is not None and c.requests >= p.latency_min_requests
            and p99 >= p.latency_p99_max_ms
            and (rel is None or ch_p99 is None or p99 >= ch_p99 + rel)):
        versus = "" if rel is None or ch_p99 is None else (
            f" and {p99 - ch_p99:.2f} ms above the champion's {ch_p99:.2f} ms (limit {rel:g})")
        breach("latency_p99", f"challenger p99 latency {p99:.2f} ms is not below "
               f"{p.latency_p99_max_ms} ms{versus}", p99_ms=_num(p99), requests=c.requests,
               threshold=p.latency_p99_max_ms, champion_p99_ms=ch_p99,
               vs_champion_ms=rel)
    if c.impressions >= p.click_floor_min_impressions and c.clicks < p.click_floor * c.impressions:
        breach("click_floor", f"challenger has {c.clicks} clicks in {c.impressions} "
               f"impressions, under {p.click_floor:g} per impression", clicks=c.clicks,
               impressions=c.impressions, ctr=c.clicks / c.impressions, threshold=p.click_floor)
    bad = sorted(((s.errors / s.calls, value, s) for value, s in
                  c.segments.get(p.segment_errors_dimension, {}).items()
                  if s.calls >= p.segment_min_requests
                  and s.errors > p.segment_error_rate_max * s.calls), reverse=True,
                 key=lambda t: t[0])
    if bad:
        breach("segment_errors", f"{len(bad)} {p.segment_errors_dimension} segment(s) have "
               f"more than {p.segment_error_rate_max:.0%} errors (worst {bad[0][1]}: "
               f"{bad[0][0]:.1%})", dimension=p.segment_errors_dimension,
               threshold=p.segment_error_rate_max,
               segments=[{"value": v, "error_rate": r, "errors": s.errors, "requests": s.calls}
                         for r, v, s in bad])
    lo, hi = c.min_pctr, c.max_pctr
    if lo is not None and hi is not None:
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            breach("prediction_range", f"challenger predictions span [{lo}, {hi}], outside "
                   "[0, 1]", min_pctr=_num(lo), max_pctr=_num(hi))
        elif c.impressions >= p.constant_min_impressions and hi - lo <= p.constant_spread_min:
            breach("constant_predictions", f"challenger predicted {lo} for all "
                   f"{c.impressions} impressions", min_pctr=lo, max_pctr=hi,
                   impressions=c.impressions, threshold=p.constant_spread_min)
    ratio = c.calibration_ratio
    if (max(c.clicks, c.sum_pctr) >= p.collapse_min_clicks
            and not p.collapse_low <= ratio <= p.collapse_high):
        breach("calibration_collapse", f"challenger calibration ratio {ratio:.3f} is outside "
               f"[{p.collapse_low}, {p.collapse_high}]", ratio=_num(ratio), clicks=c.clicks,
               sum_pctr=c.sum_pctr, low=p.collapse_low, high=p.collapse_high,
               champion_ratio=_num(ch.calibration_ratio))
    return out


def _degraded_segments(champion: ArmStats, challenger: ArmStats, policy: Policy
                       ) -> list[dict[str, Any]]:
    """Major segments whose CTR fell by more than ``segment_max_degradation``."""
    out = []
    floor = math.log1p(-policy.segment_max_degradation)
    prior = (policy.prior_alpha, policy.prior_beta)
    for dim, values in sorted(challenger.segments.items()):
        total = sum(s.impressions for s in values.values())
        for value, s2 in sorted(values.items()):
            s1 = champion.segments.get(dim, {}).get(value)
            if s1 is None or not total or s2.impressions < policy.major_segment_min_share * total:
                continue
            args = (s1.clicks, s1.impressions, s2.clicks, s2.impressions)
            lift = float(stats.expected_lift(*args, prior=prior))
            p_deg = float(stats.prob_log_ratio_below(floor, *args, prior=prior))
            if (lift < -policy.segment_max_degradation if policy.segment_confidence is None
                    else p_deg > policy.segment_confidence):
                out.append({"dimension": dim, "value": value, "expected_lift": _num(lift),
                            "p_degraded": p_deg, "impressions": s2.impressions,
                            "share": s2.impressions / total})
    return out


def _calibration(c: ArmStats, p: Policy) -> tuple[Action, str, dict[str, Any]] | None:
    ratio = c.calibration_ratio
    vals: dict[str, Any] = {"ratio": _num(ratio), "clicks": c.clicks, "sum_pctr": c.sum_pctr}
    if max(c.clicks, c.sum_pctr) < p.calibration_min_clicks:
        return Action.HOLD, "calibration", {**vals, "min_clicks": p.calibration_min_clicks}
    if not p.calibration_low <= ratio <= p.calibration_high:
        return Action.ROLLBACK, "calibration", {**vals, "low": p.calibration_low,
                                                "high": p.calibration_high}
    bad = [{"low": b.low, "high": b.high, "ratio": _num(b.sum_pctr / b.clicks if b.clicks
                                                         else math.inf),
            "impressions": b.impressions, "clicks": b.clicks, "sum_pctr": b.sum_pctr}
           for b in c.buckets
           if b.impressions >= p.bucket_min_impressions
           and max(b.clicks, b.sum_pctr) >= p.bucket_min_clicks
           and not (b.clicks and p.bucket_low <= b.sum_pctr / b.clicks <= p.bucket_high)]
    if bad:
        return Action.ROLLBACK, "calibration_bucket", {
            **vals, "buckets": bad, "low": p.bucket_low, "high": p.bucket_high}
    return None


def phase_end(phase: int, champion: ArmStats, challenger: ArmStats, policy: Policy, *,
              final: bool = False) -> Decision:
    """The phase's gates, in order: guardrails, minimum impressions, calibration,
    P(worse), segments, P(better), lift; the first that fails decides.

    Args:
        phase: the phase ending (1..5).
        champion: the champion's counts over the phase.
        challenger: the challenger's counts over the phase.
        policy: the thresholds.
        final: this is the last look (the phase's maximum duration): a gate not met
            rolls back instead of holding.

    Returns:
        ADVANCE (or PROMOTE after the last phase) with name ``passed`` or
        ``inconclusive``; HOLD or ROLLBACK with the failing gate's name; its values
        always hold both arms' counts, the posterior comparison and ``final``.

    Raises:
        InputError: no such phase.
    """
    ph, p = policy.phase(phase), policy
    base: dict[str, Any] = {"phase": phase, "final": final, "share": ph.share,
                            "champion": champion.to_dict(), "challenger": challenger.to_dict()}
    breaches = tuple(guardrails(phase, champion, challenger, policy))
    if breaches:
        return Decision(Action.ROLLBACK, phase, breaches[0].name,
                        {**base, **breaches[0].values}, breaches[0].message, breaches)

    def decide(action: Action, name: str, message: str, **values: Any) -> Decision:
        if action is Action.HOLD and final:
            action, message = Action.ROLLBACK, f"{message} at the phase's last look"
        return Decision(action, phase, name, {**base, **values}, message)

    if challenger.impressions < ph.min_impressions:
        return decide(Action.HOLD, "min_impressions", f"challenger has "
                      f"{challenger.impressions} of {ph.min_impressions} impressions",
                      impressions=challenger.impressions, threshold=ph.min_impressions)
    if ph.calibration and (cal := _calibration(challenger, p)) is not None:
        return decide(cal[0], cal[1], f"calibration gate ({cal[1]}): ratio "
                      f"{cal[2]['ratio']}", **cal[2])
    comparative = (ph.p_better, ph.p_worse_rollback, ph.min_lift)
    if not ph.segments and all(v is None for v in comparative):
        return decide(Action.PROMOTE if ph.promote else Action.ADVANCE,
                      "promote" if ph.promote else "passed", f"phase {phase} gates passed")
    if not (champion.impressions and challenger.impressions):
        return decide(Action.HOLD, "min_impressions", "an arm has no impressions",
                      impressions=challenger.impressions, threshold=max(1, ph.min_impressions))
    prior = (p.prior_alpha, p.prior_beta)
    args = (champion.clicks, champion.impressions, challenger.clicks, challenger.impressions)
    comp = stats.compare(*args, prior=prior)
    base["comparison"] = comp.to_dict()
    if ph.p_worse_rollback is not None and comp.p_worse > ph.p_worse_rollback:
        return decide(Action.ROLLBACK, "p_worse", f"P(challenger worse) = {comp.p_worse:.3f} "
                      f"> {ph.p_worse_rollback}", value=comp.p_worse,
                      threshold=ph.p_worse_rollback)
    if ph.segments and (bad := _degraded_segments(champion, challenger, p)):
        return decide(Action.ROLLBACK, "segment_degraded", f"{len(bad)} major segment(s) "
                      f"degraded by more than {p.segment_max_degradation:.0%}", segments=bad,
                      threshold=p.segment_max_degradation, confidence=p.segment_confidence)
    inconclusive = False
    if ph.p_better is not None and not comp.p_better > ph.p_better:
        if not ph.inconclusive_advances:
            return decide(Action.HOLD, "p_better", f"P(challenger better) = "
                          f"{comp.p_better:.3f} is not above {ph.p_better}",
                          value=comp.p_better, threshold=ph.p_better)
        inconclusive = True
    if ph.min_lift is not None:
        if ph.p_lift is None:
            value, threshold, what = comp.expected_lift, ph.min_lift, "expected lift"
        else:
            value = float(stats.prob_log_ratio_above(math.log1p(ph.min_lift), *args,
                                                     prior=prior))
            threshold, what = ph.p_lift, f"P(lift > {ph.min_lift:.1%})"
        if not value > threshold:
            return decide(Action.HOLD, "lift", f"{what} = {value:.4f} is not above "
                          f"{threshold}", value=value, threshold=threshold,
                          min_lift=ph.min_lift, p_lift=ph.p_lift)
    if ph.promote:
        return decide(Action.PROMOTE, "promote", f"phase {phase} gates passed: promote")
    name = "inconclusive" if inconclusive else "passed"
    return decide(Action.ADVANCE, name, f"phase {phase} gates passed ({name})")
