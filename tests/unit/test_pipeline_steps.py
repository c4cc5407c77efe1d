"""The pipeline's model steps on fakes (a rollout store in memory, counts in memory, a
real registry in a temporary folder): a model is never registered twice, a rollout is
started exactly once however often the steps are redone, and the refusals change
nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from headrace.core.errors import InputError
from headrace.model.artifact import set_champion
from headrace.model.registry import ModelRegistry, Role, RoleEvent, SplitEvent
from headrace.pipeline.launch import check_start, load_policy, start_rollout
from headrace.pipeline.record import RunRecord, RunStore
from headrace.pipeline.runner import Rejected, StepContext
from headrace.pipeline.settings import PipelineSettings
from headrace.pipeline.steps import STEP_NAMES, Pipeline, find_trained, rollout_id_for
from headrace.rollout.controller import Status
from headrace.rollout.gates import ArmStats
from headrace.rollout.policy import Policy
from headrace.rollout.runner import Runner
from headrace.rollout.source import MemoryStatsSource
from headrace.rollout.split import SplitState
from headrace.rollout.store import RolloutStore, Stored

T0 = 1_767_225_600_000
CH, NEW, OTHER = "2026-01-01-00", "2026-01-03-00", "2026-01-02-00"
RUN = "p-20260103T000000Z-ab12"


class FakeStore(RolloutStore):
    """The rollout keys in memory (the contract of :class:`RolloutStore`)."""

    def __init__(self) -> None:
        super().__init__(None, "hr")
        self.doc: Stored | None = None
        self.lock: str | None = None
        self.splits: list[SplitState] = []
        self.saves = 0
        self.cleared = 0

    def load(self) -> Stored | None:
        return self.doc

    def save(self, stored: Stored, now_ms: int) -> None:
        json.dumps(stored.state.to_dict())
        self.doc = stored
        self.saves += 1

    def acquire(self, token: str, ttl_ms: int) -> bool:
        if self.lock is None:
            self.lock = token
            return True
        return False

    def renew(self, token: str, ttl_ms: int) -> bool:
        return self.lock == token

    def release(self, token: str) -> bool:
        ok = self.lock == token
        self.lock = None if ok else self.lock
        return ok

    def holder(self) -> tuple[str, int] | None:
        return None if self.lock is None else (self.lock, 9000)

    def write_split(self, make: Any) -> SplitState:
        split: SplitState = make(len(self.splits) + 1)
        self.splits.append(split)
        return split

    def acks(self) -> dict[str, Any]:
        return {}

    def clear_abort(self) -> None:
        self.cleared += 1


def _version(models: Path, version: str, promote: bool = True, source: str | None = None
             ) -> None:
    (models / version).mkdir(parents=True)
    (models / version / "metadata.json").write_text(json.dumps(
        {"gate": {"promote": promote, "reasons": ["AUC 0.7 >= floor 0.6"],
                  "champion": {"version": CH, "auc": 0.55, "auc_source": "stored metadata"}},
         "metrics": {"auc": 0.7, "logloss": 0.1}, "data": {"source": source}}))


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.models = tmp / "models"
        _version(self.models, CH)
        _version(self.models, OTHER)
        set_champion(self.models, CH)
        self.registry = ModelRegistry(self.models, clock=lambda: T0)
        self.store = FakeStore()
        self.source = MemoryStatsSource({CH: ArmStats(impressions=50, clicks=1)})
        self.sources: list[str] = []
        settings = PipelineSettings.from_env({}, models_dir=str(self.models))

        def source_for(rid: str) -> MemoryStatsSource:
            self.sources.append(rid)
            return self.source

        self.pipeline = Pipeline(
            settings=settings, definitions=None,  # type: ignore[arg-type]
            rollout_store=lambda: self.store, stats_source=source_for,
            make_runner=lambda store, models, source, stored: Runner(
                store, models, source, stored, clock_ms=lambda: T0 + 5),
            policy=Policy())
        self.runs = RunStore(self.models)
        self.run = RunRecord.new(RUN, {"kind": "manual"}, T0, STEP_NAMES)

    def ctx(self, step: str) -> StepContext:
        return StepContext(self.run, self.run.step(step), self.runs.run_dir(RUN), self.runs)

    def do(self, step: str) -> dict[str, Any]:
        out = dict(getattr(self.pipeline, step)(self.ctx(step)))
        self.run.step(step).outputs = out
        return out

    def role_events(self, version: str) -> list[RoleEvent]:
        return [e for e in self.registry.history(version) if isinstance(e, RoleEvent)]


def test_train_finds_its_model_again_and_never_registers_it_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash between the version's folder and its history line: the redo finds the
    folder by its source, records it once as candidate and trains nothing."""
    import offline.train

    rig = Rig(tmp_path)
    _version(rig.models, NEW, source=f"pipeline:{RUN}")
    _version(rig.models, "2026-01-04-00", source="pipeline:p-another")

    def no_training(*_: Any, **__: Any) -> Any:
        raise AssertionError("trained again")

    monkeypatch.setattr(offline.train, "train", no_training)
    monkeypatch.setattr(offline.train, "read_training_set", lambda *_: None)
    rig.run.step("training_set").outputs = {"path": "unused"}
    assert find_trained(rig.registry, RUN) == NEW
    out = rig.do("train")
    assert out["version"] == NEW and out["redo"] is True and out["role"] == "candidate"
    assert [(e.role, e.actor) for e in rig.role_events(NEW)] == [(Role.CANDIDATE, "train")]
    rig.do("train")  # and again
    assert len(rig.role_events(NEW)) == 1


