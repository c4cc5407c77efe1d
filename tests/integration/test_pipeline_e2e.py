"""``headrace pipeline run`` end to end on the real local services: events in the S3
offline store (moto), the rollout keys in redis-server, a real champion in a models
folder, the CLI as its users run it (subprocesses).

The offline data is written here (the stream worker is not involved): 8 hours of
impressions and clicks up to a few minutes ago, 40 users whose click rates differ
(1 %..35 %), and the ``user_activity`` view's rows, so the user's past CTR predicts the
label and the trained model passes the gates against a weak champion (stored AUC 0.55,
below the floor). The definitions are that one view.

Checks: a full run registers one challenger and starts its rollout (controller state and
the phase-1 split in Redis, the split in the history); a run killed right after
``train`` (the ``HEADRACE_PIPELINE_CRASH_AFTER`` test hook: ``os._exit(137)``) and run
again resumes — exactly one new version, one challenger, one rollout; a training set with
a missing feature column and an all-null feature, and labels without a click and with too
few rows, exit 2 with one sentence per problem and leave ``CHAMPION`` and
``HISTORY.jsonl`` as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from headrace.core.settings import OfflineSettings
from headrace.model.artifact import champion_version, write_artifact
from headrace.model.registry import ModelRegistry, Role, RoleEvent, SplitEvent
from headrace.rollout.split import SplitState, split_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
MIN, HOUR = 60_000, 3_600_000
VIEW = "user_activity@1"
DEFS = "from feature_defs.standard import USER_ACTIVITY\n\nVIEWS = (USER_ACTIVITY,)\n"
FEATURES = ["user__impressions_5m", "user__impressions_1h", "user__impressions_24h",
            "user__impressions_7d", "user__clicks_5m", "user__clicks_1h", "user__clicks_24h",
            "user__clicks_7d", "user__ctr_1h", "user__ctr_24h", "user__ctr_7d",
            "user__distinct_ads_24h"]


def _date(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime("%Y-%m-%d")


def _events(now_ms: int, n: int = 6000, clicks: bool = True, seed: int = 0
            ) -> tuple[pa.Table, pa.Table]:
    """Impressions over the 8 hours before ``now - 5 min``; user ``u{k}`` clicks with
    probability 1 % + 34 % * k / 39, 5 s to 10 min after the impression."""
    rng = np.random.default_rng(seed)
    start = now_ms - 8 * HOUR
    ts = np.sort(start + rng.integers(0, 8 * HOUR - 5 * MIN, n))
    user = rng.integers(0, 40, n)
    users = np.array([f"u{k}" for k in range(40)])[user]
    ads = np.array([f"a{k}" for k in range(6)])[rng.integers(0, 6, n)]
    imps = pa.table({
        "event_id": [f"i{i}" for i in range(n)],
        "ts": pa.array(ts).cast(pa.timestamp("ms", tz="UTC")),
        "user_id": users, "ad_id": ads,
        "campaign_id": ["c"] * n, "publisher_id": ["p"] * n, "placement": ["top"] * n,
        "creative_type": ["banner"] * n, "device_type": ["ios"] * n, "country": ["US"] * n,
        "bid_cpm": rng.random(n), "_partition": pa.array(np.zeros(n, np.int32)),
        "_offset": pa.array(np.arange(n)), "_index": pa.array(np.zeros(n, np.int32)),
        "_ingest_ms": pa.array(ts + 10),
    })
    p = 0.01 + 0.34 * user / 39
    pick = np.flatnonzero(rng.random(n) < p) if clicks else np.array([], np.int64)
    click_ts = ts[pick] + rng.integers(5_000, 10 * MIN, len(pick))
    k = len(pick)
    click = pa.table({
        "event_id": pa.array([f"c{i}" for i in pick], pa.string()),
        "impression_id": pa.array([f"i{i}" for i in pick], pa.string()),
        "ts": pa.array(click_ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "user_id": pa.array(users[pick], pa.string()), "ad_id": pa.array(ads[pick], pa.string()),
        "campaign_id": ["c"] * k, "publisher_id": ["p"] * k,
        "_partition": pa.array(np.zeros(k, np.int32)),
        "_offset": pa.array(np.arange(k, dtype=np.int64)),
        "_index": pa.array(np.zeros(k, np.int32)),
        "_ingest_ms": pa.array(click_ts + 10, pa.int64()),
    })
    return imps, click


def _view_rows(imps: pa.Table, clicks: pa.Table) -> pa.Table:
    cols = ["ts", "ad_id", "event_id", "_partition", "_offset", "_index", "_ingest_ms"]
    parts = [t.select(cols).append_column("entity_id", t.column("user_id")).append_column(
        "source", pa.array([src] * t.num_rows, pa.string()))
        for t, src in ((imps, "impressions"), (clicks, "clicks"))]
    return pa.concat_tables(parts)


def _write(fs: pafs.FileSystem, root: str, imps: pa.Table, clicks: pa.Table) -> None:
    """The offline layout under ``root`` (S3 ``bucket/prefix``)."""
    for base, table, topic in (("events/impression", imps, "impressions"),
                               ("events/click", clicks, "clicks"),
                               (f"views/{VIEW}", _view_rows(imps, clicks), "impressions")):
        if table.num_rows == 0:
            continue
        days = np.array([_date(t) for t in table.column("ts").cast(pa.int64()).to_pylist()])
        for day in sorted(set(days)):
            folder = f"{root}/{base}/date={day}"
            fs.create_dir(folder, recursive=True)
            pq.write_table(table.filter(pa.array(days == day)),
                           f"{folder}/{topic}-p000-000000000000.parquet", filesystem=fs,
                           compression="zstd")


def _champion(models: Path) -> str:
    """A real LightGBM model on ``bid_cpm`` with a stored AUC of 0.55 (below the floor)."""
    import lightgbm as lgb

    rng = np.random.default_rng(1)
    x = rng.random((400, 1)) * 20
    y = (rng.random(400) < 0.05).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1,
                         "seed": 0}, lgb.Dataset(x, y, feature_name=["bid_cpm"]), 5)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps(
            {"features": ["bid_cpm"], "metrics": {"auc": 0.55, "logloss": 0.2},
             "gate": {"promote": True, "reasons": ["test"]}}))

    version = write_artifact(models, datetime(2026, 1, 1, tzinfo=UTC), fill)[0]
    ModelRegistry(models).transition(version, Role.CHAMPION, "test champion", actor="cli")
    return version


class Rig:
    """One test's offline data, models folder, Redis prefix and CLI."""

    def __init__(self, ns: Any, tmp: Path, redis_client: Any, *, clicks: bool = True,
                 **env: str) -> None:
        self.ns, self.tmp, self.redis = ns, tmp, redis_client
        self.now = time.time_ns() // 1_000_000
        s3 = ns.settings(OfflineSettings, progress=False)
        fs = s3.pyarrow_s3()
        assert fs is not None
        self.imps, self.clicks = _events(self.now, clicks=clicks)
        _write(fs, s3.offline_path(), self.imps, self.clicks)
        self.models = tmp / "models"
        self.champion = _champion(self.models)
        defs = tmp / "defs.py"
        defs.write_text(DEFS)
        stats = tmp / "stats.json"
        stats.write_text(json.dumps({"arms": {}}))
        self.env = {**ns.subprocess_env(), "HEADRACE_MODELS_DIR": str(self.models),
                    "HEADRACE_DEFINITIONS": f"{defs}:VIEWS", "HEADRACE_PROGRESS": "false",
                    "HEADRACE_PIPELINE_LOOKBACK": "6h", "HEADRACE_PIPELINE_ATTRIBUTION": "30m",
                    "HEADRACE_PIPELINE_CANDIDATES": "3", "HEADRACE_PIPELINE_MIN_ROWS": "500",
                    "HEADRACE_PIPELINE_RETRY_INITIAL_S": "0.1",
                    "HEADRACE_ROLLOUT_STATS_FILE": str(stats), "HEADRACE_LOG_LEVEL": "WARNING",
                    **env}

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "headrace.cli", "pipeline", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=100,
                              env={**self.env, **env})

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.models)

    def state(self) -> dict[str, Any] | None:
        raw = self.redis.get(f"{self.ns.redis_prefix}:rollout:state")
        return None if raw is None else json.loads(raw)["state"]

    def split(self) -> SplitState | None:
        raw = self.redis.get(split_key(self.ns.redis_prefix))
        return None if raw is None else SplitState.from_json(raw)

    def history_bytes(self) -> bytes:
        return (self.models / "HISTORY.jsonl").read_bytes()

    def run_dirs(self) -> list[Path]:
        return sorted((self.models / "pipeline").glob("p-*"))


