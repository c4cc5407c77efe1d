"""The rollout controller: the pure step with pinned clocks, and the runner on in-memory
fakes of Redis (the registry is a real one in a temporary folder).

Expected phases, shares, times and actions are written out from the policy's numbers
(the oracle), never read back from the controller's own tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from headrace.core.errors import InputError
from headrace.model.artifact import set_champion
from headrace.model.registry import ModelRegistry, Role, RoleEvent, SplitEvent
from headrace.rollout.controller import (
    Alert,
    Notify,
    RecordSplit,
    RolloutState,
    Status,
    Transition,
    WaitAcks,
    WriteSplit,
    begin,
    step,
)
from headrace.rollout.gates import ArmStats, SegmentStats
from headrace.rollout.policy import Policy
from headrace.rollout.runner import ControllerLocked, Runner
from headrace.rollout.source import (
    JsonFileStatsSource,
    MemoryStatsSource,
    StatsUnavailable,
    arm_stats_from_dict,
    arm_stats_to_dict,
    subtract,
)
from headrace.rollout.split import Ack, SplitState
from headrace.rollout.store import RolloutStore, Stored

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 1000  # ms: time_scale 1/86400 makes a day last a second
SCALE = 1 / 86400
POLICY = Policy(time_scale=SCALE)
#: phase -> (share, min ms, max ms), from DEFAULT_PHASES' production numbers
PHASES = {1: (0.03, DAY, 2 * DAY), 2: (0.10, 2 * DAY, 3 * DAY), 3: (0.20, 3 * DAY, 5 * DAY),
          4: (0.40, 3 * DAY, 5 * DAY), 5: (0.50, 2 * DAY, 3 * DAY)}
CH, V = "2026-01-01-00", "2026-01-02-00"


def arm(impressions: int, ctr: float, **kw: Any) -> ArmStats:
    """A calibrated, healthy arm: Σ pCTR = clicks, no errors, p99 4 ms."""
    clicks = round(impressions * ctr)
    values: dict[str, Any] = {"impressions": impressions, "clicks": clicks,
                              "sum_pctr": float(clicks), "requests": impressions, "errors": 0,
                              "latency_p99_ms": 4.0, "min_pctr": 0.001, "max_pctr": 0.05}
    return ArmStats(**{**values, **kw})


def traffic(t_ms: int, lift: float = 0.10) -> tuple[ArmStats, ArmStats]:
    """Cumulative counts at ``t_ms`` after the start: 200k champion and 40k challenger
    impressions per 100 ms, CTR 1 % and 1 % × (1 + lift)."""
    n = t_ms // 100
    return arm(200_000 * n, 0.01), arm(40_000 * n, 0.01 * (1 + lift))


def started(shadow_ms: int = 0) -> RolloutState:
    state, _ = begin("r-1", CH, V, T0, POLICY, shadow_ms=shadow_ms)
    return done(state)


def done(state: RolloutState) -> RolloutState:
    """What the runner leaves after carrying the actions out."""
    return replace(state, pending_done=len(state.pending))


def at_phase(phase: int, champion: ArmStats | None = None,
             challenger: ArmStats | None = None, start: int = T0) -> RolloutState:
    return RolloutState("r-1", CH, V, Status.RUNNING, phase, start, T0,
                        baseline_champion=champion or ArmStats(),
                        baseline_challenger=challenger or ArmStats())


# -- begin and the full schedule -------------------------------------------------------------

def test_begin_writes_phase_one_split_and_records_it() -> None:
    state, actions = begin("r-1", CH, V, T0, POLICY)
    assert (state.status, state.phase, state.phase_started_ms, state.started_ms) == (
        Status.RUNNING, 1, T0, T0)
    assert actions == state.pending and state.busy
    assert actions[0] == WriteSplit(CH, V, 0.03, 1, shadow=False)
    assert isinstance(actions[1], RecordSplit) and actions[1].shares == {CH: 0.97, V: 0.03}
    assert isinstance(actions[2], Notify) and actions[2].event["event"] == "started"
    # a state whose actions are not done steps to itself
    assert step(state, T0 + 10 * DAY, *traffic(10 * DAY), POLICY) == (state, ())


def test_full_schedule_promotes_at_each_phase_minimum() -> None:
    state, t, splits, advanced = started(), 0, [], {}
    while state.status is Status.RUNNING and t < 30 * DAY:
        t += 100
        state, actions = step(state, T0 + t, *traffic(t), POLICY)
        splits += [a for a in actions if isinstance(a, WriteSplit)]
        if any(isinstance(a, WriteSplit) and a.challenger for a in actions):
            advanced[state.phase] = t
        state = done(state)
    assert state.status is Status.PROMOTED
    # each phase ends exactly at its minimum duration (the counts pass every gate)
    ends = [sum(PHASES[k][1] for k in range(1, p + 1)) for p in range(1, 6)]
    assert advanced == {2: ends[0], 3: ends[1], 4: ends[2], 5: ends[3]}
    assert state.ended_ms == T0 + ends[4] == T0 + 11 * DAY
    assert [s.share for s in splits] == [0.10, 0.20, 0.40, 0.50, 0.0]
    assert splits[-1] == WriteSplit(V, None, 0.0, 0)
    kinds = [type(a) for a in state.pending]
    assert kinds == [Transition, WriteSplit, RecordSplit, Alert, Notify]
    promo = state.pending[0]
    assert isinstance(promo, Transition) and (promo.version, promo.role, promo.phase) == (
        V, "champion", 5)
    assert promo.gates["action"] == "promote"
    # finished: nothing more, ever
    assert step(state, T0 + 40 * DAY, *traffic(40 * DAY), POLICY) == (state, ())


def test_advance_takes_the_baseline_and_restarts_the_clock() -> None:
    state = started()
    state, _ = step(state, T0 + DAY, *traffic(DAY), POLICY)
    assert (state.phase, state.phase_started_ms, state.looks) == (2, T0 + DAY, 0)
    assert (state.baseline_champion, state.baseline_challenger) == traffic(DAY)


def test_shadow_phase_then_phase_one() -> None:
    state, actions = begin("r-1", CH, V, T0, POLICY, shadow_ms=500)
    assert state.phase == 0 and actions[0] == WriteSplit(CH, V, 0.0, 0, shadow=True)
    state = done(state)
    assert step(state, T0 + 499, ArmStats(), ArmStats(), POLICY) == (state, ())
    state, actions = step(state, T0 + 500, ArmStats(), ArmStats(), POLICY)
    assert state.phase == 1 and actions[0] == WriteSplit(CH, V, 0.03, 1, shadow=False)
    # a shadow-phase guardrail breach (errors scored off the response path) rolls back
    shadow = done(begin("r-1", CH, V, T0, POLICY, shadow_ms=500)[0])
    bad = ArmStats(requests=1000, errors=10)
    state, actions = step(shadow, T0 + 100, ArmStats(), bad, POLICY)
    assert state.status is Status.ROLLED_BACK and state.breach is not None
    assert state.breach["name"] == "error_rate" and state.breach["phase"] == 0


# -- rollbacks ---------------------------------------------------------------------------------

BREACHES = {
    "error_rate": {"requests": 100_000, "errors": 200},
    "latency_p99": {"latency_p99_ms": 25.0},
    "click_floor": {"clicks": 1, "sum_pctr": 1.0},
    "segment_errors": {"segments": {"publisher": {"p1": SegmentStats(100, 0, 150, 250)}}},
    "prediction_range": {"max_pctr": 1.5},
    "constant_predictions": {"min_pctr": 0.02, "max_pctr": 0.02},
    "calibration_collapse": {"sum_pctr": 3000.0},
}


@pytest.mark.parametrize("guardrail", sorted(BREACHES))
def test_each_guardrail_breach_rolls_back_split_first(guardrail: str) -> None:
    base_a, base_c = traffic(DAY)
    state = at_phase(2, base_a, base_c, start=T0 + DAY)
    champ, chall = traffic(DAY + 300)
    delta = subtract(chall, base_c)  # the phase's counts, made to breach
    bad = replace(delta, **BREACHES[guardrail])
    cum = ArmStats(**{**arm_stats_to_dict_like(bad, base_c)})
    now = T0 + DAY + 300  # mid-phase: long before the phase's minimum duration
    new, actions = step(state, now, champ, cum, POLICY)
    assert new.status is Status.ROLLED_BACK and new.breach_ms == now
    assert new.breach is not None and new.breach["name"] == guardrail
    assert new.breach["phase"] == 2 and new.breach["values"]["phase"] == 2
    assert actions[0] == WriteSplit(CH, None, 0.0, 0)  # 100 % champion first
    assert isinstance(actions[1], WaitAcks)
    fail = actions[2]
    assert isinstance(fail, Transition) and (fail.version, fail.role, fail.phase) == (
        V, "failed", 2)
    assert fail.gates["guardrail"] == guardrail and fail.gates["values"]["phase"] == 2
    assert fail.timing
    assert isinstance(actions[3], RecordSplit) and actions[3].shares == {CH: 1.0}
    assert isinstance(actions[4], Alert) and actions[4].guardrail == guardrail
    assert isinstance(actions[5], Notify) and actions[5].event["event"] == "rolled_back"
    assert new.pending == actions


def arm_stats_to_dict_like(delta: ArmStats, base: ArmStats) -> dict[str, Any]:
    """Cumulative counts whose phase difference from ``base`` is ``delta``."""
    return {"impressions": base.impressions + delta.impressions,
            "clicks": base.clicks + delta.clicks, "sum_pctr": base.sum_pctr + delta.sum_pctr,
            "requests": base.requests + delta.requests, "errors": base.errors + delta.errors,
            "latency_p99_ms": delta.latency_p99_ms, "min_pctr": delta.min_pctr,
            "max_pctr": delta.max_pctr, "segments": delta.segments}


def test_comparative_gate_waits_for_the_phase_end() -> None:
    # phase 3: a clearly worse challenger is judged at the minimum duration, not before
    base_a, base_c = traffic(3 * DAY)
    state = at_phase(3, base_a, base_c, start=T0)
    t_min = PHASES[3][1]
    for t in range(100, t_min, 100):
        champ, chall = traffic(3 * DAY + t, lift=-0.10)
        chall = ArmStats(**arm_stats_to_dict_like(
            subtract(chall, traffic(3 * DAY, lift=-0.10)[1]), base_c))
        state2, actions = step(state, T0 + t, champ, chall, POLICY)
        assert actions == () and state2 == state
    champ, worse = traffic(3 * DAY + t_min, lift=-0.10)
    chall = ArmStats(**arm_stats_to_dict_like(subtract(worse, traffic(3 * DAY, -0.10)[1]),
                                              base_c))
    new, actions = step(state, T0 + t_min, champ, chall, POLICY)
    assert new.status is Status.ROLLED_BACK and new.breach is not None
    assert new.breach["name"] == "p_worse"
    assert new.last_decision is not None and new.last_decision["action"] == "rollback"
    assert actions[0] == WriteSplit(CH, None, 0.0, 0)


def test_hold_then_final_look_rolls_back() -> None:
    # phase 2 needs 50,000 challenger impressions: 10,000 at the minimum → hold
    state = at_phase(2)
    low = (arm(500_000, 0.01), arm(10_000, 0.011))
    state, actions = step(state, T0 + PHASES[2][1], *low, POLICY)
    assert state.status is Status.RUNNING and state.looks == 1
    assert [type(a) for a in actions] == [Notify] and actions[0].event["event"] == "hold"
    state = done(state)
    # no look between the minimum and the maximum duration
    assert step(state, T0 + PHASES[2][2] - 1, *low, POLICY) == (state, ())
    new, actions = step(state, T0 + PHASES[2][2], *low, POLICY)
    assert new.status is Status.ROLLED_BACK and new.breach is not None
    assert new.breach["name"] == "min_impressions" and new.breach["values"]["final"] is True


def test_hold_then_final_look_advances() -> None:
    state = at_phase(2)
    state = done(step(state, T0 + PHASES[2][1], arm(500_000, 0.01), arm(10_000, 0.011),
                      POLICY)[0])
    enough = (arm(2_000_000, 0.01), arm(100_000, 0.0105))
    new, actions = step(state, T0 + PHASES[2][2], *enough, POLICY)
    assert (new.phase, new.phase_started_ms, new.looks) == (3, T0 + PHASES[2][2], 0)
    assert actions[0] == WriteSplit(CH, V, 0.20, 3)


def test_abort_rolls_back_with_guardrail_aborted() -> None:
    state = at_phase(4)
    new, actions = step(state, T0 + 5, ArmStats(), ArmStats(), POLICY, abort="bad deploy")
    assert new.status is Status.ABORTED and new.breach is not None
    assert new.breach["name"] == "aborted" and new.breach["values"]["reason"] == "bad deploy"
    assert actions[0] == WriteSplit(CH, None, 0.0, 0) and isinstance(actions[1], WaitAcks)
    assert isinstance(actions[2], Transition) and actions[2].role == "failed"


def test_counts_going_backwards_is_an_error() -> None:
    state = at_phase(2, arm(1000, 0.01), arm(1000, 0.01))
    with pytest.raises(InputError, match="went backwards"):
        step(state, T0 + 10, arm(10, 0.01), arm(10, 0.01), POLICY)


# -- persistence ---------------------------------------------------------------------------------

def roundtrip(state: RolloutState) -> RolloutState:
    return RolloutState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))


def test_restart_mid_phase_resumes_same_phase_and_baseline() -> None:
    state = started()
    for t in range(100, DAY + 1500, 100):  # into phase 2
        state = done(step(state, T0 + t, *traffic(t), POLICY)[0])
    assert state.phase == 2
    again = roundtrip(state)
    assert again == state
    assert (again.phase_started_ms, again.baseline_challenger) == (T0 + DAY,
                                                                   traffic(DAY)[1])
    t = DAY + PHASES[2][1]
    assert step(again, T0 + t, *traffic(t), POLICY) == step(state, T0 + t, *traffic(t), POLICY)
    assert step(again, T0 + t, *traffic(t), POLICY)[0].phase == 3


def test_pending_decision_survives_the_roundtrip() -> None:
    state = at_phase(5)
    new, _ = step(state, T0 + PHASES[5][1], arm(4_000_000, 0.01), arm(4_000_000, 0.011),
                  POLICY)
    assert new.status is Status.PROMOTED
    again = roundtrip(replace(new, pending_done=1))
    assert again.pending == new.pending and again.busy and again.pending_done == 1
    assert step(again, T0 + 10 * DAY, ArmStats(), ArmStats(), POLICY) == (again, ())


# -- sources ------------------------------------------------------------------------------------

def test_arm_stats_json_roundtrip_and_subtract() -> None:
    a = ArmStats(10, 2, 1.5, 12, 1, latency_bounds_ms=(1.0, 5.0, math.inf),
                 latency_counts=(3, 8, 1), min_pctr=0.1, max_pctr=0.2,
                 segments={"publisher": {"p1": SegmentStats(10, 2, 1, 12)}})
    assert arm_stats_from_dict(json.loads(json.dumps(arm_stats_to_dict(a)))) == a
    b = replace(a, impressions=30, clicks=5, sum_pctr=4.0, requests=33, errors=1,
                latency_counts=(10, 20, 3),
                segments={"publisher": {"p1": SegmentStats(30, 5, 1, 33)}})
    d = subtract(b, a)
    assert (d.impressions, d.clicks, d.requests, d.errors, d.latency_counts) == (
        20, 3, 21, 0, (7, 12, 2))
    assert d.segments["publisher"]["p1"] == SegmentStats(20, 3, 0, 21)
    assert d.sum_pctr == pytest.approx(2.5)


def test_json_file_source(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    src = JsonFileStatsSource(path)
    with pytest.raises(StatsUnavailable, match="does not exist"):
        src.read(CH, V)
    path.write_text(json.dumps({"arms": {V: {"impressions": 5, "clicks": 1}}}))
    assert src.read(CH, V) == (ArmStats(), ArmStats(impressions=5, clicks=1))
    path.write_text(json.dumps({"arms": {V: {"impressions": 1, "clicks": 5}}}))
    with pytest.raises(StatsUnavailable, match="clicks"):
        src.read(CH, V)


# -- the runner on fakes -------------------------------------------------------------------------

class FakeStore(RolloutStore):
    """RolloutStore's contract in memory (no Redis)."""

    def __init__(self) -> None:
        super().__init__(None, "hr")
        self.doc: Stored | None = None
        self.lock: str | None = None
        self.seq = 0
        self.splits: list[SplitState] = []
        self.ack_map: dict[str, Ack] = {}
        self.abort: tuple[str, str] | None = None

    def load(self) -> Stored | None:
        return self.doc

    def save(self, stored: Stored, now_ms: int) -> None:
        json.dumps(stored.state.to_dict())  # must stay JSON-able
        self.doc = stored

    def acquire(self, token: str, ttl_ms: int) -> bool:
        if self.lock is None:
            self.lock = token
            return True
        return False

    def renew(self, token: str, ttl_ms: int) -> bool:
        return self.lock == token

    def release(self, token: str) -> bool:
        if self.lock == token:
            self.lock = None
            return True
        return False

    def holder(self) -> tuple[str, int] | None:
        return None if self.lock is None else (self.lock, 9000)

    def write_split(self, make: Any) -> SplitState:
        self.seq += 1
        split: SplitState = make(self.seq)
        self.splits.append(split)
        for name in self.ack_map:  # servers that apply at once
            self.ack_map[name] = Ack(split.seq, 0, split.share, split.challenger)
        return split

    def acks(self) -> dict[str, Ack]:
        return dict(self.ack_map)

    def abort_request(self, rollout_id: str) -> str | None:
        return self.abort[1] if self.abort and self.abort[0] == rollout_id else None


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(1, round(seconds * 1000))


