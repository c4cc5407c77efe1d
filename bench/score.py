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
* with ``explore=1`` (ε-greedy) or ``explore=2`` (Thompson): a fourth child, today's
  configuration plus ``HEADRACE_EXPLORE`` (defaults otherwise: ε 0.05, budget 2 %,
  seed 1), in the same rotation: ``p50_ms_explore`` / ``p99_ms_explore`` (and
  ``*_memo``), ``overhead_explore_p50_ms`` / ``overhead_explore_p99_ms`` against the
  first child, ``explore.explored_share``: the share of its answers whose first
  candidate differs from the first child's (same request, same model: the greedy
  answer, but each server reads the features as of its own clock, so a window edge
  between the two calls can flip the top: ``explore.twin_first_differs`` is the same
  share between the two identical children, the floor of that measure), and
  ``explore.budget_window_share``: explored / answers of the last 60 s as the exploring
  servers counted them in Redis (the budget's own figure). Every bench ad has fewer
  than 1,000 impressions in 24 h, so every request is eligible: the worst case for the
  draws' cost. Until ``serving/server.py`` passes
  ``explore=`` to the ScoringService it builds, this child
  (``python -m bench.score --serve-explore MEMO``) adds it itself.

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

__all__ = ["run", "main", "train_bench_model", "run_exploring_score", "EXPLORE_POLICIES"]

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


#: ``explore=N`` of :func:`run`: the policy of the exploring child
EXPLORE_POLICIES = {1: "eps-greedy", 2: "thompson"}


def run(users: int = 1000, ads: int = 500, campaigns: int = 50, publishers: int = 50,
        candidates: int = 100, rounds: int = 2000, trees: int = 100, leaves: int = 31,
        seed: int = 0, explore: int = 0) -> dict[str, Any]:
    """Set up, measure and return the figures (JSON-able). See the module docstring.

    Raises:
        InputError: ``explore`` is not 0, 1 or 2.
    """
    from headrace.core.errors import InputError

    if explore and explore not in EXPLORE_POLICIES:
        raise InputError(f"explore must be 0 (off), 1 (eps-greedy) or 2 (thompson), not "
                         f"{explore}")
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
            explore_env = {**today, "HEADRACE_EXPLORE": EXPLORE_POLICIES.get(explore, "off"),
                           "HEADRACE_EXPLORE_SEED": "1", "HEADRACE_SERVER_ID": "bench-explore"}
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
            explored = answered = twin_differs = 0
            window_share = None
            for memo, tag in ((0, ""), (8192, "_memo")):
                children.append(child := ServerChild(today, memo, timeout_s=2.0))
                children.append(variant := ServerChild(split_env, memo, timeout_s=2.0))
                children.append(twin := ServerChild(today, memo, timeout_s=2.0))
                if explore:
                    children.append(explorer := ServerChild(explore_env, memo, timeout_s=2.0))
                local = ScoringService(reg, OnlineReader(store, _PREFIX, memo_entries=memo),
                                       PriorsCache(store, _PREFIX), CircuitBreaker(), watcher,
                                       budget_ms=1000.0)
                rpc, split_rpc, twin_rpc, model_t, echo, floor, work = [], [], [], [], [], [], []
                explore_rpc: list[float] = []
                calls = [child.client.score_call, variant.client.score_call,
                         twin.client.score_call]
                if explore:
                    calls.append(explorer.client.score_call)
                for i in range(rounds + rounds // 10):  # the first 10% warm up
                    req, (model, x), keys = shape(local)
                    timed: list[tuple[float, Any]] = [(0.0, None)] * len(calls)
                    for r in range(len(calls)):  # rotate which server answers first
                        j = (i + r) % len(calls)
                        timed[j] = _timed(calls[j], req)
                    (t_rpc, resp), (t_split, sresp), (t_twin, tresp) = timed[:3]
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
                        if explore:
                            t_exp, eresp = timed[3]
                            explore_rpc.append(t_exp)
                            explored += eresp.order[0] != resp.order[0]
                            twin_differs += tresp.order[0] != resp.order[0]
                            answered += 1
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
                if explore:
                    fig[f"p50_ms_explore{tag}"] = pct(explore_rpc, 0.5)
                    fig[f"p99_ms_explore{tag}"] = pct(explore_rpc, 0.99)
                    fig[f"overhead_explore_p50_ms{tag}"] = round(
                        fig[f"p50_ms_explore{tag}"] - fig[f"p50_ms{tag}"], 3)
                    fig[f"overhead_explore_p99_ms{tag}"] = round(
                        fig[f"p99_ms_explore{tag}"] - fig[f"p99_ms{tag}"], 3)
            if explore:  # the exploring servers' own counts, before they stop
                window_share = _window_share(raw, f"{_PREFIX}:explore:window")
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
    extra: dict[str, Any] = {}
    if explore:
        extra["explore"] = {"policy": EXPLORE_POLICIES[explore], "answers": answered,
                            "explored_share": round(explored / max(1, answered), 4),
                            "twin_first_differs": round(twin_differs / max(1, answered), 4),
                            "budget_window_share": window_share,
                            **{k: fig[k] for k in ("p50_ms_explore", "p99_ms_explore",
                                                   "overhead_explore_p50_ms",
                                                   "overhead_explore_p99_ms")}}
        extra["targets_explore"] = {"p99_ms_max": 5.0, "met": fig["p99_ms_explore"] <= 5.0,
                                    "met_memo": fig["p99_ms_explore_memo"] <= 5.0}
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
            "data": counts, "setup_seconds": round(setup_s, 1), "cpu_count": os.cpu_count(),
            **extra}


def _window_share(client: Any, key: str, window_s: int = 60) -> float | None:
    """explored / answers of the last ``window_s`` seconds in the exploration budget's
    hash (``n:{second}``, ``e:{second}`` fields), None when it holds no answer."""
    lo = int(time.time()) - window_s
    n = e = 0
    for field, value in client.hgetall(key).items():
        kind, _, second = field.decode().partition(":")
        if int(second) > lo:
            if kind == "n":
                n += int(value)
            else:
                e += int(value)
    return round(e / n, 4) if n else None


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
                    decode_prediction(msg.value() or b"")
                    n += 1
        return n
    finally:
        consumer.close()


def run_exploring_score(policy: str = "eps-greedy", *, epsilon: float = 0.05,
                        budget: float = 0.02, seconds: float = 900.0, rate: float = 100.0,
                        servers: int = 2, candidates: int = 20, known_ads: int = 200,
                        new_ad_every_s: float = 60.0, new_ad_impressions: int = 1000,
                        new_user_share: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """A seeded simulation of exploring ``Score`` servers: the product's decisions
    (:mod:`serving.exploration`: eligibility, the shared budget, the policy's draw and
    propensity) on a synthetic ad world, no stack, no gRPC.

    World: ``known_ads`` ads with 10,000 past impressions; a new ad every
    ``new_ad_every_s`` seconds (0 impressions); true CTRs ~ Beta(2, 60) (mean 3.2 %);
    the model's pCTR of an ad is its shrunk CTR ``(clicks + 2) / (impressions + 100)``
    (what a model on ``ad__ctr_24h`` with cold-start priors learns; a new ad starts at the
    2 % prior), refreshed as impressions and clicks accrue; bids ~ U(0.5, 2). Each of
    ``servers`` servers answers ``rate`` requests/s of ``candidates`` ads drawn from the
    pool (``new_user_share`` of them from a new user, tier SEGMENT); the budgets share
    one in-memory counter, flushed every 0.25 s, staggered. The shown ad earns one
    impression and a click with its true CTR.

    Returns:
        ``explore_share`` (explored answers / answers), ``explore_share_max_60s`` (the
        largest share over a trailing 60 s window, sampled each second once the window is
        full), ``ctr`` (clicks per answer: the cost of exploring), per new ad the seconds
        from arrival to ``new_ad_impressions`` impressions
        (``new_ads_reaching_1000_impressions_s``: median and p90 over those that did,
        ``new_ads_reached`` / ``new_ads``), ``new_ad_impressions_mean`` (impressions per
        new ad at the end), and ``log``: per answer the logged
        ``propensity``, ``explored``, ``shown`` and ``greedy`` (candidate index),
        ``click``, and per candidate ``true_ctr``, ``p_ctr`` and ``bid`` (numpy arrays,
        answers × candidates), for off-policy evaluation.

    Raises:
        InputError: a policy other than ``off``, ``eps-greedy`` or ``thompson``, or a
            setting out of its bounds.
    """
    import numpy as np

    from feature_defs.coldstart import Tier
    from serving.exploration import (
        ExploreBudget,
        ExploreConfig,
        MemoryBudgetCounter,
        decide,
        is_eligible,
        request_rng,
    )

    cfg = ExploreConfig(policy, epsilon, budget, seed, new_ad_impressions)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    t0 = 1_900_000_000.0
    clock = [t0]
    counter = MemoryBudgetCounter()
    budgets = [ExploreBudget(budget, counter, f"s{i}", clock=lambda: clock[0])
               for i in range(servers)]
    n_new = int(seconds // new_ad_every_s)
    total = known_ads + n_new
    true_ctr = rng.beta(2.0, 60.0, total)
    imps = np.zeros(total)
    imps[:known_ads] = 10_000.0
    clicks = np.zeros(total)
    clicks[:known_ads] = rng.binomial(10_000, true_ctr[:known_ads])
    arrival = np.full(total, np.inf)
    arrival[:known_ads] = t0
    arrival[known_ads:] = t0 + new_ad_every_s * np.arange(1, n_new + 1)
    reached = np.full(total, np.nan)
    n_req = int(seconds * rate) * servers
    log_k = np.empty((n_req, candidates, 3))
    log_1 = np.empty((n_req, 5))
    window: list[tuple[float, int]] = []
    worst, last_sample, flushes = 0.0, t0, [t0 + 0.25 * (i + 1) / servers for i in range(servers)]
    explored_total = clicked = 0
    dt = 1.0 / (rate * servers)
    personal, new_user = int(Tier.PERSONALIZED), int(Tier.SEGMENT)
    for i in range(n_req):
        clock[0] += dt
        now = clock[0]
        s = i % servers
        if now >= flushes[s]:
            budgets[s].flush()
            flushes[s] += 0.25
        live = np.flatnonzero(arrival <= now)
        ads = rng.choice(live, candidates, replace=False)
        bids = rng.uniform(0.5, 2.0, candidates)
        p = (clicks[ads] + 2.0) / (imps[ads] + 100.0)
        greedy = int(np.argmax(p * bids))
        tier = new_user if rng.random() < new_user_share else personal
        prop, explored, first = 1.0, False, greedy
        if cfg.on:
            b = budgets[s]
            if not is_eligible(imps[ads], tier, new_ad_impressions):
                b.count(False)
            elif b.try_reserve():
                d = decide(cfg, request_rng(seed, f"sim-{i}"), greedy, p, bids, imps[ads],
                           clicks[ads], np.full(candidates, 0.02))
                b.settle(d.explored)
                prop, explored, first = d.propensity, d.explored, d.first
        ad = ads[first]
        click = rng.random() < true_ctr[ad]
        imps[ad] += 1
        clicks[ad] += click
        if imps[ad] == new_ad_impressions and ad >= known_ads:
            reached[ad] = now - arrival[ad]
        explored_total += explored
        clicked += click
        log_k[i, :, 0], log_k[i, :, 1], log_k[i, :, 2] = true_ctr[ads], p, bids
        log_1[i] = (prop, explored, first, greedy, click)
        window.append((now, int(explored)))
        if now - last_sample >= 1.0:
            last_sample = now
            lo = next(j for j, (t, _) in enumerate(window) if t > now - 60.0)
            window = window[lo:]
            if now - t0 >= 60.0:
                worst = max(worst, sum(e for _, e in window) / len(window))
    times = reached[known_ads:][~np.isnan(reached[known_ads:])]
    return {"policy": cfg.label, "answers": n_req, "servers": servers, "budget": budget,
            "explore_share": round(explored_total / n_req, 5),
            "explore_share_max_60s": round(worst, 5), "ctr": round(float(clicked) / n_req, 5),
            "new_ads": n_new, "new_ads_reached": int(len(times)),
            "new_ad_impressions_mean": round(float(imps[known_ads:].mean()), 1) if n_new
            else None,
            "new_ads_reaching_1000_impressions_s": {
                "median": float(np.median(times)) if len(times) else None,
                "p90": float(np.quantile(times, 0.9)) if len(times) else None},
            "log": {"propensity": log_1[:, 0], "explored": log_1[:, 1].astype(bool),
                    "shown": log_1[:, 2].astype(np.int64),
                    "greedy": log_1[:, 3].astype(np.int64), "click": log_1[:, 4],
                    "true_ctr": log_k[:, :, 0], "p_ctr": log_k[:, :, 1],
                    "bid": log_k[:, :, 2]}}


def main(argv: list[str] | None = None) -> None:
    bench_main(run, argv)


if __name__ == "__main__":
    main()
