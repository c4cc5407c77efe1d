"""Views that read a subset of the sources, and per-view allowed lateness, through the
engine with in-memory fakes (issue 12).

* A view keyed by a repartitioned entity that reads only ``clicks`` counts every click:
  impression rows are not forwarded to its entity, and where a sibling view of the
  entity reads impressions, their rows never touch the clicks view's fences.
* Fence keys are the receiving view's own source index; a source no view reads is a
  typed error naming view and source.
* Each view applies the events not late for its own ``allowed_lateness``; the late
  topic gets the events late for every view of the source; the offline ``views/`` rows
  of a view are exactly what it applied. Checked against :mod:`tests.oracle_views`.
"""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from feature_defs.layout import entity_key, repartition_topic
from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.registry import Registry, load_registry
from feature_defs.standard import AD, PUBLISHER, USER
from feature_defs.state import ViewState, fence_key
from feature_defs.topology import UnknownSourceError
from feature_defs.windows import lifetime
from headrace.core.online_store import MemoryOnlineStore
from streams.engine import Engine, RawMessage
from streams.offline_writer import OfflineWriter
from streams.sides import MemorySideOutputs, encode_arrow
from tests import oracle_views as ov
from tests.adversarial import encode_event
from tests.oracle import SECOND

T0 = 1_700_000_000_000
IMPRESSIONS, CLICKS = Source("impressions", "impression"), Source("clicks", "click")


# --------------------------------------------------------------------------- helpers
def _imp(n: int, ts: int, *, user: str = "u1", ad: str = "a1", publisher: str = "p1"
         ) -> dict[str, Any]:
    return {"type": "impression", "event_id": f"i{n}", "ts": ts, "user_id": user,
            "ad_id": ad, "campaign_id": "c1", "publisher_id": publisher, "placement": "top",
            "creative_type": "banner", "device_type": "mobile", "country": "US",
            "bid_cpm": 1.0 + n % 7}


def _click(n: int, ts: int, *, user: str = "u1", ad: str = "a1", publisher: str = "p1"
           ) -> dict[str, Any]:
    return {"type": "click", "event_id": f"k{n}", "ts": ts, "impression_id": f"i{n}",
            "user_id": user, "ad_id": ad, "campaign_id": "c1", "publisher_id": publisher}


class Harness:
    """An engine over fakes owning partition 0 of every input topic; forwards are fed
    back as repartition messages by :meth:`deliver_forwards`."""

    def __init__(self, registry: Registry, writer: OfflineWriter | None = None) -> None:
        self.registry = registry
        self.store = MemoryOnlineStore()
        self.sides = MemorySideOutputs()
        self.engine = Engine(registry=registry, store=self.store, writer=writer,
                             sides=self.sides, topic=lambda t: t, redis_prefix="hr", group="g",
                             max_future_ms=10**13)
        self.engine.assign([(t, 0) for t in self.engine.input_topics()])
        self.offsets: dict[str, int] = {}

    def _msg(self, topic: str, value: bytes) -> RawMessage:
        off = self.offsets.get(topic, 0)
        self.offsets[topic] = off + 1
        return RawMessage(value, None, topic, 0, off, T0)

    def source(self, events: list[dict[str, Any]]) -> None:
        """Each event as one message of its topic, in order (a call per topic run)."""
        run: list[RawMessage] = []
        topic = None
        for e in events:
            t = "impressions" if e["type"] == "impression" else "clicks"
            if run and t != topic:
                self.engine.on_source(topic, run)  # type: ignore[arg-type]
                run = []
            topic = t
            run.append(self._msg(t, encode_event(e)))
        if run:
            self.engine.on_source(topic, run)  # type: ignore[arg-type]

    def deliver_forwards(self, *, one_batch: bool = True) -> None:
        by_entity: dict[str, list[RawMessage]] = {}
        for entity, rows in self.sides.forwards:
            topic = repartition_topic(entity)
            by_entity.setdefault(topic, []).append(self._msg(topic, encode_arrow(rows)))
        self.sides.forwards.clear()
        for topic, msgs in by_entity.items():
            if one_batch:
                self.engine.on_repartition(topic, msgs)
            else:
                for m in msgs:
                    self.engine.on_repartition(topic, [m])

    def state(self, view_id: str, entity_id: str) -> ViewState | None:
        self.engine.flush_online()
        plan = self.registry.plans[view_id]
        blob = self.store.hashes.get(entity_key("hr", plan.view.entity.name, entity_id),
                                     {}).get(view_id)
        return ViewState.decode(plan, blob) if blob else None