@pytest.fixture
def models(tmp_path: Path) -> ModelRegistry:
    for v in (CH, V):
        (tmp_path / v).mkdir()
        (tmp_path / v / "metadata.json").write_text(json.dumps({"gate": {"promote": True}}))
    set_champion(tmp_path, CH)
    reg = ModelRegistry(tmp_path, clock=lambda: T0)
    reg.transition(V, Role.CHALLENGER, "test", actor="rollout", rollout_id="r-1")
    return reg


def make_runner(models: ModelRegistry, store: FakeStore, clock: Clock,
                source: MemoryStatsSource, events: list[dict[str, Any]]) -> Runner:
    state, _ = begin("r-1", CH, V, clock.now, POLICY)
    return Runner(store, models, source, Stored(state, POLICY), tick_ms=100, lock_ttl_ms=1000,
                  clock_ms=clock, sleep=clock.sleep, on_event=events.append, token="me")


def test_runner_full_schedule_seq_strictly_increasing(models: ModelRegistry) -> None:
    store, clock, events = FakeStore(), Clock(), []
    source = MemoryStatsSource()

    class Live(MemoryStatsSource):
        def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
            return traffic(clock.now - T0)

    runner = make_runner(models, store, clock, source, events)
    runner.source = Live()
    runner.acquire()
    runner.commit(runner.state)
    final = runner.run()
    assert final.status is Status.PROMOTED and not final.busy
    seqs = [s.seq for s in store.splits]
    assert seqs == sorted(set(seqs)) and len(seqs) == 6
    assert [s.share for s in store.splits] == [0.03, 0.10, 0.20, 0.40, 0.50, 0.0]
    assert store.splits[-1].challenger is None and store.splits[-1].champion == V
    assert models.champion() == V and models.roles()[CH] is Role.RETIRED
    assert [e["event"] for e in events] == ["started", "advance", "advance", "advance",
                                            "advance", "promoted"]


