"""bench.score.run_exploring_score, the seeded simulation of exploring servers: a short
run holds the budget, logs consistent propensities, and gets new ads shown that greedy
serving leaves out."""

from __future__ import annotations

import numpy as np
import pytest

from bench.score import run_exploring_score
from headrace.core.errors import InputError

SHORT = {"seconds": 90.0, "rate": 30.0, "servers": 2, "candidates": 8, "known_ads": 40,
         "new_ad_every_s": 20.0, "new_ad_impressions": 50, "budget": 0.05, "seed": 4}


@pytest.mark.parametrize("policy", ["eps-greedy", "thompson"])
def test_a_short_run_holds_the_budget_and_logs_its_propensities(policy: str) -> None:
    out = run_exploring_score(policy, epsilon=0.5, **SHORT)  # type: ignore[arg-type]
    log = out["log"]
    assert out["answers"] == 90 * 30 * 2 == len(log["propensity"])
    assert 0.0 < out["explore_share"] <= 0.05 + 0.002
    assert out["explore_share_max_60s"] <= 0.05 + 0.002
    assert out["explore_share"] == pytest.approx(float(log["explored"].mean()), abs=1e-5)
    # an explored answer shows another than the greedy candidate, with propensity < 1
    assert np.all(log["shown"][log["explored"]] != log["greedy"][log["explored"]])
    assert np.all(log["propensity"][log["explored"]] < 1.0)
    assert np.all(log["shown"][~log["explored"]] == log["greedy"][~log["explored"]])
    assert np.all((log["propensity"] > 0) & (log["propensity"] <= 1))
    if policy == "eps-greedy":  # exact: ε/K when explored
        assert np.allclose(log["propensity"][log["explored"]], 0.5 / 8)


def test_greedy_never_explores_and_exploring_shows_new_ads_more() -> None:
    greedy = run_exploring_score("off", **SHORT)  # type: ignore[arg-type]
    assert greedy["explore_share"] == 0.0 and greedy["policy"] == "greedy"
    assert np.all(greedy["log"]["propensity"] == 1.0)
    for policy in ("thompson", "eps-greedy"):
        explore = run_exploring_score(policy, epsilon=0.5, **SHORT)  # type: ignore[arg-type]
        assert explore["new_ad_impressions_mean"] > 1.5 * greedy["new_ad_impressions_mean"]


def test_a_bad_policy_is_one_sentence() -> None:
    with pytest.raises(InputError, match="HEADRACE_EXPLORE must be one of"):
        run_exploring_score("ucb", seconds=1.0)
