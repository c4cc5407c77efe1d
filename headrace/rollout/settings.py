"""Settings of the rollout controller (``headrace rollout``), from ``HEADRACE_*`` variables.

The connection settings are :class:`~headrace.core.settings.CommonSettings`' (so
``HEADRACE_REDIS_URL`` and ``HEADRACE_REDIS_PREFIX`` point the controller at the same
Redis keys the servers poll, and ``HEADRACE_METRICS_PORT`` is its Prometheus port, as
for every deployable; unset or 0: no endpoint). ``HEADRACE_MODELS_DIR`` is the server's
models folder (``ServeSettings.models_dir``): promoting moves its ``CHAMPION``. The
controller's own knobs are named ``rollout_*`` (``HEADRACE_ROLLOUT_TICK_MS`` …), since
all deployables share one namespace of variables.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator

from headrace.core.settings import CommonSettings

__all__ = ["RolloutSettings"]


class RolloutSettings(CommonSettings):
    """The rollout controller.

    Attributes:
        models_dir: The models folder (versions, ``CHAMPION``, ``HISTORY.jsonl``);
            the same variable as the server's.
        rollout_webhook_url: Slack-compatible incoming-webhook URL: rollbacks and
            promotions are POSTed as ``{"text": …}`` (5 s timeout; a failure is logged,
            never fatal). Unset: no webhook (the log line and the counter remain).
        rollout_tick_ms: Milliseconds between two controller evaluations (guardrails,
            abort requests, phase ends). A breach is acted on within one tick.
        rollout_time_scale: Multiplies every phase duration and the shadow phase
            (1.0: production, 24 h–3 d per phase; ``1/86400``: a day lasts a second).
            ``--time-scale`` wins over it.
        rollout_shadow_s: Length of the shadow phase (phase 0, share 0, the challenger
            scores the champion's requests off the response path) that ``--shadow``
            adds before phase 1, in production seconds (times ``rollout_time_scale``).
        rollout_ack_timeout_s: Longest the controller waits, after a rollback's split,
            for every live server to acknowledge it (``rollback_seconds`` is then
            unknown and the alert says which servers lag).
        rollout_ack_poll_ms: Milliseconds between two reads of the acknowledgements.
        rollout_lock_ttl_ms: Lifetime of the controller's lock in milliseconds,
            renewed at every tick: a killed controller's lock frees itself after this.
            Must exceed ``rollout_tick_ms``.
        rollout_stats_file: The per-arm counts file (:class:`~headrace.rollout.source.
            JsonFileStatsSource`) when ``--stats-file`` is not given.
        rollout_segments: The segments the per-segment gates judge, read from the
            stream's evaluation views: dimension (``publisher``, ``device_type``,
            ``country``) -> values, as JSON (``{"publisher": ["p01", "p02"]}``); the
            views cannot be listed without a scan, and a rollout judges a few known
            segments. Empty: no per-segment impressions and clicks (the servers'
            per-publisher errors are still judged).
        rollout_policy_file: A JSON policy (``Policy.to_dict`` shape, durations in
            seconds) when ``--policy`` is not given; unset: the default policy.
        redis_timeout_ms: Longest one Redis call of the controller may take.
    """

    models_dir: str = "./models"
    rollout_webhook_url: SecretStr | None = None
    rollout_tick_ms: int = Field(default=1000, ge=10, le=60_000)
    rollout_time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    rollout_shadow_s: float = Field(default=24 * 3600.0, ge=0, allow_inf_nan=False)
    rollout_ack_timeout_s: float = Field(default=60.0, gt=0, le=600, allow_inf_nan=False)
    rollout_ack_poll_ms: int = Field(default=50, ge=5, le=5000)
    rollout_lock_ttl_ms: int = Field(default=10_000, ge=200)
    rollout_stats_file: str | None = None
    rollout_policy_file: str | None = None
    rollout_segments: dict[str, list[str]] = Field(default_factory=dict)
    redis_timeout_ms: int = Field(default=2000, ge=50)

    @field_validator("rollout_webhook_url", "rollout_stats_file", "rollout_policy_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # an env var set to "" (compose files) means "not set"
        return None if value == "" else value

    @property
    def webhook_url(self) -> str | None:
        """The webhook URL in clear, or None."""
        url = self.rollout_webhook_url
        return None if url is None else url.get_secret_value() or None

    @property
    def metrics_port_or_none(self) -> int | None:
        """The Prometheus port; None when unset or 0 (off)."""
        return self.metrics_port or None

    def check(self) -> list[str]:
        """Problems between fields (each names the variable); [] when consistent."""
        if self.rollout_lock_ttl_ms <= 2 * self.rollout_tick_ms:
            return [f"HEADRACE_ROLLOUT_LOCK_TTL_MS ({self.rollout_lock_ttl_ms}) must exceed "
                    f"twice HEADRACE_ROLLOUT_TICK_MS ({self.rollout_tick_ms})"]
        return []
