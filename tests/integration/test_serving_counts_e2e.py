"""The rollout's serving-side per-arm counts on a real redis-server (a private one per
test, so it can be frozen): the flush script itself (concurrent writers' min/max, a
resend after a lost reply, a key of the wrong type), two real servers whose counts sum
to exactly what they answered, and a Redis freeze that loses no count.

The oracle is the test's own tally of the answers it received (arm, version, pCTRs,
which requests it made fail), never the code under test.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.core.errors import OnlineStoreError
from headrace.model.artifact import set_champion
from headrace.rollout.serving_counts import (
    LATENCY_BOUNDS_MS,
    ServingCounts,
    ServingStatsSource,
    counts_key,
    flush_batch,
    read_serving_counts,
)
from headrace.rollout.split import SplitState, assign, split_key
from serving.rollout_counts import CountsAccumulator
from tests.integration.test_split_e2e import _bid_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROLLOUT = "r-counts"
SHARE = 0.4
FAIL_BID = 13.0  # a request carrying this bid makes the (patched) challenger raise


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A private redis-server on a free port: (process, port)."""
    from headrace.stack.proc import free_port
    from tests.localredis import start_redis

    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def _until(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.02)


# ---------------------------------------------------------------- the script itself
def test_concurrent_writers_keep_min_max_and_sums_exact(redis_server: Any) -> None:
    import redis

    _proc, port = redis_server
    prefix = f"hr{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    draws = rng.random((8, 40, 2)) * 0.2  # writer x batch x (a, b)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        client = redis.Redis(port=port)
        try:
            for i in range(40):
                lo, hi = sorted(draws[w, i])
                delta = ServingCounts.answer(f"p{w % 3}", float(i % 12), pctr=(lo, hi))
                flush_batch(client, prefix, {(ROLLOUT, "v2"): delta}, token=f"w{w}", seq=i + 1)
                # every other batch is resent, as after a lost reply: never counted twice
                if i % 2:
                    assert not flush_batch(client, prefix, {(ROLLOUT, "v2"): delta},
                                           token=f"w{w}", seq=i + 1)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = read_serving_counts(redis.Redis(port=port), prefix, ROLLOUT, "v2")
    assert got.requests == 320 and got.errors == 0
    assert got.min_pctr == float(draws.min(axis=2).min())
    assert got.max_pctr == float(draws.max(axis=2).max())
    assert dict(got.pub_requests) == {"p0": 120, "p1": 120, "p2": 80}
    lat = [0] * len(LATENCY_BOUNDS_MS)
    for i in range(40):
        lat[ServingCounts.answer("p", float(i % 12)).latency_counts.index(1)] += 8
    assert got.latency_counts == tuple(lat)
    ttl = redis.Redis(port=port).ttl(counts_key(prefix, ROLLOUT, "v2"))
    assert 29 * 86400 < ttl <= 30 * 86400


def test_a_key_of_the_wrong_type_writes_nothing(redis_server: Any) -> None:
    import redis

    _proc, port = redis_server
    client = redis.Redis(port=port)
    client.set(counts_key("hrw", ROLLOUT, "v2"), "not a hash")
    batch = {(ROLLOUT, "v1"): ServingCounts.answer("p", 1.0),
             (ROLLOUT, "v2"): ServingCounts.answer("p", 1.0)}
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        flush_batch(client, "hrw", batch, token="t", seq=1)
    assert not client.exists(counts_key("hrw", ROLLOUT, "v1"))  # checked before any write


def test_a_flush_lost_in_a_freeze_is_counted_once(redis_server: Any) -> None:
    import redis

    proc, port = redis_server
    client = redis.Redis(port=port, socket_timeout=0.2, retry=None)
    acc = CountsAccumulator("hrf", "s1")
    for _ in range(5):
        acc.record(ROLLOUT, "v1", "p", 1.0, np.array([0.1, 0.2]))
    client.ping()  # connected: the script reaches the frozen server's socket buffer
    proc.send_signal(signal.SIGSTOP)
    try:
        assert not acc.flush(client)  # no reply within 0.2 s: outcome unknown, kept
    finally:
        proc.send_signal(signal.SIGCONT)
    reader = redis.Redis(port=port)
    # on resume Redis runs the buffered script although its client gave up: the lost
    # reply a naive retry would count twice
    _until(lambda: read_serving_counts(reader, "hrf", ROLLOUT, "v1").requests == 5, 2.0,
           "the frozen flush applied on resume")
    acc.record(ROLLOUT, "v1", "p", 1.0, np.array([0.3]))
    assert acc.flush(client)  # the same batch and seq: skipped by the script, dropped
    assert read_serving_counts(reader, "hrf", ROLLOUT, "v1").requests == 5
    assert acc.flush(client)  # then the answer counted since
    got = read_serving_counts(reader, "hrf", ROLLOUT, "v1")
    assert (got.requests, got.min_pctr, got.max_pctr) == (6, 0.1, 0.3)


