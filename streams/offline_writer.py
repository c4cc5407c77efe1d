"""Append-only offline store writer (Parquet on S3 or a local path).

A *part* is the accepted events of one source (topic, partition) over a contiguous
offset range starting at the partition's durable ``offline_next``. It is written as
one file per (kind, date) under ``events/`` and one per (view, date) under ``views/``
(layout in :mod:`feature_defs.layout`), each named by the part's offset range
``[start, end)`` (:func:`~feature_defs.layout.chunk_file`). Each file is known to be
stored whole (:meth:`OfflineWriter._write`), and only then is the part's progress
recorded (:class:`streams.flush.OfflineFlush`, which never has two parts of a
partition in flight). A transient store failure is waited out and the part written
again under the same names (:mod:`headrace.core.retry`). Files a crashed attempt left
beyond the durable offset are removed when the partition is assigned
(:meth:`OfflineWriter.remove_orphans`, which lists only the date partitions that can
hold them).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_defs.keys import entity_ids
from feature_defs.layout import chunk_file, events_dir, view_dir
from feature_defs.model import AggOp, Entity
from feature_defs.plan import ViewPlan
from feature_defs.windows import to_ms
from headrace.core.errors import OfflineStoreError
from headrace.core.retry import DEFAULT_BACKOFF, Backoff, Outage, with_retries
from streams.rows import BEHIND, NO_TS, admitted_by

_T = TypeVar("_T")

__all__ = ["OfflineWriter", "resolve_filesystem", "store_error", "PERMANENT_S3_ERRORS",
           "VIEW_COLUMNS"]

#: columns every views/ file carries besides the measure fields; ``event_id`` only where
#: the view has a LAST measure (its tie-break): the events/ files keep every event's id,
#: and an id column per view costs more to encode than the rest of the file
VIEW_COLUMNS = (
    "entity_id",
    "ts",
    "source",
    "_partition",
    "_offset",
    "_index",
    "_ingest_ms",
)
#: string columns unique per row: dictionary pages would only be abandoned half-way
#: (Parquet falls back to plain once a dictionary grows), costing CPU and doubling size
_UNIQUE_COLUMNS = frozenset({"event_id", "impression_id"})
_PART = re.compile(
    r"^(?P<topic>.+)-p(?P<p>\d{3,})-(?P<start>\d{12})(?:-(?P<end>\d{12}))?\.parquet$")


#: S3 error codes that waiting cannot fix (anything else, refused or reset
#: connections, timeouts, 5xx, throttling, is retried: :mod:`headrace.core.retry`)
PERMANENT_S3_ERRORS = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                       "SignatureDoesNotMatch", "NoSuchBucket", "NO_SUCH_BUCKET",
                       "InvalidBucketName", "Permission denied", "Read-only file system",
                       "No space left")


def store_error(what: str, exc: BaseException) -> OfflineStoreError:
    """``exc`` of the offline store as an :class:`OfflineStoreError`, transient unless
    it names one of :data:`PERMANENT_S3_ERRORS`."""
    text = str(exc)
    return OfflineStoreError(f"{what}: {text}",
                             transient=not any(code in text for code in PERMANENT_S3_ERRORS))


def resolve_filesystem(uri: str, s3: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for an offline URI."""
    if uri.startswith("s3://"):
        if s3 is None:
            s3 = pafs.S3FileSystem()
        return s3, uri[len("s3://") :].rstrip("/")
    path = os.path.abspath(uri)
    os.makedirs(path, exist_ok=True)
    return pafs.LocalFileSystem(), path


