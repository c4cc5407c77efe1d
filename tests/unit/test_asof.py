"""Point-in-time training sets against a brute-force oracle written here.

The oracle filters the de-duplicated applied events per label row in plain Python, with
the window rule re-derived from its docstring (``ts < T`` and
``ts >= (T // r - W // r + 1) * r``), the TTL/default rule, the ratio null rule and the
worker's LAST tie-break; it never calls the code under test.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

import feature_defs.measures as measures_mod
import offline.asof as asof_mod
from feature_defs.coldstart import Priors, apply_cold_start
from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.registry import Registry
from feature_defs.windows import WindowKind, lifetime, sliding, tumbling
from headrace.cli import main
from headrace.core.errors import InputError
from headrace.core.settings import OfflineSettings
from offline.store import OfflineStore, OfflineStoreUnreadable, deduplicate
from offline.training_set import build_training_set, write_training_set

MIN, HOUR = 60_000, 3_600_000
T0 = 1_767_225_600_000 - 3 * HOUR  # 2025-12-31T21:00Z: the data crosses a UTC midnight
SOURCES = (Source("impressions", "impression"), Source("clicks", "click"))
IMPS, CLICKS = Measure(AggOp.COUNT, "impressions"), Measure(AggOp.COUNT, "clicks")
W1H, TUMBLE, LIFE = sliding(timedelta(hours=1), timedelta(minutes=5)), \
    tumbling(timedelta(minutes=20)), lifetime()


def _bid(op: AggOp) -> Measure:
    return Measure(op, "impressions", "bid_cpm")


USER_VIEW = FeatureView(
    "u", Entity("user", "user_id"), SOURCES,
    features=(
        Feature("imps", (W1H, TUMBLE, LIFE), measure=IMPS, default=0),
        Feature("clicks", (W1H,), measure=CLICKS, default=0),
        Feature("ctr", (W1H, LIFE), ratio=(CLICKS, IMPS)),
        Feature("bid_sum", (sliding(timedelta(hours=2), timedelta(minutes=10)),),
                measure=_bid(AggOp.SUM), default=0.0),
        Feature("bid_mean", (TUMBLE,), measure=_bid(AggOp.MEAN)),
        Feature("bid_min", (W1H,), measure=_bid(AggOp.MIN)),
        Feature("bid_max", (W1H,), measure=_bid(AggOp.MAX)),
        Feature("bid_last", (LIFE,), measure=_bid(AggOp.LAST)),
        Feature("ads", (W1H, LIFE), measure=Measure(AggOp.APPROX_DISTINCT, "impressions",
                                                      "ad_id"), default=0),
        Feature("bid_kinds", (TUMBLE,), measure=_bid(AggOp.APPROX_DISTINCT), default=0),
    ),
    online_ttl=timedelta(hours=2),
)
AD_VIEW = FeatureView(
    "a", Entity("ad", "ad_id"), SOURCES,
    features=(Feature("imps", (sliding(timedelta(minutes=30), timedelta(minutes=1)),),
                      measure=IMPS, default=-1),),
)
REGISTRY = Registry.build([USER_VIEW, AD_VIEW])
USERS = [f"u{i}" for i in range(6)]
ADS = [f"a{i}" for i in range(5)]


def _date(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime("%Y-%m-%d")


def make_events(seed: int, n: int = 900) -> list[dict[str, Any]]:
    """Random impressions and clicks over 6 hours, with equal and tile-aligned times."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ts = T0 + int(rng.integers(0, 6 * HOUR))
        if i % 7 == 0:
            ts = ts // (5 * MIN) * (5 * MIN)
        if i % 11 == 0 and out:
            ts = out[-1]["ts"]
        click = rng.random() < 0.25
        out.append({
            "event_id": f"e{i}", "ts": ts, "source": "clicks" if click else "impressions",
            "user_id": None if rng.random() < 0.05 else str(rng.choice(USERS)),
            "ad_id": None if rng.random() < 0.05 else str(rng.choice(ADS)),
            "bid_cpm": None if click or rng.random() < 0.1 else float(rng.integers(1, 400)) / 8,
            "_partition": int(rng.integers(0, 2)), "_offset": i, "_index": 0,
            "_ingest_ms": ts + int(rng.choice([0, 5, 2000, 40 * MIN])),
        })
    return out