def _stream() -> list[dict[str, Any]]:
    """Many impressions (high offsets), then a few clicks of the same publisher."""
    imps = [_imp(n, T0 + n * 1000) for n in range(50)]
    clicks = [_click(n, T0 + 50_000 + n * 1000) for n in range(5)]
    return imps + clicks


# --------------------------------------------------------------------------- the fence bug
@pytest.mark.parametrize("definitions", ["tests.user_views:VIEWS", "tests.user_views:ALL_VIEWS"])
@pytest.mark.parametrize("one_batch", [True, False])
def test_a_clicks_only_view_of_a_repartitioned_entity_counts_every_click(
        definitions: str, one_batch: bool) -> None:
    h = Harness(load_registry(definitions))
    h.source(_stream())
    h.deliver_forwards(one_batch=one_batch)
    st = h.state("publisher_clicks@1", "p1")
    assert st is not None
    values, is_default = st.rollup(T0 + 60_000)
    assert not is_default
    assert values["publisher__clicks_1h"] == 5 and values["publisher__clicks_24h"] == 5
    # its state knows only clicks: its latest event is the last click, one clicks fence
    assert st.max_ts == T0 + 54_000
    assert dict(st.fences) == {fence_key(0, 0): st.fences[fence_key(0, 0)]}
    if definitions.endswith("ALL_VIEWS"):  # the sibling view reading both is exact too
        sib = h.state("publisher_activity@1", "p1")
        assert sib is not None
        assert sorted(sib.fences) == [fence_key(0, 0), fence_key(1, 0)]
        sv, _ = sib.rollup(T0 + 60_000)
        assert sv["publisher__ctr_24h"] == pytest.approx(5 / 50)


def test_only_sources_an_entity_reads_are_forwarded_to_it() -> None:
    h = Harness(load_registry("tests.user_views:VIEWS"))  # publisher: clicks; ad: impressions
    h.source(_stream())
    sent = {(e, s) for e, rows in h.sides.forwards for s in set(rows["source"].to_pylist())}
    assert sent == {("publisher", "clicks"), ("ad", "impressions")}
    topo = h.registry.topology
    assert dict(topo.forward_sources) == {"publisher": {"clicks"}, "ad": {"impressions"}}


def test_fence_keys_are_the_receiving_views_own_source_index() -> None:
    topo = load_registry("tests.user_views:ALL_VIEWS").topology
    # the shipped views read (impressions, clicks): their fence keys are unchanged
    for vid in ("user_activity@1", "ad_activity@1", "publisher_activity@1"):
        assert topo.fence_source(vid, "impressions") == 0
        assert topo.fence_source(vid, "clicks") == 1
    assert topo.fence_source("publisher_clicks@1", "clicks") == 0
    with pytest.raises(UnknownSourceError) as err:
        topo.fence_source("publisher_clicks@1", "impressions")
    assert err.value.view == "publisher_clicks@1" and err.value.source == "impressions"
    assert "publisher_clicks@1" in str(err.value) and "impressions" in str(err.value)


def test_a_forwarded_row_of_an_unknown_source_is_an_error() -> None:
    h = Harness(load_registry("tests.user_views:ALL_VIEWS"))
    h.source(_stream()[-1:])
    (entity, rows), *_ = [f for f in h.sides.forwards if f[0] == "publisher"]
    bogus = rows.set_column(rows.schema.get_field_index("source"), "source",
                            pa.array(["views"] * rows.num_rows))
    with pytest.raises(UnknownSourceError) as err:
        h.engine.views.apply_remote(entity, bogus)
    assert err.value.source == "views" and err.value.view == "publisher_activity@1"
    with pytest.raises(UnknownSourceError):  # nothing of the publisher reads it
        Harness(load_registry("tests.user_views:VIEWS")).engine.views.forward_rows(
            "publisher", "impressions", rows)


