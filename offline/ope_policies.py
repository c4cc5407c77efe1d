"""Target policies for off-policy evaluation, and the prediction log turned into an
:class:`~offline.ope.OpeLog`.

A **decision** is a served prediction record (``shadow`` false, no ``error``, at least
one candidate) with ``from_ms <= ts < to_ms``, one per ``prediction_id`` (the first
seen; later copies are counted as ``duplicates``). Its **logged action** is the
candidate the served answer put first: the candidate ``i`` whose ``ranks[i]`` equals the
record's ``chosen_rank`` (the model's rank of the candidate shown first; 0 when greedy).
Its **propensity** is the record's ``propensity``; its **reward** is 1 when a click
carrying the same ``prediction_id`` and the logged action's ``ad_id`` has
``ts <= click ts <= ts + attribution`` (both ends inclusive, as ``headrace labels``).

The **target policy** is evaluated with model V's scores of the same request: V's own
record of the ``prediction_id`` — the served one when V served it, the shadow one when V
ran in shadow mode (a challenger before it gets traffic); error records do not count. A
decision without V's record is skipped (``no_model_record``; ``coverage`` is the share
kept), and so is one whose logged ad is not among V's candidates, or for which V ranked
no candidate 0 (``mismatched``). Policies (:func:`parse_policy`), over V's K candidates:

* ``greedy``: put first the candidate V ranks 0: ``pi(a) = [a = g_V]``;
* ``eps:E`` (0 <= E <= 1): ``pi(a) = (1 - E) [a = g_V] + E / K``;
* ``logged``: the logging policy itself: ``pi(a_i) = p_i`` (every weight 1, so IPS and
  SNIPS equal the logged CTR exactly) and the direct-method term is V's reward of the
  logged action, ``qhat(x_i, a_i)``, the one-draw unbiased value of
  ``sum_a p(a | x_i) qhat(x_i, a)`` (the logger's full distribution is not logged), so
  DR is the logged CTR too.

The direct-method model ``qhat(x, a)`` is V's ``p_ctr`` of candidate ``a``. Each
decision's ``full_support`` (:class:`~offline.ope.OpeLog`) is true when its logged
``policy`` is one of :data:`FULL_SUPPORT_POLICIES`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from feature_defs.predictions import PredictionRecord
from headrace.core.errors import InputError
from offline.ope import OpeLog

__all__ = ["FULL_SUPPORT_POLICIES", "TargetPolicy", "parse_policy", "logged_action",
           "target_terms", "DecisionLog", "build_log"]

#: logged ``policy`` prefixes whose stochastic decisions (propensity < 1) give every
#: candidate a positive probability (ε-greedy draws uniformly over all K candidates);
#: other stochastic loggers (``thompson:…``) count as supporting the logged action only
#: (:mod:`offline.ope`, "Support")
FULL_SUPPORT_POLICIES: Final = ("eps-greedy",)


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """A target policy over model V's ranking (module docstring).

    Attributes:
        kind: ``greedy``, ``eps`` or ``logged``.
        epsilon: the uniform share of ``eps`` (0 for the others), in [0, 1].
    """

    kind: Literal["greedy", "eps", "logged"]
    epsilon: float = 0.0

    @property
    def name(self) -> str:
        """The policy as :func:`parse_policy` reads it."""
        return f"eps:{self.epsilon:g}" if self.kind == "eps" else self.kind


def parse_policy(text: str) -> TargetPolicy:
    """``greedy``, ``logged`` or ``eps:E`` with E in [0, 1].

    Raises:
        InputError: anything else.
    """
    value = text.strip().lower()
    if value in ("greedy", "logged"):
        return TargetPolicy(value)  # type: ignore[arg-type]
    m = re.fullmatch(r"eps:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", value)
    if m and 0.0 <= float(m.group(1)) <= 1.0:
        return TargetPolicy("eps", float(m.group(1)))
    raise InputError(f"unknown policy '{text}'; use greedy, logged or eps:E with E in "
                     "[0, 1] (e.g. eps:0.05)")


def logged_action(record: PredictionRecord) -> int | None:
    """Index of the candidate the record's answer put first (``ranks[i] == chosen_rank``,
    ``chosen_rank`` None read as 0), or None when no candidate has that rank."""
    want = 0 if record.chosen_rank is None else int(record.chosen_rank)
    for i, rank in enumerate(record.ranks):
        if int(rank) == want:
            return i
    return None


def target_terms(policy: TargetPolicy, ad_id: str, propensity: float,
                 model: PredictionRecord) -> tuple[float, float, float] | None:
    """``(pi(a_i), sum_a pi(a) qhat(a), qhat(a_i))`` of one decision whose logged ad is
    ``ad_id`` (logged with ``propensity``), from V's record ``model``; None when the
    logged ad is not among V's candidates or V ranks no candidate 0."""
    ads = list(model.ad_ids)
    q = [float(v) for v in model.p_ctr]
    if ad_id not in ads or len(q) != len(ads):
        return None
    q_logged = q[ads.index(ad_id)]
    if policy.kind == "logged":
        return propensity, q_logged, q_logged
    top = [i for i, rank in enumerate(model.ranks) if int(rank) == 0]
    if not top:
        return None
    g = top[0]
    k = len(ads)
    e = policy.epsilon
    pi = (1.0 - e) * (ads[g] == ad_id) + e / k
    return pi, (1.0 - e) * q[g] + e * math.fsum(q) / k, q_logged


