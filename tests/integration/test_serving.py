"""The feature server against real redis-server and a real gRPC server.

Values are checked against the brute-force oracle (tests/oracle.py) computed from the
same events that built the online states; the store contract runs against the fake and
the real online store alike.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_defs.coldstart import Priors
from feature_defs.layout import entity_key, events_dir, priors_key
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.core.errors import InvalidArgument
from headrace.core.settings import OfflineSettings, ServeSettings
from serving.client import FeatureClient
from serving.server import FeatureServer, build_server
from tests import oracle

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
DAY = 86_400_000
REG = load_registry()
VIEW_OF = {p.view.entity.name: p for p in REG.plans.values()}


def make_events(seed: int = 3, users: int = 5, n: int = 600) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        u = rng.randrange(users)
        events.append({"type": "click" if rng.random() < 0.08 else "impression",
                       "event_id": f"e{i}", "ts": T0 - int(rng.random() ** 2 * (u + 1) * DAY),
                       "user_id": f"u{u}", "ad_id": f"a{rng.randrange(3)}",
                       "campaign_id": f"c{rng.randrange(2)}", "publisher_id": "p0",
                       "country": "US",
                       "device_type": rng.choice(["mobile", "desktop"])})
    return sorted(events, key=lambda e: e["ts"])


def build_states(events: list[dict[str, Any]]) -> dict[tuple[str, str], ViewState]:
    states: dict[tuple[str, str], ViewState] = {}
    for e in events:
        for entity, key in oracle.ENTITY_KEYS.items():
            st = states.setdefault((entity, e[key]), ViewState(VIEW_OF[entity]))
            st.apply(oracle.TOPIC_OF[e["type"]], e["ts"], e)
    return states


def write_states(client: Any, prefix: str, states: dict[tuple[str, str], ViewState]) -> None:
    pipe = client.pipeline(transaction=False)
    for (entity, eid), st in states.items():
        key = entity_key(prefix, entity, eid)
        pipe.hset(key, VIEW_OF[entity].view.id, st.encode())
        pipe.pexpire(key, 30 * DAY)  # like the worker (TTL), long enough for fixed old times
    pipe.execute()


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return make_events()


@pytest.fixture
def loaded(ns: Any, redis_client: Any, events: list[dict[str, Any]]) -> Any:
    write_states(redis_client, ns.redis_prefix, build_states(events))
    return ns


#: correctness tests must not turn into fallbacks when a loaded CI machine stalls a read
SLACK = {"redis_budget_ms": 2000.0}


@pytest.fixture
def server(loaded: Any) -> Iterator[FeatureServer]:
    settings = loaded.settings(ServeSettings, **SLACK)
    with build_server(settings, port=0, host="127.0.0.1") as srv:
        yield srv


@pytest.fixture
def client(server: FeatureServer) -> Iterator[FeatureClient]:
    with FeatureClient(f"127.0.0.1:{server.port}", timeout_s=5.0) as c:
        c.wait_ready()
        yield c


# ------------------------------------------------------------------ values over gRPC
@pytest.mark.parametrize("entity", ["user", "ad", "campaign", "publisher"])
def test_values_equal_the_oracle(client: FeatureClient, events: list[dict[str, Any]],
                                 entity: str) -> None:
    index = oracle.OracleIndex(events)
    ids = index.ids(entity) + ["nobody"]
    for as_of in (T0 + 1, T0 + 5_001, T0 + 2 * 3_600_000, T0 + 3 * DAY):
        answer = client.get(entity, ids, as_of_ms=as_of)
        for ent in answer.entities:
            want = oracle.features_as_of(index, entity, ent.id, as_of)
            assert ent.values == {n: None if w is None else float(w) for n, w in want.items()}


def test_ttl_is_honoured_never_stale_values(client: FeatureClient,
                                            events: list[dict[str, Any]]) -> None:
    latest = max(e["ts"] for e in events if e["ad_id"] == "a0")
    ttl = VIEW_OF["ad"].ttl_ms
    ent = client.get("ad", ["a0"], as_of_ms=latest + ttl).entities[0]
    assert set(ent.statuses.values()) == {"STALE"}
    assert ent.values == {n: None if v is None else float(v)
                          for n, v in oracle.defaults("ad").items()}
    ent = client.get("ad", ["a0"], as_of_ms=latest + ttl - 1).entities[0]
    assert set(ent.statuses.values()) == {"PRESENT"}


def test_invalid_arguments_over_grpc(client: FeatureClient) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.get("user", ["u1", "u1", "u1", "bad id"])
    assert err.value.field == "ids[3]" and "whitespace" in str(err.value)
    raw = grpc.insecure_channel(client.address)
    with pytest.raises(grpc.RpcError) as rpc:
        raw.unary_unary("/headrace.v1.FeatureService/GetOnlineFeatures")(
            b"\x0a\x06planet\x12\x01x", timeout=5
        )  # entity_type="planet", ids=["x"]
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.value.details().startswith("entity_type: ")


@pytest.mark.parametrize(
    ("method", "raw", "cause"),
    [
        ("/headrace.v1.FeatureService/GetOnlineFeatures", b"\x0a\x04user\x12\x02\xff\xfe",
         "UTF-8"),  # entity_type="user", ids=[b"\xff\xfe"]: an id that is not UTF-8
        ("/headrace.v1.FeatureService/GetOnlineFeatures", b"garbage bytes!!", "corrupt"),
        ("/headrace.v1.ScoringService/Score", b"\x0a\x02u\xc3", "UTF-8"),  # user_id
        ("/headrace.v1.ScoringService/Score", b"\xff\xff\xff\xff", "corrupt"),
    ],
)
def test_undecodable_requests_are_invalid_argument_over_grpc(
    client: FeatureClient, server: FeatureServer, method: str, raw: bytes, cause: str
) -> None:
    with grpc.insecure_channel(client.address) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as rpc:
            call(raw, timeout=5)
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT, rpc.value.details()
    details = rpc.value.details()
    assert details.startswith("request: cannot be decoded") and cause in details
    name = method.rsplit("/", 1)[-1]
    assert server.metrics.value("headrace_serving_request_seconds_count", method=name) == 1
    # the server goes on answering
    assert client.get("user", ["u0"], ["user__ctr_24h"], as_of_ms=T0 + 1).entities[0].id == "u0"


def test_repeated_feature_names_over_grpc(client: FeatureClient) -> None:
    names = ["user__clicks_1h", "user__ctr_24h"]
    once = client.get("user", ["u0", "u1"], names, as_of_ms=T0 + 1)
    twice = client.get("user", ["u0", "u1"], names + names[::-1] + names, as_of_ms=T0 + 1)
    assert twice.feature_names == names
    assert twice == once
    with pytest.raises(InvalidArgument) as err:
        client.get("user", ["u0"], ["user__ctr_24h"] * 100_000)
    assert err.value.field == "feature_names" and "100000 names exceed" in str(err.value)


def _bid_only_champion(models_dir: Path) -> str:
    """A real LightGBM champion on ``bid_cpm`` alone (Score reads no entity for it)."""
    import lightgbm as lgb
    import numpy as np

    from headrace.model.artifact import set_champion, write_artifact

    rng = np.random.default_rng(1)
    x = rng.random((400, 1)) * 20
    y = (rng.random(400) < 0.02 + 0.01 * x[:, 0]).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1, "seed": 1},
                        lgb.Dataset(x, y, feature_name=["bid_cpm"]), 5)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({"features": ["bid_cpm"]}))

    version = write_artifact(models_dir, datetime(2024, 5, 1, 13, tzinfo=UTC), fill)[0]
    set_champion(models_dir, version)
    return version


def test_absurd_bids_are_invalid_argument_over_grpc(loaded: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _bid_only_champion(models)
    # a cap of its own (HEADRACE_MAX_BID_CPM): twice it is still under the default cap
    settings = loaded.settings(ServeSettings, models_dir=str(models), max_bid_cpm=500.0,
                               **SLACK)
    with build_server(settings, port=0, host="127.0.0.1") as srv, \
            FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=5.0) as client:
        client.wait_ready()
        cands = [{"ad_id": "a0", "campaign_id": "c0", "bid_cpm": 2.0},
                 {"ad_id": "a1", "campaign_id": "c1", "bid_cpm": settings.max_bid_cpm}]
        ranked = client.score("u0", cands)
        assert all(math.isfinite(r["ecpm"]) for r in ranked) and ranked[0]["ad_id"] == "a1"
        for bad in (1e308, settings.max_bid_cpm * 2, math.inf, math.nan, -1.0):
            with pytest.raises(InvalidArgument) as err:
                client.score("u0", [cands[0], {**cands[1], "bid_cpm": bad}])
            assert err.value.field == "candidates[1].bid_cpm", str(err.value)


def test_health_and_reflection(server: FeatureServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "headrace.v1.FeatureService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        names = {s.name for r in refl.ServerReflectionInfo(iter([req]), timeout=5)
                 for s in r.list_services_response.service}
    assert "headrace.v1.FeatureService" in names and "grpc.health.v1.Health" in names


# ------------------------------------------------------------------ outage
def test_redis_outage_answers_from_priors(ns: Any, tmp_path: Any) -> None:
    import redis

    from bench.lookup import start_redis

    proc, port = start_redis(str(tmp_path))
    try:
        url = f"redis://127.0.0.1:{port}/0"
        own = redis.Redis(port=port)
        priors = Priors({"user__ctr_24h": 0.04}, {("US", "mobile"): {"user__ctr_24h": 0.09}})
        own.set(priors_key(ns.redis_prefix), priors.to_json())
        write_states(own, ns.redis_prefix, build_states(make_events()))
        settings = ns.settings(
            ServeSettings, redis_url=url, breaker_failures=2, redis_budget_ms=200.0
        )
        with build_server(settings, port=0, host="127.0.0.1") as srv, \
                FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=2.0) as client:
            client.wait_ready()
            before = client.get("user", ["u0"], ["user__ctr_24h"], as_of_ms=T0 + 1)
            assert before.fallback_reason == "NONE"
            proc.send_signal(signal.SIGSTOP)  # hung Redis: socket timeouts
            hung = client.get("user", ["u0"], ["user__ctr_24h"], country="US",
                              device_type="mobile")
            assert hung.fallback_reason == "REDIS_ERROR"
            assert hung.entities[0].values == {"user__ctr_24h": 0.09}
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
            reasons = []
            for _ in range(4):
                start = time.perf_counter()
                answer = client.get("user", ["u0", "u1"], ["user__ctr_24h"])
                assert time.perf_counter() - start < 0.5
                assert {s for e in answer.entities for s in e.statuses.values()} == {"FALLBACK"}
                assert [e.values["user__ctr_24h"] for e in answer.entities] == [0.04, 0.04]
                reasons.append(answer.fallback_reason)
            assert reasons[-1] == "BREAKER_OPEN"
            # this server's own registry: exactly what its answers said, nothing else
            m = srv.metrics
            assert m.value("headrace_serving_breaker_state") == 2  # OPEN
            assert m.value("headrace_serving_fallbacks_total", tier="SEGMENT",
                           reason="REDIS_ERROR") == 1  # the hung read
            for reason in ("REDIS_ERROR", "BUDGET_EXCEEDED", "BREAKER_OPEN"):
                assert m.value("headrace_serving_fallbacks_total", tier="GLOBAL",
                               reason=reason) == 2 * reasons.count(reason)
            assert m.value("headrace_serving_request_seconds_count",
                           method="GetOnlineFeatures") == 6
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ------------------------------------------------------------------ the CLI
def _env(ns: Any) -> dict[str, str]:
    return ns.subprocess_env(HEADRACE_REDIS_BUDGET_MS=str(SLACK["redis_budget_ms"]))


def _cli(ns: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "headrace.cli", *args], capture_output=True,
                          text=True, env=_env(ns), timeout=timeout)


def test_get_prints_exact_as_of_values(loaded: Any, events: list[dict[str, Any]]) -> None:
    states = build_states(events)  # independent of what the CLI reads
    at = T0 + 90_000
    proc = _cli(loaded, "get", "--entity", "user", "--id", "u0", "--id", "u4", "--id", "ghost",
                "--at", str(at), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["id"] for x in lines] == ["u0", "u4", "ghost"]
    for line in lines[:2]:
        assert line["as_of"] == at and line["entity"] == "user"
        assert line["features"] == states[("user", line["id"])].rollup(at)[0]
    assert lines[2]["features"] == oracle.defaults("user")
    latest = states[("user", "u0")].max_ts
    early = _cli(loaded, "get", "--entity", "user", "--id", "u0", "--id", "u4", "--at",
                 str(latest - 1), "--json")
    assert early.returncode == 1
    first = json.loads(early.stdout.splitlines()[0])
    assert "offline" in first["error"] and "features" not in first


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_command_and_get_through_it(loaded: Any) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    metrics_port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "headrace.cli", "serve", "--port", "0",
                              "--host", "127.0.0.1", "--metrics-port", str(metrics_port)],
                             stdout=subprocess.PIPE, text=True, env=_env(loaded))
    try:
        assert serve.stdout is not None
        port = json.loads(serve.stdout.readline())["port"]
        proc = _cli(loaded, "get", "--server", f"127.0.0.1:{port}", "--entity", "user",
                    "--id", "u0", "--features", "user__ctr_24h,user__clicks_1h", "--at",
                    str(T0 + 1), "--json")
        assert proc.returncode == 0, proc.stderr
        line = json.loads(proc.stdout)
        assert set(line["statuses"]) == {"user__ctr_24h", "user__clicks_1h"}
        assert line["fallback_reason"] == "NONE" and line["tier"] in {"PERSONALIZED", "BLENDED"}
        bad = _cli(loaded, "get", "--server", f"127.0.0.1:{port}", "--entity", "user",
                   "--id", "u0", "--at", "1")
        assert bad.returncode != 0 and "as_of_ms" in bad.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for name in ("headrace_serving_request_seconds_count{method=\"GetOnlineFeatures\"}",
                     "headrace_serving_redis_seconds", "headrace_serving_breaker_state 0.0",
                     "headrace_serving_entities_total", "headrace_scoring_seconds",
                     "process_resident_memory_bytes", "python_info"):
            assert name in text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        # the two gets: both timed and read; only the good one was answered
        assert samples[("headrace_serving_request_seconds_count",
                        (("method", "GetOnlineFeatures"),))] == 2
        assert samples[("headrace_serving_redis_seconds_count", ())] == 2
        assert sum(v for (n, labels), v in samples.items()
                   if n == "headrace_serving_entities_total") == 1
        assert not any(n == "headrace_serving_fallbacks_total" for n, _ in samples)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0


# ------------------------------------------------------------------ priors
def _write_events(settings: OfflineSettings, kind: str, rows: list[dict[str, Any]]) -> None:
    fs = settings.pyarrow_s3()
    table = pa.Table.from_pylist(rows)
    table = table.set_column(
        table.schema.get_field_index("ts"),
        "ts",
        pa.array([r["ts"] for r in rows], pa.timestamp("ms", tz="UTC")),
    )
    base = events_dir(settings.offline_path(), kind)
    pq.write_table(table, f"{base}/date=2023-11-14/{kind}s-p000-000000000000.parquet",
                   filesystem=fs)


def test_priors_from_the_offline_store_reach_the_server(ns: Any, redis_client: Any) -> None:
    from offline.priors import build_priors, write_priors

    events = make_events(seed=5, users=12, n=400)
    coords = [{"_partition": 0, "_offset": i, "_index": 0, "_ingest_ms": T0}
              for i in range(len(events))]
    imps = [{k: e[k] for k in ("event_id", "ts", "user_id", "ad_id", "campaign_id",
                               "publisher_id", "country", "device_type")} | c
            for e, c in zip(events, coords, strict=True) if e["type"] == "impression"]
    clicks = [{k: e[k] for k in ("event_id", "ts", "user_id", "ad_id", "campaign_id",
                                 "publisher_id")} | c | {"impression_id": "x"}
              for e, c in zip(events, coords, strict=True) if e["type"] == "click"]
    settings = ns.settings(OfflineSettings)
    _write_events(settings, "impression", imps + imps[:10])  # duplicates are dropped
    _write_events(settings, "click", clicks)
    priors = build_priors(settings, REG, until_ms=T0 + 1, days=7, min_segment_users=1)
    lo = T0 + 1 - 7 * DAY  # the lookback drops the older events (users u7.. go back 12 days)
    n_imps = sum(1 for r in imps if r["ts"] >= lo)
    n_clicks = sum(1 for r in clicks if r["ts"] >= lo)
    assert priors.meta["impressions"] == n_imps and priors.meta["clicks"] == n_clicks
    assert priors.global_values["user__ctr_24h"] == n_clicks / n_imps
    cli = _cli(ns, "priors", "--until", str(T0 + 1), "--min-segment-users", "1", "--json")
    assert cli.returncode == 0, cli.stderr
    stored = Priors.from_json(redis_client.get(priors_key(ns.redis_prefix)))
    assert stored == Priors.from_json(cli.stdout)
    assert (stored.global_values, stored.segments) == (priors.global_values, priors.segments)
    write_priors(settings, priors)
    with build_server(ns.settings(ServeSettings, **SLACK), port=0, host="127.0.0.1") as srv, \
            FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=5.0) as client:
        answer = client.get("user", ["ghost"], ["user__ctr_24h"], country="US",
                            device_type="mobile")
        seg = priors.segments[("US", "mobile")]["user__ctr_24h"]
        assert answer.entities[0].values == {"user__ctr_24h": seg}
        assert answer.entities[0].tier == "SEGMENT"
