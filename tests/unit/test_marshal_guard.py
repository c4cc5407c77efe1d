"""The structural check of legacy (format 1 and 2) state bytes before ``marshal.loads``:
every legacy state our releases wrote passes, and element counts that the bytes cannot
hold are refused with the typed error before anything is allocated (they made
``marshal.loads`` raise ``MemoryError``: a worker crash on the entity's next event)."""

from __future__ import annotations

import marshal
import random
import struct
import tracemalloc

import pytest

from feature_defs.marshal_guard import MAX_DEPTH, check_marshal
from feature_defs.registry import load_registry
from feature_defs.state import ViewState, decode_fields
from headrace.core.errors import StateFormatError
from tests.unit.test_state_format import (
    ALL_OPS,
    T0,
    TINY,
    V2_LITERAL,
    _random_state,
    _user_plans,
    _v1_bytes,
    _v2_bytes,
)

REG = load_registry()
PLANS = [ALL_OPS, TINY, *REG.plans.values(), *_user_plans()]
I32 = struct.Struct("<i").pack


def _values(rng: random.Random, depth: int = 0) -> object:
    """A random marshallable value of the kinds a stored state (and more) holds."""
    kinds = ["int", "big", "neg", "float", "none", "bool", "bytes", "str"]
    if depth < 4:
        kinds += ["tuple", "list", "dict", "set", "frozenset"] * 2
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randrange(-2**31, 2**31)
    if kind == "big":
        return rng.randrange(2**62, 2**70)
    if kind == "neg":
        return -rng.randrange(2**40, 2**64)
    if kind == "float":
        return rng.choice([rng.random(), float("inf"), -0.0, 1e300])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    if kind == "str":
        return rng.choice(["", "a1", "ünïcode", "x" * 300])
    big = depth == 3 and rng.random() < 0.3  # over 255 items (of scalars): 4-byte counts
    n = rng.randrange(250, 270) if big else rng.randrange(0, 6)
    items = [_values(rng, depth + 1) for _ in range(n)]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    hashable = [v for v in items if isinstance(v, (int, float, str, bytes, type(None)))]
    if kind == "dict":
        return {k: _values(rng, depth + 1) for k in hashable}
    return set(hashable) if kind == "set" else frozenset(hashable)


def test_every_legacy_state_passes_and_reads_back() -> None:
    rng = random.Random("legacy-guard")
    blobs = [V2_LITERAL]
    for plan in PLANS:
        for _ in range(15):
            st = _random_state(plan, rng)
            blobs += [_v1_bytes(st), _v2_bytes(st)]
            for blob in blobs[-2:]:
                check_marshal(blob)
                again = ViewState.decode(plan, blob)  # format 1: rebuilt, another base
                as_of = max(st.max_ts, T0)
                assert again.rollup(as_of) == st.rollup(as_of)
            assert ViewState.decode(plan, blobs[-1]).encode() == st.encode()  # format 2
    assert len(blobs) == 1 + 2 * 15 * len(PLANS)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_the_check_accepts_what_marshal_writes(version: int) -> None:
    """Values of every kind, with shared objects (back references from version 3 on),
    long and short strings and tuples, big and negative ints."""
    rng = random.Random(f"guard-{version}")
    for _ in range(300):
        value = _values(rng)
        shared = [value, value, (value,)]  # the same object thrice: refs in version 3+
        for v in (value, shared):
            data = b"\x02" + marshal.dumps(v, version)
            check_marshal(data)
            assert marshal.loads(data[1:]) == v


@pytest.mark.parametrize("code", [b"(", b"[", b"<", b">", b"s", b"u", b"a", b"l"])
@pytest.mark.parametrize("count", [2**31 - 1, 50_000_000, 1000])
def test_a_count_beyond_the_bytes_is_refused_before_any_allocation(code: bytes,
                                                                   count: int) -> None:
    plan = REG.plans["user_activity@1"]
    for fmt in (1, 2):
        # a state tuple whose first field claims ``count`` items, followed by 64 bytes
        data = bytes([fmt]) + b"(" + I32(7) + code + I32(count) + b"N" * 64
        tracemalloc.start()
        try:
            for read in (ViewState.decode, decode_fields):
                with pytest.raises(StateFormatError, match=f"format {fmt}.*exceeds"):
                    read(plan, data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def test_negative_counts_depth_and_foreign_codes_are_refused() -> None:
    plan = REG.plans["ad_activity@1"]
    code_object = marshal.dumps(compile("1", "<x>", "eval"))
    cases = [
        (b"\x02[" + I32(-1), "negative length"),
        (b"\x02" + (b"[" + I32(1)) * (MAX_DEPTH + 1) + b"N", "deeper"),
        (b"\x02" + code_object, "type code 'c'"),
        (b"\x020", "NULL outside a dict"),
        (b"\x02{N", "truncated"),
        (b"\x02)\x05NN", "truncated"),
        (b"\x02(", "truncated"),
        (b"\x02", "truncated"),
        (b"\x01z\x09abc", "truncated"),
    ]
    for data, match in cases:
        with pytest.raises(StateFormatError, match=match):
            check_marshal(data)
        with pytest.raises(StateFormatError, match="malformed view state"):
            ViewState.decode(plan, data)


def test_mutated_legacy_bytes_never_escape_the_typed_error() -> None:
    """Random byte flips, truncations and inserted huge counts of valid legacy states:
    the decode returns a state or raises StateFormatError, never anything else."""
    rng = random.Random("legacy-fuzz")
    plan = REG.plans["user_activity@1"]
    ok = refused = 0
    for _ in range(150):
        st = _random_state(plan, rng)
        for blob in (_v1_bytes(st), _v2_bytes(st)):
            data = bytearray(blob)
            how = rng.randrange(3)
            if how == 0:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(1, len(data))] = rng.randrange(256)
            elif how == 1:
                del data[rng.randrange(1, len(data)):]
            else:
                at = rng.randrange(1, len(data))
                data[at:at] = rng.choice([b"(", b"[", b"l", b"s"]) + I32(2**31 - 1)
            try:
                ViewState.decode(plan, bytes(data))
                ok += 1
            except StateFormatError:
                refused += 1
    assert refused > 100 and ok + refused == 300
