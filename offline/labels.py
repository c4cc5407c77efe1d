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

Also here: reading and checking a labels table given to the training set
(:func:`label_times`, :func:`check_labels_schema`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from headrace.core.errors import InputError
from offline.coverage import CoverageCheck, EventScope
from offline.store import COORDINATES, OfflineStore, atomic_output, rewrite_metadata

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = [
    "LABEL_SCHEMA",
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


def _label_range(store: OfflineStore, start: int, end: int, attribution: int
                 ) -> tuple[pa.Table, int]:
    """Labels of the impressions in ``[start, end)`` (one UTC day at most), and the
    number of stored clicks with ``start <= ts < end``."""
    imps = store.read_events("impression", ["event_id", *_STRINGS, "bid_cpm", *COORDINATES],
                             start, end)
    clicks = store.read_events("click", ["impression_id"], start, end + attribution)
    in_range = 0
    if clicks.num_rows:
        in_range = int(pc.sum(pc.less(clicks.column("ts"),
                                      pa.scalar(end, clicks.column("ts").type))).as_py() or 0)
    if imps.num_rows == 0:
        return LABEL_SCHEMA.empty_table(), in_range
    imps = imps.sort_by([("ts", "ascending")] + [(c, "ascending") for c in COORDINATES])
    ids = imps.column("event_id").combine_chunks()
    _, first = np.unique(np.asarray(pc.dictionary_encode(ids).indices.to_numpy(
        zero_copy_only=False)), return_index=True)
    if len(first) < imps.num_rows:  # a repeated event_id: keep its first row
        imps = imps.take(pa.array(np.sort(first)))
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
    return pa.table(cols).cast(LABEL_SCHEMA), in_range


def _check_args(store: OfflineStore, start: int, end: int, attribution: int) -> None:
    if start >= end:
        raise InputError("--from must be before --to")
    if attribution < 0:
        raise InputError("the attribution window must not be negative")
    store.check()


def _label_days(store: OfflineStore, start: int, end: int, attribution: int
                ) -> Iterator[tuple[pa.Table, int]]:
    for lo, hi in _day_ranges(start, end):
        yield _label_range(store, lo, hi, attribution)


def label_chunks(store: OfflineStore, start: int, end: int, attribution: int
                 ) -> Iterator[pa.Table]:
    """Labels of impressions in ``[start, end)`` (epoch ms), one UTC day per table.

    Raises:
        InputError: ``start >= end`` or a negative attribution.
        OfflineStoreUnreadable: the store cannot be read.
    """
    _check_args(store, start, end, attribution)
    for table, _clicks in _label_days(store, start, end, attribution):
        yield table


def label_scopes(start: int, end: int, attribution: int) -> list[EventScope]:
    """What labels of ``[start, end)`` read: impressions of the range (which must start
    before the durable watermark) and clicks through ``end + attribution``."""
    return [EventScope("impression", start, end, require_ingested=True),
            EventScope("click", start, end + attribution)]


def build_labels(store: OfflineStore, start: int, end: int, attribution: int) -> pa.Table:
    """All labels of ``[start, end)`` in one table (see :func:`label_chunks`)."""
    return pa.concat_tables([LABEL_SCHEMA.empty_table(),
                             *label_chunks(store, start, end, attribution)])


def write_labels(store: OfflineStore, out_uri: str, start: int, end: int, attribution: int,
                 settings: CommonSettings | None = None, *,
                 coverage: CoverageCheck | None = None) -> tuple[int, int]:
    """Write the labels of ``[start, end)`` to ``out_uri`` (zstd Parquet, atomically).

    Args:
        coverage: when given, the store's coverage of the range is checked first and
            the report stored in the file's schema metadata
            (:data:`offline.coverage.METADATA_KEY`); labels without a positive although
            the store holds clicks in the range (``attribution > 0``) fail too.

    Returns:
        ``(rows, positives)``.

    Raises:
        InputError: bad arguments; :class:`~offline.coverage.CoverageError` a gap or
            zero positives (unless the check allows gaps); nothing is written then.
        OfflineStoreUnreadable: the store cannot be read.
    """
    _check_args(store, start, end, attribution)  # before creating anything
    report = coverage.run(store, label_scopes(start, end, attribution)) if coverage else None
    rows = positives = clicks = 0
    schema = LABEL_SCHEMA if report is None else LABEL_SCHEMA.with_metadata(report.metadata())
    with atomic_output(out_uri, settings) as (fs, tmp):
        with pq.ParquetWriter(tmp, schema, filesystem=fs, compression="zstd") as writer:
            for table, in_range in _label_days(store, start, end, attribution):
                writer.write_table(table.cast(schema))
                rows += table.num_rows
                positives += int(pc.sum(table.column("label")).as_py() or 0)
                clicks += in_range
        if coverage is not None and report is not None and rows and not positives \
                and clicks and attribution > 0:
            coverage.add(report, f"the {rows:,} labels have no positive although the "
                         f"offline store holds {clicks:,} clicks in the range (their "
                         "impressions are missing or their ids do not join)")
            rewrite_metadata(fs, tmp, report.metadata())  # allowed: record it
    return rows, positives
