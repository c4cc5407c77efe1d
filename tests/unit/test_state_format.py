"""The stored state format (``feature_defs.state_codec``, format 3) and reading 1 and 2.

* The packed ring layout: a :class:`Ring` keeps tiles ascending with COUNT prefix sums
  (int64 arrays), checked against a plain ``{tile: count}`` model.
* Format 3 round trips random states of every operator (nulls, empty and lifetime rings,
  negative times, full sketches) to equal states, identical bytes and equal answers; a
  tiny state's bytes equal bytes computed by hand from the documented layout.
* Malformed bytes are refused with :class:`StateFormatError`, one case per check, and
  random corruption never escapes as another exception.
* States stored by earlier releases (format 1: ``{tile: cells}`` dicts; format 2: the
  marshal tuple, built here by hand and as a literal written by the previous release)
  read back exactly and are rewritten as format 3.
"""

from __future__ import annotations

import marshal
import random
import struct
from bisect import bisect_left
from datetime import timedelta
from typing import Any

import pytest

from feature_defs.model import AggOp, Feature, FeatureView, Measure, Source
from feature_defs.plan import RingPlan, ViewPlan, compile_view
from feature_defs.registry import load_registry
from feature_defs.standard import AD, USER
from feature_defs.state import (
    NO_TS,
    Ring,
    ViewState,
    decode_fields,
    fence_key,
    fence_pos,
    set_fence,
)
from feature_defs.state_codec import MAGIC, codec_for
from feature_defs.windows import lifetime, sliding, tumbling
from headrace.core.errors import InputError, StateFormatError
from serving.rollup import RollupProgram

REG = load_registry()
T0 = 1_709_553_600_000
DAY = 86_400_000
_M, _H = timedelta(minutes=1), timedelta(hours=1)
IMPS = Source("impressions", "impression")
CLICKS = Source("clicks", "click")


def _bid(name: str, op: AggOp, windows: tuple) -> Feature:
    return Feature(name, windows, measure=Measure(op, "impressions", "bid_cpm"))


#: every operator over a sliding, a tumbling and a lifetime window
ALL_OPS = compile_view(FeatureView(
    name="all_ops", entity=AD, sources=(IMPS, CLICKS),
    features=(
        Feature("imps", (sliding(_H, _M), lifetime()),
                measure=Measure(AggOp.COUNT, "impressions"), default=0),
        Feature("clicks", (tumbling(_H),), measure=Measure(AggOp.COUNT, "clicks"), default=0),
        _bid("bid_sum", AggOp.SUM, (sliding(_H, _M), tumbling(2 * _H), lifetime())),
        _bid("bid_mean", AggOp.MEAN, (sliding(_H, _M), lifetime())),
        _bid("bid_min", AggOp.MIN, (tumbling(_H), lifetime())),
        _bid("bid_max", AggOp.MAX, (sliding(_H, _M),)),
        _bid("bid_last", AggOp.LAST, (sliding(_H, _M), lifetime())),
        Feature("ads", (sliding(_H, _M), lifetime()),
                measure=Measure(AggOp.APPROX_DISTINCT, "impressions", "ad_id"), default=0),
    ),
))
#: one COUNT and one SUM over a lifetime window: small enough to write out by hand
TINY = compile_view(FeatureView(
    name="tiny", entity=USER, sources=(IMPS,),
    features=(Feature("n", (lifetime(),), measure=Measure(AggOp.COUNT, "impressions"),
                      default=0),
              _bid("spend", AggOp.SUM, (lifetime(),))),
))


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


# ---------------------------------------------------------------------- format 3
def _random_state(plan: ViewPlan, rng: random.Random, base: int | None = None) -> ViewState:
    """Events of both sources, some late, some without a bid (nulls), some fenced;
    ``base`` far below 0 gives negative times and tiles."""
    st = ViewState(plan)
    base = T0 if base is None else base
    span = rng.choice([0, 60_000, 3_600_000, 3 * DAY])
    n = rng.choice([0, 1, 2, rng.randrange(3, 400)])
    ads = rng.choice([3, 60, 2000])  # 2000: sketches with K hashes in a tile
    for i in range(n):
        ts = base - int(rng.random() ** 2 * span) + rng.randrange(-90_000, 1)
        ev = {"ad_id": f"a{rng.randrange(ads)}",
              "bid_cpm": rng.choice([None, 0.0, -0.0, rng.random() * 3, 1e300])}
        fk = fence_key(rng.randrange(2), rng.randrange(4)) if rng.random() < 0.5 else None
        st.apply(rng.choice(list(plan.feeds)), ts, ev, tiebreak=rng.randrange(3),
                 fkey=fk, pos=None if fk is None else i)
    st.compact()
    return st


