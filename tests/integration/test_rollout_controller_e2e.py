"""The rollout controller on a real redis-server, as its users run it: ``headrace rollout``
subprocesses, real model folders and registry, real servers (``build_server``, whose
split watcher acknowledges what it applies), a local webhook.

The per-arm counts come from a stats file rewritten every 30 ms by a thread
(:class:`Traffic`: cumulative counts growing with time, a healthy challenger with a
20 % better CTR, and on demand a 2 % error rate). Phases last a fraction of a second
(a policy file with short durations and low minimum impressions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.model.artifact import set_champion, write_artifact
from headrace.model.registry import ModelRegistry, Role, RoleEvent, SplitEvent
from headrace.rollout.policy import Policy
from headrace.rollout.split import Ack, SplitState, split_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
TICK_MS = 50
LOCK_TTL_MS = 1000


def _policy(durations: dict[int, tuple[float, float]]) -> dict[str, Any]:
    pol = Policy()
    for k, (lo, hi) in durations.items():
        pol = pol.replace_phase(k, min_duration=timedelta(seconds=lo),
                                max_duration=timedelta(seconds=hi))
    pol = pol.replace_phase(2, min_impressions=10_000).replace_phase(3, min_impressions=20_000)
    return pol.to_dict()


FAST = _policy({k: (0.4, 0.8) for k in range(1, 6)})
#: phase 2 lasts 3 s: long enough to kill the controller in it and resume it
KILL = _policy({1: (0.4, 0.8), 2: (3.0, 4.0), 3: (0.4, 0.8), 4: (0.4, 0.8), 5: (0.4, 0.8)})
#: phase 1 lasts a minute: the rollout stays in it
SLOW = _policy({1: (60.0, 90.0), **{k: (0.4, 0.8) for k in range(2, 6)}})


def _arm(impressions: int, ctr: float, errors: int = 0) -> dict[str, Any]:
    clicks = round(impressions * ctr)
    return {"impressions": impressions, "clicks": clicks, "sum_pctr": float(clicks),
            "requests": impressions, "errors": errors, "latency_p99_ms": 4.0,
            "min_pctr": 0.001, "max_pctr": 0.05}


class Traffic(threading.Thread):
    """Rewrites the stats file every 30 ms: 2M champion and 400k challenger impressions
    per second since the start; ``bad`` adds a 2 % error rate to the challenger."""

    def __init__(self, path: Path, champion: str, challenger: str) -> None:
        super().__init__(daemon=True)
        self.path, self.champion, self.challenger = path, champion, challenger
        self.bad = threading.Event()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.write()

    def write(self) -> None:
        t = time.monotonic() - self.t0
        n_a, n_c = int(2_000_000 * t), int(400_000 * t)
        chall = _arm(n_c, 0.012, errors=n_c // 50 if self.bad.is_set() else 0)
        doc = {"arms": {self.champion: _arm(n_a, 0.01), self.challenger: chall}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def run(self) -> None:
        while not self.stop.wait(0.03):
            self.write()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port."""
    from headrace.stack.proc import free_port
    from tests.localredis import start_redis

    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def _version(models: Path, hour: int, gate: bool = True, seed: int = 0) -> str:
    """A real LightGBM version on ``bid_cpm`` alone (servers can load and score it)."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    x = rng.random((400, 1)) * 20
    y = (rng.random(400) < 0.02 + 0.01 * (seed + 1) * x[:, 0] / 3).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1,
                         "seed": seed}, lgb.Dataset(x, y, feature_name=["bid_cpm"]), 5)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps(
            {"features": ["bid_cpm"], "gate": {"promote": gate, "reasons": ["test"]}}))

    return write_artifact(models, datetime(2026, 1, 1, hour, tzinfo=UTC), fill)[0]


class Rig:
    """One test's models folder, Redis prefix, stats file, traffic and CLI."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        import redis

        self.tmp = tmp
        self.models = tmp / "models"
        self.champion = _version(self.models, 0, seed=0)
        self.challenger = _version(self.models, 1, seed=2)
        self.other = _version(self.models, 2, seed=3)
        self.failed = _version(self.models, 3, seed=4)
        set_champion(self.models, self.champion)
        self.registry = ModelRegistry(self.models)
        self.registry.transition(self.failed, Role.FAILED, "test: broken", actor="cli")
        self.prefix = f"hr{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.stats = tmp / "stats.json"
        self.traffic = Traffic(self.stats, self.champion, self.challenger)
        self.traffic.start()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")},
                    "HEADRACE_REDIS_URL": redis_url, "HEADRACE_REDIS_PREFIX": self.prefix,
                    "HEADRACE_MODELS_DIR": str(self.models),
                    "HEADRACE_ROLLOUT_STATS_FILE": str(self.stats),
                    "HEADRACE_ROLLOUT_TICK_MS": str(TICK_MS),
                    "HEADRACE_ROLLOUT_LOCK_TTL_MS": str(LOCK_TTL_MS),
                    "HEADRACE_ROLLOUT_ACK_POLL_MS": "20",
                    "HEADRACE_ROLLOUT_ACK_TIMEOUT_S": "20"}
        self.procs: list[subprocess.Popen[str]] = []

    def policy(self, doc: dict[str, Any]) -> str:
        path = self.tmp / f"policy-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(doc))
        return str(path)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``headrace rollout ARGS`` in this process (no interpreter start-up): its exit
        status, stdout and stderr."""
        import contextlib
        import io

        from headrace.cli import main

        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("HEADRACE_")})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["rollout", *args])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    def spawn(self, *args: str, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "headrace.cli", "rollout", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**self.env, **env})
        self.procs.append(proc)
        return proc

    def state(self) -> dict[str, Any] | None:
        raw = self.client.get(f"{self.prefix}:rollout:state")
        return None if raw is None else json.loads(raw)["state"]

    def split(self) -> SplitState | None:
        raw = self.client.get(split_key(self.prefix))
        return None if raw is None else SplitState.from_json(raw)

    def acks(self) -> dict[str, Ack]:
        keys = self.client.keys(f"{self.prefix}:rollout:ack:*")
        return {k.decode().rsplit(":", 1)[1]: Ack.from_json(self.client.get(k)) for k in keys}

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a refused command must leave unchanged."""
        keys = sorted(self.client.keys(f"{self.prefix}:*"))
        history = self.registry.path.read_bytes() if self.registry.path.exists() else b""
        return ({k: self.client.get(k) for k in keys}, history,
                (self.models / "CHAMPION").read_text())

    def close(self) -> None:
        self.traffic.stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        keys = self.client.keys(f"{self.prefix}:*")
        if keys:
            self.client.delete(*keys)
        self.client.close()


