"""``headrace simulate rollout``: a closed loop through the real system on the embedded
local stack (:mod:`headrace.stack.local`).

1. The stack (Kafka, redis-server, S3), a stream worker running the evaluation views
   (``--definitions feature_defs.evaluation``) and two ``headrace serve`` processes
   (the challenger's fault injection, :mod:`serving.faults`, set for ``errors`` and
   ``slow``).
2. A champion and the scenario's challenger, trained on synthetic rows
   (:mod:`headrace.simulate.world`), in a models folder whose registry names the
   champion; past impressions and clicks give every ad its online CTR.
3. ``headrace rollout start`` (the real controller, its stats from the servers' counts
   merged with the stream's views) with a simulation policy (:func:`simulation_policy`),
   while the simulated ad server (:mod:`headrace.simulate.traffic`) calls ``Score``,
   shows the top candidate and emits its impression and click.
4. When the controller finishes (promoted or rolled back): one JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from headrace.core.errors import HeadraceError
from headrace.rollout.policy import Policy
from headrace.simulate.procs import Children
from headrace.simulate.traffic import AdServer, EventPump, p99
from headrace.simulate.world import PUBLISHERS, World, train_version

__all__ = ["SCENARIOS", "EXPECTED", "simulation_policy", "run_simulation"]

#: scenario -> (the challenger's model kind, the servers' HEADRACE_CHALLENGER_FAULTS)
SCENARIOS: dict[str, tuple[str, str]] = {
    "good": ("good", ""),
    "constant": ("constant", ""),
    "miscalibrated": ("miscalibrated", ""),
    "errors": ("good", "error_rate=0.01"),
    "slow": ("good", "latency_ms=20"),
}
#: scenario -> (expected outcome, the breaches that fit)
EXPECTED: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "good": ("promoted", (None,)),
    "constant": ("rolled_back", ("constant_predictions",)),
    "miscalibrated": ("rolled_back", ("calibration_collapse", "calibration")),
    "errors": ("rolled_back", ("error_rate",)),
    "slow": ("rolled_back", ("latency_p99",)),
}
_DEFS = "feature_defs.evaluation"
_SHADOW_S = 3.0


def _say(line: str) -> None:
    print(f"[simulate] {line}", file=sys.stderr, flush=True)


def simulation_policy(phase_seconds: float) -> Policy:
    """The default policy with the shares and thresholds kept, and what a run of
    minutes cannot reach scaled down: every phase lasts ``phase_seconds`` (its last
    look at twice that), the minimum samples are hundreds instead of hundreds of
    thousands, and the guardrails start from tens of requests, impressions or clicks
    (errors from 2). The latency limit is 20 ms instead of 10, judged from 300 requests,
    and relative as well (``latency_vs_champion_ms`` 10): a 2-core machine shared with
    the stack, the worker and the ad server answers both arms in ~25-30 ms at p99
    under this load, which is no fault of the challenger; every request of the ``slow``
    challenger takes 20 ms more than the champion's, so it crosses both limits."""
    pol = Policy(error_min_errors=2, latency_min_requests=300, latency_p99_max_ms=20.0,
                 latency_vs_champion_ms=10.0,
                 click_floor_min_impressions=500, segment_min_requests=50,
                 constant_min_impressions=50, collapse_min_clicks=50,
                 calibration_min_clicks=50, bucket_min_impressions=5000,
                 bucket_min_clicks=200)
    lo, hi = timedelta(seconds=phase_seconds), timedelta(seconds=2 * phase_seconds)
    mins = {1: 0, 2: 200, 3: 400, 4: 0, 5: 0}
    for k in range(1, 6):
        pol = pol.replace_phase(k, min_duration=lo, max_duration=hi,
                                min_impressions=mins[k])
    return pol


class _Controller(threading.Thread):
    """Reads the controller's JSON lines; progress on stderr."""

    def __init__(self, proc: subprocess.Popen[str], t0: float) -> None:
        super().__init__(name="sim-controller", daemon=True)
        self.proc, self.t0 = proc, t0
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["at_s"] = round(time.monotonic() - self.t0, 2)
            self.events.append(ev)
            kind = ev.get("event")
            if kind != "hold":
                extra = ev.get("breach") or (ev.get("decision") or {}).get("message") or ""
                if isinstance(extra, dict):
                    extra = extra.get("message") or extra.get("name")
                _say(f"{ev['at_s']:7.1f} s  {kind} phase {ev.get('phase')} {extra}".rstrip())

    @property
    def finished(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == "finished"), None)


