"""Coverage: does the offline store hold every part the worker's commit records vouch for?

The worker writes a part (the accepted events of one source partition over an offset
range, :mod:`streams.offline_writer`) and only then records the partition's
``offline_next`` in Redis (:func:`feature_defs.layout.commit_key`): every offset below
``offline_next`` belongs to a part the store should hold. ``headrace labels`` and
``headrace training-set`` check that before they read the store (:class:`CoverageCheck`).

The rule, per source (topic, partition) with a commit record; it reads file names and
Parquet footers only, never rows:

* The records are read first, then the store is listed: a part recorded meanwhile was
  durable before its record, so it is listed too.
* Parts come from the ``events/{kind}`` files (every part writes all its accepted events
  there) of the ``date=`` folders the job reads, plus the nearest existing folder on
  each side, so a part straddling an edge is seen whole and the chain of parts can be
  followed across the edges. A part's offsets are ``[start, end)``: ``start`` from its
  name, ``end`` from the name where it carries one, else the largest ``_offset`` its
  files hold + 1 (footer statistics). Parts starting at or past ``offline_next`` are
  beyond the durable progress (a crashed attempt's leftovers) and ignored.
* A gap (:func:`find_gaps`) is a hole between consecutive parts (their ranges, overlaps
  merged, are not contiguous); when the folders reach the newest date, the tail
  ``[last end, offline_next)``; when they reach the oldest date and the record holds a
  ``log_start``, the head ``[log_start, first start)``; a partition with progress but
  no part in the folders, when they reach the newest date, is searched in older folders
  one at a time, and without any part it is missing whole: ``[log_start or 0,
  offline_next)``.
* For the training set: every events file of a view's source (part name and date) whose
  view key is not null in every row (footer null counts) must have its views file; not
  for a view that allows less lateness than another view of the same source (its rows
  may all have been late for it).
* The label range is compared with what was ever ingested: a range starting after the
  durable watermark of every impression partition cannot hold labels.

Ends: the current part names carry only the first offset, so ``end`` is the last
*stored* offset + 1, while a part's own range also holds the messages at its end that
gave no accepted event (late or dead-lettered ones, Kafka control records). A hole or
tail of at most :data:`ESTIMATE_SLACK` offsets right after such an estimated end is
therefore *unverified*: recorded in the report, not failing. Names that carry the end
(``{topic}-p{partition:03d}-{start:012d}-{end:012d}.parquet``) make every hole certain.

Limits: a lost part of at most :data:`ESTIMATE_SLACK` messages is only recorded as
unverified while ends are estimated; the first part of a partition can be missed only
where the record carries ``log_start``; a partition with no part in or next to a range
that ends before the newest data is not checked.

Any gap or problem raises :class:`CoverageError` (exit 2, one sentence) unless
``allow_gaps``: then the job proceeds, each problem is a WARNING, and the report is
stored in the output's Parquet schema metadata under :data:`METADATA_KEY` (JSON).
"""

from __future__ import annotations

import bisect
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from feature_defs.contract import KIND_TOPICS
from feature_defs.layout import commit_key, events_dir, view_dir
from headrace.core.errors import InputError, OnlineStoreError
from headrace.core.online_store import OnlineStore
from offline.store import OfflineStore, PartName, dates_between, parse_part_name

__all__ = [
    "ESTIMATE_SLACK",
    "METADATA_KEY",
    "CoverageCheck",
    "CoverageError",
    "CoverageReport",
    "EventScope",
    "Gap",
    "PartSpan",
    "Progress",
    "ViewScope",
    "Window",
    "find_gaps",
    "pick_window",
]

#: Parquet schema metadata key of the coverage report in labels and training sets
METADATA_KEY = "headrace.coverage"
_THREADS = 16  # footers read at once (ranged GETs on S3)
#: offsets after a part's last stored one that may still be the part's own when its
#: name does not carry its end: trailing messages without an accepted event (late,
#: dead-lettered, Kafka control records). Measured: single offsets on the adversarial
#: test stream cut into 1-second parts.
ESTIMATE_SLACK = 8
_NO_WM = -(2**62)  # feature_defs.state.NO_TS: no event yet

