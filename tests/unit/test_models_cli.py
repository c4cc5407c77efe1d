"""``headrace models list|history`` and how ``headrace train`` records its decisions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from feature_defs.registry import load_registry
from headrace import cli
from headrace.model.artifact import champion_version
from headrace.model.registry import HISTORY_FILE, ModelRegistry, Role
from offline.evaluation import CalibrationBin, Metrics
from offline.models import GateDecision
from offline.train import _record, train

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
C, V, W = "2026-01-01-00", "2026-01-02-00", "2026-01-03-00"


def make_version(models: Path, version: str, gate: bool | None, auc: float = 0.7) -> None:
    (models / version).mkdir(parents=True)
    meta: dict[str, Any] = {"version": version, "created_at": f"{version[:10]}T00:00:00+00:00",
                            "metrics": {"auc": auc, "logloss": 0.31}}
    if gate is not None:
        meta["gate"] = {"promote": gate, "reasons": []}
    (models / version / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """C champion at T0, V challenger at T0+1h with a 10 % split at T0+2h, W failed."""
    out = tmp_path / "models"
    make_version(out, C, True, 0.70)
    make_version(out, V, True, 0.72)
    make_version(out, W, False, 0.55)
    now = [T0]
    reg = ModelRegistry(out, clock=lambda: now[0])
    reg.transition(C, "champion", "first", actor="train")
    reg.transition(W, "failed", "failed the offline gates: AUC below the floor", actor="train")
    now[0] = T0 + 3_600_000
    reg.transition(V, "challenger", "rollout", actor="rollout", rollout_id="r1", phase=1)
    now[0] = T0 + 7_200_000
    reg.record_split({C: 0.9, V: 0.1}, "phase 2", "r1", 2)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "list", "--models-dir", str(models), "--json")
    assert code == 0
    got = json.loads(out)
    assert (got["champion"], got["challenger"], got["rollback_target"]) == (C, V, C)
    assert got["models"] == [
        {"version": C, "role": "champion", "created_at": "2026-01-01T00:00:00+00:00",
         "auc": 0.70, "logloss": 0.31, "gates_passed": True},
        {"version": V, "role": "challenger", "created_at": "2026-01-02T00:00:00+00:00",
         "auc": 0.72, "logloss": 0.31, "gates_passed": True},
        {"version": W, "role": "failed", "created_at": "2026-01-03T00:00:00+00:00",
         "auc": 0.55, "logloss": 0.31, "gates_passed": False},
    ]
    code, out, _ = run(capsys, "models", "list", "--models-dir", str(models))
    assert code == 0 and out.splitlines()[0].startswith("VERSION")
    assert f"{W} failed" in " ".join(out.split()) and "failed" in out.splitlines()[3]


def test_history_json_and_version_filter(models: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    code, out, _ = run(capsys, "models", "history", "--models-dir", str(models), "--json")
    events = json.loads(out)["events"]
    assert code == 0 and [e["seq"] for e in events] == [1, 2, 3, 4]
    assert events == [json.loads(line) for line in
                      (models / HISTORY_FILE).read_text().splitlines()]
    code, out, _ = run(capsys, "models", "history", "--models-dir", str(models), "--version", V,
                       "--json")
    got = json.loads(out)
    assert got["version"] == V and [(e["kind"], e["seq"]) for e in got["events"]] == [
        ("role", 3), ("split", 4)]
    code, out, _ = run(capsys, "models", "history", "--models-dir", str(models))
    assert code == 0 and len(out.splitlines()) == 4 and "new -> champion" in out
    assert "rollout=r1 phase=2" in out.splitlines()[3]


@pytest.mark.parametrize(("at", "serving"), [
    ("2025-12-31T23:59:59Z", {}),
    (str(T0), {C: 1.0}),
    ("2026-01-01T01:30:00Z", {C: 1.0}),       # V challenger, no split yet
    ("2026-01-01T02:00:00Z", {C: 0.9, V: 0.1}),
    ("2026-02-01", {C: 0.9, V: 0.1}),
])
def test_history_at_answers_who_served(models: Path, capsys: pytest.CaptureFixture[str],
                                       at: str, serving: dict[str, float]) -> None:
    code, out, _ = run(capsys, "models", "history", "--models-dir", str(models), "--at", at,
                       "--json")
    got = json.loads(out)
    assert code == 0 and got["serving"] == pytest.approx(serving)
    assert got["at"].endswith("Z") and isinstance(got["at_ms"], int)
    code, out, _ = run(capsys, "models", "history", "--models-dir", str(models), "--at", at,
                       "--version", V, "--json")
    assert json.loads(out)["serving"] == pytest.approx({V: serving.get(V, 0.0)})


@pytest.mark.parametrize(("argv", "message"), [
    (["list", "--models-dir", "{tmp}/nope"], "the models folder {tmp}/nope does not exist"),
    (["history", "--models-dir", "{tmp}/nope", "--json"], "does not exist"),
    (["history", "--models-dir", "{models}", "--version", "v9"], "unknown model version 'v9'"),
    (["history", "--models-dir", "{models}", "--at", "yesterday"], "cannot read 'yesterday'"),
    (["history", "--models-dir", "{models}", "--at", "2026-01-01T00:00:00"], "no time zone"),
])
def test_bad_input_exits_2_in_one_sentence(models: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    tmp = str(models.parent)
    args = [a.replace("{tmp}", tmp).replace("{models}", str(models)) for a in argv]
    code, out, err = run(capsys, "models", *args)
    assert code == 2 and out == ""
    line = err.strip()
    assert line.startswith("headrace models: ") and message.replace("{tmp}", tmp) in line
    assert "\n" not in line


def test_models_dir_defaults_to_the_setting(models: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_MODELS_DIR", str(models))
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0 and json.loads(out)["champion"] == C


# -- training records its decisions -----------------------------------------------------------


def decision(promote: bool) -> GateDecision:
    return GateDecision(promote, ("AUC 0.7000 >= floor 0.6000", "no champion yet"))


METRICS = Metrics(1000, 100, 0.1, 0.7, 0.3, (CalibrationBin(0, 10, 1, 0.1, 0.1, 0.1, 0.1),))


@pytest.mark.parametrize(("promote", "candidate", "role"), [
    (True, False, "champion"), (True, True, "candidate"), (False, False, "failed"),
    (False, True, "failed"),
])
def test_train_records_the_gate_decision(tmp_path: Path, promote: bool, candidate: bool,
                                         role: str) -> None:
    make_version(tmp_path, V, promote)
    reg = ModelRegistry(tmp_path, clock=lambda: T0)
    assert _record(reg, V, decision(promote), METRICS, candidate) == role
    (event,) = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert (event["version"], event["role"], event["actor"]) == (V, role, "train")
    assert "AUC 0.7000 >= floor" in event["reason"]
    assert event["gates"]["promote"] is promote and event["gates"]["auc"] == 0.7
    assert champion_version(tmp_path) == (V if role == "champion" else None)


def test_train_does_not_promote_during_a_rollout(tmp_path: Path) -> None:
    for v in (C, V, W):
        make_version(tmp_path, v, True)
    reg = ModelRegistry(tmp_path, clock=lambda: T0)
    reg.transition(C, "champion", "base")
    reg.transition(V, "challenger", "rollout")
    assert _record(reg, W, decision(True), METRICS, False) is Role.CANDIDATE
    assert champion_version(tmp_path) == C
    assert "not promoted (a rollout is running)" in reg.history(W)[0].reason


def synthetic(n: int = 20_000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = np.sort(T0 + rng.integers(0, 5 * 86_400_000, n))
    rate = rng.beta(2, 8, 2000)
    users = rng.integers(0, 2000, n)
    y = (rng.random(n) < rate[users]).astype(np.int8)
    imps = rng.poisson(20, n)
    return pa.table({"ts": pa.array(ts, pa.timestamp("ms", tz="UTC")), "label": y,
                     "user__impressions_24h": imps,
                     "user__ctr_24h": rng.binomial(imps, rate[users]) / np.maximum(imps, 1)})


@pytest.mark.slow
def test_train_candidate_then_champion_end_to_end(tmp_path: Path) -> None:
    grid = ({"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 100},)
    when = datetime(2026, 1, 5, 12, tzinfo=UTC)
    table, reg = synthetic(), load_registry()
    first = train(table, tmp_path, grid=grid, registry=reg, clock=lambda: when, candidate=True)
    assert first.decision.promote and first.role is Role.CANDIDATE
    assert champion_version(tmp_path) is None and first.summary()["promoted"] is False
    second = train(table, tmp_path, grid=grid, registry=reg, clock=lambda: when)
    assert second.role is Role.CHAMPION and champion_version(tmp_path) == second.version
    models = ModelRegistry(tmp_path)
    assert models.roles() == {first.version: "candidate", second.version: "champion"}
    events = models.history()
    assert [(e.version, e.role, e.actor, e.at_ms) for e in events] == [  # type: ignore[union-attr]
        (first.version, "candidate", "train", int(when.timestamp() * 1000)),
        (second.version, "champion", "train", int(when.timestamp() * 1000))]
    assert models.rollback_target() == second.version