def _same_state(a: ViewState, b: ViewState) -> None:
    assert (a.max_ts, a.prev_ts, a.pending, a.fences) == (b.max_ts, b.prev_ts, b.pending, b.fences)
    assert list(a.fences) == list(b.fences)
    assert a.rings == b.rings


@pytest.mark.parametrize("view_id", ["all_ops", *sorted(REG.plans)])
def test_format_3_round_trips_random_states(view_id: str) -> None:
    plan = ALL_OPS if view_id == "all_ops" else REG.plans[view_id]
    rng = random.Random(view_id)
    prog = RollupProgram(plan, range(len(plan.outputs)))
    for trial in range(60):
        base = rng.choice([T0, -T0, -7]) if trial % 3 == 0 else None
        st = _random_state(plan, rng, base)
        data = st.encode()
        assert data[:8] == MAGIC and len(data) % 8 == 0
        again = ViewState.decode(plan, data)
        assert again.encode() == data
        _same_state(again, st)  # (rebases the prefix sums of both: compare bytes first)
        fields = decode_fields(plan, data)
        assert fields[:3] + fields[4:] == (st.max_ts, st.prev_ts, st.pending, st.fences)
        for as_of in (st.max_ts, st.max_ts + 1, st.max_ts + rng.randrange(2 * DAY)):
            if st.max_ts == NO_TS:
                as_of = T0
            ref = st.rollup(as_of)
            assert again.rollup(as_of) == ref
            got, _fresh = prog.run_fields(*fields[:4], as_of)
            assert got == [ref[0][o.name] for o in plan.outputs]
            assert [type(v) for v in got] == [type(ref[0][o.name]) for o in plan.outputs]


def test_format_3_keeps_nulls_zeros_and_full_sketches() -> None:
    st = ViewState(ALL_OPS)
    assert ViewState.decode(ALL_OPS, st.encode()).pending == [None] * len(ALL_OPS.measures)
    for i in range(1500):  # one tile, > K distinct ads: its sketch holds K hashes
        st.apply("impressions", T0 - 1000, {"ad_id": f"a{i}", "bid_cpm": None})
    st.apply("impressions", T0, {"ad_id": "x", "bid_cpm": -0.0})
    st.apply("clicks", T0, {})
    again = ViewState.decode(ALL_OPS, st.encode())
    _same_state(again, st)
    slot = next(i for i, m in enumerate(ALL_OPS.measures) if m.op is AggOp.APPROX_DISTINCT)
    ri, j = ALL_OPS.others_at[slot][0]
    assert len(again.rings[ri].vals[j][-1]) == 512
    sum_slot = next(i for i, m in enumerate(ALL_OPS.measures) if m.op is AggOp.SUM)
    assert str(again.pending[sum_slot]) == "-0.0"  # the sign of a zero survives
    for ring in again.rings:  # bids were null below max_ts: no SUM state in any tile
        for j, s in enumerate(ALL_OPS.rings[again.rings.index(ring)].others):
            if s == sum_slot:
                assert ring.vals[j] == [None] * len(ring.tiles)


def test_tiny_state_bytes_match_the_documented_layout() -> None:
    st = ViewState(TINY)
    st.apply("impressions", -5000, {"bid_cpm": 2.5}, fkey=fence_key(0, 3), pos=fence_pos(7, 0))
    st.apply("impressions", 1000, {"bid_cpm": None}, fkey=fence_key(0, 3), pos=fence_pos(8, 1))
    want = MAGIC + struct.pack(
        "<16q" "3q" "2q" "d" "2q",
        1000, -5000,            # max_ts, prev_ts
        2, 1,                   # S = 2 slots, R = 1 ring
        0, 1,                   # op codes: COUNT, SUM
        0, 1, 1, 0, 1,          # ring 0: lifetime, 1 COUNT slot (0), 1 other slot (1)
        1,                      # F = 1 fence
        1,                      # n_0 = 1 tile
        1, 1,                   # pending slot 0: one entry, count 1
        0,                      # pending slot 1: null (no bid at max_ts)
        0, 0, 1,                # ints block: tile 0; COUNT prefix sums 0, 1
        0, 1,                   # SUM column: entry offsets 0, 1
        2.5,                    # ... its one entry
        fence_key(0, 3), fence_pos(8, 1),  # the fence pair
    )
    assert st.encode() == want
    assert ViewState.decode(TINY, want).rollup(1001)[0] == {"user__n_lifetime": 2,
                                                             "user__spend_lifetime": 2.5}


