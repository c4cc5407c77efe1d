"""serving.rollup.RollupProgram gives exactly ViewState.rollup's values (and types)."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.plan import ViewPlan, compile_view
from feature_defs.registry import load_registry
from feature_defs.state import ViewState, decode_fields
from feature_defs.windows import lifetime, sliding, tumbling
from headrace.core.errors import StateFormatError
from serving.rollup import Freshness, RollupProgram

T0 = 1_700_000_000_000
DAY = 86_400_000
REG = load_registry()


def _state(plan: ViewPlan, rng: random.Random, n: int, span_ms: int, ads: int = 50) -> ViewState:
    st = ViewState(plan)
    sources = list(plan.feeds)
    events = sorted((T0 - int(rng.random() ** 2 * span_ms), rng.choice(sources)) for _ in range(n))
    for i, (ts, source) in enumerate(events):
        jitter = rng.randrange(-90_000, 1) if rng.random() < 0.1 else 0  # some late events
        st.apply(source, ts + jitter, {"ad_id": f"a{rng.randrange(ads)}",
                                       "bid_cpm": rng.choice([None, rng.random() * 3])},
                 tiebreak=i)
    return ViewState.decode(plan, st.encode())  # what the server sees


def _as_ofs(st: ViewState, rng: random.Random) -> list[int]:
    base = st.max_ts
    return [base, base + 1, base + 4_999, base + 5_000, base + rng.randrange(3_600_000),
            (base // 900_000 + 1) * 900_000, base + rng.randrange(8 * DAY),
            base + 7 * DAY, base + 8 * DAY - 1, base + 8 * DAY, base + 30 * DAY]


def _check(plan: ViewPlan, st: ViewState, as_of: int, outputs: list[int] | None = None) -> None:
    idx = list(range(len(plan.outputs))) if outputs is None else outputs
    ref, is_default = st.rollup(as_of)
    want = [ref[plan.outputs[i].name] for i in idx]
    got, fresh = RollupProgram(plan, idx).run(st, as_of)
    assert got == want, (as_of, st.max_ts)
    assert [type(v) for v in got] == [type(v) for v in want]
    assert (fresh is not Freshness.OK) == is_default


@pytest.mark.parametrize("view_id", sorted(REG.plans))
def test_equals_viewstate_rollup_for_standard_views(view_id: str) -> None:
    plan = REG.plans[view_id]
    rng = random.Random(view_id)
    for trial in range(40):
        st = _state(plan, rng, rng.randrange(1, 300), rng.choice([300_000, DAY, 9 * DAY]))
        for as_of in _as_ofs(st, rng):
            _check(plan, st, as_of)
        if trial % 5 == 0:  # subsets in any order
            subset = rng.sample(range(len(plan.outputs)), rng.randrange(len(plan.outputs)) + 1)
            _check(plan, st, st.max_ts + rng.randrange(DAY), subset)


def test_distinct_beyond_the_sketch_size() -> None:
    plan = REG.plans["user_activity@1"]
    st = _state(plan, random.Random(1), 3000, 20 * 3_600_000, ads=5000)
    assert st.rollup(st.max_ts + 1)[0]["user__distinct_ads_24h"] > 512
    for as_of in _as_ofs(st, random.Random(2)):
        _check(plan, st, as_of)


def test_order_sensitive_operators_are_exact() -> None:
    e = Entity("thing", "user_id")
    m = {op: Measure(op, "impressions", "bid_cpm") for op in
         (AggOp.SUM, AggOp.MEAN, AggOp.MIN, AggOp.MAX, AggOp.LAST)}
    windows = (sliding(timedelta(hours=1), timedelta(minutes=1)), tumbling(timedelta(hours=6)),
               lifetime())
    view = FeatureView(
        name="bids", entity=e, sources=(Source("impressions", "impression"),),
        features=tuple(Feature(op.value, windows, measure=mm) for op, mm in m.items())
        + (Feature("ratio", windows, ratio=(m[AggOp.SUM], Measure(AggOp.COUNT, "impressions"))),),
        online_ttl=timedelta(days=3),
    )
    plan = compile_view(view)
    rng = random.Random(3)
    for _ in range(30):
        st = _state(plan, rng, rng.randrange(1, 200), rng.choice([600_000, DAY, 5 * DAY]))
        for as_of in _as_ofs(st, rng):
            _check(plan, st, as_of)


def test_freshness_and_errors() -> None:
    plan = REG.plans["ad_activity@1"]
    prog = RollupProgram(plan, range(len(plan.outputs)))
    assert prog.run(None, T0) == (list(prog.defaults), Freshness.NO_DATA)
    st = ViewState(plan)
    st.apply("impressions", T0)
    assert prog.freshness(st, T0) is Freshness.NO_DATA  # only events at T itself
    assert prog.freshness(st, T0 + 1) is Freshness.OK
    assert prog.freshness(st, T0 + plan.ttl_ms - 1) is Freshness.OK
    stale: tuple[list[Any], Freshness] = prog.run(st, T0 + plan.ttl_ms)
    assert stale == (list(prog.defaults), Freshness.STALE)
    with pytest.raises(ValueError):
        prog.run(st, T0 - 1)


@pytest.mark.parametrize("view_id", sorted(REG.plans))
def test_validity_interval_is_exact(view_id: str) -> None:
    plan = REG.plans[view_id]
    prog = RollupProgram(plan, range(len(plan.outputs)))
    rng = random.Random(f"v{view_id}")
    for _ in range(30):
        st = _state(plan, rng, rng.randrange(1, 200), rng.choice([300_000, DAY, 9 * DAY]))
        for as_of in _as_ofs(st, rng):
            vals, fresh = prog.run(st, as_of)
            bounds = prog.validity(st, as_of, fresh)
            if as_of <= st.max_ts:
                assert bounds is None
                continue
            assert bounds is not None
            lo, hi = bounds
            assert lo <= as_of < hi
            for probe in {lo, as_of, min(hi - 1, lo + 10 * DAY)}:
                assert prog.run(st, probe) == (vals, fresh), (lo, hi, probe)
            if hi < 2**62:  # just outside, something changes (window, freshness or pending)
                assert prog.validity(st, hi, prog.run(st, hi)[1]) != bounds


@pytest.mark.parametrize("view_id", sorted(REG.plans))
def test_read_path_on_encoded_fields_equals_viewstate_rollup(view_id: str) -> None:
    """What the reader runs (decode_fields + run_fields, no ViewState) is exact too."""
    plan = REG.plans[view_id]
    rng = random.Random(f"f{view_id}")
    n_out = len(plan.outputs)
    for trial in range(20):
        st = _state(plan, rng, rng.randrange(1, 300), rng.choice([300_000, DAY, 9 * DAY]))
        fields = decode_fields(plan, st.encode())
        # any subset in any order, repeats included: picks, shared sums, ratios
        idx = [rng.randrange(n_out) for _ in range(rng.randrange(1, 2 * n_out))]
        if trial == 0:
            idx = [n_out - 1]  # a single output
        prog = RollupProgram(plan, idx)
        for as_of in _as_ofs(st, rng):
            ref, is_default = st.rollup(as_of)
            want = [ref[plan.outputs[i].name] for i in idx]
            got, fresh = prog.run_fields(*fields[:4], as_of)
            assert got == want, (as_of, idx)
            assert [type(v) for v in got] == [type(v) for v in want]
            assert (fresh is not Freshness.OK) == is_default
            assert (got, fresh) == prog.run(st, as_of)
            assert prog.validity_at(st.max_ts, as_of, fresh) == prog.validity(st, as_of, fresh)


def test_decode_fields_checks_like_decode() -> None:
    plan = REG.plans["user_activity@1"]
    st = _state(plan, random.Random(5), 50, DAY)
    data = st.encode()
    fields = decode_fields(plan, data)
    again = ViewState.decode(plan, data)
    assert fields[:3] + fields[4:] == (again.max_ts, again.prev_ts, again.pending, again.fences)

    def plain(rings):  # int64 / float64 / uint64 memoryviews as lists
        return [None if v is None else list(v) for v in rings[:3]], \
            [(off, n, list(cols)) for off, n, cols in rings[3]]

    assert plain(fields[3]) == plain(again.ring_fields())
    for bad in (b"", b"\x7fgarbage", ViewState(REG.plans["ad_activity@1"]).encode()):
        with pytest.raises(StateFormatError):
            decode_fields(plan, bad)
    with pytest.raises(StateFormatError):
        decode_fields(plan, data[:-3])  # truncated
