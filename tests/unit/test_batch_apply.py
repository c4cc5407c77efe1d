"""apply_batch must leave exactly the state that per-event ViewState.apply leaves."""

from __future__ import annotations

import random
from datetime import timedelta

import numpy as np
import pytest

from feature_defs.batch import apply_batch
from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.plan import compile_view
from feature_defs.registry import load_registry
from feature_defs.state import ViewState, fence_key, fence_pos
from feature_defs.windows import lifetime, sliding, tumbling

S, M, H = timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1)
SOURCES = (Source("impressions", "impression"), Source("clicks", "click"))
ALL_OPS = FeatureView(
    name="all_ops", entity=Entity("user", "user_id"), sources=SOURCES,
    features=(
        Feature("n", (sliding(5 * M, 5 * S), tumbling(H), lifetime()),
                measure=Measure(AggOp.COUNT, "impressions"), default=0),
        Feature("bid_sum", (sliding(H, M),), measure=Measure(AggOp.SUM, "impressions", "bid_cpm")),
        Feature("bid_mean", (sliding(H, M),),
                measure=Measure(AggOp.MEAN, "impressions", "bid_cpm")),
        Feature("bid_min", (sliding(H, M),), measure=Measure(AggOp.MIN, "impressions", "bid_cpm")),
        Feature("bid_max", (lifetime(),), measure=Measure(AggOp.MAX, "impressions", "bid_cpm")),
        Feature("bid_last", (sliding(H, M),),
                measure=Measure(AggOp.LAST, "impressions", "bid_cpm")),
        Feature("ads", (sliding(H, M),),
                measure=Measure(AggOp.APPROX_DISTINCT, "impressions", "ad_id"), default=0),
        Feature("ctr", (sliding(5 * M, 5 * S),),
                ratio=(Measure(AggOp.COUNT, "clicks"), Measure(AggOp.COUNT, "impressions"))),
    ),
)


def _events(rng: random.Random, n: int, users: int, t0: int) -> list[dict]:
    out = []
    t = t0
    for i in range(n):
        t += rng.choice([0, 0, 1, 700, 5000, 61_000, 3_600_000 // 7])
        ts = t - rng.choice([0, 0, 0, 1, 4999, 30_000, 59_000])
        out.append({"source": rng.choice(["impressions", "impressions", "clicks"]),
                    "user": f"u{rng.randrange(users)}", "ts": ts,
                    "ad_id": f"a{rng.randrange(40)}", "bid_cpm": rng.choice([0.5, 1.0, 2.25, None]),
                    "tb": rng.randrange(1 << 30), "part": rng.randrange(2), "off": i})
    return out


def _sequential(plan, events) -> dict[str, ViewState]:
    states: dict[str, ViewState] = {}
    for ev in events:
        st = states.setdefault(ev["user"], ViewState(plan))
        st.apply(ev["source"], ev["ts"], ev, tiebreak=ev["tb"],
                 fkey=fence_key(["impressions", "clicks"].index(ev["source"]), ev["part"]),
                 pos=fence_pos(ev["off"], 0))
    return states


def entity_codes(ids: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct ids in first-seen order, per row the index of its id among them)."""
    code: dict[str, int] = {}
    codes = np.array([code.setdefault(i, len(code)) for i in ids], dtype=np.int64)
    return list(code), codes


def _batched(plan, events, batch: int, states=None) -> dict[str, ViewState]:
    states = {} if states is None else states
    for k in range(0, len(events), batch):
        chunk = events[k:k + batch]
        for ev in chunk:
            states.setdefault(ev["user"], ViewState(plan))
        keys, codes = entity_codes([ev["user"] for ev in chunk])
        apply_batch(
            plan, [states[k] for k in keys], codes,
            np.array([ev["ts"] for ev in chunk], dtype=np.int64),
            [ev["source"] for ev in chunk],
            np.array([fence_key(["impressions", "clicks"].index(ev["source"]), ev["part"])
                      for ev in chunk]),
            np.array([fence_pos(ev["off"], 0) for ev in chunk]),
            {"ad_id": [ev["ad_id"] for ev in chunk], "bid_cpm": [ev["bid_cpm"] for ev in chunk]},
            [ev["tb"] for ev in chunk],
        )
    return states


def _snapshot(st: ViewState) -> tuple:
    st.compact()
    return (st.max_ts, st.prev_ts, st.pending, st.rings, st.fences)


def _same(a: dict[str, ViewState], b: dict[str, ViewState]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        sa, sb = _snapshot(a[k]), _snapshot(b[k])
        assert sa[:2] == sb[:2], k
        # float sums may differ in the last bit between merge orders
        assert repr(sa[2:]) == repr(sb[2:]) or _close(sa[2:], sb[2:]), k
        t = a[k].max_ts
        for as_of in (t, t + 1, t + 61_000, t + 3_600_000):
            va, vb = a[k].rollup(as_of), b[k].rollup(as_of)
            assert va[1] == vb[1]
            for name in va[0]:
                x, y = va[0][name], vb[0][name]
                close = isinstance(x, float) and abs(x - y) <= 1e-9 * max(1, abs(x))
                assert x == y or close, name


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("batch", [1, 7, 200])
def test_batch_equals_sequential_all_ops(seed: int, batch: int) -> None:
    plan = compile_view(ALL_OPS)
    events = _events(random.Random(seed), 600, users=9, t0=1_700_000_000_000)
    _same(_sequential(plan, events), _batched(plan, events, batch))


@pytest.mark.parametrize("seed", range(6))
def test_batch_equals_sequential_standard_user_view(seed: int) -> None:
    plan = load_registry().plans["user_activity@1"]
    events = _events(random.Random(100 + seed), 2000, users=25, t0=1_700_000_000_000)
    _same(_sequential(plan, events), _batched(plan, events, 333))


def test_replayed_rows_are_skipped_by_fences() -> None:
    plan = compile_view(ALL_OPS)
    events = _events(random.Random(5), 300, users=4, t0=1_700_000_000_000)
    once = _batched(plan, events, 50)
    # a crash replays a suffix (positions already applied) in different batch boundaries
    twice = _batched(plan, events[:180], 64)
    twice = _batched(plan, events[120:], 31, states=twice)
    _same(once, twice)
