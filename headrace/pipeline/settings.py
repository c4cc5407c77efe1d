"""Settings of the retraining pipeline (``headrace pipeline``), from ``HEADRACE_*`` variables.

The connection settings are :class:`~headrace.core.settings.CommonSettings'`: the
offline store (``HEADRACE_OFFLINE_URI``, ``HEADRACE_S3_*``), Redis (the rollout keys and
the monitor's alerts stream under ``HEADRACE_REDIS_PREFIX``), the definitions and
``HEADRACE_METRICS_PORT`` (served by ``pipeline schedule``; unset or 0: none).
``HEADRACE_MODELS_DIR`` is the models folder the servers load (as for ``rollout``); the
run records live in ``MODELS_DIR/pipeline/``. The pipeline's own knobs are named
``pipeline_*``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from headrace.core.errors import InputError
from headrace.core.settings import CommonSettings, OfflineSettings
from headrace.core.timeparse import parse_duration

__all__ = ["PipelineSettings"]


class PipelineSettings(CommonSettings):
    """The retraining pipeline.

    Attributes:
        models_dir: The models folder (versions, ``CHAMPION``, ``HISTORY.jsonl``; the run
            records under ``pipeline/``); the same variable as the server's.
        pipeline_lookback: How far back the labels reach, a duration (``30d``): the
            impressions of ``[now - lookback, now - attribution)``.
        pipeline_attribution: The click attribution window (``30m``); the newest
            impressions are that old, so every label is final.
        pipeline_every: ``schedule`` starts a run when the last successful one started
            longer ago than this (``14d``).
        pipeline_retry_after: After a run that did not succeed, the time trigger waits
            at least this long before the next (``1h``): a run failing on its data does
            not loop every poll.
        pipeline_poll_s: Seconds between two looks of ``schedule`` (> 0).
        pipeline_candidates: Hyperparameter combinations the training search tries
            (1..1000, default 50).
        pipeline_search_budget_s: Seconds the search may take (None: no limit).
        pipeline_seed: The training seed (the run is deterministic for given data).
        pipeline_threads: LightGBM threads.
        pipeline_min_rows: Fewest rows the labels and the training set must hold.
        pipeline_retries: Tries of a step failing on a transient backend error (Redis,
            S3, Kafka) before the run fails (1..100).
        pipeline_retry_initial_s / pipeline_retry_max_s: The back-off between them.
        pipeline_shadow: Start the rollout with the shadow phase
            (``HEADRACE_ROLLOUT_SHADOW_S``), as ``rollout start --shadow``.
        pipeline_crash_after: Test only: the process ends with ``os._exit(137)`` right
            after this step is recorded done (how the integration tests kill a run at a
            known point). Empty: never.
        redis_timeout_ms: Longest one Redis call may take.
    """

    models_dir: str = "./models"
    pipeline_lookback: str = "30d"
    pipeline_attribution: str = "30m"
    pipeline_every: str = "14d"
    pipeline_retry_after: str = "1h"
    pipeline_poll_s: float = Field(default=30.0, gt=0, le=86_400, allow_inf_nan=False)
    pipeline_candidates: int = Field(default=50, ge=1, le=1000)
    pipeline_search_budget_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    pipeline_seed: int = Field(default=0, ge=0)
    pipeline_threads: int = Field(default=1, ge=1, le=256)
    pipeline_min_rows: int = Field(default=1000, ge=1)
    pipeline_retries: int = Field(default=5, ge=1, le=100)
    pipeline_retry_initial_s: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    pipeline_retry_max_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    pipeline_shadow: bool = False
    pipeline_crash_after: str = ""
    redis_timeout_ms: int = Field(default=2000, ge=50)

    @field_validator("pipeline_search_budget_s", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # an env var set to "" (compose files) means "not set"
        return None if value == "" else value

    @field_validator("pipeline_lookback", "pipeline_attribution", "pipeline_every",
                     "pipeline_retry_after")
    @classmethod
    def _duration(cls, value: str) -> str:
        try:
            parse_duration(value)
        except InputError as exc:  # pydantic reports ValueErrors, naming the variable
            raise ValueError(str(exc)) from None
        return value

    @property
    def lookback_ms(self) -> int:
        """``pipeline_lookback`` in milliseconds."""
        return parse_duration(self.pipeline_lookback)

    @property
    def attribution_ms(self) -> int:
        """``pipeline_attribution`` in milliseconds."""
        return parse_duration(self.pipeline_attribution)

    @property
    def every_ms(self) -> int:
        """``pipeline_every`` in milliseconds."""
        return parse_duration(self.pipeline_every)

    @property
    def retry_after_ms(self) -> int:
        """``pipeline_retry_after`` in milliseconds."""
        return parse_duration(self.pipeline_retry_after)

    @property
    def metrics_port_or_none(self) -> int | None:
        """The Prometheus port; None when unset or 0 (off)."""
        return self.metrics_port or None

    def offline(self) -> OfflineSettings:
        """The same connection settings as :class:`OfflineSettings` (no progress bar)."""
        common = {name: getattr(self, name) for name in CommonSettings.model_fields}
        return OfflineSettings.from_env({}, **common, progress=False)

    def check(self) -> list[str]:
        """Problems between fields (each names the variable); [] when consistent."""
        problems = []
        if self.attribution_ms >= self.lookback_ms:
            problems.append(f"HEADRACE_PIPELINE_ATTRIBUTION ({self.pipeline_attribution}) "
                            f"must be shorter than HEADRACE_PIPELINE_LOOKBACK "
                            f"({self.pipeline_lookback})")
        if self.every_ms <= 0:
            problems.append("HEADRACE_PIPELINE_EVERY must be positive")
        if self.pipeline_retry_initial_s > self.pipeline_retry_max_s:
            problems.append("HEADRACE_PIPELINE_RETRY_INITIAL_S must not exceed "
                            "HEADRACE_PIPELINE_RETRY_MAX_S")
        return problems