def _new_versions(rig: Rig) -> list[str]:
    return [v for v in rig.registry().roles() if v != rig.champion]


def _check_started(rig: Rig, summary: dict[str, Any]) -> str:
    """One new version, the challenger, in a running rollout at phase 1 (3 %)."""
    assert summary["status"] == "succeeded", summary
    version = summary["version"]
    assert _new_versions(rig) == [version]
    reg = rig.registry()
    assert reg.challenger() == version and reg.champion() == rig.champion
    assert champion_version(rig.models) == rig.champion
    roles = [e.role for e in reg.history(version) if isinstance(e, RoleEvent)]
    assert roles == [Role.CANDIDATE, Role.CHALLENGER]
    meta = reg.metadata(version)
    assert meta["data"]["source"] == f"pipeline:{summary['run_id']}"
    assert meta["gate"]["promote"] is True
    state = rig.state()
    rid = "r-" + summary["run_id"].removeprefix("p-")
    assert state is not None and state["rollout_id"] == rid == summary["rollout_id"]
    assert (state["status"], state["phase"], state["challenger"], state["champion"]) == (
        "running", 1, version, rig.champion)
    assert state["pending_done"] == len(state["pending"])  # the start's actions are done
    split = rig.split()
    assert split is not None and (split.rollout_id, split.challenger, split.share) == (
        rid, version, 0.03)
    splits = [e for e in reg.history() if isinstance(e, SplitEvent)]
    assert [(e.rollout_id, dict(e.shares)) for e in splits] == [
        (rid, {rig.champion: 0.97, version: 0.03})]
    assert rig.redis.get(f"{rig.ns.redis_prefix}:rollout:lock") is None  # not driven here
    return version