# ---------------------------------------------------------------------- malformed bytes
def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}q", data))


def _pack(words: list[int]) -> bytes:
    return struct.pack(f"<{len(words)}q", *words)


def _reject(plan: ViewPlan, data: bytes, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        decode_fields(plan, data)
    with pytest.raises(StateFormatError, match=match):
        ViewState.decode(plan, data)


def test_each_malformation_is_refused_with_a_typed_error() -> None:
    st = ViewState(TINY)
    st.apply("impressions", -5000, {"bid_cpm": 2.5}, fkey=fence_key(0, 3), pos=fence_pos(7, 0))
    st.apply("impressions", 1000, {"bid_cpm": 4.0}, fkey=fence_key(0, 3), pos=fence_pos(8, 1))
    good = st.encode()
    w = _words(good)
    # word positions: 12 F, 13 n_0, 14.. pending (m=1,1; m=1,4.0), 18.. ints, 21 offsets
    assert w[12:17] == [1, 1, 1, 1, 1] and w[21:23] == [0, 1] and len(w) == 26
    assert issubclass(StateFormatError, InputError) and issubclass(StateFormatError, ValueError)
    _reject(TINY, b"", "unknown format")
    _reject(TINY, b"\x07" + good[1:], "unknown format")
    _reject(TINY, good[:7] + b"X" + good[8:], "magic")
    _reject(TINY, good[:-3], "whole number of 8-byte words")
    _reject(TINY, good[:16], "truncated")
    _reject(TINY, good + bytes(8), "trailing bytes")
    _reject(TINY, ViewState(REG.plans["ad_activity@1"]).encode(), "layout of view tiny")
    _reject(TINY, _pack(w[:6] + [5] + w[7:]), "layout of view tiny")  # an op code
    _reject(TINY, _pack(w[:12] + [-1] + w[13:]), "truncated|trailing")  # F < 0
    _reject(TINY, _pack(w[:12] + [9] + w[13:]), "truncated")  # F overruns
    _reject(TINY, _pack(w[:13] + [-1] + w[14:]), "ring 0 has -1 tiles")
    _reject(TINY, _pack(w[:13] + [2] + w[14:]), "truncated|trailing|lifetime")
    _reject(TINY, _pack(w[:13] + [10**12] + w[14:]), "lifetime ring 0 has")
    _reject(TINY, _pack(w[:14] + [2] + w[15:]), "2 pending entries")
    _reject(TINY, _pack(w[:14] + [-4] + w[15:]), "pending entries")
    _reject(TINY, _pack(w[:21] + [1] + w[22:]), "column offsets")  # o[0] != 0
    _reject(TINY, _pack(w[:22] + [2] + w[23:]), "column offsets")  # 2 entries in 1 tile
    _reject(TINY, _pack(w[:22] + [10**15] + w[23:]), "column offsets")
    for cut in range(8, len(good), 8):  # every truncation at a word boundary
        with pytest.raises(StateFormatError):
            decode_fields(TINY, good[:cut])


def test_orders_are_checked_when_building_a_state() -> None:
    plan = ALL_OPS
    st = ViewState(plan)
    for i, ts in enumerate((T0 - 300_000, T0 - 200_000, T0 - 100_000, T0)):
        st.apply("impressions", ts, {"ad_id": f"a{i}", "bid_cpm": 1.0},
                 fkey=fence_key(i % 2, 0), pos=i)
    data = st.encode()
    fields = decode_fields(plan, data)
    ints, layout = fields[3][0], fields[3][3]
    ring = next(r for r, rp in enumerate(plan.rings) if rp.tile_ms == 60_000)
    off, n, cols = layout[ring]
    assert n == 3
    w = _words(data[8:])  # words from 1 on (the magic is not an int)
    swapped = list(w)
    swapped[off - 1], swapped[off] = w[off], w[off - 1]  # tiles 1, 0, 2
    with pytest.raises(StateFormatError, match="tiles not ascending"):
        ViewState.decode(plan, MAGIC + _pack(swapped))
    oa = cols[0][0]
    assert ints[oa: oa + n + 1].tolist() == [0, 1, 2, 3]
    dec = list(w)
    dec[oa - 1 + 1], dec[oa - 1 + 2] = 2, 1  # offsets 0, 2, 1, 3
    with pytest.raises(StateFormatError, match="column offsets out of order"):
        ViewState.decode(plan, MAGIC + _pack(dec))
    at = len(w) - 4  # fence pairs (0, 2), (65536, 3): swap them
    fen = w[:at] + w[at + 2:] + w[at: at + 2]
    with pytest.raises(StateFormatError, match="fence keys"):
        ViewState.decode(plan, MAGIC + _pack(fen))


@pytest.mark.parametrize("view_id", ["all_ops", "user_activity@1"])
def test_random_corruption_raises_only_the_typed_error(view_id: str) -> None:
    """Flipped bytes, spliced or cut states: decoding raises StateFormatError or gives a
    state; rolling a structurally valid state up never raises."""
    plan = ALL_OPS if view_id == "all_ops" else REG.plans[view_id]
    rng = random.Random(view_id)
    prog = RollupProgram(plan, range(len(plan.outputs)))
    for _ in range(150):
        data = bytearray(_random_state(plan, rng).encode())
        for _flip in range(rng.randrange(1, 4)):
            at = rng.randrange(8, len(data))
            data[at] = rng.choice([0, 0xFF, rng.randrange(256)])
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data) + 1)]
        blob = bytes(data)
        try:
            fields = decode_fields(plan, blob)
        except StateFormatError:
            continue
        max_ts = fields[0]
        prog.run_fields(*fields[:4], max(max_ts, T0) + 1)
        try:
            ViewState.decode(plan, blob)
        except StateFormatError:
            pass


