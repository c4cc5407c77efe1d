"""The simulated ad server: threads that call ``Score``, show the top candidate, and
emit its impression (and, with the true probability, its click) to Kafka, carrying the
answer's ``prediction_id``, ``model_version`` and the shown candidate's ``p_ctr``
(the input contract's optional fields)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headrace.core.errors import HeadraceError
from headrace.simulate.world import World

__all__ = ["ArmTally", "AdServer", "EventPump"]


@dataclass
class ArmTally:
    """What the ad server saw of one model version."""

    impressions: int = 0
    clicks: int = 0
    sum_true_p: float = 0.0
    sum_pctr: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: true CTR (mean true click probability of what was shown),
        observed CTR, mean predicted CTR, client-side Score p99."""
        n = max(self.impressions, 1)
        return {"impressions": self.impressions, "clicks": self.clicks,
                "true_ctr": round(self.sum_true_p / n, 5),
                "observed_ctr": round(self.clicks / n, 5),
                "mean_pctr": round(self.sum_pctr / n, 5),
                "score_p99_ms": p99(self.latencies_ms)}


def p99(values: Sequence[float]) -> float | None:
    """The 99th percentile, rounded to 0.01 ms (None without values)."""
    return None if not values else round(float(np.percentile(values, 99)), 2)


class EventPump(threading.Thread):
    """One producer thread: the ad-server threads queue events, it sends them in
    batches (every 50 ms) through :class:`streams.producer.EventProducer`."""

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(name="sim-producer", daemon=True)
        from headrace.core.settings import ProducerSettings
        from streams.producer import EventProducer

        settings = ProducerSettings.from_env({**env, "HEADRACE_BATCH_EVENTS": "2000"})
        self.producer = EventProducer(settings, encoding="arrow", progress=False)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stop_flag = threading.Event()
        self.sent = 0

    def send_now(self, events: Sequence[dict[str, Any]]) -> None:
        """Send ``events`` synchronously (the history, before the thread starts)."""
        for lo in range(0, len(events), 5000):
            self.producer.send_events(events[lo:lo + 5000])
        self.producer.flush()
        self.sent += len(events)

    def run(self) -> None:
        while True:
            stopping = self.stop_flag.wait(0.05)
            batch: list[dict[str, Any]] = []
            while True:
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            if batch:
                self.producer.send_events(batch)
                self.producer.flush()
                self.sent += len(batch)
            if stopping:
                return


class AdServer:
    """``threads`` threads, each with its own client of one server (round robin), paced
    together at ``rate`` requests per second."""

    def __init__(self, world: World, addresses: Sequence[str], pump: EventPump, *,
                 rate: float, threads: int, seed: int) -> None:
        self.world, self.addresses, self.pump = world, list(addresses), pump
        self.rate, self.n_threads, self.seed = rate, threads, seed
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.arms: dict[str, ArmTally] = {}
        self.latencies_ms: list[float] = []
        self.requests = 0
        self.errors = 0
        self.last_error: str | None = None
        #: keep what was shown (the first candidate's bid, the context, its pCTR)
        self.record_shown = False
        #: a click's delay after its impression, ms (uniform between the bounds)
        self.click_delay_ms: tuple[int, int] = (1, 1)
        self.shown: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads."""
        for k in range(self.n_threads):
            t = threading.Thread(target=self._loop, args=(k,), name=f"sim-ad-{k}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the threads and wait for them."""
        self.stop_flag.set()
        for t in self._threads:
            t.join(10)

    def _loop(self, k: int) -> None:
        from serving.client import FeatureClient, build_score_request

        rng = np.random.default_rng([self.seed, k])
        client = FeatureClient(self.addresses[k % len(self.addresses)], timeout_s=2.0)
        period = self.n_threads / self.rate
        next_at = time.monotonic() + rng.uniform(0, period)
        n = 0
        try:
            while not self.stop_flag.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at + period, time.monotonic() - 1.0)
                req = self.world.request(rng)
                t0 = time.perf_counter()
                try:
                    resp = client.score_pb(build_score_request(req["user"], req["candidates"],
                                                               req["context"]))
                except HeadraceError as exc:
                    with self.lock:
                        self.requests += 1
                        self.errors += 1
                        self.last_error = str(exc)
                    continue
                ms = (time.perf_counter() - t0) * 1000.0
                n += 1
                self._show(req, resp, ms, rng, f"{k}-{n}")
        finally:
            client.close()

    def _show(self, req: dict[str, Any], resp: Any, ms: float, rng: np.random.Generator,
              tag: str) -> None:
        top = int(resp.order[0])
        ad = req["index"][top]
        cand = req["candidates"][top]
        ctx = req["context"]
        p_true = self.world.true_p(ad, ctx["device_type"], ctx["country"])
        p_ctr = float(resp.p_ctr[0])
        now = time.time_ns() // 1_000_000
        imp = {"type": "impression", "event_id": f"si{self.seed}-{tag}", "ts": now,
               "user_id": req["user"], "ad_id": cand["ad_id"],
               "campaign_id": cand["campaign_id"], "publisher_id": ctx["publisher_id"],
               "placement": ctx["placement"], "creative_type": ctx["creative_type"],
               "device_type": ctx["device_type"], "country": ctx["country"],
               "bid_cpm": cand["bid_cpm"], "prediction_id": resp.prediction_id,
               "model_version": resp.model_version, "p_ctr": min(max(p_ctr, 0.0), 1.0)}
        self.pump.events.put(imp)
        clicked = bool(rng.random() < p_true)
        if clicked:
            lo, hi = self.click_delay_ms
            delay = lo if lo == hi else int(rng.integers(lo, hi + 1))
            self.pump.events.put({
                "type": "click", "event_id": f"sk{self.seed}-{tag}", "ts": now + delay,
                "impression_id": imp["event_id"], "user_id": imp["user_id"],
                "ad_id": imp["ad_id"], "campaign_id": imp["campaign_id"],
                "publisher_id": imp["publisher_id"], "prediction_id": imp["prediction_id"],
                "model_version": imp["model_version"], "p_ctr": imp["p_ctr"],
                "device_type": imp["device_type"], "country": imp["country"]})
        with self.lock:
            self.requests += 1
            self.latencies_ms.append(ms)
            tally = self.arms.setdefault(resp.model_version, ArmTally())
            tally.impressions += 1
            tally.clicks += int(clicked)
            tally.sum_true_p += p_true
            tally.sum_pctr += p_ctr
            tally.latencies_ms.append(ms)
            if self.record_shown:
                self.shown.append({"bid_cpm": cand["bid_cpm"], "p_ctr": p_ctr,
                                   "device_type": ctx["device_type"],
                                   "country": ctx["country"]})