def test_a_full_run_registers_a_challenger_and_starts_its_rollout(
        ns: Any, tmp_path: Path, redis_client: Any) -> None:
    rig = Rig(ns, tmp_path, redis_client)
    started = time.monotonic()
    done = rig.cli("run", "--json")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    version = _check_started(rig, summary)
    lines = [line for line in done.stderr.splitlines() if line.startswith("pipeline ")]
    assert [line.split()[2] for line in lines] == [
        "labels", "validate_labels", "training_set", "validate_training_set", "train", "gates",
        "register", "start_rollout"]
    assert all(" done in " in line for line in lines), lines
    (folder,) = rig.run_dirs()
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "succeeded" and record["trigger"]["kind"] == "manual"
    steps = {s["name"]: s for s in record["steps"]}
    assert all(s["status"] == "done" and s["attempts"] == 1 for s in steps.values())
    # the labels: the impressions of [created - 6 h, created - 30 min), IVT filtered
    lab = steps["labels"]
    assert lab["inputs"]["end_ms"] - lab["inputs"]["start_ms"] == 6 * HOUR - 30 * MIN
    assert lab["inputs"]["end_ms"] == record["created_ms"] - 30 * MIN
    ts = rig.imps.column("ts").cast(pa.int64())
    in_window = pc.sum(pc.and_(pc.greater_equal(ts, lab["inputs"]["start_ms"]),
                               pc.less(ts, lab["inputs"]["end_ms"]))).as_py()
    ivt = lab["outputs"]["ivt"]
    assert ivt is not None and ivt["impressions_in"] == in_window
    assert lab["outputs"]["rows"] == ivt["impressions_out"] > 0.9 * in_window
    table = pq.read_table(folder / "training_set.parquet")
    assert table.num_rows == lab["outputs"]["rows"] and set(FEATURES) <= set(table.column_names)
    assert steps["train"]["outputs"]["version"] == version
    assert steps["train"]["inputs"]["search_candidates"] == 3
    assert len(rig.registry().metadata(version)["search"]["results"]) == 3
    status = rig.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["current"] is None and doc["runs"][-1]["version"] == version
    # the run is finished; a new one waits for the rollout's end: exit 2, one sentence,
    # nothing trained, no run folder
    before = rig.history_bytes()
    again = rig.cli("run")
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip() == (
        f"headrace pipeline: model {version} is the challenger of a rollout in progress; a "
        "new pipeline run waits until it is promoted or rolled back (headrace rollout "
        "status)")
    assert rig.history_bytes() == before and len(rig.run_dirs()) == 1
    state = rig.state()
    assert state is not None and state["rollout_id"] == summary["rollout_id"]
    print(json.dumps({"full_run_s": round(seconds, 1)}))


