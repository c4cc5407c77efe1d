"""Settings for every Headrace deployable, read from ``HEADRACE_*`` environment variables.

This is the only module that reads configuration from the environment. Each deployable
(stream worker, gRPC server, offline jobs, producer) builds its settings object once at
its entry point and passes it down::

    settings = WorkerSettings()                 # from os.environ (HEADRACE_*)
    settings = WorkerSettings.from_env(env)     # from a mapping only (tests, demo)

Client configuration is derived here so that every runtime talks to Kafka, Redis and
S3 the same way. Two broker profiles exist:

* ``kafka``: a real Kafka cluster; librdkafka / Kafka defaults.
* ``embedded``: the local Tansu broker of ``headrace stack up``. Group joins there wait
  about half the session timeout, so the session timeout is 2 s (real Kafka rejects
  values below 6 s, which is why this is never the default).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from headrace.core.kafka_security import KafkaSecurity
from headrace.core.redis_conn import REDIS_SCHEMES, RedisConfig

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "ENV_PREFIX",
    "SHIPPED_DEFINITIONS",
    "CommonSettings",
    "WorkerSettings",
    "ServeSettings",
    "OfflineSettings",
    "ProducerSettings",
    "SETTINGS_CLASSES",
]

ENV_PREFIX = "HEADRACE_"

#: the shipped feature definitions, equal to ``feature_defs.registry.DEFAULT_DEFINITIONS``
#: (this ground floor imports nothing of ours; tests/unit/test_definitions.py checks both)
SHIPPED_DEFINITIONS = "feature_defs.standard:VIEWS"

#: Embedded (Tansu) group timing: joins take max(session/2, ~1 s) there (measured; the
#: broker's other defects are pinned by tests/integration/test_broker_contract.py).
_EMBEDDED_SESSION_TIMEOUT_MS = 2000
_EMBEDDED_HEARTBEAT_INTERVAL_MS = 500

# While set, settings are built from init values only (see ``from_env``), so a developer's
# exported HEADRACE_* variables cannot leak into a test's or the demo's settings.
_ISOLATED: contextvars.ContextVar[bool] = contextvars.ContextVar("headrace_isolated", default=False)


@contextmanager
def _isolated() -> Iterator[None]:
    token = _ISOLATED.set(True)
    try:
        yield
    finally:
        _ISOLATED.reset(token)


class CommonSettings(BaseSettings):
    """Connection settings shared by every deployable.

    Attributes:
        kafka_bootstrap: Comma-separated ``host:port`` list of Kafka bootstrap servers.
        broker_profile: ``kafka`` (real cluster) or ``embedded`` (local Tansu broker).
        redis_url: redis-py URL of the online store, a secret (redacted in ``repr``,
            dumps and logs): ``redis://[user]:password@host:port/db`` (an ACL user, or
            the legacy password alone: ``redis://:password@host``), ``rediss://`` for
            TLS, or ``unix://path``. Read it through :meth:`redis_config`.
        redis_tls_ca: PEM file of a private CA that signed Redis's certificate
            (``rediss://`` only); unset: the system's trust store.
        redis_tls_cert: PEM client certificate for mutual TLS (needs ``redis_tls_key``).
        redis_tls_key: PEM private key of ``redis_tls_cert``.
        redis_prefix: Prefix of every Redis key Headrace writes.
        kafka_security_protocol: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or
            ``SASL_SSL``, for every Kafka client (:mod:`headrace.core.kafka_security`).
        kafka_sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
        kafka_sasl_username: The SASL user.
        kafka_sasl_password: Its password, a secret.
        kafka_tls_ca: PEM file of the CA of the brokers' certificates (unset: the
            system's trust store).
        kafka_tls_cert: PEM client certificate for mutual TLS (needs ``kafka_tls_key``).
        kafka_tls_key: PEM private key of ``kafka_tls_cert``.
        s3_endpoint: S3 endpoint URL (MinIO, moto); ``None`` means AWS itself.
        s3_key: S3 access key id, a secret.
        s3_secret: S3 secret access key, a secret.
        s3_region: The bucket's region (AWS); unset: discovered by the client on AWS,
            ``us-east-1`` with a custom endpoint.
        offline_uri: Root of the offline store: ``s3://bucket[/prefix]`` or a local path.
        topic_prefix: Prepended to every topic name (tests use it for unique topics).
        partitions: Partition count of topics Headrace creates (>= 1). Tansu cannot add
            partitions later, so this is the final count.
        metrics_port: Port of the Prometheus endpoint; ``None`` disables it.
        log_level: Python logging level name.
        definitions: The feature definitions every command and process runs:
            ``package.module:ATTR`` (importable, or found in the current directory) or
            ``path/to/file.py:ATTR``, where ``ATTR`` is a sequence of ``FeatureView``
            (``:VIEWS`` if omitted). Default: the shipped set
            ``feature_defs.standard:VIEWS``. A command's ``--definitions`` flag wins
            over it; an empty value means the default.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        # a validation error must not echo a value that may be a secret
        hide_input_in_errors=True,
    )

    kafka_bootstrap: str = "localhost:9092"
    broker_profile: Literal["kafka", "embedded"] = "kafka"
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    redis_prefix: str = "hr"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = \
        "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_tls_ca: str | None = None
    kafka_tls_cert: str | None = None
    kafka_tls_key: str | None = None
    s3_endpoint: str | None = None
    s3_key: SecretStr | None = None
    s3_secret: SecretStr | None = None
    s3_region: str | None = None
    offline_uri: str = "s3://headrace-offline"
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: str = "INFO"
    definitions: str = SHIPPED_DEFINITIONS

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("definitions")
    @classmethod
    def _default_definitions(cls, value: str) -> str:
        # An env var set to "" (common in compose files) means "the shipped set".
        return value.strip() or SHIPPED_DEFINITIONS

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in REDIS_SCHEMES:  # the message never shows the URL (a secret)
            raise ValueError(f"the Redis URL must start with redis://, rediss:// or unix://, "
                             f"not {scheme or 'no scheme'}")
        return value

    @model_validator(mode="after")
    def _redis_tls(self) -> Self:
        problems = []
        tls_files = self.redis_tls_ca or self.redis_tls_cert or self.redis_tls_key
        if tls_files and urlsplit(self.redis_url.get_secret_value()).scheme != "rediss":
            problems.append("HEADRACE_REDIS_TLS_* are set but HEADRACE_REDIS_URL is not "
                            "rediss://")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            problems.append("HEADRACE_REDIS_TLS_CERT and HEADRACE_REDIS_TLS_KEY go together")
        problems.extend(self.kafka_security().problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("s3_endpoint", "metrics_port", "redis_tls_ca", "redis_tls_cert",
                     "redis_tls_key", "kafka_sasl_mechanism", "kafka_sasl_username",
                     "kafka_sasl_password", "kafka_tls_ca", "kafka_tls_cert",
                     "kafka_tls_key", "s3_key", "s3_secret", "s3_region", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # An env var set to "" (common in compose files) means "not set".
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _ISOLATED.get():
            return (init_settings,)
        return (init_settings, env_settings, dotenv_settings, file_secret_settings)

    @classmethod
    def load(cls) -> Self:
        """Build the settings from the process environment, as a command does.

        Raises:
            InputError: a variable does not validate: one sentence naming it (never
                its value, which may be a secret).
        """
        from pydantic import ValidationError

        from headrace.core.errors import InputError

        try:
            return cls()
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(x) for x in problem.get("loc", ())) or "settings"
            raise InputError(f"invalid setting HEADRACE_{where.upper()}: {problem['msg']}"
                             ) from exc

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Self:
        """Build settings from ``env`` only, ignoring the process environment.

        Keys are matched like environment variables (``HEADRACE_`` prefix, any case);
        keys that name no field of this class are ignored, as the env source does.
        ``overrides`` are field values (typed, not strings) that win over ``env``.

        Raises:
            pydantic.ValidationError: A value does not validate.
        """
        fields = set(cls.model_fields)
        values: dict[str, str] = {}
        for key, value in env.items():
            if key.upper().startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX) :].lower()
                if name in fields:
                    values[name] = value
        with _isolated():
            return cls(**{**values, **overrides})

    # -- naming -------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        """Return the full topic name: ``topic_prefix + name``."""
        return f"{self.topic_prefix}{name}"

    # -- Redis ----------------------------------------------------------------------------

    def redis_config(self) -> RedisConfig:
        """Where and how to reach Redis (URL, password, TLS files): pass it to
        ``RedisOnlineStore`` or build clients with its ``client()`` /
        ``connection_pool()``, the only places the URL's secret is read."""
        return RedisConfig(self.redis_url, self.redis_tls_ca, self.redis_tls_cert,
                           self.redis_tls_key)

    # -- Kafka (confluent-kafka / librdkafka) ----------------------------------------------

    @property
    def embedded(self) -> bool:
        """True when talking to the local Tansu broker."""
        return self.broker_profile == "embedded"

    def kafka_security(self) -> KafkaSecurity:
        """Kafka authentication and TLS, mapped to librdkafka and to Faust
        (:mod:`headrace.core.kafka_security`)."""
        return KafkaSecurity(self.kafka_security_protocol, self.kafka_sasl_mechanism,
                             self.kafka_sasl_username, self.kafka_sasl_password,
                             self.kafka_tls_ca, self.kafka_tls_cert, self.kafka_tls_key)

    def confluent_common(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and admin clients."""
        conf: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap,
                                **self.kafka_security().confluent()}
        if self.embedded:
            conf["session.timeout.ms"] = _EMBEDDED_SESSION_TIMEOUT_MS
            conf["heartbeat.interval.ms"] = _EMBEDDED_HEARTBEAT_INTERVAL_MS
        return conf

    def confluent_admin(self) -> dict[str, Any]:
        """librdkafka settings for an ``AdminClient`` (no group settings)."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_security().confluent()}

    def confluent_consumer(self, group: str) -> dict[str, Any]:
        """Consumer settings: manual commits, and a new group starts at the earliest offset.

        ``auto.offset.reset`` is always ``earliest``: a group without committed offsets
        must never skip data silently.
        """
        conf = self.confluent_common()
        conf.update(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        return conf

    def confluent_producer(self) -> dict[str, Any]:
        """Producer settings: idempotent on real Kafka; ``acks=all`` everywhere."""
        conf = self.confluent_common()
        # Group timing keys are consumer-only; librdkafka warns about them on producers.
        conf.pop("session.timeout.ms", None)
        conf.pop("heartbeat.interval.ms", None)
        if self.embedded:
            conf.update({"acks": "all", "linger.ms": 5})
        else:
            conf.update({"enable.idempotence": True, "acks": "all"})
        return conf

    # -- Faust ------------------------------------------------------------------------------

    def faust_broker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``faust.App`` describing the broker.

        At-least-once always: aiokafka's idempotent producer fails on Tansu (defect D3,
        pinned by tests/integration/test_broker_contract.py).
        """
        urls = ";".join(f"kafka://{hp.strip()}" for hp in self.kafka_bootstrap.split(","))
        kwargs: dict[str, Any] = {
            "broker": urls,
            "processing_guarantee": "at_least_once",
            "consumer_auto_offset_reset": "earliest",
        }
        credentials = self.kafka_security().faust_credentials()
        if credentials is not None:
            kwargs["broker_credentials"] = credentials
        if self.embedded:
            kwargs["broker_session_timeout"] = _EMBEDDED_SESSION_TIMEOUT_MS / 1000
            kwargs["broker_heartbeat_interval"] = _EMBEDDED_HEARTBEAT_INTERVAL_MS / 1000
        else:
            kwargs["broker_session_timeout"] = 45.0
            kwargs["broker_heartbeat_interval"] = 3.0
        return kwargs

    # -- S3 ---------------------------------------------------------------------------------

    @property
    def offline_is_s3(self) -> bool:
        """True when ``offline_uri`` points at S3."""
        return self.offline_uri.startswith(("s3://", "s3a://"))

    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for fsspec/s3fs (``{}`` for a local offline store).

        No region is passed unless ``s3_region`` is set: with a custom endpoint s3fs
        then fails to create buckets.
        """
        if not self.offline_is_s3:
            return {}
        opts: dict[str, Any] = {}
        if self.s3_region:
            opts["client_kwargs"] = {"region_name": self.s3_region}
        if self.s3_key is not None:
            opts["key"] = self.s3_key.get_secret_value()
        if self.s3_secret is not None:
            opts["secret"] = self.s3_secret.get_secret_value()
        if self.s3_endpoint:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}),
                                     "endpoint_url": self.s3_endpoint}
        return opts

    def pyarrow_s3(self, timeout_s: float | None = None) -> pyarrow.fs.S3FileSystem | None:
        """A ``pyarrow.fs.S3FileSystem`` for the offline store, or ``None`` if it is local.

        ``timeout_s``: the longest one request may take (connections: at most 5 s);
        None: the AWS SDK's defaults."""
        if not self.offline_is_s3:
            return None
        from pyarrow import fs

        # Without a delayed open, pyarrow checks each object before writing it: 4x the
        # endpoint's CPU per small Parquet file and 3x the wall time on the local S3
        # endpoint. A bad bucket or credentials then fail at write or close, where the
        # callers handle errors anyway.
        kwargs: dict[str, Any] = {"allow_delayed_open": True}
        if timeout_s is not None:
            # one try per call: the caller retries with its own back-off, and says so
            # (the SDK's three silent tries made a frozen endpoint a 30 s hang per call)
            kwargs["request_timeout"] = timeout_s
            kwargs["connect_timeout"] = min(5.0, timeout_s)
            kwargs["retry_strategy"] = fs.AwsStandardS3RetryStrategy(max_attempts=1)
        if self.s3_key is not None and self.s3_secret is not None:
            kwargs["access_key"] = self.s3_key.get_secret_value()
            kwargs["secret_key"] = self.s3_secret.get_secret_value()
        if self.s3_endpoint:
            parts = urlsplit(self.s3_endpoint)
            kwargs["endpoint_override"] = parts.netloc or parts.path
            kwargs["scheme"] = parts.scheme or "https"
            # A custom endpoint has no region to discover; pyarrow would otherwise ask AWS.
            kwargs["region"] = "us-east-1"
        if self.s3_region:
            kwargs["region"] = self.s3_region
        return fs.S3FileSystem(**kwargs)

    def offline_path(self) -> str:
        """``offline_uri`` without its scheme, as pyarrow/s3fs paths expect (``bucket/prefix``)."""
        uri = self.offline_uri
        for scheme in ("s3://", "s3a://", "file://"):
            if uri.startswith(scheme):
                return uri[len(scheme) :].rstrip("/")
        return uri.rstrip("/")