TopicPartition = tuple[str, int]


class CoverageError(InputError):
    """The store misses data the commit records vouch for, or they cannot be read (exit 2)."""


@dataclass(frozen=True)
class Progress:
    """What a commit record says: every offset below ``offline_next`` is in a part;
    ``offline_wm`` is the watermark there (epoch ms, None before any event);
    ``log_start`` the first offset of the partition's history, where recorded."""

    offline_next: int
    offline_wm: int | None = None
    log_start: int | None = None

    @classmethod
    def from_record(cls, rec: Mapping[str, int]) -> Progress | None:
        """None for a partition with nothing durable offline."""
        nxt = int(rec.get("offline_next", 0))
        if nxt <= 0:
            return None
        wm = rec.get("offline_wm")
        start = rec.get("log_start")
        return cls(nxt, None if wm is None or wm <= _NO_WM else int(wm),
                   None if start is None else int(start))


@dataclass(frozen=True, order=True)
class PartSpan:
    """The offsets ``[start, end)`` one part holds; ``exact``: ``end`` is the part's
    recorded end, not its last stored offset + 1 (the part may then reach further)."""

    topic: str
    partition: int
    start: int
    end: int
    exact: bool = True


@dataclass(frozen=True)
class Gap:
    """Offsets ``[start, end)`` of a partition below its progress that the store lacks
    (``reason``: ``hole``, ``tail``, ``head``, ``no part`` or ``view file``), in the
    folder ``where`` (``events/impression``, ``views/user_activity@1``)."""

    where: str
    topic: str
    partition: int
    start: int
    end: int
    reason: str
    date: str | None = None
    #: False: at most ``slack`` offsets right after a part's last stored offset, which
    #: messages without an accepted event would explain as well (see :func:`find_gaps`)
    certain: bool = True

    def describe(self) -> str:
        offsets = f"offsets {self.start}-{self.end - 1} of {self.topic}[{self.partition}]"
        if self.reason == "view file":
            return f"the {self.where} file of the part at {offsets} for {self.date}"
        what = {"hole": "between two parts", "tail": "up to the recorded progress",
                "head": "after the recorded log start", "no part": "(no part at all)"}
        return f"{offsets} in {self.where} {what.get(self.reason, self.reason)}"


def find_gaps(parts: Iterable[PartSpan], progress: Mapping[TopicPartition, Progress], *,
              where: str = "", head: bool = True, tail: bool = True,
              slack: int = 0) -> list[Gap]:
    """The gaps of ``parts`` below each partition's progress (see the module rule).

    Args:
        parts: parts seen, any order; overlaps are merged.
        progress: the partitions that must be covered (those with durable progress).
        where: the folder named in the gaps.
        head: the parts seen reach back to the oldest data (check ``log_start``).
        tail: the parts seen reach the newest data (check up to ``offline_next``; a
            partition without parts is then missing whole).
        slack: a hole or tail of at most this many offsets right after a part whose end
            is not ``exact`` is returned with ``certain=False``.
    """
    by_tp: dict[TopicPartition, list[PartSpan]] = {}
    for span in parts:
        by_tp.setdefault((span.topic, span.partition), []).append(span)
    gaps: list[Gap] = []
    for (topic, partition), prog in sorted(progress.items()):
        nxt = prog.offline_next
        spans = sorted(s for s in by_tp.get((topic, partition), ()) if s.start < nxt)
        if not spans:
            if tail:
                gaps.append(Gap(where, topic, partition, prog.log_start or 0, nxt, "no part"))
            continue
        if head and prog.log_start is not None and spans[0].start > prog.log_start:
            gaps.append(Gap(where, topic, partition, prog.log_start, spans[0].start, "head"))
        cover, exact = max(spans[0].start, spans[0].end), spans[0].exact
        for span in spans[1:]:
            if span.start > cover:
                gaps.append(Gap(where, topic, partition, cover, span.start, "hole",
                                certain=exact or span.start - cover > slack))
            if span.end > cover or (span.end == cover and span.exact):
                cover, exact = span.end, span.exact
        if tail and cover < nxt:
            gaps.append(Gap(where, topic, partition, cover, nxt, "tail",
                            certain=exact or nxt - cover > slack))
    return gaps