@dataclass(slots=True)
class DecisionLog:
    """The decisions of a range joined to V's scores and the clicks.

    Attributes:
        log: the kept decisions, ready for :func:`offline.ope.evaluate`.
        served: decisions in the range (served, not failed, one per prediction id).
        no_model_record: decisions without V's record (skipped).
        mismatched: decisions whose logged ad V did not score, or with no logged action
            (skipped).
        duplicates: later served copies of a prediction id (ignored).
        model_records: V's records seen (served or shadow, not failed).
        clicked: kept decisions with reward 1.
        policies: logged ``policy`` values of the kept decisions, with counts.
    """

    log: OpeLog
    served: int = 0
    no_model_record: int = 0
    mismatched: int = 0
    duplicates: int = 0
    model_records: int = 0
    clicked: int = 0
    policies: dict[str, int] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Share of the range's decisions kept, in [0, 1] (NaN when there are none)."""
        return len(self.log.rewards) / self.served if self.served else math.nan


def build_log(records: Iterable[PredictionRecord], model: str, policy: TargetPolicy,
              clicks: Mapping[tuple[str, str], Sequence[int]], *, from_ms: int, to_ms: int,
              attribution_ms: int) -> DecisionLog:
    """The :class:`DecisionLog` of ``records`` (module docstring).

    Args:
        records: prediction records, any order, any model (served and shadow).
        model: V, the model version whose scores drive the target policy.
        policy: the target policy.
        clicks: click times (epoch ms) per ``(prediction_id, ad_id)``.
        from_ms, to_ms: the decisions' range ``[from_ms, to_ms)``, epoch ms.
        attribution_ms: the attribution window, ms (>= 0).
    """
    served: dict[str, PredictionRecord] = {}
    by_model: dict[str, PredictionRecord] = {}
    duplicates = 0
    for rec in records:
        if rec.error is not None or not rec.ad_ids:
            continue
        if rec.model_version == model:
            by_model.setdefault(rec.prediction_id, rec)
        if rec.shadow or not from_ms <= rec.ts < to_ms:
            continue
        if rec.prediction_id in served:
            duplicates += 1
        else:
            served[rec.prediction_id] = rec
    rows: list[tuple[float, float, float, float, float]] = []
    full: list[bool] = []
    out = DecisionLog(OpeLog(*(np.empty(0),) * 5), served=len(served),
                      duplicates=duplicates, model_records=len(by_model))
    for pid, rec in served.items():
        mine = by_model.get(pid)
        if mine is None:
            out.no_model_record += 1
            continue
        a = logged_action(rec)
        p = math.nan if rec.propensity is None else float(rec.propensity)
        terms = None if a is None else target_terms(policy, rec.ad_ids[a], p, mine)
        if a is None or terms is None:
            out.mismatched += 1
            continue
        ad = rec.ad_ids[a]
        end = rec.ts + attribution_ms
        reward = float(any(rec.ts <= t <= end for t in clicks.get((pid, ad), ())))
        out.clicked += int(reward)
        name = rec.policy or "unknown"
        out.policies[name] = out.policies.get(name, 0) + 1
        rows.append((reward, p, *terms))
        full.append(name.startswith(FULL_SUPPORT_POLICIES))
    if rows:
        cols = np.asarray(rows, dtype=np.float64).T
        out.log = OpeLog(cols[0], cols[1], cols[2], cols[3], cols[4],
                         np.asarray(full, dtype=bool))
    return out