def write_views(root: Path, events: list[dict[str, Any]]) -> None:
    """Both views in the worker's layout: one file per (date, source topic) holding the
    measure fields of that source only, plus a file repeating rows (to de-duplicate)."""
    for view, key in ((USER_VIEW, "user_id"), (AD_VIEW, "ad_id")):
        rows = [dict(e, entity_id=e[key]) for e in events if e[key] is not None]
        for date in sorted({_date(r["ts"]) for r in rows}):
            folder = root / "views" / view.id / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            for source in ("impressions", "clicks"):
                part = [r for r in rows if _date(r["ts"]) == date and r["source"] == source]
                cols: dict[str, Any] = {
                    "entity_id": [r["entity_id"] for r in part],
                    "ts": pa.array([r["ts"] for r in part]).cast(pa.timestamp("ms", tz="UTC")),
                    "source": [r["source"] for r in part],
                    "event_id": [r["event_id"] for r in part],
                    "_partition": pa.array([r["_partition"] for r in part], pa.int32()),
                    "_offset": pa.array([r["_offset"] for r in part], pa.int64()),
                    "_index": pa.array([r["_index"] for r in part], pa.int32()),
                    "_ingest_ms": pa.array([r["_ingest_ms"] for r in part], pa.int64()),
                }
                if source == "impressions" and view is USER_VIEW:
                    cols["ad_id"] = [r["ad_id"] for r in part]
                    cols["bid_cpm"] = pa.array([r["bid_cpm"] for r in part], pa.float64())
                table = pa.table(cols)
                pq.write_table(table, folder / f"{source}-p000-000000000000.parquet")
                pq.write_table(table.slice(0, 9), folder / f"{source}-p000-000000000900.parquet")


# ------------------------------------------------------------------------------- oracle
def _ms(delta: timedelta | None) -> int:
    assert delta is not None
    return int(delta.total_seconds() * 1000)