def test_runner_rollback_measures_acks(models: ModelRegistry) -> None:
    store, clock, events = FakeStore(), Clock(), []
    store.ack_map = {"s1": Ack(0, 0, 0.0, None), "s2": Ack(0, 0, 0.0, None)}
    source = MemoryStatsSource()
    runner = make_runner(models, store, clock, source, events)
    runner.acquire()
    runner.commit(runner.state)
    source.set(V, ArmStats(requests=10_000, errors=50))
    clock.now += 100
    final = runner.tick()
    assert final.status is Status.ROLLED_BACK and not final.busy
    assert store.splits[-1].challenger is None and final.split_seq == store.splits[-1].seq
    assert final.rollback_seconds == 0.0 and final.acks is not None
    assert final.acks["servers"] == 2 and final.acks["lagging"] == []
    failed = [e for e in models.history() if isinstance(e, RoleEvent) and e.role is Role.FAILED]
    assert len(failed) == 1 and failed[0].gates["guardrail"] == "error_rate"
    assert failed[0].gates["rollback_seconds"] == 0.0 and failed[0].phase == 1
    assert runner.metrics.rollbacks.labels(guardrail="error_rate")._value.get() == 1
    assert events[-1]["event"] == "rolled_back" and events[-1]["rollback_seconds"] == 0.0