def test_train_records_a_failed_gate_as_failed_on_a_redo(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import offline.train

    rig = Rig(tmp_path)
    _version(rig.models, NEW, promote=False, source=f"pipeline:{RUN}")
    monkeypatch.setattr(offline.train, "read_training_set", lambda *_: None)
    rig.run.step("training_set").outputs = {"path": "unused"}
    assert rig.do("train")["role"] == "failed"
    with pytest.raises(Rejected) as info:
        rig.do("gates")
    assert info.value.reasons[0] == f"model {NEW} failed the offline gates"
    assert info.value.outputs["promote"] is False


def test_register_then_start_exactly_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    _version(rig.models, NEW, source=f"pipeline:{RUN}")
    rig.registry.transition(NEW, Role.CANDIDATE, "passed", actor="train")
    rig.run.step("train").outputs = {"version": NEW}
    rig.run.step("gates").outputs = rig.do("gates")
    rid = rollout_id_for(RUN)
    assert rid == "r-20260103T000000Z-ab12"
    reg = rig.do("register")
    assert reg == {"version": NEW, "rollout_id": rid, "champion": CH, "redo": False}
    assert rig.registry.challenger() == NEW and rig.store.doc is None
    assert rig.do("register")["redo"] is True  # a redo: no second transition
    out = rig.do("start_rollout")
    assert out["redo"] is False and out["rollout_id"] == rid and out["phase"] == 1
    assert out["split_seq"] == 1 and out["status"] == "running"
    doc = rig.store.doc
    assert doc is not None and doc.state.status is Status.RUNNING and not doc.state.busy
    assert doc.state.baseline_champion == ArmStats(impressions=50, clicks=1)
    assert rig.store.lock is None  # released: `headrace rollout run` drives it
    assert [(s.challenger, s.share, s.phase) for s in rig.store.splits] == [(NEW, 0.03, 1)]
    # redone (a crash after the start, before the record said done): nothing again
    again = rig.do("start_rollout")
    assert again["redo"] is True and again["rollout_id"] == rid
    assert len(rig.store.splits) == 1 and rig.sources == [rid]
    assert rig.do("register")["redo"] is True
    roles = [e.role for e in rig.role_events(NEW)]
    assert roles == [Role.CANDIDATE, Role.CHALLENGER]
    splits = [e for e in rig.registry.history() if isinstance(e, SplitEvent)]
    assert [(dict(e.shares), e.rollout_id) for e in splits] == [({CH: 0.97, NEW: 0.03}, rid)]


def test_start_after_a_crash_between_register_and_start(tmp_path: Path) -> None:
    """The registry says challenger, Redis has no rollout: the start completes it and
    does not move the registry again."""
    rig = Rig(tmp_path)
    _version(rig.models, NEW)
    rig.registry.transition(NEW, Role.CHALLENGER, "pipeline", actor="rollout")
    rig.run.step("register").outputs = {"version": NEW}
    assert rig.do("start_rollout")["redo"] is False
    assert [e.role for e in rig.role_events(NEW)] == [Role.CHALLENGER]
    assert len(rig.store.splits) == 1


def test_register_refuses_during_another_rollout_and_changes_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    _version(rig.models, NEW)
    rig.registry.transition(OTHER, Role.CHALLENGER, "by hand", actor="cli")
    rig.run.step("train").outputs = {"version": NEW}
    before = rig.registry.path.read_bytes()
    with pytest.raises(InputError, match=f"model {OTHER} is already the challenger"):
        rig.do("register")
    assert rig.registry.path.read_bytes() == before and rig.store.doc is None


def test_check_start_refusals(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    _version(rig.models, NEW, promote=False)
    with pytest.raises(InputError, match="already the champion"):
        check_start(rig.store, rig.registry, CH)
    with pytest.raises(InputError, match="failed its offline gates"):
        check_start(rig.store, rig.registry, NEW)
    with pytest.raises(InputError, match="unknown model version 'nope'"):
        check_start(rig.store, rig.registry, "nope")
    assert check_start(rig.store, rig.registry, OTHER) == CH


def test_a_second_start_while_one_runs_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)

    def make(stored: Stored) -> Runner:
        return Runner(rig.store, rig.registry, rig.source, stored, clock_ms=lambda: T0)

    runner, first = start_rollout(rig.store, rig.registry, rig.source, make, version=OTHER,
                                  rollout_id="r-1", policy=Policy())
    runner.release()
    assert first.status is Status.RUNNING and rig.store.cleared == 1
    with pytest.raises(InputError, match="rollout r-1 of .* is already running"):
        start_rollout(rig.store, rig.registry, rig.source, make, version=OTHER,
                      rollout_id="r-2", policy=Policy())
    assert len(rig.store.splits) == 1


def test_load_policy(tmp_path: Path) -> None:
    assert load_policy(None, 0.5).time_scale == 0.5
    path = tmp_path / "p.json"
    path.write_text("[1]")
    with pytest.raises(InputError, match="must be a JSON object"):
        load_policy(str(path), 1.0)


def test_register_rejects_a_model_gated_against_another_champion(tmp_path: Path) -> None:
    """A promotion while the run waited (failed at register, resumed later): the model
    was judged against the old champion, so it is not rolled out against the new one."""
    rig = Rig(tmp_path)
    _version(rig.models, NEW)
    rig.registry.transition(OTHER, Role.CHAMPION, "promoted meanwhile", actor="cli")
    rig.run.step("train").outputs = {"version": NEW}
    before = rig.registry.path.read_bytes()
    with pytest.raises(Rejected) as info:
        rig.do("register")
    assert info.value.reasons == (f"model {NEW} was gated against champion {CH}, but {OTHER} "
                                  "is the champion now; the next run trains and gates "
                                  "against it",)
    assert rig.registry.path.read_bytes() == before and rig.registry.challenger() is None