class WorkerSettings(CommonSettings):
    """The stream worker (``headrace worker``).

    Attributes:
        group_id: Kafka consumer group / Faust app id.
        flush_interval_ms: Longest gap between two online-store flushes while applied
            state waits, in milliseconds; also the input pause after which offline parts
            are written at once, and the longest a backlog being caught up on is
            gathered into one batch.
        flush_min_interval_ms: Shortest gap between two online-store flushes in
            milliseconds (between the two bounds, flushes are spaced by their own cost,
            see ``streams.pacing.FlushPacer``).
        take_window_ms: Longest the worker waits to gather a batch of messages, in
            milliseconds (a full batch is taken at once).
        offline_flush_interval_ms: Offline (Parquet) flush interval per partition in
            milliseconds (partitions are staggered across it).
        offline_part_rows: A partition's buffered events are written as an offline part
            as soon as they reach this many rows, before its interval is up (catching up
            on a backlog: parts keep pace with the input, and little is left to write
            when it ends).
        max_future_ms: Events whose ``ts`` is more than this far ahead of the worker's wall
            clock are dead-lettered.
        fetch_max_wait_ms: Longest a fetch may wait for data (freshness vs. broker load).
        data_dir: Local directory for Faust's own data folder (one per ``worker_id``); the
            worker keeps no tables there, its state is in Redis.
        worker_id: Identifier of this worker replica.
        state_cache_mb: Budget of the worker's view-state cache in MiB (estimated
            memory of the decoded states): beyond it, states whose changes are durable
            in Redis are evicted, least recently used first, and reloaded on their next
            event. The default suits a 2 GB worker: the process itself, Kafka buffers
            and batches take ~500 MB more (``headrace bench memory``: 946-969 MB peak over
            2.2M users), and a larger cache bought no throughput there, as most misses
            are first touches; 0: unbounded (memory then grows
            with every entity the worker has seen since its assignment).
        redis_timeout_ms: Longest one Redis call of the worker may take (connect, read,
            write) before it counts as failed and is retried: a frozen Redis shows up
            as an outage within this long, not after the client's 30 s default.
        s3_timeout_ms: Longest one S3 request of the worker may take (connections:
            at most 5 s) before it is retried.
        retry_max_s: Longest sleep between two retries of a store call (the back-off
            starts at 50 ms and doubles up to this, with jitter). Transient outages of
            Redis, S3 and Kafka are waited out however long they last.
    """

    group_id: str = "headrace-worker"
    flush_interval_ms: int = Field(default=100, ge=1)
    flush_min_interval_ms: int = Field(default=10, ge=1)
    take_window_ms: int = Field(default=10, ge=1)
    offline_flush_interval_ms: int = Field(default=5000, ge=1)
    offline_part_rows: int = Field(default=20_000, ge=1)
    max_future_ms: int = Field(default=3_600_000, ge=0)
    fetch_max_wait_ms: int = Field(default=50, ge=1)
    data_dir: str = "./.headrace-worker"
    worker_id: str = "0"
    state_cache_mb: int = Field(default=256, ge=0)
    redis_timeout_ms: int = Field(default=5000, ge=100)
    s3_timeout_ms: int = Field(default=30_000, ge=100)
    retry_max_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)


