"""Reading the offline store, and writing result files atomically.

The stream worker appends Parquet under ``HEADRACE_OFFLINE_URI`` (layout in
:mod:`feature_defs.layout`)::

    events/{kind}/date=YYYY-MM-DD/{topic}-p{partition:03d}-{chunk:012d}.parquet
    views/{view}@{version}/date=YYYY-MM-DD/{topic}-p{partition:03d}-{chunk:012d}.parquet

``date`` is the UTC date of the event time, so a read of event times ``[lo, hi)`` lists
and opens only the ``date=`` folders from ``date(lo)`` through ``date(hi - 1)``, then
filters rows on ``ts``. Every read is de-duplicated by source coordinates
(``source``/kind, ``_partition``, ``_offset``, ``_index``): a retried chunk overwrites its
file, but duplicates must never count twice even if one slipped through.

Invariant: a read returns each applied event with ``lo <= ts < hi`` exactly once.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_defs.layout import events_dir, view_dir
from headrace.core.errors import InputError, OfflineStoreError

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = [
    "OfflineStore",
    "OfflineStoreUnreadable",
    "PartName",
    "parse_part_name",
    "COORDINATES",
    "dates_between",
    "deduplicate",
    "dictionary_codes",
    "flat_dictionary",
    "resolve_uri",
    "atomic_output",
    "merge_by_row",
    "rewrite_metadata",
]

#: source coordinates of an event: Kafka partition, offset, index inside the message
COORDINATES = ("_partition", "_offset", "_index")
_TS_TYPE = pa.timestamp("ms", tz="UTC")
#: a part's file name (:func:`feature_defs.layout.chunk_file`): topic, partition, first
#: offset and, in names that carry it, the exclusive end offset
_PART = re.compile(
    r"^(?P<topic>.+)-p(?P<partition>\d{3,})-(?P<start>\d{12})(?:-(?P<end>\d{12}))?\.parquet$")


@dataclass(frozen=True)
class PartName:
    """What a part's file name says: ``end`` is None where the name carries only the
    first offset (the current writer's names)."""

    topic: str
    partition: int
    start: int
    end: int | None = None


def parse_part_name(name: str) -> PartName | None:
    """The :class:`PartName` of a file's base name, or None for other files."""
    m = _PART.match(name)
    if m is None:
        return None
    end = m["end"]
    return PartName(m["topic"], int(m["partition"]), int(m["start"]),
                    None if end is None else int(end))


class OfflineStoreUnreadable(OfflineStoreError, InputError):
    """The offline store is missing, unreachable or holds unreadable files (exit 2)."""


def dates_between(lo_ms: int | None, hi_ms: int) -> tuple[str | None, str]:
    """UTC dates (``YYYY-MM-DD``) of the first and last millisecond of ``[lo, hi)``."""
    def day(ms: int) -> str:
        try:
            return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime(
                "%Y-%m-%d")
        except OverflowError:  # beyond year 1..9999: compare as the extreme dates
            return "0000-00-00" if ms < 0 else "9999-99-99"

    return (None if lo_ms is None else day(lo_ms)), day(hi_ms - 1)


def resolve_uri(uri: str, settings: CommonSettings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for ``uri`` (``s3://bucket/key`` or a local path).

    S3 URIs use the endpoint and credentials of ``settings`` (any bucket).
    """
    if uri.startswith(("s3://", "s3a://")):
        fs = None
        if settings is not None:
            fs = settings.model_copy(update={"offline_uri": uri}).pyarrow_s3()
        if fs is None:
            fs = pafs.S3FileSystem()
        return fs, uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def deduplicate(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """Drop rows whose ``columns`` repeat an earlier row's (rows with a null key are kept).

    Fast path: pack the (non-negative integer or dictionary-coded) key into one int64,
    sort a copy and look for equal neighbours; only when some exist pay for a stable
    arg-sort. Falls back to a hash group-by when the key does not fit 63 bits.
    """
    n = table.num_rows
    if n < 2:
        return table
    packed: np.ndarray | None = None
    invalid = None
    used = 0
    for name in columns:
        arr = _int_codes(table.column(name))
        if arr.min(initial=0) < 0:  # nulls (or negatives): such rows are never merged
            bad = arr < 0
            invalid = bad if invalid is None else invalid | bad
            arr = np.maximum(arr, 0)
        bits = max(int(arr.max(initial=0)), 1).bit_length()
        used += bits
        if used > 63:
            return _dedup_groupby(table, columns)
        if packed is None:
            packed = arr if arr.flags.writeable else arr.copy()
        else:
            packed <<= bits
            packed |= arr
    assert packed is not None
    if invalid is not None:
        packed[invalid] = -np.arange(1, int(invalid.sum()) + 1, dtype=np.int64)
    ordered = np.sort(packed)
    if not (ordered[1:] == ordered[:-1]).any():
        return table
    order = np.argsort(packed, kind="stable")
    keys = packed[order]
    first = np.ones(n, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return table.take(np.sort(order[first]))


def _int_codes(col: pa.ChunkedArray) -> np.ndarray:
    """Integer view of a key column: integers as they are, strings as dictionary codes."""
    if pa.types.is_dictionary(col.type) or pa.types.is_string(col.type) or \
            pa.types.is_large_string(col.type):
        return dictionary_codes(col)[0]
    filled = pc.fill_null(col, -1) if col.null_count else col
    return np.asarray(filled.to_numpy(), dtype=np.int64)


def flat_dictionary(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """``(positions, values)`` with row ``i`` equal to ``values[positions[i]]`` (-1 = null).

    Dictionary-encoded chunks are not decoded: ``values`` concatenates their dictionaries
    (so it may repeat values); other columns are dictionary-encoded once.
    """
    if not pa.types.is_dictionary(col.type):
        col = pa.chunked_array([pc.dictionary_encode(col.combine_chunks())])
    parts, dicts, offset = [], [], 0
    for chunk in col.chunks:
        idx = chunk.indices
        pos = np.asarray((pc.fill_null(idx, -1) if idx.null_count else idx).to_numpy(),
                         dtype=np.int64)
        parts.append(np.where(pos >= 0, pos + offset, -1) if idx.null_count else pos + offset)
        dicts.append(chunk.dictionary)
        offset += len(chunk.dictionary)
    if not dicts:
        return np.zeros(0, np.int64), pa.array([], col.type.value_type)
    return np.concatenate(parts), pa.concat_arrays(dicts)


def dictionary_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """``(codes, unique values)`` of a column; code -1 for null."""
    pos, values = flat_dictionary(col)
    enc = pc.dictionary_encode(values)
    remap = np.append(np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64), -1)
    return remap[pos], enc.dictionary


def _dedup_groupby(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    rows = table.append_column("__dedup_row", pa.array(np.arange(table.num_rows)))
    keep = rows.group_by(list(columns), use_threads=False).aggregate([("__dedup_row", "min")])
    return table.take(np.sort(keep.column("__dedup_row_min").to_numpy()))


@dataclass(frozen=True)
class OfflineStore:
    """Read access to one offline store root (local folder or S3 prefix).

    Build with :meth:`from_settings` (the deployment's store) or :meth:`from_uri`.
    """

    uri: str
    root: str
    filesystem: pafs.FileSystem

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> OfflineStore:
        fs, root = resolve_uri(settings.offline_uri, settings)
        return cls(settings.offline_uri, root, fs)

    @classmethod
    def from_uri(cls, uri: str, filesystem: pafs.FileSystem | None = None) -> OfflineStore:
        if filesystem is None:
            filesystem, root = resolve_uri(uri)
        else:
            root = uri.split("://", 1)[-1].rstrip("/")
        return cls(uri, root, filesystem)

    # ---------------------------------------------------------------- listing
    def _info(self, selector_or_path: str | pafs.FileSelector) -> list[pafs.FileInfo]:
        try:
            result = self.filesystem.get_file_info(selector_or_path)
        except (OSError, pa.ArrowException) as exc:
            raise OfflineStoreUnreadable(
                f"cannot list the offline store {self.uri}: {_first_line(exc)}") from exc
        return result if isinstance(result, list) else [result]

    def check(self) -> None:
        """Raise :class:`OfflineStoreUnreadable` unless the store root exists."""
        info = self._info(self.root)[0]
        if info.type == pafs.FileType.NotFound:
            raise OfflineStoreUnreadable(
                f"the offline store {self.uri} does not exist (nothing was written there yet, "
                "or HEADRACE_OFFLINE_URI is wrong)")

    def dates(self, base: str) -> list[tuple[str, str]]:
        """``(date, folder)`` of every ``date=`` folder under ``base``, oldest first (one
        listing)."""
        infos = self._info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
        return sorted((i.base_name[len("date="):], i.path) for i in infos
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("date="))

    def partitions(self, base: str, lo_ms: int | None, hi_ms: int) -> list[str]:
        """``date=`` folders under ``base`` holding event times in ``[lo_ms, hi_ms)``."""
        first, last = dates_between(lo_ms, hi_ms)
        return [path for date, path in self.dates(base)
                if (first is None or date >= first) and date <= last]

    def folder_files(self, folder: str) -> list[str]:
        """The Parquet files under one ``date=`` folder, sorted (one listing)."""
        sel = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
        return sorted(  # hidden and "_" names are writers' temporary files
            i.path for i in self._info(sel) if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))

    def files(self, base: str, lo_ms: int | None, hi_ms: int) -> list[str]:
        """Parquet files of the needed ``date=`` partitions (one listing per partition)."""
        files: list[str] = []
        for folder in self.partitions(base, lo_ms, hi_ms):
            files.extend(self.folder_files(folder))
        return files

    def footer(self, path: str) -> pq.FileMetaData:
        """The Parquet footer of one file (a ranged read, no rows).

        Raises:
            OfflineStoreUnreadable: the file cannot be opened or is no Parquet file.
        """
        try:
            return pq.read_metadata(path, filesystem=self.filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise OfflineStoreUnreadable(
                f"cannot read the footer of {path}: {_first_line(exc)}") from exc

    def column_max(self, path: str, column: str) -> int | None:
        """The largest value of an integer column of one file (for files without
        statistics), None when the file has no such column or no non-null value."""
        try:
            table = pq.read_table(path, columns=[column], filesystem=self.filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise OfflineStoreUnreadable(
                f"cannot read {column} of {path}: {_first_line(exc)}") from exc
        value = pc.max(table.column(0)).as_py() if table.num_rows else None
        return None if value is None else int(value)

    # ---------------------------------------------------------------- reading
    def read(self, base: str, columns: Sequence[str], lo_ms: int | None, hi_ms: int, *,
             dedup: Sequence[str] = COORDINATES, dictionary: Sequence[str] = ()) -> pa.Table:
        """Rows of the Parquet files under ``base`` with ``lo_ms <= ts < hi_ms``.

        Args:
            base: folder holding ``date=`` partitions (see :meth:`view_base`).
            columns: columns to return (``ts`` and the ``dedup`` columns are added).
            lo_ms: inclusive lower event-time bound, epoch ms; ``None`` for no bound.
            hi_ms: exclusive upper event-time bound, epoch ms.
            dedup: key columns of the de-duplication (dropped from the result unless asked).
            dictionary: string columns to read dictionary-encoded.

        Returns:
            An empty table (with no columns) when no partition overlaps the range.

        Raises:
            OfflineStoreUnreadable: a file cannot be read or lacks a column.
        """
        files = self.files(base, lo_ms, hi_ms)
        if not files:
            return pa.table({})
        wanted = list(dict.fromkeys([*columns, "ts", *dedup]))
        fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(
            dictionary_columns=list(dictionary)))
        cond = ds.field("ts") < pa.scalar(hi_ms, _TS_TYPE)
        if lo_ms is not None:
            cond = cond & (ds.field("ts") >= pa.scalar(lo_ms, _TS_TYPE))
        try:
            schema = self._schema(files, fmt, wanted, required={"ts", "entity_id", "source",
                                                                *dedup})
            dataset = ds.dataset(files, schema=schema, format=fmt, filesystem=self.filesystem)
            table = dataset.to_table(columns=wanted, filter=cond)
        except (OSError, pa.ArrowException) as exc:
            raise OfflineStoreUnreadable(
                f"cannot read the offline data under {base}: {_first_line(exc)}") from exc
        table = deduplicate(table, dedup)
        return table.select([c for c in wanted if c in columns or c == "ts"])

    def _schema(self, files: Sequence[str], fmt: ds.ParquetFileFormat, wanted: Sequence[str],
                required: set[str]) -> pa.Schema:
        """The union of the files' schemas, from one footer per source topic.

        A view's files carry only the measure fields of their own source (clicks files
        of a view counting distinct impression ads have no ``ad_id``): such columns read
        as null. A wanted column no file has reads as null too, unless ``required``.
        """
        first: dict[str, str] = {}
        for path in files:
            m = _PART.match(posixpath.basename(path))
            first.setdefault(m["topic"] if m else path, path)
        schema = pa.unify_schemas([fmt.inspect(p, filesystem=self.filesystem)
                                   for p in first.values()], promote_options="permissive")
        for name in wanted:
            if schema.get_field_index(name) < 0:
                if name in required:
                    raise pa.ArrowInvalid(f"the files have no column '{name}'")
                schema = schema.append(pa.field(name, pa.string()))
        return schema

    def view_base(self, view_id: str) -> str:
        return view_dir(self.root, view_id)

    def read_view(self, view_id: str, columns: Sequence[str], lo_ms: int | None, hi_ms: int,
                  dictionary: Sequence[str] = ()) -> pa.Table:
        """Applied rows of view ``name@version`` (de-duplicated per source and coordinates)."""
        return self.read(self.view_base(view_id), columns, lo_ms, hi_ms,
                         dedup=("source", *COORDINATES), dictionary=dictionary)

    def read_events(self, kind: str, columns: Sequence[str], lo_ms: int | None, hi_ms: int,
                    dictionary: Sequence[str] = ()) -> pa.Table:
        """Accepted raw events of ``kind`` (``impression`` | ``click``)."""
        return self.read(events_dir(self.root, kind), columns, lo_ms, hi_ms,
                         dedup=COORDINATES, dictionary=dictionary)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def atomic_output(uri: str, settings: CommonSettings | None = None
                  ) -> Iterator[tuple[pafs.FileSystem, str]]:
    """Yield ``(filesystem, temporary path)``; move it to ``uri`` only on success.

    Local files are renamed (atomic within a filesystem); S3 objects are copied from a
    temporary key and the temporary key deleted. On any failure the temporary file is
    removed and nothing appears at ``uri``.
    """
    fs, path = resolve_uri(uri, settings)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(parent, recursive=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {parent}: {_first_line(exc)}") from exc
    try:
        yield fs, tmp
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp)
        raise


def rewrite_metadata(fs: pafs.FileSystem, path: str, metadata: Mapping[str, str]) -> None:
    """Rewrite the Parquet file ``path`` on ``fs`` with ``metadata`` added to its schema
    metadata (one streaming pass; the schema metadata is fixed when a writer opens)."""
    src = pq.ParquetFile(fs.open_input_file(path))
    schema = src.schema_arrow
    schema = schema.with_metadata({**(schema.metadata or {}),
                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.meta-{uuid.uuid4().hex[:12]}")
    try:
        with pq.ParquetWriter(tmp, schema, filesystem=fs, compression="zstd") as writer:
            for batch in src.iter_batches(batch_size=1 << 16):
                writer.write_batch(batch)
        src.close()
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp)
        raise


def merge_by_row(parts: Sequence[str], row: str, fs: pafs.FileSystem, path: str, n: int,
                 block: int = 1 << 20, metadata: Mapping[str, str] | None = None) -> None:
    """Write the rows of local Parquet ``parts`` (each sorted by the int64 column ``row``,
    together holding rows ``0..n-1``) to ``path`` on ``fs`` in row order, without ``row``.

    One sequential pass: each output block of ``block`` rows takes a prefix of every
    part, so memory holds about one block plus one read batch per part. ``metadata``
    is added to the output's schema metadata.
    """
    readers = [pq.ParquetFile(p).iter_batches(batch_size=1 << 16) for p in parts]
    bufs = [pq.read_schema(p).empty_table() for p in parts]
    schema = bufs[0].drop_columns([row]).schema
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}),
                                       **{k.encode(): v.encode() for k, v in metadata.items()}})
    written = 0
    with pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd") as writer:
        for lo in range(0, n, block):
            pieces = []
            for k, reader in enumerate(readers):
                buf = bufs[k]
                while buf.num_rows == 0 or buf.column(row)[-1].as_py() < lo + block:
                    batch = next(reader, None)
                    if batch is None:
                        break
                    buf = pa.concat_tables([buf, pa.Table.from_batches([batch])])
                cut = int(np.searchsorted(buf.column(row).to_numpy(), lo + block))
                pieces.append(buf.slice(0, cut))
                bufs[k] = buf.slice(cut)
            blk = pa.concat_tables(pieces)
            blk = blk.take(pa.array(np.argsort(blk.column(row).to_numpy()))).drop_columns([row])
            writer.write_table(blk.cast(schema))
            written += blk.num_rows
    if written != n:
        raise RuntimeError(f"training set merge wrote {written} of {n} rows")
