"""Live traffic: impressions stamped with the wall clock, sent at a steady pace.

What the demo shows freshness with, and what the stream benchmark measures it with.
"""

from __future__ import annotations

import time

from headrace.core.settings import ProducerSettings
from streams.producer import EventProducer

__all__ = ["PacedProducer", "produce_paced"]


class PacedProducer:
    """A long-lived producer of impressions stamped ts = now, as an ad server's: created
    (connected, producer id and metadata fetched) once, then sending on a pace."""

    def __init__(self, env: dict[str, str], users: int) -> None:
        import numpy as np

        settings = ProducerSettings.from_env({**env, "HEADRACE_BATCH_EVENTS": "1000"})
        self.producer = EventProducer(settings, encoding="arrow", progress=False)
        self.users = users
        self.rng = np.random.default_rng(7)
        self.n = 0

    def run(self, rate: int, seconds: float) -> int:
        """Produce ``rate`` events/s for ``seconds``: every 20 ms one tick of events, each
        stamped and then sent and acknowledged at once (Arrow envelopes per partition).
        Returns the events sent."""
        tick = 0.02
        per_tick = max(1, int(rate * tick))
        sent = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            now_ms = int(time.time() * 1000)
            batch = []
            for u in self.rng.integers(0, self.users, per_tick).tolist():
                self.n += 1
                batch.append({"type": "impression", "event_id": f"f{self.n}", "ts": now_ms,
                              "user_id": f"u{u}", "ad_id": f"a{u % 97}",
                              "campaign_id": f"c{u % 13}", "publisher_id": f"p{u % 29}",
                              "placement": "feed", "creative_type": "banner",
                              "device_type": "mobile", "country": "US", "bid_cpm": 1.0})
            self.producer.send_events(batch)
            self.producer.flush()
            sent += len(batch)
            next_at = start + (sent / rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return sent


def produce_paced(env: dict[str, str], rate: int, seconds: float, users: int) -> int:
    """Produce ``rate`` events/s for ``seconds`` with ts = now; returns events sent."""
    return PacedProducer(env, users).run(rate, seconds)
