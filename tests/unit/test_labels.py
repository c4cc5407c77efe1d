"""Click labels against a brute-force oracle; time and duration parsing; the CLI."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headrace.cli import main
from headrace.core.errors import InputError
from headrace.core.timeparse import parse_duration, parse_time
from offline.labels import LABEL_SCHEMA, build_labels
from offline.store import OfflineStore

MIN = 60_000
MIDNIGHT = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T1, T2 = MIDNIGHT - 90 * MIN, MIDNIGHT + 60 * MIN
ATTR = 30 * MIN
IMP_STRINGS = ("user_id", "ad_id", "campaign_id", "publisher_id", "placement",
               "creative_type", "device_type", "country")


def _date(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime("%Y-%m-%d")


def make_events(seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Impressions around [T1, T2) and clicks with edge-case delays."""
    rng = np.random.default_rng(seed)
    imps = []
    for i in range(400):
        ts = T1 - 20 * MIN + int(rng.integers(0, 200 * MIN))
        if i == 0:
            ts = T1  # first included
        if i == 1:
            ts = T2  # excluded
        if i == 2:
            ts = T1 - 1
        imps.append({"event_id": f"i{i}", "ts": ts, "user_id": None if i % 10 == 0 else
                     f"u{i % 7}", "ad_id": f"a{i % 5}", "campaign_id": "c", "publisher_id": "p",
                     "placement": "top", "creative_type": "banner", "device_type": "ios",
                     "country": "US", "bid_cpm": 1.0 + i, "_partition": i % 2, "_offset": i,
                     "_index": 0})
    clicks = []
    for j, imp in enumerate(imps):
        kind = j % 6
        if kind == 0:
            continue  # not clicked
        delay = {1: 0, 2: ATTR, 3: ATTR + 1, 4: -1, 5: int(rng.integers(0, ATTR))}[kind]
        clicks.append({"event_id": f"c{j}", "ts": imp["ts"] + delay,
                       "impression_id": imp["event_id"], "user_id": imp["user_id"],
                       "ad_id": imp["ad_id"], "campaign_id": "c", "publisher_id": "p",
                       "_partition": 0, "_offset": j, "_index": 0})
    clicks.append(dict(clicks[0], event_id="dup"))  # a second click on the same impression
    clicks.append({**clicks[1], "event_id": "orphan", "impression_id": "nope"})
    return imps, clicks


def write_events(root: Path, kind: str, rows: list[dict[str, Any]]) -> None:
    for date in sorted({_date(r["ts"]) for r in rows}):
        part = [r for r in rows if _date(r["ts"]) == date]
        folder = root / "events" / kind / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        cols: dict[str, Any] = {k: [r[k] for r in part] for k in part[0] if k != "ts"}
        cols["ts"] = pa.array([r["ts"] for r in part]).cast(pa.timestamp("ms", tz="UTC"))
        for k, typ in (("_partition", pa.int32()), ("_index", pa.int32())):
            cols[k] = pa.array(cols[k], typ)
        table = pa.table(cols)
        topic = kind + "s"
        pq.write_table(table, folder / f"{topic}-p000-000000000000.parquet")
        pq.write_table(table.slice(0, 5), folder / f"{topic}-p000-000000000999.parquet")


def oracle(imps: list[dict[str, Any]], clicks: list[dict[str, Any]], start: int, end: int,
           attr: int) -> dict[str, int]:
    return {
        i["event_id"]: int(any(c["impression_id"] == i["event_id"]
                               and i["ts"] <= c["ts"] <= i["ts"] + attr for c in clicks))
        for i in imps if start <= i["ts"] < end
    }


@pytest.fixture
def store(tmp_path: Path) -> tuple[OfflineStore, list[dict[str, Any]], list[dict[str, Any]]]:
    imps, clicks = make_events(0)
    write_events(tmp_path / "store", "impression", imps)
    write_events(tmp_path / "store", "click", clicks)
    return OfflineStore.from_uri(str(tmp_path / "store")), imps, clicks


def test_labels_match_bruteforce(store: Any) -> None:
    st, imps, clicks = store
    table = build_labels(st, T1, T2, ATTR)
    assert table.schema.equals(LABEL_SCHEMA)
    want = oracle(imps, clicks, T1, T2, ATTR)
    got = dict(zip(table.column("impression_id").to_pylist(),
                   table.column("label").to_pylist(), strict=True))
    assert got == want  # one row per impression (duplicates dropped), labels equal
    assert 0 < sum(got.values()) < len(got)
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    assert ts == sorted(ts) and ts[0] == T1 and max(ts) < T2
    first = table.filter(pa.compute.equal(table.column("impression_id"), "i3")).to_pylist()[0]
    src = imps[3]
    assert {k: first[k] for k in (*IMP_STRINGS, "bid_cpm")} == {
        k: src[k] for k in (*IMP_STRINGS, "bid_cpm")}


