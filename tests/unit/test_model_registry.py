"""The model registry: roles, the append-only history, transitions, serving_at, rollback.

Expected roles and shares are written out by hand from the events each test makes (the
oracle), never read back from the registry's own tables.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from headrace.core.errors import InputError
from headrace.model.artifact import CHAMPION_FILE, champion_version, set_champion
from headrace.model.registry import HISTORY_FILE, ModelRegistry, Role, RoleEvent, SplitEvent

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class Clock:
    """A pinned clock (epoch ms) the test moves by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_version(models: Path, version: str, gate: bool | None = True) -> None:
    folder = models / version
    folder.mkdir(parents=True)
    meta: dict[str, Any] = {"version": version, "created_at": "2026-01-01T00:00:00+00:00",
                            "metrics": {"auc": 0.7, "logloss": 0.3}}
    if gate is not None:
        meta["gate"] = {"promote": gate, "reasons": ["x"]}
    (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for v in ("2026-01-01-00", "2026-01-02-00", "2026-01-03-00", "2026-01-04-00"):
        make_version(tmp_path, v)
    return tmp_path


C, V, W, X = "2026-01-01-00", "2026-01-02-00", "2026-01-03-00", "2026-01-04-00"


def lines(models: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (models / HISTORY_FILE).read_text().splitlines()]


# -- history append and replay ---------------------------------------------------------------


def test_history_lines_replay_into_roles(models: Path) -> None:
    clock = Clock()
    reg = ModelRegistry(models, clock=clock)
    assert reg.roles() == {C: "candidate", V: "candidate", W: "candidate", X: "candidate"}
    assert reg.champion() is None and reg.history() == [] and not (models / HISTORY_FILE).exists()
    reg.transition(C, "champion", "first", {"auc": 0.7}, actor="train")
    clock.now += 1000
    reg.transition(V, Role.CHALLENGER, "rollout", actor="rollout", rollout_id="r1", phase=1)
    clock.now += 1000
    reg.transition(V, "champion", "phase 5 passed", {"p_better": 0.95}, actor="rollout",
                   rollout_id="r1", phase=5)
    got = lines(models)
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    assert got[0] == {"seq": 1, "at_ms": T0, "kind": "role", "version": C, "role": "champion",
                      "previous": None, "reason": "first", "gates": {"auc": 0.7},
                      "actor": "train", "rollout_id": None, "phase": None}
    assert (got[2]["version"], got[2]["previous"], got[2]["role"]) == (V, "challenger",
                                                                        "champion")
    assert (got[3]["version"], got[3]["previous"], got[3]["role"]) == (C, "champion", "retired")
    assert got[2]["at_ms"] == got[3]["at_ms"] == T0 + 2000 and got[3]["phase"] == 5
    assert reg.roles() == {C: "retired", V: "champion", W: "candidate", X: "candidate"}
    assert champion_version(models) == V and reg.champion() == V and reg.challenger() is None
    assert [e.seq for e in reg.history(C)] == [1, 4]
    again = ModelRegistry(models, clock=clock)  # a fresh reader replays the same roles
    assert again.roles() == reg.roles()
    assert isinstance(again.history()[1], RoleEvent) and again.history()[1].phase == 1


def test_torn_last_line_is_skipped_and_the_next_append_starts_a_line(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(C, "champion", "first")
    with open(models / HISTORY_FILE, "ab") as fh:
        fh.write(b'{"seq": 2, "at_ms": 17672256')  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="headrace.model.registry"):
        assert reg.roles()[C] == "champion" and len(reg.history()) == 1
    assert "line 2" in caplog.text and "torn" in caplog.text
    reg.transition(V, "challenger", "next")
    raw = (models / HISTORY_FILE).read_text().splitlines()
    assert len(raw) == 3 and raw[1].endswith("17672256")
    assert json.loads(raw[2])["version"] == V and json.loads(raw[2])["seq"] == 2
    assert reg.challenger() == V


def _splits(models: str, n: int) -> None:
    reg = ModelRegistry(models)
    for i in range(n):
        reg.record_split({C: 1.0}, f"pid {os.getpid()} #{i}")


def test_two_processes_appending_never_interleave_and_seqs_are_unique(models: Path) -> None:
    ModelRegistry(models).transition(C, "champion", "first")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_splits, args=(str(models), 200)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    raw = (models / HISTORY_FILE).read_text().splitlines()
    got = [json.loads(line) for line in raw]  # every line is whole JSON
    assert len(got) == 401
    assert [e["seq"] for e in got] == list(range(1, 402))
    assert len({e["reason"].split(" #")[0] for e in got[1:]}) == 2
    assert all(a["at_ms"] <= b["at_ms"] for a, b in zip(got, got[1:], strict=False))


def test_at_ms_never_goes_back_with_the_clock(models: Path) -> None:
    clock = Clock()
    reg = ModelRegistry(models, clock=clock)
    reg.transition(C, "champion", "first")
    clock.now -= 60_000
    reg.transition(V, "challenger", "second")
    assert [e["at_ms"] for e in lines(models)] == [T0, T0]


# -- transitions ---------------------------------------------------------------------------

#: (from, to) moves that succeed; every other pair is refused. Written out by hand.
ALLOWED_PAIRS = {
    ("candidate", "candidate"),  # registration: the version's first event
    ("candidate", "challenger"), ("candidate", "champion"), ("candidate", "failed"),
    ("challenger", "champion"), ("challenger", "failed"), ("challenger", "candidate"),
    ("retired", "challenger"), ("retired", "champion"), ("retired", "failed"),
}
ROLES = ("candidate", "challenger", "champion", "retired", "failed")


def put_in_role(reg: ModelRegistry, role: str) -> None:
    """C is champion (or retired); V ends in ``role``."""
    reg.transition(C, "champion", "base")
    if role == "challenger":
        reg.transition(V, "challenger", "setup")
    elif role == "champion":
        reg.transition(V, "champion", "setup")
    elif role == "retired":
        reg.transition(V, "champion", "setup")
        reg.transition(W, "champion", "setup")
    elif role == "failed":
        reg.transition(V, "failed", "setup")


@pytest.mark.parametrize("start", ROLES)
@pytest.mark.parametrize("target", ROLES)
def test_every_transition_is_allowed_or_refused(models: Path, start: str, target: str) -> None:
    reg = ModelRegistry(models, clock=Clock())
    put_in_role(reg, start)
    assert reg.roles()[V] == start
    before = (models / HISTORY_FILE).read_bytes()
    pointer = champion_version(models)
    if (start, target) in ALLOWED_PAIRS:
        new = reg.transition(V, target, "under test")
        assert reg.roles()[V] == target and new[0].role == target
        assert new[0].previous == (None if start == "candidate" else start)
    else:
        with pytest.raises(InputError, match=V):
            reg.transition(V, target, "under test")
        assert (models / HISTORY_FILE).read_bytes() == before  # nothing written
        assert champion_version(models) == pointer


def test_candidate_registration_only_as_the_first_event(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(V, "candidate", "trained for a rollout", actor="train")
    assert lines(models)[0]["previous"] is None
    with pytest.raises(InputError, match="already candidate"):
        reg.transition(V, "candidate", "again")


def test_refusals_name_the_rule(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    with pytest.raises(InputError, match="no champion to compare"):
        reg.transition(V, "challenger", "x")
    reg.transition(C, "champion", "base")
    reg.transition(V, "challenger", "rollout")
    with pytest.raises(InputError, match=f"{V} is already in rollout"):
        reg.transition(W, "challenger", "x")
    with pytest.raises(InputError, match=f"{V} is already in rollout"):
        reg.transition(W, "champion", "x")
    with pytest.raises(InputError, match="retired by promoting another"):
        reg.transition(C, "retired", "x")
    with pytest.raises(InputError, match="unknown role 'boss'"):
        reg.transition(W, "boss", "x")
    with pytest.raises(InputError, match="unknown actor 'cron'"):
        reg.transition(W, "failed", "x", actor="cron")
    assert reg.roles() == {C: "champion", V: "challenger", W: "candidate", X: "candidate"}
    assert len(lines(models)) == 2


def test_gate_failed_metadata_can_never_be_challenger_or_champion(models: Path) -> None:
    make_version(models, "2026-02-01-00", gate=False)
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(C, "champion", "base")
    for role in ("challenger", "champion"):
        with pytest.raises(InputError, match="failed its offline gates"):
            reg.transition("2026-02-01-00", role, "x")
    reg.transition("2026-02-01-00", "failed", "offline gates", actor="train")
    with pytest.raises(InputError, match="failed and can never become challenger"):
        reg.transition("2026-02-01-00", "challenger", "x")


def test_unknown_version_is_one_sentence_naming_the_known_ones(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    with pytest.raises(InputError) as info:
        reg.transition("v9", "champion", "x")
    msg = str(info.value)
    assert "'v9'" in msg and all(v in msg for v in (C, V, W, X)) and "\n" not in msg
    with pytest.raises(InputError, match="'v9'"):
        reg.history("v9")
    assert not (models / HISTORY_FILE).exists()
    with pytest.raises(InputError, match="known versions: none"):
        ModelRegistry(models / "empty").history("v9")


def test_promoting_a_version_whose_folder_vanished_writes_nothing(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(C, "champion", "base")
    reg.transition(V, "candidate", "registered")
    (models / V / "metadata.json").unlink()
    with pytest.raises(InputError, match="incomplete"):
        reg.transition(V, "champion", "x")
    assert len(lines(models)) == 2 and champion_version(models) == C


# -- the CHAMPION pointer ---------------------------------------------------------------------


def test_champion_only_dir_is_read_as_champion_without_a_write(models: Path) -> None:
    set_champion(models, V)
    os.utime(models / CHAMPION_FILE, ns=((T0 - 5000) * 1_000_000,) * 2)
    reg = ModelRegistry(models, clock=Clock(T0))
    assert reg.roles()[V] == "champion" and reg.champion() == V
    (event,) = reg.history()
    assert isinstance(event, RoleEvent) and event.actor == "migration"
    assert event.at_ms == T0 - 5000
    assert reg.serving_at(T0 - 5001) == {} and reg.serving_at(T0) == {V: 1.0}
    assert not (models / HISTORY_FILE).exists()
    assert sorted(p.name for p in models.iterdir() if p.name.startswith(".")) == []
    reg.transition(W, "challenger", "rollout")  # the first write persists the migration
    got = lines(models)
    assert [(e["seq"], e["version"], e["role"], e["actor"]) for e in got] == [
        (1, V, "champion", "migration"), (2, W, "challenger", "cli")]


def test_a_pointer_moved_by_hand_wins_and_retires_the_history_champion(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(C, "champion", "base")
    set_champion(models, W)  # outside the registry (or a crash before the append)
    assert reg.champion() == W and reg.roles()[C] == "retired"
    reg.transition(V, "challenger", "rollout")
    assert [(e["version"], e["role"], e["actor"]) for e in lines(models)][1:] == [
        (W, "champion", "migration"), (C, "retired", "migration"), (V, "challenger", "cli")]


# -- splits and serving_at ------------------------------------------------------------------


def test_serving_at_before_between_and_after_events(models: Path) -> None:
    clock = Clock()
    reg = ModelRegistry(models, clock=clock)
    reg.transition(C, "champion", "base")                      # T0
    clock.now = T0 + 100
    reg.transition(V, "challenger", "start", rollout_id="r1")  # T0+100, share still 0
    clock.now = T0 + 200
    ev = reg.record_split({C: 0.97, V: 0.03}, "phase 1", "r1", 1)
    assert isinstance(ev, SplitEvent) and ev.seq == 3 and ev.shares == {C: 0.97, V: 0.03}
    clock.now = T0 + 300
    reg.record_split({C: 0.9, V: 0.1}, "phase 2", "r1", 2)
    clock.now = T0 + 400
    reg.record_split({C: 1.0}, "rollback", "r1", 2)
    reg.transition(V, "failed", "calibration", {"ratio": 2.0}, actor="rollout", phase=2)
    assert reg.serving_at(T0 - 1) == {}
    assert reg.serving_at(T0) == {C: 1.0} == reg.serving_at(T0 + 150)
    assert reg.serving_at(T0 + 200) == pytest.approx({C: 0.97, V: 0.03})
    assert reg.serving_at(T0 + 299) == pytest.approx({C: 0.97, V: 0.03})
    assert reg.serving_at(T0 + 300) == pytest.approx({C: 0.9, V: 0.1})
    assert reg.serving_at(T0 + 400) == {C: 1.0} == reg.serving_at(T0 + 10**9)
    assert [e.seq for e in reg.history(V)] == [2, 3, 4, 6]
    clock.now = T0 + 500
    reg.transition(W, "challenger", "second rollout", rollout_id="r2")  # no split yet
    assert reg.serving_at(T0 + 500) == {C: 1.0}


def test_serving_at_after_a_promotion(models: Path) -> None:
    clock = Clock()
    reg = ModelRegistry(models, clock=clock)
    reg.transition(C, "champion", "base")
    reg.transition(V, "challenger", "start")
    clock.now = T0 + 10
    reg.record_split({C: 0.5, V: 0.5}, "phase 5")
    clock.now = T0 + 20
    reg.transition(V, "champion", "promoted", actor="rollout")
    assert reg.serving_at(T0 + 19) == {C: 0.5, V: 0.5}
    assert reg.serving_at(T0 + 20) == {V: 1.0}


@pytest.mark.parametrize(("shares", "message"), [
    ({W: 1.0}, f"cannot give {W} a traffic share"),
    ({C: 0.9, V: 0.2}, "add up to 1"),
    ({C: 1.5, V: -0.5}, "must be in"),
    ({C: float("nan"), V: 0.5}, "must be in"),
    ({}, "add up to 1"),
])
def test_bad_splits_are_refused(models: Path, shares: dict[str, float], message: str) -> None:
    reg = ModelRegistry(models, clock=Clock())
    reg.transition(C, "champion", "base")
    reg.transition(V, "challenger", "start")
    with pytest.raises(InputError, match=message):
        reg.record_split(shares, "x")
    assert len(lines(models)) == 2


# -- rollback target --------------------------------------------------------------------------


def test_rollback_target_is_the_last_champion_that_passed_every_gate(models: Path) -> None:
    reg = ModelRegistry(models, clock=Clock())
    assert reg.rollback_target() is None
    reg.transition(C, "champion", "base")
    assert reg.rollback_target() == C
    reg.transition(V, "challenger", "start")
    reg.transition(V, "failed", "breach")
    assert reg.rollback_target() == C  # a failed challenger changes nothing
    reg.transition(W, "champion", "promoted")
    assert reg.rollback_target() == W
    reg.transition(C, "champion", "manual rollback")  # retired -> champion
    reg.transition(W, "failed", "found bad in production")
    assert reg.rollback_target() == C
    make_version(models, "2026-03-01-00", gate=None)  # no offline gate decision recorded
    reg.transition("2026-03-01-00", "champion", "hand-made")
    assert reg.champion() == "2026-03-01-00" and reg.rollback_target() == C
