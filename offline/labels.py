"""Click labels: one row per accepted impression, labelled 1 when it was clicked in time.

Invariant: for every impression with ``start <= ts < end`` the output holds one row whose
``label`` is 1 exactly when an accepted click with ``impression_id`` equal to the
impression's ``event_id`` has ``imp.ts <= click.ts <= imp.ts + attribution`` (both ends
inclusive), else 0.

The work runs one UTC day of impressions at a time (reading the clicks of that day
through ``attribution`` later), so memory is bounded by one day of events; rows come out
sorted by ``ts`` then source coordinates. Impressions repeating an ``event_id`` inside a
day (a producer retry) give one row, the first by (``ts``, partition, offset, index).

:func:`write_labels` first checks the store's coverage (:mod:`offline.coverage`) when
given a check, and then one more rule: labels with no positive although the store holds
clicks in ``[start, end)`` (with a positive attribution window) are an error too, as
clicks that join no impression mean lost impressions or broken ids.

With ``ivt`` (:class:`~offline.ivt.IvtRules`; None = off, the default here and in
``headrace labels`` unless ``--ivt``), invalid traffic is filtered out before labelling
(:func:`offline.ivt.filter_ivt`), one labelled day at a time, over that day's impressions
(after the ``event_id`` de-duplication) and the clicks that can label them: the clicks of
``[lo, hi + attribution)`` whose ``impression_id`` is one of the day's impressions, plus
the day's own clicks (``lo <= ts < hi``) that join no impression of ``[lo - attribution,
hi + attribution)`` (those are the ``click_without_impression`` candidates; a click
belonging to the previous or next day's impressions is left to that day, so every click
is judged once). A burst minute or a user's CTR is thus counted within one labelled day.
Dropped impressions have no row; dropped clicks label nothing. The summed
:class:`~offline.ivt.IvtReport` and the rules are recorded as JSON under
:data:`IVT_METADATA_KEY` in the schema metadata of the table :func:`build_labels`
returns (each :func:`label_chunks` table carries its day's), and of the file
:func:`write_labels` writes (read it back with :func:`ivt_report_of`). The "no positive
although clicks" rule still counts the clicks before filtering. Online features are not
filtered (see :mod:`offline.ivt`).

Also here: reading and checking a labels table given to the training set
(:func:`label_times`, :func:`check_labels_schema`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from headrace.core.errors import InputError
from offline.coverage import CoverageCheck, EventScope
from offline.ivt import IvtReport, IvtRules, filter_ivt, merge_reports
from offline.store import COORDINATES, OfflineStore, atomic_output, rewrite_metadata

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = [
    "LABEL_SCHEMA",
    "IVT_METADATA_KEY",
    "ivt_report_of",
    "label_times",
    "check_labels_schema",
    "label_chunks",
    "label_scopes",
    "build_labels",
    "write_labels",
]

_DAY_MS = 86_400_000
_STRINGS = ("user_id", "ad_id", "campaign_id", "publisher_id", "placement", "creative_type",
            "device_type", "country")
#: columns of a labels file, in order
LABEL_SCHEMA = pa.schema(
    [pa.field("impression_id", pa.string(), nullable=False)]
    + [pa.field(name, pa.string()) for name in _STRINGS]
    + [pa.field("bid_cpm", pa.float64()),
       pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
       pa.field("label", pa.int8(), nullable=False)]
)


#: schema-metadata key of the IVT report of a labels table or file (JSON: ``rules`` and
#: :meth:`~offline.ivt.IvtReport.to_dict`)
IVT_METADATA_KEY = "headrace.ivt"


def _ivt_metadata(rules: IvtRules, report: IvtReport) -> dict[str, str]:
    return {IVT_METADATA_KEY: json.dumps({"rules": rules.to_dict(), **report.to_dict()},
                                         sort_keys=True)}


def ivt_report_of(schema: pa.Schema) -> IvtReport | None:
    """The IVT report recorded in a labels schema's metadata (``pq.read_schema(path)`` for
    a file), None when the labels were built without IVT filtering."""
    raw = (schema.metadata or {}).get(IVT_METADATA_KEY.encode())
    return None if raw is None else IvtReport.from_dict(json.loads(raw))


def label_times(ts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A labels table's ``ts`` column as int64 epoch ms (finer units floored to ms).

    Raises:
        InputError: naive timestamps, another type, or null values.
    """
    typ = ts.type
    if pa.types.is_timestamp(typ):
        if typ.tz is None:
            raise InputError("the labels' ts column holds timestamps without a time zone; "
                             "store UTC timestamps (tz=UTC) or int64 epoch milliseconds")
        ms = pc.floor_temporal(ts, unit="millisecond") if typ.unit in ("us", "ns") else ts
        ints = ms.cast(pa.timestamp("ms", tz=typ.tz)).cast(pa.int64())
    elif pa.types.is_integer(typ):
        ints = ts.cast(pa.int64())
    else:
        raise InputError(f"the labels' ts column has type {typ}; expected a UTC timestamp "
                         "or int64 epoch milliseconds")
    if ints.null_count:
        raise InputError(f"the labels' ts column has {ints.null_count} null value(s)")
    return np.asarray(ints.to_numpy(), dtype=np.int64)