class ServeSettings(CommonSettings):
    """The gRPC scoring server (``headrace serve``).

    Attributes:
        host: Bind address of the gRPC port; the default answers local clients only,
            ``0.0.0.0`` exposes it (``headrace serve --host`` wins over it).
        port: gRPC port.
        redis_budget_ms: Time budget of one online read in milliseconds.
        breaker_failures: Consecutive Redis failures that open the circuit breaker.
        breaker_reset_s: Seconds before an open breaker lets one probe through.
        priors_refresh_s: Seconds between refreshes of the fallback priors.
        max_ids: Most entity ids accepted in one GetOnlineFeatures request (Score takes
            up to 200 candidates, a fixed limit).
        max_bid_cpm: Highest ``bid_cpm`` accepted in a Score candidate (CPM); a larger,
            negative or non-finite bid is INVALID_ARGUMENT.
        models_dir: Directory of trained models.
        split_enabled: Apply the traffic split in Redis (progressive rollout); false:
            always 100 % champion, no polling.
        server_id: This server's name in the rollout acknowledgements
            (``{prefix}:rollout:ack:{server_id}``); empty: ``{hostname}-{pid}``.
        split_poll_ms: Milliseconds between two reads of the traffic split in Redis
            (a change reaches the server within this plus one read).
        split_timeout_ms: Longest one split read may take before the server serves
            100 % champion, in milliseconds.
        shadow_queue: Most shadow predictions waiting to be scored; more are dropped
            (counted), never waited for.
        prediction_log: Send every Score answer to the ``headrace-predictions`` topic.
            Unset: on when ``HEADRACE_KAFKA_BOOTSTRAP`` is set, off otherwise (a server
            without Kafka answers as before).
        prediction_log_buffer: Most prediction records waiting in memory to be encoded
            and handed to the Kafka client; more are dropped (counted).
        prediction_log_queue_kb: Most KiB of encoded records the Kafka client queues
            while the broker is slow or away; beyond it records are dropped (counted).
        prediction_log_timeout_ms: How long the Kafka client keeps retrying one record
            before it counts as failed, in milliseconds (>= 200: more than the
            client's 100 ms batching delay).
        challenger_faults: A simulation and chaos aid, off (empty) by default: faults
            injected into the rollout challenger's predictions (``serving/faults.py``),
            e.g. ``error_rate=0.01,latency_ms=20,seed=1``. Used by ``headrace simulate
            rollout``; never set it in production.
        grpc_tls_cert: PEM certificate (chain) file of the server; with
            ``grpc_tls_key``, ``headrace serve`` listens with TLS. Unset: plaintext.
        grpc_tls_key: PEM private key file of ``grpc_tls_cert``.
        grpc_tls_client_ca: PEM CA file; set, every client must present a certificate
            signed by it (mutual TLS). Needs ``grpc_tls_cert``.
        grpc_tokens: Comma-separated bearer tokens the server accepts (a secret); set,
            every RPC but the health service needs ``authorization: Bearer <token>``.
            Rotate by listing the old and the new token, then dropping the old.
        grpc_tls_ca: Client side (``headrace get/score --server``): PEM CA file that
            signed the server's certificate; set, the client connects with TLS.
        grpc_token: Client side: the bearer token sent with every call (a secret).
        grpc_tls_client_cert: Client side: PEM certificate presented to a server that
            requires mutual TLS (needs ``grpc_tls_client_key`` and ``grpc_tls_ca``).
        grpc_tls_client_key: Client side: the PEM key of ``grpc_tls_client_cert``.
        explore: Exploration of ``Score`` (``serving/exploration.py``): ``off`` (the
            default: greedy, every answer logs propensity 1.0), ``eps-greedy`` or
            ``thompson``. Only requests with a new candidate ad or a new user explore.
        explore_epsilon: ε-greedy: probability, in (0, 1], that an eligible request's
            first slot goes to a candidate drawn uniformly among all of them.
        explore_budget: Most share, in (0, 1), of all answers that may be explored,
            over a sliding 60 s window summed over every server through Redis (0.02:
            at most 2 %).
        explore_seed: Seed of the exploration draws (each request's draws derive from
            it and the prediction id: reproducible); unset, a random one per process.
        explore_new_ad_impressions: An ad with fewer impressions than this (its
            ``ad__impressions_24h``) is new (>= 1).
        explore_draws: Thompson: Monte Carlo draws estimating the propensity (16..8192).
        explore_prior_strength: Thompson: pseudo-impressions of a new ad's Beta prior
            around the ads' prior CTR (> 0).
        explore_user_strength: Thompson: pseudo-impressions behind each candidate's pCTR
            for a new user (a cold-start tier), when no candidate ad is new (> 0).
    """

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    redis_budget_ms: float = Field(default=10.0, gt=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=2.0, gt=0)
    priors_refresh_s: float = Field(default=60, gt=0)
    max_ids: int = Field(default=1000, ge=1)
    max_bid_cpm: float = Field(default=10_000.0, gt=0, allow_inf_nan=False)
    models_dir: str = "./models"
    split_enabled: bool = True
    server_id: str = ""
    split_poll_ms: int = Field(default=250, ge=10, le=500)
    split_timeout_ms: int = Field(default=500, ge=10, le=5000)
    shadow_queue: int = Field(default=256, ge=1)
    prediction_log: bool | None = None
    prediction_log_buffer: int = Field(default=10_000, ge=1)
    prediction_log_queue_kb: int = Field(default=32_768, ge=1)
    prediction_log_timeout_ms: int = Field(default=30_000, ge=200)
    challenger_faults: str = ""
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None
    grpc_tokens: SecretStr | None = None
    grpc_tls_ca: str | None = None
    grpc_token: SecretStr | None = None
    grpc_tls_client_cert: str | None = None
    grpc_tls_client_key: str | None = None
    explore: Literal["off", "eps-greedy", "thompson"] = "off"
    explore_epsilon: float = Field(default=0.05, gt=0, le=1, allow_inf_nan=False)
    explore_budget: float = Field(default=0.02, gt=0, lt=1, allow_inf_nan=False)
    explore_seed: int | None = None
    explore_new_ad_impressions: int = Field(default=1000, ge=1)
    explore_draws: int = Field(default=256, ge=16, le=8192)
    explore_prior_strength: float = Field(default=100.0, gt=0, allow_inf_nan=False)
    explore_user_strength: float = Field(default=50.0, gt=0, allow_inf_nan=False)

    @field_validator("prediction_log", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca",
                     "grpc_tokens", "grpc_tls_ca", "grpc_token", "grpc_tls_client_cert",
                     "grpc_tls_client_key", "explore_seed", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # HEADRACE_PREDICTION_LOG="" (compose files) means "not set": the default rule;
        # likewise an empty TLS path or token list (plaintext, no token check)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return None if value == "" else value

    def grpc_token_list(self) -> tuple[str, ...]:
        """The accepted bearer tokens (``grpc_tokens`` split at commas, blanks dropped).

        Checked here rather than by a pydantic validator: a validation error would print
        the offending input, i.e. the secret.

        Returns:
            The tokens; empty: no token check.

        Raises:
            InputError: a token that cannot travel in a header (named by its position,
                never by its value), or a list without any token.
        """
        if self.grpc_tokens is None:
            return ()
        return _split_tokens(self.grpc_tokens.get_secret_value())


def _token_ok(token: str) -> bool:
    """Whether ``token`` can travel in an ``authorization`` header: visible ASCII, no
    comma (the list separator), non-empty."""
    return bool(token) and all("!" <= c <= "~" and c != "," for c in token)


def _split_tokens(text: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``.

    Raises:
        InputError: a token with a character outside visible ASCII (named by its
            position, never by its value), or no token at all.
    """
    from headrace.core.errors import InputError

    tokens = tuple(t.strip() for t in text.split(",") if t.strip())
    for i, token in enumerate(tokens):
        if not _token_ok(token):
            raise InputError(f"HEADRACE_GRPC_TOKENS: token {i + 1} of the list must be "
                             "printable ASCII without spaces (not shown: it is a secret)")
    if not tokens:
        raise InputError("HEADRACE_GRPC_TOKENS holds no token (leave it unset for no "
                         "token check)")
    return tokens


class OfflineSettings(CommonSettings):
    """Offline jobs (training sets, training).

    Attributes:
        workers: Parallel worker processes/threads.
        progress: Show progress on stderr.
    """

    workers: int = Field(default=2, ge=1)
    progress: bool = True


class ProducerSettings(CommonSettings):
    """The event producer (``headrace produce``).

    Attributes:
        batch_events: Events per produced batch.
        encoding: Wire encoding of events.
    """

    batch_events: int = Field(default=500, ge=1)
    encoding: Literal["arrow", "avro", "json"] = "arrow"


#: Every settings class, for tools that check env variable names (compose tests).
SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (
    CommonSettings,
    WorkerSettings,
    ServeSettings,
    OfflineSettings,
    ProducerSettings,
)
