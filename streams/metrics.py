"""Prometheus metrics of the stream worker (one registry per worker process).

The exported registry (``headrace worker --metrics-port``) also carries the process,
platform and GC collectors (``StreamMetrics(process=True)``): ``process_resident_memory_bytes``
beside ``headrace_state_cache_bytes`` shows what the state cache's estimate leaves out
(allocator free lists, Arrow buffers, the process itself), and
``rate(process_cpu_seconds_total)`` over ``rate(headrace_events_in_total)`` is the CPU
each event costs, the figure ``headrace bench memory`` reports as
``worker_cpu_us_per_event``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from headrace.core.process_metrics import register_process_collectors

__all__ = ["StreamMetrics"]

_FRESHNESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
_IO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass
class StreamMetrics:
    """The worker's metrics, in ``registry`` (a new, empty one by default).

    ``process``: also register the process, platform and GC collectors (``process_*``,
    ``python_info``, ``python_gc_*``, as ``prometheus_client``'s default registry does);
    the worker sets it for the registry it exports, tests leave it off.
    """

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    process: bool = False

    def __post_init__(self) -> None:
        r = self.registry
        if self.process:
            register_process_collectors(r)
        self.events_in = Counter(
            "headrace_events_in_total", "events decoded from input", ["topic"], registry=r
        )
        self.applied = Counter(
            "headrace_events_applied_total",
            "events applied to online view states",
            ["view"],
            registry=r,
        )
        self.late = Counter(
            "headrace_events_late_total", "events older than the watermark", ["topic"], registry=r
        )
        self.dead = Counter(
            "headrace_events_dead_lettered_total",
            "malformed events sent to the dead-letter topic",
            ["topic", "reason"],
            registry=r,
        )
        self.corrupt_states = Counter(
            "headrace_corrupt_states_total",
            "unreadable view states in the online store: dead-lettered (corrupt_state) "
            "and reset to empty",
            ["view"],
            registry=r,
        )
        self.freshness = Histogram(
            "headrace_freshness_seconds",
            "wall time a value became visible in Redis minus the event time",
            buckets=_FRESHNESS_BUCKETS,
            registry=r,
        )
        self.redis_write = Histogram(
            "headrace_redis_write_seconds", "Redis flush latency", buckets=_IO_BUCKETS, registry=r
        )
        self.s3_write = Histogram(
            "headrace_offline_write_seconds",
            "offline part write latency",
            buckets=_IO_BUCKETS,
            registry=r,
        )
        self.write_errors = Counter(
            "headrace_write_errors_total", "online/offline write errors", ["store"], registry=r
        )
        self.lag = Gauge(
            "headrace_consumer_lag",
            "fetch high watermark minus next offset",
            ["topic", "partition"],
            registry=r,
        )
        self.watermark = Gauge(
            "headrace_watermark_ms",
            "partition watermark (max ts − lateness)",
            ["topic", "partition"],
            registry=r,
        )
        self.gaps = Counter("headrace_offset_gaps_total",
                            "deliveries that skipped past the next expected offset (re-sought)",
                            ["topic"], registry=r)
        self.states_cached = Gauge(
            "headrace_states_cached", "entity view states in memory", registry=r
        )
        self.state_cache_bytes = Gauge(
            "headrace_state_cache_bytes",
            "estimated memory of the cached view states (bytes)", registry=r
        )
        self.state_cache_limit = Gauge(
            "headrace_state_cache_limit_bytes",
            "the state cache's budget (HEADRACE_STATE_CACHE_MB; 0: unbounded)", registry=r
        )
        self.state_cache_hits = Counter(
            "headrace_state_cache_hits_total",
            "view-state lookups served from memory (per distinct state and batch)", registry=r
        )
        self.state_cache_misses = Counter(
            "headrace_state_cache_misses_total",
            "view states loaded from the online store (first touch or after eviction)",
            registry=r,
        )
        self.state_cache_evictions = Counter(
            "headrace_state_cache_evictions_total",
            "durable view states dropped from memory to stay within the budget", registry=r
        )

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)