def in_window(w: Any, ts: int, t: int) -> bool:
    if w.kind is WindowKind.LIFETIME:
        return ts < t
    length = _ms(w.length)
    res = _ms(w.resolution) if w.kind is WindowKind.SLIDING else length
    return (t // res - length // res + 1) * res <= ts < t


def measure_value(m: Measure, rows: list[dict[str, Any]]) -> Any:
    rows = [r for r in rows if r["source"] == m.source]
    if m.op is AggOp.COUNT:
        return len(rows)
    vals = [r for r in rows if r[m.field] is not None]
    if m.op is AggOp.SUM:
        return float(sum(r[m.field] for r in vals))
    if m.op is AggOp.APPROX_DISTINCT:
        hashes = sorted({xxhash.xxh64_intdigest(str(r[m.field]).encode()) for r in vals})
        k = measures_mod.KMV_K
        return len(hashes) if len(hashes) < k else round((k - 1) / ((hashes[k - 1] + 1) / 2**64))
    if not vals:
        return None
    if m.op is AggOp.MEAN:
        return sum(r[m.field] for r in vals) / len(vals)
    if m.op is AggOp.MIN:
        return min(r[m.field] for r in vals)
    if m.op is AggOp.MAX:
        return max(r[m.field] for r in vals)
    best = max(vals, key=lambda r: (r["ts"], xxhash.xxh64_intdigest(r["event_id"].encode()) >> 1))
    return best[m.field]


def oracle(view: FeatureView, events: list[dict[str, Any]], key: str | None, t: int,
           as_of_known: bool = False) -> tuple[dict[str, Any], bool]:
    """Features of ``view`` for entity ``key`` as of ``t``: plain filtering."""
    rows = [e for e in events if key is not None and e[view.entity.key] == key and e["ts"] < t
            and (not as_of_known or e["_ingest_ms"] <= t)]
    longest = max(_ms(w.length) for f in view.features for w in f.windows if w.length)
    ttl = _ms(view.online_ttl) if view.online_ttl else longest + 86_400_000
    out: dict[str, Any] = {}
    default = not rows or t - max(r["ts"] for r in rows) >= ttl
    for f in view.features:
        for w in f.windows:
            name = f"{view.entity.name}__{f.name}_{w.label}"
            inside = [r for r in rows if in_window(w, r["ts"], t)]
            if default:
                out[name] = f.default
            elif f.ratio is not None:
                num, den = (measure_value(m, inside) for m in f.ratio)
                out[name] = None if not den or num is None else num / den
            else:
                assert f.measure is not None
                out[name] = measure_value(f.measure, inside)
    return out, default


def assert_matches(table: pa.Table, labels: pa.Table, events: list[dict[str, Any]],
                   times: list[int], as_of_known: bool = False) -> None:
    for view in (USER_VIEW, AD_VIEW):
        keys = labels.column(view.entity.key).to_pylist()
        masks = table.column(f"{view.name}__is_default").to_pylist()
        got = {n: table.column(n).to_pylist() for n in view.feature_names()}
        for i, (key, t) in enumerate(zip(keys, times, strict=True)):
            want, default = oracle(view, events, key, t, as_of_known)
            assert masks[i] == default, (view.name, i, key, t)
            for name, value in want.items():
                g = got[name][i]
                if value is None or g is None:
                    assert g is value, (name, i, key, t, g, value)
                else:
                    assert math.isclose(g, value, rel_tol=1e-9, abs_tol=1e-9), (name, i, g, value)


def make_labels(events: list[dict[str, Any]], seed: int, n: int = 260) -> tuple[pa.Table,
                                                                              list[int]]:
    rng = np.random.default_rng(seed + 100)
    times = [T0 + int(rng.integers(-HOUR, 9 * HOUR)) for _ in range(n)]
    for i in range(0, n, 5):  # exactly on tile boundaries (5 min, 20 min)
        times[i] = times[i] // (20 * MIN) * (20 * MIN)
    for i in range(1, n, 9):  # exactly at an event (which must not count) and right after
        times[i] = events[i]["ts"] + (i % 2)
    users = [None if i % 17 == 0 else ("nobody" if i % 13 == 0 else str(rng.choice(USERS)))
             for i in range(n)]
    ads = [str(rng.choice(ADS + ["zz"])) for _ in range(n)]
    labels = pa.table({"row": np.arange(n), "user_id": users, "ad_id": ads,
                       "ts": pa.array(times).cast(pa.timestamp("ms", tz="UTC")),
                       "payload": [f"p{i}" for i in range(n)]})
    return labels, times


@pytest.fixture
def store(tmp_path: Path) -> tuple[OfflineSettings, list[dict[str, Any]]]:
    events = make_events(1)
    write_views(tmp_path / "store", events)
    settings = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": str(tmp_path / "store"),
                                         "HEADRACE_PROGRESS": "false"})
    return settings, events


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ts_type", ["ms_utc", "int64", "us_utc", "ns_other_tz"])
def test_matches_bruteforce(store: Any, ts_type: str) -> None:
    settings, events = store
    labels, times = make_labels(events, 1)
    ts = pa.array(times)
    col = {"ms_utc": ts.cast(pa.timestamp("ms", tz="UTC")), "int64": ts,
           "us_utc": pa.array([t * 1000 for t in times]).cast(pa.timestamp("us", tz="UTC")),
           "ns_other_tz": pa.array([t * 1_000_000 for t in times]).cast(
               pa.timestamp("ns", tz="Europe/Paris"))}[ts_type]
    labels = labels.set_column(3, "ts", col)
    out = build_training_set(labels, "all", settings, registry=REGISTRY)
    assert out.num_rows == labels.num_rows
    assert out.select(labels.column_names).equals(labels)  # same rows, order and columns
    assert out.column_names[5:] == [*USER_VIEW.feature_names(), "u__is_default",
                                    *AD_VIEW.feature_names(), "a__is_default"]
    assert out.schema.field("user__imps_1h").type == pa.int64()
    assert out.schema.field("user__ctr_1h").type == pa.float64()
    assert_matches(out, labels, events, times)
    masks = out.column("u__is_default").to_pylist()
    assert any(masks) and not all(masks)
    assert None in out.column("user__ctr_1h").to_pylist()  # a ratio with no impressions


