"""The packed ring layout of ``feature_defs.state`` (format 2) and reading format 1.

A :class:`Ring` keeps tiles ascending with COUNT prefix sums (int64 arrays). These
cases drive rings with inserts in any order, late adds and evictions, and compare every
window sum with a plain ``{tile: count}`` model; and they check that states stored by the
previous release (format 1: ``{tile: cells}`` dicts) read back to the same answers.
"""

from __future__ import annotations

import marshal
import random
from bisect import bisect_left

import pytest

from feature_defs.plan import RingPlan
from feature_defs.registry import load_registry
from feature_defs.state import Ring, ViewState, decode_fields, set_fence
from serving.rollup import RollupProgram

REG = load_registry()
T0 = 1_709_553_600_000


def _window_sum(ring: Ring, k: int, low: int) -> int:
    cum = ring.cums[k]
    return cum[-1] - cum[bisect_left(ring.tiles, low)]


@pytest.mark.parametrize("seed", range(6))
def test_ring_sums_match_a_dict_model(seed: int) -> None:
    rng = random.Random(seed)
    plan = RingPlan(tile_ms=1000, keep=50, slots=(0, 1, 2), counts=(0, 2), others=(1,))
    ring = Ring(plan)
    model: list[dict[int, int]] = [{}, {}]
    other: dict[int, float] = {}
    for step in range(600):
        r = rng.random()
        tile = rng.randrange(0, 80) if r < 0.3 else 40 + step // 10  # late / in order
        if r < 0.45:
            k = rng.randrange(2)
            cnt = rng.randrange(1, 4)
            ring.add_count(k, tile, cnt)
            model[k][tile] = model[k].get(tile, 0) + cnt
        elif r < 0.55:
            ring.merge(0, tile, 1.5, max)
            other[tile] = 1.5
        elif r < 0.6:
            low = rng.randrange(0, 60)
            ring.evict_below(low)
            for m in (*model, other):
                for t in [t for t in m if t < low]:
                    del m[t]
        elif r < 0.65:
            ring.normalize()
            assert all(c[0] == 0 for c in ring.cums)
        tiles = list(ring.tiles)
        assert tiles == sorted(set(model[0]) | set(model[1]) | set(other) | set(tiles))
        assert tiles == sorted(set(tiles))
        for low in (0, rng.randrange(0, 120), 10**9):
            for k in range(2):
                want = sum(c for t, c in model[k].items() if t >= low)
                assert _window_sum(ring, k, low) == want
        assert [v for v in ring.vals[0] if v is not None] == [other[t] for t in sorted(other)]


def _v1_bytes(st: ViewState) -> bytes:
    """``st`` as the previous release stored it: format 1, ``{tile: cells}`` per ring."""
    plan = st.plan
    rings = []
    for rp, ring in zip(plan.rings, st.rings, strict=True):
        cells_by_tile = {}
        for i, tile in enumerate(ring.tiles):
            cells = [None] * len(plan.measures)
            for k, slot in enumerate(rp.counts):
                cnt = ring.cums[k][i + 1] - ring.cums[k][i]
                cells[slot] = cnt or None
            for j, slot in enumerate(rp.others):
                cells[slot] = ring.vals[j][i]
            cells_by_tile[tile] = cells
        rings.append(cells_by_tile)
    return b"\x01" + marshal.dumps((st.max_ts, st.prev_ts, st.pending, rings, st.fences))


@pytest.mark.parametrize("view_id", sorted(REG.plans))
def test_format_1_states_read_back_exactly(view_id: str) -> None:
    plan = REG.plans[view_id]
    rng = random.Random(view_id)
    prog = RollupProgram(plan, range(len(plan.outputs)))
    for _ in range(10):
        st = ViewState(plan)
        for i in range(rng.randrange(1, 300)):
            ts = T0 - int(rng.random() ** 2 * 9 * 86_400_000) + rng.randrange(-90_000, 1)
            st.apply(rng.choice(["impressions", "clicks"]), ts, {"ad_id": f"a{rng.randrange(40)}"},
                     tiebreak=i)
        st.compact()
        old = _v1_bytes(st)
        again = ViewState.decode(plan, old)
        assert again.rings == st.rings  # an upgraded worker goes on from the same state
        assert (again.max_ts, again.prev_ts, again.pending, again.fences) == \
            (st.max_ts, st.prev_ts, st.pending, st.fences)
        fields = decode_fields(plan, old)
        for as_of in (st.max_ts, st.max_ts + 1, st.max_ts + rng.randrange(8 * 86_400_000)):
            assert again.rollup(as_of) == st.rollup(as_of)
            assert prog.run_fields(*fields[:4], as_of) == prog.run(st, as_of)


def test_corrupt_ring_bytes_are_refused() -> None:
    plan = REG.plans["user_activity@1"]
    st = ViewState(plan)
    st.apply("impressions", T0, {"ad_id": "a1"})
    st.apply("clicks", T0 + 10, {"ad_id": "a1"})
    fields = list(marshal.loads(st.encode()[1:]))
    for i, bad_value in ((4, fields[4][:-8]),  # one int short
                         (3, [fields[3][0] + 1, *fields[3][1:]]),  # a ring one tile longer
                         (5, fields[5][:-1])):  # a ring's states missing
        bad = b"\x02" + marshal.dumps(tuple(fields[:i] + [bad_value] + fields[i + 1:]))
        with pytest.raises(ValueError):
            decode_fields(plan, bad)
        with pytest.raises(ValueError):
            ViewState.decode(plan, bad)


def test_bytes_do_not_depend_on_shared_objects() -> None:
    """Equal states encode to equal bytes whether a sketch object is shared (between
    tiles, or held by a cache) or not: marshal's back-references depend on refcounts."""
    plan = next(p for p in REG.plans.values() if p.view.entity.name == "user")
    shared = (12345, 67890)
    states = []
    for share in (False, True):
        st = ViewState(plan)
        for k in range(3):
            st.apply("impressions", T0 + k * 900_000, {"ad_id": f"a{k}"})
        for ring in st.rings:
            for vals in ring.vals:
                for i in range(len(vals)):
                    vals[i] = shared if share else tuple([12345, 67890])
        states.append(st)
    assert sum(len(v) for r in states[1].rings for v in r.vals) >= 2  # shared in 2 tiles
    assert states[0].encode() == states[1].encode()


def test_fences_keep_their_keys_in_order() -> None:
    """Fence keys stay ascending whatever order sources first reach an entity, so equal
    states from differently ordered batches have equal bytes."""
    fences: dict[int, int] = {}
    for key, pos in [(70, 1), (3, 5), (65536, 2), (3, 9), (4, 1), (70, 4)]:
        set_fence(fences, key, pos)
    assert list(fences.items()) == [(3, 9), (4, 1), (70, 4), (65536, 2)]
    plan = next(p for p in REG.plans.values() if p.view.entity.name == "user")
    a, b = ViewState(plan), ViewState(plan)
    a.apply("impressions", T0, fkey=7, pos=1)
    a.apply("clicks", T0 + 1, fkey=65536 | 2, pos=1)
    b.apply("clicks", T0 + 1, fkey=65536 | 2, pos=1)
    b.apply("impressions", T0, fkey=7, pos=1)
    assert a.encode() == b.encode()