@dataclass(frozen=True)
class Window:
    """The ``date=`` folders checked: ``core`` those of the range, ``dates`` with the
    nearest on each side; ``oldest``/``newest``: they include the first/last folder."""

    core: tuple[str, ...]
    dates: tuple[str, ...]
    oldest: bool
    newest: bool


def pick_window(dates: Sequence[str], lo_ms: int | None, hi_ms: int) -> Window:
    """The :class:`Window` of event times ``[lo_ms, hi_ms)`` among sorted ``dates``."""
    first, last = dates_between(lo_ms, hi_ms)
    a = 0 if first is None else bisect.bisect_left(dates, first)
    b = bisect.bisect_right(dates, last)  # core = dates[a:b]
    lo_i, hi_i = max(a - 1, 0), min(max(b, a) + 1, len(dates))
    return Window(tuple(dates[a:b]), tuple(dates[lo_i:hi_i]), lo_i == 0, hi_i == len(dates))


@dataclass(frozen=True)
class EventScope:
    """The ``events/{kind}`` files a job reads: event times ``[lo_ms, hi_ms)``
    (``lo_ms`` None: from the beginning)."""

    kind: str
    lo_ms: int | None
    hi_ms: int
    require_ingested: bool = False  # the range must start before the durable watermark


@dataclass(frozen=True)
class ViewScope:
    """The ``views/{view_id}`` files a training set reads: key column ``key``, fed by
    source ``sources`` (names before the topic prefix), event times ``[lo_ms, hi_ms)``."""

    view_id: str
    key: str
    sources: tuple[str, ...]
    lo_ms: int | None
    hi_ms: int


@dataclass
class CoverageReport:
    """The outcome of one check (stored with the output, see :data:`METADATA_KEY`)."""

    group: str
    allow_gaps: bool
    checked: bool = True
    unchecked: str | None = None  # why the records could not be compared
    gaps: list[Gap] = field(default_factory=list)
    #: small holes after estimated part ends (not failing, see :data:`ESTIMATE_SLACK`)
    unverified: list[Gap] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # other findings, one sentence each
    partitions: int = 0  # source partitions with durable progress
    files: int = 0  # part files whose footers were read

    def metadata(self) -> dict[str, str]:
        doc = {"checked": self.checked, "unchecked": self.unchecked, "group": self.group,
               "allow_gaps": self.allow_gaps, "gaps": [asdict(g) for g in self.gaps],
               "unverified": [asdict(g) for g in self.unverified],
               "problems": self.problems, "partitions": self.partitions,
               "files": self.files}
        return {METADATA_KEY: json.dumps(doc, sort_keys=True)}

    def findings(self) -> list[str]:
        """Gaps and problems, one sentence each (none when the store is complete)."""
        return [f"the offline store misses {g.describe()}" for g in self.gaps] + self.problems