def test_as_of_known(store: Any) -> None:
    settings, events = store
    labels, times = make_labels(events, 2)
    out = build_training_set(labels, "all", settings, registry=REGISTRY, as_of_known=True)
    assert_matches(out, labels, events, times, as_of_known=True)
    plain = build_training_set(labels, "all", settings, registry=REGISTRY)
    assert not out.equals(plain)  # the late ingests do matter in this data


def test_kmv_estimate_beyond_k(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, events = store
    monkeypatch.setattr(measures_mod, "KMV_K", 3)
    monkeypatch.setattr(asof_mod, "KMV_K", 3)
    labels, times = make_labels(events, 3)
    out = build_training_set(labels, "user__ads_1h,user__ads_lifetime", settings,
                             registry=REGISTRY)
    exact = []
    for i, (key, t) in enumerate(zip(labels.column("user_id").to_pylist(), times,
                                     strict=True)):
        exact.append(len({e["ad_id"] for e in events if e["user_id"] == key and e["ts"] < t
                          and e["source"] == "impressions" and e["ad_id"] is not None}))
        want, _ = oracle(USER_VIEW, events, key, t)
        assert out.column("user__ads_1h")[i].as_py() == want["user__ads_1h"]
        assert out.column("user__ads_lifetime")[i].as_py() == want["user__ads_lifetime"]
    assert max(exact) >= 3  # the estimate (not the exact count) was exercised


def test_chunks_and_external_merge_keep_order(store: Any, tmp_path: Path) -> None:
    settings, events = store
    labels, times = make_labels(events, 4)
    whole = build_training_set(labels, "all", settings, registry=REGISTRY)
    assert build_training_set(labels, "all", settings, registry=REGISTRY,
                              chunk_rows=7).equals(whole)
    pq.write_table(labels, tmp_path / "labels.parquet", row_group_size=50)
    out = tmp_path / "out" / "ts.parquet"
    n = write_training_set(str(tmp_path / "labels.parquet"), str(out), "all", settings,
                           registry=REGISTRY, chunk_rows=40, tmp_dir=str(tmp_path))
    assert n == labels.num_rows
    assert pq.read_table(out).equals(whole)
    assert os.listdir(tmp_path / "out") == ["ts.parquet"]


@pytest.mark.parametrize("chunk_rows", [7, 10_000])
def test_the_labels_ivt_counts_reach_the_training_set(store: Any, tmp_path: Path,
                                                       chunk_rows: int) -> None:
    settings, events = store
    labels, _times = make_labels(events, 4)
    report = '{"counts": {"click_too_fast": 3}}'
    labels = labels.replace_schema_metadata({b"headrace.ivt": report.encode()})
    pq.write_table(labels, tmp_path / "labels.parquet", row_group_size=50)
    out = tmp_path / "ts.parquet"
    write_training_set(str(tmp_path / "labels.parquet"), str(out), "all", settings,
                       registry=REGISTRY, chunk_rows=chunk_rows, tmp_dir=str(tmp_path))
    assert (pq.read_schema(out).metadata or {}).get(b"headrace.ivt") == report.encode()


def test_entity_without_data_and_empty_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    settings = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": str(tmp_path / "empty"),
                                         "HEADRACE_PROGRESS": "false"})
    labels = pa.table({"user_id": ["x", None], "ad_id": ["a", "b"], "ts": [T0, T0 + 1]})
    out = build_training_set(labels, "all", settings, registry=REGISTRY)
    assert out.column("u__is_default").to_pylist() == [True, True]
    assert out.column("user__imps_1h").to_pylist() == [0, 0]
    assert out.column("user__ctr_1h").to_pylist() == [None, None]
    assert out.column("ad__imps_30m").to_pylist() == [-1, -1]


