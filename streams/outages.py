"""The worker's dependencies (Redis, S3, Kafka) as :class:`~headrace.core.retry.Outage`
trackers with their Prometheus metrics.

* ``headrace_store_available{store}``: 1 while the dependency answers, 0 during an
  outage (from its first failed call to the first that succeeds again);
* ``headrace_store_retries_total{store}``: failed calls retried;
* ``headrace_store_stall_seconds_total{store}``: seconds spent waiting, counted when
  each outage ends.

:attr:`Outages.stalled` tells ``--until-idle`` that the worker is waiting, not idle.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from headrace.core.retry import Outage
from streams.metrics import StreamMetrics

__all__ = ["Outages", "STORES"]

STORES = ("redis", "s3", "kafka")


@dataclass
class Outages:
    redis: Outage
    s3: Outage
    kafka: Outage

    @classmethod
    def for_metrics(cls, metrics: StreamMetrics) -> Outages:
        """Trackers registered on ``metrics``' registry."""
        r = metrics.registry
        available = Gauge("headrace_store_available",
                          "1 while the store answers, 0 during an outage", ["store"],
                          registry=r)
        retries = Counter("headrace_store_retries_total",
                          "store calls that failed transiently and were retried", ["store"],
                          registry=r)
        stalled = Counter("headrace_store_stall_seconds_total",
                          "seconds spent waiting for a store that was down (per outage, "
                          "counted when it ends)", ["store"], registry=r)

        def make(name: str) -> Outage:
            return Outage(name, on_available=lambda up: available.labels(name).set(int(up)),
                          on_retry=retries.labels(name).inc, on_stall=stalled.labels(name).inc)

        return cls(*(make(n) for n in STORES))

    @property
    def stalled(self) -> bool:
        """Whether some call is waiting for a dependency now."""
        return self.redis.stalled or self.s3.stalled or self.kafka.stalled

    def since_stall_s(self, now: float) -> float | None:
        """Seconds from the end of the latest stall to ``now`` (monotonic), or None."""
        ends = [o.recovered_at for o in (self.redis, self.s3, self.kafka)
                if o.recovered_at is not None]
        return now - max(ends) if ends else None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per store: retries, outages and seconds stalled so far (the run statistics)."""
        return {o.name: {"retries": o.retries, "outages": o.stalls,
                         "stalled_s": round(o.stalled_s, 3)}
                for o in (self.redis, self.s3, self.kafka)}
