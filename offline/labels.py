"""Click labels: one row per accepted impression, labelled 1 when it was clicked in time.

Invariant: for every impression with ``start <= ts < end`` the output holds one row whose
``label`` is 1 exactly when an accepted click with ``impression_id`` equal to the
impression's ``event_id`` has ``imp.ts <= click.ts <= imp.ts + attribution`` (both ends
inclusive), else 0.

The work runs one UTC day of impressions at a time (reading the clicks of that day
through ``attribution`` later), so memory is bounded by one day of events; rows come out
sorted by ``ts`` then source coordinates. Impressions repeating an ``event_id`` inside a
day (a producer retry) give one row, the first by (``ts``, partition, offset, index).

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
from offline.store import COORDINATES, OfflineStore, atomic_output

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = [
    "LABEL_SCHEMA",
    "label_times",
    "check_labels_schema",
    "label_chunks",
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


def _label_range(store: OfflineStore, start: int, end: int, attribution: int) -> pa.Table:
    """Labels of the impressions in ``[start, end)`` (one UTC day at most)."""
    imps = store.read_events("impression", ["event_id", *_STRINGS, "bid_cpm", *COORDINATES],
                             start, end)
    if imps.num_rows == 0:
        return LABEL_SCHEMA.empty_table()
    imps = imps.sort_by([("ts", "ascending")] + [(c, "ascending") for c in COORDINATES])
    ids = imps.column("event_id").combine_chunks()
    _, first = np.unique(np.asarray(pc.dictionary_encode(ids).indices.to_numpy(
        zero_copy_only=False)), return_index=True)
    if len(first) < imps.num_rows:  # a repeated event_id: keep its first row
        imps = imps.take(pa.array(np.sort(first)))
        ids = imps.column("event_id").combine_chunks()
    clicks = store.read_events("click", ["impression_id"], start, end + attribution)
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
    return pa.table(cols).cast(LABEL_SCHEMA)


def label_chunks(store: OfflineStore, start: int, end: int, attribution: int
                 ) -> Iterator[pa.Table]:
    """Labels of impressions in ``[start, end)`` (epoch ms), one UTC day per table.

    Raises:
        InputError: ``start >= end`` or a negative attribution.
        OfflineStoreUnreadable: the store cannot be read.
    """
    if start >= end:
        raise InputError("--from must be before --to")
    if attribution < 0:
        raise InputError("the attribution window must not be negative")
    store.check()
    for lo, hi in _day_ranges(start, end):
        yield _label_range(store, lo, hi, attribution)


def build_labels(store: OfflineStore, start: int, end: int, attribution: int) -> pa.Table:
    """All labels of ``[start, end)`` in one table (see :func:`label_chunks`)."""
    return pa.concat_tables([LABEL_SCHEMA.empty_table(),
                             *label_chunks(store, start, end, attribution)])


def write_labels(store: OfflineStore, out_uri: str, start: int, end: int, attribution: int,
                 settings: CommonSettings | None = None) -> tuple[int, int]:
    """Write the labels of ``[start, end)`` to ``out_uri`` (zstd Parquet, atomically).

    Returns:
        ``(rows, positives)``.
    """
    rows = positives = 0
    chunks = label_chunks(store, start, end, attribution)
    first = next(chunks)  # validate arguments and the store before creating anything
    with atomic_output(out_uri, settings) as (fs, tmp):
        with pq.ParquetWriter(tmp, LABEL_SCHEMA, filesystem=fs, compression="zstd") as writer:
            for table in _chain(first, chunks):
                writer.write_table(table)
                rows += table.num_rows
                positives += int(pc.sum(table.column("label")).as_py() or 0)
    return rows, positives


def _chain(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest
