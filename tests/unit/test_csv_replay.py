"""CSV replay (TalkingData, Avazu): the mapping on hand-written rows, event-time order,
and bad files exiting 2 with nothing produced (in-memory sink, no network)."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from feature_defs.layout import partition_for
from headrace.cli import build_parser, main
from headrace.core.errors import InputError, UsageError
from headrace.core.settings import ProducerSettings
from streams.codec import RawMessage, decode_batch
from streams.csv_replay import csv_training_rows, iter_csv_events, load_csv
from streams.events import event_problem
from streams.producer import MemorySink

TD_HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed"
TD_ROWS = [
    "87540,12,1,13,497,2017-11-07 09:30:38,,0",
    "105560,25,1,17,259,2017-11-07 09:30:10,2017-11-07 10:00:00,1",  # download 30 min later
    "101424,12,1,19,212,2017-11-06 18:05:24,,1",  # no attributed_time: click + 1 s
    "94584,13,2,13,477,2017-11-07 09:30:38,,0",  # same second as row 1: file order
]
AV_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
             "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
             "C14,C15,C16,C17,C18,C19,C20,C21")
AV_ROWS = [
    "11,0,14102101,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
    "12,1,14102100,1005,1,85f751fd,c4e18dd6,50e219e0,9c13b419,2347f47a,f95efa07,a99f214a,"
    "96809ac8,711ee120,1,0,15704,320,50,1722,0,35,100084,79",
    "13,0,14102100,1002,0,84c7ba46,c4e18dd6,50e219e0,ecad2386,7801e8d9,07d7df22,c357dbff,"
    "b3cf8def,8a4875bd,0,0,21689,300,250,2480,3,297,100111,61",
    "14,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "e8275b8f,6332421a,1,0,15706,320,50,1722,0,35,100084,79",
]
H = 3_600_000
TD_T = {  # epoch ms of the hand-written times
    "2017-11-06 18:05:24": 1509991524000, "2017-11-07 09:30:10": 1510047010000,
    "2017-11-07 09:30:38": 1510047038000, "2017-11-07 10:00:00": 1510048800000,
}
AV_HOUR0 = 1413849600000  # 2014-10-21 00:00 UTC


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    text = "\n".join([header, *rows]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def imp(event_id: str, ts: int, user: str, ad: str, campaign: str, publisher: str,
        placement: str, creative: str, device: str) -> dict[str, Any]:
    return {"type": "impression", "event_id": event_id, "ts": ts, "user_id": user, "ad_id": ad,
            "campaign_id": campaign, "publisher_id": publisher, "placement": placement,
            "creative_type": creative, "device_type": device, "country": "unknown",
            "bid_cpm": 1.0}


def click(event_id: str, ts: int, of: str, user: str, ad: str, campaign: str,
          publisher: str) -> dict[str, Any]:
    return {"type": "click", "event_id": event_id, "ts": ts, "impression_id": of,
            "user_id": user, "ad_id": ad, "campaign_id": campaign, "publisher_id": publisher}


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_talkingdata_mapping_in_event_time_order(tmp_path: Path, suffix: str) -> None:
    path = write_csv(tmp_path / f"td{suffix}", TD_HEADER, TD_ROWS)
    got = list(iter_csv_events(path, "talkingdata"))
    t = TD_T
    assert got == [
        imp("td-3", t["2017-11-06 18:05:24"], "101424", "12", "12", "212", "app", "19", "1"),
        click("td-3-c", t["2017-11-06 18:05:24"] + 1000, "td-3", "101424", "12", "12", "212"),
        imp("td-2", t["2017-11-07 09:30:10"], "105560", "25", "25", "259", "app", "17", "1"),
        imp("td-1", t["2017-11-07 09:30:38"], "87540", "12", "12", "497", "app", "13", "1"),
        imp("td-4", t["2017-11-07 09:30:38"], "94584", "13", "13", "477", "app", "13", "2"),
        click("td-2-c", t["2017-11-07 10:00:00"], "td-2", "105560", "25", "25", "259"),
    ]
    for e in got:
        assert event_problem(e["type"], e, now_ms=t["2017-11-07 10:00:00"], max_future_ms=0) is None


def test_avazu_mapping_spreads_each_hour_in_file_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "av.csv", AV_HEADER, AV_ROWS)
    replay = load_csv(path, "avazu")
    assert (replay.rows, replay.events) == (4, 5)
    got = list(replay.iter_events())
    # Three rows in hour 00 at 0, 20 and 40 minutes (file order); row 11 alone in hour 01.
    assert got == [
        imp("12", AV_HOUR0, "96809ac8", "15704", "1722", "9c13b419", "1", "320x50", "1"),
        click("12-c", AV_HOUR0 + 1000, "12", "96809ac8", "15704", "1722", "9c13b419"),
        imp("13", AV_HOUR0 + H // 3, "b3cf8def", "21689", "2480", "84c7ba46", "0", "300x250",
            "0"),
        imp("14", AV_HOUR0 + 2 * H // 3, "e8275b8f", "15706", "1722", "1fbe01fe", "0", "320x50",
            "1"),
        imp("11", AV_HOUR0 + H, "ddd2926e", "15706", "1722", "1fbe01fe", "0", "320x50", "1"),
    ]


def test_training_rows_hold_raw_columns_and_labels(tmp_path: Path) -> None:
    td = csv_training_rows(write_csv(tmp_path / "td.csv", TD_HEADER, TD_ROWS), "talkingdata")
    assert td.column_names == ["impression_id", "ts", "label", "ip", "app", "device", "os",
                               "channel"]
    assert str(td.schema.field("ts").type) == "timestamp[ms, tz=UTC]"
    assert td.column("impression_id").to_pylist() == ["td-3", "td-2", "td-1", "td-4"]
    assert td.column("label").to_pylist() == [1, 1, 0, 0]
    assert td.column("ip").to_pylist() == ["101424", "105560", "87540", "94584"]
    av = csv_training_rows(write_csv(tmp_path / "av.csv", AV_HEADER, AV_ROWS), "avazu")
    assert av.column_names[:4] == ["impression_id", "ts", "label", "C1"]
    assert {"id", "click", "hour"}.isdisjoint(av.column_names) and len(av.column_names) == 24
    assert av.column("label").to_pylist() == [1, 0, 0, 0]


BAD = [
    ("talkingdata", TD_HEADER.replace(",channel", ""), [r.replace(",497", "") for r in TD_ROWS],
     "has no column(s) channel"),
    ("talkingdata", TD_HEADER, TD_ROWS[:2] + ["1,2,3,4,5,2017-11-07 25:00:00,,0"],
     "line 4: click_time '2017-11-07 25:00:00' is not a time YYYY-MM-DD HH:MM:SS"),
    ("talkingdata", TD_HEADER, TD_ROWS[:1] + ["1,2,3,4,5,2017-11-07 09:00:00,yesterday,1"],
     "line 3: attributed_time 'yesterday' is not a time"),
    ("talkingdata", TD_HEADER, TD_ROWS + ["1,2,3,4,5,2017-11-07 09:00:00,,yes"],
     "line 6: is_attributed 'yes' is not 0 or 1"),
    ("talkingdata", TD_HEADER, TD_ROWS[:1] + ["1,2,3"], "is not a valid CSV file"),
    ("talkingdata", TD_HEADER, [], "has no data rows"),
    ("avazu", AV_HEADER, AV_ROWS[:1] + [AV_ROWS[1].replace("14102100", "2014-10-21")],
     "line 3: hour '2014-10-21' is not an hour YYMMDDHH"),
    ("avazu", TD_HEADER, TD_ROWS, "has no column(s) id, click, hour"),
]


def settings() -> ProducerSettings:
    return ProducerSettings.from_env({"HEADRACE_TOPIC_PREFIX": "t.",
                                      "HEADRACE_PARTITIONS": "4"})


def run_handler(argv: list[str], sink: MemorySink) -> int:
    args = build_parser().parse_args(["produce", *argv])
    return int(args.func(args, settings=settings(), sink=sink))


@pytest.mark.parametrize(("mapping", "header", "rows", "problem"), BAD,
                         ids=[b[3][:30] for b in BAD])
def test_bad_csv_exits_2_in_one_sentence_and_produces_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mapping: str, header: str,
    rows: list[str], problem: str,
) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    assert main(["produce", "--csv", str(path), "--mapping", mapping]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headrace produce: ") and problem in err and "\n" not in err
    sink = MemorySink()
    with pytest.raises(InputError):
        run_handler(["--csv", str(path), "--mapping", mapping], sink)
    assert sink.messages == [] and sink.topics == {}


def test_missing_file_and_mapping_usage(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--csv", str(tmp_path / "nope.csv"), "--mapping", "avazu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    sink = MemorySink()
    with pytest.raises(UsageError, match="go together"):
        run_handler(["--csv", str(tmp_path / "x.csv")], sink)
    with pytest.raises(UsageError, match="go together"):
        run_handler(["--synthetic", "--mapping", "avazu"], sink)
    assert sink.messages == []
    with pytest.raises(InputError, match="unknown CSV mapping"):
        load_csv(tmp_path / "x.csv", "criteo")


@pytest.mark.parametrize("encoding", ["json", "arrow"])
def test_csv_is_produced_routed_and_in_event_time_order_per_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    path = write_csv(tmp_path / "td.csv", TD_HEADER, TD_ROWS)
    sink = MemorySink()
    argv = ["--csv", str(path), "--mapping", "talkingdata", "--encoding", encoding, "--json",
            "--no-progress"]
    assert run_handler(argv, sink) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"] == str(path) and summary["mapping"] == "talkingdata"
    assert (summary["rows"], summary["events"], summary["impressions"], summary["clicks"]) == (
        4, 6, 4, 2)
    expected: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in iter_csv_events(path, "talkingdata"):
        expected[(f"t.{e['type']}s", partition_for(e["user_id"], 4))].append(e["event_id"])
    got: dict[tuple[str, int], list[str]] = defaultdict(list)
    for kind, topic in (("impression", "t.impressions"), ("click", "t.clicks")):
        raw = [RawMessage(m.value, m.headers, m.topic, m.partition, i)
               for i, m in enumerate(sink.messages) if m.topic == topic]
        batch = decode_batch(kind, raw, now_ms=TD_T["2017-11-07 10:00:00"], max_future_ms=0)  # type: ignore[arg-type]
        assert batch.dead == []
        for row in batch.table.to_pylist():
            got[(topic, row["_partition"])].append(row["event_id"])
    assert dict(got) == dict(expected)
