"""When ``pipeline schedule`` starts a run: the pure rules with a pinned clock, the
alerts cursor, and the scheduler's looks on fakes (a fake alerts stream, real run
records and registry in a temporary folder)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headrace.model.artifact import set_champion
from headrace.model.registry import ModelRegistry, Role
from headrace.pipeline.record import RunStatus, RunStore
from headrace.pipeline.runner import PipelineRunner, Step, StepContext
from headrace.pipeline.service import Scheduler
from headrace.pipeline.trigger import (
    Alert,
    AlertReader,
    decide,
    next_cursor,
    parse_alert,
    relevant,
)

HOUR, DAY = 3_600_000, 86_400_000
NOW = 1_767_225_600_000 + 100 * DAY
EVERY, COOL = 14 * DAY, HOUR
CH = "2026-01-01-00"


def _alert(sid: str, signal: str, version: str | None = CH) -> Alert:
    return Alert(sid, signal, version, NOW - 1000, "user__ctr_1h")


def _decide(alerts: list[Alert] | None = None, *, success: int | None = NOW - DAY,
            last: int | None = NOW - DAY, champion: str | None = CH,
            rollout: bool = False) -> Any:
    return decide(NOW, champion=champion, alerts=alerts or [], last_success_ms=success,
                  last_run_ms=last, every_ms=EVERY, cooldown_ms=COOL,
                  rollout_in_progress=rollout)


def test_the_time_trigger_fires_at_exactly_every() -> None:
    assert _decide(success=NOW - EVERY + 1, last=NOW - EVERY + 1) is None
    t = _decide(success=NOW - EVERY, last=NOW - EVERY)
    assert t is not None and t.kind == "schedule" and "14.0 days ago" in t.reason
    first = _decide(success=None, last=None)
    assert first is not None and first.kind == "schedule" and "no successful" in first.reason
    # a failed run since the last success: the time trigger still fires after the cooldown
    assert _decide(success=NOW - 20 * DAY, last=NOW - COOL).kind == "schedule"
    assert _decide(success=NOW - 20 * DAY, last=NOW - COOL + 1) is None


def test_before_any_run_the_champions_age_drives_the_time_trigger() -> None:
    def at(since: int | None, champion: str | None = CH) -> Any:
        return decide(NOW, champion=champion, alerts=[], last_success_ms=None,
                      last_run_ms=None, every_ms=EVERY, cooldown_ms=COOL,
                      champion_since_ms=since)

    assert at(NOW - EVERY + 1) is None  # a champion trained 14 days - 1 ms ago: wait
    old = at(NOW - EVERY)
    assert old is not None and old.kind == "schedule"
    assert old.reason == (f"no pipeline run yet and the champion {CH} was trained 14.0 days "
                          "ago (every 14 days)")
    assert at(None).reason == "no successful pipeline run yet"  # age unknown
    assert at(NOW, champion=None).reason == "no successful pipeline run yet"


def test_a_drift_alert_on_the_champion_triggers() -> None:
    t = _decide([_alert("5-0", "drift")])
    assert t is not None and t.kind == "drift" and t.alert is not None
    assert t.alert.stream_id == "5-0"
    assert t.reason == f"drift alert 5-0 on feature user__ctr_1h of champion {CH}"
    assert t.to_dict()["alert"]["model_version"] == CH


def test_a_drift_alert_on_another_version_does_not() -> None:
    assert _decide([_alert("5-0", "drift", "2025-12-01-00")]) is None
    assert _decide([_alert("5-0", "drift", None)]) is None


def test_a_performance_alert_triggers_for_the_champion_or_no_version() -> None:
    assert _decide([_alert("6-0", "performance")]).kind == "performance"
    assert _decide([_alert("6-0", "performance", None)]).kind == "performance"
    assert _decide([_alert("6-0", "performance", "2025-12-01-00")]) is None
    assert _decide([_alert("6-0", "latency")]) is None  # not a retraining signal


def test_the_first_relevant_alert_wins() -> None:
    t = _decide([_alert("1-0", "drift", "old"), _alert("2-0", "performance"),
                 _alert("3-0", "drift")])
    assert t.kind == "performance" and t.alert.stream_id == "2-0"


def test_nothing_starts_during_a_rollout_or_the_cooldown_or_without_a_champion() -> None:
    alerts = [_alert("5-0", "drift")]
    assert _decide(alerts, rollout=True) is None
    assert _decide(alerts, success=None, last=None, rollout=True) is None
    assert _decide(alerts, last=NOW - COOL + 1) is None
    assert _decide(alerts, last=NOW - COOL).kind == "drift"
    assert _decide(alerts, champion=None) is None  # no champion: no drift of it


def test_relevant() -> None:
    assert relevant(_alert("1-0", "drift"), CH)
    assert not relevant(_alert("1-0", "drift"), None)


def test_the_cursor_moves_past_what_was_acted_on_or_irrelevant() -> None:
    drift, other = _alert("5-0", "drift"), _alert("4-0", "drift", "old")
    assert next_cursor("3-0", None, [], CH, fired=False) == "3-0"
    assert next_cursor("3-0", "5-0", [other, drift], CH, fired=True) == "5-0"
    assert next_cursor("3-0", "4-0", [other], CH, fired=False) == "4-0"
    # a relevant alert not acted on (cooldown, rollout): read again next time
    assert next_cursor("3-0", "5-0", [other, drift], CH, fired=False) == "3-0"
    # a malformed last entry (not parsed) is passed too
    assert next_cursor("3-0", "9-0", [other], CH, fired=False) == "9-0"


def test_parse_alert() -> None:
    doc = {"at_ms": 5, "signal": "drift", "model_version": CH, "feature": "f", "value": 0.4,
           "threshold": 0.25, "window": "1h", "window_start_ms": 1, "detail": "psi"}
    a = parse_alert("7-1", {"alert": json.dumps(doc)})
    assert a == Alert("7-1", "drift", CH, 5, "f", doc)
    assert a.to_dict()["value"] == 0.4 and a.to_dict()["stream_id"] == "7-1"
    assert parse_alert("7-2", {"alert": "{nope"}) is None
    assert parse_alert("7-3", {"other": "x"}) is None
    assert parse_alert("7-4", {"alert": "[1]"}) is None


class FakeRedis:
    """XREAD/XREVRANGE over an in-memory stream with ids ``n-0``."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.reads: list[str] = []

    def add(self, doc: Mapping[str, Any] | str) -> str:
        sid = f"{len(self.entries) + 1}-0"
        text = doc if isinstance(doc, str) else json.dumps(doc)
        self.entries.append((sid.encode(), {b"alert": text.encode()}))
        return sid

    def xrevrange(self, key: str, count: int) -> list[Any]:
        return self.entries[::-1][:count]

    def xread(self, streams: dict[str, str], count: int) -> list[Any]:
        ((key, cursor),) = streams.items()
        self.reads.append(cursor)
        n = int(cursor.split("-")[0])
        new = [e for e in self.entries if int(e[0].decode().split("-")[0]) > n][:count]
        return [(key.encode(), new)] if new else []


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


