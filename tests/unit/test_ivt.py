"""IVT filtering against a brute-force oracle and hand-counted cases."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from headrace.core.errors import InputError
from offline.ivt import RULES, IvtReport, IvtRules, filter_ivt, merge_reports

MIN = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary


def _tables(imps: list[dict[str, Any]], clicks: list[dict[str, Any]], ip: bool = False
            ) -> tuple[pa.Table, pa.Table]:
    def table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> pa.Table:
        data: dict[str, Any] = {c: pa.array([r.get(c) for r in rows], pa.string())
                                for c in cols if c != "ts"}
        data["ts"] = pa.array([r["ts"] for r in rows], pa.int64()).cast(
            pa.timestamp("ms", tz="UTC"))
        return pa.table(data)

    extra = ("ip",) if ip else ()
    return (table(imps, ("event_id", "ts", "user_id", *extra)),
            table(clicks, ("event_id", "ts", "impression_id", "user_id", *extra)))


def oracle(imps: list[dict[str, Any]], clicks: list[dict[str, Any]], rules: IvtRules
           ) -> tuple[list[int], list[int], dict[str, int]]:
    """Indices of kept impressions and clicks, and per-rule counts, by plain loops."""
    flags: dict[str, set[tuple[str, int]]] = {r: set() for r in RULES}
    first_imp: dict[str, dict[str, Any]] = {}
    for row in imps:
        first_imp.setdefault(row["event_id"], row)
    for j, c in enumerate(clicks):
        imp = first_imp.get(c["impression_id"]) if c["impression_id"] is not None else None
        if imp is None:
            flags["click_without_impression"].add(("c", j))
        elif c["ts"] - imp["ts"] < rules.min_click_delay_ms:
            flags["click_too_fast"].add(("c", j))
        earlier = [k for k, o in enumerate(clicks) if o["event_id"] == c["event_id"]
                   and (o["ts"], k) < (c["ts"], j)]
        if c["event_id"] is not None and earlier:
            flags["duplicate_click_id"].add(("c", j))

    def minute(ts: int) -> int:
        return ts // MIN

    events = [("i", i, e) for i, e in enumerate(imps)] + [("c", j, e)
                                                           for j, e in enumerate(clicks)]
    totals: dict[str, tuple[int, int]] = {}  # per user: impressions, clicks
    for kind, idx, e in events:
        u = e["user_id"]
        if u is not None:
            n = sum(1 for c in clicks if c["user_id"] == u and minute(c["ts"]) == minute(e["ts"]))
            if n > rules.max_user_clicks_per_minute:
                flags["user_click_burst"].add((kind, idx))
            if u not in totals:
                totals[u] = (sum(1 for i in imps if i["user_id"] == u),
                             sum(1 for c in clicks if c["user_id"] == u))
            n_imp, n_clk = totals[u]
            if n_imp >= rules.impossible_ctr_min_impressions and \
                    n_clk / n_imp > rules.impossible_ctr:
                flags["impossible_ctr"].add((kind, idx))
        ip = e.get("ip")
        if rules.max_ip_events_per_minute is not None and ip is not None:
            n = sum(1 for _, _, o in events if o.get("ip") == ip
                    and minute(o["ts"]) == minute(e["ts"]))
            if n > rules.max_ip_events_per_minute:
                flags["ip_burst"].add((kind, idx))
    dropped = set().union(*flags.values())
    return ([i for i in range(len(imps)) if ("i", i) not in dropped],
            [j for j in range(len(clicks)) if ("c", j) not in dropped],
            {r: len(v) for r, v in flags.items()})


def random_events(seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    imps: list[dict[str, Any]] = []
    for i in range(120):
        imps.append({"event_id": f"i{i}" if i % 17 else f"i{i - 1}",  # some repeated ids
                     "ts": T0 + int(rng.integers(0, 6 * MIN)),
                     "user_id": None if i % 11 == 0 else f"u{int(rng.integers(0, 5))}",
                     "ip": None if i % 13 == 0 else f"ip{int(rng.integers(0, 3))}"})
    clicks = []
    for j in range(90):
        imp = imps[int(rng.integers(0, len(imps)))]
        delay = int(rng.choice([-500, 0, 999, 1000, 1001, 5000, 2 * MIN]))
        clicks.append({"event_id": f"c{j}" if j % 9 else f"c{max(j - 1, 0)}",
                       "ts": imp["ts"] + delay,
                       "impression_id": None if j % 23 == 5 else
                       (imp["event_id"] if j % 7 else "missing"),
                       "user_id": imp["user_id"] if j % 19 else None, "ip": imp["ip"]})
    return imps, clicks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rules", [
    IvtRules(),
    IvtRules(max_user_clicks_per_minute=2, max_ip_events_per_minute=8,
             impossible_ctr_min_impressions=10, impossible_ctr=0.3),
    IvtRules(min_click_delay_ms=0, max_user_clicks_per_minute=1, max_ip_events_per_minute=1,
             impossible_ctr_min_impressions=1, impossible_ctr=0.05),
])
def test_filter_matches_bruteforce(seed: int, rules: IvtRules) -> None:
    imps, clicks = random_events(seed)
    ti, tc = _tables(imps, clicks, ip=True)
    kept_i, kept_c, report = filter_ivt(ti, tc, rules)
    want_i, want_c, want_counts = oracle(imps, clicks, rules)
    assert dict(report.counts) == want_counts
    assert kept_i.column("event_id").to_pylist() == [imps[i]["event_id"] for i in want_i]
    assert kept_c.column("ts").cast(pa.int64()).to_pylist() == [clicks[j]["ts"] for j in want_c]
    assert (report.impressions_in, report.impressions_out) == (len(imps), len(want_i))
    assert (report.clicks_in, report.clicks_out) == (len(clicks), len(want_c))


def _imp(i: int, ts: int, user: str | None = "u", ip: str | None = None) -> dict[str, Any]:
    return {"event_id": f"i{i}", "ts": ts, "user_id": user, "ip": ip}


def _clk(j: int, imp: str | None, ts: int, user: str | None = "u", ip: str | None = None,
         event_id: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id or f"c{j}", "ts": ts, "impression_id": imp, "user_id": user,
            "ip": ip}


def test_click_rules_by_hand() -> None:
    imps = [_imp(0, T0), _imp(1, T0 + 10 * MIN)]
    clicks = [_clk(0, "i0", T0 + 999),            # too fast
              _clk(1, "i0", T0 + 1000),           # fine: exactly 1 s
              _clk(2, "i1", T0 + 10 * MIN - 1),   # before its impression: too fast
              _clk(3, "nope", T0 + 5000),         # no impression
              _clk(4, None, T0 + 5000),           # no impression id
              _clk(5, "i1", T0 + 11 * MIN, event_id="c1")]  # repeats c1 (later): dropped
    ti, tc = _tables(imps, clicks)
    kept_i, kept_c, report = filter_ivt(ti, tc)
    assert dict(report.counts) == {"click_too_fast": 2, "click_without_impression": 2,
                                   "duplicate_click_id": 1, "user_click_burst": 0,
                                   "ip_burst": 0, "impossible_ctr": 0}
    assert kept_c.column("event_id").to_pylist() == ["c1"]
    assert kept_i.num_rows == 2  # a too-fast click keeps its impression
    assert report.to_dict() == {"counts": dict(report.counts), "impressions_in": 2,
                                "impressions_out": 2, "clicks_in": 6, "clicks_out": 1}


def test_user_burst_drops_only_the_flagged_minute() -> None:
    rules = IvtRules(max_user_clicks_per_minute=3, min_click_delay_ms=0)
    imps = [_imp(0, T0), _imp(1, T0 + 30_000), _imp(2, T0 + MIN), _imp(3, T0, user="v")]
    clicks = [_clk(j, "i0", T0 + 1000 * j) for j in range(1, 5)]  # 4 clicks in minute 0
    clicks.append(_clk(9, "i2", T0 + MIN + 1))  # minute 1: 1 click
    ti, tc = _tables(imps, clicks)
    kept_i, kept_c, report = filter_ivt(ti, tc, rules)
    assert report.counts["user_click_burst"] == 6  # 2 impressions + 4 clicks of minute 0
    assert kept_i.column("event_id").to_pylist() == ["i2", "i3"]
    assert kept_c.column("event_id").to_pylist() == ["c9"]


def test_ip_burst_counts_impressions_and_clicks_and_is_off_by_default() -> None:
    imps = [_imp(i, T0 + i, user=f"u{i}", ip="A") for i in range(3)]
    clicks = [_clk(0, "i0", T0 + 2000, user="u0", ip="A")]
    ti, tc = _tables(imps, clicks, ip=True)
    assert filter_ivt(ti, tc)[2].counts["ip_burst"] == 0
    kept_i, kept_c, report = filter_ivt(ti, tc, IvtRules(max_ip_events_per_minute=3))
    assert report.counts["ip_burst"] == 4 and kept_i.num_rows == 0 and kept_c.num_rows == 0
    assert filter_ivt(ti, tc, IvtRules(max_ip_events_per_minute=4))[2].counts["ip_burst"] == 0
    no_ip_i, no_ip_c = _tables(imps, clicks)  # no ip column: the rule sees no ip
    assert filter_ivt(no_ip_i, no_ip_c, IvtRules(max_ip_events_per_minute=1)
                      )[2].counts["ip_burst"] == 0


def test_impossible_ctr_threshold_is_strict() -> None:
    rules = IvtRules(impossible_ctr_min_impressions=4, impossible_ctr=0.5)
    imps = [_imp(i, T0 + i * MIN) for i in range(4)]
    clicks = [_clk(j, f"i{j}", T0 + j * MIN + 5000) for j in range(2)]  # CTR 0.5: kept
    ti, tc = _tables(imps, clicks)
    assert filter_ivt(ti, tc, rules)[2].counts["impossible_ctr"] == 0
    clicks.append(_clk(2, "i2", T0 + 2 * MIN + 5000))  # CTR 0.75: every event of u
    ti, tc = _tables(imps, clicks)
    kept_i, kept_c, report = filter_ivt(ti, tc, rules)
    assert report.counts["impossible_ctr"] == 7 and kept_i.num_rows == kept_c.num_rows == 0
    ti, tc = _tables(imps[:3], clicks)  # 3 impressions: below the minimum
    assert filter_ivt(ti, tc, rules)[2].counts["impossible_ctr"] == 0


def test_empty_input_and_merge() -> None:
    ti, tc = _tables([], [])
    kept_i, kept_c, report = filter_ivt(ti, tc)
    assert kept_i.num_rows == kept_c.num_rows == 0
    assert report.to_dict()["counts"] == dict.fromkeys(RULES, 0)
    a = IvtReport({"click_too_fast": 2}, 10, 9, 5, 3)
    b = IvtReport({"click_too_fast": 1, "ip_burst": 4}, 1, 1, 2, 2)
    merged = merge_reports([a, b])
    assert merged.to_dict() == {"counts": {**dict.fromkeys(RULES, 0), "click_too_fast": 3,
                                           "ip_burst": 4},
                                "impressions_in": 11, "impressions_out": 10,
                                "clicks_in": 7, "clicks_out": 5}
    assert IvtReport.from_dict(merged.to_dict()) == merged


def test_bad_input_raises_one_sentence() -> None:
    ti, tc = _tables([_imp(0, T0)], [])
    with pytest.raises(InputError, match="clicks have no 'user_id' column"):
        filter_ivt(ti, tc.drop_columns(["user_id"]))
    with pytest.raises(InputError, match="impressions' ts column has type string"):
        filter_ivt(ti.set_column(ti.schema.get_field_index("ts"), "ts", pa.array(["x"])), tc)
    with pytest.raises(InputError, match="max_user_clicks_per_minute must be >= 1, got 0"):
        IvtRules(max_user_clicks_per_minute=0)
    with pytest.raises(InputError, match="impossible_ctr must be > 0"):
        IvtRules(impossible_ctr=0.0)


def test_counter_sanity() -> None:
    """The random events exercise every rule (else the oracle comparison proves little)."""
    imps, clicks = random_events(0)
    _, _, counts = oracle(imps, clicks, IvtRules(max_user_clicks_per_minute=2,
                                                 max_ip_events_per_minute=8,
                                                 impossible_ctr_min_impressions=10,
                                                 impossible_ctr=0.3))
    assert all(Counter(counts)[r] > 0 for r in RULES), counts