def _wait_history(address: str, world: World, want: int, deadline_s: float) -> int:
    """Wait until the worker has counted ``want`` past impressions of the ads."""
    from serving.client import FeatureClient

    client = FeatureClient(address, timeout_s=5.0)
    seen = 0
    try:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            got = client.get("ad", world.ads, ["ad__impressions_24h"])
            seen = int(sum(e.values.get("ad__impressions_24h") or 0 for e in got.entities))
            if seen >= want:
                return seen
            time.sleep(0.5)
    finally:
        client.close()
    raise HeadraceError(f"the stream worker counted {seen} of {want} past impressions "
                        f"within {deadline_s:g} s")


def run_simulation(scenario: str, phase_seconds: float = 25.0, seed: int = 0, *,
                   rate: float = 200.0, threads: int = 4, servers: int = 2,
                   history_per_ad: int = 400, timeout_s: float = 570.0) -> dict[str, Any]:
    """Run one scenario end to end; returns the summary (module docstring).

    Raises:
        InputError: an unknown scenario.
        HeadraceError: a service did not start or the loop did not finish in time.
    """
    from headrace.core.errors import InputError

    if scenario not in SCENARIOS:
        raise InputError(f"unknown scenario {scenario!r}; choose one of "
                         f"{', '.join(SCENARIOS)}")
    kind, faults = SCENARIOS[scenario]
    started = time.monotonic()
    policy = simulation_policy(phase_seconds)
    world = World(seed)
    with tempfile.TemporaryDirectory(prefix="headrace-sim-") as tmp, ExitStack() as stack:
        from headrace.model.artifact import set_champion
        from headrace.model.registry import ModelRegistry
        from headrace.stack.local import local_stack
        from headrace.stack.proc import free_port
        from serving.client import FeatureClient

        work = Path(tmp)
        _say(f"scenario {scenario}: starting the local stack")
        info = stack.enter_context(local_stack(work / "stack"))
        models = work / "models"
        champion = train_version(models, 0, world, "champion", seed)
        challenger = train_version(models, 1, world, kind, seed + 1)
        set_champion(models, champion)
        _say(f"champion {champion} (bid, device, ad impressions), challenger {challenger} ({kind}"
             + (f", faults {faults}" if faults else "") + ")")
        tag = uuid.uuid4().hex[:6]
        env = {**os.environ, **info.env, "HEADRACE_DEFINITIONS": _DEFS,
               "HEADRACE_LOG_LEVEL": "WARNING", "HEADRACE_MODELS_DIR": str(models),
               "HEADRACE_REDIS_PREFIX": f"sim{tag}", "HEADRACE_TOPIC_PREFIX": f"sim{tag}.",
               "HEADRACE_GROUP_ID": f"sim{tag}"}
        children = Children()
        stack.callback(children.stop)
        pump = EventPump(env)
        rng = np.random.default_rng(seed)
        now = time.time_ns() // 1_000_000
        history = world.history(history_per_ad, now - 1_200_000, now - 5_000, rng)
        pump.send_now(history)
        want = sum(1 for e in history if e["type"] == "impression")
        children.spawn(["worker", "--definitions", _DEFS], {
            **env, "HEADRACE_DATA_DIR": str(work / "worker"), "HEADRACE_FLUSH_INTERVAL_MS":
            "200", "HEADRACE_OFFLINE_FLUSH_INTERVAL_MS": "5000"}, work / "worker.log")
        addresses = []
        for k in range(servers):
            port = free_port()
            serve_env = {**env, "HEADRACE_SERVER_ID": f"sim-s{k + 1}",
                         "HEADRACE_PREDICTION_LOG": "false", "HEADRACE_REDIS_BUDGET_MS": "50",
                         "HEADRACE_CHALLENGER_FAULTS": (f"{faults},seed={seed + k}"
                                                        if faults else "")}
            children.spawn(["serve", "--port", str(port), "--host", "127.0.0.1",
                            "--workers", "4"], serve_env, work / f"serve{k + 1}.log")
            addresses.append(f"127.0.0.1:{port}")
        for address in addresses:
            c = FeatureClient(address)
            c.wait_ready(timeout_s=90)
            c.close()
        _say(f"{servers} servers up; {len(history)} past events ({want} impressions) "
             "produced; waiting for the worker")
        _wait_history(addresses[0], world, want, 180)
        _say(f"the worker counted them after {time.monotonic() - started:.1f} s; "
             f"starting the ad server ({rate:g} requests/s) and the controller")
        pump.start()
        ads = AdServer(world, addresses, pump, rate=rate, threads=threads, seed=seed)
        ads.start()
        policy_file = work / "policy.json"
        policy_file.write_text(json.dumps(policy.to_dict()))
        t0 = time.monotonic()
        ctl_env = {**env, "HEADRACE_ROLLOUT_TICK_MS": "250", "HEADRACE_ROLLOUT_ACK_POLL_MS":
                   "20", "HEADRACE_ROLLOUT_ACK_TIMEOUT_S": "30",
                   "HEADRACE_ROLLOUT_SEGMENTS": json.dumps({"publisher": list(PUBLISHERS)})}
        # a 3 s shadow phase first: the challenger scores the champion's requests off
        # the response path, so its first served requests do not pay its cold caches
        ctl = children.spawn(["rollout", "start", "--challenger", challenger, "--policy",
                      str(policy_file), "--json", "--shadow-seconds", str(_SHADOW_S)],
                     ctl_env, work / "controller.log", stdout=subprocess.PIPE)
        reader = _Controller(ctl, t0)
        reader.start()
        left = timeout_s - (time.monotonic() - started)
        try:
            ctl.wait(max(left, 1.0))
        except subprocess.TimeoutExpired:
            ctl.terminate()
            ctl.wait(10)
        reader.join(5)
        rollout_s = time.monotonic() - t0
        ads.stop()
        pump.stop_flag.set()
        pump.join(10)
        finished = reader.finished
        if finished is None:
            tail = (work / "controller.log").read_text(errors="replace")[-1500:]
            raise HeadraceError(f"the rollout controller did not finish within "
                                f"{timeout_s:g} s (rc {ctl.returncode}): {tail}")
        registry = ModelRegistry(models)
        now_champion = registry.champion()
        status = finished.get("status")
        breach = finished.get("breach") or None
        phase = int(finished.get("phase") or 0)
        outcome = "promoted" if status == "promoted" else "rolled_back" \
            if status in ("rolled_back", "aborted", "failed") else str(status)
        arms = {"champion": {"version": champion, **ads.arms.get(champion, _empty()).to_dict()},
                "challenger": {"version": challenger,
                               **ads.arms.get(challenger, _empty()).to_dict()}}
        want_outcome, want_breach = EXPECTED[scenario]
        name = breach.get("name") if isinstance(breach, dict) else None
        return {
            "scenario": scenario, "seed": seed, "outcome": outcome,
            "phases_passed": 5 if outcome == "promoted" else max(phase - 1, 0),
            "phase_at_end": phase, "breach": name,
            "breach_detail": breach, "rollback_seconds": finished.get("rollback_seconds"),
            "champion_unchanged": now_champion == champion, "champion": now_champion,
            "expected": {"outcome": want_outcome, "breach": list(want_breach)},
            "as_expected": outcome == want_outcome and name in want_breach,
            "requests": ads.requests, "score_errors": ads.errors,
            "score_p99_ms": p99(ads.latencies_ms), "rate_per_s": round(
                ads.requests / max(rollout_s, 1e-9), 1),
            "arms": arms,
            "decisions": [{k: e.get(k) for k in ("event", "phase", "at_s")}
                          for e in reader.events if e.get("event") != "hold"],
            "world": {"ads": len(world.ads), "candidates_per_request": 6,
                      "mean_base_ctr": round(float(world.ctr.mean()), 4),
                      "history_impressions": want, "faults": faults or None},
            "policy": policy.to_dict(), "phase_seconds": phase_seconds,
            "rollout_seconds": round(rollout_s, 1),
            "seconds": round(time.monotonic() - started, 1),
        }


def _empty() -> Any:
    from headrace.simulate.traffic import ArmTally

    return ArmTally()