@pytest.fixture
def rig(tmp_path: Path, redis_url: str) -> Iterator[Rig]:
    r = Rig(tmp_path, redis_url)
    yield r
    r.close()


def _until(check: Callable[[], Any], within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.02)
    return got


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _roles(rig: Rig, version: str) -> list[RoleEvent]:
    return [e for e in ModelRegistry(rig.models).history()
            if isinstance(e, RoleEvent) and e.version == version]


def _in_phase(rig: Rig, phase: int) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        s = rig.state()
        return s if s and s["phase"] == phase and s["pending_done"] == len(s["pending"]) \
            else None
    return check


# ------------------------------------------------------------------------------- tests
def test_refusals_change_nothing_and_abort_reaches_the_controller(rig: Rig) -> None:
    before = rig.snapshot()
    for version, words in ((f"{rig.champion}x", "unknown model version"),
                           (rig.failed, "failed")):
        r = rig.cli("start", "--challenger", version)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert rig.snapshot() == before
    ctl = rig.spawn("start", "--challenger", rig.challenger, "--json",
                    "--policy", rig.policy(SLOW))
    _until(_in_phase(rig, 1), 20, "phase 1")
    split = rig.split()
    assert split is not None and (split.challenger, split.share, split.phase) == (
        rig.challenger, 0.03, 1)
    running = rig.snapshot()
    r = rig.cli("start", "--challenger", rig.other)
    assert r.returncode == 2 and "already running" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = rig.cli("run")  # a second controller for the same rollout
    assert r.returncode == 2 and f":{ctl.pid}:" in r.stderr, r.stderr
    assert "holder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert rig.snapshot() == running
    r = rig.cli("abort", "--reason", "test abort", "--json")
    assert r.returncode == 0, r.stderr
    assert _events(r.stdout)[-1]["status"] == "aborted"
    out, err = ctl.communicate(timeout=20)
    assert ctl.returncode == 0, err
    finished = _events(out)[-1]
    assert finished["event"] == "finished" and finished["status"] == "aborted"
    assert finished["breach"]["name"] == "aborted"
    failed = _roles(rig, rig.challenger)[-1]
    assert failed.role is Role.FAILED and failed.gates["guardrail"] == "aborted"
    split = rig.split()
    assert split is not None and split.challenger is None and split.share == 0
    assert rig.client.get(f"{rig.prefix}:rollout:lock") is None  # released on exit