class Rig:
    def __init__(self, tmp: Path, champion_age_ms: int = EVERY) -> None:
        self.models = tmp / "models"
        for v in (CH, "2026-01-02-00"):
            (self.models / v).mkdir(parents=True)
            (self.models / v / "metadata.json").write_text(json.dumps(
                {"gate": {"promote": True}, "created_at": _iso(NOW - champion_age_ms)}))
        set_champion(self.models, CH)
        self.registry = ModelRegistry(self.models)
        self.redis = FakeRedis()
        self.now = NOW
        self.ran = 0
        self.in_rollout = False
        self.store = RunStore(self.models)

        def step(ctx: StepContext) -> Mapping[str, Any]:
            self.ran += 1
            return {}

        self.runner = PipelineRunner(self.store, [Step("only", step)], clock_ms=lambda: self.now)
        self.scheduler = Scheduler(self.store, self.runner, self.registry,
                                   AlertReader(self.redis, "hr"),
                                   rollout_running=lambda: self.in_rollout, every_ms=EVERY,
                                   cooldown_ms=COOL, poll_s=30)

    def look(self) -> Any:
        """One look (typed loosely: the tests read the optional fields they expect)."""
        return self.scheduler.look()

    def drift(self, version: str = CH) -> str:
        return self.redis.add({"at_ms": self.now, "signal": "drift", "model_version": version,
                               "feature": "user__ctr_1h"})


