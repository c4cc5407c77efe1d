"""The synthetic stream: deterministic, valid, clicks linked to impressions, and each heavy
user's empirical CTR close to the true one (the oracle is the generator's own truth table,
checked by counting the events)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streams.events import event_problem
from streams.synthetic import generate, iter_events, write_jsonl

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY = 86_400_000


@pytest.fixture(scope="module")
def stream():  # type: ignore[no-untyped-def]
    return generate(users=400, events=120_000, seed=3, start_ms=START, days=2)


def test_deterministic_by_seed() -> None:
    a = generate(50, 2_000, seed=1, start_ms=START, days=1)
    b = generate(50, 2_000, seed=1, start_ms=START, days=1)
    c = generate(50, 2_000, seed=2, start_ms=START, days=1)
    assert a.events == b.events and a.user_ctr == b.user_ctr
    assert a.events != c.events


def test_iter_events_is_the_same_stream() -> None:
    listed = generate(30, 3_000, seed=9, start_ms=START, days=1).events
    assert list(iter_events(30, 3_000, seed=9, start_ms=START, days=1)) == listed


def test_exact_count_and_valid_events(stream) -> None:  # type: ignore[no-untyped-def]
    assert len(stream.events) == 120_000
    for e in stream.events:
        kind = e["type"]
        assert event_problem(kind, e, now_ms=START + 3 * DAY, max_future_ms=0) is None, e
    ts = np.array([e["ts"] for e in stream.events])
    assert START <= ts.min() and ts.max() < START + 2 * DAY + 600_000 + 3_000
    assert len({e["event_id"] for e in stream.events}) == len(stream.events)


def test_clicks_follow_their_impression(stream) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, dict] = {}
    clicks = 0
    for e in stream.events:
        if e["type"] == "impression":
            seen[e["event_id"]] = e
            continue
        clicks += 1
        imp = seen[e["impression_id"]]  # arrived before the click
        for f in ("user_id", "ad_id", "campaign_id", "publisher_id"):
            assert e[f] == imp[f]
        assert 1_000 <= e["ts"] - imp["ts"] <= 600_000
    assert 0.015 < clicks / len(seen) < 0.05


def test_arrival_is_nearly_event_time_order(stream) -> None:  # type: ignore[no-untyped-def]
    ts = np.array([e["ts"] for e in stream.events])
    lateness = np.maximum.accumulate(ts) - ts
    assert lateness.max() <= 3_000
    assert (lateness > 0).mean() > 0.1  # some jitter exists


def test_segments_fixed_per_user_and_anonymous_share(stream) -> None:  # type: ignore[no-untyped-def]
    segment: dict[str, tuple[str, str]] = {}
    imps = [e for e in stream.events if e["type"] == "impression"]
    for e in imps:
        if e["user_id"] is not None:
            seg = (e["country"], e["device_type"])
            assert segment.setdefault(e["user_id"], seg) == seg
    anonymous = sum(e["user_id"] is None for e in imps) / len(imps)
    assert 0.04 < anonymous < 0.06


def test_diurnal_traffic(stream) -> None:  # type: ignore[no-untyped-def]
    hours = Counter((e["ts"] // 3_600_000) % 24 for e in stream.events)
    assert hours[20] > 2 * hours[8]


def test_heavy_users_empirical_ctr_near_truth(stream) -> None:  # type: ignore[no-untyped-def]
    imps: Counter[str] = Counter()
    clicks: Counter[str] = Counter()
    for e in stream.events:
        if e["user_id"] is None:
            continue
        (imps if e["type"] == "impression" else clicks)[e["user_id"]] += 1
    heavy = [u for u, n in imps.most_common(10) if n >= 2_000]
    assert len(heavy) >= 5
    for user in heavy:
        n, p = imps[user], stream.user_ctr[user]
        # binomial sd, widened for the ad-quality mixture
        sd = math.sqrt(p * (1 - p) / n) * 1.3
        assert abs(clicks[user] / n - p) < 4 * sd, (user, n, clicks[user] / n, p)


def test_true_ctr_distribution(stream) -> None:  # type: ignore[no-untyped-def]
    values = np.array(list(stream.user_ctr.values()))
    assert len(values) == 400
    assert 0.02 < values.mean() < 0.04 and values.min() > 0 and values.max() < 0.3


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    import gzip
    import json

    events = generate(10, 200, seed=4, start_ms=START, days=1).events
    for name in ("e.jsonl", "e.jsonl.gz"):
        path = tmp_path / name
        assert write_jsonl(path, events) == 200
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt") as fh:  # type: ignore[operator]
            assert [json.loads(line) for line in fh] == events


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="users"):
        generate(0, 10, seed=1, start_ms=START)
    with pytest.raises(ValueError, match="anonymous_share"):
        generate(5, 10, seed=1, start_ms=START, anonymous_share=1.5)
