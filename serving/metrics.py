"""Prometheus metrics of the feature server (exposed on ``metrics_port`` when set).

Created once per process in the default registry (a second server in the same
process, as in tests, shares them).

=============================================  =========  ===========================
name                                           type       labels
=============================================  =========  ===========================
headrace_serving_request_seconds               histogram  method
headrace_serving_redis_seconds                 histogram  -
headrace_serving_fallbacks_total               counter    tier, reason
headrace_serving_entities_total                counter    entity, tier
headrace_serving_breaker_state                 gauge      - (0 closed, 1 half-open, 2 open)
headrace_serving_priors_age_seconds            gauge      - (since the priors' computation)
headrace_serving_priors_refresh_errors_total   counter    -
=============================================  =========  ===========================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["ServingMetrics", "metrics", "start_metrics_server"]

_BUCKETS = (0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02,
            0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class ServingMetrics:
    request_seconds: Any
    redis_seconds: Any
    fallbacks: Any
    entities: Any
    breaker_state: Any
    priors_age: Any
    priors_errors: Any


_lock = threading.Lock()
_metrics: ServingMetrics | None = None


def metrics() -> ServingMetrics:
    """The process-wide serving metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = ServingMetrics(
                request_seconds=Histogram(
                    "headrace_serving_request_seconds", "gRPC request latency by method",
                    ["method"], buckets=_BUCKETS),
                redis_seconds=Histogram(
                    "headrace_serving_redis_seconds", "online store round trip latency",
                    buckets=_BUCKETS),
                fallbacks=Counter(
                    "headrace_serving_fallbacks_total",
                    "entities answered from priors because the online store could not answer",
                    ["tier", "reason"]),
                entities=Counter(
                    "headrace_serving_entities_total", "entities served by cold-start tier",
                    ["entity", "tier"]),
                breaker_state=Gauge(
                    "headrace_serving_breaker_state",
                    "online store circuit breaker: 0 closed, 1 half-open, 2 open"),
                priors_age=Gauge(
                    "headrace_serving_priors_age_seconds",
                    "age of the in-process priors (since their computation)"),
                priors_errors=Counter(
                    "headrace_serving_priors_refresh_errors_total",
                    "failed refreshes of the in-process priors"),
            )
        return _metrics


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (a daemon thread)."""
    from prometheus_client import start_http_server

    metrics()
    start_http_server(port, addr=addr)