def test_the_scheduler_starts_on_time_then_waits(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    look = rig.look()
    assert look.action == "started" and look.trigger.kind == "schedule"
    assert look.run.status is RunStatus.SUCCEEDED and rig.ran == 1
    assert rig.store.load(look.run.run_id).trigger["kind"] == "schedule"
    rig.now += EVERY - 1
    assert rig.look().action == "none"
    rig.now += 1
    assert rig.look().trigger.kind == "schedule" and rig.ran == 2


def test_a_fresh_champion_waits_for_its_own_period(tmp_path: Path) -> None:
    rig = Rig(tmp_path, champion_age_ms=DAY)
    assert rig.look().action == "none" and rig.ran == 0
    rig.now += EVERY - DAY - 1
    assert rig.look().action == "none"
    rig.now += 1
    look = rig.look()
    assert look.action == "started" and "was trained 14.0 days ago" in look.trigger.reason


def test_old_alerts_never_trigger_and_a_restart_does_not_retrigger(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.drift()  # before the scheduler's first start: not acted on
    rig.look()  # the time trigger (no run yet), cursor at "1-0"
    assert rig.store.cursor() == "1-0" and rig.ran == 1
    rig.now += 2 * HOUR
    assert rig.look().action == "none"
    sid = rig.drift()
    look = rig.look()
    assert look.trigger.kind == "drift" and look.trigger.alert.stream_id == sid
    assert rig.store.load(look.run.run_id).trigger["alert"]["stream_id"] == sid
    assert rig.store.cursor() == sid
    # a restarted scheduler (new objects, same folder) does not act on it again
    rig.now += 2 * HOUR
    again = Rig.__new__(Rig)
    again.__dict__.update(rig.__dict__)
    again.scheduler = Scheduler(RunStore(rig.models), rig.runner, rig.registry,
                                AlertReader(rig.redis, "hr"),
                                rollout_running=lambda: False, every_ms=EVERY,
                                cooldown_ms=COOL, poll_s=30)
    assert again.look().action == "none" and rig.ran == 2
    assert rig.redis.reads[-1] == sid


def test_an_alert_during_a_rollout_waits_for_its_end(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.look()
    rig.now += 2 * HOUR
    rig.registry.transition("2026-01-02-00", Role.CHALLENGER, "test", actor="cli")
    sid = rig.drift()
    assert rig.look().action == "none"
    assert rig.store.cursor() != sid  # kept: read again
    rig.registry.transition("2026-01-02-00", Role.FAILED, "rolled back", actor="cli")
    rig.in_rollout = True  # the controller's state still says running
    assert rig.look().action == "none"
    rig.in_rollout = False
    look = rig.look()
    assert look.trigger.kind == "drift" and look.trigger.alert.stream_id == sid


def test_an_interrupted_run_is_resumed_before_any_trigger(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rec = rig.runner.new("p-20260411T000000Z-0001", {"kind": "drift"})
    rec.step("only").status = rec.step("only").status.RUNNING
    rig.store.save(rec)
    look = rig.look()
    assert look.action == "resumed" and look.run.run_id == rec.run_id
    assert look.run.status is RunStatus.SUCCEEDED and rig.ran == 1


def test_a_failed_run_is_abandoned_when_a_new_one_starts(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rec = rig.runner.new("p-20260101T000000Z-0001", {"kind": "schedule"})
    rec.status = RunStatus.FAILED
    rig.store.save(rec)
    rig.now = rec.created_ms + COOL
    look = rig.look()
    assert look.action == "started" and look.run.run_id != rec.run_id
    assert rig.store.load(rec.run_id).status is RunStatus.ABANDONED


@pytest.mark.parametrize("doc", ["{broken", json.dumps({"signal": "drift"})])
def test_a_malformed_alert_is_skipped(tmp_path: Path, doc: str) -> None:
    rig = Rig(tmp_path)
    rig.look()
    rig.now += 2 * HOUR
    sid = rig.redis.add(doc)
    assert rig.look().action == "none" and rig.store.cursor() == sid
