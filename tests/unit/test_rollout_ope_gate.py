"""The off-policy gate before phase 1 (headrace/rollout/ope_gate.py): the pure breach
rule, the controller's step at the end of the shadow phase, and the runner asking its
evaluator exactly when the shadow phase ends."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from headrace.core.errors import InputError
from headrace.model.artifact import set_champion
from headrace.model.registry import ModelRegistry, Role
from headrace.rollout.controller import Status, begin, step
from headrace.rollout.gates import ArmStats
from headrace.rollout.ope_gate import OpeEstimate, ope_breach
from headrace.rollout.policy import Policy
from headrace.rollout.runner import Runner
from headrace.rollout.store import Stored
from tests.unit.test_rollout_controller import (  # the controller tests' fakes
    CH,
    POLICY,
    T0,
    Clock,
    FakeStore,
    MemoryStatsSource,
    V,
    done,
)

GATED = replace(POLICY, ope_max_drop=0.05)


@pytest.fixture
def models(tmp_path: Path) -> ModelRegistry:
    for v in (CH, V):
        (tmp_path / v).mkdir()
        (tmp_path / v / "metadata.json").write_text(json.dumps({"gate": {"promote": True}}))
    set_champion(tmp_path, CH)
    reg = ModelRegistry(tmp_path, clock=lambda: T0)
    reg.transition(V, Role.CHALLENGER, "test", actor="rollout", rollout_id="r-1")
    return reg


def est(value: float, logged: float = 0.04) -> OpeEstimate:
    return OpeEstimate(value, value - 0.002, value + 0.002, logged, 5000, 1800.0)


def test_the_breach_rule_by_hand() -> None:
    # floor = 0.04 * (1 - 0.05) = 0.038: at the floor passes, just under it breaches
    assert ope_breach(est(0.038), 0.05) is None
    assert ope_breach(est(0.045), 0.05) is None
    low = ope_breach(est(0.0379), 0.05)
    assert low is not None and low.name == "ope"
    assert low.values["floor"] == pytest.approx(0.038)
    assert "estimated CTR 0.03790" in low.message and "logged CTR 0.04000" in low.message
    assert "by more than 5%" in low.message
    assert ope_breach(est(0.04), 0.0) is None and ope_breach(est(0.0399), 0.0) is not None
    missing = ope_breach(None, 0.05)
    assert missing is not None and "no off-policy evaluator" in missing.message
    refused = ope_breach(OpeEstimate(problem="300 of 300 decisions carry no logging "
                                             "propensity"), 0.05)
    assert refused is not None and refused.message.endswith("carry no logging propensity")
    nan = ope_breach(OpeEstimate(float("nan"), None, None, 0.04, 10, 1.0), 0.05)
    assert nan is not None and "not a number" in nan.message


def test_the_policy_field_is_validated_and_round_trips() -> None:
    assert Policy().ope_max_drop is None  # off by default
    with pytest.raises(InputError, match="ope_max_drop must be None or in"):
        Policy(ope_max_drop=1.0)
    with pytest.raises(InputError, match="ope_max_drop"):
        Policy(ope_max_drop=-0.1)
    again = Policy.from_dict(GATED.to_dict())
    assert again.ope_max_drop == 0.05 and again.ope_attribution_ms == 1_800_000


def shadow() -> Any:
    return done(begin("r-1", CH, V, T0, GATED, shadow_ms=500)[0])


def test_the_shadow_phase_ends_on_the_estimate() -> None:
    state = shadow()
    assert step(state, T0 + 499, ArmStats(), ArmStats(), GATED, ope=None) == (state, ())
    ok, actions = step(state, T0 + 500, ArmStats(), ArmStats(), GATED, ope=est(0.041))
    assert ok.phase == 1 and ok.status is Status.RUNNING
    assert ok.last_decision is not None and ok.last_decision["gate"] == "ope"
    assert ok.last_decision["ope"]["value"] == 0.041
    worse, actions = step(state, T0 + 500, ArmStats(), ArmStats(), GATED, ope=est(0.03))
    assert worse.status is Status.ROLLED_BACK and worse.breach is not None
    assert worse.breach["name"] == "ope" and worse.breach["phase"] == 0
    none, _ = step(state, T0 + 500, ArmStats(), ArmStats(), GATED, ope=None)
    assert none.status is Status.ROLLED_BACK and none.breach is not None
    assert none.breach["name"] == "ope"
    # without the gate the estimate is not needed
    plain = done(begin("r-1", CH, V, T0, POLICY, shadow_ms=500)[0])
    assert step(plain, T0 + 500, ArmStats(), ArmStats(), POLICY)[0].phase == 1


def test_the_runner_asks_its_evaluator_when_the_shadow_phase_ends(models: Any) -> None:
    store, clock, asked = FakeStore(), Clock(), []

    def evaluator(state: Any) -> OpeEstimate:
        asked.append((clock.now, state.phase))
        return est(0.041)

    state, _ = begin("r-1", CH, V, clock.now, GATED, shadow_ms=500)
    runner = Runner(store, models, MemoryStatsSource(), Stored(state, GATED), tick_ms=100,
                    lock_ttl_ms=1000, clock_ms=clock, sleep=clock.sleep, token="me",
                    ope=evaluator)
    runner.acquire()
    runner.commit(runner.state)
    while runner.state.phase == 0 and runner.state.status is Status.RUNNING:
        runner.tick()
        clock.now += 100
    assert runner.state.phase == 1
    assert len(asked) == 1 and asked[0][0] - T0 >= 500 and asked[0][1] == 0
    # no evaluator: the gate cannot be met, the rollout rolls back before phase 1
    store2 = FakeStore()
    state2, _ = begin("r-2", CH, V, clock.now, GATED, shadow_ms=500)
    bare = Runner(store2, models, MemoryStatsSource(), Stored(state2, GATED), tick_ms=100,
                  lock_ttl_ms=1000, clock_ms=clock, sleep=clock.sleep, token="me2")
    bare.acquire()
    bare.commit(bare.state)
    clock.now += 600
    final = bare.tick()
    assert final.status is Status.ROLLED_BACK and final.breach is not None
    assert "this controller has no off-policy evaluator" in final.breach["message"]
