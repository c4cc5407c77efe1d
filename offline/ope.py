"""Off-policy evaluation estimators: IPS, SNIPS and doubly robust, pure numpy.

One logged decision ``i`` is the tuple

* ``r_i`` — the logged action's reward: 1 when its ad was clicked within the
  attribution window, else 0;
* ``p_i`` — the logging policy's probability of the logged action, in (0, 1];
* ``pi_i`` — the target policy's probability of the same action, in [0, 1];
* ``q_target_i`` — the direct-method model's expected reward under the target policy,
  ``sum_a pi(a | x_i) * qhat(x_i, a)``, in [0, 1];
* ``q_logged_i`` — the direct-method model's reward of the logged action,
  ``qhat(x_i, a_i)``, in [0, 1].

With importance weights ``w_i = pi_i / p_i`` (clipped to ``min(w_i, M)`` when a clip
``M > 0`` is given; default none):

* IPS   = mean(w * r)
* SNIPS = sum(w * r) / sum(w)
* DR    = mean(q_target + w * (r - q_logged))
* ESS   = sum(w)**2 / sum(w**2) (of the weights used, clipped or not), in [0, n].

**Confidence intervals** (:data:`CI_METHOD`): 95 % normal intervals. IPS and DR are
means of independent per-decision terms, so ``mean +- 1.96 * sd / sqrt(n)`` (sd with
``ddof=1``) is their CLT interval; SNIPS is a ratio of two means and gets the delta
method's interval, the same formula on its linearised terms
``w_i * (r_i - SNIPS) / mean(w)``. Chosen over the percentile bootstrap because it is
exact arithmetic (no seed, no resampling noise), costs O(n) — the benchmark evaluates
hundreds of seeded logs at once — and the CLT holds at the sample sizes the ESS floor
(:data:`DEFAULT_MIN_ESS`, 100) admits; ``headrace bench ope`` measures the coverage it
actually reaches. With clipping the interval is that of the clipped (biased)
estimator.

**Support (overlap)**. A decision whose logging propensity is 1 was logged by a
deterministic choice: the logger had probability 0 for every other candidate, so the
target's mass on those (``1 - pi_i``) is unsupported — no log can say what it is worth.
A decision with ``p_i < 1`` and ``full_support_i`` true was logged by a stochastic policy
known to give every candidate a positive probability (ε-greedy over all K candidates),
so all of the target's mass there is supported. One with ``p_i < 1`` but
``full_support_i`` false (a logger whose other probabilities are not known, such as
Thompson sampling, where a known ad below the top never wins) counts like a
deterministic one: only the mass on the logged action is known to be supported.
``full_support`` defaults to ``p_i < 1``. ``support = 1 - mean_i(unsupported_i)``, the share
of the target's probability mass the log covers; :func:`evaluate` refuses below
``min_support`` (default :data:`DEFAULT_MIN_SUPPORT`, 0.99: at most 1 % of the mass
unidentifiable, which bounds the bias of IPS on rewards in [0, 1] by 0.01).
``differs_share = mean_i(1 - pi_i)``: for a deterministic target, the share of
decisions where its action differs from the logged one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from headrace.core.errors import InputError

__all__ = ["Z95", "CI_METHOD", "DEFAULT_MIN_ESS", "DEFAULT_MIN_SUPPORT", "Interval",
           "OpeLog", "OpeReport", "importance_weights", "effective_sample_size", "ips",
           "snips", "dr", "unsupported_mass", "evaluate"]

FloatArray = npt.NDArray[np.float64]

#: the standard normal's 97.5 % quantile
Z95: Final = 1.959963984540054
CI_METHOD: Final = ("normal 95%: mean +- 1.96 sd/sqrt(n) of the per-decision terms (IPS, "
                    "DR); delta method on the linearised terms w(r - snips)/mean(w) (SNIPS)")
#: ESS below this is refused (too few effective decisions for the CLT interval)
DEFAULT_MIN_ESS: Final = 100.0
#: the share of the target's probability mass the log must support
DEFAULT_MIN_SUPPORT: Final = 0.99
#: a propensity at or above this is a deterministic choice (p = 1)
_DETERMINISTIC: Final = 1.0 - 1e-9


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate with its 95 % interval (same units as the reward: a CTR in [0, 1])."""

    value: float
    ci_low: float
    ci_high: float


