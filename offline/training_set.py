"""Training sets: label rows joined with their features as of each row's ``ts``.

Invariant: the output holds the input rows in their order with every input column
unchanged, plus one column per requested feature (its point-in-time value, see
:mod:`offline.asof`) and one ``{view}__is_default`` mask per view involved.

Labels are processed in time-ordered chunks of at most ``chunk_rows`` rows, each reading
only the offline data its time range needs, so the feature data held at once is bounded.
:func:`write_training_set` also bounds the labels held at once: larger files are split
into time buckets on local disk, joined bucket by bucket, and merged back into the
original row order (each bucket's result is sorted by row number, so one sequential
pass over all buckets restores the order).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_defs.model import AggOp
from feature_defs.plan import OutputPlan, ViewPlan
from feature_defs.registry import Registry, load_registry
from feature_defs.validate import STRING_FIELDS
from headrace.errors import InputError
from offline.asof import ViewRows, evaluate_view, is_int_output, read_bounds
from offline.store import OfflineStore, atomic_output, resolve_uri

if TYPE_CHECKING:
    from headrace.settings import OfflineSettings

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "Selection",
    "resolve_features",
    "label_times",
    "build_training_set",
    "write_training_set",
]

DEFAULT_CHUNK_ROWS = 2_000_000
_ROW = "__headrace_row"


@dataclass(frozen=True)
class Selection:
    """The requested features grouped by view, in registry order."""

    views: tuple[tuple[ViewPlan, tuple[OutputPlan, ...]], ...]

    @property
    def names(self) -> list[str]:
        return [o.name for _, outs in self.views for o in outs]

    @property
    def masks(self) -> list[str]:
        return [f"{plan.view.name}__is_default" for plan, _ in self.views]


def resolve_features(registry: Registry, features: str | Sequence[str]) -> Selection:
    """``"all"`` or feature names (a list, or one comma-separated string) → Selection.

    Raises:
        InputError: a name is unknown or the list is empty.
    """
    if isinstance(features, str):
        features = [f.strip() for f in features.split(",") if f.strip()]
    wanted = set(registry.feature_names()) if list(features) == ["all"] else set(features)
    unknown = sorted(wanted - set(registry.by_feature))
    if unknown:
        raise InputError(f"unknown feature name(s): {', '.join(unknown)}")
    if not wanted:
        raise InputError("no features requested (use --features all or a list of names)")
    views = tuple((plan, tuple(o for o in plan.outputs if o.name in wanted))
                  for plan in registry.plans.values())
    return Selection(tuple((p, outs) for p, outs in views if outs))


def label_times(ts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The label ``ts`` column as int64 epoch ms (finer units are floored to ms).

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


def _check_schema(schema: pa.Schema, selection: Selection, where: str) -> None:
    if "ts" not in schema.names:
        raise InputError(f"{where} has no 'ts' column (a UTC timestamp or int64 epoch ms)")
    label_times(pa.array([], schema.field("ts").type))  # type checks only
    for plan, outs in selection.views:
        key = plan.view.entity.key
        if key not in schema.names:
            raise InputError(f"{where} has no '{key}' column, which the requested "
                             f"{plan.view.entity.name} features (e.g. {outs[0].name}) need")
    clash = sorted(set(schema.names) & set(selection.names + selection.masks + [_ROW]))
    if clash:
        raise InputError(f"{where} already has a column named {clash[0]}, which the "
                         "training set would add")


class _Progress:
    """A one-line progress bar on stderr, shown once a run has taken more than a second."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.start < 1.0 or (now - self.last < 0.5 and
                                                           done < self.total):
            return
        self.last, self.shown = now, True
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {done:,}/{self.total:,} rows "
                         f"{now - self.start:6.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _read_columns(plan: ViewPlan, outs: Sequence[OutputPlan], as_of_known: bool
                  ) -> tuple[list[str], list[str], list]:
    measures = list(dict.fromkeys(plan.measures[s] for o in outs for s in o.slots))
    cols = ["entity_id", "source"] + [m.field for m in measures if m.field]
    kinds = {s.name: s.kind for s in plan.view.sources}
    dictionary = ["entity_id", "source"] + [
        m.field for m in measures if m.op is AggOp.APPROX_DISTINCT and m.field
        in STRING_FIELDS.get(kinds.get(m.source, ""), set())]
    if any(m.op is AggOp.LAST for m in measures):
        cols.append("event_id")
    if as_of_known:
        cols.append("_ingest_ms")
    return list(dict.fromkeys(cols)), list(dict.fromkeys(dictionary)), measures