def test_rows_of_a_source_the_view_does_not_read_are_skipped_not_misfiled() -> None:
    """An impression forward to a clicks-only entity (as a worker before the fix sent
    them) leaves the clicks view's state untouched."""
    h = Harness(load_registry("tests.user_views:VIEWS"))
    h.source(_stream())
    h.deliver_forwards()
    old = Harness(load_registry("tests.user_views:ALL_VIEWS"))
    old.source(_stream()[:50])  # impressions only: forwarded to the publisher there
    rows = [r for e, r in old.sides.forwards if e == "publisher"]
    before = h.state("publisher_clicks@1", "p1")
    assert before is not None
    h.engine.views.apply_remote("publisher", pa.concat_tables(rows))
    after = h.state("publisher_clicks@1", "p1")
    assert after is not None and after.encode() == before.encode()


# --------------------------------------------------------------------------- lateness
def _count_view(name: str, entity: Entity, lateness_s: int,
                sources: tuple[Source, ...] = (IMPRESSIONS, CLICKS)) -> FeatureView:
    feats = tuple(Feature(f"{name}_{s.name}", (lifetime(),), measure=Measure(AggOp.COUNT, s.name),
                          default=0) for s in sources)
    return FeatureView(name=name, entity=entity, sources=sources, features=feats,
                       allowed_lateness=timedelta(seconds=lateness_s))


def _count_spec(name: str, entity: str, key: str, lateness_s: int,
                kinds: tuple[str, ...] = ("impression", "click")) -> ov.View:
    topics = {"impression": "impressions", "click": "clicks"}
    return ov.View(name, key, kinds, tuple(
        ov.feature(f"{entity}__{name}_{topics[k]}_lifetime", "count", k, None, ov.LIFETIME, 0)
        for k in kinds), lateness_ms=lateness_s * SECOND)


#: local views with two lateness values, an entity whose two views differ (forwards
#: carry behind_ms), one whose only view is stricter than the source's maximum
LATENESS_VIEWS = (
    _count_view("tight", USER, 5), _count_view("loose", USER, 60),
    _count_view("ad_tight", AD, 5), _count_view("ad_loose", AD, 30),
    _count_view("pub_tight", PUBLISHER, 2, (CLICKS,)),
)
LATENESS_SPECS = (
    _count_spec("tight", "user", "user_id", 5), _count_spec("loose", "user", "user_id", 60),
    _count_spec("ad_tight", "ad", "ad_id", 5), _count_spec("ad_loose", "ad", "ad_id", 30),
    _count_spec("pub_tight", "publisher", "publisher_id", 2, ("click",)),
)


def _out_of_order(n: int, seed: int) -> list[dict[str, Any]]:
    """Events arriving up to 90 s after their ts: late for some views, not for others."""
    rng = random.Random(seed)
    evs = []
    for i in range(n):
        ts = T0 + i * 700
        kw = {"user": f"u{rng.randrange(4)}", "ad": f"a{rng.randrange(3)}",
              "publisher": f"p{rng.randrange(2)}"}
        e = _imp(i, ts, **kw) if rng.random() < 0.6 else _click(i, ts, **kw)
        delay = rng.choice([0, 0, rng.randrange(0, 10_000), rng.randrange(0, 90_000)])
        evs.append((ts + delay, i, e))
    return [e for _, _, e in sorted(evs, key=lambda x: (x[0], x[1]))]