# ---------------------------------------------------------------- real servers
class Flaky:
    """The challenger's booster, raising for requests that carry :data:`FAIL_BID`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        if (x[:, 0] == FAIL_BID).any():
            raise ValueError("flaky challenger")
        return self.inner.predict(x, **kwargs)


class Tally:
    """The test's oracle: what the clients were answered, per version."""

    def __init__(self) -> None:
        self.counts: dict[str, ServingCounts] = {}

    def add(self, version: str, delta: ServingCounts) -> None:
        self.counts[version] = self.counts.get(version, ServingCounts()).merge(delta)


def _rig(tmp_path: Path, port: int, prefix: str, names: tuple[str, ...], *,
         split: bool = True, **extra: Any) -> tuple[list[Any], list[Any], str, str]:
    from headrace.core.settings import ServeSettings
    from serving.client import FeatureClient
    from serving.server import build_server

    models = tmp_path / "models"
    champion, challenger = _bid_model(models, 10, 1), _bid_model(models, 11, 3)
    set_champion(models, champion)
    import redis

    if split:
        redis.Redis(port=port).set(split_key(prefix), SplitState(
            1, ROLLOUT, champion, challenger, SHARE, False, 1, 1).to_json())
    servers, clients = [], []
    for name in names:
        settings = ServeSettings.from_env(
            {}, redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix=prefix,
            models_dir=str(models), server_id=name, prediction_log=False,
            redis_budget_ms=2000.0, split_poll_ms=100, **extra)
        srv = build_server(settings, port=0, host="127.0.0.1").start()
        if split:
            _make_flaky(srv, challenger)
        servers.append(srv)
        clients.append(FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=5.0))
    for c in clients:
        c.wait_ready()
    return servers, clients, champion, challenger


def _make_flaky(srv: Any, challenger: str) -> None:
    model = srv.scoring.split.current.challenger
    assert model is not None and model.version == challenger
    model.booster.booster = Flaky(model.booster.booster)


def _traffic(clients: list[Any], tally: Tally, champion: str, challenger: str, n: int,
             tag: str, *, challenger_on: bool = True) -> None:
    from headrace.api.v1 import scoring_pb2 as spb
    from serving.client import build_score_request

    for i in range(n):
        user, pub = f"{tag}{i}", f"pub{i % 3}"
        bids = [0.5 + j for j in range(6)] + ([FAIL_BID] if i % 5 == 0 else [])
        req = build_score_request(user, [{"ad_id": f"a{j}", "campaign_id": "c1",
                                          "bid_cpm": b} for j, b in enumerate(bids)],
                                  {"country": "US", "device_type": "mobile",
                                   "publisher_id": pub})
        resp = clients[i % len(clients)].score_pb(req)
        to_challenger = challenger_on and assign(ROLLOUT, user, SHARE)
        if to_challenger and i % 5 == 0:  # raised: one error, and the champion answers
            tally.add(challenger, ServingCounts.answer(pub, error=True))
        want = challenger if to_challenger and i % 5 else champion
        assert resp.model_version == want and (resp.arm == spb.CHALLENGER) is (
            want == challenger)
        p = list(resp.p_ctr)
        tally.add(want, ServingCounts.answer(pub, 1.0, pctr=(min(p), max(p))))


def _same(got: ServingCounts, want: ServingCounts) -> bool:
    """Equal but for which latency bucket each answer fell in (the total must match)."""
    return (got.requests, got.errors, dict(got.pub_requests), dict(got.pub_errors),
            got.min_pctr, got.max_pctr, sum(got.latency_counts)) == (
        want.requests, want.errors, dict(want.pub_requests), dict(want.pub_errors),
        want.min_pctr, want.max_pctr, sum(want.latency_counts))


def test_two_servers_sum_to_exactly_what_they_answered(tmp_path: Path,
                                                       redis_server: Any) -> None:
    import redis

    _proc, port = redis_server
    prefix = f"hr{uuid.uuid4().hex[:8]}"
    servers, clients, champion, challenger = _rig(tmp_path, port, prefix, ("s1", "s2"))
    client = redis.Redis(port=port)
    tally = Tally()
    try:
        _traffic(clients, tally, champion, challenger, 300, "u")
        source = ServingStatsSource(client, prefix, ROLLOUT)

        def landed() -> bool:
            return all(_same(read_serving_counts(client, prefix, ROLLOUT, v), tally.counts[v])
                       for v in (champion, challenger))

        _until(landed, 5.0, "both servers' counts in redis")  # flushed by the polls
        champ, chall = source.read(champion, challenger)
        want = tally.counts[challenger]
        assert want.errors == sum(1 for i in range(0, 300, 5) if assign(ROLLOUT, f"u{i}", SHARE))
        assert (chall.requests, chall.errors) == (want.requests, want.errors) and want.errors
        assert chall.segments["publisher"]["pub0"].errors == want.pub_errors["pub0"]
        assert champ.requests == tally.counts[champion].requests
        assert champ.requests + chall.requests - chall.errors == 300
        assert champ.latency_bounds_ms == LATENCY_BOUNDS_MS and champ.p99_ms() is not None
        assert chall.min_pctr is not None and chall.max_pctr is not None
        assert 0 < chall.min_pctr <= chall.max_pctr < 1
    finally:
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)  # the last flush: nothing left, nothing counted twice
    assert all(_same(read_serving_counts(client, prefix, ROLLOUT, v), tally.counts[v])
               for v in (champion, challenger))
    assert all(s.metrics.value("headrace_rollout_counts_flush_failures_total") == 0
               for s in servers)