def check_labels_schema(schema: pa.Schema, required: Mapping[str, str],
                        reserved: Iterable[str], where: str) -> None:
    """Check a labels table's columns before any work.

    Args:
        schema: the labels' schema.
        required: key column → what needs it (for the message).
        reserved: names the caller will add (must not exist yet).
        where: how messages name the labels (``the labels file x.parquet``).

    Raises:
        InputError: no ``ts`` column or one of a wrong type, a required column missing,
            or a reserved name taken.
    """
    if "ts" not in schema.names:
        raise InputError(f"{where} has no 'ts' column (a UTC timestamp or int64 epoch ms)")
    label_times(pa.array([], schema.field("ts").type))  # type checks only
    for key, why in required.items():
        if key not in schema.names:
            raise InputError(f"{where} has no '{key}' column, which {why} need")
    clash = sorted(set(schema.names) & set(reserved))
    if clash:
        raise InputError(f"{where} already has a column named {clash[0]}, which the "
                         "training set would add")


def _day_ranges(start: int, end: int) -> Iterator[tuple[int, int]]:
    lo = start
    while lo < end:
        hi = min(end, (lo // _DAY_MS + 1) * _DAY_MS)
        yield lo, hi
        lo = hi


_EMPTY_IMPS = pa.schema([pa.field("event_id", pa.string()), pa.field("user_id", pa.string()),
                         pa.field("ts", pa.timestamp("ms", tz="UTC"))]).empty_table()
_EMPTY_CLICKS = pa.schema([pa.field("event_id", pa.string()),
                           pa.field("impression_id", pa.string()),
                           pa.field("user_id", pa.string()),
                           pa.field("ts", pa.timestamp("ms", tz="UTC"))]).empty_table()


def _ivt_clicks(store: OfflineStore, clicks: pa.Table, ids: pa.Array, start: int, end: int,
                attribution: int) -> pa.Table:
    """The clicks IVT judges with the day's impressions ``ids`` (module docstring)."""
    own = pc.is_in(clicks.column("impression_id"), value_set=ids)
    others = [store.read_events("impression", ["event_id"], lo, hi)
              for lo, hi in ((start - attribution, start), (end, end + attribution)) if lo < hi]
    near = pa.chunked_array([c for o in others if o.num_rows
                             for c in o.column("event_id").cast(pa.string()).chunks],
                            pa.string())
    elsewhere = pc.is_in(clicks.column("impression_id"), value_set=near.combine_chunks())
    today = pc.less(clicks.column("ts"), pa.scalar(end, clicks.column("ts").type))
    orphan = pc.and_(pc.invert(pc.fill_null(pc.or_(own, elsewhere), False)), today)
    return clicks.filter(pc.or_(pc.fill_null(own, False), orphan))


def _label_range(store: OfflineStore, start: int, end: int, attribution: int,
                 ivt: IvtRules | None = None) -> tuple[pa.Table, int, IvtReport | None]:
    """Labels of the impressions in ``[start, end)`` (one UTC day at most), the number of
    stored clicks with ``start <= ts < end``, and the IVT report (None without ``ivt``)."""
    imps = store.read_events("impression", ["event_id", *_STRINGS, "bid_cpm", *COORDINATES],
                             start, end)
    click_cols = ["impression_id"] if ivt is None else ["event_id", "impression_id", "user_id"]
    clicks = store.read_events("click", click_cols, start, end + attribution)
    in_range = 0
    if clicks.num_rows:
        in_range = int(pc.sum(pc.less(clicks.column("ts"),
                                      pa.scalar(end, clicks.column("ts").type))).as_py() or 0)
    report = None
    if imps.num_rows:
        imps = imps.sort_by([("ts", "ascending")] + [(c, "ascending") for c in COORDINATES])
        ids = imps.column("event_id").combine_chunks()
        _, first = np.unique(np.asarray(pc.dictionary_encode(ids).indices.to_numpy(
            zero_copy_only=False)), return_index=True)
        if len(first) < imps.num_rows:  # a repeated event_id: keep its first row
            imps = imps.take(pa.array(np.sort(first)))
    if ivt is not None:
        if not imps.num_rows:
            imps = _EMPTY_IMPS
        if clicks.num_rows:
            clicks = _ivt_clicks(store, clicks, imps.column("event_id").combine_chunks(),
                                 start, end, attribution)
        else:
            clicks = _EMPTY_CLICKS
        imps, clicks, report = filter_ivt(imps, clicks, ivt)
    if imps.num_rows == 0:
        return LABEL_SCHEMA.empty_table(), in_range, report
    ids = imps.column("event_id").combine_chunks()
    label = np.zeros(imps.num_rows, np.int8)
    if clicks.num_rows:
        pos = pc.index_in(clicks.column("impression_id"), value_set=ids)
        pos_np = np.asarray(pc.fill_null(pos, -1).to_numpy(), np.int64)
        hit = pos_np >= 0
        imp_ts = np.asarray(imps.column("ts").cast(pa.int64()).to_numpy(), np.int64)
        click_ts = np.asarray(clicks.column("ts").cast(pa.int64()).to_numpy(), np.int64)
        at = pos_np[hit]
        lag = click_ts[hit] - imp_ts[at]
        label[at[(lag >= 0) & (lag <= attribution)]] = 1
    cols = {"impression_id": ids}
    cols.update({name: imps.column(name) for name in _STRINGS})
    cols.update({"bid_cpm": imps.column("bid_cpm"), "ts": imps.column("ts"),
                 "label": pa.array(label, pa.int8())})
    return pa.table(cols).cast(LABEL_SCHEMA), in_range, report


def _check_args(store: OfflineStore, start: int, end: int, attribution: int) -> None:
    if start >= end:
        raise InputError("--from must be before --to")
    if attribution < 0:
        raise InputError("the attribution window must not be negative")
    store.check()


def _label_days(store: OfflineStore, start: int, end: int, attribution: int,
                ivt: IvtRules | None) -> Iterator[tuple[pa.Table, int, IvtReport | None]]:
    for lo, hi in _day_ranges(start, end):
        yield _label_range(store, lo, hi, attribution, ivt)


def label_chunks(store: OfflineStore, start: int, end: int, attribution: int, *,
                 ivt: IvtRules | None = None) -> Iterator[pa.Table]:
    """Labels of impressions in ``[start, end)`` (epoch ms), one UTC day per table.

    Args:
        ivt: IVT rules to filter with (None = off); each table then carries its day's
            report under :data:`IVT_METADATA_KEY` (see :func:`ivt_report_of`).

    Raises:
        InputError: ``start >= end`` or a negative attribution.
        OfflineStoreUnreadable: the store cannot be read.
    """
    _check_args(store, start, end, attribution)
    for table, _clicks, report in _label_days(store, start, end, attribution, ivt):
        if ivt is not None and report is not None:
            table = table.replace_schema_metadata(_ivt_metadata(ivt, report))
        yield table


def label_scopes(start: int, end: int, attribution: int) -> list[EventScope]:
    """What labels of ``[start, end)`` read: impressions of the range (which must start
    before the durable watermark) and clicks through ``end + attribution``."""
    return [EventScope("impression", start, end, require_ingested=True),
            EventScope("click", start, end + attribution)]


def build_labels(store: OfflineStore, start: int, end: int, attribution: int, *,
                 ivt: IvtRules | None = None) -> pa.Table:
    """All labels of ``[start, end)`` in one table (see :func:`label_chunks`); with
    ``ivt`` the summed report is in its schema metadata (:func:`ivt_report_of`)."""
    chunks = list(label_chunks(store, start, end, attribution, ivt=ivt))
    table = pa.concat_tables([LABEL_SCHEMA.empty_table(),
                              *(c.replace_schema_metadata(None) for c in chunks)])
    if ivt is None:
        return table
    reports = [r for r in (ivt_report_of(c.schema) for c in chunks) if r is not None]
    return table.replace_schema_metadata(_ivt_metadata(ivt, merge_reports(reports)))


def write_labels(store: OfflineStore, out_uri: str, start: int, end: int, attribution: int,
                 settings: CommonSettings | None = None, *,
                 coverage: CoverageCheck | None = None,
                 ivt: IvtRules | None = None) -> tuple[int, int]:
    """Write the labels of ``[start, end)`` to ``out_uri`` (zstd Parquet, atomically).

    Args:
        coverage: when given, the store's coverage of the range is checked first and
            the report stored in the file's schema metadata
            (:data:`offline.coverage.METADATA_KEY`); labels without a positive although
            the store holds clicks in the range (``attribution > 0``) fail too.
        ivt: IVT rules to filter with (None = off); the summed report and the rules are
            stored in the file's schema metadata (:data:`IVT_METADATA_KEY`, read with
            ``ivt_report_of(pq.read_schema(path))``; costs one more pass over the file).

    Returns:
        ``(rows, positives)`` (after IVT filtering).

    Raises:
        InputError: bad arguments; :class:`~offline.coverage.CoverageError` a gap or
            zero positives (unless the check allows gaps); nothing is written then.
        OfflineStoreUnreadable: the store cannot be read.
    """
    _check_args(store, start, end, attribution)  # before creating anything
    report = coverage.run(store, label_scopes(start, end, attribution)) if coverage else None
    rows = positives = clicks = 0
    reports: list[IvtReport] = []
    extra: dict[str, str] = {}
    schema = LABEL_SCHEMA if report is None else LABEL_SCHEMA.with_metadata(report.metadata())
    with atomic_output(out_uri, settings) as (fs, tmp):
        with pq.ParquetWriter(tmp, schema, filesystem=fs, compression="zstd") as writer:
            for table, in_range, day in _label_days(store, start, end, attribution, ivt):
                writer.write_table(table.cast(schema))
                rows += table.num_rows
                positives += int(pc.sum(table.column("label")).as_py() or 0)
                clicks += in_range
                if day is not None:
                    reports.append(day)
        if coverage is not None and report is not None and rows and not positives \
                and clicks and attribution > 0:
            coverage.add(report, f"the {rows:,} labels have no positive although the "
                         f"offline store holds {clicks:,} clicks in the range (their "
                         "impressions are missing or their ids do not join)")
            extra.update(report.metadata())  # allowed: record it
        if ivt is not None:
            extra.update(_ivt_metadata(ivt, merge_reports(reports)))
        if extra:
            rewrite_metadata(fs, tmp, extra)
    return rows, positives