@dataclass(frozen=True)
class CoverageCheck:
    """Compares the offline store with the commit records of one consumer group.

    Args:
        online: where the commit records are (None: not reachable, see ``unavailable``).
        prefix: the Redis key prefix; ``group``: the worker's consumer group.
        topic_prefix: the deployment's topic prefix; ``partitions``: the partition
            count of the source topics.
        sources: source name (topic before the prefix) -> event kind, of the worker.
        allow_gaps: proceed on a gap (reported through ``warn`` and the metadata).
        warn: called with each WARNING sentence.
        unavailable: why ``online`` is None.
    """

    online: OnlineStore | None
    prefix: str
    group: str
    topic_prefix: str
    partitions: int
    sources: Mapping[str, str]
    allow_gaps: bool = False
    warn: Callable[[str], None] = field(default=lambda _msg: None, compare=False)
    unavailable: str | None = None

    def topics(self, kind: str) -> tuple[str, ...]:
        names = [s for s, k in self.sources.items() if k == kind]
        if not names and kind in KIND_TOPICS:
            names = [KIND_TOPICS[kind]]  # type: ignore[index]
        return tuple(self.topic_prefix + n for n in names)

    # ------------------------------------------------------------------ running
    def run(self, store: OfflineStore, scopes: Sequence[EventScope],
            views: Sequence[ViewScope] = ()) -> CoverageReport:
        """Check ``scopes`` (and ``views``); returns the report.

        Raises:
            CoverageError: a gap or problem, or unreadable records, unless ``allow_gaps``.
            OfflineStoreUnreadable: the store cannot be listed or a footer read.
        """
        report = CoverageReport(self.group, self.allow_gaps)
        topics = tuple(dict.fromkeys(t for s in scopes for t in self.topics(s.kind)))
        try:
            progress = self._progress([(t, p) for t in topics for p in range(self.partitions)])
        except OnlineStoreError as exc:
            reason = f"cannot read the commit records in Redis ({_first(exc)})"
            return self._unchecked(report, reason)
        if progress is None:
            return self._unchecked(report, self.unavailable or "no Redis configured")
        scans = {s.kind: _Scan(store, s, self.topics(s.kind), progress) for s in scopes}
        for v in views:  # the view key columns' null counts come with the footers
            for src in v.sources:
                if (sc := scans.get(self.sources.get(src, ""))) is not None:
                    sc.keys.add(v.key)
        extra = sorted({tp for sc in scans.values() for tp in sc.seen}
                       - {(t, p) for t in topics for p in range(self.partitions)})
        if extra:  # partitions beyond the configured count (HEADRACE_PARTITIONS): read too
            try:
                more = self._progress(extra) or {}
            except OnlineStoreError as exc:
                return self._unchecked(
                    report, f"cannot read the commit records in Redis ({_first(exc)})")
            progress.update(more)
            for sc in scans.values():
                sc.add_progress(more)
        report.partitions = len(progress)
        if not progress and any(sc.seen for sc in scans.values()):
            report.problems.append(
                f"Redis holds no commit records of group {self.group} for "
                f"{', '.join(topics)} although the offline store holds their parts (wrong "
                "HEADRACE_GROUP_ID or HEADRACE_REDIS_PREFIX, or the progress was lost)")
        for scope in scopes:
            sc = scans[scope.kind]
            for gap in sc.gaps():
                (report.gaps if gap.certain else report.unverified).append(gap)
            report.files += sc.footers_read
            if scope.require_ingested:
                report.problems += _not_ingested(scope, sc.progress)
        report.gaps += _view_gaps(store, views, scans, self)
        return self.finish(report)

    def finish(self, report: CoverageReport) -> CoverageReport:
        """Raise on findings unless ``allow_gaps``; else warn about each. Returns ``report``."""
        found = report.findings()
        if found and not self.allow_gaps:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise CoverageError(f"{found[0]}{more}, below the progress recorded by group "
                                f"{self.group}; restore it, or pass --allow-gaps to proceed "
                                "and record the gaps in the output's metadata")
        for sentence in found:
            self.warn(sentence)
        return report

    def add(self, report: CoverageReport, problem: str) -> None:
        """Add a finding made after :meth:`run` (raises unless ``allow_gaps``, as there)."""
        report.problems.append(problem)
        if not self.allow_gaps:
            raise CoverageError(f"{problem}; pass --allow-gaps to proceed and record it in "
                                "the output's metadata")
        self.warn(problem)

    def _unchecked(self, report: CoverageReport, reason: str) -> CoverageReport:
        if not self.allow_gaps:
            raise CoverageError(f"{reason}, so the offline store's coverage cannot be "
                                "checked; set HEADRACE_REDIS_URL, or pass --allow-gaps to "
                                "proceed unchecked")
        report.checked, report.unchecked = False, reason
        self.warn(f"{reason}: the offline store's coverage was not checked")
        return report

    def _progress(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, Progress] | None:
        if self.online is None:
            return None
        keys = [commit_key(self.prefix, self.group, t, p) for t, p in tps]
        records = self.online.read_commits(keys) if keys else []
        out = {}
        for tp, rec in zip(tps, records, strict=True):
            prog = Progress.from_record(rec)
            if prog is not None:
                out[tp] = prog
        return out


