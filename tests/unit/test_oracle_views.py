"""The generic brute-force oracle (tests/oracle_views.py) on hand-computed cases.

Every expected value is written out by hand with the line that derives it; nothing here
asks project code for an answer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests import adversarial, oracle
from tests import oracle_views as ov
from tests.oracle import DAY, HOUR, MINUTE, SECOND

# 2024-03-04T12:00:00Z: a multiple of every tile size used here
T0 = 1_709_553_600_000
IMP, CLK = "impression", "click"


def imp(ts: int, bid: float | None = None, ad: str = "a1", eid: str | None = None,
        publisher: str = "p1", user: str | None = "u1", no_bid: bool = False) -> dict:
    e = {"type": IMP, "event_id": eid or f"i{ts}-{ad}-{bid}", "ts": ts, "user_id": user,
         "ad_id": ad, "campaign_id": "c1", "publisher_id": publisher, "bid_cpm": bid}
    if no_bid:
        del e["bid_cpm"]
    return e


def click(ts: int, ad: str = "a1", eid: str | None = None, user: str | None = "u1") -> dict:
    return {"type": CLK, "event_id": eid or f"k{ts}-{ad}", "ts": ts, "user_id": user,
            "ad_id": ad, "campaign_id": "c1", "publisher_id": "p1", "impression_id": "i"}


def _all_ops(tag: str, w: ov.Window) -> tuple[ov.Feature, ...]:
    bid = "bid_cpm"
    return (
        ov.feature(f"imps_{tag}", "count", IMP, None, w),
        ov.feature(f"clicks_{tag}", "count", CLK, None, w),
        ov.feature(f"sum_{tag}", "sum", IMP, bid, w),
        ov.feature(f"mean_{tag}", "mean", IMP, bid, w),
        ov.feature(f"min_{tag}", "min", IMP, bid, w),
        ov.feature(f"max_{tag}", "max", IMP, bid, w),
        ov.feature(f"last_{tag}", "last", IMP, bid, w),
        ov.feature(f"pubs_{tag}", "approx_distinct", IMP, "publisher_id", w),
        ov.ratio(f"ctr_{tag}", ov.Measure("count", CLK), ov.Measure("count", IMP), w),
        ov.ratio(f"spi_{tag}", ov.Measure("sum", IMP, bid), ov.Measure("count", IMP), w),
    )


#: every op over a sliding 1h / 5 min, a tumbling 1h and a lifetime window
ALL = ov.View("ad_all", "ad_id", (IMP, CLK),
              _all_ops("sl", ov.sliding(HOUR, 5 * MINUTE)) + _all_ops("tu", ov.tumbling(HOUR))
              + _all_ops("life", ov.LIFETIME))

T = T0 + 30 * MINUTE
EVENTS = [
    imp(T0 - 3 * HOUR, 10.0, eid="a", publisher="p1"),  # lifetime only
    imp(T0 - 25 * MINUTE - 1, 100.0, eid="c", publisher="p3"),  # 1 ms below the sliding bound
    imp(T0 - 25 * MINUTE, 2.0, eid="b", publisher="p2"),  # exactly the sliding lower bound
    imp(T0, 4.0, eid="d", publisher="p1"),  # first ms of the tumbling hour
    imp(T0 + 10 * MINUTE, eid="e", publisher="p4", no_bid=True),  # counted, no value
    imp(T0 + 20 * MINUTE, 6.0, eid="f", publisher="p2"),  # tie with g; f's tiebreak is larger
    imp(T0 + 20 * MINUTE, 1.0, eid="g", publisher="p2"),
    imp(T, 50.0, eid="h", publisher="p5"),  # at T: in no window
    click(T0 + 5 * MINUTE),
    imp(T0 + MINUTE, 999.0, ad="a2", publisher="p9"),  # another ad
]


def test_tiebreaks_of_the_ids_used() -> None:
    # the definition itself: xxh64 of the UTF-8 id, shifted right by one bit
    assert ov.tiebreak("f") == 7_495_921_821_457_676_070
    assert ov.tiebreak("g") == 142_436_244_299_125_591
    assert ov.tiebreak("t1") < ov.tiebreak("t2") < ov.tiebreak("t3")


def test_every_op_over_a_sliding_window() -> None:
    f = ov.ViewOracle(ALL, EVENTS).features_as_of("a1", T)
    # sliding 1h / 5 min as of T0+30m: tiles from (T//5m - 11)*5m = T0-25m, so b, d, e, f, g
    assert f["imps_sl"] == 5  # b, d, e, f, g
    assert f["clicks_sl"] == 1  # the click at T0+5m
    assert f["sum_sl"] == 13.0  # 2 + 4 + 6 + 1 (e has no bid)
    assert f["mean_sl"] == 3.25  # 13 / 4 non-null bids
    assert f["min_sl"] == 1.0  # g
    assert f["max_sl"] == 6.0  # f
    assert f["last_sl"] == 6.0  # f and g at T0+20m: f's tiebreak is larger
    assert f["pubs_sl"] == 3  # p2, p1, p4
    assert f["ctr_sl"] == 0.2  # 1 / 5
    assert f["spi_sl"] == 2.6  # 13 / 5


def test_every_op_over_a_tumbling_window() -> None:
    f = ov.ViewOracle(ALL, EVENTS).features_as_of("a1", T)
    # tumbling 1h as of T0+30m: [T0, T): d, e, f, g
    assert f["imps_tu"] == 4  # d, e, f, g
    assert f["clicks_tu"] == 1  # T0+5m
    assert f["sum_tu"] == 11.0  # 4 + 6 + 1
    assert f["mean_tu"] == 11 / 3  # 11 over 3 non-null bids
    assert f["min_tu"] == 1.0
    assert f["max_tu"] == 6.0
    assert f["last_tu"] == 6.0  # f beats g on the tiebreak
    assert f["pubs_tu"] == 3  # p1, p4, p2
    assert f["ctr_tu"] == 0.25  # 1 / 4
    assert f["spi_tu"] == 2.75  # 11 / 4


def test_every_op_over_a_lifetime_window() -> None:
    f = ov.ViewOracle(ALL, EVENTS).features_as_of("a1", T)
    # lifetime: every a1 event before T: a, c, b, d, e, f, g
    assert f["imps_life"] == 7
    assert f["clicks_life"] == 1
    assert f["sum_life"] == 123.0  # 10 + 100 + 2 + 4 + 6 + 1
    assert f["mean_life"] == 20.5  # 123 / 6
    assert f["min_life"] == 1.0
    assert f["max_life"] == 100.0  # c
    assert f["last_life"] == 6.0  # latest ts is T0+20m (f, g): f
    assert f["pubs_life"] == 4  # p1, p3, p2, p4
    assert f["ctr_life"] == 1 / 7
    assert f["spi_life"] == 123 / 7
    assert list(f) == ALL.names


def test_value_types() -> None:
    f = ov.ViewOracle(ALL, [imp(T0, 3)]).features_as_of("a1", T0 + 1)  # an int bid
    assert type(f["imps_life"]) is int and type(f["pubs_life"]) is int
    for name in ("sum_life", "mean_life", "min_life", "max_life", "last_life", "spi_life"):
        assert type(f[name]) is float and f[name] == 3.0, name  # floats, like the state
    assert type(f["ctr_life"]) is float and f["ctr_life"] == 0.0  # 0 clicks / 1 imp


def test_tumbling_boundaries() -> None:
    o = ov.ViewOracle(ALL, EVENTS)
    f = o.features_as_of("a1", T0)
    # as of T0 the tumbling hour is [T0, T0): empty, though a, c, b came before
    assert (f["imps_tu"], f["sum_tu"], f["mean_tu"], f["last_tu"], f["pubs_tu"]) == (
        0, 0.0, None, None, 0)
    assert f["ctr_tu"] is None  # 0 / 0
    assert not o.is_default("a1", T0)
    # sliding as of T0: from T0-55m, so c and b
    assert (f["imps_sl"], f["sum_sl"], f["min_sl"], f["max_sl"]) == (2, 102.0, 2.0, 100.0)
    assert f["last_sl"] == 2.0  # b (T0-25m) is later than c (T0-25m-1)
    # lifetime as of T0: a, c, b
    assert (f["imps_life"], f["sum_life"], f["mean_life"]) == (3, 112.0, 112 / 3)
    assert f["ctr_life"] == 0.0  # 0 clicks / 3 impressions
    f = o.features_as_of("a1", T0 + 1)
    assert (f["imps_tu"], f["sum_tu"], f["last_tu"], f["pubs_tu"]) == (1, 4.0, 4.0, 1)  # d
    f = o.features_as_of("a1", T0 + HOUR - 1)
    assert f["imps_tu"] == 5  # d, e, f, g, h
    assert f["sum_tu"] == 61.0  # 4 + 6 + 1 + 50
    assert f["last_tu"] == 50.0  # h at T0+30m
    f = o.features_as_of("a1", T0 + HOUR)
    assert (f["imps_tu"], f["clicks_tu"], f["max_tu"]) == (0, 0, None)  # a new hour
    assert f["imps_life"] == 8  # lifetime keeps all 8 a1 impressions


def test_window_rule_edges() -> None:
    w = ov.sliding(HOUR, MINUTE)
    t = T0 + 30 * SECOND
    assert ov.in_window(T0 - 59 * MINUTE, t, w)  # floor(t/1m) - 59 = the lowest tile
    assert not ov.in_window(T0 - 59 * MINUTE - 1, t, w)
    assert ov.in_window(t - 1, t, w) and not ov.in_window(t, t, w)
    tu = ov.tumbling(DAY)
    assert ov.in_window(T0 - 12 * HOUR, T0, tu)  # T0 is 12:00 UTC: the day began at 00:00
    assert not ov.in_window(T0 - 12 * HOUR - 1, T0, tu)  # the previous day
    assert ov.in_window(-10**15, T0, ov.LIFETIME)  # lifetime has no lower bound
    assert not ov.in_window(T0, T0, ov.LIFETIME)
    assert ov.in_window(-60 * MINUTE, -1, w)  # floor(-1/1m) = -1: tiles from -60
    assert not ov.in_window(-60 * MINUTE - 1, -1, w)
    assert ov.in_window(-HOUR, -1, ov.tumbling(HOUR))  # floor(-1/1h) = -1: [-1h, -1)
    assert not ov.in_window(-HOUR - 1, -1, ov.tumbling(HOUR))


# ----------------------------------------------------------------------- nulls and LAST
def test_null_and_missing_fields() -> None:
    events = [imp(T0 - 2 * MINUTE, None, publisher="p1"), imp(T0 - MINUTE, no_bid=True)]
    f = ov.ViewOracle(ALL, events).features_as_of("a1", T0)
    assert f["imps_life"] == 2  # COUNT counts both
    assert f["sum_life"] == 0.0  # no value: the empty sum
    assert (f["mean_life"], f["min_life"], f["max_life"], f["last_life"]) == (None,) * 4
    assert f["spi_life"] == 0.0  # 0.0 / 2
    nobid = ov.View("v", "ad_id", (IMP,), (
        ov.feature("d", "approx_distinct", IMP, "bid_cpm", ov.LIFETIME),
        ov.ratio("r", ov.Measure("mean", IMP, "bid_cpm"), ov.Measure("count", IMP),
                 ov.LIFETIME),
    ))
    g = ov.ViewOracle(nobid, events).features_as_of("a1", T0)
    assert g == {"d": 0, "r": None}  # no distinct values; a null numerator gives null


def test_last_skips_null_values_and_breaks_ties_by_event_id_hash() -> None:
    o = ov.ViewOracle(ALL, [imp(T0, 3.0, eid="x"), imp(T0 + 1, None, eid="y")])
    assert o.features_as_of("a1", T0 + 2)["last_life"] == 3.0  # y is later but null
    ties = [imp(T0, 1.0, eid="t1"), imp(T0, 2.0, eid="t3"), imp(T0, 3.0, eid="t2")]
    for events in (ties, ties[::-1]):
        # same ts: t3 has the greatest tiebreak, whatever the order
        assert ov.ViewOracle(ALL, events).features_as_of("a1", T0 + 1)["last_life"] == 2.0
    later = [*ties, imp(T0 + 1, 9.0, eid="g")]
    # a later ts wins even with the smallest tiebreak of all
    assert ov.ViewOracle(ALL, later).features_as_of("a1", T0 + 2)["last_life"] == 9.0


def test_min_max_of_negative_and_mixed_values() -> None:
    events = [imp(T0, -2.5, eid="m1"), imp(T0 + 1, 0, eid="m2"), imp(T0 + 2, 7, eid="m3")]
    f = ov.ViewOracle(ALL, events).features_as_of("a1", T0 + 3)
    assert (f["min_life"], f["max_life"]) == (-2.5, 7.0)
    assert f["sum_life"] == 4.5  # -2.5 + 0 + 7
    assert f["mean_life"] == 1.5  # 4.5 / 3


# ----------------------------------------------------------------------- ratios
def test_ratios_with_zero_and_null_denominators() -> None:
    w = ov.sliding(HOUR, MINUTE)
    spec = ov.View("r", "ad_id", (IMP, CLK), (
        ov.ratio("ctr", ov.Measure("count", CLK), ov.Measure("count", IMP), w),
        ov.ratio("per_bid", ov.Measure("count", CLK), ov.Measure("sum", IMP, "bid_cpm"), w),
        ov.ratio("per_mean", ov.Measure("count", CLK), ov.Measure("mean", IMP, "bid_cpm"), w),
        ov.ratio("dflt", ov.Measure("count", CLK), ov.Measure("count", IMP), w, 0.5),
    ))
    o = ov.ViewOracle(spec, [click(T0 - MINUTE), click(T0 - 2 * MINUTE)])
    # two clicks, no impression: every denominator is 0 / 0.0 / null
    assert o.features_as_of("a1", T0) == {"ctr": None, "per_bid": None, "per_mean": None,
                                          "dflt": None}  # a declared default is not a fill
    o = ov.ViewOracle(spec, [imp(T0 - MINUTE, 0.0), click(T0 - MINUTE)])
    f = o.features_as_of("a1", T0)
    assert f["ctr"] == 1.0  # 1 / 1
    assert f["per_bid"] is None and f["per_mean"] is None  # SUM 0.0, MEAN 0.0
    o = ov.ViewOracle(spec, [imp(T0 - MINUTE, 2.0), imp(T0 - 2 * MINUTE, 2.0),
                             click(T0 - 3 * HOUR)])
    assert o.features_as_of("a1", T0)["ctr"] == 0.0  # the click is out of the hour: 0 / 2
    assert o.features_as_of("a1", T0)["per_bid"] == 0.0  # 0 / 4.0


# ----------------------------------------------------------------------- TTL and defaults
def test_default_ttls() -> None:
    def view(*windows: ov.Window, ttl: int | None = None) -> ov.View:
        return ov.View("v", "ad_id", (IMP,), tuple(
            ov.feature(f"n{i}", "count", IMP, None, w) for i, w in enumerate(windows)), ttl_ms=ttl)

    assert view(ov.sliding(HOUR, MINUTE), ov.tumbling(2 * HOUR)).effective_ttl_ms == \
        2 * HOUR + DAY  # longest window 2h, + 1 day
    assert view(ov.tumbling(HOUR), ov.LIFETIME).effective_ttl_ms == HOUR + DAY  # lifetime: 0
    assert view(ov.LIFETIME).effective_ttl_ms == DAY  # only lifetime: 0 + 1 day
    assert view(ov.LIFETIME, ttl=3 * DAY).effective_ttl_ms == 3 * DAY  # declared wins
    assert view(ov.sliding(7 * DAY, HOUR), ttl=HOUR).effective_ttl_ms == HOUR  # even if shorter


@pytest.mark.parametrize(("ttl", "declared"), [(HOUR + DAY, None), (3 * DAY, 3 * DAY),
                                               (30 * MINUTE, 30 * MINUTE)])
def test_ttl_edge(ttl: int, declared: int | None) -> None:
    spec = ov.View("v", "ad_id", (IMP,), (
        ov.feature("n", "count", IMP, None, ov.LIFETIME),
        ov.feature("s", "sum", IMP, "bid_cpm", ov.tumbling(HOUR)),
    ), ttl_ms=declared)
    o = ov.ViewOracle(spec, [imp(T0, 2.0)])
    assert not o.is_default("a1", T0 + ttl - 1)
    assert o.features_as_of("a1", T0 + ttl - 1)["n"] == 1  # one ms inside the TTL
    assert o.is_default("a1", T0 + ttl)  # T - latest == TTL: default
    assert o.features_as_of("a1", T0 + ttl) == {"n": 0, "s": 0.0}  # the empty values


def test_lifetime_only_view_expires_after_one_day() -> None:
    spec = ov.View("v", "ad_id", (IMP,), (ov.feature("n", "count", IMP, None, ov.LIFETIME, -1),))
    o = ov.ViewOracle(spec, [imp(T0 - i * HOUR, 1.0) for i in range(5)])
    assert o.features_as_of("a1", T0 + DAY - 1) == {"n": 5}  # latest T0, TTL 1 day
    assert o.features_as_of("a1", T0 + DAY) == {"n": -1}  # the declared default


def test_ttl_counts_from_the_latest_event_before_T() -> None:
    spec = ov.View("v", "ad_id", (IMP,), (ov.feature("n", "count", IMP, None, ov.LIFETIME),),
                   ttl_ms=DAY)
    o = ov.ViewOracle(spec, [imp(T0), imp(T0 + DAY)])
    assert o.is_default("a1", T0 + DAY)  # the event at T does not refresh the entity
    assert o.features_as_of("a1", T0 + DAY + 1) == {"n": 2}
    assert o.is_default("a1", T0)  # nothing before T0
    assert o.is_default("nobody", T0 + DAY)


def test_declared_and_undeclared_defaults() -> None:
    w = ov.sliding(HOUR, MINUTE)
    spec = ov.View("v", "ad_id", (IMP, CLK), (
        ov.feature("n", "count", IMP, None, w),  # undeclared: 0
        ov.feature("s", "sum", IMP, "bid_cpm", w),  # undeclared: 0.0
        ov.feature("d", "approx_distinct", IMP, "ad_id", w),  # undeclared: 0
        ov.feature("m", "mean", IMP, "bid_cpm", w, 1.5),  # declared
        ov.feature("l", "last", IMP, "bid_cpm", w),  # undeclared: null
        ov.feature("n7", "count", CLK, None, w, 7),  # declared
        ov.ratio("r", ov.Measure("count", CLK), ov.Measure("count", IMP), w),  # null
        ov.ratio("r0", ov.Measure("count", CLK), ov.Measure("count", IMP), w, 0.0),
    ))
    want = {"n": 0, "s": 0.0, "d": 0, "m": 1.5, "l": None, "n7": 7, "r": None, "r0": 0.0}
    assert spec.defaults() == want
    assert ov.ViewOracle(spec, []).features_as_of("a1", T0) == want  # unseen entity
    o = ov.ViewOracle(spec, [imp(T0 - 2 * HOUR, 1.0)])
    # inside the TTL (1h + 1d) but outside every window: empty values, not defaults
    assert not o.is_default("a1", T0)
    assert o.features_as_of("a1", T0) == {"n": 0, "s": 0.0, "d": 0, "m": None, "l": None,
                                          "n7": 0, "r": None, "r0": None}


# ----------------------------------------------------------------------- lateness and routing
def _same_partition(key: str, partitions: int = 4) -> str:
    """An event id that routes (as an anonymous event) to the partition of user ``key``."""
    want = oracle.partition_of({"user_id": key, "event_id": "x"}, partitions)
    return next(f"anon{i}" for i in range(1000)
                if oracle.partition_of({"user_id": None, "event_id": f"anon{i}"}, partitions)
                == want)


TIGHT = ov.View("tight", "user_id", (IMP, CLK),
                (ov.feature("n", "count", IMP, None, ov.LIFETIME),), lateness_ms=5 * SECOND)
LOOSE = ov.View("loose", "ad_id", (IMP,),
                (ov.feature("n", "count", IMP, None, ov.LIFETIME),), lateness_ms=60 * SECOND)


def test_lateness_is_per_view() -> None:
    head = imp(T0, eid="e0")
    at_wm = imp(T0 - 5 * SECOND, eid="e1")  # == T0 - 5 s: accepted by both
    late5 = imp(T0 - 5 * SECOND - 1, eid="e2")  # < T0 - 5 s: late for TIGHT only
    late60 = imp(T0 - 60 * SECOND - 1, eid="e3")  # < T0 - 60 s: late for both
    events = [head, at_wm, late5, late60]
    assert ov.applied_events(events, TIGHT, 4) == [head, at_wm]
    assert ov.applied_events(events, LOOSE, 4) == [head, at_wm, late5]


def test_watermark_moves_with_events_the_view_does_not_apply() -> None:
    anon = imp(T0, user=None, eid=_same_partition("u1"))  # same partition, no user_id
    behind = imp(T0 - 10 * SECOND, eid="e1")  # 10 s behind the partition's max
    clk = click(T0 - 10 * SECOND, eid="k1")  # the clicks topic has its own watermark
    events = [anon, behind, clk]
    assert ov.applied_events(events, TIGHT, 4) == [clk]  # anon not applied, yet moved it
    assert ov.applied_events(events, LOOSE, 4) == [anon, behind]  # 10 s < 60 s; no clicks


def test_views_apply_only_their_sources_and_non_null_keys() -> None:
    spec = ov.View("pub", "publisher_id", (CLK,),
                   (ov.feature("c", "count", CLK, None, ov.sliding(HOUR, MINUTE)),))
    events = [imp(T0 - MINUTE, 1.0), click(T0 - MINUTE), click(T0 - 2 * MINUTE, user=None),
              {**click(T0 - 3 * MINUTE, eid="k-nopub"), "publisher_id": None}]
    applied = ov.applied_events(events, spec, 4)
    assert applied == events[1:3]  # the impression and the null publisher are not applied
    assert ov.ViewOracle(spec, events).features_as_of("p1", T0) == {"c": 2}


# ----------------------------------------------------------------------- specs
def test_spec_checks() -> None:
    with pytest.raises(AssertionError):
        ov.Measure("count", IMP, "bid_cpm")  # count takes no field
    with pytest.raises(AssertionError):
        ov.Measure("sum", IMP)  # sum needs one
    with pytest.raises(AssertionError):
        ov.Measure("median", IMP, "bid_cpm")
    with pytest.raises(AssertionError):
        ov.sliding(HOUR, 7 * MINUTE)  # 7 min does not divide 1h
    with pytest.raises(AssertionError):
        ov.View("v", "ad_id", (IMP,), (ov.feature("n", "count", CLK, None, ov.LIFETIME),))
    with pytest.raises(AssertionError):
        ov.View("v", "ad_id", (IMP,), (ov.feature("n", "count", IMP, None, ov.LIFETIME),) * 2)


def test_oracle_imports_no_project_package() -> None:
    path = Path(ov.__file__)
    allowed = set(sys.stdlib_module_names) | {"xxhash", "tests"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, name
            assert not name.startswith("tests.") or name == "tests.oracle", name


def test_user_views_specs_match_their_definitions() -> None:
    from feature_defs.validate import validate_views
    from tests import user_views

    assert validate_views(user_views.ALL_VIEWS) == []
    assert len(user_views.ALL_SPECS) == len(user_views.ALL_VIEWS) == 7
    for view, spec in zip(user_views.ALL_VIEWS, user_views.ALL_SPECS, strict=True):
        assert view.name == spec.name
        assert view.entity.key == spec.key
        assert sorted(s.kind for s in view.sources) == sorted(spec.sources)
        assert view.feature_names() == spec.names
        assert view.ttl.total_seconds() * 1000 == spec.effective_ttl_ms
        assert view.allowed_lateness.total_seconds() * 1000 == spec.lateness_ms
        # an undeclared default is null in the definitions: the specs declare every one
        declared = dict(zip(view.feature_names(),
                            [f.default for f in view.features for _ in f.windows], strict=True))
        assert declared == spec.defaults(), view.name


def test_user_views_oracle_on_a_small_stream() -> None:
    from tests import user_views

    pub, ads, users = user_views.SPECS
    events = [
        imp(T0 - 2 * HOUR, 3.0, ad="a1", eid="i1", publisher="p1", user="u1"),
        imp(T0 - 10 * MINUTE, 5.0, ad="a1", eid="i2", publisher="p2", user="u1"),
        click(T0 - 9 * MINUTE, ad="a1", eid="k1", user="u1"),
        imp(T0 + 5 * MINUTE, 1.0, ad="a1", eid="i3", publisher="p1", user="u1"),
    ]
    t = T0 + 6 * MINUTE
    assert ov.ViewOracle(pub, events).features_as_of("p1", t) == {
        "publisher__clicks_1h": 1, "publisher__clicks_24h": 1}  # k1 (clicks carry p1)
    assert ov.ViewOracle(pub, events).is_default("p2", t)  # p2 has impressions only
    f = ov.ViewOracle(ads, events).features_as_of("a1", t)
    assert f["ad__imps_1h"] == 1 and f["ad__bid_last_1h"] == 1.0  # hour from T0: i3
    assert f["ad__imps_lifetime"] == 3 and f["ad__bid_sum_lifetime"] == 9.0  # 3 + 5 + 1
    assert f["ad__bid_mean_lifetime"] == 3.0 and f["ad__bid_last_lifetime"] == 1.0
    assert f["ad__spend_per_imp_1h"] == 1.0  # 1.0 / 1
    g = ov.ViewOracle(users, events).features_as_of("u1", t)
    assert g == {
        "user__spend_1h": 6.0,  # 5 + 1 (i1 is 2h old)
        "user__last_bid_24h": 1.0,  # i3
        "user__publishers_24h": 2,  # p1, p2
        "user__clicks_10m": 0,  # 1 min tiles from t//1m - 9 = T0-3m: k1 (T0-9m) is out
        "user__click_rate_24h": 1 / 3,  # the day from 00:00: 1 click / 3 impressions
    }


# ----------------------------------------------------------------------- the shipped set
def test_generic_oracle_reproduces_the_standard_oracle() -> None:
    stream = adversarial.generate(small=True, seed=5)
    acc, _ = oracle.accepted_events(stream.events, stream.partitions)
    probes = adversarial.probe_points(oracle.OracleIndex(acc), 150, seed=2)
    by_entity = {v.key: ov.ViewOracle(v, ov.applied_events(stream.events, v, stream.partitions))
                 for v in ov.STANDARD_VIEWS}
    for entity, eid, t in probes:
        o = by_entity[oracle.ENTITY_KEYS[entity]]
        assert o.features_as_of(eid, t) == oracle.features_as_of(acc, entity, eid, t)
        assert o.is_default(eid, t) == oracle.is_default(acc, entity, eid, t)
