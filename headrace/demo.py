"""The main job: the whole Headrace loop on a throwaway local stack.

stack up → synthetic traffic → stream worker → online features → live freshness →
priors → labels → training set → model → feature server + Score calls → stack down.

Every step runs the real ``headrace`` command in a subprocess against the real local
services, exactly as a user would; progress lines go to stderr. Every step runs the same
definitions: ``HEADRACE_DEFINITIONS`` (or ``--definitions``), loaded and checked once
before the stack starts; the steps read a ``user`` entity, as the shipped set has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from headrace.stack.proc import free_port

__all__ = ["DemoConfig", "run_demo"]

_PREFIX = "[demo]"


def _say(line: str) -> None:
    print(f"{_PREFIX} {line}", file=sys.stderr, flush=True)


class DemoConfig:
    """Sizes of the demo (small enough for a 2-core machine in a few minutes)."""

    def __init__(self, users: int = 2000, events: int = 120_000, days: int = 3, seed: int = 7,
                 live_rate: int = 2000, live_seconds: float = 6.0) -> None:
        self.users, self.events, self.days, self.seed = users, events, days, seed
        self.live_rate, self.live_seconds = live_rate, live_seconds


class _Runner:
    def __init__(self, env: dict[str, str], workdir: str) -> None:
        self.env = {**os.environ, **env}
        self.workdir = workdir

    def cli(self, *args: str, timeout: float = 600, check: bool = True,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "headrace.cli", *args]
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir, check=False)
        if check and proc.returncode != 0:
            from headrace.core.errors import HeadraceError

            raise HeadraceError(f"`headrace {' '.join(args)}` failed ({proc.returncode}): "
                                f"{proc.stderr.strip()[-1500:]}")
        return proc

    def json(self, *args: str, **kw: Any) -> Any:
        out = self.cli(*args, **kw).stdout.strip().splitlines()
        return json.loads(out[-1]) if out else None

    def background(self, *args: str, extra_env: dict[str, str] | None = None
                   ) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "headrace.cli", *args]
        return subprocess.Popen(cmd, env={**self.env, **(extra_env or {})}, cwd=self.workdir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _stream_step(run: _Runner, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    start_ms = (int(time.time() * 1000) // 3_600_000 - 24 * cfg.days) * 3_600_000
    _say(f"producing {cfg.events} synthetic events for {cfg.users} users over {cfg.days} days")
    produced = run.json("produce", "--synthetic", "--users", str(cfg.users), "--events",
                        str(cfg.events), "--seed", str(cfg.seed), "--days", str(cfg.days),
                        "--start", _iso(start_ms), "--json")
    summary["events"] = produced["events"]
    _say("stream worker: consuming into Redis (online) and Parquet on S3 (offline)")
    stats_file = os.path.join(run.workdir, "worker-stats.json")
    run.cli("worker", "--until-idle", "3", "--stats", stats_file, timeout=900)
    with open(stats_file, encoding="utf-8") as fh:
        stats = json.load(fh)
    end = max(t for t in (stats["last_online_commit"], stats["last_offline_commit"]) if t)
    summary["stream_events_per_s"] = round(stats["events_in"] / max(1e-9, end -
                                                                     stats["first_input"]))
    _say(f"  {stats['events_in']} events in, {summary['stream_events_per_s']} events/s "
         "end to end")
    lag = run.json("lag", "--json")
    summary["consumer_lag"] = sum(max(0, r["lag"]) for r in lag
                                  if not r["topic"].split(".")[-1].startswith("headrace-"))
    summary["start_ms"], summary["end_ms"] = start_ms, start_ms + cfg.days * 86_400_000


def _live_step(run: _Runner, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    """A worker on live traffic (ts = now) to measure freshness."""
    from streams.live import produce_paced

    _say(f"live traffic at {cfg.live_rate} events/s for {cfg.live_seconds:.0f}s: freshness")
    live_env = {"HEADRACE_TOPIC_PREFIX": "live.", "HEADRACE_GROUP_ID": "demo-live",
                "HEADRACE_REDIS_PREFIX": "hrlive"}
    stats_file = os.path.join(run.workdir, "live-stats.json")
    env = {**run.env, **live_env}
    produce_paced(env, 100, 0.5, cfg.users)  # topics exist before the worker joins
    worker = run.background("worker", "--until-idle", "10", "--stats", stats_file,
                            extra_env=live_env)
    try:
        time.sleep(6)
        produce_paced(env, cfg.live_rate, cfg.live_seconds, cfg.users)
        worker.wait(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    with open(stats_file, encoding="utf-8") as fh:
        fresh = json.load(fh)["freshness_ms"]
    summary["freshness_p50_ms"] = _quantile(fresh, 0.5)
    summary["freshness_p99_ms"] = _quantile(fresh, 0.99)
    _say(f"  freshness p50 {summary['freshness_p50_ms']} ms, p99 "
         f"{summary['freshness_p99_ms']} ms")


def _features_step(run: _Runner, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    line = run.cli("get", "--entity", "user", "--id", "u0000001", "--at",
                   str(summary["end_ms"]), "--json").stdout.strip().splitlines()[0]
    features = json.loads(line)["features"]
    shown = {k: v for k, v in features.items() if k.endswith(("_24h", "_7d"))}
    _say(f"  u0000001 as of the end: {shown}")


def _training_step(run: _Runner, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    wd = run.workdir
    _say("priors for cold start")
    run.cli("priors")
    begin, end = summary["start_ms"], summary["end_ms"]
    labels = os.path.join(wd, "labels.parquet")
    _say("labels (30 min attribution)")
    run.cli("labels", "--from", str(begin + 86_400_000), "--to", str(end - 1_800_000),
            "--attribution", "30m", "--out", labels)
    ts = os.path.join(wd, "training.parquet")
    _say("point-in-time training set (cold-start tiers as served)")
    run.cli("training-set", "--labels", labels, "--features", "all", "--cold-start", "--out", ts)
    import pyarrow.parquet as pq

    summary["training_rows"] = pq.read_metadata(ts).num_rows
    _say(f"  {summary['training_rows']} rows; training LightGBM with gates")
    result = run.json("train", "--training-set", ts, "--out", os.path.join(wd, "models"),
                      "--json", timeout=900)
    summary["auc"] = result.get("auc")
    summary["logloss"] = result.get("logloss")
    summary["model_version"] = result.get("version")
    summary["promoted"] = result.get("promoted")
    _say(f"  model {summary['model_version']}: AUC {summary['auc']}, log loss "
         f"{summary['logloss']}, promoted={summary['promoted']}")


def _serving_step(run: _Runner, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    port = free_port()
    models = os.path.join(run.workdir, "models")
    _say(f"feature server on 127.0.0.1:{port}")
    server = run.background("serve", "--port", str(port),
                            extra_env={"HEADRACE_MODELS_DIR": models})
    try:
        from headrace.core.errors import HeadraceError
        from serving.client import FeatureClient

        client = FeatureClient(f"127.0.0.1:{port}")
        client.wait_ready(timeout_s=60)
        lat: list[float] = []
        for i in range(300):
            t0 = time.perf_counter()
            client.get("user", [f"u{i % 50:07d}"])
            lat.append((time.perf_counter() - t0) * 1000)
        summary["lookup_p99_ms"] = _quantile(lat[20:], 0.99)
        _say(f"  lookup p99 {summary['lookup_p99_ms']} ms (1 user, all features)")
        cands = [{"ad_id": f"ad{k:05d}", "campaign_id": f"cmp{k % 50:04d}",
                  "bid_cpm": 1.0 + k % 7} for k in range(100)]
        lat = []
        try:
            for i in range(200):
                t0 = time.perf_counter()
                ranked = client.score(f"u{i % 50:07d}", cands, context={"device_type": "mobile"})
                lat.append((time.perf_counter() - t0) * 1000)
        except HeadraceError as exc:  # e.g. no champion: the gates rejected the model
            summary["score_error"] = str(exc)
            _say(f"  Score unavailable: {exc}")
        else:
            summary["score_p99_ms"] = _quantile(lat[20:], 0.99)
            summary["top_ad"] = ranked[0]["ad_id"] if ranked else None
            _say(f"  Score p99 {summary['score_p99_ms']} ms for 100 candidates; top ad "
                 f"{summary['top_ad']} (model {ranked[0].get('model_version')})")
        client.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


STEPS: list[tuple[str, Callable[..., None]]] = [
    ("stream", _stream_step),
    ("features", _features_step),
    ("live", _live_step),
    ("training", _training_step),
    ("serving", _serving_step),
]


def definitions_env(spec: str, cwd: str) -> dict[str, str]:
    """Variables that make child processes started in another directory load ``spec``
    as it loaded here: a file path made absolute; a module spec found in ``cwd`` (see
    :func:`feature_defs.registry.load_registry`) also finds it there."""
    from feature_defs.registry import DEFAULT_DEFINITIONS, portable_spec

    env = {"HEADRACE_DEFINITIONS": portable_spec(spec)}
    if env["HEADRACE_DEFINITIONS"] == spec and spec != DEFAULT_DEFINITIONS:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), cwd) if p)
    return env


def run_demo(cfg: DemoConfig | None = None, keep_stack: str | None = None,
             definitions: str | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary. The stack is stopped on success and on error.

    ``definitions`` overrides ``HEADRACE_DEFINITIONS`` for every step.

    Raises:
        InputError: the definitions do not load (before anything starts).
    """
    from feature_defs.registry import definitions_spec, load_registry
    from headrace.core.settings import CommonSettings
    from headrace.stack.local import local_stack

    cfg = cfg or DemoConfig()
    spec = definitions_spec(CommonSettings(), definitions)
    _say(f"definitions {spec} ({load_registry(spec).source_file})")
    defs_env = definitions_env(spec, os.getcwd())
    summary: dict[str, Any] = {}
    started = time.monotonic()
    # the temporary directory must outlive the stack inside it: enter it first
    with tempfile.TemporaryDirectory(prefix="headrace-demo-") as tmp, ExitStack() as stack:
        stack_dir = keep_stack or os.path.join(tmp, "stack")
        _say(f"starting the local stack in {stack_dir}")
        info = stack.enter_context(local_stack(stack_dir, keep=bool(keep_stack)))
        env = {**info.env, "HEADRACE_LOG_LEVEL": "WARNING",
               "HEADRACE_DATA_DIR": os.path.join(tmp, "worker"), **defs_env}
        run = _Runner(env, tmp)
        for _name, step in STEPS:
            step(run, cfg, summary)
    summary["seconds"] = round(time.monotonic() - started, 1)
    for key in ("start_ms", "end_ms"):
        summary.pop(key, None)
    return summary