def _view_columns(plan: ViewPlan, outs: Sequence[OutputPlan], keys: pa.ChunkedArray,
                  t: np.ndarray, store: OfflineStore, as_of_known: bool) -> list[pa.Array]:
    """Feature columns (and the mask) of one view for one chunk of labels."""
    try:
        enc = pc.dictionary_encode(keys.cast(pa.string()).combine_chunks())
    except pa.ArrowInvalid as exc:
        raise InputError(f"the labels' {plan.view.entity.key} column cannot be read as "
                         f"strings ({keys.type})") from exc
    q_code = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), np.int64)
    lo, hi = read_bounds(plan, outs, int(t.min()), int(t.max()))
    cols, dictionary, measures = _read_columns(plan, outs, as_of_known)
    table = pa.table({})
    if len(enc.dictionary) and (lo is None or lo < hi):
        table = store.read_view(plan.view.id, cols, lo, hi, dictionary=dictionary)
    base = lo if lo is not None else int(t.min())
    if lo is None and table.num_rows:
        base = min(base, int(pc.min(table.column("ts")).cast(pa.int64()).as_py()))
    rows = ViewRows.from_table(plan, table, enc.dictionary, base, hi, measures,
                               as_of_known=as_of_known)
    res = evaluate_view(rows, q_code, t, outs, as_of_known=as_of_known)
    out = []
    for o in outs:
        ok = res.valid[o.name]
        typ = pa.int64() if is_int_output(o) else pa.float64()
        out.append(pa.array(res.values[o.name], typ, mask=None if ok.all() else ~ok))
    out.append(pa.array(res.is_default, pa.bool_()))
    return out


def _feature_table(labels: pa.Table, t: np.ndarray, selection: Selection, store: OfflineStore,
                   as_of_known: bool, chunk_rows: int, progress: _Progress | None,
                   done: int = 0) -> pa.Table:
    """The added columns for ``labels`` (same row order), computed in time-ordered chunks."""
    n = labels.num_rows
    names = [n_ for plan, outs in selection.views for n_ in
             [o.name for o in outs] + [f"{plan.view.name}__is_default"]]
    if n <= chunk_rows:
        parts = [c for plan, outs in selection.views for c in _view_columns(
            plan, outs, labels.column(plan.view.entity.key), t, store, as_of_known)]
        if progress:
            progress.update(done + n)
        return pa.table(dict(zip(names, parts, strict=True)))
    order = np.argsort(t, kind="stable")
    pieces: list[pa.Table] = []
    for start in range(0, n, chunk_rows):
        idx = order[start:start + chunk_rows]
        sub = labels.take(pa.array(idx))
        pieces.append(_feature_table(sub, t[idx], selection, store, as_of_known, chunk_rows,
                                     progress, done + start))
    back = np.empty(n, np.int64)
    back[order] = np.arange(n)
    return pa.concat_tables(pieces).take(pa.array(back))


