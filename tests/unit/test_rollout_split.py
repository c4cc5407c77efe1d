"""The split state format and the sticky assignment (headrace.rollout.split).

The assignment is checked against an independent oracle: the formula of the spec
computed here with xxhash directly, and the binomial exactness over 1M ids.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import xxhash

from headrace.core.errors import InputError, OnlineStoreError
from headrace.rollout.split import (
    ACK_TTL_S,
    Ack,
    SplitState,
    SplitStateError,
    ack_key,
    assign,
    position,
    positions,
    read_split,
    split_key,
    write_ack,
)

SHARES = (0.03, 0.10, 0.20, 0.40, 0.50)
GOOD: dict[str, Any] = {"seq": 7, "rollout_id": "r-1", "champion": "v3", "challenger": "v4",
                        "share": 0.03, "shadow": False, "phase": 1, "updated_ms": 1764633600000}


@pytest.fixture(scope="module")
def million() -> np.ndarray:
    return positions("r-exact", (f"u{i}" for i in range(1_000_000)))


# ---------------------------------------------------------------- assignment
@pytest.mark.parametrize("share", SHARES)
def test_assignment_is_exact_to_0_2_points_over_1m_ids(million: np.ndarray,
                                                        share: float) -> None:
    got = float((million < share).mean())
    assert abs(got - share) <= 0.002, (share, got)


def test_assignment_is_the_spec_formula() -> None:
    for i in range(2000):
        unit = f"user-{i}"
        u = xxhash.xxh64_intdigest(f"r-9|{unit}".encode()) / 2**64  # the oracle
        assert position("r-9", unit) == u
        for share in SHARES:
            assert assign("r-9", unit, share) is (u < share)
    units = [f"user-{i}" for i in range(2000)]
    assert positions("r-9", units).tolist() == [position("r-9", u) for u in units]


def test_assignment_is_sticky_and_monotone_in_the_share(million: np.ndarray) -> None:
    again = positions("r-exact", (f"u{i}" for i in range(1_000_000)))
    assert np.array_equal(million, again)  # sticky: same rollout, same unit, same side
    previous = np.zeros(len(million), dtype=bool)
    for share in SHARES:
        inside = million < share
        assert not (previous & ~inside).any()  # in at 3 % → in at 10 % and beyond
        previous = inside
    assert not (million < 0.0).any() and (million < 1.0).all()


def test_a_new_rollout_reshuffles() -> None:
    ids = [f"u{i}" for i in range(200_000)]
    a, b = positions("r-a", ids) < 0.2, positions("r-b", ids) < 0.2
    overlap = float((a & b).mean())
    assert abs(overlap - 0.04) < 0.003  # independent: 0.2 x 0.2


def test_unicode_units_hash_their_utf8_bytes() -> None:
    assert position("r", "é") == xxhash.xxh64_intdigest("r|é".encode()) / 2**64


# ---------------------------------------------------------------- the JSON format
def test_round_trip_and_key_names() -> None:
    state = SplitState.from_json(json.dumps(GOOD))
    assert state == SplitState(7, "r-1", "v3", "v4", 0.03, False, 1, 1764633600000)
    assert json.loads(state.to_json()) == GOOD
    assert list(json.loads(state.to_json())) == list(GOOD)  # the format's field order
    assert SplitState.from_json(state.to_json().encode()) == state
    assert split_key("hr") == "hr:rollout:split"
    assert ack_key("hr", "s-1") == "hr:rollout:ack:s-1"
    none = SplitState.from_json(json.dumps({**GOOD, "challenger": None, "share": 0}))
    assert none.challenger is None and none.share == 0.0


@pytest.mark.parametrize(("change", "field"), [
    ({"seq": -1}, "seq"), ({"seq": 1.5}, "seq"), ({"seq": True}, "seq"),
    ({"rollout_id": ""}, "rollout_id"), ({"rollout_id": 3}, "rollout_id"),
    ({"champion": ""}, "champion"), ({"champion": None}, "champion"),
    ({"challenger": "../etc"}, "challenger"), ({"challenger": "a/b"}, "challenger"),
    ({"challenger": 4}, "challenger"), ({"share": 0.51}, "share"), ({"share": -0.01}, "share"),
    ({"share": "0.1"}, "share"), ({"share": float("nan")}, "share"), ({"share": True}, "share"),
    ({"shadow": 1}, "shadow"), ({"phase": 6}, "phase"), ({"phase": -1}, "phase"),
    ({"updated_ms": "now"}, "updated_ms"), ({"challenger": None, "share": 0.1}, "share"),
    ({"challenger": "v3"}, "challenger"), ({"extra": 1}, "extra"),
])
def test_each_bad_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SplitStateError) as err:
        SplitState.from_json(json.dumps({**GOOD, **change}))
    assert len(err.value.problems) == 1, err.value.problems
    assert err.value.problems[0].startswith(f"{field}: "), err.value.problems
    assert isinstance(err.value, InputError)


def test_every_problem_is_reported_at_once() -> None:
    doc = {**GOOD, "seq": "x", "share": 2.0, "phase": 9}
    del doc["rollout_id"]
    with pytest.raises(SplitStateError) as err:
        SplitState.from_json(json.dumps(doc))
    fields = sorted(p.split(":")[0] for p in err.value.problems)
    assert fields == ["phase", "rollout_id", "seq", "share"], err.value.problems
    assert "rollout_id: missing" in err.value.problems


@pytest.mark.parametrize("text", [b"", b"{", b"\xff\xfe", b"[1]", b"null", b"7"])
def test_not_a_json_object(text: bytes) -> None:
    with pytest.raises(SplitStateError, match="invalid split state"):
        SplitState.from_json(text)


# ---------------------------------------------------------------- the Redis helpers
class FakeRedis:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.data: dict[str, Any] = {}
        self.ttl: dict[str, int | None] = {}
        self.fail = fail

    def get(self, name: str) -> Any:
        if self.fail is not None:
            raise self.fail
        return self.data.get(name)

    def set(self, name: str, value: str, ex: int | None = None) -> Any:
        if self.fail is not None:
            raise self.fail
        self.data[name], self.ttl[name] = value.encode(), ex
        return True


def test_read_split_and_write_ack() -> None:
    client = FakeRedis()
    assert read_split(client, "hr") is None
    client.data[split_key("hr")] = json.dumps(GOOD).encode()
    assert read_split(client, "hr") == SplitState.from_json(json.dumps(GOOD))
    write_ack(client, "hr", "s-1", Ack(7, 123, 0.03, "v4"))
    assert client.ttl[ack_key("hr", "s-1")] == ACK_TTL_S == 10
    assert Ack.from_json(client.data[ack_key("hr", "s-1")]) == Ack(7, 123, 0.03, "v4")
    assert json.loads(client.data[ack_key("hr", "s-1")]) == {
        "seq": 7, "applied_ms": 123, "share": 0.03, "challenger": "v4"}
    with pytest.raises(InputError):
        Ack.from_json(b"{}")


def test_redis_failures_become_transient_store_errors() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    for exc in (RedisConnectionError("refused"), RedisTimeoutError("slow"), OSError("reset")):
        client = FakeRedis(fail=exc)
        with pytest.raises(OnlineStoreError) as err:
            read_split(client, "hr")
        assert err.value.transient
        with pytest.raises(OnlineStoreError):
            write_ack(client, "hr", "s", Ack(1, 1, 0.0, None))
