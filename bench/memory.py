"""``headrace bench memory``: one worker's memory at production cardinality.

A synthetic stream over millions of distinct users, produced beforehand as Arrow
envelopes on the embedded stack, then consumed by one ``headrace worker`` process
(decoded → applied → Redis → Parquet → progress) whose RSS is sampled every second
(psutil). Two kinds of stream (``activity``):

* ``zipf`` (the default): :class:`streams.synthetic.SyntheticWorld`'s own stream over a
  pool of ``users`` users, each with its Zipf-like activity weight (exponent 0.9: a few
  heavy users, a long tail), as real ad traffic is: 10M events over a 5M pool touch
  about 2.2M distinct users, most of them once or twice, while the heavy users' states
  stay cached;
* ``uniform``: the same stream with its user ids re-spread uniformly over the pool (a
  fixed hash of each impression's serial; its clicks keep its user), so that
  ``events`` events touch about ``users * (1 - exp(-impressions / users))`` distinct
  users, a few events each, with no locality at all: the cache's worst case, where
  almost every event is a miss (a Redis read and a decode).

Figures:

* ``distinct_users`` / ``distinct_entities`` (users, ads, campaigns, publishers),
  ``events``, ``events_per_s`` (events / (last durable commit − first input), as in
  ``bench stream``);
* ``peak_rss_mb`` (over the whole process life), ``rss_half_mb`` / ``rss_end_mb`` (the
  RSS half-way and at the end of the processing: the peak of the samples over 30 s
  there, :func:`rss_around`) and ``rss_growth_second_half`` = end ÷ half-way − 1; also
  ``rss_growth_second_half_single_samples``, the same ratio of the two single samples
  nearest those times (noisy: the RSS swings ~100 MB within seconds);
* ``state_cache_mb`` (the budget, ``HEADRACE_STATE_CACHE_MB``), ``cache_hit_ratio``
  (hits ÷ lookups, one lookup per distinct state and batch) and
  ``cache_hit_ratio_after_first_touch`` (first touches, which no cache can hit, left
  out), evictions, the cache's estimated bytes at the end;
* ``cpu`` (:func:`cpu_figures`, sampled with the RSS): the worker's and the stack's
  (broker, Redis, S3 endpoint) CPU microseconds per event, the cores each kept busy,
  and the events per second the worker's own CPU time per event allows: where a
  throughput short of its target goes (the worker's loop, or a machine too small for
  worker and stack together);
* ``reference``: the same worker with the cache unbounded (``HEADRACE_STATE_CACHE_MB=0``,
  the previous behaviour) on a smaller stream of the same kind (``reference_users``,
  ``reference_events``), measured in the same run: its events/s, peak RSS and RSS per
  distinct entity.

Targets (issue 12): peak RSS ≤ 1 GB, growth over the second half ≤ 10 %, ≥ 50k events/s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["run", "rss_around", "cpu_figures", "ACTIVITIES", "DEFAULT_SIZES", "RSS_WINDOW_S"]

#: per kind of stream (see the module docstring): the default (user pool, events) of the
#: measured stream, both over 2M distinct users
DEFAULT_SIZES = {"zipf": (5_000_000, 10_000_000), "uniform": (2_400_000, 5_000_000)}
ACTIVITIES = tuple(DEFAULT_SIZES)

_MASK = (1 << 64) - 1


def _progress(msg: str) -> None:
    print(f"[bench memory] {msg}", file=sys.stderr, flush=True)


def _spread(serial: int, seed: int, pool: int) -> int:
    """A fixed pseudo-random user index of an impression serial (splitmix64)."""
    z = (serial + (seed + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) % pool


class _Stream:
    """The synthetic events (``activity``: see the module docstring); counts what it
    yields (distinct users in a bitmap, the other entities in sets)."""

    def __init__(self, pool: int, events: int, seed: int, start_ms: int, days: float,
                 activity: str = "zipf") -> None:
        self.pool, self.events, self.seed, self.activity = pool, events, seed, activity
        self.start_ms, self.days = start_ms, days
        self.seen = np.zeros(pool, dtype=bool)
        self.others: dict[str, set[str]] = {"ad_id": set(), "campaign_id": set(),
                                            "publisher_id": set()}
        self.count = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from streams.synthetic import SyntheticWorld

        uniform = self.activity == "uniform"
        # uniform: the world's own users only drive the click probabilities (a small
        # pool is enough); zipf: the world's users are the stream's
        world = SyntheticWorld(10_000 if uniform else self.pool, self.seed)
        seen, pool, seed = self.seen, self.pool, self.seed
        ads, cmps, pubs = (self.others[k] for k in ("ad_id", "campaign_id", "publisher_id"))
        for ev in world.iter_events(self.events, self.start_ms, self.days):
            uid = ev.get("user_id")
            if uid is not None:
                if uniform:
                    u = _spread(int(ev["event_id"][-10:]), seed, pool)  # a click: its impression's
                    ev["user_id"] = f"m{u:09d}"
                else:
                    u = int(uid[1:])  # SyntheticWorld's ids: "u" + the user's index
                seen[u] = True
            ads.add(ev["ad_id"])
            cmps.add(ev["campaign_id"])
            pubs.add(ev["publisher_id"])
            self.count += 1
            yield ev

    @property
    def distinct_users(self) -> int:
        return int(self.seen.sum())

    @property
    def distinct_entities(self) -> int:
        return self.distinct_users + sum(len(s) for s in self.others.values())


def _produce(env: dict[str, str], stream: _Stream) -> float:
    from headrace.core.settings import ProducerSettings
    from streams.producer import EventProducer

    started = time.perf_counter()
    producer = EventProducer(ProducerSettings.from_env(env), encoding="arrow", progress=False)
    producer.send_events(stream)
    producer.flush(timeout_s=300)
    return time.perf_counter() - started


#: (epoch s, the worker's CPU seconds, the stack's CPU seconds): one CPU sample
CpuSample = tuple[float, float, float]


def _cpu_s(procs: Sequence[Any]) -> float:
    """User + system CPU seconds of ``procs`` (psutil processes) and their children so
    far (a process gone meanwhile counts 0)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            for q in (p, *p.children(recursive=True)):
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _worker(env: dict[str, str], stats_path: str, timeout: float,
            stack_pids: Sequence[int] = ()
            ) -> tuple[dict[str, Any], list[tuple[float, int]], list[CpuSample]]:
    """Run one worker until idle, sampling its RSS every second, and the CPU time of the
    worker and of the stack's processes (``stack_pids``: the broker, Redis, the S3
    endpoint): (stats, [(epoch s, rss)], [cpu sample])."""
    import psutil

    stack = []
    for pid in stack_pids:
        try:
            stack.append(psutil.Process(pid))
        except psutil.Error:
            continue
    # a batch at this cardinality can keep the loop busy for seconds (every state
    # loaded, decoded, encoded and written): a short idle limit would stop it early
    cmd = [sys.executable, "-m", "headrace.cli", "worker", "--until-idle", "15",
           "--stats", stats_path]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, int]] = []
        cpu: list[CpuSample] = []
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker still running after {timeout:.0f}s")
                try:
                    now, rss, times = time.time(), ps.memory_info().rss, ps.cpu_times()
                except psutil.NoSuchProcess:
                    break
                samples.append((now, rss))
                cpu.append((now, times.user + times.system, _cpu_s(stack)))
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        tail = err.read()[-2000:]
    from bench.stream import read_worker_stats

    return read_worker_stats(stats_path, proc.returncode, tail), samples, cpu