def test_runner_completes_a_pending_promotion_exactly_once(models: ModelRegistry) -> None:
    store, clock = FakeStore(), Clock()
    state = at_phase(5)
    promoted, _ = step(state, T0 + PHASES[5][1], arm(4_000_000, 0.01), arm(4_000_000, 0.011),
                       POLICY)
    # the crash: the transition was made, pending_done not yet persisted
    first = promoted.pending[0]
    assert isinstance(first, Transition)
    models.transition(first.version, first.role, first.reason, actor="rollout",
                      rollout_id="r-1", phase=5)
    store.doc = Stored(promoted, POLICY)
    resumed = Runner(store, models, MemoryStatsSource(), store.doc, tick_ms=100,
                     clock_ms=clock, sleep=clock.sleep, token="me2")
    resumed.acquire()
    final = resumed.run()
    assert final.status is Status.PROMOTED and not final.busy and final.problems == ()
    promotions = [e for e in models.history()
                  if isinstance(e, RoleEvent) and e.role is Role.CHAMPION and e.version == V]
    assert len(promotions) == 1
    splits = [e for e in models.history() if isinstance(e, SplitEvent)]
    assert splits[-1].shares == {V: 1.0}
    # a second run has nothing to do
    assert resumed.tick() == final and len(store.splits) == 1


def test_second_controller_refuses(models: ModelRegistry) -> None:
    store, clock = FakeStore(), Clock()
    first = make_runner(models, store, clock, MemoryStatsSource(), [])
    first.acquire()
    second = make_runner(models, store, clock, MemoryStatsSource(), [])
    second.token = "other"
    with pytest.raises(ControllerLocked, match="holder me"):
        second.acquire()
