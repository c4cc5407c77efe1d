"""``headrace produce`` and the EventProducer, against an in-memory sink (no network)."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from feature_defs.layout import partition_for
from headrace.cli import build_parser, main
from headrace.commands.produce import ENCODING_CHOICES, scan_jsonl
from headrace.core.errors import InputError
from headrace.core.settings import ProducerSettings
from streams.codec import ENCODINGS, RawMessage, decode_batch
from streams.producer import EventProducer, MemorySink
from streams.synthetic import generate

START = 1_704_067_200_000


def settings(**env: str) -> ProducerSettings:
    base = {"HEADRACE_TOPIC_PREFIX": "t.", "HEADRACE_PARTITIONS": "4", "HEADRACE_BATCH_EVENTS": "7"}
    base.update(env)
    return ProducerSettings.from_env(base)


def write(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:  # type: ignore[operator]
        fh.write("\n".join(lines) + "\n")
    return path


def good_lines(n: int = 40) -> list[str]:
    return [json.dumps(e) for e in generate(20, n, seed=5, start_ms=START, days=1).events]


BAD_FILES = [
    ("is not valid JSON (Expecting ',' delimiter at column 22)", ['{"type": "impression"']),
    ("is a JSON list, not an object", ["[1, 2]"]),
    ('has no "type"', ['{"event_id": "x"}']),
    ("has unknown type 'view'", ['{"type": "view"}']),
]


def run_handler(argv: list[str], sink: MemorySink) -> int:
    args = build_parser().parse_args(["produce", *argv])
    return args.func(args, settings=settings(), sink=sink)


@pytest.mark.parametrize(("problem", "bad"), BAD_FILES, ids=[p for p, _ in BAD_FILES])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_bad_file_exits_2_naming_the_line_and_produces_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str, bad: list[str], suffix: str
) -> None:
    path = write(tmp_path / f"events{suffix}", good_lines(5) + [""] + bad + good_lines(3))
    assert main(["produce", "--file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("headrace produce: ") and f"line 7 {problem}" in err
    sink = MemorySink()
    with pytest.raises(InputError):
        run_handler(["--file", str(path)], sink)
    assert sink.messages == [] and sink.topics == {}


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--file", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_invalid_utf8_and_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(good_lines(2)[0].encode() + b"\n" + b'{"type": "click\xff"}\n')
    with pytest.raises(InputError, match="line 2 is not valid UTF-8"):
        scan_jsonl(path)
    gz = tmp_path / "e.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="not a valid gzip file"):
        scan_jsonl(gz)


def test_encoding_choices_match_codec() -> None:
    assert ENCODING_CHOICES == ENCODINGS


def decoded_by_partition(sink: MemorySink) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for kind, topic in (("impression", "t.impressions"), ("click", "t.clicks")):
        raw = [
            RawMessage(m.value, m.headers, m.topic, m.partition, o)
            for o, m in enumerate(sink.messages)
            if m.topic == topic
        ]
        batch = decode_batch(kind, raw, now_ms=START + 10**10, max_future_ms=0)  # type: ignore[arg-type]
        assert batch.dead == []
        for row in batch.table.to_pylist():
            out[(topic, row["_partition"])].append(row)
    return out


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_file_is_routed_and_ordered_per_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    lines = good_lines(60)
    path = write(tmp_path / "e.jsonl", lines)
    sink = MemorySink()
    assert run_handler(["--file", str(path), "--encoding", encoding, "--json"], sink) == 0
    summary = json.loads(capsys.readouterr().out)
    events = [json.loads(line) for line in lines]
    assert summary["events"] == 60 == summary["impressions"] + summary["clicks"]
    assert summary["messages"] == len(sink.messages)
    assert set(sink.topics) == {"t.impressions", "t.clicks", "t.headrace-dlq"}
    expected: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in events:
        key = e["user_id"] if e["user_id"] is not None else e["event_id"]
        expected[(f"t.{e['type']}s", partition_for(key, 4))].append(e["event_id"])
    got = decoded_by_partition(sink)
    assert {k: [r["event_id"] for r in v] for k, v in got.items()} == dict(expected)
    if encoding in ("arrow", "avro-batch"):
        assert all(1 <= len(v) for v in got.values())
        assert len(sink.messages) < 60  # envelopes of up to 7 events
    else:
        assert len(sink.messages) == 60


def test_synthetic_run(capsys: pytest.CaptureFixture[str]) -> None:
    sink = MemorySink()
    argv = [
        "--synthetic",
        "--users",
        "10",
        "--events",
        "500",
        "--seed",
        "2",
        "--start",
        "2024-01-01T00:00:00Z",
        "--days",
        "1",
        "--json",
    ]
    assert run_handler(argv, sink) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == 500 and summary["start_ms"] == START
    assert sum(len(v) for v in decoded_by_partition(sink).values()) == 500


def test_producer_sends_bad_type_event_as_json_and_keeps_order() -> None:
    sink = MemorySink()
    producer = EventProducer(
        settings(HEADRACE_PARTITIONS="1"), encoding="arrow", sink=sink, progress=False
    )
    events = generate(5, 30, seed=1, start_ms=START, days=1).events
    impressions = [e for e in events if e["type"] == "impression"]
    impressions[4] = {**impressions[4], "bid_cpm": "free"}
    counts = producer.send_events(impressions)
    producer.flush()
    assert counts.json_fallbacks == 1 and counts.events == len(impressions)
    raw = [
        RawMessage(m.value, m.headers, m.topic, m.partition, o) for o, m in enumerate(sink.messages)
    ]
    batch = decode_batch("impression", raw, now_ms=START + 10**10, max_future_ms=0)
    assert [d.code for d in batch.dead] == ["bad_type"]
    kept = [e["event_id"] for i, e in enumerate(impressions) if i != 4]
    assert batch.table.column("event_id").to_pylist() == kept


def test_producer_rejects_unknown_type_after_sending_what_came_before() -> None:
    sink = MemorySink()
    producer = EventProducer(settings(), encoding="arrow", sink=sink, progress=False)
    events = generate(5, 10, seed=1, start_ms=START, days=1).events + [{"type": "view"}]
    with pytest.raises(InputError, match="event 11"):
        producer.send_events(events)
    assert (
        sum(
            len(
                decode_batch(
                    k,
                    [
                        RawMessage(m.value, m.headers, m.topic, m.partition, 0)
                        for m in sink.messages
                        if m.topic == t
                    ],
                    now_ms=START + 10**10,
                    max_future_ms=0,
                ).table
            )
            for k, t in (("impression", "t.impressions"), ("click", "t.clicks"))
        )
        == 10
    )
