"""Benchmark: ``ScoringService.Score`` of 1 user × 100 candidates, end to end, with floors.

Setup (not timed): a private ``redis-server`` on a free loopback port holding full
standard states of ``users`` users, ``ads`` ads, ``campaigns`` campaigns and
``publishers`` publishers (:func:`bench.lookup.populate`: 7 days of synthetic events);
a real LightGBM model of ``trees`` trees (``leaves`` leaves) on 28 features — the 20
served features, ``hour_of_day``, ``day_of_week``, ``bid_cpm`` and the 5 context
categoricals — trained on a synthetic training set and promoted to champion in a
temporary models folder. The server runs in a SEPARATE process
(``python -m bench.score --serve MEMO``: :func:`serving.server.build_server` with default
settings, as ``headrace serve``).

Client-observed latency over loopback (sync gRPC client, one call at a time): each call
ranks 100 distinct random ads (campaign = ad mod ``campaigns``) for a random user and
publisher: 1 + 100 + ≤50 + 1 keys in one Redis round trip, one LightGBM call.

* ``p50_ms`` / ``p99_ms``: roll-up memo OFF (every state decoded and rolled up per call);
  ``*_memo``: the default 8192-entry memo (the states never change here, so it answers
  nearly every read; production sits in between). These servers run today's
  configuration: no traffic split (``HEADRACE_SPLIT_ENABLED=false``), no prediction log.
* ``p50_ms_split_log`` / ``p99_ms_split_log`` (and ``*_memo``): a second server child,
  same data and memo setting, with a traffic split in Redis (:data:`SPLIT_SHARE` of
  the users to a second LightGBM version of the same shape) and the prediction log
  sending every answer to a Kafka-protocol broker (the local stack's Tansu). Each
  request goes to both servers, in rotating order; ``overhead_p99_ms`` is
  ``p99_ms_split_log - p99_ms`` of the same run (target <= 0.5 ms),
  ``challenger_share`` the fraction of its answers the challenger gave and
  ``prediction_records`` the records read back from the topic.
* ``aa_p50_diff_ms`` / ``aa_p99_diff_ms`` (and ``*_memo``): the same difference between
  a third child in today's configuration and the first one: the noise floor of
  ``overhead_*`` in this run (two identical servers differ by this much).

Floors measured in the same run, interleaved call by call with the figure they belong to:

* ``inprocess_p50_ms`` / ``inprocess_p99_ms``: the same request answered by a
  :class:`~serving.scoring.ScoringService` in THIS process (same memo setting, same Redis):
  the server's work without gRPC;

* ``model_only_p50_ms`` / ``model_only_p99_ms``: the same LightGBM predict (one thread)
  of the same 100 rows (built by an in-process scorer from the same Redis), here;
* ``echo_p50_ms`` / ``echo_p99_ms``: an empty unary RPC to the same server process;
* ``redis_p99_ms``: a redis-py pipelined HMGET of the same keys, from this process.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.server_child import ServerChild, bench_main, pct

__all__ = ["run", "main", "train_bench_model"]

_ROOT = Path(__file__).resolve().parent.parent
_PREFIX = "hrbench"  # bench.lookup.populate writes under this prefix
#: the challenger's share of users in the split variant
SPLIT_SHARE = 0.10
_TOPIC_PREFIX = "bench-score."


def train_bench_model(models_dir: Path, *, trees: int = 100, leaves: int = 31,
                      rows: int = 20_000, seed: int = 0) -> tuple[str, list[str]]:
    """Train and promote the benchmark model; returns (version, features)."""
    from datetime import UTC, datetime

    import numpy as np

    from feature_defs.registry import registry_for
    from headrace.core.settings import CommonSettings
    from headrace.model.artifact import set_champion, write_artifact
    from headrace.model.booster import lightgbm
    from headrace.model.coldstart import CONTEXT_CATEGORICAL

    lgb = lightgbm()
    served = registry_for(CommonSettings()).feature_names()  # what the servers serve
    features = [*served, "hour_of_day", "day_of_week", "bid_cpm", *CONTEXT_CATEGORICAL]
    rng = np.random.default_rng(seed)
    x = np.empty((rows, len(features)))
    for j, name in enumerate(served):
        if "__ctr_" in name:
            x[:, j] = np.where(rng.random(rows) < 0.1, np.nan, rng.beta(2, 60, rows))
        else:
            x[:, j] = np.floor(rng.lognormal(2.5, 1.5, rows))
    k = len(served)
    x[:, k], x[:, k + 1] = rng.integers(0, 24, rows), rng.integers(0, 7, rows)
    x[:, k + 2] = rng.gamma(2.0, 1.0, rows)
    x[:, k + 3:] = rng.integers(0, 8, (rows, len(CONTEXT_CATEGORICAL)))
    logit = -3.5 + 8 * np.nan_to_num(x[:, served.index("user__ctr_24h")]) \
        + 6 * np.nan_to_num(x[:, served.index("ad__ctr_24h")]) + 0.05 * x[:, k + 3]
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    params = {"objective": "binary", "verbosity": -1, "num_leaves": leaves,
              "min_data_in_leaf": 5, "num_threads": 1, "seed": seed, "deterministic": True}
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=features,
                                            categorical_feature=list(CONTEXT_CATEGORICAL)),
                        num_boost_round=trees)
    metadata = {"features": features, "categorical": list(CONTEXT_CATEGORICAL),
                "categories": {c: [f"v{i}" for i in range(8)] for c in CONTEXT_CATEGORICAL},
                "model": "lightgbm-binary", "note": "synthetic benchmark model"}

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({**metadata, "version": version}))

    version, _ = write_artifact(models_dir, datetime.now(UTC), fill)
    set_champion(models_dir, version)
    return version, features


def run(users: int = 1000, ads: int = 500, campaigns: int = 50, publishers: int = 50,
        candidates: int = 100, rounds: int = 2000, trees: int = 100, leaves: int = 31,
        seed: int = 0) -> dict[str, Any]:
    """Set up, measure and return the figures (JSON-able). See the module docstring."""
    import redis

    from bench.lookup import populate, start_redis
    from feature_defs.layout import entity_key
    from feature_defs.registry import registry_for
    from headrace.api.v1 import scoring_pb2 as spb
    from headrace.core.online_store import RedisOnlineStore
    from headrace.core.settings import ServeSettings
    from headrace.model.artifact import set_champion
    from headrace.rollout.split import SplitState, split_key
    from headrace.stack.local import local_stack
    from serving.breaker import CircuitBreaker
    from serving.client import build_score_request
    from serving.priors import PriorsCache
    from serving.reader import OnlineReader
    from serving.scoring import ScoringService, model_watcher

    rng = random.Random(seed + 1)
    fig: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="headrace-bench-score-") as workdir, \
            local_stack(os.path.join(workdir, "stack")) as stack:
        rproc, rport = start_redis(workdir)
        children: list[ServerChild] = []
        try:
            url = f"redis://127.0.0.1:{rport}/0"
            t0 = time.perf_counter()
            counts = populate(url, users=users, ads=ads, campaigns=campaigns,
                              publishers=publishers, now_ms=time.time_ns() // 1_000_000,
                              seed=seed)
            models = Path(workdir) / "models"
            version, features = train_bench_model(models, trees=trees, leaves=leaves,
                                                  seed=seed)
            challenger, _ = train_bench_model(models, trees=trees, leaves=leaves,
                                              seed=seed + 7)
            set_champion(models, version)
            setup_s = time.perf_counter() - t0
            env = {**os.environ, "HEADRACE_REDIS_URL": url, "HEADRACE_REDIS_PREFIX": _PREFIX,
                   "HEADRACE_MODELS_DIR": str(models), "PYTHONPATH": str(_ROOT)}
            today = {**env, "HEADRACE_SPLIT_ENABLED": "false", "HEADRACE_PREDICTION_LOG": "false"}
            split_env = {**env, "HEADRACE_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
                         "HEADRACE_BROKER_PROFILE": "embedded", "HEADRACE_PREDICTION_LOG": "true",
                         "HEADRACE_TOPIC_PREFIX": _TOPIC_PREFIX, "HEADRACE_SPLIT_ENABLED": "true",
                         "HEADRACE_SERVER_ID": "bench-split"}
            settings = ServeSettings.from_env(env)
            store = RedisOnlineStore(url, timeout_ms=settings.redis_budget_ms)
            reg = registry_for(settings)
            watcher = model_watcher(models, reg)
            watcher.refresh()
            raw = redis.Redis(port=rport)
            raw.set(split_key(_PREFIX), SplitState(
                1, "bench", version, challenger, SPLIT_SHARE, False, 2,
                time.time_ns() // 1_000_000).to_json())

            def shape(local: ScoringService) -> tuple[Any, Any, list[str]]:
                user, pub = f"u{rng.randrange(users)}", f"p{rng.randrange(publishers)}"
                picked = rng.sample(range(ads), candidates)
                req = build_score_request(user, [
                    {"ad_id": f"a{a}", "campaign_id": f"c{a % campaigns}",
                     "bid_cpm": round(rng.uniform(0.2, 5.0), 2)} for a in picked],
                    {"country": "v1", "device_type": "v2", "placement": "v3",
                     "publisher_id": pub})
                keys = [entity_key(_PREFIX, "user", user), entity_key(_PREFIX, "publisher", pub)]
                keys += [entity_key(_PREFIX, "ad", f"a{a}") for a in picked]
                keys += [entity_key(_PREFIX, "campaign", f"c{c}")
                         for c in dict.fromkeys(a % campaigns for a in picked)]
                return req, local.feature_matrix(req), keys

            fields = [f"{e}_activity@1" for e in ("user", "ad", "campaign", "publisher")]
            served = {version: 0, challenger: 0}
            for memo, tag in ((0, ""), (8192, "_memo")):
                children.append(child := ServerChild(today, memo, timeout_s=2.0))
                children.append(variant := ServerChild(split_env, memo, timeout_s=2.0))
                children.append(twin := ServerChild(today, memo, timeout_s=2.0))
                local = ScoringService(reg, OnlineReader(store, _PREFIX, memo_entries=memo),
                                       PriorsCache(store, _PREFIX), CircuitBreaker(), watcher,
                                       budget_ms=1000.0)
                rpc, split_rpc, twin_rpc, model_t, echo, floor, work = [], [], [], [], [], [], []
                calls = [child.client.score_call, variant.client.score_call,
                         twin.client.score_call]
                for i in range(rounds + rounds // 10):  # the first 10% warm up
                    req, (model, x), keys = shape(local)
                    timed: list[tuple[float, Any]] = [(0.0, None)] * 3
                    for k in range(3):  # rotate which server answers first
                        j = (i + k) % 3
                        timed[j] = _timed(calls[j], req)
                    (t_rpc, resp), (t_split, sresp), (t_twin, _) = timed
                    s = time.perf_counter()
                    local.score(req)
                    t_work = time.perf_counter() - s
                    s = time.perf_counter()
                    model.predict(x)
                    t_model = time.perf_counter() - s
                    s = time.perf_counter()
                    child.echo(b"", timeout=2.0)
                    t_echo = time.perf_counter() - s
                    s = time.perf_counter()
                    pipe = raw.pipeline(transaction=False)
                    for k in keys:
                        pipe.hmget(k, fields)
                    pipe.execute()
                    t_redis = time.perf_counter() - s
                    if resp.model_version != version or len(resp.order) != candidates:
                        raise RuntimeError(f"unexpected answer: {resp.model_version}")
                    want = challenger if sresp.arm == spb.CHALLENGER else version
                    if sresp.model_version != want or len(sresp.order) != candidates:
                        raise RuntimeError(f"unexpected split answer: {sresp.model_version}")
                    if i >= rounds // 10:
                        rpc.append(t_rpc)
                        split_rpc.append(t_split)
                        twin_rpc.append(t_twin)
                        model_t.append(t_model)
                        echo.append(t_echo)
                        floor.append(t_redis)
                        work.append(t_work)
                        served[sresp.model_version] += 1
                fig[f"p50_ms{tag}"], fig[f"p99_ms{tag}"] = pct(rpc, 0.5), pct(rpc, 0.99)
                fig[f"p50_ms_split_log{tag}"] = pct(split_rpc, 0.5)
                fig[f"p99_ms_split_log{tag}"] = pct(split_rpc, 0.99)
                fig[f"overhead_p50_ms{tag}"] = round(
                    fig[f"p50_ms_split_log{tag}"] - fig[f"p50_ms{tag}"], 3)
                fig[f"overhead_p99_ms{tag}"] = round(
                    fig[f"p99_ms_split_log{tag}"] - fig[f"p99_ms{tag}"], 3)
                fig[f"aa_p50_diff_ms{tag}"] = round(pct(twin_rpc, 0.5) - fig[f"p50_ms{tag}"], 3)
                fig[f"aa_p99_diff_ms{tag}"] = round(pct(twin_rpc, 0.99) - fig[f"p99_ms{tag}"], 3)
                fig[f"model_only_p50_ms{tag}"] = pct(model_t, 0.5)
                fig[f"model_only_p99_ms{tag}"] = pct(model_t, 0.99)
                fig[f"echo_p50_ms{tag}"], fig[f"echo_p99_ms{tag}"] = (
                    pct(echo, 0.5), pct(echo, 0.99))
                fig[f"inprocess_p50_ms{tag}"] = pct(work, 0.5)
                fig[f"inprocess_p99_ms{tag}"] = pct(work, 0.99)
                fig[f"redis_p50_ms{tag}"], fig[f"redis_p99_ms{tag}"] = (
                    pct(floor, 0.5), pct(floor, 0.99))
            store.close()
            for child in children:
                child.stop()  # the split children flush their prediction logs
            children = []
            records = _count_records(stack.kafka_bootstrap, _TOPIC_PREFIX, 2 * rounds * 1.1)
        finally:
            for child in children:
                child.stop()
            if rproc.poll() is None:
                rproc.kill()
            rproc.wait()
    overhead_ok = fig["overhead_p99_ms"] <= 0.5
    return {"benchmark": "score", "candidates": candidates,
            **{k: fig[k] for k in ("p50_ms", "p99_ms", "model_only_p50_ms",
                                   "model_only_p99_ms", "inprocess_p50_ms", "inprocess_p99_ms",
                                   "echo_p50_ms", "echo_p99_ms", "redis_p99_ms",
                                   "p50_ms_split_log", "p99_ms_split_log", "overhead_p50_ms",
                                   "overhead_p99_ms", "aa_p50_diff_ms", "aa_p99_diff_ms")},
            **{k: v for k, v in sorted(fig.items()) if k.endswith("_memo")},
            "split": {"share": SPLIT_SHARE, "challenger_share": round(
                served[challenger] / max(1, sum(served.values())), 4),
                "prediction_records": records, "answers": 2 * rounds + 2 * (rounds // 10)},
            "targets": {"p99_ms_max": 5.0, "met": fig["p99_ms"] <= 5.0,
                        "met_memo": fig["p99_ms_memo"] <= 5.0,
                        "overhead_p99_ms_max": 0.5, "overhead_met": overhead_ok,
                        "overhead_met_memo": fig["overhead_p99_ms_memo"] <= 0.5},
            "model": {"version": version, "challenger": challenger,
                      "features": len(features), "trees": trees, "leaves": leaves},
            "params": {"users": users, "ads": ads, "campaigns": campaigns,
                       "publishers": publishers, "rounds": rounds},
            "data": counts, "setup_seconds": round(setup_s, 1), "cpu_count": os.cpu_count()}


def _timed(call: Any, req: Any) -> tuple[float, Any]:
    s = time.perf_counter()
    resp = call(req, timeout=2.0)
    return time.perf_counter() - s, resp


def _count_records(bootstrap: str, topic_prefix: str, most: float, within_s: float = 20.0
                   ) -> int:
    """How many decodable prediction records the split children left on their topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from feature_defs.layout import TOPIC_PREDICTIONS
    from feature_defs.predictions import decode_prediction

    topic = f"{topic_prefix}{TOPIC_PREDICTIONS}"
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-score",
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        n, idle, deadline = 0, 0, time.monotonic() + within_s
        while n < most and idle < 4 and time.monotonic() < deadline:
            batch = consumer.consume(1000, timeout=0.5)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error() is None:
                    decode_prediction(msg.value())
                    n += 1
        return n
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> None:
    bench_main(run, argv)


if __name__ == "__main__":
    main()