def build_training_set(labels: pa.Table, features: str | Sequence[str],
                       settings: OfflineSettings, *, as_of_known: bool = False,
                       cold_start: bool = False, registry: Registry | None = None,
                       store: OfflineStore | None = None,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> pa.Table:
    """Append point-in-time features to ``labels``.

    Args:
        labels: rows with a ``ts`` column (UTC timestamp or int64 epoch ms) and the key
            columns (``user_id``, ``ad_id``, …) of the requested features' entities.
        features: ``"all"``, a comma-separated string or a list of feature names.
        settings: offline settings (store location, progress bar).
        as_of_known: also exclude applied rows ingested after T (``_ingest_ms > T``).
        cold_start: fill defaults like the serving layer's cold-start tiers.
        registry: feature definitions (default: :func:`load_registry`).
        store: offline store (default: the one of ``settings``).
        chunk_rows: most label rows joined at once.

    Returns:
        ``labels`` with one column per feature and one ``{view}__is_default`` per view.

    Raises:
        InputError: missing or invalid columns, unknown features, no rows, an unreadable
            offline store (:class:`offline.store.OfflineStoreUnreadable`).
    """
    registry = registry or load_registry()
    selection = resolve_features(registry, features)
    if labels.num_rows == 0:
        raise InputError("the labels have no rows")
    _check_schema(labels.schema, selection, "the labels")
    if cold_start:
        _cold_start_unavailable()
    t = label_times(labels.column("ts"))
    store = store or OfflineStore.from_settings(settings)
    store.check()
    progress = _Progress("training-set", labels.num_rows, settings.progress)
    try:
        feats = _feature_table(labels.select(_keys(selection)), t, selection, store,
                               as_of_known, chunk_rows, progress)
    finally:
        progress.close()
    for name in feats.column_names:
        labels = labels.append_column(name, feats.column(name))
    return labels


def write_training_set(labels_uri: str, out_uri: str, features: str | Sequence[str],
                       settings: OfflineSettings, *, as_of_known: bool = False,
                       cold_start: bool = False, registry: Registry | None = None,
                       store: OfflineStore | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                       tmp_dir: str | None = None) -> int:
    """Read labels Parquet at ``labels_uri``, write the training set to ``out_uri``.

    Same semantics as :func:`build_training_set`; files with more than ``chunk_rows``
    rows never sit in memory at once (they are bucketed by time under ``tmp_dir``, the
    system temporary folder by default). The output (zstd Parquet) appears atomically:
    on any failure nothing is left at ``out_uri``.

    Returns:
        The number of rows written (always the number of label rows).
    """
    registry = registry or load_registry()
    selection = resolve_features(registry, features)
    fs, path = resolve_uri(labels_uri, settings)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read the labels file {labels_uri}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc
    n = pf.metadata.num_rows
    if n == 0:
        raise InputError(f"the labels file {labels_uri} has no rows")
    _check_schema(pf.schema_arrow, selection, f"the labels file {labels_uri}")
    if cold_start:
        _cold_start_unavailable()
    store = store or OfflineStore.from_settings(settings)
    store.check()
    progress = _Progress("training-set", n, settings.progress)
    try:
        with atomic_output(out_uri, settings) as (out_fs, tmp):
            if n <= chunk_rows:
                labels = pf.read()
                feats = _feature_table(labels.select(_keys(selection)),
                                       label_times(labels.column("ts")), selection, store,
                                       as_of_known, chunk_rows, progress)
                for name in feats.column_names:
                    labels = labels.append_column(name, feats.column(name))
                pq.write_table(labels, tmp, filesystem=out_fs, compression="zstd")
            else:
                with tempfile.TemporaryDirectory(prefix="headrace-ts-", dir=tmp_dir) as work:
                    parts = _bucketed(pf, work, selection, store, as_of_known, chunk_rows,
                                      progress)
                    _merge(parts, out_fs, tmp, n)
    finally:
        progress.close()
    return n


def _keys(selection: Selection) -> list[str]:
    return list(dict.fromkeys(plan.view.entity.key for plan, _ in selection.views))


def _time_buckets(pf: pq.ParquetFile, chunk_rows: int) -> np.ndarray:
    """Start times of time buckets holding about ``chunk_rows`` labels each (two passes
    over the ``ts`` column: range, then a 65,536-bin histogram)."""
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for batch in pf.iter_batches(batch_size=1 << 20, columns=["ts"]):
        t = label_times(batch.column(0))
        lo, hi = min(lo, int(t.min())), max(hi, int(t.max()))
    bins = 1 << 16
    width = (hi - lo) // bins + 1
    hist = np.zeros(bins, np.int64)
    for batch in pf.iter_batches(batch_size=1 << 20, columns=["ts"]):
        hist += np.bincount((label_times(batch.column(0)) - lo) // width, minlength=bins)
    starts, filled = [0], 0
    for i, count in enumerate(hist.tolist()):
        if filled and filled + count > chunk_rows:
            starts.append(i)
            filled = 0
        filled += count
    return lo + np.array(starts, np.int64) * width


def _bucketed(pf: pq.ParquetFile, work: str, selection: Selection, store: OfflineStore,
              as_of_known: bool, chunk_rows: int, progress: _Progress) -> list[str]:
    """Spill labels into time buckets, join each; returns result files sorted by row."""
    edges = _time_buckets(pf, chunk_rows)
    writers: dict[int, pq.ParquetWriter] = {}
    row0 = 0
    for batch in pf.iter_batches(batch_size=1 << 18):
        bucket = np.searchsorted(edges, label_times(batch.column("ts")), side="right") - 1
        table = pa.Table.from_batches([batch]).append_column(
            _ROW, pa.array(np.arange(row0, row0 + batch.num_rows), pa.int64()))
        row0 += batch.num_rows
        for k in np.unique(bucket).tolist():
            if k not in writers:
                writers[k] = pq.ParquetWriter(f"{work}/in-{k}.parquet", table.schema)
            writers[k].write_table(table.filter(pa.array(bucket == k)))
    for w in writers.values():
        w.close()
    outputs, done = [], 0
    for k in sorted(writers):
        part = pq.read_table(f"{work}/in-{k}.parquet")
        feats = _feature_table(part.select(_keys(selection)), label_times(part.column("ts")),
                               selection, store, as_of_known, chunk_rows, progress, done)
        done += part.num_rows
        for name in feats.column_names:
            part = part.append_column(name, feats.column(name))
        outputs.append(f"{work}/out-{k}.parquet")
        pq.write_table(part.sort_by(_ROW), outputs[-1])
        del part, feats
    return outputs


def _merge(parts: list[str], fs: object, path: str, n: int, block: int = 1 << 20) -> None:
    """Merge result files (each sorted by row number) back into the input row order."""
    readers = [pq.ParquetFile(p).iter_batches(batch_size=1 << 16) for p in parts]
    bufs = [pq.read_schema(p).empty_table() for p in parts]
    schema = bufs[0].drop_columns([_ROW]).schema
    written = 0
    with pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd") as writer:
        for lo in range(0, n, block):
            pieces = []
            for k, reader in enumerate(readers):
                buf = bufs[k]
                while buf.num_rows == 0 or buf.column(_ROW)[-1].as_py() < lo + block:
                    batch = next(reader, None)
                    if batch is None:
                        break
                    buf = pa.concat_tables([buf, pa.Table.from_batches([batch])])
                cut = int(np.searchsorted(buf.column(_ROW).to_numpy(), lo + block))
                pieces.append(buf.slice(0, cut))
                bufs[k] = buf.slice(cut)
            blk = pa.concat_tables(pieces)
            blk = blk.take(pa.array(np.argsort(blk.column(_ROW).to_numpy()))).drop_columns([_ROW])
            writer.write_table(blk.cast(schema))
            written += blk.num_rows
    if written != n:
        raise RuntimeError(f"training set merge wrote {written} of {n} rows")


def _cold_start_unavailable() -> None:
    try:
        import feature_defs.coldstart  # noqa: F401
    except ImportError:
        raise InputError("--cold-start needs priors and the serving cold-start rule "
                         "(feature_defs.coldstart), which this build does not have yet") from None
    raise InputError("--cold-start is not supported by this version of the training-set "
                     "builder yet")
