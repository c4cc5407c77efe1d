"""Labels and training sets on the real local S3 endpoint (moto), offline layout written
here (the stream worker is not involved).

Checks: the S3 results equal those of the same files in a local folder (the local path is
checked against a brute-force oracle in the unit tests), only the needed ``date=``
partitions are listed and opened, outputs reach S3 through a temporary key and nothing
is left behind on failure.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from headrace.core.settings import OfflineSettings
from offline.labels import build_labels, write_labels
from offline.store import OfflineStore, OfflineStoreUnreadable
from offline.training_set import build_training_set

pytestmark = pytest.mark.integration

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
MIDNIGHT = 1_767_225_600_000  # 2026-01-01T00:00:00Z
START = MIDNIGHT - 2 * HOUR
USER_VIEW = "user_activity@1"


def _date(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime("%Y-%m-%d")


def _events(seed: int, n: int = 600) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    ts = np.sort(START + rng.integers(0, 4 * HOUR, n))
    users = np.array([f"u{i}" for i in range(8)])[rng.integers(0, 8, n)]
    imps = pa.table({
        "event_id": [f"i{i}" for i in range(n)],
        "ts": pa.array(ts).cast(pa.timestamp("ms", tz="UTC")),
        "user_id": users, "ad_id": [f"a{i % 6}" for i in range(n)],
        "campaign_id": ["c"] * n, "publisher_id": ["p"] * n, "placement": ["top"] * n,
        "creative_type": ["banner"] * n, "device_type": ["ios"] * n, "country": ["US"] * n,
        "bid_cpm": rng.random(n), "_partition": pa.array(np.zeros(n, np.int32)),
        "_offset": pa.array(np.arange(n)), "_index": pa.array(np.zeros(n, np.int32)),
        "_ingest_ms": pa.array(ts + 10),
    })
    pick = np.flatnonzero(rng.random(n) < 0.2)
    clicks = pa.table({
        "event_id": [f"c{i}" for i in pick], "impression_id": [f"i{i}" for i in pick],
        "ts": pa.array(ts[pick] + rng.integers(0, 40 * MIN, len(pick))).cast(
            pa.timestamp("ms", tz="UTC")),
        "user_id": users[pick], "ad_id": [f"a{i % 6}" for i in pick],
        "campaign_id": ["c"] * len(pick), "publisher_id": ["p"] * len(pick),
        "_partition": pa.array(np.zeros(len(pick), np.int32)),
        "_offset": pa.array(np.arange(len(pick))),
        "_index": pa.array(np.zeros(len(pick), np.int32)),
        "_ingest_ms": pa.array(ts[pick] + 10),
    })
    return imps, clicks


def _view_rows(imps: pa.Table, clicks: pa.Table) -> pa.Table:
    cols = ["ts", "ad_id", "event_id", "_partition", "_offset", "_index", "_ingest_ms"]
    parts = [t.select(cols).append_column("entity_id", t.column("user_id")).append_column(
        "source", pa.array([src] * t.num_rows)) for t, src in ((imps, "impressions"),
                                                                 (clicks, "clicks"))]
    return pa.concat_tables(parts)


def _write(fs: pafs.FileSystem, root: str, imps: pa.Table, clicks: pa.Table) -> None:
    """The offline layout under ``root`` (S3 ``bucket/prefix`` or a local folder)."""
    for base, table, topic in (("events/impression", imps, "impressions"),
                               ("events/click", clicks, "clicks"),
                               (f"views/{USER_VIEW}", _view_rows(imps, clicks), "impressions")):
        days = np.array([_date(t) for t in table.column("ts").cast(pa.int64()).to_pylist()])
        for day in sorted(set(days)):
            folder = f"{root}/{base}/date={day}"
            fs.create_dir(folder, recursive=True)
            pq.write_table(table.filter(pa.array(days == day)),
                           f"{folder}/{topic}-p000-000000000000.parquet", filesystem=fs,
                           compression="zstd")
    # an old partition no query below may touch: reading it would fail
    old = f"{root}/views/{USER_VIEW}/date=2025-11-01"
    fs.create_dir(old, recursive=True)
    with fs.open_output_stream(f"{old}/impressions-p000-000000000000.parquet") as out:
        out.write(b"not parquet")


@pytest.fixture
def offline(ns: Any, tmp_path: Path) -> tuple[OfflineSettings, OfflineSettings]:
    """The same offline data on S3 (``ns``) and in a local folder; both settings."""
    s3 = ns.settings(OfflineSettings, progress=False)
    imps, clicks = _events(0)
    fs = s3.pyarrow_s3()
    assert fs is not None
    _write(fs, s3.offline_path(), imps, clicks)
    _write(pafs.LocalFileSystem(), str(tmp_path / "local"), imps, clicks)
    local = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": str(tmp_path / "local"),
                                      "HEADRACE_PROGRESS": "false"})
    return s3, local


def test_labels_and_training_set_on_s3_equal_local(offline: Any) -> None:
    s3, local = offline
    s3_store, local_store = OfflineStore.from_settings(s3), OfflineStore.from_settings(local)
    labels = build_labels(s3_store, START + HOUR, START + 3 * HOUR, 30 * MIN)
    assert labels.num_rows > 100
    assert labels.equals(build_labels(local_store, START + HOUR, START + 3 * HOUR, 30 * MIN))
    opened: list[str] = []
    files = OfflineStore.files

    def spy(self: OfflineStore, base: str, lo: int | None, hi: int) -> list[str]:
        found = files(self, base, lo, hi)
        opened.extend(found)
        return found

    features = ["user__impressions_1h", "user__ctr_1h", "user__distinct_ads_24h"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OfflineStore, "files", spy)
        out = build_training_set(labels, features, s3)
    assert out.equals(build_training_set(labels, features, local))
    assert out.column_names[-4:] == [*features, "user_activity__is_default"]
    # needed: 8 days (the view TTL) before the first label through the last label
    assert {p.split("/date=")[1].split("/")[0] for p in opened} == {"2025-12-31", "2026-01-01"}


def test_cli_reads_and_writes_s3_atomically(ns: Any, offline: Any) -> None:
    s3 = offline[0]
    fs = s3.pyarrow_s3()
    root = s3.offline_path()
    labels_uri = f"{s3.offline_uri}/work/labels.parquet"
    rows, _ = write_labels(OfflineStore.from_settings(s3), labels_uri, START + HOUR,
                           START + 3 * HOUR, 30 * MIN, s3)
    assert rows > 100
    env = ns.subprocess_env(HEADRACE_PROGRESS="false")
    out_uri = f"{s3.offline_uri}/work/ts.parquet"
    ok = subprocess.run([sys.executable, "-m", "headrace.cli", "training-set", "--labels",
                         labels_uri, "--features", "user__impressions_1h,user__ctr_24h",
                         "--out", out_uri], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    table = pq.read_table(f"{root}/work/ts.parquet", filesystem=fs)
    assert table.num_rows == rows and "user__ctr_24h" in table.column_names
    bad = subprocess.run([sys.executable, "-m", "headrace.cli", "training-set", "--labels",
                          labels_uri, "--features", "user__nope", "--out",
                          f"{s3.offline_uri}/work/bad.parquet"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/work")))
    assert names == ["labels.parquet", "ts.parquet"]  # no temporary keys, no bad output


def test_missing_bucket_is_bad_input(ns: Any) -> None:
    s3 = ns.settings(OfflineSettings, progress=False,
                     offline_uri=f"s3://no-such-bucket-{ns.id}/x")
    labels = pa.table({"user_id": ["u1"], "ts": [MIDNIGHT]})
    with pytest.raises(OfflineStoreUnreadable):
        build_training_set(labels, "user__impressions_1h", s3)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_training_set_from_the_worker_store_matches_the_oracle(ns: Any, tmp_path: Path) -> None:
    """The real worker writes the store; features at any T equal the project oracle."""
    import random

    from tests import streamcheck as sc
    from tests import streamkit as sk
    from tests.adversarial import generate
    from tests.oracle import ENTITY_KEYS, feature_names

    stream = generate(seed=11, small=True, partitions=sk.PARTITIONS)
    bootstrap = ns.stack.kafka_bootstrap
    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)
    exp = sc.expectations(stream, sk.produce_arrivals(bootstrap, ns.topic_prefix,
                                                      stream.arrivals))
    worker = sk.Worker(sk.worker_env(ns, tmp_path), tmp_path / "worker.log", until_idle=5)
    try:
        rc = worker.wait(300)
    finally:
        worker.kill()
    assert rc == 0, worker.log_tail()
    settings = ns.settings(OfflineSettings, progress=False)
    rng = random.Random(11)
    problems: list[str] = []
    for entity, key in ENTITY_KEYS.items():
        ids = exp.index.ids(entity)
        probes = []
        for eid in rng.sample(ids, min(40, len(ids))) + [f"{entity}-never-seen"]:
            times = [e["ts"] for e in exp.index.events_of(entity, eid)] or [stream.start_ms]
            for _ in range(4):
                t = rng.choice(times) + rng.choice([0, 1, -1, rng.randrange(-DAY, 9 * DAY)])
                probes.append((eid, t if rng.random() < 0.8 else t // (15 * MIN) * (15 * MIN)))
        labels = pa.table({key: [p[0] for p in probes], "ts": [p[1] for p in probes]})
        out = build_training_set(labels, feature_names(entity), settings)
        for i, (eid, t) in enumerate(probes):
            want = exp.features(entity, eid, t)
            got = {n: out.column(n)[i].as_py() for n in want}
            if got != want:
                problems.append(f"{entity} {eid} T={t}: got {got}, want {want}")
    assert not problems, "\n".join(problems[:20])
