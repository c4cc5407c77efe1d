"""``headrace bench ope``: the off-policy estimators on a synthetic contextual bandit
whose target-policy value is known exactly.

No stack: :mod:`offline.ope`'s estimators on seeded numpy draws, every seed at once
(arrays of shape seeds × decisions). The world, fixed by ``world_seed``:

* ``contexts`` context types x with probabilities P(x) (Dirichlet(2) draw);
* ``actions`` K candidates with a known CTR(x, a), uniform in [``ctr_low``,
  ``ctr_high``];
* the **logging policy**: ε-greedy (``epsilon``, uniform over all K) around the argmax
  of a noisy model, CTR × lognormal(0, ``logger_noise``), so its propensities
  ``(1 - ε) [a = g_log(x)] + ε / K`` are known exactly;
* the **target policy**: ``eps:target_epsilon`` around the argmax of a better model,
  CTR × lognormal(0, ``target_noise``): ``pi(a | x) = (1 - e) [a = g_t(x)] + e / K``;
  its value ``V(pi) = sum_x P(x) sum_a pi(a | x) CTR(x, a)`` is computed exactly, and so
  is the logger's (the reference).

Per seed: ``decisions`` draws of x ~ P, a ~ logger, r ~ Bernoulli(CTR(x, a)); the
direct-method model is the true CTR times a per-seed noise factor,
``qhat(x, a) = min(1, CTR(x, a) * exp(N(0, dm_noise)))`` (a known, seed-varying bias, so
DR is tested with a wrong model, as in production). Figures: per estimator the share of
seeds whose 95 % interval holds V(pi) (``*_ci_coverage``), the RMSE over seeds, the mean
bias; the mean ESS; the direct method alone (``dm_rmse``, its bias un-corrected) as the
same-run reference beside the logger's value. ``clipped`` repeats the three with weights
clipped at ``clip`` (bias against variance). Targets: coverage >= 0.9 for IPS and DR,
DR RMSE below IPS RMSE.

``exploring`` (``exploring_seconds`` > 0): the exploring ``Score`` decisions of
:func:`bench.score.run_exploring_score` (the product's eligibility, shared budget,
draws and propensities on a synthetic ad world, no stack) for greedy, ε-greedy and
Thompson: ``explore_share`` against ``explore_budget``, impressions per new ad and the
seconds until every new ad had 1,000 impressions (``None``: not within the run), the
CTR each policy paid; and the estimators on ``ope_seeds`` ε-greedy logs of their own,
evaluating the greedy policy, whose value on each log's requests is known (the mean true
CTR of its greedy choices): coverage of the 95 % intervals and RMSE over the logs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from offline.ope import CI_METHOD, dr, effective_sample_size, importance_weights, ips, snips

__all__ = ["run", "World", "make_world"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class World:
    """The bandit: P(x), CTR(x, a), the logger's and the target's action distributions
    (rows x, columns a), each row summing to 1."""

    def __init__(self, p_x: FloatArray, ctr: FloatArray, logger: FloatArray,
                 target: FloatArray) -> None:
        self.p_x, self.ctr, self.logger, self.target = p_x, ctr, logger, target

    def value(self, policy: FloatArray) -> float:
        """``sum_x P(x) sum_a policy(a | x) CTR(x, a)``, exactly (a CTR in [0, 1])."""
        return float(self.p_x @ (policy * self.ctr).sum(axis=1))


def _eps_greedy(scores: FloatArray, eps: float) -> FloatArray:
    k = scores.shape[1]
    dist = np.full(scores.shape, eps / k)
    dist[np.arange(scores.shape[0]), scores.argmax(axis=1)] += 1.0 - eps
    return dist


def make_world(contexts: int, actions: int, epsilon: float, target_epsilon: float,
               logger_noise: float, target_noise: float, ctr_low: float, ctr_high: float,
               seed: int) -> World:
    """The fixed bandit (module docstring), from ``seed``."""
    rng = np.random.default_rng(seed)
    p_x = rng.dirichlet(np.full(contexts, 2.0))
    ctr = rng.uniform(ctr_low, ctr_high, (contexts, actions))
    log_scores = ctr * np.exp(rng.normal(0.0, logger_noise, ctr.shape))
    tgt_scores = ctr * np.exp(rng.normal(0.0, target_noise, ctr.shape))
    return World(p_x, ctr, _eps_greedy(log_scores, epsilon),
                 _eps_greedy(tgt_scores, target_epsilon))


def _score(est: tuple[FloatArray, FloatArray, FloatArray], truth: float) -> dict[str, float]:
    value, low, high = est
    return {"ci_coverage": float(((low <= truth) & (truth <= high)).mean()),
            "rmse": float(np.sqrt(np.mean((value - truth) ** 2))),
            "bias": float(np.mean(value - truth))}


def _estimates(w: FloatArray, r: FloatArray, q_t: FloatArray, q_l: FloatArray,
               truth: float) -> dict[str, dict[str, float]]:
    return {"ips": _score(ips(w, r), truth), "snips": _score(snips(w, r), truth),
            "dr": _score(dr(w, r, q_t, q_l), truth)}


def run(seeds: int = 500, decisions: int = 4000, contexts: int = 6, actions: int = 4,
        epsilon: float = 0.3, target_epsilon: float = 0.05, logger_noise: float = 0.6,
        target_noise: float = 0.15, dm_noise: float = 0.3, ctr_low: float = 0.02,
        ctr_high: float = 0.3, clip: float = 10.0, world_seed: int = 0, seed: int = 1,
        exploring_seconds: float = 600.0) -> dict[str, Any]:
    """Simulate ``seeds`` logs of ``decisions`` each and score the estimators (module
    docstring); returns the figures (JSON-able).

    Raises:
        TypeError: a parameter out of range (``headrace bench`` reports it as a bad
            ``--set``).
    """
    t0 = time.perf_counter()
    if seeds < 1 or decisions < 2 or contexts < 1 or actions < 2 or not 0 < epsilon <= 1 \
            or not 0 <= target_epsilon <= 1 or not 0 <= ctr_low <= ctr_high <= 1 \
            or clip <= 0:
        raise TypeError("need seeds >= 1, decisions >= 2, contexts >= 1, actions >= 2, "
                        "0 < epsilon <= 1, 0 <= target_epsilon <= 1, "
                        "0 <= ctr_low <= ctr_high <= 1, clip > 0")
    world = make_world(contexts, actions, epsilon, target_epsilon, logger_noise,
                       target_noise, ctr_low, ctr_high, world_seed)
    truth = world.value(world.target)
    rng = np.random.default_rng(seed)
    shape = (seeds, decisions)
    x = rng.choice(contexts, size=shape, p=world.p_x)
    explore = rng.random(shape) < epsilon
    greedy = world.logger.argmax(axis=1)[x]
    a = np.where(explore, rng.integers(0, actions, shape), greedy)
    r = (rng.random(shape) < world.ctr[x, a]).astype(np.float64)
    p = world.logger[x, a]
    pi = world.target[x, a]
    q_hat = np.minimum(1.0, world.ctr[None] * np.exp(
        rng.normal(0.0, dm_noise, (seeds, contexts, actions))))
    rows = np.arange(seeds)[:, None]
    q_logged = q_hat[rows, x, a]
    q_target = (q_hat * world.target[None]).sum(axis=2)[rows, x]
    w = importance_weights(pi, p)
    est = _estimates(w, r, q_target, q_logged, truth)
    dm = q_target.mean(axis=1)
    wc = importance_weights(pi, p, clip)
    clipped = _estimates(wc, r, q_target, q_logged, truth)
    figures: dict[str, Any] = {
        "seeds": seeds, "decisions": decisions, "true_value": truth,
        "logging_value": world.value(world.logger),
        **{f"{k}_ci_coverage": v["ci_coverage"] for k, v in est.items()},
        **{f"{k}_rmse": v["rmse"] for k, v in est.items()},
        **{f"{k}_bias": v["bias"] for k, v in est.items()},
        "dm_rmse": float(np.sqrt(np.mean((dm - truth) ** 2))),
        "ess_mean": float(effective_sample_size(w).mean()),
        "max_weight": float(w.max()),
        "target_differs_share": float(np.mean(1.0 - pi)),
        "clipped": {"clip": clip, "ess_mean": float(effective_sample_size(wc).mean()),
                    **{f"{k}_{m}": v[m] for k, v in clipped.items() for m in v}},
        "ci_method": CI_METHOD,
        "targets": {"ips_ci_coverage>=0.9": est["ips"]["ci_coverage"] >= 0.9,
                    "dr_ci_coverage>=0.9": est["dr"]["ci_coverage"] >= 0.9,
                    "dr_rmse<ips_rmse": est["dr"]["rmse"] < est["ips"]["rmse"]},
        "params": {"contexts": contexts, "actions": actions, "epsilon": epsilon,
                   "target_epsilon": target_epsilon, "logger_noise": logger_noise,
                   "target_noise": target_noise, "dm_noise": dm_noise,
                   "ctr_low": ctr_low, "ctr_high": ctr_high, "world_seed": world_seed,
                   "seed": seed},
    }
    if exploring_seconds > 0:
        figures["exploring"] = exploring(exploring_seconds, seed)
    figures["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return figures


def exploring(seconds: float, seed: int, ope_seeds: int = 10, ope_seconds: float = 300.0
              ) -> dict[str, Any]:
    """The exploring-``Score`` figures (module docstring): the three policies over
    ``seconds``, then the estimators on ``ope_seeds`` ε-greedy logs of ``ope_seconds``
    each (per log, the target's true value is the mean true CTR of its greedy choices)."""
    from bench.score import run_exploring_score
    from offline.ope import OpeLog, evaluate

    out: dict[str, Any] = {}
    for policy in ("off", "eps-greedy", "thompson"):
        res = run_exploring_score(policy, seconds=seconds, seed=seed)
        res.pop("log")
        out[res["policy"]] = {**res, "explore_budget": res["budget"]}
    hits = {"ips": 0, "snips": 0, "dr": 0}
    errors: dict[str, list[float]] = {k: [] for k in hits}
    for k in range(ope_seeds):
        log = run_exploring_score("eps-greedy", seconds=ope_seconds, seed=seed + 1 + k)["log"]
        rows = np.arange(len(log["shown"]))
        shown, greedy, p_ctr = log["shown"], log["greedy"], log["p_ctr"]
        truth = float(log["true_ctr"][rows, greedy].mean())
        rep = evaluate(OpeLog(log["click"], log["propensity"],
                              (shown == greedy).astype(np.float64), p_ctr[rows, greedy],
                              p_ctr[rows, shown], log["propensity"] < 1.0), min_ess=0.0)
        for name, e in (("ips", rep.ips), ("snips", rep.snips), ("dr", rep.dr)):
            hits[name] += int(e.ci_low <= truth <= e.ci_high)
            errors[name].append(e.value - truth)
    out["ope_on_eps_greedy_logs"] = {
        "target": "greedy", "logs": ope_seeds, "seconds_each": ope_seconds,
        **{f"{k}_ci_coverage": hits[k] / ope_seeds for k in hits},
        **{f"{k}_rmse": float(np.sqrt(np.mean(np.square(errors[k])))) for k in hits}}
    return out
