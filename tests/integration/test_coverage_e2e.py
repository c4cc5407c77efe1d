"""Coverage checks on the real local stack: a worker writes a small stream in three
rounds (several parts per partition), then one part is deleted from the S3 store.

Checks: on the complete store ``labels`` and ``training-set`` pass with an empty coverage
report; after the loss both exit 2 with one sentence naming the lost offsets and leave
nothing at ``--out``; with ``--allow-gaps`` both finish, print a WARNING and record the
gap (topic, partition, offsets) in the output's metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest

from offline.coverage import METADATA_KEY
from offline.store import parse_part_name
from tests import streamkit as sk

if TYPE_CHECKING:
    from tests.conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLI = [sys.executable, "-m", "headrace.cli"]
HOUR = 3_600_000


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def _report(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return dict(json.loads(meta[METADATA_KEY.encode()]))


def test_a_lost_part_stops_labels_and_training_sets(ns: Namespace, tmp_path: Path,
                                                   redis_client: Any, s3fs_fs: Any) -> None:
    env = sk.worker_env(ns, tmp_path, HEADRACE_PROGRESS="false",
                        HEADRACE_OFFLINE_PART_ROWS="50")
    start = (time.time_ns() // 1_000_000 // HOUR - 24) * HOUR
    end = start + 12 * HOUR
    # three rounds of 4 hours, each consumed by a worker run to idle: every partition
    # gets at least one part per round (a worker that finds the whole stream waiting
    # may take it in two batches, so two parts)
    for k in range(3):
        iso = datetime.fromtimestamp((start + 4 * k * HOUR) / 1000, UTC).isoformat()
        proc = _run(env, "produce", "--synthetic", "--users", "60", "--events", "1000",
                    "--seed", str(7 + k), "--days", str(4 / 24), "--start", iso,
                    "--encoding", "json", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        worker = sk.Worker(env, tmp_path / f"worker-{k}.log", until_idle=3)
        try:
            rc = worker.wait(180)
        finally:
            worker.kill()
        assert rc == 0, worker.log_tail()

    labels, ts = tmp_path / "labels.parquet", tmp_path / "ts.parquet"
    window = ["--from", str(start), "--to", str(end), "--attribution", "30m"]
    ok = _run(env, "labels", *window, "--out", str(labels))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    report = _report(labels)
    assert report["checked"] and report["gaps"] == [] and report["problems"] == []
    assert report["partitions"] == 2 * sk.PARTITIONS
    ok = _run(env, "training-set", "--labels", str(labels), "--out", str(ts))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert _report(ts)["gaps"] == []

    # lose one part of impressions[0] from the middle of its chain: every file of it
    topic = ns.topic("impressions")
    root: str = ns.settings().offline_path()
    s3fs_fs.invalidate_cache()
    files = [f for f in s3fs_fs.find(f"{root}/events/impression")
             if (n := parse_part_name(f.rsplit("/", 1)[-1])) and n.topic == topic
             and n.partition == 0]
    starts = sorted({n.start for f in files if (n := parse_part_name(f.rsplit("/", 1)[-1]))})
    assert len(starts) >= 3, f"too few parts to lose a middle one: {starts}"
    lost, after = starts[len(starts) // 2], starts[len(starts) // 2 + 1]
    doomed = [f for f in s3fs_fs.find(root)
              if (n := parse_part_name(f.rsplit("/", 1)[-1])) and n.topic == topic
              and n.partition == 0 and n.start == lost]
    assert any("/views/" in f for f in doomed)
    s3fs_fs.rm(doomed)

    for cmd in (["labels", *window, "--out", str(tmp_path / "l2.parquet")],
                ["training-set", "--labels", str(labels), "--out", str(tmp_path / "t2.parquet")]):
        bad = _run(env, *cmd)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"headrace {cmd[0]}: the offline store misses offsets "), bad.stderr
        assert f"-{after - 1} of {topic}[0] in events/impression between two parts" in lines[0]
        assert "--allow-gaps" in lines[0] and not Path(cmd[-1]).exists()

        allowed = _run(env, *cmd, "--allow-gaps")
        assert allowed.returncode == 0, allowed.stderr
        assert f"headrace {cmd[0]}: WARNING: the offline store misses offsets" in allowed.stderr
        report = _report(Path(cmd[-1]))
        holes = [g for g in report["gaps"] if g["where"] == "events/impression"]
        assert [(g["topic"], g["partition"], g["end"], g["reason"]) for g in holes] == [
            (topic, 0, after, "hole")]
        assert starts[len(starts) // 2 - 1] < holes[0]["start"] <= lost
        assert report["allow_gaps"] is True
        print(f"{cmd[0]}: parts of {topic}[0] at {starts}, lost {lost}: {report['gaps']}")
    assert pq.read_metadata(tmp_path / "l2.parquet").num_rows < pq.read_metadata(
        labels).num_rows