def test_cold_start_matches_the_serving_rule(tmp_path: Path) -> None:
    from feature_defs.registry import load_registry
    from feature_defs.standard import USER_ACTIVITY

    registry = load_registry()
    events = [dict(e, ts=e["ts"]) for e in make_events(5, 1500)]
    rows = [dict(e, entity_id=e["user_id"]) for e in events if e["user_id"] is not None]
    folder = tmp_path / "store" / "views" / USER_ACTIVITY.id / "date=2025-12-31"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "entity_id": [r["entity_id"] for r in rows],
        "ts": pa.array([r["ts"] for r in rows]).cast(pa.timestamp("ms", tz="UTC")),
        "source": [r["source"] for r in rows], "ad_id": [r["ad_id"] for r in rows],
        "event_id": [r["event_id"] for r in rows],
        **{c: pa.array([r[c] for r in rows], t) for c, t in (
            ("_partition", pa.int32()), ("_offset", pa.int64()), ("_index", pa.int32()),
            ("_ingest_ms", pa.int64()))},
    }), folder / "impressions-p000-000000000000.parquet")
    settings = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": str(tmp_path / "store"),
                                         "HEADRACE_PROGRESS": "false"})
    priors = Priors({"user__ctr_1h": 0.05, "user__clicks_24h": 1.5},
                    {("US", "ios"): {"user__ctr_1h": 0.07, "user__clicks_24h": 3.0}})
    labels, times = make_labels(events, 5)
    labels = labels.append_column("country", pa.array(["US", "FR"] * 130)).append_column(
        "device_type", pa.array(["ios"] * 260))
    names = ["user__ctr_1h", "user__clicks_24h"]
    out = build_training_set(labels, names, settings, cold_start=True, priors=priors,
                             registry=registry)
    assert "user__impressions_7d" not in out.column_names
    for i, (key, t) in enumerate(zip(labels.column("user_id").to_pylist(), times,
                                     strict=True)):
        raw, default = oracle(USER_ACTIVITY, events, key, t)
        history = None if key is None else (0 if default else raw["user__impressions_7d"])
        want, _, _ = apply_cold_start("user", {n: raw[n] for n in names}, default, priors,
                                      (labels["country"][i].as_py(), "ios"), history=history)
        for n in names:
            g = out.column(n)[i].as_py()
            assert (g is None) == (want[n] is None) and (g is None or math.isclose(
                g, want[n], rel_tol=1e-12)), (n, i, g, want[n])


def test_reads_only_the_needed_date_partitions(store: Any, tmp_path: Path) -> None:
    settings, events = store
    old = tmp_path / "store" / "views" / USER_VIEW.id / "date=2025-12-01"
    old.mkdir()
    (old / "impressions-p000-000000000000.parquet").write_bytes(b"not parquet")
    labels = pa.table({"user_id": ["u1"], "ad_id": ["a1"], "ts": [T0 + 5 * HOUR]})
    build_training_set(labels, "user__imps_1h", settings, registry=REGISTRY)  # no error
    st = OfflineStore.from_settings(settings)
    base = st.view_base(USER_VIEW.id)
    assert [p.rsplit("/", 1)[1] for p in st.partitions(base, T0, T0 + 4 * HOUR)] == [
        "date=2025-12-31", "date=2026-01-01"]
    assert [p.rsplit("/", 1)[1] for p in st.partitions(base, T0, T0 + 3 * HOUR)] == [
        "date=2025-12-31"]
    with pytest.raises(OfflineStoreUnreadable):  # a lifetime window reaches back to it
        build_training_set(labels, "user__imps_lifetime", settings, registry=REGISTRY)


