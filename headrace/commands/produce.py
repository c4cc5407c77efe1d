"""``headrace produce``: publish events from a JSON-lines file, a public CTR dataset's CSV
(``--csv FILE --mapping talkingdata|avazu``, see :mod:`streams.csv_replay`) or a synthetic
generator.

A file holds one event per line (``type`` impression|click, ``ts`` epoch milliseconds;
gzip when the name ends in ``.gz``; blank lines are skipped). The whole file is checked
first, in a streaming pass, and nothing is produced unless every line is a JSON object
with a known ``type``; field-level problems (a negative bid, a bad id) are left to the
stream worker, which dead-letters them. Events are then published in file order.
A CSV file is likewise read and validated whole first (columns, timestamps, labels), then
replayed in event-time order.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.core.errors import InputError, UsageError

if TYPE_CHECKING:
    from headrace.core.settings import ProducerSettings
    from streams.producer import MessageSink

__all__ = ["register", "handler", "FileSummary", "scan_jsonl", "iter_jsonl", "ENCODING_CHOICES"]

#: Same as ``streams.codec.ENCODINGS`` (not imported: keeps ``headrace --help`` light).
ENCODING_CHOICES = ("json", "avro", "arrow", "avro-batch")
_KINDS = ("impression", "click")


@dataclass(frozen=True)
class FileSummary:
    """What the validation pass found: counts per kind."""

    events: int
    impressions: int
    clicks: int


def _open(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise InputError(f"file {path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the events of a JSON-lines file in order.

    Raises:
        InputError: The file is missing or unreadable, or a line is not a JSON object with
            ``type`` impression or click; the message names the line.
    """
    try:
        with _open(path) as fh:
            # Bytes, decoded per line, so a UTF-8 error is reported on its own line.
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line.rstrip(b"\r\n"))
                except UnicodeDecodeError:
                    raise InputError(f"{path} line {line_no} is not valid UTF-8") from None
                except ValueError as exc:
                    detail = str(exc)
                    if isinstance(exc, json.JSONDecodeError):
                        detail = f"{exc.msg} at column {exc.colno}"
                    raise InputError(
                        f"{path} line {line_no} is not valid JSON ({detail})"
                    ) from None
                if not isinstance(event, dict):
                    raise InputError(
                        f"{path} line {line_no} is a JSON {type(event).__name__}, not an object"
                    )
                kind = event.get("type")
                if kind not in _KINDS:
                    what = 'has no "type"' if kind is None else f"has unknown type {kind!r}"
                    raise InputError(f"{path} line {line_no} {what} (expected impression or click)")
                yield event
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path} is not a valid gzip file ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def scan_jsonl(path: Path) -> FileSummary:
    """Validate a whole JSON-lines file (streaming) and count its events. Raises like
    :func:`iter_jsonl`; produces nothing."""
    impressions = clicks = 0
    for event in iter_jsonl(path):
        if event["type"] == "impression":
            impressions += 1
        else:
            clicks += 1
    return FileSummary(impressions + clicks, impressions, clicks)


def _parse_start(text: str) -> int:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--start {text!r} is not an ISO 8601 date or time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # documented: a time without offset is UTC
    return int(when.timestamp() * 1000)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "produce",
        help="publish impression/click events to Kafka",
        description="Publish events from a JSON-lines file or a TalkingData/Avazu CSV file "
        "(validated first) or a synthetic generator to the impressions and clicks topics.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="JSON-lines file (.jsonl or .jsonl.gz)")
    source.add_argument("--synthetic", action="store_true", help="generate a synthetic stream")
    source.add_argument(
        "--csv", type=Path, metavar="FILE", help="a TalkingData or Avazu CSV file (needs --mapping)"
    )
    p.add_argument(
        "--mapping",
        choices=("talkingdata", "avazu"),
        default=None,
        help="how --csv rows map to impressions and clicks",
    )
    p.add_argument(
        "--encoding",
        choices=ENCODING_CHOICES,
        default=None,
        help="wire encoding (default: HEADRACE_ENCODING, arrow)",
    )
    g = p.add_argument_group("synthetic stream")
    g.add_argument("--users", type=int, default=1000, help="number of users (default 1000)")
    g.add_argument("--events", type=int, default=100_000, help="number of events (default 100000)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--start",
        default=None,
        help="start of event time, ISO 8601 (no offset = UTC; default: now - days, "
        "floored to the hour)",
    )
    g.add_argument("--days", type=float, default=7.0, help="event-time span in days (default 7)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=handler)


def handler(
    args: argparse.Namespace,
    *,
    settings: ProducerSettings | None = None,
    sink: MessageSink | None = None,
) -> int:
    """Run ``headrace produce``. ``settings``/``sink`` are injectable for tests.

    Raises:
        InputError: The file is invalid (nothing produced).
        UsageError: A synthetic-stream argument is out of range, or only one of ``--csv``
            and ``--mapping`` was given.
        BrokerError: Kafka failed.
    """
    summary: dict[str, Any] = {}
    csv_path = getattr(args, "csv", None)
    mapping = getattr(args, "mapping", None)
    replay = None
    if (csv_path is None) != (mapping is None):
        raise UsageError("--csv and --mapping go together (--csv FILE --mapping talkingdata|avazu)")
    if csv_path is not None:
        from streams.csv_replay import load_csv

        replay = load_csv(csv_path, args.mapping)  # validated whole: a bad file produces nothing
        total = replay.events
        summary.update(source=str(csv_path), mapping=mapping, rows=replay.rows)
    elif args.file is not None:
        found = scan_jsonl(args.file)  # before any connection: a bad file produces nothing
        total = found.events
        summary["source"] = str(args.file)
    else:
        if args.users < 1 or args.events < 0 or args.days <= 0 or args.seed < 0:
            raise UsageError("--users must be >= 1, --events and --seed >= 0 and --days > 0")
        if args.start is not None:
            start_ms = _parse_start(args.start)
        else:
            now = datetime.now(UTC) - timedelta(days=args.days)
            start_ms = int(now.replace(minute=0, second=0, microsecond=0).timestamp() * 1000)
        total = args.events
        summary.update(source="synthetic", seed=args.seed, users=args.users, start_ms=start_ms)

    from streams.producer import EventProducer

    if settings is None:
        from headrace.core.settings import ProducerSettings

        settings = ProducerSettings()
    progress = False if args.no_progress else None
    started = time.monotonic()
    producer = EventProducer(
        settings, encoding=args.encoding, sink=sink, progress=progress, total=total
    )
    if replay is not None:
        producer.send_events(replay.iter_events())
    elif args.file is not None:
        producer.send_events(iter_jsonl(args.file))
    else:
        from streams.synthetic import iter_events

        producer.send_events(iter_events(args.users, args.events, args.seed, start_ms, args.days))
    counts = producer.flush()
    seconds = time.monotonic() - started
    summary.update(
        events=counts.events,
        impressions=counts.impressions,
        clicks=counts.clicks,
        messages=counts.messages,
        json_fallbacks=counts.json_fallbacks,
        encoding=producer.encoding,
        partitions=producer.partitions,
        topics=sorted(producer.topics.values()),
        seconds=round(seconds, 3),
        events_per_s=round(counts.events / seconds, 1) if seconds > 0 else None,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"produced {counts.events:,} events ({counts.impressions:,} impressions, "
            f"{counts.clicks:,} clicks) in {counts.messages:,} {producer.encoding} messages to "
            f"{', '.join(summary['topics'])} in {seconds:.2f} s "
            f"({summary['events_per_s'] or 0:,.0f} events/s)",
            file=sys.stdout,
        )
    return 0