def test_a_run_killed_after_train_resumes_to_one_model_one_rollout(
        ns: Any, tmp_path: Path, redis_client: Any) -> None:
    rig = Rig(ns, tmp_path, redis_client)
    killed = rig.cli("run", HEADRACE_PIPELINE_CRASH_AFTER="train")
    assert killed.returncode == 137, killed.stderr
    (folder,) = rig.run_dirs()
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "running"
    assert [s["status"] for s in record["steps"]] == ["done"] * 5 + ["pending"] * 3
    (version,) = _new_versions(rig)
    assert rig.registry().roles()[version] is Role.CANDIDATE and rig.state() is None
    # the kernel released the dead process's lock: the next run resumes
    done = rig.cli("run", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["run_id"] == folder.name and summary["version"] == version
    _check_started(rig, summary)
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["train"]["attempts"] == 1 and steps["gates"]["attempts"] == 1
    # once more: the run is finished, and a new one is refused during the rollout
    assert rig.cli("run").returncode == 2
    split = rig.split()
    assert _new_versions(rig) == [version] and split is not None and split.seq == 1


def test_a_broken_training_set_exits_2_one_sentence_per_problem(
        ns: Any, tmp_path: Path, redis_client: Any) -> None:
    """Killed after ``training_set``; the file is then damaged (a feature column dropped,
    another all null) and the run resumed: the validation stops it."""
    rig = Rig(ns, tmp_path, redis_client)
    assert rig.cli("run", HEADRACE_PIPELINE_CRASH_AFTER="training_set").returncode == 137
    (folder,) = rig.run_dirs()
    path = folder / "training_set.parquet"
    table = pq.read_table(path).drop_columns(["user__ctr_7d"])
    i = table.column_names.index("user__clicks_24h")
    table = table.set_column(i, "user__clicks_24h", pa.nulls(table.num_rows, pa.int64()))
    pq.write_table(table, path)
    history, champion = rig.history_bytes(), champion_version(rig.models)
    bad = rig.cli("run")
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("headrace pipeline: "))
    problems = [line.removeprefix("  - ") for line in lines[head + 1:]]
    assert lines[head].startswith("headrace pipeline: the training set failed validation "
                                  f"({len(problems)} problem")
    assert any("user__ctr_7d" in p and "not a column" in p for p in problems), problems
    assert any("user__clicks_24h" in p for p in problems), problems
    assert all(p.count(". ") == 0 for p in problems)  # one sentence each
    assert rig.history_bytes() == history and champion_version(rig.models) == champion
    assert rig.state() is None and _new_versions(rig) == []
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "invalid" and record["problems"] == problems
    # final: the next run is a new one (the data is read again)
    assert rig.cli("status").returncode == 0


