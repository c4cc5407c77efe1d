"""Coverage of the offline store against commit records: the gap rule on hand-built part
lists, the folder window, and the check on a local store with an in-memory Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_defs.layout import chunk_file, commit_key
from headrace.core.online_store import MemoryOnlineStore
from offline.coverage import (
    METADATA_KEY,
    CoverageCheck,
    CoverageError,
    EventScope,
    Gap,
    PartSpan,
    Progress,
    ViewScope,
    find_gaps,
    pick_window,
)
from offline.store import OfflineStore, parse_part_name

DAY = 86_400_000
D0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T, TOPIC = "impressions", "impressions"
GROUP = "g"


def _span(start: int, end: int, partition: int = 0) -> PartSpan:
    return PartSpan(T, partition, start, end)


def _gap(start: int, end: int, reason: str, partition: int = 0) -> Gap:
    return Gap("events/impression", T, partition, start, end, reason)


def _gaps(parts: list[PartSpan], nxt: int, **kw: Any) -> list[Gap]:
    log_start = kw.pop("log_start", None)
    return find_gaps(parts, {(T, 0): Progress(nxt, log_start=log_start)},
                     where="events/impression", **kw)


# --------------------------------------------------------------------------- the rule
def test_contiguous_parts_have_no_gap() -> None:
    assert _gaps([_span(10, 20), _span(0, 10), _span(20, 35)], 35) == []


def test_a_hole_in_the_middle() -> None:
    assert _gaps([_span(0, 10), _span(15, 20)], 20) == [_gap(10, 15, "hole")]


def test_a_missing_tail_below_offline_next() -> None:
    assert _gaps([_span(0, 10)], 20) == [_gap(10, 20, "tail")]
    assert _gaps([_span(0, 10)], 20, tail=False) == []  # the window ends before the newest


def test_a_partition_with_progress_and_no_parts() -> None:
    progress = {(T, 0): Progress(20), (T, 1): Progress(7, log_start=3)}
    got = find_gaps([_span(0, 20)], progress, where="events/impression")
    assert got == [_gap(3, 7, "no part", partition=1)]
    assert find_gaps([_span(0, 20)], progress, tail=False, where="events/impression") == []


def test_overlapping_parts_are_merged() -> None:
    assert _gaps([_span(0, 12), _span(10, 20), _span(5, 8)], 20) == []
    assert _gaps([_span(0, 12), _span(10, 15), _span(2, 4), _span(18, 20)], 20) == [
        _gap(15, 18, "hole")]


def test_parts_at_or_beyond_the_progress_are_ignored() -> None:
    assert _gaps([_span(0, 10), _span(10, 30), _span(40, 50)], 10) == []
    assert _gaps([_span(0, 8), _span(10, 30)], 10) == [_gap(8, 10, "tail")]


def test_partitions_without_progress_are_not_checked() -> None:
    assert find_gaps([_span(0, 5, partition=3)], {}, where="x") == []


def test_the_head_needs_a_recorded_log_start() -> None:
    assert _gaps([_span(5, 10)], 10) == []
    assert _gaps([_span(5, 10)], 10, log_start=0) == [_gap(0, 5, "head")]
    assert _gaps([_span(5, 10)], 10, log_start=0, head=False) == []
    assert _gaps([_span(5, 10)], 10, log_start=5) == []


def test_a_part_whose_stored_offsets_end_before_its_start_covers_nothing() -> None:
    assert _gaps([_span(0, 10), _span(10, 3), _span(12, 20)], 20) == [_gap(10, 12, "hole")]


def test_small_holes_after_estimated_ends_are_uncertain() -> None:
    est = [PartSpan(T, 0, 0, 10, exact=False), PartSpan(T, 0, 12, 20, exact=False)]
    got = _gaps(est, 23, slack=8)
    assert [(g.start, g.end, g.reason, g.certain) for g in got] == [
        (10, 12, "hole", False), (20, 23, "tail", False)]
    assert [g.certain for g in _gaps(est, 40, slack=8)] == [False, True]  # tail of 20
    assert [g.certain for g in _gaps(est, 23, slack=1)] == [True, True]
    exact = [_span(0, 10), _span(12, 20)]  # recorded ends: every hole is certain
    assert [g.certain for g in _gaps(exact, 23, slack=8)] == [True, True]
    # the part reaching furthest decides: an exact end behind an estimated one does not
    mixed = [PartSpan(T, 0, 0, 15, exact=False), _span(5, 10), _span(17, 20)]
    assert [g.certain for g in _gaps(mixed, 20, slack=8)] == [False]


def test_progress_from_records() -> None:
    assert Progress.from_record({}) is None
    assert Progress.from_record({"offline_next": 0, "online_next": 9}) is None
    assert Progress.from_record({"offline_next": 5, "offline_wm": -(2**62)}) == Progress(5)
    assert Progress.from_record({"offline_next": 5, "offline_wm": 7, "log_start": 2}) == \
        Progress(5, 7, 2)


@pytest.mark.parametrize(("lo", "hi", "core", "dates", "oldest", "newest"), [
    (D0 + DAY, D0 + 2 * DAY, ("02",), ("01", "02", "04"), True, False),
    (D0 + 3 * DAY, D0 + 4 * DAY, ("04",), ("02", "04", "05"), False, False),
    (D0, D0 + DAY, ("01",), ("01", "02"), True, False),
    (D0 + 5 * DAY, D0 + 6 * DAY, ("06",), ("05", "06"), False, True),
    (D0 + 2 * DAY, D0 + 3 * DAY, (), ("02", "04"), False, False),  # no folder in range
    (D0 + 9 * DAY, D0 + 10 * DAY, (), ("06",), False, True),
    (D0 - 9 * DAY, D0 - 8 * DAY, (), ("01",), True, False),
    (None, D0 + 2 * DAY, ("01", "02"), ("01", "02", "04"), True, False),
])
def test_pick_window(lo: int | None, hi: int, core: tuple[str, ...], dates: tuple[str, ...],
                     oldest: bool, newest: bool) -> None:
    folders = [f"2026-01-{d}" for d in ("01", "02", "04", "05", "06")]
    w = pick_window(folders, lo, hi)
    assert (w.core, w.dates, w.oldest, w.newest) == (
        tuple(f"2026-01-{d}" for d in core), tuple(f"2026-01-{d}" for d in dates), oldest,
        newest)
    assert pick_window([], D0, D0 + 1) == type(w)((), (), True, True)


def test_part_names() -> None:
    assert parse_part_name(chunk_file("t1.impressions", 12, 345)) == \
        parse_part_name("t1.impressions-p012-000000000345.parquet")
    name = parse_part_name("clicks-p001-000000000010-000000000020.parquet")
    assert name is not None and (name.topic, name.partition, name.start, name.end) == (
        "clicks", 1, 10, 20)
    assert parse_part_name(".x.tmp") is None and parse_part_name("labels.parquet") is None


# --------------------------------------------------------------------------- on a store
class Store:
    """A local offline store written part by part, and its commit records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.online = MemoryOnlineStore()
        self.warnings: list[str] = []

    def part(self, start: int, offsets: list[int], day: int = 0, *, partition: int = 0,
             kind: str = "impression", topic: str = TOPIC, users: list[str | None] | None = None,
             name: str | None = None, views: tuple[str, ...] = (), stats: bool = True) -> Path:
        folder = self.root / "events" / kind / f"date=2026-01-{day + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        ts = pa.array([D0 + day * DAY + 1000 * i for i in range(len(offsets))],
                      pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
        table = pa.table({"ts": ts, "_offset": pa.array(offsets, pa.int64()),
                          "_partition": pa.array([partition] * len(offsets), pa.int32()),
                          "user_id": pa.array(users or [f"u{o}" for o in offsets],
                                              pa.string())})
        path = folder / (name or chunk_file(topic, partition, start))
        pq.write_table(table, path, write_statistics=stats)
        for view in views:
            vdir = self.root / "views" / view / folder.name
            vdir.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, vdir / path.name)
        return path

    def record(self, partition: int, offline_next: int, wm: int = D0 + 10 * DAY,
               topic: str = TOPIC, **extra: int) -> None:
        key = commit_key("hr", GROUP, topic, partition)
        self.online.commits[key] = {"offline_next": offline_next, "offline_wm": wm, **extra}

    def check(self, scopes: list[EventScope], views: tuple[ViewScope, ...] = (), *,
              allow: bool = False, online: Any = "default") -> Any:
        check = CoverageCheck(
            online=self.online if online == "default" else online, prefix="hr", group=GROUP,
            topic_prefix="", partitions=2,
            sources={"impressions": "impression", "clicks": "click"}, allow_gaps=allow,
            warn=self.warnings.append)
        return check.run(OfflineStore.from_uri(str(self.root)), scopes, views)