def _end(stats: dict[str, Any]) -> float:
    return float(max(t for t in (stats["last_online_commit"], stats["last_offline_commit"]) if t))


_Sample = TypeVar("_Sample", bound=tuple[Any, ...])


def _nearest(samples: Sequence[_Sample], t: float) -> _Sample:
    """The sample (its epoch seconds first) taken nearest ``t``."""
    return min(samples, key=lambda s: abs(s[0] - t))


def _rss_at(samples: Sequence[tuple[float, int]], t: float) -> int:
    return _nearest(samples, t)[1]


#: seconds of samples that "the RSS at" a time of the run is taken over (their peak)
RSS_WINDOW_S = 30.0


def rss_around(samples: Sequence[tuple[float, int]], t: float, start: float, end: float,
               window_s: float = RSS_WINDOW_S) -> int:
    """The RSS at time ``t`` of the run ``start .. end``: the peak of the samples within
    ``window_s`` seconds centred on ``t``, the window shifted inside the run (the end:
    its last ``window_s``); the nearest sample when the window holds none.

    A worker's RSS swings by ~100 MB within seconds as batches are gathered and written
    (measured: 725-940 MB within one minute at a steady state), so the ratio of two
    single samples is mostly the phase of those swings (-17 % to +15 % across runs of
    the same code); the peak over a window follows the trend a leak would show, and
    never hides memory that was in use.
    """
    lo = min(max(start, t - window_s / 2), max(start, end - window_s))
    hi = lo + window_s
    inside = [rss for at, rss in samples if lo <= at <= hi]
    return max(inside) if inside else _rss_at(samples, t)