def test_each_view_applies_what_is_not_late_for_it(tmp_path: Path) -> None:
    reg = Registry.build(list(LATENESS_VIEWS))
    assert reg.topology.mixed_lateness == {"impressions", "clicks"}
    writer = OfflineWriter(pafs.LocalFileSystem(), str(tmp_path), parallel=1)
    h = Harness(reg, writer)
    events = _out_of_order(1500, seed=3)
    # a few calls of mixed sizes (the rule may not depend on how input is batched)
    h.source(events[:400])
    cols = {e: set(r.column_names) for e, r in h.sides.forwards}
    assert "behind_ms" in cols["ad"] and "behind_ms" not in cols["publisher"]
    h.deliver_forwards()
    h.source(events[400:])
    h.deliver_forwards(one_batch=False)
    h.engine.flush_online()
    h.engine.flush_offline()
    end = T0 + 10**7
    late_somewhere = 0
    for view, spec in zip(LATENESS_VIEWS, LATENESS_SPECS, strict=True):
        applied = ov.applied_events(events, spec, partitions=1)
        late_somewhere += len(applied) < len([e for e in events if e["type"] in spec.sources])
        oracle = ov.ViewOracle(spec, applied)
        ids = {e[spec.key] for e in events}
        for eid in sorted(ids):
            st = h.state(view.id, eid)
            want = oracle.features_as_of(eid, end)
            got = st.rollup(end)[0] if st is not None else spec.defaults()
            assert got == want, (view.id, eid)
        # the offline views/ rows are exactly what the view applied
        files = [i.path for i in pafs.LocalFileSystem().get_file_info(
            pafs.FileSelector(f"{tmp_path}/views/{view.id}", recursive=True))
            if i.path.endswith(".parquet")]
        rows = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
        got_ids = sorted(zip(rows["source"].to_pylist(), rows["_offset"].to_pylist(),
                             strict=True)) if rows is not None else []
        want_ids = sorted(_coords(events, applied))
        assert got_ids == want_ids, view.id
    assert late_somewhere == len(LATENESS_VIEWS)  # the stream exercises every view's rule
    # late topic and events/: late for every view of the source (the largest lateness)
    late60 = {e["event_id"] for e in events} - {
        e["event_id"] for e in ov.applied_events(
            events, ov.View("any", "event_id", ("impression", "click"), (), 60 * SECOND), 1)}
    assert {row["event_id"] for _, row, _ in h.sides.lates} == late60
    ev_files = [i.path for i in pafs.LocalFileSystem().get_file_info(
        pafs.FileSelector(f"{tmp_path}/events", recursive=True)) if i.path.endswith(".parquet")]
    ev = pa.concat_tables([pq.read_table(f) for f in ev_files], promote_options="default")
    assert "_behind_ms" not in ev.column_names
    assert sorted(ev["event_id"].to_pylist()) == sorted({e["event_id"] for e in events} - late60)


def _coords(events: list[dict[str, Any]], applied: list[dict[str, Any]]
            ) -> list[tuple[str, int]]:
    """(source, offset) of ``applied`` events, offsets counted per topic in arrival order
    (one message per event, as :class:`Harness` produces them)."""
    offsets: dict[int, tuple[str, int]] = {}
    seen = {"impressions": 0, "clicks": 0}
    for e in events:
        t = "impressions" if e["type"] == "impression" else "clicks"
        offsets[id(e)] = (t, seen[t])
        seen[t] += 1
    return [offsets[id(e)] for e in applied]


def test_the_shipped_set_forwards_no_lateness_column() -> None:
    h = Harness(load_registry())
    h.source(_out_of_order(200, seed=5))
    assert h.registry.topology.mixed_lateness == frozenset()
    assert all("behind_ms" not in rows.column_names for _, rows in h.sides.forwards)
    assert all("_behind_ms" not in t.column_names
               for p in h.engine.progress.values() for t in p.buffer)


def test_lateness_must_be_whole_milliseconds() -> None:
    from feature_defs.validate import validate_views

    view = _count_view("odd", USER, 5)
    odd = FeatureView(name="odd", entity=USER, sources=view.sources, features=view.features,
                      allowed_lateness=timedelta(seconds=5, microseconds=500))
    assert validate_views([odd]) == ["view odd.allowed_lateness: must be whole milliseconds"]
    assert validate_views([view]) == []
    topo = Registry.build([view, _count_view("other", AD, 60)]).topology
    assert dict(topo.view_lateness_ms) == {"odd@1": 5000, "other@1": 60_000}
    assert dict(topo.lateness_ms) == {"impressions": 60_000, "clicks": 60_000}