def _all(kind: str = "impression") -> list[EventScope]:
    return [EventScope(kind, D0, D0 + 10 * DAY)]


@pytest.fixture
def st(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.part(0, list(range(0, 10)), 0)
    s.part(10, list(range(10, 20)), 0)
    s.part(10, [19, 21], 1)  # the same part straddling midnight
    s.part(22, list(range(22, 50)), 1)
    s.record(0, 50)
    return s


def test_a_complete_store_passes(st: Store) -> None:
    report = st.check(_all())
    assert report.gaps == [] and report.problems == [] and report.checked
    assert report.files == 4 and report.partitions == 1 and st.warnings == []
    doc = json.loads(report.metadata()[METADATA_KEY])
    assert doc["gaps"] == [] and doc["checked"] is True and doc["group"] == GROUP


def test_a_deleted_middle_part_fails_with_one_sentence(st: Store) -> None:
    for path in st.root.rglob(chunk_file(TOPIC, 0, 10)):
        path.unlink()
    with pytest.raises(CoverageError) as info:
        st.check(_all())
    msg = str(info.value)
    assert "offsets 10-21 of impressions[0] in events/impression between two parts" in msg
    assert "--allow-gaps" in msg and "\n" not in msg and msg.count(". ") == 0
    report = st.check(_all(), allow=True)
    assert report.gaps == [Gap("events/impression", TOPIC, 0, 10, 22, "hole")]
    assert len(st.warnings) == 1 and "offsets 10-21" in st.warnings[0]
    assert json.loads(report.metadata()[METADATA_KEY])["gaps"][0]["start"] == 10


def test_a_lost_newest_part_is_a_missing_tail(st: Store) -> None:
    (st.root / "events/impression/date=2026-01-02" / chunk_file(TOPIC, 0, 22)).unlink()
    gaps = st.check(_all(), allow=True).gaps
    assert [(g.start, g.end, g.reason) for g in gaps] == [(22, 50, "tail")]


def test_the_tail_is_checked_only_when_the_range_reaches_the_newest_folder(st: Store) -> None:
    st.record(0, 75)  # offsets 60..74 were recorded but never stored
    first_day = [EventScope("impression", D0, D0 + 1000)]
    st.part(50, list(range(50, 60)), 5)  # a later folder: 60..74 missing at the end
    assert st.check(first_day).gaps == []
    gaps = st.check(_all(), allow=True).gaps
    assert [(g.start, g.end, g.reason) for g in gaps] == [(60, 75, "tail")]


def test_a_hole_next_to_the_range_is_found_through_the_neighbour_folders(st: Store) -> None:
    # the part 10 lost whole: the range's day (Jan 2) still sees the part before it in
    # the neighbour folder (Jan 1)
    for path in st.root.rglob(chunk_file(TOPIC, 0, 10)):
        path.unlink()
    day2 = [EventScope("impression", D0 + DAY, D0 + 2 * DAY)]
    gaps = st.check(day2, allow=True).gaps
    assert [(g.start, g.end, g.reason) for g in gaps] == [(10, 22, "hole")]


def test_a_recorded_partition_without_parts(st: Store) -> None:
    st.record(1, 12, log_start=2)
    gaps = st.check(_all(), allow=True).gaps
    assert [(g.partition, g.start, g.end, g.reason) for g in gaps] == [(1, 2, 12, "no part")]


def test_an_idle_partition_is_found_in_older_folders(st: Store) -> None:
    st.part(0, [0, 1, 2], 0, partition=1)
    st.record(1, 3)
    day2 = [EventScope("impression", D0 + DAY, D0 + 2 * DAY)]
    report = st.check(day2)
    assert report.gaps == [] and report.partitions == 2
    st.record(1, 20)  # its newest part is gone
    gaps = st.check(day2, allow=True).gaps
    assert [(g.partition, g.start, g.end, g.reason) for g in gaps] == [(1, 3, 20, "tail")]


def test_parts_beyond_the_configured_partitions_are_checked(st: Store) -> None:
    st.part(0, [0, 1], 0, partition=7)
    st.record(7, 20)
    gaps = st.check(_all(), allow=True).gaps
    assert [(g.partition, g.start, g.end) for g in gaps] == [(7, 2, 20)]


def test_unreadable_records(st: Store) -> None:
    st.online.fail = "connection refused"
    with pytest.raises(CoverageError, match="cannot read the commit records in Redis "
                                            r"\(connection refused\).*--allow-gaps"):
        st.check(_all())
    report = st.check(_all(), allow=True)
    assert not report.checked and "connection refused" in (report.unchecked or "")
    assert json.loads(report.metadata()[METADATA_KEY])["checked"] is False
    assert len(st.warnings) == 1 and "not checked" in st.warnings[0]
    with pytest.raises(CoverageError, match="no Redis configured"):
        st.check(_all(), online=None)


def test_no_records_while_the_store_has_parts(st: Store) -> None:
    st.online.commits.clear()
    with pytest.raises(CoverageError, match="holds no commit records of group g for "
                                            "impressions although"):
        st.check(_all())
    empty = Store(st.root.parent / "empty")  # nothing stored and nothing recorded: fine
    assert empty.check(_all()).findings() == []


def test_a_range_after_everything_ingested(st: Store) -> None:
    st.record(0, 30, wm=D0 + 2 * DAY)
    later = [EventScope("impression", D0 + 3 * DAY, D0 + 4 * DAY, require_ingested=True)]
    with pytest.raises(CoverageError, match="nothing of it was ingested yet"):
        st.check(later)
    assert st.check([EventScope("impression", D0 + DAY, D0 + 4 * DAY,
                                require_ingested=True)]).findings() == []


def test_ends_from_the_footer_without_statistics_and_from_names(tmp_path: Path) -> None:
    s = Store(tmp_path / "s")
    s.part(0, [0, 1, 2, 9], stats=False)
    s.part(10, [10, 11], name="impressions-p000-000000000010-000000000020.parquet")
    s.part(20, [20])
    s.record(0, 21)
    report = s.check(_all())
    assert report.gaps == [] and report.unverified == []
    s.record(0, 22)  # one offset after an estimated end: recorded, not failing
    report = s.check(_all())
    assert report.gaps == [] and [(g.start, g.end) for g in report.unverified] == [(21, 22)]
    assert json.loads(report.metadata()[METADATA_KEY])["unverified"][0]["certain"] is False
    (s.root / "events/impression/date=2026-01-01" / chunk_file(TOPIC, 0, 20)).rename(
        s.root / "events/impression/date=2026-01-01" / chunk_file(TOPIC, 0, 22))
    s.record(0, 23)
    report = s.check(_all(), allow=True)  # after a recorded end even 2 offsets count
    assert [(g.start, g.end, g.reason) for g in report.gaps] == [(20, 22, "hole")]
    assert [(g.start, g.end, g.reason) for g in report.unverified] == [(22, 23, "tail")]


def test_views_files_must_match_the_events_files(tmp_path: Path) -> None:
    s = Store(tmp_path / "s")
    s.part(0, [0, 1], views=("user_activity@1",))
    s.part(2, [2, 3], users=[None, None])  # no key in any row: no views file expected
    s.part(4, [4, 5], views=("user_activity@1",))
    s.part(6, [6], day=1, views=("user_activity@1",))
    s.record(0, 7)
    view = ViewScope("user_activity@1", "user_id", ("impressions",), D0, D0 + 2 * DAY)
    assert s.check(_all(), (view,)).gaps == []
    (s.root / "views/user_activity@1/date=2026-01-01" / chunk_file(TOPIC, 0, 4)).unlink()
    gaps = s.check(_all(), (view,), allow=True).gaps
    assert gaps == [Gap("views/user_activity@1", TOPIC, 0, 4, 6, "view file", "2026-01-01")]
    assert "the views/user_activity@1 file of the part at offsets 4-5" in s.warnings[0]
    # a view reading only the second day does not need the first day's files
    day2 = ViewScope("user_activity@1", "user_id", ("impressions",), D0 + DAY, D0 + 2 * DAY)
    assert s.check(_all(), (day2,)).gaps == []
    # a view folder lost whole
    for path in (s.root / "views/user_activity@1/date=2026-01-02").iterdir():
        path.unlink()
    (s.root / "views/user_activity@1/date=2026-01-02").rmdir()
    assert [g.start for g in s.check(_all(), (day2,), allow=True).gaps] == [6]
