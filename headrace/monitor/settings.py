"""Settings of the drift and performance monitor (``headrace monitor``), from
``HEADRACE_*`` variables.

The connection settings are :class:`~headrace.core.settings.CommonSettings'`
(``HEADRACE_KAFKA_BOOTSTRAP``, ``HEADRACE_TOPIC_PREFIX`` for the prediction log and the
event topics, ``HEADRACE_REDIS_URL``/``HEADRACE_REDIS_PREFIX`` for the alert stream,
``HEADRACE_METRICS_PORT`` for Prometheus; unset or 0: no endpoint).
``HEADRACE_MODELS_DIR`` is the server's models folder: the monitor follows its
``CHAMPION`` and reads each version's ``metadata.json`` and ``reference_profile.json``.
The monitor's own knobs are named ``monitor_*``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator

from headrace.core.settings import CommonSettings
from headrace.monitor.rules import RuleConfig

__all__ = ["MonitorSettings"]


class MonitorSettings(CommonSettings):
    """The monitor.

    Attributes:
        models_dir: the models folder (versions, ``CHAMPION``); the server's variable.
        monitor_tick_s: seconds between two evaluations (drift of the open windows,
            closed AUC windows, alert rules), 0.05..3600.
        monitor_attribution_s: the click attribution window in seconds (a click counts
            when ``imp.ts <= click.ts <= imp.ts + attribution``), as ``headrace labels``.
        monitor_min_rows: rows a window needs before its PSI may warn or alert (and
            impressions a closed window needs for a performance alert).
        monitor_top_k: the model's features, by ``importance_gain``, whose drift may
            raise a drift alert.
        monitor_consecutive: evaluations in a row at PSI >= 0.25 for a drift alert.
        monitor_auc_margin: a closed window's AUC below the validation AUC minus this
            counts as degraded.
        monitor_auc_consecutive: degraded closed windows in a row for an AUC alert.
        monitor_calibration_low, monitor_calibration_high: the calibration ratio's band
            (Σ pCTR / clicks of a closed window).
        monitor_webhook_url: Slack-compatible webhook for alerts (``{"text": …}``, 5 s
            timeout, a failure logged); unset: none.
        monitor_max_future_s: events dated more than this after the clock are not
            counted (the stream decoder's rule).
    """

    models_dir: str = "./models"
    monitor_tick_s: float = Field(default=5.0, ge=0.05, le=3600, allow_inf_nan=False)
    monitor_attribution_s: int = Field(default=1800, ge=0, le=7 * 86_400)
    monitor_min_rows: int = Field(default=500, ge=1)
    monitor_top_k: int = Field(default=5, ge=1)
    monitor_consecutive: int = Field(default=3, ge=1)
    monitor_auc_margin: float = Field(default=0.02, ge=0, le=1, allow_inf_nan=False)
    monitor_auc_consecutive: int = Field(default=2, ge=1)
    monitor_calibration_low: float = Field(default=0.85, gt=0, allow_inf_nan=False)
    monitor_calibration_high: float = Field(default=1.15, gt=0, allow_inf_nan=False)
    monitor_webhook_url: SecretStr | None = None
    monitor_max_future_s: int = Field(default=3600, ge=0)

    @field_validator("monitor_webhook_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # an env var set to "" (compose files) means "not set"
        return None if value == "" else value

    @property
    def webhook_url(self) -> str | None:
        """The webhook URL in clear, or None."""
        url = self.monitor_webhook_url
        return None if url is None else url.get_secret_value() or None

    @property
    def attribution_ms(self) -> int:
        """The attribution window in ms."""
        return self.monitor_attribution_s * 1000

    def rule_config(self) -> RuleConfig:
        """The alert thresholds."""
        return RuleConfig(self.monitor_min_rows, self.monitor_top_k,
                          self.monitor_consecutive, self.monitor_auc_margin,
                          self.monitor_auc_consecutive, self.monitor_calibration_low,
                          self.monitor_calibration_high)

    def check(self) -> list[str]:
        """Problems between fields (each names the variable); [] when consistent."""
        if self.monitor_calibration_low >= self.monitor_calibration_high:
            return [f"HEADRACE_MONITOR_CALIBRATION_LOW ({self.monitor_calibration_low}) "
                    "must be below HEADRACE_MONITOR_CALIBRATION_HIGH "
                    f"({self.monitor_calibration_high})"]
        return []