def test_a_redis_freeze_loses_no_count(tmp_path: Path, redis_server: Any) -> None:
    import redis

    proc, port = redis_server
    prefix = f"hr{uuid.uuid4().hex[:8]}"
    servers, clients, champion, challenger = _rig(tmp_path, port, prefix, ("s1", "s2"),
                                                  split_timeout_ms=200)
    client = redis.Redis(port=port)
    tally = Tally()
    try:
        _traffic(clients, tally, champion, challenger, 100, "a")
        proc.send_signal(signal.SIGSTOP)
        try:
            _until(lambda: all(s.metrics.value("headrace_rollout_split_redis_available") == 0
                               for s in servers), 3.0, "both servers see the outage")
            # meanwhile 100 % champion, still counted for the rollout, kept in memory
            _traffic(clients, tally, champion, challenger, 100, "b", challenger_on=False)
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGCONT)
        _until(lambda: all(s.scoring.split.current.challenger is not None for s in servers),
               3.0, "split back")
        # the same (patched) challenger object: the watcher kept it loaded
        _traffic(clients, tally, champion, challenger, 100, "c")

        def landed() -> bool:
            return all(_same(read_serving_counts(client, prefix, ROLLOUT, v), tally.counts[v])
                       for v in (champion, challenger))

        _until(landed, 5.0, "every count in redis after the freeze")
    finally:
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)
    assert landed()
    assert sum(tally.counts[v].requests - tally.counts[v].errors
               for v in (champion, challenger)) == 300


def test_rollout_start_without_a_stats_file_rolls_back_on_the_servers_errors(
        tmp_path: Path, redis_server: Any) -> None:
    import json
    import os
    import sys

    from serving.client import build_score_request

    _proc, port = redis_server
    prefix = f"hr{uuid.uuid4().hex[:8]}"
    servers, clients, champion, challenger = _rig(tmp_path, port, prefix, ("s1", "s2"),
                                                  split=False)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")},
           "HEADRACE_REDIS_URL": f"redis://127.0.0.1:{port}/0", "HEADRACE_REDIS_PREFIX": prefix,
           "HEADRACE_MODELS_DIR": str(tmp_path / "models"), "HEADRACE_ROLLOUT_TICK_MS": "100",
           "HEADRACE_ROLLOUT_ACK_POLL_MS": "20", "HEADRACE_ROLLOUT_ACK_TIMEOUT_S": "20"}
    root = Path(__file__).resolve().parents[2]
    ctl = subprocess.Popen([sys.executable, "-m", "headrace.cli", "rollout", "start",
                            "--challenger", challenger, "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=root, env=env)
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            bids = [1.0, 2.0] + ([FAIL_BID] if i % 4 == 0 else [])
            clients[i % 2].score_pb(build_score_request(
                f"t{i}", [{"ad_id": f"a{j}", "campaign_id": "c", "bid_cpm": b}
                          for j, b in enumerate(bids)],
                {"country": "US", "device_type": "mobile", "publisher_id": "p1"}))
            i += 1

    thread = threading.Thread(target=traffic, daemon=True)
    try:
        _until(lambda: all(s.scoring.split.current.challenger is not None for s in servers),
               30.0, "the controller's phase-1 split on both servers")
        for srv in servers:
            _make_flaky(srv, challenger)
        thread.start()
        out, err = ctl.communicate(timeout=60)
        assert ctl.returncode == 0, err
        finished = json.loads(out.strip().splitlines()[-1])
        assert finished["status"] == "rolled_back", finished
        assert finished["breach"]["name"] == "error_rate", finished
        values = finished["breach"]["values"]
        assert values["errors"] >= 5 and values["error_rate"] >= 0.001
        assert finished["rollback_seconds"] is not None
    finally:
        stop.set()
        if ctl.poll() is None:
            ctl.kill()
            ctl.communicate()
        if thread.is_alive():
            thread.join(timeout=10)
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)
