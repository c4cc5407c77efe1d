"""The pipeline's Prometheus metrics, in their own registry (``pipeline schedule`` serves
them on ``HEADRACE_METRICS_PORT``).

* ``headrace_pipeline_runs_total{outcome,trigger}`` — runs that ended: ``outcome`` is the
  run's status (``succeeded``, ``rejected``, ``invalid``, ``failed``), ``trigger`` what
  started it (``manual``, ``schedule``, ``drift``, ``performance``).
* ``headrace_pipeline_step_seconds{step}`` — seconds the step's last try took.
* ``headrace_pipeline_retries_total{step}`` — transient failures retried.
* ``headrace_pipeline_last_success_timestamp_seconds`` — when the last run that went
  through (``succeeded`` or ``rejected``) ended, epoch seconds; 0 before one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["PipelineMetrics"]


class PipelineMetrics:
    """The metrics above, registered in ``registry`` (default: a new one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs = Counter("headrace_pipeline_runs_total", "Pipeline runs that ended",
                            ["outcome", "trigger"], registry=self.registry)
        self.step_seconds = Gauge("headrace_pipeline_step_seconds",
                                  "Seconds the step's last try took", ["step"],
                                  registry=self.registry)
        self.retries = Counter("headrace_pipeline_retries_total",
                               "Transient step failures retried", ["step"],
                               registry=self.registry)
        self.last_success = Gauge("headrace_pipeline_last_success_timestamp_seconds",
                                  "End of the last run that went through (epoch seconds)",
                                  registry=self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - a scrape port
        """Serve ``/metrics`` on ``port`` in a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
