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

Given a :class:`~offline.coverage.CoverageCheck`, :func:`write_training_set` first
checks that the offline store holds every part of the sources and every views file the
join reads (see :func:`coverage_scopes`), and stores the report in the output's schema
metadata (:data:`offline.coverage.METADATA_KEY`; a labels file's own report moves to
``headrace.labels_coverage``).
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

from feature_defs.coldstart import (
    HISTORY_FEATURE,
    USER_ENTITY,
    Priors,
    apply_cold_start_columns,
    rule_entity_of,
)
from feature_defs.model import AggOp
from feature_defs.plan import OutputPlan, ViewPlan
from feature_defs.registry import Registry, registry_for
from feature_defs.validate import STRING_FIELDS
from headrace.core.errors import InputError
from offline.asof import ViewRows, evaluate_view, is_int_output, read_bounds
from offline.coverage import METADATA_KEY, CoverageCheck, EventScope, ViewScope
from offline.labels import check_labels_schema, label_times
from offline.store import OfflineStore, atomic_output, merge_by_row, resolve_uri

if TYPE_CHECKING:
    from headrace.core.settings import OfflineSettings

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "Selection",
    "resolve_features",
    "label_times",
    "build_training_set",
    "coverage_scopes",
    "write_training_set",
]

DEFAULT_CHUNK_ROWS = 2_000_000
_ROW = "__headrace_row"
_LABELS_COVERAGE = "headrace.labels_coverage"


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
    composite = sorted({p.view.entity.name for p, outs in views
                        if outs and not isinstance(p.view.entity.key, str)})
    if composite:
        # The join reads one labels column per entity; a composite key would need the
        # labels to carry every part (and derived ones such as p_ctr_bucket). These are
        # online evaluation views (feature_defs.evaluation): not model features.
        raise InputError(f"features of entities with a composite key ({', '.join(composite)})"
                         " cannot be joined to labels: the point-in-time join supports "
                         "single-field entity keys only")
    return Selection(tuple((p, outs) for p, outs in views if outs))


def _key(plan: ViewPlan) -> str:
    """The labels column of ``plan``'s entity (single keys only: see resolve_features)."""
    key = plan.view.entity.key
    if not isinstance(key, str):
        raise InputError(f"entity {plan.view.entity.name} has a composite key")
    return key