@dataclass
class _File:
    path: str
    date: str
    name: PartName
    end: int = 0
    rows: int = 0
    nonnull: dict[str, int] = field(default_factory=dict)  # key column -> non-null rows


class _Scan:
    """The part files of one ``events/{kind}`` folder around a scope's dates."""

    def __init__(self, store: OfflineStore, scope: EventScope, topics: Sequence[str],
                 progress: Mapping[TopicPartition, Progress]) -> None:
        self.store, self.scope, self.topics = store, scope, frozenset(topics)
        self.where = f"events/{scope.kind}"
        self.folders = store.dates(events_dir(store.root, scope.kind))
        self.window = pick_window([d for d, _ in self.folders], scope.lo_ms, scope.hi_ms)
        self.progress = {tp: p for tp, p in progress.items() if tp[0] in self.topics}
        self.footers_read = 0
        self.keys: set[str] = set()  # key columns whose null counts are wanted
        self.seen: set[TopicPartition] = set()
        listed = set(self.window.dates)
        self._names = [(d, path, parse_part_name(posixpath.basename(path)))
                       for d, folder in self.folders if d in listed
                       for path in store.folder_files(folder)]
        for _d, _p, name in self._names:
            if name is not None and name.topic in self.topics:
                self.seen.add((name.topic, name.partition))
        self.files: list[_File] | None = None

    def add_progress(self, more: Mapping[TopicPartition, Progress]) -> None:
        self.progress.update({tp: p for tp, p in more.items() if tp[0] in self.topics})

    def _wanted(self, name: PartName | None) -> bool:
        if name is None or name.topic not in self.topics:
            return False
        prog = self.progress.get((name.topic, name.partition))
        return prog is not None and name.start < prog.offline_next

    def load(self) -> list[_File]:
        """Footers of the wanted files of the window (once)."""
        if self.files is None:
            self.files = self._read([_File(p, d, n) for d, p, n in self._names
                                     if n is not None and self._wanted(n)])
        return self.files

    def _read(self, files: list[_File]) -> list[_File]:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(self._footer, files))
        self.footers_read += len(files)
        return files

    def _footer(self, f: _File) -> None:
        md = self.store.footer(f.path)
        schema = md.schema.to_arrow_schema()
        f.rows = md.num_rows
        cols = {name: schema.get_field_index(name) for name in ("_offset", *self.keys)}
        top: int | None = None
        complete = True
        nulls = dict.fromkeys(self.keys, 0)
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for name, j in cols.items():
                stats = rg.column(j).statistics if j >= 0 else None
                if name == "_offset":
                    if stats is None or not stats.has_min_max:
                        complete = False
                    else:
                        top = int(stats.max) if top is None else max(top, int(stats.max))
                elif j < 0 or pa.types.is_null(schema.field(j).type):
                    nulls[name] = f.rows  # no such column (or only nulls): no key in any row
                elif stats is None or not stats.has_null_count:
                    nulls[name] = 0  # unknown: assume keys present (expect the view file)
                else:
                    nulls[name] += stats.null_count
        if cols["_offset"] >= 0 and not complete and md.num_rows:
            top = self.store.column_max(f.path, "_offset")
        f.end = f.name.end if f.name.end is not None else max(
            f.name.start, (top if top is not None else f.name.start - 1) + 1)
        f.nonnull = {k: max(f.rows - nulls[k], 0) for k in self.keys}

    def gaps(self) -> list[Gap]:
        files = self.load()
        spans = _spans(files)
        missing = {tp for tp in self.progress} - {(s.topic, s.partition) for s in spans}
        if missing and self.window.newest and not self.window.oldest:
            spans += self._search_back(missing)
        return find_gaps(spans, self.progress, where=self.where, head=self.window.oldest,
                         tail=self.window.newest, slack=ESTIMATE_SLACK)

    def _search_back(self, missing: set[TopicPartition]) -> list[PartSpan]:
        """Parts of ``missing`` partitions in the folders before the window, newest first,
        until each has one (or none are left)."""
        first = self.window.dates[0] if self.window.dates else "9999-99-99"
        found: list[PartSpan] = []
        for date, folder in reversed([f for f in self.folders if f[0] < first]):
            files = [_File(p, date, n) for p in self.store.folder_files(folder)
                     if (n := parse_part_name(posixpath.basename(p))) is not None
                     and (n.topic, n.partition) in missing and self._wanted(n)]
            spans = _spans(self._read(files))
            found += spans
            missing -= {(s.topic, s.partition) for s in spans}
            if not missing:
                break
        return found


