"""``headrace pipeline status`` and the settings, on run records written here (no
services)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from headrace.cli import main
from headrace.pipeline.record import RunRecord, RunStatus, RunStore, StepStatus
from headrace.pipeline.settings import PipelineSettings
from headrace.pipeline.steps import STEP_NAMES

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["pipeline", *args])
    return code, out.getvalue(), err.getvalue()


def _records(models: Path) -> None:
    store = RunStore(models)
    done = RunRecord.new("p-20260101T000000Z-aaaa", {"kind": "schedule"}, T0, STEP_NAMES)
    for s in done.steps:
        s.status, s.started_ms, s.finished_ms, s.attempts = StepStatus.DONE, T0, T0 + 1500, 1
    done.step("train").outputs = {"version": "2026-01-01-00"}
    done.status, done.finished_ms = RunStatus.SUCCEEDED, T0 + 60_000
    store.save(done)
    cur = RunRecord.new("p-20260102T000000Z-bbbb", {"kind": "drift"}, T0 + 86_400_000,
                        STEP_NAMES)
    cur.step("labels").status = StepStatus.DONE
    cur.step("labels").outputs = {"rows": 4163}
    cur.step("validate_labels").status = StepStatus.FAILED
    cur.step("validate_labels").attempts = 3
    cur.step("validate_labels").error = "redis down"
    cur.status = RunStatus.FAILED
    cur.problems = ["redis down"]
    store.save(cur)


def test_status_lists_the_runs_and_the_current_steps(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_MODELS_DIR", raising=False)
    _records(tmp_path)
    code, out, _ = _cli("status", "--models-dir", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ("p-20260101T000000Z-aaaa  succeeded  schedule     started "
                        "2026-01-01T00:00:00Z  ended 2026-01-01T00:01:00Z  version 2026-01-01-00")
    assert lines[1].startswith("p-20260102T000000Z-bbbb  failed     drift ")
    assert "run p-20260102T000000Z-bbbb (failed):" in lines
    assert "  labels done (rows 4163)" in lines
    assert "  validate_labels failed, 3 attempts: redis down" in lines
    assert "  problem: redis down" in lines
    code, out, _ = _cli("status", "--json", "--models-dir", str(tmp_path))
    doc = json.loads(out)
    assert [r["status"] for r in doc["runs"]] == ["succeeded", "failed"]
    assert doc["runs"][0]["version"] == "2026-01-01-00"
    assert doc["runs"][0]["steps"][0]["seconds"] == 1.5
    assert doc["current"]["run_id"] == "p-20260102T000000Z-bbbb"


def test_status_of_an_empty_folder(tmp_path: Path) -> None:
    code, out, _ = _cli("status", "--models-dir", str(tmp_path))
    assert code == 0 and out.strip() == f"no pipeline runs in {tmp_path / 'pipeline'}"


def test_bad_settings_are_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_PIPELINE_LOOKBACK", "30 days")
    code, _, err = _cli("status")
    assert code == 2
    assert err.startswith("headrace pipeline: invalid setting HEADRACE_PIPELINE_LOOKBACK")
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("HEADRACE_PIPELINE_LOOKBACK", "10m")
    code, _, err = _cli("status")
    assert code == 2 and "must be shorter than HEADRACE_PIPELINE_LOOKBACK (10m)" in err


def test_settings_defaults_and_the_offline_view() -> None:
    s = PipelineSettings.from_env({"HEADRACE_OFFLINE_URI": "/data/x",
                                   "HEADRACE_PIPELINE_CANDIDATES": "7"})
    assert (s.lookback_ms, s.attribution_ms, s.every_ms) == (
        30 * 86_400_000, 30 * 60_000, 14 * 86_400_000)
    assert s.pipeline_poll_s == 30 and s.pipeline_candidates == 7 and s.check() == []
    off = s.offline()
    assert off.offline_uri == "/data/x" and off.progress is False
    assert PipelineSettings.from_env({"HEADRACE_PIPELINE_SEARCH_BUDGET_S": ""}
                                     ).pipeline_search_budget_s is None