def test_deduplicate_keeps_first_of_each_coordinate() -> None:
    table = pa.table({"source": ["i", "c", "i", "i", None], "_partition": [0, 0, 0, 1, 0],
                      "_offset": [5, 5, 5, 5, 5], "_index": [0, 0, 0, 0, 0],
                      "v": [1, 2, 3, 4, 5]})
    out = deduplicate(table, ["source", "_partition", "_offset", "_index"])
    assert out.column("v").to_pylist() == [1, 2, 4, 5]


# ---------------------------------------------------------------------------- bad input
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_user_id", "no_ts", "naive_ts", "string_ts", "null_ts",
                                  "unknown_feature", "empty", "not_parquet", "missing_file",
                                  "clash", "no_store"])
def test_bad_input_exits_2_with_one_sentence_and_no_output(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    (store_dir / "views").mkdir(parents=True)
    monkeypatch.setenv("HEADRACE_OFFLINE_URI", str(store_dir))
    monkeypatch.setenv("HEADRACE_PROGRESS", "false")
    ts = pa.array([T0, T0 + 1]).cast(pa.timestamp("ms", tz="UTC"))
    table = pa.table({"user_id": ["u1", "u2"], "ts": ts})
    features = "user__impressions_1h"
    if case == "no_user_id":
        table = table.drop_columns(["user_id"])
    elif case == "no_ts":
        table = table.drop_columns(["ts"])
    elif case == "naive_ts":
        table = table.set_column(1, "ts", pa.array([T0, T0]).cast(pa.timestamp("ms")))
    elif case == "string_ts":
        table = table.set_column(1, "ts", pa.array(["2026-01-01", "2026-01-02"]))
    elif case == "null_ts":
        table = table.set_column(1, "ts", pa.array([T0, None]))
    elif case == "unknown_feature":
        features = "user__impressions_1h,user__nope_1h"
    elif case == "empty":
        table = table.slice(0, 0)
    elif case == "clash":
        table = table.append_column("user__impressions_1h", pa.array([1, 2]))
    elif case == "no_store":
        monkeypatch.setenv("HEADRACE_OFFLINE_URI", str(tmp_path / "nowhere"))
    labels = tmp_path / "labels.parquet"
    if case == "not_parquet":
        labels.write_text("hello")
    elif case != "missing_file":
        pq.write_table(table, labels)
    out = tmp_path / "out" / "ts.parquet"
    code, err = _cli(["training-set", "--labels", str(labels), "--features", features,
                      "--out", str(out)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headrace training-set: "), err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_build_training_set_rejects_missing_keys(store: Any) -> None:
    settings, _ = store
    with pytest.raises(InputError, match="'ad_id'"):
        build_training_set(pa.table({"user_id": ["u1"], "ts": [T0]}), "all", settings,
                           registry=REGISTRY)


def test_cli_writes_the_training_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "store" / "views").mkdir(parents=True)
    monkeypatch.setenv("HEADRACE_OFFLINE_URI", str(tmp_path / "store"))
    monkeypatch.setenv("HEADRACE_PROGRESS", "false")
    # an empty store with no commit records: nothing to cover (the check reads Redis)
    from headrace.core.online_store import MemoryOnlineStore
    monkeypatch.setattr("headrace.commands.offline._online_store", lambda _s: MemoryOnlineStore())
    labels = pa.table({"user_id": ["u1", None], "ad_id": ["a", "b"], "campaign_id": ["c", "c"],
                       "publisher_id": ["p", "p"], "ts": [T0, T0 + 1]})
    pq.write_table(labels, tmp_path / "labels.parquet")
    code, err = _cli(["training-set", "--labels", str(tmp_path / "labels.parquet"),
                      "--out", str(tmp_path / "ts.parquet")], capsys)
    assert code == 0, err
    out = pq.read_table(tmp_path / "ts.parquet")
    assert out.num_rows == 2 and "user__ctr_24h" in out.column_names
    assert out.column("user_activity__is_default").to_pylist() == [True, True]