def test_sigkill_mid_phase_resumes_the_phase_and_promotes_once(rig: Rig) -> None:
    ctl = rig.spawn("start", "--challenger", rig.challenger, "--json",
                    "--policy", rig.policy(KILL))
    phase2 = _until(_in_phase(rig, 2), 20, "phase 2")
    time.sleep(0.3)
    ctl.send_signal(signal.SIGKILL)
    ctl.communicate(timeout=10)
    seq_before = rig.split().seq  # type: ignore[union-attr]
    _until(lambda: rig.client.get(f"{rig.prefix}:rollout:lock") is None, 5, "lock expiry")
    status = rig.cli("status", "--json")
    doc = json.loads(status.stdout)
    assert doc["rollout"]["status"] == "running" and doc["rollout"]["phase"] == 2
    assert doc["controller"] is None
    resumed_ms = time.time_ns() // 1_000_000
    run = rig.spawn("run", "--json")
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, err
    events = _events(out)
    assert events[0]["event"] == "advance" and events[0]["from_phase"] == 2, events[0]
    assert events[-1]["status"] == "promoted", events[-1]
    # phase 2 kept its start: it ended 3 s (its minimum) after its first start, at the
    # resumed controller's first tick; a restarted phase would end 3 s after the resume
    started3 = events[0]["at_ms"]
    assert started3 - phase2["phase_started_ms"] >= 3000
    assert started3 < resumed_ms + 3000
    promotions = [e for e in _roles(rig, rig.challenger) if e.role is Role.CHAMPION]
    assert len(promotions) == 1
    assert (rig.models / "CHAMPION").read_text().strip() == rig.challenger
    splits = [e for e in ModelRegistry(rig.models).history() if isinstance(e, SplitEvent)]
    assert [e.phase for e in splits] == [1, 2, 3, 4, 5, 5]  # the schedule never restarted
    assert rig.split().seq > seq_before  # type: ignore[union-attr]


def test_abort_without_a_controller_rolls_back_itself(rig: Rig) -> None:
    ctl = rig.spawn("start", "--challenger", rig.challenger, "--policy", rig.policy(SLOW))
    _until(_in_phase(rig, 1), 20, "phase 1")
    ctl.send_signal(signal.SIGKILL)
    ctl.communicate(timeout=10)
    r = rig.cli("abort", "--reason", "no controller", "--json")
    assert r.returncode == 0, r.stderr
    assert _events(r.stdout)[-1]["by"] == "this command"
    state = rig.state()
    assert state is not None and state["status"] == "aborted"
    assert state["pending_done"] == len(state["pending"])
    assert rig.split().challenger is None  # type: ignore[union-attr]
    failed = _roles(rig, rig.challenger)[-1]
    assert failed.role is Role.FAILED and failed.gates["values"]["reason"] == "no controller"