def test_labels_without_clicks_and_too_few_exit_2(ns: Any, tmp_path: Path,
                                                  redis_client: Any) -> None:
    import os
    import socket

    from headrace.pipeline.record import RunStore

    rig = Rig(ns, tmp_path, redis_client, clicks=False, HEADRACE_PIPELINE_MIN_ROWS="100000")
    history = rig.history_bytes()
    with RunStore(rig.models).lock("headrace pipeline run"):  # another process's run
        locked = rig.cli("run")
    assert locked.returncode == 2
    assert locked.stderr.strip() == (
        f"headrace pipeline: another pipeline run holds {rig.models / 'pipeline' / '.lock'} "
        f"(holder {socket.gethostname()}:{os.getpid()} headrace pipeline run); wait for it "
        "to finish")
    assert rig.run_dirs() == []
    bad = rig.cli("run", "--json")
    assert bad.returncode == 2, bad.stderr
    summary = json.loads(bad.stdout)
    assert summary["status"] == "invalid" and len(summary["problems"]) == 2, summary
    lines = bad.stderr.strip().splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("headrace pipeline: "))
    assert "the labels failed validation (2 problems" in lines[head]
    assert [line.removeprefix("  - ") for line in lines[head + 1:]] == summary["problems"]
    assert rig.history_bytes() == history and rig.state() is None
    assert _new_versions(rig) == []


def test_schedule_starts_a_run_on_a_drift_alert_of_the_champion(
        ns: Any, tmp_path: Path, redis_client: Any) -> None:
    """The alerts stream on the real Redis: an alert about another version is passed
    over, the champion's drift starts a run that records it, and the cursor moves past
    it, so the next look does not act on it again."""
    from headrace.pipeline.record import RunRecord, RunStatus, RunStore

    rig = Rig(ns, tmp_path, redis_client, HEADRACE_PIPELINE_RETRY_AFTER="0")
    store = RunStore(rig.models)
    recent = RunRecord.new("p-20260101T000000Z-0000", {"kind": "manual"}, rig.now - HOUR,
                           ["labels"])
    recent.status = RunStatus.SUCCEEDED  # a recent success: the time trigger is quiet
    store.save(recent)
    store.save_cursor("0-0")
    key = f"{ns.redis_prefix}:monitor:alerts"

    def alert(signal: str, version: str) -> str:
        doc = {"at_ms": rig.now, "signal": signal, "model_version": version,
               "feature": "user__ctr_24h", "value": 0.4, "threshold": 0.25, "window": "1h",
               "window_start_ms": rig.now - HOUR, "detail": "psi"}
        return redis_client.xadd(key, {"alert": json.dumps(doc)}).decode()

    alert("drift", "2025-01-01-00")
    quiet = rig.cli("schedule", "--once", "--json")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["action"] == "none"
    drift = alert("drift", rig.champion)
    look = rig.cli("schedule", "--once", "--json")
    assert look.returncode == 0, look.stderr
    doc = json.loads(look.stdout)
    assert doc["action"] == "started" and doc["trigger"]["kind"] == "drift", doc
    assert doc["trigger"]["alert"]["stream_id"] == drift
    _check_started(rig, doc["run"])
    run = store.load(doc["run"]["run_id"])
    assert run.trigger["alert"]["model_version"] == rig.champion
    assert store.cursor() == drift
    again = rig.cli("schedule", "--once", "--json")
    assert json.loads(again.stdout)["action"] == "none"