def _interval(terms: FloatArray, center: FloatArray | None = None,
              ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(value, low, high) along the last axis: value = mean(terms) unless ``center`` is
    given (SNIPS: its terms are the linearised ones, of mean 0)."""
    n = terms.shape[-1]
    value = terms.mean(axis=-1) if center is None else center
    if n < 2:
        se = np.full(np.shape(value), np.nan)
    else:
        se = terms.std(axis=-1, ddof=1) / np.sqrt(n)
    return value, value - Z95 * se, value + Z95 * se


def importance_weights(target_prob: npt.ArrayLike, logging_prob: npt.ArrayLike,
                       clip: float | None = None) -> FloatArray:
    """``w = pi / p``, elementwise, then ``min(w, clip)`` when ``clip`` is given.

    ``logging_prob`` must be in (0, 1] (checked by :func:`evaluate`, not here).
    """
    w = np.asarray(target_prob, dtype=np.float64) / np.asarray(logging_prob, dtype=np.float64)
    return w if clip is None else np.minimum(w, clip)


def effective_sample_size(w: FloatArray) -> FloatArray:
    """``sum(w)**2 / sum(w**2)`` along the last axis (0 when every weight is 0)."""
    s2 = np.square(w).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s2 > 0, np.square(w.sum(axis=-1)) / np.where(s2 > 0, s2, 1.0), 0.0)


def ips(w: FloatArray, r: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """IPS ``mean(w r)`` and its normal 95 % interval, along the last axis."""
    return _interval(w * r)


def snips(w: FloatArray, r: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """SNIPS ``sum(w r) / sum(w)`` and its delta-method 95 % interval, along the last axis
    (NaN where ``sum(w) == 0``)."""
    sw = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(sw > 0, (w * r).sum(axis=-1) / np.where(sw > 0, sw, 1.0), np.nan)
        mean_w = sw / w.shape[-1]
        lin = w * (r - value[..., None]) / mean_w[..., None]
    return _interval(lin, center=value)


def dr(w: FloatArray, r: FloatArray, q_target: FloatArray, q_logged: FloatArray,
       ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """DR ``mean(q_target + w (r - q_logged))`` and its normal 95 % interval, along the
    last axis."""
    return _interval(q_target + w * (r - q_logged))


def unsupported_mass(target_prob: FloatArray, logging_prob: FloatArray,
                     full_support: npt.NDArray[np.bool_] | None = None) -> FloatArray:
    """Per decision, the target's probability mass the log cannot support: ``1 - pi`` where
    the logger chose deterministically (``p == 1``) or is not known to support every
    candidate (``full_support`` false), else 0 (module docstring, "Support")."""
    known = logging_prob < _DETERMINISTIC
    if full_support is not None:
        known &= full_support
    return np.where(known, 0.0, 1.0 - target_prob)


@dataclass(frozen=True, slots=True)
class OpeLog:
    """The logged decisions, one entry per decision in each array (module docstring for
    each field's meaning and bounds). ``logging_prob`` NaN = the decision carries no
    logging propensity (refused by :func:`evaluate`). ``full_support``: per decision,
    whether the logger is known to give every candidate a positive probability (None:
    ``logging_prob < 1``; module docstring, "Support")."""

    rewards: FloatArray
    logging_prob: FloatArray
    target_prob: FloatArray
    q_target: FloatArray
    q_logged: FloatArray
    full_support: npt.NDArray[np.bool_] | None = None


@dataclass(frozen=True, slots=True)
class OpeReport:
    """What :func:`evaluate` returns (CTRs in [0, 1]).

    Attributes:
        decisions: the decisions evaluated (n).
        logged_ctr: mean reward of the log (the logging policy's on-policy value).
        ips, snips, dr: the estimates of the target policy's CTR with their intervals.
        ess: effective sample size of the weights used, in [0, n].
        clip: the weight clip M, or None.
        max_weight: the largest weight used.
        support: share of the target's mass the log supports, in [0, 1].
        differs_share: mean of ``1 - pi`` (for a deterministic target, the share of
            decisions where its action differs from the logged one).
        ci_method: :data:`CI_METHOD`.
    """

    decisions: int
    logged_ctr: float
    ips: Interval
    snips: Interval
    dr: Interval
    ess: float
    clip: float | None
    max_weight: float
    support: float
    differs_share: float
    ci_method: str = CI_METHOD


def _check_unit(name: str, values: FloatArray, *, allow_nan: bool = False) -> None:
    bad = ~((values >= 0.0) & (values <= 1.0))
    if allow_nan:
        bad &= ~np.isnan(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name} of decision {i} is {values[i]!r}, outside [0, 1]")


def evaluate(log: OpeLog, *, clip: float | None = None, min_ess: float = DEFAULT_MIN_ESS,
             min_support: float = DEFAULT_MIN_SUPPORT) -> OpeReport:
    """IPS, SNIPS and DR of the target policy on ``log``, with 95 % intervals.

    Args:
        log: the decisions (arrays of equal length).
        clip: weight clip M > 0 (``w <- min(w, M)``); None: no clipping.
        min_ess: refuse when the ESS of the weights used is below this.
        min_support: refuse when the supported share of the target's mass is below this
            (module docstring, "Support"), in [0, 1].

    Raises:
        InputError: (one sentence) an empty log; arrays of different lengths; a decision
            without a logging propensity, or one outside (0, 1]; a reward not 0/1; a
            probability or model reward outside [0, 1]; a clip that is not positive;
            support below ``min_support``; ESS below ``min_ess``.
    """
    arrays = {name: np.asarray(getattr(log, name), dtype=np.float64)
              for name in ("rewards", "logging_prob", "target_prob", "q_target", "q_logged")}
    n = len(arrays["rewards"])
    if n == 0:
        raise InputError("no logged decision to evaluate: the range is empty")
    if any(a.shape != (n,) for a in arrays.values()):
        raise InputError("the decision arrays differ in length")
    if clip is not None and not clip > 0:
        raise InputError(f"the weight clip must be positive, got {clip!r}")
    r, p, pi = arrays["rewards"], arrays["logging_prob"], arrays["target_prob"]
    q_t, q_l = arrays["q_target"], arrays["q_logged"]
    missing = int(np.isnan(p).sum())
    if missing:
        raise InputError(f"{missing} of {n} decisions carry no logging propensity (records "
                         "before schema 3, or a logger that does not log one): off-policy "
                         "evaluation needs the propensity of every logged decision")
    if ((p <= 0) | (p > 1)).any():
        i = int(np.flatnonzero((p <= 0) | (p > 1))[0])
        raise InputError(f"the logging propensity of decision {i} is {p[i]!r}, outside "
                         "(0, 1]")
    if not np.isin(r, (0.0, 1.0)).all():
        raise InputError("a reward is not 0 or 1")
    _check_unit("the target probability", pi)
    _check_unit("the model's reward of the target policy", q_t)
    _check_unit("the model's reward of the logged action", q_l)
    full = None if log.full_support is None else np.asarray(log.full_support, dtype=bool)
    if full is not None and full.shape != (n,):
        raise InputError("the decision arrays differ in length")
    unsupported = unsupported_mass(pi, p, full)
    support = 1.0 - float(unsupported.mean())
    differs = float((1.0 - pi).mean())
    if support < min_support:
        raise InputError(
            f"the log supports only {support:.1%} of the target policy's probability mass "
            f"(below {min_support:.1%}): on {int((unsupported > 0).sum())} of {n} decisions "
            "the logger chose deterministically (propensity 1, or a policy not known to "
            "try every candidate) and the target puts mass on other candidates, whose "
            "reward no log shows; evaluate on a log with exploration")
    w = importance_weights(pi, p, clip)
    ess = float(effective_sample_size(w))
    if ess < min_ess:
        raise InputError(f"the effective sample size is {ess:.1f}, below the minimum "
                         f"{min_ess:g}: too few logged decisions agree with the target "
                         "policy for a reliable estimate")

    def interval(t: tuple[FloatArray, FloatArray, FloatArray]) -> Interval:
        return Interval(float(t[0]), float(t[1]), float(t[2]))

    return OpeReport(decisions=n, logged_ctr=float(r.mean()), ips=interval(ips(w, r)),
                     snips=interval(snips(w, r)), dr=interval(dr(w, r, q_t, q_l)),
                     ess=ess, clip=clip, max_weight=float(w.max()), support=support,
                     differs_share=differs)