class _Hook(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_breach_rolls_back_every_server_and_alerts(rig: Rig) -> None:
    from headrace.api.v1 import scoring_pb2 as spb
    from headrace.core.settings import ServeSettings
    from serving.client import FeatureClient, build_score_request
    from serving.server import build_server

    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.posts = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    servers, clients = [], []
    try:
        for name in ("s1", "s2"):
            settings = ServeSettings.from_env({}, redis_url=rig.redis_url,
                                              redis_prefix=rig.prefix,
                                              models_dir=str(rig.models), server_id=name,
                                              prediction_log=False,
                                              redis_budget_ms=2000.0)
            srv = build_server(settings, port=0, host="127.0.0.1").start()
            servers.append(srv)
            clients.append(FeatureClient(f"127.0.0.1:{srv.port}", timeout_s=5.0))
        for c in clients:
            c.wait_ready()
        url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
        ctl = rig.spawn("start", "--challenger", rig.challenger, "--json",
                        "--policy", rig.policy(SLOW), HEADRACE_ROLLOUT_WEBHOOK_URL=url)
        _until(_in_phase(rig, 1), 20, "phase 1")
        seq1 = rig.split().seq  # type: ignore[union-attr]
        _until(lambda: {(a.seq, a.challenger) for a in rig.acks().values()}
               == {(seq1, rig.challenger)} and len(rig.acks()) == 2, 10, "servers on phase 1")
        rig.traffic.bad.set()
        out, err = ctl.communicate(timeout=30)
        assert ctl.returncode == 0, err
        finished = _events(out)[-1]
        assert finished["status"] == "rolled_back" and finished["breach"]["name"] == "error_rate"
        seconds = finished["rollback_seconds"]
        assert seconds is not None and 0 <= seconds < 10
        print(f"rollback_seconds {seconds:.3f} (2 servers polling every 250 ms)")
        state = rig.state()
        split = rig.split()
        assert state is not None and split is not None and split.challenger is None
        assert split.seq > seq1 and state["acks"]["servers"] == 2
        # the split went to 100 % champion in the tick that found the breach
        assert 0 <= split.updated_ms - state["breach_ms"] < TICK_MS + 200
        assert {(a.seq >= split.seq, a.challenger) for a in rig.acks().values()} == {
            (True, None)}
        ctx = {"country": "US", "device_type": "mobile", "publisher_id": "p1",
               "placement": "feed"}
        cands = [{"ad_id": f"a{i}", "campaign_id": "c1", "bid_cpm": 1.0 + i} for i in range(3)]
        for c in clients:
            arms = {c.score_pb(build_score_request(f"u{i}", cands, ctx)).arm for i in range(60)}
            assert arms == {spb.CHAMPION}
        failed = _roles(rig, rig.challenger)[-1]
        assert failed.role is Role.FAILED and failed.phase == 1
        assert failed.gates["guardrail"] == "error_rate"
        assert failed.gates["values"]["error_rate"] >= 0.001
        assert failed.gates["rollback_seconds"] == seconds
        last = [e for e in ModelRegistry(rig.models).history() if isinstance(e, SplitEvent)][-1]
        assert last.shares == {rig.champion: 1.0} and "after the breach" in last.reason
        _until(lambda: _Hook.posts, 5, "the webhook")
        assert len(_Hook.posts) == 1 and set(_Hook.posts[0]) == {"text"}
        assert "error_rate" in _Hook.posts[0]["text"] and "rolled back" in _Hook.posts[0]["text"]
    finally:
        hook.shutdown()
        for c in clients:
            c.close()
        for srv in servers:
            srv.stop(0)
