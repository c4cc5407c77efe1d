"""Replaying public CTR datasets (TalkingData, Avazu CSV) as impression and click events.

Each CSV row becomes one impression; a positive row also becomes one click on it.

TalkingData (``ip,app,device,os,channel,click_time,attributed_time,is_attributed``;
every row is an ad click, ``is_attributed`` an app download, times UTC):

=============================  ==========================================================
impression field               from
=============================  ==========================================================
``event_id``                   ``td-<n>``, n = 1-based data row number in the file
``ts``                         ``click_time`` (``YYYY-MM-DD HH:MM:SS``, UTC)
``user_id``                    ``ip``
``ad_id`` and ``campaign_id``  ``app`` (no campaign in the data: campaign = app, so the
                               campaign features duplicate the ad ones)
``publisher_id``               ``channel``
``device_type``                ``device``
``creative_type``              ``os`` (the only other request-context column; it has no
                               field of its own, and this one feeds the cold-start model)
``placement``                  ``"app"`` (all TalkingData traffic is in-app)
``country`` / ``bid_cpm``      ``"unknown"`` / ``1.0``
=============================  ==========================================================

``is_attributed = 1`` adds a click ``td-<n>-c`` on impression ``td-<n>`` at
``attributed_time`` when present and >= ``click_time``, else at ``click_time`` + 1 s.
Downloads can come hours later: the label builder's attribution window decides whether
such a click still labels its impression.

Avazu (``id,click,hour,C1,banner_pos,site_id,…,device_ip,device_type,…,C14..C21``):
``event_id`` = ``id``; ``ts`` from ``hour`` (``YYMMDDHH``, UTC) — the file only has hour
granularity, so the rows of one hour are spread evenly over it in file order
(``hour + k * 3600 s / n_hour``): the stream keeps the file's order and spans the hour
instead of stacking every event on one millisecond. ``user_id`` = ``device_ip``
(``device_id`` is one placeholder for 87 % of rows), ``ad_id`` = ``C14``, ``campaign_id`` =
``C17`` (the group of C14 values), ``publisher_id`` = ``site_id``, or ``app_id`` when
``site_id`` is the in-app placeholder ``85f751fd``; ``placement`` = ``banner_pos``,
``device_type`` = ``device_type``, ``creative_type`` = ``C15xC16`` (banner width x height),
``country`` ``"unknown"``, ``bid_cpm`` 1.0. ``click = 1`` adds click ``<id>-c`` 1 s later.

Order: neither file is in time order (TalkingData is shuffled), and the stream worker
drops events more than 60 s behind its watermark, so replaying in file order would make
most rows late. Events are replayed in event-time order: sorted by ``ts`` (stable, ties
in file order), each click placed at its own ``ts`` after its impression.

The whole file is read and validated before anything is yielded (missing columns,
unparsable CSV, bad timestamps or labels raise :class:`InputError` naming the line); it
is held in memory, which suits these samples (100k rows ≈ 50 MB), not the full datasets.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pacsv

from headrace.core.errors import InputError

__all__ = ["MAPPINGS", "CsvMapping", "CsvReplay", "load_csv", "iter_csv_events",
           "csv_training_rows"]

CsvMapping = Literal["talkingdata", "avazu"]
MAPPINGS: tuple[CsvMapping, ...] = ("talkingdata", "avazu")
AVAZU_APP_SITE = "85f751fd"
_CLICK_DELAY_MS = 1000
_HOUR_MS = 3_600_000
_REQUIRED: dict[str, tuple[str, ...]] = {
    "talkingdata": ("ip", "app", "device", "os", "channel", "click_time", "is_attributed"),
    "avazu": ("id", "click", "hour", "banner_pos", "site_id", "app_id", "device_ip",
              "device_type", "C14", "C15", "C16", "C17"),
}
_RAW: dict[str, tuple[str, ...]] = {"talkingdata": ("ip", "app", "device", "os", "channel")}
_NOT_RAW = frozenset({"id", "click", "hour"})


@dataclass(frozen=True)
class CsvReplay:
    """A validated CSV file mapped to events, rows sorted by event time.

    ``impressions`` holds one row per CSV row (impression fields + ``label``, ``_row``);
    ``clicks`` one row per positive CSV row (click fields + ``_row``).
    """

    path: Path
    mapping: CsvMapping
    impressions: pa.Table
    clicks: pa.Table
    raw: pa.Table  # the raw CSV columns (strings), in the order of ``impressions``

    @property
    def rows(self) -> int:
        return int(self.impressions.num_rows)

    @property
    def events(self) -> int:
        return int(self.impressions.num_rows + self.clicks.num_rows)

    def iter_events(self) -> Iterator[dict[str, Any]]:
        """Impression and click dicts (``type`` impression|click) in event-time order."""
        imp, clk = self.impressions, self.clicks
        ts = np.concatenate([imp.column("ts").to_numpy(), clk.column("ts").to_numpy()])
        row = np.concatenate([imp.column("_row").to_numpy(), clk.column("_row").to_numpy()])
        kind = np.r_[np.zeros(imp.num_rows, np.int8), np.ones(clk.num_rows, np.int8)]
        order = np.lexsort((kind, row, ts))  # ts, then file row, impression before click
        imp_rows = imp.drop_columns(["label", "_row"]).to_pylist()
        clk_rows = clk.drop_columns(["_row"]).to_pylist()
        n = imp.num_rows
        for i in order.tolist():
            if i < n:
                yield {"type": "impression", **imp_rows[i]}
            else:
                yield {"type": "click", **clk_rows[i - n]}


def _read(path: Path, required: tuple[str, ...]) -> pa.Table:
    """All columns as strings (empty stays ""), after checking the header."""
    if not path.exists():
        raise InputError(f"file {path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            first = fh.readline()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    header = first.decode("utf-8", "replace").lstrip("\ufeff").strip().split(",")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{path} has no column(s) {', '.join(missing)} "
                         f"(header: {','.join(header)[:120]})")
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path} is not a valid CSV file: {first_line}") from exc
    if table.num_rows == 0:
        raise InputError(f"{path} has no data rows")
    return table


def _bad_line(path: Path, mask: pa.Array | pa.ChunkedArray, column: str, col: Any,
              expected: str) -> None:
    idx = pc.indices_nonzero(pc.fill_null(mask, True))
    if len(idx):
        i = idx[0].as_py()
        raise InputError(f"{path} line {i + 2}: {column} {col[i].as_py()!r} is not {expected}")


def _times(path: Path, table: pa.Table, column: str, fmt: str, expected: str,
           optional: bool = False) -> np.ndarray:
    """Epoch ms (UTC) of a text column; ``-1`` for empty cells when ``optional``."""
    col = table.column(column)
    parsed = pc.strptime(col, format=fmt, unit="s", error_is_null=True)
    bad = pc.is_null(parsed)
    if optional:
        bad = pc.and_(bad, pc.not_equal(col, ""))
    _bad_line(path, bad, column, col, expected)
    secs = pc.fill_null(parsed.cast(pa.int64()), -1).to_numpy()
    return np.where(secs >= 0, secs * 1000, -1).astype(np.int64)


def _labels(path: Path, table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    _bad_line(path, pc.invert(pc.is_in(col, value_set=pa.array(["0", "1"]))), column, col,
              "0 or 1")
    return np.asarray(pc.equal(col, "1").to_numpy(zero_copy_only=False), dtype=bool)


def _talkingdata(path: Path, t: pa.Table) -> tuple[dict[str, Any], np.ndarray, np.ndarray,
                                                   list[str], pa.Table]:
    fmt, what = "%Y-%m-%d %H:%M:%S", "a time YYYY-MM-DD HH:MM:SS"
    ts = _times(path, t, "click_time", fmt, what)
    label = _labels(path, t, "is_attributed")
    if "attributed_time" in t.column_names:
        attributed = _times(path, t, "attributed_time", fmt, what, optional=True)
    else:
        attributed = np.full(t.num_rows, -1, np.int64)
    click_ts = np.where(attributed >= ts, attributed, ts + _CLICK_DELAY_MS)
    n = t.num_rows
    ids = [f"td-{i}" for i in range(1, n + 1)]
    fields = {"event_id": ids, "ts": ts, "user_id": t.column("ip"), "ad_id": t.column("app"),
              "campaign_id": t.column("app"), "publisher_id": t.column("channel"),
              "placement": pa.repeat("app", n), "creative_type": t.column("os"),
              "device_type": t.column("device")}
    return fields, label, click_ts, ids, t.select(list(_RAW["talkingdata"]))


def _avazu(path: Path, t: pa.Table) -> tuple[dict[str, Any], np.ndarray, np.ndarray,
                                             list[str], pa.Table]:
    hour = _times(path, t, "hour", "%y%m%d%H", "an hour YYMMDDHH")
    label = _labels(path, t, "click")
    order = np.argsort(hour, kind="stable")  # rows of one hour, in file order
    hs = hour[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    sizes = np.diff(np.r_[starts, hs.size])
    k = np.arange(hs.size) - np.repeat(starts, sizes)
    ts = np.empty_like(hour)
    ts[order] = hs + (k * _HOUR_MS) // np.repeat(sizes, sizes)
    site = t.column("site_id")
    publisher = pc.if_else(pc.equal(site, AVAZU_APP_SITE), t.column("app_id"), site)
    ids = t.column("id").to_pylist()
    fields = {"event_id": t.column("id"), "ts": ts, "user_id": t.column("device_ip"),
              "ad_id": t.column("C14"), "campaign_id": t.column("C17"),
              "publisher_id": publisher, "placement": t.column("banner_pos"),
              "creative_type": pc.binary_join_element_wise(t.column("C15"), t.column("C16"),
                                                           "x"),
              "device_type": t.column("device_type")}
    raw = t.select([c for c in t.column_names if c not in _NOT_RAW])
    return fields, label, ts + _CLICK_DELAY_MS, ids, raw


def load_csv(path: Path | str, mapping: str) -> CsvReplay:
    """Read and validate ``path`` whole and map it to events (nothing is yielded yet).

    Raises:
        InputError: unknown mapping; missing/unreadable file; missing columns; a row
            that is not CSV; a bad timestamp or label (the message names the line).
    """
    if mapping not in MAPPINGS:
        raise InputError(f"unknown CSV mapping {mapping!r}; choose talkingdata or avazu")
    path = Path(path)
    table = _read(path, _REQUIRED[mapping])
    build = _talkingdata if mapping == "talkingdata" else _avazu
    fields, label, click_ts, ids, raw = build(path, table)
    n = table.num_rows
    imp = pa.table({**fields, "country": pa.repeat("unknown", n),
                    "bid_cpm": pa.repeat(1.0, n), "label": pa.array(label.astype(np.int8)),
                    "_row": pa.array(np.arange(n))})
    order = pa.array(np.argsort(np.asarray(fields["ts"]), kind="stable"))
    pos = np.flatnonzero(label)
    clk = pa.table({"event_id": [f"{ids[i]}-c" for i in pos.tolist()],
                    "ts": pa.array(click_ts[pos], pa.int64()),
                    "impression_id": [ids[i] for i in pos.tolist()],
                    **{c: imp.column(c).take(pa.array(pos))
                       for c in ("user_id", "ad_id", "campaign_id", "publisher_id")},
                    "_row": pa.array(pos)})
    return CsvReplay(path, mapping, imp.take(order), clk, raw.take(order))


def iter_csv_events(path: Path | str, mapping: str) -> Iterator[dict[str, Any]]:
    """Validate ``path`` whole (raising before the first event), then yield its events in
    event-time order (see the module docstring for the mapping)."""
    return load_csv(path, mapping).iter_events()


def csv_training_rows(path: Path | str, mapping: str) -> pa.Table:
    """The raw-columns table for the raw-columns-only baseline, in event-time order.

    Columns: ``impression_id`` (the replayed impression's ``event_id``, to line rows up
    with a training set), ``ts`` (timestamp ms UTC, the impression time), ``label`` (int8:
    ``is_attributed`` / ``click``) and the raw categorical columns as strings
    (TalkingData: ip, app, device, os, channel; Avazu: every column except id, click, hour).
    """
    replay = load_csv(path, mapping)
    imp = replay.impressions
    table = pa.table({"impression_id": imp.column("event_id"),
                      "ts": imp.column("ts").cast(pa.timestamp("ms", tz="UTC")),
                      "label": imp.column("label")})
    for name in replay.raw.column_names:
        table = table.append_column(name, replay.raw.column(name))
    return table
