"""bench/ope.py's synthetic bandit: its exact policy values against a brute-force sum,
its logging distribution against the ε-greedy formula, and a small run's figures."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ope import make_world, run


def test_world_values_and_distributions_by_brute_force() -> None:
    world = make_world(contexts=3, actions=4, epsilon=0.2, target_epsilon=0.0,
                       logger_noise=0.5, target_noise=0.0, ctr_low=0.05, ctr_high=0.4,
                       seed=0)
    assert world.p_x.sum() == pytest.approx(1.0)
    for x in range(3):
        g = int(np.argmax(world.logger[x]))
        for a in range(4):  # eps-greedy: .8 [a = g] + .2 / 4
            assert world.logger[x, a] == pytest.approx(0.8 * (a == g) + 0.05)
        # target_noise 0 and target_epsilon 0: the target is greedy on the true CTR
        assert world.target[x].tolist() == [float(a == np.argmax(world.ctr[x]))
                                            for a in range(4)]
    want = 0.0
    for x in range(3):
        for a in range(4):
            want += world.p_x[x] * world.target[x, a] * world.ctr[x, a]
    assert world.value(world.target) == pytest.approx(want, abs=1e-15)
    # the greedy-on-truth target is the best policy: at least the logger's value
    assert world.value(world.target) >= world.value(world.logger)


def test_small_run_is_unbiased_and_meets_the_targets() -> None:
    fig = run(seeds=400, decisions=2000, exploring_seconds=0)
    assert fig["seeds"] == 400 and 0 < fig["logging_value"] < fig["true_value"] < 1
    # IPS and DR are unbiased: the mean over 400 seeds is within 4 standard errors
    for k in ("ips", "dr"):
        assert abs(fig[f"{k}_bias"]) < 4 * fig[f"{k}_rmse"] / np.sqrt(400)
    assert fig["ips_ci_coverage"] >= 0.9 and fig["dr_ci_coverage"] >= 0.9
    assert fig["dr_rmse"] < fig["ips_rmse"]
    assert all(fig["targets"].values())
    with pytest.raises(TypeError):
        run(seeds=0)


def test_the_exploring_score_part_keeps_the_budget_and_evaluates_its_log() -> None:
    from bench.ope import exploring

    fig = exploring(150.0, seed=3, ope_seeds=2, ope_seconds=60.0)  # a new ad at 60 s
    assert fig["greedy"]["explore_share"] == 0.0
    for label in ("eps-greedy:0.05", "thompson:v1"):
        assert 0.0 < fig[label]["explore_share"] <= fig[label]["explore_budget"] + 0.002
        assert fig[label]["explore_share_max_60s"] <= fig[label]["explore_budget"] + 0.002
    ope = fig["ope_on_eps_greedy_logs"]
    assert ope["target"] == "greedy" and ope["logs"] == 2
    for name in ("ips", "snips", "dr"):
        assert ope[f"{name}_ci_coverage"] in (0.0, 0.5, 1.0)
        assert ope[f"{name}_rmse"] < 0.01  # CTRs of ~7 %: within a few points of a percent
