"""The monitor's Prometheus metrics, in a registry of their own (served on
``HEADRACE_METRICS_PORT`` by :meth:`MonitorMetrics.serve`). A dashboard relies on these
exact names:

* ``headrace_drift_psi{model_version,feature,window}``,
  ``headrace_drift_ks_statistic{…}``, ``headrace_drift_ks_pvalue{…}``: the champion's
  drift in the open 1 h and 24 h windows against its reference profile; ``feature`` is
  the feature name, ``__prediction__`` for the served prediction, ``context:<column>``
  for a context column (PSI only). NaN while a window has no rows.
* ``headrace_drift_rows{model_version,window}``: rows in that open window.
* ``headrace_model_auc{model_version,window}``,
  ``headrace_model_calibration_ratio{model_version,window}``: of the last closed
  window (its clicks all in); ``headrace_model_auc_validation{model_version}``.
* ``headrace_monitor_alerts_total{signal}`` (``drift``, ``performance``),
  ``headrace_monitor_event_lag_seconds`` (clock minus the newest prediction's ``ts``),
  ``headrace_monitor_records_total{outcome}`` (``ok``, ``shadow``, ``error``,
  ``no_profile``, ``mismatched``, ``undecodable``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from headrace.monitor.windows import OUTCOMES

__all__ = ["MonitorMetrics"]


class MonitorMetrics:
    """The monitor's metrics (module docstring), in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        drift = ["model_version", "feature", "window"]
        self.psi = Gauge("headrace_drift_psi", "population stability index of the open "
                         "window against the reference profile", drift, registry=r)
        self.ks = Gauge("headrace_drift_ks_statistic", "binned two-sample KS statistic of "
                        "the open window against the reference profile", drift, registry=r)
        self.ks_pvalue = Gauge("headrace_drift_ks_pvalue", "asymptotic p-value of the KS "
                               "statistic", drift, registry=r)
        self.rows = Gauge("headrace_drift_rows", "served rows in the open window",
                          ["model_version", "window"], registry=r)
        self.auc = Gauge("headrace_model_auc", "AUC of the last closed window",
                         ["model_version", "window"], registry=r)
        self.calibration = Gauge("headrace_model_calibration_ratio", "sum pCTR / clicks "
                                 "of the last closed window", ["model_version", "window"],
                                 registry=r)
        self.auc_validation = Gauge("headrace_model_auc_validation", "the model's "
                                    "validation AUC (training metadata)", ["model_version"],
                                    registry=r)
        self.alerts = Counter("headrace_monitor_alerts_total", "alerts sent, by signal",
                              ["signal"], registry=r)
        self.event_lag = Gauge("headrace_monitor_event_lag_seconds", "clock minus the "
                               "newest prediction record's ts, seconds", registry=r)
        self.records = Counter("headrace_monitor_records_total", "prediction-log records "
                               "read, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.records.labels(outcome=outcome)
        for signal in ("drift", "performance"):
            self.alerts.labels(signal=signal)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` in a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
