"""The pipeline's step runner and run records on fakes: resume after a failure at every
step (and after a real ``os._exit`` mid-run, in a forked child), transient retries
counted, the early ends (invalid data, rejected model), the lock, the atomic record."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from headrace.core.errors import InputError, OfflineStoreError, OnlineStoreError
from headrace.core.retry import Backoff
from headrace.pipeline.metrics import PipelineMetrics
from headrace.pipeline.record import (
    PipelineLocked,
    RunRecord,
    RunStatus,
    RunStore,
    StepStatus,
    new_run_id,
)
from headrace.pipeline.runner import (
    PipelineRunner,
    Rejected,
    Step,
    StepContext,
    ValidationFailed,
    is_transient,
)
from headrace.pipeline.service import run_once
from headrace.pipeline.trigger import Trigger

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NAMES = ("a", "b", "c", "d", "e")


class Fakes:
    """Steps that count their calls (in a file, so a forked child's calls count too)
    and fail as told: ``fail[name]`` = the exceptions to raise on its next calls."""

    def __init__(self, folder: Path) -> None:
        self.log = folder / "calls.log"
        self.fail: dict[str, list[BaseException]] = {}

    def step(self, name: str) -> Step:
        def fn(ctx: StepContext) -> Mapping[str, Any]:
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.write(name + "\n")
            ctx.record_inputs(seen=[s.name for s in ctx.run.steps
                                    if s.status is StepStatus.DONE])
            if self.fail.get(name):
                raise self.fail[name].pop(0)
            return {"value": f"{name}-out", "prev": ctx.run.output(NAMES[NAMES.index(name) - 1])
                    .get("value") if name != NAMES[0] else None}
        return Step(name, fn)

    def calls(self) -> Counter[str]:
        if not self.log.exists():
            return Counter()
        return Counter(self.log.read_text().split())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def _runner(tmp_path: Path, fakes: Fakes, **kw: Any) -> PipelineRunner:
    sleeps: list[float] = []
    return PipelineRunner(RunStore(tmp_path / "models"), [fakes.step(n) for n in NAMES],
                          retries=kw.pop("retries", 3), clock_ms=Clock(), sleep=sleeps.append,
                          backoff=Backoff(initial_s=0.5, max_s=4.0, jitter=0.0), **kw)


def test_a_clean_run_records_every_step(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    runner = _runner(tmp_path, fakes)
    rec = runner.run(runner.new("p-1", {"kind": "manual"}))
    assert rec.status is RunStatus.SUCCEEDED and rec.problems == []
    assert fakes.calls() == Counter(NAMES)
    loaded = RunStore(tmp_path / "models").load("p-1")
    assert [s.status for s in loaded.steps] == [StepStatus.DONE] * 5
    assert [s.attempts for s in loaded.steps] == [1] * 5
    assert loaded.output("c") == {"value": "c-out", "prev": "b-out"}  # outputs chain
    assert loaded.step("d").inputs == {"seen": ["a", "b", "c"]}
    for s in loaded.steps:  # the clock ticks 1 s per reading: started < finished
        assert s.started_ms is not None and s.finished_ms is not None
        assert T0 < s.started_ms < s.finished_ms
    last = loaded.step("e").finished_ms
    assert loaded.finished_ms is not None and last is not None and loaded.finished_ms > last


@pytest.mark.parametrize("k", range(len(NAMES)))
def test_a_run_failing_at_any_step_resumes_there(tmp_path: Path, k: int) -> None:
    fakes = Fakes(tmp_path)
    name = NAMES[k]
    fakes.fail[name] = [InputError(f"step {name} broke")]
    runner = _runner(tmp_path, fakes)
    rec = runner.new("p-1", {"kind": "manual"})
    with pytest.raises(InputError, match=f"step {name} broke"):
        runner.run(rec)
    stored = runner.store.load("p-1")
    assert stored.status is RunStatus.FAILED and stored.problems == [f"step {name} broke"]
    assert [s.status for s in stored.steps] == (
        [StepStatus.DONE] * k + [StepStatus.FAILED] + [StepStatus.PENDING] * (4 - k))
    assert stored.step(name).error == f"step {name} broke"
    assert runner.store.unfinished() is not None
    # a new process resumes from the record on disk
    again = _runner(tmp_path, fakes).run(runner.store.load("p-1"))
    assert again.status is RunStatus.SUCCEEDED
    assert fakes.calls() == Counter({n: 2 if n == name else 1 for n in NAMES})
    assert again.step(name).attempts == 2 and again.step(name).error is None
    assert runner.store.unfinished() is None


def _child(models: str, log: str, crash_after: str) -> None:
    fakes = Fakes(Path(log).parent)
    runner = PipelineRunner(RunStore(models), [fakes.step(n) for n in NAMES],
                            crash_after=crash_after)
    run_once(RunStore(models), runner, Trigger("manual", "test"))


@pytest.mark.parametrize("crash_after", ["a", "c", "d"])
def test_a_killed_run_resumes_after_its_last_finished_step(tmp_path: Path,
                                                          crash_after: str) -> None:
    """``os._exit(137)`` right after a step is saved done (the test hook), in a forked
    child holding the lock; the parent then resumes: every step ran exactly once."""
    models = tmp_path / "models"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child, args=(str(models), str(tmp_path / "calls.log"),
                                             crash_after))
    child.start()
    child.join(20)
    assert child.exitcode == 137
    store = RunStore(models)
    rec = store.unfinished()
    assert rec is not None and rec.status is RunStatus.RUNNING
    done = NAMES[: NAMES.index(crash_after) + 1]
    assert [s.name for s in rec.steps if s.status is StepStatus.DONE] == list(done)
    fakes = Fakes(tmp_path)
    final = run_once(store, _runner(tmp_path, fakes), Trigger("manual", "resume"))
    assert final.run_id == rec.run_id and final.status is RunStatus.SUCCEEDED
    assert fakes.calls() == Counter(NAMES)  # the child's calls and ours: once each
    assert len(store.runs()) == 1


def test_transient_failures_are_retried_with_backoff_and_counted(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["b"] = [OnlineStoreError("redis down", transient=True),
                       OnlineStoreError("redis down", transient=True)]
    metrics = PipelineMetrics()
    runner = _runner(tmp_path, fakes, metrics=metrics)
    slept: list[float] = []
    runner.sleep = slept.append
    rec = runner.run(runner.new("p-1", {"kind": "drift"}))
    assert rec.status is RunStatus.SUCCEEDED
    assert rec.step("b").attempts == 3 and fakes.calls()["b"] == 3
    assert slept == [0.5, 1.0]  # 0.5 s doubling, no jitter
    reg = metrics.registry
    assert reg.get_sample_value("headrace_pipeline_retries_total", {"step": "b"}) == 2
    assert reg.get_sample_value("headrace_pipeline_runs_total",
                                {"outcome": "succeeded", "trigger": "drift"}) == 1
    assert rec.finished_ms is not None
    assert reg.get_sample_value("headrace_pipeline_last_success_timestamp_seconds") == \
        rec.finished_ms / 1000
    assert reg.get_sample_value("headrace_pipeline_step_seconds", {"step": "e"}) is not None


def test_retries_give_up_after_the_configured_tries(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["c"] = [OnlineStoreError("redis down", transient=True)] * 5
    runner = _runner(tmp_path, fakes, retries=3)
    with pytest.raises(OnlineStoreError):
        runner.run(runner.new("p-1", {"kind": "manual"}))
    rec = runner.store.load("p-1")
    assert rec.status is RunStatus.FAILED and rec.step("c").attempts == 3
    assert fakes.calls()["c"] == 3 and fakes.calls()["d"] == 0


def test_a_non_transient_backend_error_is_not_retried(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["a"] = [OnlineStoreError("WRONGTYPE", transient=False)]
    runner = _runner(tmp_path, fakes)
    with pytest.raises(OnlineStoreError):
        runner.run(runner.new("p-1", {"kind": "manual"}))
    assert fakes.calls()["a"] == 1


def test_which_errors_are_transient() -> None:
    assert is_transient(OnlineStoreError("x", transient=True))
    assert not is_transient(OnlineStoreError("x"))
    assert not is_transient(InputError("bad file"))
    s3 = OfflineStoreError("cannot list")
    s3.__cause__ = OSError("connection refused")
    assert is_transient(s3)
    gone = OfflineStoreError("cannot list")
    gone.__cause__ = FileNotFoundError("no such bucket")
    assert not is_transient(gone)


def test_a_validation_failure_ends_the_run_invalid(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["b"] = [ValidationFailed("labels", ["too few rows: 10 < 1000",
                                                   "the label rate is 0"])]
    metrics = PipelineMetrics()
    runner = _runner(tmp_path, fakes, metrics=metrics)
    with pytest.raises(ValidationFailed) as info:
        runner.run(runner.new("p-1", {"kind": "manual"}))
    assert str(info.value).splitlines()[1:] == ["  - too few rows: 10 < 1000",
                                                "  - the label rate is 0"]
    assert info.value.exit_code == 2
    rec = runner.store.load("p-1")
    assert rec.status is RunStatus.INVALID and rec.finished
    assert rec.problems == ["too few rows: 10 < 1000", "the label rate is 0"]
    assert runner.store.unfinished() is None  # final: not resumed
    assert runner.run(rec) is rec and fakes.calls()["c"] == 0
    assert metrics.registry.get_sample_value(
        "headrace_pipeline_runs_total", {"outcome": "invalid", "trigger": "manual"}) == 1
    assert metrics.registry.get_sample_value(
        "headrace_pipeline_last_success_timestamp_seconds") == 0


def test_a_rejected_model_skips_the_rest(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["c"] = [Rejected(["AUC 0.55 is below the floor 0.60"], {"version": "v9"})]
    runner = _runner(tmp_path, fakes)
    rec = runner.run(runner.new("p-1", {"kind": "manual"}))
    assert rec.status is RunStatus.REJECTED
    assert [s.status for s in rec.steps] == [StepStatus.DONE] * 3 + [StepStatus.SKIPPED] * 2
    assert rec.output("c") == {"version": "v9"}
    assert fakes.calls() == Counter({"a": 1, "b": 1, "c": 1})


def test_restart_abandons_the_unfinished_run(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail["b"] = [InputError("broken")]
    runner = _runner(tmp_path, fakes)
    with pytest.raises(InputError):
        run_once(runner.store, runner, Trigger("manual", "first"))
    first = runner.store.runs()[0]
    fresh = run_once(runner.store, runner, Trigger("manual", "second"), restart=True)
    assert fresh.run_id != first.run_id and fresh.status is RunStatus.SUCCEEDED
    assert fresh.trigger == {"kind": "manual", "reason": "second", "alert": None}
    old = runner.store.load(first.run_id)
    assert old.status is RunStatus.ABANDONED and old.finished
    assert old.problems[-1] == "abandoned by pipeline run --restart"


def test_a_second_process_is_refused_by_the_lock(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "models")
    with store.lock("headrace pipeline run"):
        # another open file description: flock refuses it as it would another process
        other = RunStore(tmp_path / "models")
        with pytest.raises(PipelineLocked) as info, other.lock():
            pass
    message = str(info.value)
    assert f":{os.getpid()} headrace pipeline run" in message
    assert info.value.exit_code == 2 and "\n" not in message
    with store.lock():  # released: free again
        pass


def test_the_record_is_rewritten_atomically(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "models")
    rec = RunRecord.new(new_run_id(T0), {"kind": "manual"}, T0, NAMES)
    assert rec.run_id.startswith("p-20260101T000000Z-")
    store.save(rec)
    rec.step("a").outputs = {"path": "x"}
    store.save(rec)
    folder = store.root / rec.run_id
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]  # no temporary left
    doc = json.loads((folder / "run.json").read_text())
    assert doc["format"] == 1 and doc["steps"][0]["outputs"] == {"path": "x"}
    assert RunRecord.from_dict(doc).to_dict() == rec.to_dict()
    (folder / "run.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read the pipeline run record"):
        store.load(rec.run_id)
    assert store.runs() == []  # an unreadable record is not a run


def test_a_record_of_other_steps_is_refused(tmp_path: Path) -> None:
    runner = _runner(tmp_path, Fakes(tmp_path))
    rec = RunRecord.new("p-1", {}, T0, ("a", "b"))
    with pytest.raises(InputError, match="--restart"):
        runner.run(rec)


def test_preflight_refuses_a_new_run_but_not_a_resume(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    runner = _runner(tmp_path, fakes)

    def refuse() -> None:
        raise InputError("a rollout is running")

    with pytest.raises(InputError, match="a rollout is running"):
        run_once(runner.store, runner, Trigger("manual", "x"), preflight=refuse)
    assert runner.store.runs() == [] and fakes.calls() == Counter()
    fakes.fail["b"] = [InputError("broken")]
    with pytest.raises(InputError, match="broken"):
        run_once(runner.store, runner, Trigger("manual", "x"))
    resumed = run_once(runner.store, runner, Trigger("manual", "x"), preflight=refuse)
    assert resumed.status is RunStatus.SUCCEEDED  # the unfinished run needs no preflight
    with pytest.raises(InputError, match="a rollout is running"):  # --restart is a new run
        run_once(runner.store, runner, Trigger("manual", "x"), restart=True, preflight=refuse)
    assert len(runner.store.runs()) == 1


def test_run_once_is_refused_while_another_holds_the_lock(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    runner = _runner(tmp_path, fakes)
    with RunStore(tmp_path / "models").lock("headrace pipeline schedule"), \
            pytest.raises(PipelineLocked, match="headrace pipeline schedule"):
        run_once(runner.store, runner, Trigger("manual", "x"))
    assert runner.store.runs() == [] and fakes.calls() == Counter()