def _spans(files: Iterable[_File]) -> list[PartSpan]:
    ends: dict[tuple[str, int, int], tuple[int, bool]] = {}
    for f in files:
        key = (f.name.topic, f.name.partition, f.name.start)
        end, exact = ends.get(key, (f.end, f.name.end is not None))
        ends[key] = (max(end, f.end), exact)
    return [PartSpan(t, p, s, e, x) for (t, p, s), (e, x) in sorted(ends.items())]


def _not_ingested(scope: EventScope, progress: Mapping[TopicPartition, Progress]
                  ) -> list[str]:
    marks = [p.offline_wm for p in progress.values() if p.offline_wm is not None]
    if not progress or scope.lo_ms is None or not marks or max(marks) >= scope.lo_ms:
        return []
    return [f"the range starts at {scope.lo_ms}, after the newest {scope.kind} the worker "
            f"made durable offline ({max(marks)} ms): nothing of it was ingested yet"]


def _view_gaps(store: OfflineStore, views: Sequence[ViewScope], scans: Mapping[str, _Scan],
               check: CoverageCheck) -> list[Gap]:
    """Events files of the views' sources whose views file is missing (same name, date)."""
    gaps: list[Gap] = []
    for v in views:
        first, last = dates_between(v.lo_ms, v.hi_ms)
        topics = {check.topic_prefix + s for s in v.sources}
        needed: dict[str, list[_File]] = {}
        ends: dict[tuple[str, int, int], int] = {}
        for src in v.sources:
            sc = scans.get(check.sources.get(src, ""))
            files = sc.load() if sc is not None else []
            ends.update({(s.topic, s.partition, s.start): s.end for s in _spans(files)})
            for f in files:
                if (f.name.topic in topics and (first is None or f.date >= first)
                        and f.date <= last and f.nonnull.get(v.key, 1) > 0):
                    needed.setdefault(f.date, []).append(f)
        folders = dict(store.dates(view_dir(store.root, v.view_id)))
        for date, files in sorted(needed.items()):
            have = {posixpath.basename(p) for p in (
                store.folder_files(folders[date]) if date in folders else [])}
            gaps += [Gap(f"views/{v.view_id}", f.name.topic, f.name.partition, f.name.start,
                         ends[(f.name.topic, f.name.partition, f.name.start)], "view file",
                         date)
                     for f in files if posixpath.basename(f.path) not in have]
    return gaps


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