def test_zero_attribution_only_counts_simultaneous_clicks(store: Any) -> None:
    st, imps, clicks = store
    table = build_labels(st, T1, T2, 0)
    got = dict(zip(table.column("impression_id").to_pylist(),
                   table.column("label").to_pylist(), strict=True))
    assert got == oracle(imps, clicks, T1, T2, 0)


@pytest.mark.parametrize(("text", "ms"), [
    ("1767225600000", MIDNIGHT), ("2026-01-01T00:00:00Z", MIDNIGHT),
    ("2026-01-01T01:00:00+01:00", MIDNIGHT), ("2026-01-01", MIDNIGHT),
    ("2026-01-01T00:00:00.250Z", MIDNIGHT + 250),
])
def test_parse_time(text: str, ms: int) -> None:
    assert parse_time(text) == ms


@pytest.mark.parametrize("text", ["yesterday", "2026-01-01T00:00:00", "", "1.5"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(InputError):
        parse_time(text)


@pytest.mark.parametrize(("text", "ms"), [("30m", 1_800_000), ("1h30m", 5_400_000),
                                          ("45s", 45_000), ("500ms", 500), ("2d", 172_800_000),
                                          ("1800000", 1_800_000), ("0s", 0)])
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["30 minutes", "m", "-5m", "1.5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InputError):
        parse_duration(text)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_labels(store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    st, imps, clicks = store
    monkeypatch.setenv("HEADRACE_OFFLINE_URI", st.uri)
    out = tmp_path / "labels" / "l.parquet"
    code, stdout, err = _cli(["labels", "--from", "2025-12-31T22:30:00Z", "--to",
                              str(T2), "--attribution", "30m", "--out", str(out)], capsys)
    assert code == 0, err
    table = pq.read_table(out)
    want = oracle(imps, clicks, T1, T2, ATTR)
    assert table.num_rows == len(want) and f"wrote {len(want)} labels" in stdout
    assert os.listdir(out.parent) == ["l.parquet"]


@pytest.mark.parametrize("argv", [
    ["--from", "yesterday", "--to", str(T2)],
    ["--from", str(T2), "--to", str(T1)],
    ["--from", "2026-01-01T00:00:00", "--to", str(T2)],
    ["--from", str(T1), "--to", str(T2), "--attribution", "soon"],
    ["--from", str(T1), "--to", str(T2), "--store-missing"],
])
def test_cli_bad_input_exits_2(argv: list[str], store: Any, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    st = store[0]
    monkeypatch.setenv("HEADRACE_OFFLINE_URI", st.uri)
    if "--store-missing" in argv:
        argv = argv[:-1]
        monkeypatch.setenv("HEADRACE_OFFLINE_URI", str(tmp_path / "nowhere"))
    out = tmp_path / "o" / "l.parquet"
    code, _, err = _cli(["labels", *argv, "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headrace labels: "), err
    assert not out.exists()


def test_empty_range_writes_an_empty_file(store: Any, tmp_path: Path) -> None:
    from offline.labels import write_labels

    rows, positives = write_labels(store[0], str(tmp_path / "e.parquet"), T2 + 86_400_000,
                                   T2 + 2 * 86_400_000, ATTR)
    assert (rows, positives) == (0, 0)
    assert pq.read_table(tmp_path / "e.parquet").schema.equals(LABEL_SCHEMA)


def test_labels_feed_training_set_with_cold_start(store: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    st = store[0]
    monkeypatch.setenv("HEADRACE_OFFLINE_URI", st.uri)
    monkeypatch.setenv("HEADRACE_PROGRESS", "false")
    labels, out = tmp_path / "l.parquet", tmp_path / "ts.parquet"
    assert _cli(["labels", "--from", str(T1), "--to", str(T2), "--out", str(labels)],
                capsys)[0] == 0
    code, _, err = _cli(["training-set", "--labels", str(labels), "--features", "all",
                         "--cold-start", "--out", str(out)], capsys)
    assert code == 0, err
    table = pq.read_table(out)
    base = pq.read_table(labels)
    assert table.select(base.column_names).equals(base)
    # no view rows in this store: every row is a default, filled from the global priors
    # (computed from the events before the first label), e.g. the global CTR
    assert all(table.column("user_activity__is_default").to_pylist())
    ctr = table.column("ad__ctr_24h").to_pylist()
    assert len(set(ctr)) == 1 and ctr[0] is not None and 0 < ctr[0] < 1