@dataclass
class OfflineWriter:
    fs: pafs.FileSystem
    root: str
    compression: str = "zstd"
    #: files of one part written concurrently (S3 PUTs and Parquet encoding release
    #: the GIL); the part is complete only when all of them are, as before
    parallel: int = 8
    #: where transient failures are waited out (:mod:`headrace.core.retry`); None:
    #: raised at once
    outage: Outage | None = None
    backoff: Backoff = DEFAULT_BACKOFF
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def _retry(self, what: str, op: Callable[[], _T]) -> _T:
        if self.outage is None:
            return op()
        return with_retries(op, what=what, outage=self.outage, backoff=self.backoff,
                            transient=lambda e: isinstance(e, OfflineStoreError) and e.transient)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="offline-write")
        return self._pool

    def _write(self, table: pa.Table, directory: str, name: str) -> None:
        """Write one file whole, then know it is stored whole before the part's
        progress can be recorded.

        On a local disk: a temporary name, renamed, then its size read back (a
        mismatch is a transient failure: the part is written again). On S3: one PUT,
        atomic, and verified by the store itself: the SDK streams the body with a
        CRC64-NVME checksum trailer and its decoded length (``x-amz-trailer``,
        ``x-amz-decoded-content-length``), which S3 checks before it acknowledges the
        PUT, so an acknowledged object holds exactly the bytes sent. A read-back there
        (one HEAD per file) cost a quarter of ``bench stream``'s throughput on the
        local stack, for nothing the checksum does not already prove.
        """
        path = f"{directory}/{name}"
        dictionary = [f.name for f in table.schema
                      if pa.types.is_string(f.type) and f.name not in _UNIQUE_COLUMNS]
        try:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression=self.compression, use_dictionary=dictionary)
            data = sink.getvalue()
            if isinstance(self.fs, pafs.LocalFileSystem):
                os.makedirs(directory, exist_ok=True)
                tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                os.replace(tmp, path)
                stored = os.stat(path).st_size
                if stored != data.size:
                    raise OfflineStoreError(
                        f"cannot write {path}: {stored} bytes stored of {data.size}",
                        transient=True)
            else:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise store_error(f"cannot write {path}", exc) from exc

    def write_part(self, topic: str, kind: str, source: str, partition: int, start: int,
                   events: pa.Table, views: list[tuple[ViewPlan, Entity, tuple[str, ...]]],
                   end: int | None = None) -> int:
        """Write one part (:meth:`write_part_once`), every file again after a transient
        failure until all are written; returns the number of files."""
        return self._retry(f"write part {topic}/{partition}@{start}",
                           lambda: self.write_part_once(topic, kind, source, partition, start,
                                                        events, views, end))

    def write_part_once(
        self,
        topic: str,
        kind: str,
        source: str,
        partition: int,
        start: int,
        events: pa.Table,
        views: list[tuple[ViewPlan, Entity, tuple[str, ...]]],
        end: int | None = None,
    ) -> int:
        """Write one part; returns the number of files written.

        Args:
            topic: the source topic name (file names).
            kind: event kind (``impression`` | ``click``) for ``events/{kind}``.
            source: the source name the views know the topic by.
            partition, start: the part's partition and first offset.
            events: accepted events (contract columns + ``_partition``, ``_offset``,
                ``_index``, ``_ingest_ms``, and :data:`~streams.rows.BEHIND` where the
                source's views allow different lateness: a view's rows are those not
                late for it; ``events/`` does not keep the column), in arrival order.
            views: (plan, entity, measure field columns) of the views fed by it (the
                entity's ids: :func:`feature_defs.keys.entity_ids`).
            end: the part's exclusive end offset (in every file name, so a name says
                exactly which offsets the part covers); None: names carry ``start`` only.
        """
        if events.num_rows == 0:
            return 0
        name = chunk_file(topic, partition, start, end)
        dates = pc.strftime(events["ts"], format="%Y-%m-%d")
        jobs: list[tuple[pa.Table, str]] = []
        mixed = BEHIND in events.column_names
        for date in pc.unique(dates).to_pylist():
            mask = pc.equal(dates, date)
            day = events.filter(mask)
            jobs.append((day.drop_columns([BEHIND]) if mixed else day,
                         f"{events_dir(self.root, kind)}/date={date}"))
            for plan, entity, fields in views:
                ids = entity_ids(entity, day)
                applied = pc.is_valid(ids)
                ok = admitted_by(day, to_ms(plan.view.allowed_lateness))
                if ok is not None:  # the rows late for this view are not its rows
                    applied = pc.and_(applied, pa.array(ok))
                rows = day.filter(applied)
                if rows.num_rows == 0:
                    continue
                cols = {
                    "entity_id": ids.filter(applied),
                    "ts": rows["ts"],
                    "source": pa.repeat(pa.scalar(source, pa.string()), rows.num_rows),
                }
                if any(m.op is AggOp.LAST for m in plan.measures):
                    cols["event_id"] = rows["event_id"]
                for f in fields:
                    cols[f] = rows[f]
                for c in ("_partition", "_offset", "_index", "_ingest_ms"):
                    cols[c] = rows[c]
                jobs.append((pa.table(cols), f"{view_dir(self.root, plan.view.id)}/date={date}"))
        if self.parallel <= 1 or len(jobs) <= 1:
            for table, directory in jobs:
                self._write(table, directory, name)
        else:
            futures = [self._executor().submit(self._write, t, d, name) for t, d in jobs]
            errors = [f.exception() for f in futures]  # waits for every file
            for exc in errors:
                if exc is not None:
                    raise exc
        return len(jobs)

    def remove_orphans(self, topic: str, partition: int, durable_next: int,
                       since_ms: int | None = None) -> int:
        """:meth:`remove_orphans_once`, again after a transient failure."""
        return self._retry(f"remove orphans of {topic}/{partition}",
                           lambda: self.remove_orphans_once(topic, partition, durable_next,
                                                            since_ms))

    def remove_orphans_once(self, topic: str, partition: int, durable_next: int,
                            since_ms: int | None = None) -> int:
        """Delete parts of (topic, partition) starting at or beyond ``durable_next``.

        Only what can hold such parts is listed, never the whole store: the kinds and
        views (one level), their date partitions (one level each), and the files of the
        dates from ``since_ms`` on (epoch ms, UTC date). ``since_ms`` is the earliest
        event time a part past the durable progress can hold (the durable watermark
        minus the allowed lateness, see :meth:`streams.admission.Admission.assign`);
        None lists every date (nothing is durable yet). Returns the files deleted.

        Raises:
            OfflineStoreError: a listing or a deletion failed.
        """
        removed = 0
        for info, start, _end in self.part_files(topic, partition, since_ms,
                                                 subs=("events", "views")):
            if start >= durable_next:
                try:
                    self.fs.delete_file(info.path)
                except (OSError, pa.ArrowException) as exc:
                    raise store_error(f"cannot delete {info.path}", exc) from exc
                removed += 1
        return removed

    def part_files(self, topic: str, partition: int, since_ms: int | None = None, *,
                   subs: tuple[str, ...] = ("events",)
                   ) -> list[tuple[pafs.FileInfo, int, int | None]]:
        """The part files of (topic, partition) under ``subs`` in the date partitions
        from ``since_ms`` on (None: every date): (file, start, end from the name or
        None). Lists directories only, reads no file."""
        first = _utc_date(since_ms) if since_ms is not None and since_ms >= 0 else None
        out: list[tuple[pafs.FileInfo, int, int | None]] = []
        for sub in subs:
            for top in self._list(f"{self.root}/{sub}"):
                if top.type != pafs.FileType.Directory:
                    continue
                for date_dir in self._list(top.path):
                    name = date_dir.base_name
                    if date_dir.type != pafs.FileType.Directory or (
                            first is not None and name.startswith("date=")
                            and name[5:] < first):
                        continue
                    for info in self._list(date_dir.path):
                        m = _PART.match(info.base_name)
                        if m and m["topic"] == topic and int(m["p"]) == partition:
                            end = int(m["end"]) if m["end"] is not None else None
                            out.append((info, int(m["start"]), end))
        return out

    def durable_end(self, topic: str, partition: int) -> tuple[int, int] | None:
        """(end offset, newest event time ms) of the parts of (topic, partition) in the
        store, every date listed (a recovery path: progress records were lost), or None
        without any. A name without its end (written by earlier workers) costs one
        footer read (the largest ``_offset`` + 1).

        Raises:
            OfflineStoreError: a listing or a footer read failed.
        """
        return self._retry(f"find the offline progress of {topic}/{partition}",
                           lambda: self._durable_end_once(topic, partition))

    def _durable_end_once(self, topic: str, partition: int) -> tuple[int, int] | None:
        files = self.part_files(topic, partition)
        if not files:
            return None
        end, newest = 0, NO_TS
        for info, _start, named_end in files:
            stats = self._footer_max(info.path, ("_offset", "ts"))
            got = named_end if named_end is not None else int(stats.get("_offset", -1)) + 1
            end = max(end, got)
            if "ts" in stats:
                newest = max(newest, int(stats["ts"]))
        return end, newest

    def _footer_max(self, path: str, columns: tuple[str, ...]) -> dict[str, Any]:
        """The largest value of each of ``columns`` per the file's footer statistics
        (epoch ms for timestamps), reading the column where statistics lack."""
        try:
            with self.fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                md = pf.metadata
                names = md.schema.names
                out: dict[str, Any] = {}
                for col in columns:
                    if col not in names:
                        continue
                    idx = names.index(col)
                    best = None
                    for rg in range(md.num_row_groups):
                        st = md.row_group(rg).column(idx).statistics
                        if st is None or not st.has_min_max:
                            best = None
                            break
                        v = st.max
                        v = int(v.timestamp() * 1000) if isinstance(v, datetime) else v
                        best = v if best is None else max(best, v)
                    if best is None:
                        arr = pf.read(columns=[col])[col]
                        if pa.types.is_timestamp(arr.type):
                            arr = pc.cast(arr, pa.int64())
                        best = pc.max(arr).as_py()
                    if best is not None:
                        out[col] = best
                return out
        except (OSError, pa.ArrowException) as exc:
            raise store_error(f"cannot read {path}", exc) from exc

    def _list(self, path: str) -> list[pafs.FileInfo]:
        """The entries directly under ``path`` (none when it does not exist)."""
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        try:
            return list(self.fs.get_file_info(selector))
        except (OSError, pa.ArrowException) as exc:
            raise store_error(f"cannot list {path}", exc) from exc


def _utc_date(ms: int) -> str:
    """The UTC date of epoch milliseconds ``ms``, as the ``date=`` partitions name it."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d")