def cpu_figures(cpu: Sequence[CpuSample], start: float, end: float, events: int,
                cores: int) -> dict[str, Any]:
    """Where the CPU went while ``events`` events were processed (``start .. end``,
    epoch s), from the samples nearest those times: per event, the worker's and the
    stack's (broker, Redis, S3 endpoint) CPU microseconds; their use of the machine
    (cores busy on average); and ``worker_cpu_bound_events_per_s``, the events per
    second the worker's own CPU time per event allows (its loop never waiting). A
    worker that is short of CPU shows ``worker_cores_busy`` near 1 (one loop thread) or
    ``worker + stack`` near ``cores``.
    """
    if not cpu:
        return {}
    first, last = _nearest(cpu, start), _nearest(cpu, end)
    wall = max(1e-9, last[0] - first[0])
    worker_s, stack_s = last[1] - first[1], last[2] - first[2]
    per = 1e6 / max(1, events)
    return {
        "cores": cores,
        "worker_cpu_us_per_event": round(worker_s * per, 2),
        "stack_cpu_us_per_event": round(stack_s * per, 2),
        "worker_cores_busy": round(worker_s / wall, 3),
        "stack_cores_busy": round(stack_s / wall, 3),
        "worker_cpu_bound_events_per_s": round(events / worker_s) if worker_s > 0 else None,
    }