# ---------------------------------------------------------------------- formats 1 and 2
def _v1_bytes(st: ViewState) -> bytes:
    """``st`` as an old release stored it: format 1, ``{tile: cells}`` per ring."""
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


def _v2_fields(st: ViewState) -> list[Any]:
    ints = b"".join(a.tobytes() for r in st.rings for a in (r.tiles, *r.cums))  # LE host
    return [st.max_ts, st.prev_ts, st.pending, [len(r.tiles) for r in st.rings], ints,
            [r.vals for r in st.rings], st.fences]


def _v2_bytes(st: ViewState) -> bytes:
    """``st`` as the previous release stored it: format 2, marshal (version 2) of
    (max_ts, prev_ts, pending, tiles per ring, the int64 block, per-tile states, fences)."""
    return b"\x02" + marshal.dumps(tuple(_v2_fields(st)), 2)


#: written by the previous release (format 2) for user_activity@1: impressions of ad a1
#: at T0 - 1h (fence (0, 3) at 41/0) and of a2 at T0 (42/1), a click at T0 + 10 ((1, 3)
#: at 7/0)
V2_LITERAL = bytes.fromhex(
    "0228070000006c030000000a46ab1238066c030000000046ab1238065b030000004e69010000004e5b04"
    "000000690100000069010000006902000000690200000073d0000000c024611400000000000000000000"
    "000001000000000000000000000000000000000000000000000010c3b201000000000000000000000000"
    "010000000000000000000000000000000000000000000000ecfb1c0000000000f0fb1c00000000000000"
    "000000000000010000000000000002000000000000000000000000000000000000000000000000000000"
    "00000000fb3e070000000000fc3e0700000000000000000000000000010000000000000002000000000000"
    "000000000000000000000000000000000000000000000000005b040000005b000000005b000000005b01"
    "0000005b0200000028010000006c05000000906a0d62f2402a5f0f0028010000006c050000004b13fa14"
    "603265000a005b000000007b6903000000690100a0026903000100690000700030"
)