def _check_schema(schema: pa.Schema, selection: Selection, where: str) -> None:
    required = {_key(plan): f"the requested {plan.view.entity.name} features "
                f"(e.g. {outs[0].name})" for plan, outs in selection.views}
    check_labels_schema(schema, required, selection.names + selection.masks + [_ROW], where)


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
        f for m in measures if m.op is AggOp.APPROX_DISTINCT and (f := m.field) is not None
        and f in STRING_FIELDS.get(kinds.get(m.source, ""), set())]
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
        parts: list[pa.Array] = []
        for k, (plan, outs) in enumerate(selection.views, 1):
            parts += _view_columns(plan, outs, labels.column(plan.view.entity.key), t, store,
                                   as_of_known)
            if progress:
                progress.update(done + n * k // len(selection.views))
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


@dataclass
class _Job:
    """One training-set run: what to compute and how."""

    selection: Selection
    store: OfflineStore
    registry: Registry
    as_of_known: bool
    chunk_rows: int
    progress: _Progress
    priors: Priors | None = None  # set: apply the serving cold-start rule

    @property
    def computed(self) -> Selection:
        """The selection plus the cold-start history feature when users need it."""
        if self.priors is None or HISTORY_FEATURE not in self.registry.by_feature:
            return self.selection
        hist_plan, hist_out = self.registry.by_feature[HISTORY_FEATURE]
        if hist_plan.view.entity.name not in {p.view.entity.name for p, _ in
                                              self.selection.views}:
            return self.selection
        views = []
        chosen = {p.view.id: outs for p, outs in self.selection.views}
        for plan in self.registry.plans.values():
            outs = chosen.get(plan.view.id, ())
            if plan is hist_plan and hist_out not in outs:
                outs = tuple(o for o in plan.outputs if o in outs or o is hist_out)
            if outs:
                views.append((plan, tuple(outs)))
        return Selection(tuple(views))

    def features(self, labels: pa.Table, done: int = 0) -> pa.Table:
        """Feature and mask columns for ``labels`` rows (same order)."""
        computed = self.computed
        feats = _feature_table(labels.select(_keys(computed)), label_times(labels.column("ts")),
                               computed, self.store, self.as_of_known, self.chunk_rows,
                               self.progress, done)
        if self.priors is not None:
            feats = _cold_start(feats, labels, computed, self.priors)
        keep = [n for plan, outs in self.selection.views for n in
                [o.name for o in outs] + [f"{plan.view.name}__is_default"]]
        return feats.select(keep)


def _cold_start(feats: pa.Table, labels: pa.Table, selection: Selection, priors: Priors
                ) -> pa.Table:
    """Fill like the serving layer: per entity, default only when every view of the entity
    is; a user's history is ``user__impressions_7d`` (0 without fresh data, anonymous when
    the key is null); the segment is the row's ``country`` and ``device_type`` (if any).
    Features become float64 (blending makes fractional counts)."""
    context = [labels.column(c).cast(pa.string()).to_pylist() if c in labels.column_names
               else None for c in ("country", "device_type")]
    entities = dict.fromkeys(p.view.entity.name for p, _ in selection.views)
    for entity in entities:
        views = [(p, outs) for p, outs in selection.views if p.view.entity.name == entity]
        masks = {p.view.id: feats.column(f"{p.view.name}__is_default").to_numpy()
                 for p, _ in views}
        cols = {o.name: np.asarray(feats.column(o.name).cast(pa.float64()).to_numpy(
            zero_copy_only=False), np.float64) for _, outs in views for o in outs}
        history = None
        if entity == USER_ENTITY and HISTORY_FEATURE in cols:
            plan_id = next(p.view.id for p, outs in views if any(o.name == HISTORY_FEATURE
                                                                for o in outs))
            history = np.where(masks[plan_id], 0.0, cols[HISTORY_FEATURE])
            history[np.asarray(labels.column(views[0][0].view.entity.key).is_null())] = np.nan
        rule_entity = rule_entity_of(entity, history is not None)
        values, _tiers, _ = apply_cold_start_columns(
            rule_entity, cols, np.logical_and.reduce(list(masks.values())), priors,
            context[0], context[1], history=history)
        for name, value in values.items():
            i = feats.column_names.index(name)
            feats = feats.set_column(i, name, pa.array(value, pa.float64(),
                                                       mask=np.isnan(value)))
    return feats


def _make_job(labels_schema: pa.Schema, where: str, features: str | Sequence[str],
              settings: OfflineSettings, registry: Registry | None, store: OfflineStore | None,
              as_of_known: bool, chunk_rows: int, total: int) -> _Job:
    registry = registry or registry_for(settings)
    selection = resolve_features(registry, features)
    if total == 0:
        raise InputError(f"{where} has no rows")
    _check_schema(labels_schema, selection, where)
    store = store or OfflineStore.from_settings(settings)
    store.check()
    return _Job(selection, store, registry, as_of_known, max(int(chunk_rows), 1),
                _Progress("training-set", total, settings.progress))


def _load_priors(settings: OfflineSettings, registry: Registry, priors: Priors | None,
                 t_min: int) -> Priors:
    """Given priors, else priors of the 7 days before the earliest label (no leakage)."""
    if priors is not None:
        return priors
    from offline.priors import build_priors

    return build_priors(settings, registry, until_ms=t_min)


def build_training_set(labels: pa.Table, features: str | Sequence[str],
                       settings: OfflineSettings, *, as_of_known: bool = False,
                       cold_start: bool = False, priors: Priors | None = None,
                       registry: Registry | None = None, store: OfflineStore | None = None,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> pa.Table:
    """Append point-in-time features to ``labels``.

    Args:
        labels: rows with a ``ts`` column (UTC timestamp or int64 epoch ms) and the key
            columns (``user_id``, ``ad_id``, …) of the requested features' entities.
        features: ``"all"``, a comma-separated string or a list of feature names.
        settings: offline settings (store location, progress bar).
        as_of_known: also exclude applied rows ingested after T (``_ingest_ms > T``).
        cold_start: fill like the serving cold-start tiers (:mod:`feature_defs.coldstart`)
            with ``priors``, by default those of the 7 days before the earliest label.
        registry: feature definitions (default: those ``settings.definitions`` names,
            i.e. ``HEADRACE_DEFINITIONS``; commands pass the one they resolved).
        store: offline store (default: the one of ``settings``).
        chunk_rows: most label rows joined at once.

    Returns:
        ``labels`` with one column per feature and one ``{view}__is_default`` per view.

    Raises:
        InputError: missing or invalid columns, unknown features, no rows, an unreadable
            offline store (:class:`offline.store.OfflineStoreUnreadable`).
    """
    job = _make_job(labels.schema, "the labels", features, settings, registry, store,
                    as_of_known, chunk_rows, labels.num_rows)
    if cold_start:
        t_min = int(label_times(labels.column("ts")).min())
        job.priors = _load_priors(settings, job.registry, priors, t_min)
    try:
        feats = job.features(labels)
    finally:
        job.progress.close()
    for name in feats.column_names:
        labels = labels.append_column(name, feats.column(name))
    return labels


def coverage_scopes(selection: Selection, registry: Registry, t_min: int, t_max: int
                    ) -> tuple[list[EventScope], list[ViewScope]]:
    """What the join of labels with ``t_min <= ts <= t_max`` reads, for the coverage
    check: each view's rows ``[lo, hi)`` (:func:`offline.asof.read_bounds`) and the
    events of its sources over the union of those ranges per kind.

    A view that allows less lateness than another view of the same source is not held
    to a views file per events file of that source (its rows may all have been late).
    """
    topo = registry.topology
    views: list[ViewScope] = []
    spans: dict[str, tuple[int | None, int]] = {}
    for plan, outs in selection.views:
        lo, hi = read_bounds(plan, outs, t_min, t_max)
        if lo is not None and lo >= hi:
            continue
        vid = plan.view.id
        sources = tuple(plan.feeds)
        views.append(ViewScope(vid, _key(plan), tuple(
            s for s in sources if s not in topo.mixed_lateness
            or topo.view_lateness_ms[vid] >= topo.lateness_ms[s]), lo, hi))
        for src in sources:
            kind = topo.source_kinds[src]
            have = spans.get(kind)
            if have is None:
                spans[kind] = (lo, hi)
            else:
                spans[kind] = (None if lo is None or have[0] is None else min(lo, have[0]),
                               max(hi, have[1]))
    return [EventScope(k, lo, hi) for k, (lo, hi) in spans.items()], views


def _check_coverage(job: _Job, coverage: CoverageCheck, t_min: int, t_max: int,
                    labels_meta: dict[bytes, bytes] | None) -> dict[str, str]:
    """Run the check; returns the output's metadata (the report, the labels' report)."""
    scopes, views = coverage_scopes(job.computed, job.registry, t_min, t_max)
    meta = coverage.run(job.store, scopes, views).metadata()
    previous = (labels_meta or {}).get(METADATA_KEY.encode())
    if previous is not None:
        meta[_LABELS_COVERAGE] = previous.decode()
    return meta


def write_training_set(labels_uri: str, out_uri: str, features: str | Sequence[str],
                       settings: OfflineSettings, *, as_of_known: bool = False,
                       cold_start: bool = False, priors: Priors | None = None,
                       registry: Registry | None = None, store: OfflineStore | None = None,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, tmp_dir: str | None = None,
                       coverage: CoverageCheck | None = None) -> int:
    """Read labels Parquet at ``labels_uri``, write the training set to ``out_uri``.

    Same semantics as :func:`build_training_set`; files with more than ``chunk_rows``
    rows never sit in memory at once (they are bucketed by time under ``tmp_dir``, the
    system temporary folder by default). The output (zstd Parquet) appears atomically:
    on any failure nothing is left at ``out_uri``. With ``coverage``, the store's
    coverage of what the join reads is checked first (see the module docstring).

    Returns:
        The number of rows written (always the number of label rows).

    Raises:
        InputError: as :func:`build_training_set`, and
            :class:`~offline.coverage.CoverageError` on a gap (unless allowed).
    """
    fs, path = resolve_uri(labels_uri, settings)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read the labels file {labels_uri}: {first}") from exc
    n = pf.metadata.num_rows
    job = _make_job(pf.schema_arrow, f"the labels file {labels_uri}", features, settings,
                    registry, store, as_of_known, chunk_rows, n)
    try:
        labels = pf.read() if n <= job.chunk_rows else None
        if labels is not None:
            times = label_times(labels.column("ts"))
            edges, t_min, t_max = None, int(times.min()), int(times.max())
        else:
            edges, t_max = _time_buckets(pf, job.chunk_rows)
            t_min = int(edges[0])
        meta = {} if coverage is None else _check_coverage(
            job, coverage, t_min, t_max, pf.schema_arrow.metadata)
        if cold_start:
            job.priors = _load_priors(settings, job.registry, priors, t_min)
        with atomic_output(out_uri, settings) as (out_fs, tmp):
            if labels is not None:
                feats = job.features(labels)
                for name in feats.column_names:
                    labels = labels.append_column(name, feats.column(name))
                if meta:
                    labels = labels.replace_schema_metadata({
                        **(labels.schema.metadata or {}),
                        **{k.encode(): v.encode() for k, v in meta.items()}})
                pq.write_table(labels, tmp, filesystem=out_fs, compression="zstd")
            else:
                assert edges is not None
                with tempfile.TemporaryDirectory(prefix="headrace-ts-", dir=tmp_dir) as work:
                    merge_by_row(_bucketed(pf, work, edges, job), _ROW, out_fs, tmp, n,
                                 metadata=meta)
    finally:
        job.progress.close()
    return n


def _keys(selection: Selection) -> list[str]:
    return list(dict.fromkeys(_key(plan) for plan, _ in selection.views))


def _time_buckets(pf: pq.ParquetFile, chunk_rows: int) -> tuple[np.ndarray, int]:
    """Start times of time buckets holding about ``chunk_rows`` labels each (two passes
    over the ``ts`` column: range, then a 65,536-bin histogram), and the latest ts."""
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
    return lo + np.array(starts, np.int64) * width, hi


def _bucketed(pf: pq.ParquetFile, work: str, edges: np.ndarray, job: _Job) -> list[str]:
    """Spill labels into time buckets, join each; returns result files sorted by row."""
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
        feats = job.features(part, done)
        done += part.num_rows
        for name in feats.column_names:
            part = part.append_column(name, feats.column(name))
        outputs.append(f"{work}/out-{k}.parquet")
        pq.write_table(part.sort_by(_ROW), outputs[-1])
        del part, feats
    return outputs