def _figures(stats: dict[str, Any], samples: list[tuple[float, int]],
             cpu: Sequence[CpuSample] = ()) -> dict[str, Any]:
    start, end = float(stats["first_input"]), _end(stats)
    half = rss_around(samples, (start + end) / 2, start, end)
    last = rss_around(samples, end, start, end)
    half_1, last_1 = _rss_at(samples, (start + end) / 2), _rss_at(samples, end)
    lookups = stats["state_cache_hits"] + stats["state_cache_misses"]
    return {
        "events_per_s": round(stats["events_in"] / max(1e-9, end - start)),
        "processing_s": round(end - start, 1),
        "peak_rss_mb": round(max(r for _, r in samples) / 2**20, 1),
        "rss_start_mb": round(_rss_at(samples, start) / 2**20, 1),
        "rss_half_mb": round(half / 2**20, 1),
        "rss_end_mb": round(last / 2**20, 1),
        "rss_growth_second_half": round(last / half - 1, 4),
        "rss_growth_second_half_single_samples": round(last_1 / half_1 - 1, 4),
        "cache_hit_ratio": round(stats["state_cache_hits"] / lookups, 4) if lookups else None,
        "cache_misses": stats["state_cache_misses"],
        "cache_evictions": stats["state_cache_evictions"],
        "cache_end_mb": round(stats["state_cache_bytes"] / 2**20, 1),
        "states_cached_end": stats["states_cached"],
        "cpu": cpu_figures(cpu, start, end, stats["events_in"], _cores()),
    }


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run(users: int | None = None, events: int | None = None, activity: str = "zipf",
        reference_users: int = 200_000, reference_events: int = 400_000,
        state_cache_mb: int | None = None, days: float = 7.0, seed: int = 0,
        timeout_s: float = 2400.0) -> dict[str, Any]:
    """Run the benchmark on a fresh local stack and return its figures.

    Args:
        users: The user pool (None: :data:`DEFAULT_SIZES`). ``zipf``: the world's users,
            drawn by activity weight; ``uniform``: the ids the users are spread over
            (distinct users ≈ ``users * (1 - exp(-impressions / users))``).
        events: Events (impressions and clicks) of the measured stream (None:
            :data:`DEFAULT_SIZES`).
        activity: ``zipf`` or ``uniform`` (see the module docstring); the reference
            stream is of the same kind.
        reference_users, reference_events: The smaller stream of the unbounded reference
            run (``reference_events=0`` skips it).
        state_cache_mb: ``HEADRACE_STATE_CACHE_MB`` of the measured worker; None: the
            worker's default.
        days: Event-time span of the streams; seed: their seed.
        timeout_s: Longest each worker may run.
    """
    from headrace.core.settings import WorkerSettings
    from headrace.stack.local import local_stack

    if activity not in ACTIVITIES:
        raise ValueError(f"activity must be one of {', '.join(ACTIVITIES)}, got {activity!r}")
    users = DEFAULT_SIZES[activity][0] if users is None else users
    events = DEFAULT_SIZES[activity][1] if events is None else events

    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as tmp, \
            local_stack(os.path.join(tmp, "stack")) as info:
        base = dict(info.env)
        stack_pids = list(info.pids.values())

        def ns(name: str, cache_mb: int | None) -> dict[str, str]:
            env = {**base, "HEADRACE_TOPIC_PREFIX": f"{name}.", "HEADRACE_REDIS_PREFIX": name,
                   "HEADRACE_OFFLINE_URI": f"{info.offline_uri}/{name}",
                   "HEADRACE_GROUP_ID": f"g-{name}", "HEADRACE_DATA_DIR": f"{tmp}/w-{name}",
                   "HEADRACE_LOG_LEVEL": "WARNING"}
            if cache_mb is not None:
                env["HEADRACE_STATE_CACHE_MB"] = str(cache_mb)
            return env

        start_ms = int(time.time() * 1000) - int(days * 86_400_000) - 3_600_000
        reference: dict[str, Any] | None = None
        if reference_events:
            env_r = ns("reference", 0)
            small = _Stream(reference_users, reference_events, seed + 1, start_ms, days,
                            activity)
            _progress(f"reference: producing {reference_events} events over "
                      f"{reference_users} user ids")
            _produce(env_r, small)
            _progress("reference: worker, cache unbounded")
            stats_r, samples_r, cpu_r = _worker(env_r, f"{tmp}/reference.json", timeout_s,
                                                stack_pids)
            fig = _figures(stats_r, samples_r, cpu_r)
            reference = {
                "state_cache_mb": 0,
                "events": stats_r["events_in"],
                "distinct_users": small.distinct_users,
                "distinct_entities": small.distinct_entities,
                "events_per_s": fig["events_per_s"],
                "peak_rss_mb": fig["peak_rss_mb"],
                "rss_growth_second_half": fig["rss_growth_second_half"],
                "rss_kb_per_entity": round(
                    (fig["rss_end_mb"] - fig["rss_start_mb"]) * 1024
                    / max(1, small.distinct_entities), 2),
                "cache_hit_ratio": fig["cache_hit_ratio"],
                "cpu": fig["cpu"],
            }

        env_m = ns("measured", state_cache_mb)
        stream = _Stream(users, events, seed, start_ms, days, activity)
        _progress(f"producing {events} events over a pool of {users} users ({activity}; Arrow "
                  "envelopes)")
        produce_s = _produce(env_m, stream)
        _progress(f"worker: {stream.distinct_users} distinct users")
        stats, samples, cpu = _worker(env_m, f"{tmp}/measured.json", timeout_s, stack_pids)
        fig = _figures(stats, samples, cpu)
        budget = WorkerSettings.from_env({**os.environ, **env_m}).state_cache_mb
        # first touches can hit no cache: one per distinct (view, entity) state
        first_touches = stream.distinct_users + sum(len(s) for s in stream.others.values())
        hits = stats["state_cache_hits"]
        later = hits + stats["state_cache_misses"] - first_touches
        return {
            "activity": activity,
            "user_pool": users,
            "distinct_users": stream.distinct_users,
            "distinct_entities": stream.distinct_entities,
            "events": stats["events_in"],
            "events_produced": stream.count,
            "events_per_user": round(stream.count / max(1, stream.distinct_users), 2),
            "events_per_s": fig["events_per_s"],
            "peak_rss_mb": fig["peak_rss_mb"],
            "rss_growth_second_half": fig["rss_growth_second_half"],
            "state_cache_mb": budget,
            "cache_hit_ratio": fig["cache_hit_ratio"],
            "cache_hit_ratio_after_first_touch": round(hits / later, 4) if later > 0 else None,
            **{k: v for k, v in fig.items()
               if k not in ("events_per_s", "peak_rss_mb", "rss_growth_second_half",
                            "cache_hit_ratio")},
            "rss_samples": len(samples),
            "produce_seconds": round(produce_s, 1),
            "reference": reference,
            "targets": {"peak_rss_mb": 1024, "rss_growth_second_half": 0.10,
                        "events_per_s": 50_000},
        }