def test_a_format_2_literal_reads_back_and_is_rewritten_as_format_3() -> None:
    plan = REG.plans["user_activity@1"]
    st = ViewState(plan)
    st.apply("impressions", T0 - 3_600_000, {"ad_id": "a1"}, fkey=fence_key(0, 3),
             pos=fence_pos(41, 0))
    st.apply("impressions", T0, {"ad_id": "a2"}, fkey=fence_key(0, 3), pos=fence_pos(42, 1))
    st.apply("clicks", T0 + 10, {"ad_id": "a2"}, fkey=fence_key(1, 3), pos=fence_pos(7, 0))
    assert _v2_bytes(st) == V2_LITERAL  # the hand-built encoder is the old one
    old = ViewState.decode(plan, V2_LITERAL)
    _same_state(old, st)
    assert (old.max_ts, old.prev_ts, old.pending) == (T0 + 10, T0, [None, 1, None])
    assert old.fences == {3: fence_pos(42, 1), 65539: fence_pos(7, 0)}
    want = {"user__impressions_5m": 1, "user__impressions_1h": 1, "user__impressions_24h": 2,
            "user__impressions_7d": 2, "user__clicks_5m": 1, "user__clicks_1h": 1,
            "user__clicks_24h": 1, "user__clicks_7d": 1, "user__ctr_1h": 1.0,
            "user__ctr_24h": 0.5, "user__ctr_7d": 0.5, "user__distinct_ads_24h": 2}
    assert old.rollup(T0 + 11) == (want, False)
    prog = RollupProgram(plan, range(len(plan.outputs)))
    fields = decode_fields(plan, V2_LITERAL)
    assert dict(zip(prog.names, prog.run_fields(*fields[:4], T0 + 11)[0], strict=True)) == want
    # the next update stores it as format 3, with the same answers
    old.apply("impressions", T0 + 20, {"ad_id": "a3"}, fkey=fence_key(0, 3), pos=fence_pos(43, 0))
    new = old.encode()
    assert new[:8] == MAGIC
    assert ViewState.decode(plan, new).rollup(T0 + 21) == old.rollup(T0 + 21)


@pytest.mark.parametrize("view_id", ["all_ops", *sorted(REG.plans)])
@pytest.mark.parametrize("old_format", [1, 2])
def test_old_formats_read_back_exactly(view_id: str, old_format: int) -> None:
    plan = ALL_OPS if view_id == "all_ops" else REG.plans[view_id]
    rng = random.Random(f"{view_id}-{old_format}")
    prog = RollupProgram(plan, range(len(plan.outputs)))
    for _ in range(10):
        st = _random_state(plan, rng)
        st.fences = dict(sorted(st.fences.items()))
        old = (_v1_bytes if old_format == 1 else _v2_bytes)(st)
        again = ViewState.decode(plan, old)
        _same_state(again, st)  # an upgraded worker goes on from the same state
        assert again.encode() == st.encode()  # ... and stores it as format 3
        fields = decode_fields(plan, old)
        for as_of in (st.max_ts, st.max_ts + 1, st.max_ts + rng.randrange(8 * DAY)):
            if st.max_ts == NO_TS:
                as_of = T0
            assert again.rollup(as_of) == st.rollup(as_of)
            assert prog.run_fields(*fields[:4], as_of) == prog.run(st, as_of)


def test_corrupt_format_2_bytes_are_refused() -> None:
    plan = REG.plans["user_activity@1"]
    st = ViewState(plan)
    st.apply("impressions", T0, {"ad_id": "a1"})
    st.apply("clicks", T0 + 10, {"ad_id": "a1"})
    fields = _v2_fields(st)
    for i, bad_value in ((4, fields[4][:-8]),  # one int short
                         (3, [fields[3][0] + 1, *fields[3][1:]]),  # a ring one tile longer
                         (5, fields[5][:-1]),  # a ring's states missing
                         (2, fields[2][:-1]),  # a pending slot missing
                         (5, "not a list"),
                         (6, [1, 2])):  # fences of another type
        bad = b"\x02" + marshal.dumps(tuple(fields[:i] + [bad_value] + fields[i + 1:]))
        _reject(plan, bad, "malformed view state")
    _reject(plan, V2_LITERAL[:-5], "format 2")
    _reject(plan, b"\x02" + marshal.dumps((1, 2)), "format 2")
    _reject(plan, b"\x01garbage", "format 1")
    _reject(plan, b"\x01" + marshal.dumps((1, 2, [None] * 3, [{}, {}], {})), "format 1")


# ---------------------------------------------------------------------- canonical bytes
def test_bytes_do_not_depend_on_shared_objects() -> None:
    """Equal states encode to equal bytes whether a sketch object is shared (between
    tiles, or held by a cache) or not."""
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


