"""Exploration in ``Score``: which candidate takes the first slot when it is not the
greedy one, with what probability (the logged propensity), within a shared budget.

Policies (``HEADRACE_EXPLORE``; :class:`ExploreConfig`), applied to the served arm's
model (champion or challenger) the same way:

* ``off`` (default): greedy, the first slot is the best eCPM; propensity 1.0, policy
  ``greedy``.
* ``eps-greedy``: on an eligible request, with probability ε the first slot goes to a
  candidate drawn uniformly among ALL K candidates (the greedy one included), else to
  the greedy one. Exact propensity of the candidate shown first:
  ``(1 - ε)·[it is the greedy one] + ε/K`` (:func:`eps_greedy_propensity`).
* ``thompson`` (``thompson:v1``): each NEW candidate ad's CTR is drawn from
  ``Beta(α0 + clicks, β0 + impressions - clicks)`` (its ``ad__clicks_24h`` and
  ``ad__impressions_24h``), with the prior ``α0 = s·p0``, ``β0 = s·(1 - p0)``: ``p0`` the
  ads' prior CTR (the global prior of ``ad__ctr_24h``, what the GLOBAL cold-start tier
  serves an ad without data; the model's pCTR of that candidate where the priors hold
  none) and ``s`` = ``HEADRACE_EXPLORE_PRIOR_STRENGTH`` pseudo-impressions (100). Known
  ads keep the model's pCTR. Of many new candidates only the :data:`CONTENDERS` (16)
  with the highest optimistic eCPM (posterior mean + 3 sd, × bid) are drawn, the
  others keep the model's pCTR too (a draw costs ~40 ns: 100 new candidates × 257 draws
  took 4 ms here, 16 take ~0.5 ms). The first slot is the argmax of draw × bid (ties:
  the lowest request index, as the greedy ranking). Propensity: Monte Carlo over
  ``M + 1`` draws, the served draw and ``M`` fresh ones (``HEADRACE_EXPLORE_DRAWS``,
  256): ``p̂ = (1 + #{fresh draws won by the shown candidate}) / (M + 1)``, never 0; its
  bias is ``(1 - π)/(M + 1)`` ≤ 0.0039 and its standard error
  ``sqrt(M·π(1 - π))/(M + 1)`` ≤ 0.031 at M = 256 (relative error ``≈ 1/sqrt(M·π)``:
  0.2 at π = 0.1).

Eligible requests: at least one candidate ad with fewer than
``HEADRACE_EXPLORE_NEW_AD_IMPRESSIONS`` (1000) impressions in 24 h, or a new user (a
cold-start tier of the user other than PERSONALIZED: BLENDED, SEGMENT, GLOBAL —
anonymous included). Thompson draws the new ads when the request has any (the known
ads keep the model's pCTR); a request whose only novelty is the user draws EVERY
candidate's CTR from ``Beta(u·p, u·(1 - p))`` around the model's pCTR ``p`` (what the
user's cold-start tier serves), ``u`` = ``HEADRACE_EXPLORE_USER_STRENGTH`` (50)
pseudo-impressions: the less the model knows of the user, the more a draw can reorder
its candidates. A request answered by the
cold-start model (the store could not answer, no counts) is ineligible.

Outcomes (``headrace_scoring_explore_total{policy,outcome}``): ``explored`` (the first
slot differs from the greedy one), ``greedy`` (eligible, the policy put the greedy one
first: propensity < 1), ``budget_exhausted`` (eligible, the budget said no: greedy,
propensity 1.0), ``ineligible`` (greedy, propensity 1.0). The propensity is the
probability under what the request was subject to: the budget's state is part of the
request's context, decided before any draw.

Determinism: every request's draws come from a generator seeded by
``(HEADRACE_EXPLORE_SEED, xxh64(prediction_id))`` (:func:`request_rng`): the same seed and
prediction id give the same answer whatever the order of the requests or threads.

The budget: :mod:`serving.explore_budget` (a request explores only while the explored
share of answers over a sliding 60 s, summed over every server through Redis, stays
within ``HEADRACE_EXPLORE_BUDGET``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import xxhash

from feature_defs.coldstart import Tier
from headrace.core.errors import InputError
from serving.explore_budget import (
    BUDGET_SCRIPT,
    BudgetCounter,
    ExploreBudget,
    MemoryBudgetCounter,
    RedisBudgetCounter,
)

if TYPE_CHECKING:
    from headrace.core.settings import ServeSettings

__all__ = ["GREEDY", "THOMPSON_V1", "OUTCOMES", "POLICIES", "ExploreConfig", "Decision",
           "request_rng", "eps_greedy_propensity", "eps_greedy", "beta_prior",
           "thompson_draws", "thompson", "is_eligible", "decide", "served_order",
           "BudgetCounter", "MemoryBudgetCounter", "RedisBudgetCounter", "ExploreBudget",
           "BUDGET_SCRIPT", "PRIOR_CTR_FEATURE", "CONTENDERS", "Exploration", "exploration"]

log = logging.getLogger(__name__)

#: the policy label of greedy answers (exploration off, shadows)
GREEDY: Final = "greedy"
#: the Thompson policy's version label
THOMPSON_V1: Final = "thompson:v1"
#: the outcomes counted in ``headrace_scoring_explore_total``
OUTCOMES: Final = ("explored", "greedy", "budget_exhausted", "ineligible")
#: the values of ``HEADRACE_EXPLORE``
POLICIES: Final = ("off", "eps-greedy", "thompson")
Policy = Literal["off", "eps-greedy", "thompson"]
#: Thompson draws at most this many new candidates per request (the most promising)
CONTENDERS: Final = 16
#: the feature whose global prior is a new ad's prior CTR (Thompson)
PRIOR_CTR_FEATURE: Final = "ad__ctr_24h"
_P_CLIP: Final = 1e-6  # a prior CTR of exactly 0 or 1 is not a Beta mean


@dataclass(frozen=True)
class ExploreConfig:
    """One deployment's exploration (``HEADRACE_EXPLORE_*``, see ``ServeSettings``).

    Attributes:
        policy: ``off``, ``eps-greedy`` or ``thompson``.
        epsilon: ε-greedy's exploration probability on an eligible request, (0, 1].
        budget: most explored share of all answers, (0, 1).
        seed: seed of the draws; None: a random one (set by the caller).
        new_ad_impressions: an ad below this many 24 h impressions is new, >= 1.
        draws: Thompson's Monte Carlo draws M, 16..8192.
        prior_strength: Thompson's prior pseudo-impressions s of a new ad, > 0.
        user_strength: Thompson's pseudo-impressions behind each candidate's pCTR for a
            new user (a cold-start tier: the model's pCTR is a prior there), > 0.

    Raises:
        InputError: a value out of its bounds (one sentence naming it).
    """

    policy: Policy = "off"
    epsilon: float = 0.05
    budget: float = 0.02
    seed: int = 0
    new_ad_impressions: int = 1000
    draws: int = 256
    prior_strength: float = 100.0
    user_strength: float = 50.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"HEADRACE_EXPLORE must be one of {', '.join(POLICIES)}, "
                             f"not {self.policy!r}")
        if not 0.0 < self.epsilon <= 1.0:
            raise InputError(f"HEADRACE_EXPLORE_EPSILON must be in (0, 1], not {self.epsilon}")
        if not 0.0 < self.budget < 1.0:
            raise InputError(f"HEADRACE_EXPLORE_BUDGET must be in (0, 1), not {self.budget}")
        if self.new_ad_impressions < 1:
            raise InputError("HEADRACE_EXPLORE_NEW_AD_IMPRESSIONS must be at least 1, not "
                             f"{self.new_ad_impressions}")
        if not 16 <= self.draws <= 8192:
            raise InputError(f"HEADRACE_EXPLORE_DRAWS must be in 16..8192, not {self.draws}")
        if not self.prior_strength > 0.0:
            raise InputError("HEADRACE_EXPLORE_PRIOR_STRENGTH must be positive, not "
                             f"{self.prior_strength}")
        if not self.user_strength > 0.0:
            raise InputError("HEADRACE_EXPLORE_USER_STRENGTH must be positive, not "
                             f"{self.user_strength}")

    @property
    def on(self) -> bool:
        """Whether the policy explores at all."""
        return self.policy != "off"

    @property
    def label(self) -> str:
        """The policy version logged with every answer: ``greedy``,
        ``eps-greedy:0.05``, ``thompson:v1``."""
        if self.policy == "eps-greedy":
            return f"eps-greedy:{self.epsilon:g}"
        return THOMPSON_V1 if self.policy == "thompson" else GREEDY


@dataclass(frozen=True, slots=True)
class Decision:
    """Who takes the first slot of one answer.

    Attributes:
        first: request index of the candidate shown first.
        propensity: probability, under the policy applied, that ``first`` is shown
            first (in (0, 1]; 1.0 for a deterministic greedy answer).
        explored: ``first`` is not the greedy first candidate.
        outcome: one of :data:`OUTCOMES`.
    """

    first: int
    propensity: float
    explored: bool
    outcome: str


def request_rng(seed: int, prediction_id: str) -> np.random.Generator:
    """The generator of one request's draws: seeded by ``(seed, xxh64(prediction_id))``,
    so a request's draws depend on nothing else (thread order, other requests)."""
    return np.random.Generator(np.random.PCG64(
        [seed & 0xFFFF_FFFF_FFFF_FFFF, xxhash.xxh64_intdigest(prediction_id.encode())]))


def eps_greedy_propensity(shown: int, greedy: int, k: int, epsilon: float) -> float:
    """Exact probability that ε-greedy over ``k`` candidates shows ``shown`` first when
    the greedy first is ``greedy``: ``(1 - ε)·[shown == greedy] + ε/k``."""
    return (1.0 - epsilon) * (shown == greedy) + epsilon / k


def eps_greedy(rng: np.random.Generator, greedy: int, k: int, epsilon: float
               ) -> tuple[int, float]:
    """One ε-greedy draw: (candidate shown first, its exact propensity).

    With probability ``epsilon`` a uniform draw among all ``k`` candidates (it may be the
    greedy one), else ``greedy``.
    """
    first = int(rng.integers(k)) if rng.random() < epsilon else greedy
    return first, eps_greedy_propensity(first, greedy, k, epsilon)


def beta_prior(prior_ctr: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """``(α0, β0) = (s·p0, s·(1 - p0))`` per candidate, ``p0`` clipped to
    [1e-6, 1 - 1e-6] (a NaN prior reads 1e-6)."""
    p0 = np.clip(np.nan_to_num(prior_ctr, nan=_P_CLIP), _P_CLIP, 1.0 - _P_CLIP)
    return strength * p0, strength * (1.0 - p0)


def thompson_draws(rng: np.random.Generator, p: np.ndarray, bids: np.ndarray,
                   new: np.ndarray, alpha: np.ndarray, beta: np.ndarray, m: int
                   ) -> np.ndarray:
    """``m`` Thompson rankings at once: the winner (request index) of each draw.

    Args:
        rng: the request's generator.
        p: the model's pCTR per candidate (request order).
        bids: bid per candidate (any positive unit: only the argmax matters).
        new: boolean mask of the candidates drawn; the others keep ``p``.
        alpha, beta: the posterior Beta parameters of the ``new`` candidates, in order.
        m: number of draws.

    Returns:
        ``m`` winners: argmax over candidates of draw × bid (lowest index on ties). Only
        the drawn columns and the best of the others take part (the others can never
        win): an ``(m, drawn + 1)`` matrix, not ``(m, K)``.
    """
    cols = np.flatnonzero(new)
    rest = np.flatnonzero(~new)
    if len(rest):
        known = p[rest] * bids[rest]
        cols = np.sort(np.append(cols, rest[int(np.argmax(known))]))
    score = np.empty((m, len(cols)))
    drawn = new[cols]
    score[:, ~drawn] = (p * bids)[cols[~drawn]]
    if drawn.any():
        score[:, drawn] = rng.beta(alpha, beta, size=(m, int(drawn.sum()))) * \
            bids[cols[drawn]]
    return cols[np.argmax(score, axis=1)]


def thompson(rng: np.random.Generator, p: np.ndarray, bids: np.ndarray, new: np.ndarray,
             prior_ctr: np.ndarray, impressions: np.ndarray, clicks: np.ndarray, *,
             strength: float, draws: int, contenders: int = CONTENDERS) -> tuple[int, float]:
    """One Thompson decision: (candidate shown first, its Monte Carlo propensity).

    ``impressions``/``clicks``/``prior_ctr`` are per candidate (only the ``new`` ones
    are read); clicks are clipped to [0, impressions]. Only the ``contenders`` new
    candidates of highest optimistic eCPM (posterior mean + 3 standard deviations, × bid;
    ties: lowest index) are drawn; the other new ones keep the model's pCTR (part of
    the policy: the propensity is exact for it up to the Monte Carlo error). The served
    draw is the first of ``draws + 1``; the propensity is the share of all of them the
    shown candidate won (see the module docstring for its error).
    """
    cols = np.flatnonzero(new)
    a0, b0 = beta_prior(prior_ctr[cols], strength)
    n = np.maximum(impressions[cols], 0.0)
    c = np.clip(clicks[cols], 0.0, n)
    alpha, beta = a0 + c, b0 + n - c
    if len(cols) > contenders:
        tot = alpha + beta
        upper = (alpha / tot + 3.0 * np.sqrt(alpha * beta / (tot * tot * (tot + 1.0)))) \
            * bids[cols]
        keep = np.sort(np.argsort(-upper, kind="stable")[:contenders])
        cols, alpha, beta = cols[keep], alpha[keep], beta[keep]
        new = np.zeros_like(new)
        new[cols] = True
    winners = thompson_draws(rng, p, bids, new, alpha, beta, draws + 1)
    first = int(winners[0])
    return first, float(np.count_nonzero(winners == first)) / (draws + 1)


def is_eligible(impressions: np.ndarray | None, user_tier: int, threshold: int) -> bool:
    """A request with a new candidate ad (below ``threshold`` impressions) or a new user
    (tier BLENDED, SEGMENT or GLOBAL). ``impressions`` None: unknown (not eligible)."""
    if impressions is None:
        return False
    return bool((impressions < threshold).any()) or user_tier in _NEW_USER


_NEW_USER: Final = frozenset({int(Tier.BLENDED), int(Tier.SEGMENT), int(Tier.GLOBAL)})


def decide(config: ExploreConfig, rng: np.random.Generator, greedy: int, p: np.ndarray,
           bids: np.ndarray, impressions: np.ndarray, clicks: np.ndarray,
           prior_ctr: np.ndarray, user_tier: int | None = None) -> Decision:
    """The policy's draw for one eligible request whose budget allows exploring.

    Args:
        config: the deployment's policy (``on``).
        rng: the request's generator (:func:`request_rng`).
        greedy: request index of the greedy first candidate.
        p, bids, impressions, clicks, prior_ctr: per candidate, request order.
        user_tier: the user's cold-start tier (Thompson explores for a new user when no
            candidate ad is new); None: unknown, treated as known.

    Returns:
        The decision (outcome ``explored`` or ``greedy``).
    """
    k = len(p)
    if config.policy == "eps-greedy":
        first, prop = eps_greedy(rng, greedy, k, config.epsilon)
    else:
        new = impressions < config.new_ad_impressions
        if new.any():
            first, prop = thompson(rng, p, bids, new, prior_ctr, impressions, clicks,
                                   strength=config.prior_strength, draws=config.draws)
        elif user_tier in _NEW_USER:
            # a new user: every candidate's CTR for this user is uncertain, around the
            # model's pCTR (what the cold-start tier serves) with user_strength behind it
            everyone, none = np.ones(k, dtype=bool), np.zeros(k)
            first, prop = thompson(rng, p, bids, everyone, p, none, none,
                                   strength=config.user_strength, draws=config.draws)
        else:
            return Decision(greedy, 1.0, False, "greedy")
    explored = first != greedy
    return Decision(first, prop, explored, "explored" if explored else "greedy")


def served_order(order: np.ndarray, first: int) -> np.ndarray:
    """The served ranking: ``first`` at rank 0, the others in ``order`` (greedy) order."""
    if int(order[0]) == first:
        return order
    return np.concatenate(([first], order[order != first])).astype(order.dtype, copy=False)


@dataclass(frozen=True)
class Exploration:
    """A deployment's exploration as ``Score`` applies it: the policy and its budget."""

    config: ExploreConfig
    budget: ExploreBudget


def exploration(settings: ServeSettings, server_id: str, *,
                on_failure: Callable[[], Any] | None = None) -> Exploration | None:
    """The server's exploration from ``HEADRACE_EXPLORE_*`` (None when off): the budget
    shared through Redis (``settings.redis_config()``, 0.5 s timeout, key prefix
    ``settings.redis_prefix``), ``server_id`` + a random suffix as its token.

    Raises:
        InputError: a setting out of its bounds.
    """
    import secrets

    if settings.explore == "off":
        return None
    seed = settings.explore_seed
    config = ExploreConfig(settings.explore, settings.explore_epsilon, settings.explore_budget,
                           secrets.randbits(63) if seed is None else seed,
                           settings.explore_new_ad_impressions, settings.explore_draws,
                           settings.explore_prior_strength, settings.explore_user_strength)
    client = settings.redis_config().client(socket_timeout=0.5, socket_connect_timeout=0.5,
                                            retry=None)
    budget = ExploreBudget(config.budget, RedisBudgetCounter(client, settings.redis_prefix),
                           f"{server_id}-{secrets.token_hex(4)}", on_failure=on_failure)
    return Exploration(config, budget)