def test_codec_is_cached_per_plan() -> None:
    plan = REG.plans["user_activity@1"]
    assert codec_for(plan) is codec_for(plan)
    other = compile_view(plan.view)  # an equal plan, another object
    assert codec_for(other).schema == codec_for(plan).schema


# ---------------------------------------------------------------------- fast paths
def _user_plans() -> list[ViewPlan]:
    from tests.user_views import VIEWS
    return [compile_view(v) for v in VIEWS]


@pytest.mark.parametrize("view_id", ["all_ops", "tiny", *sorted(REG.plans), "user_views"])
def test_randomized_states_of_every_operator_keep_their_bytes(view_id: str) -> None:
    """encode → decode → encode gives identical bytes (seeded random states of every
    operator, for the shipped, the user-defined and the all-operators views), and the
    generated decoder's tuple form equals its Ring form."""
    plans = {"all_ops": [ALL_OPS], "tiny": [TINY], "user_views": _user_plans()}.get(
        view_id) or [REG.plans[view_id]]
    rng = random.Random(f"bytes-{view_id}")
    for plan in plans:
        codec = codec_for(plan)
        for trial in range(40):
            base = rng.choice([T0, -T0, -7, None]) if trial % 4 == 0 else None
            st = _random_state(plan, rng, base)
            data = st.encode()
            again = ViewState.decode(plan, data)
            assert again.encode() == data
            assert ViewState.decode(plan, again.encode()).encode() == data
            max_ts, prev_ts, pending, rings, fences = codec.materialize(data)
            assert (max_ts, prev_ts, pending, fences) == (again.max_ts, again.prev_ts,
                                                          again.pending, again.fences)
            assert rings == [(r.tiles, r.cums, r.vals) for r in again.rings]
            for ring in again.rings:
                assert isinstance(ring.cums, tuple) and isinstance(ring.vals, list)
                assert all(isinstance(v, list) for v in ring.vals)


@pytest.mark.parametrize("view_id", ["all_ops", "tiny", *sorted(REG.plans), "user_views"])
def test_new_and_decoded_states_share_no_mutable_parts(view_id: str) -> None:
    """A new state equals one built ring by ring with ``Ring(ring_plan)``; new states
    (copied from per-view templates) and states decoded from the same bytes share no
    array or list: updating one leaves the others as they were."""
    plans = {"all_ops": [ALL_OPS], "tiny": [TINY], "user_views": _user_plans()}.get(
        view_id) or [REG.plans[view_id]]
    for plan in plans:
        a, b = ViewState(plan), ViewState(plan)
        assert a.rings == [Ring(rp) for rp in plan.rings]
        assert [type(r.cums) for r in a.rings] == [tuple] * len(plan.rings)
        empty = b.encode()
        for ts in (T0, T0 + 5, T0 - 3_600_000, T0 + 10):
            a.apply(next(iter(plan.feeds)), ts, {"ad_id": "a1", "bid_cpm": 2.0})
        assert b.encode() == empty == ViewState(plan).encode()
        data = a.encode()
        c, d = ViewState.decode(plan, data), ViewState.decode(plan, data)
        for ts in (T0 + 20, T0 - 60_000, T0 + 30):
            c.apply(next(iter(plan.feeds)), ts, {"ad_id": "a2", "bid_cpm": 1.0})
        for ring in c.rings:
            ring.evict_below(2**62)
        assert d.encode() == data == a.encode()
        parts = [id(x) for st in (a, b, c, d) for r in st.rings
                 for x in (r.tiles, r.vals, *r.cums, *r.vals)]
        assert len(parts) == len(set(parts))


def test_out_of_range_legacy_fields_are_refused_with_the_typed_error() -> None:
    """A format-2 (or 1) state whose times do not fit format 3's int64 words."""
    plan = REG.plans["user_activity@1"]
    st = ViewState(plan)
    st.apply("impressions", T0, {"ad_id": "a1"})
    fields = _v2_fields(st)
    for i, bad_value in ((0, 2**63), (1, -2**64)):
        bad = b"\x02" + marshal.dumps(tuple(fields[:i] + [bad_value] + fields[i + 1:]))
        _reject(plan, bad, "format 2")
    _reject(plan, b"\x01" + marshal.dumps((2**63, NO_TS, [None] * 3, [{}] * 4, {})),
            "format 1")
