"""The gRPC feature server: FeatureService, ScoringService (:mod:`serving.scoring`), health,
reflection, error translation, metrics (one registry per server, :mod:`serving.metrics`).

A synchronous ``grpc.server`` with a thread pool: the request path is short CPU work
around one blocking Redis round trip, which releases the GIL, so threads overlap the
I/O of concurrent requests without an event loop's per-call overhead (measured: the
sync and ``grpc.aio`` echo round trips are equal within noise here).

:class:`ErrorInterceptor` is the one translation point from our errors to gRPC
status codes; it also decodes every unary request itself (gRPC's own decoding failure is
an INTERNAL "Exception deserializing request!", ours is INVALID_ARGUMENT naming the
request) and times every unary method for the request latency histogram. With
``HEADRACE_GRPC_TOKENS`` set, :class:`~serving.auth.TokenInterceptor` runs before it
(refused calls are neither decoded nor timed); with ``HEADRACE_GRPC_TLS_CERT``/``_KEY``
the port listens with TLS (:func:`~serving.auth.server_credentials`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from feature_defs.layout import TOPIC_PREDICTIONS
from feature_defs.registry import Registry, registry_for
from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import features_pb2_grpc as pb_grpc
from headrace.api.v1 import scoring_pb2 as spb
from headrace.api.v1 import scoring_pb2_grpc as spb_grpc
from headrace.core.errors import BackendError, HeadraceError, InvalidArgument
from headrace.core.online_store import OnlineStore, RedisOnlineStore
from headrace.core.settings import ServeSettings
from serving.auth import TokenInterceptor, server_credentials
from serving.breaker import CircuitBreaker
from serving.exploration import exploration
from serving.faults import parse_faults
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.prediction_log import KafkaPredictionLog
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.rollout_counts import CountsAccumulator
from serving.scoring import SCORING_SERVICE_NAME, ScoringService, model_watcher
from serving.service import OnlineFeatureService
from serving.split import SplitWatcher, default_server_id

__all__ = ["ErrorInterceptor", "FeatureServicer", "ScoringServicer", "FeatureServer",
           "build_server", "split_watcher", "prediction_log", "SERVICE_NAME"]

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name


def status_of(exc: HeadraceError) -> grpc.StatusCode:
    """The gRPC status of one of our errors.

    Args:
        exc: one of our errors.

    Returns:
        Its ``grpc_status`` when it names one, UNAVAILABLE for a backend error,
        else INTERNAL.
    """
    name = getattr(exc, "grpc_status", None)
    if name is not None:
        return grpc.StatusCode[name]
    if isinstance(exc, BackendError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps :class:`HeadraceError` to its gRPC status, decodes and times unary methods.

    Each unary handler is re-registered to take the raw request bytes and decode them
    with the method's own deserializer inside the wrapper: bytes that are not the
    method's request message (corrupt wire format, a string field that is not UTF-8)
    answer INVALID_ARGUMENT ``request: ...`` instead of gRPC's INTERNAL. gRPC hands the
    wrapper the same bytes object it would have decoded, so this adds no copy; the
    decoding time now counts in ``request_seconds``.

    Args:
        metrics: the server's metrics (``request_seconds``, ``errors``; default: a new
            :class:`ServingMetrics` of its own).
    """

    def __init__(self, metrics: ServingMetrics | None = None) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        m = ServingMetrics() if metrics is None else metrics
        self._hist = m.request_seconds
        self._errors = m.errors

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (reflection, health Watch): untouched
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(handler.unary_unary, method.rsplit("/", 1)[-1],
                       handler.request_deserializer),
            request_deserializer=None,  # raw bytes: decoded in the wrapper
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self,
        behavior: Callable[[Any, grpc.ServicerContext], Any],
        name: str,
        decode: Callable[[bytes], Any] | None,
    ) -> Any:
        observe = self._hist.labels(method=name).observe
        errors = self._errors
        clock = time.perf_counter

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start = clock()
            try:
                if decode is not None:  # None: the handler takes raw bytes (benchmarks' echo)
                    try:
                        request = decode(request)
                    except DecodeError as exc:
                        raise _undecodable(exc) from exc
                return behavior(request, context)
            except HeadraceError as exc:
                code = status_of(exc)
                errors.labels(method=name, code=code.name).inc()
                context.abort(code, str(exc))
            finally:
                observe(clock() - start)

        return unary


def _undecodable(exc: DecodeError) -> InvalidArgument:
    """The error of request bytes that are not the method's request message."""
    # upb says which message and why ("...GetOnlineFeaturesRequest': String field had
    # bad UTF-8"); the field itself is not reported
    return InvalidArgument(
        "request", f"cannot be decoded ({exc}): not protobuf wire format of this method's "
                   "request message, or a string field that is not valid UTF-8")


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """gRPC adaptor of :class:`OnlineFeatureService`."""

    def __init__(self, service: OnlineFeatureService) -> None:
        self.service = service

    def GetOnlineFeatures(  # noqa: N802 - gRPC method name
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.GetOnlineFeaturesResponse:
        return self.service.get_online_features(request)


class ScoringServicer(spb_grpc.ScoringServiceServicer):
    """gRPC adaptor of :class:`~serving.scoring.ScoringService`."""

    def __init__(self, service: ScoringService) -> None:
        self.service = service

    def Score(  # noqa: N802 - gRPC method name
        self, request: spb.ScoreRequest, context: grpc.ServicerContext
    ) -> spb.ScoreResponse:
        return self.service.score(request)


class FeatureServer:
    """A started-on-demand feature server; see :func:`build_server`.

    Attributes:
        port: the bound port (useful with port 0).
        service: the request logic.
        priors: the priors cache.
        scoring: the ``ScoringService`` (its champion watcher, split watcher, shadow
            thread and prediction log start and stop here).
        metrics: this server's metrics; ``metrics.serve(port)`` exports its registry.
    """

    def __init__(
        self,
        grpc_server: grpc.Server,
        port: int,
        service: OnlineFeatureService,
        priors: PriorsCache,
        store: OnlineStore,
        scoring: ScoringService | None = None,
        *,
        metrics: ServingMetrics,
    ) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.service = service
        self.priors = priors
        self.store = store
        self.scoring = scoring
        self.metrics = metrics

    def start(self) -> FeatureServer:
        """Load the priors and the champion (if any), then accept requests.

        Returns:
            This server.
        """
        self.priors.start()
        if self.scoring is not None:
            self.scoring.start()  # the champion, the split and its challenger, the log
        self.grpc_server.start()
        log.info("feature server listening on port %d", self.port)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting requests, finish those in flight within ``grace_s`` seconds,
        stop the background refreshes and close the store."""
        self.grpc_server.stop(grace_s).wait()
        self.priors.stop()
        if self.scoring is not None:
            self.scoring.stop()
        self.store.close()

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        self.grpc_server.wait_for_termination()

    def __enter__(self) -> FeatureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def split_watcher(settings: ServeSettings, champion: ModelWatcher[ScoringModel],
                  metrics: ServingMetrics) -> SplitWatcher:
    """The server's split watcher: ``settings.redis_config()``, a read timeout of
    ``split_timeout_ms``, polled every ``split_poll_ms``, acknowledged as
    ``settings.server_id`` (default ``{hostname}-{pid}``); challengers load like the
    champion (``champion.load``). Its ``counts`` (a
    :class:`~serving.rollout_counts.CountsAccumulator`) are flushed at every poll."""
    timeout = settings.split_timeout_ms / 1000.0
    client = settings.redis_config().client(socket_timeout=timeout,
                                            socket_connect_timeout=timeout, retry=None)
    server_id = settings.server_id or default_server_id()
    counts = CountsAccumulator(settings.redis_prefix, server_id,
                               on_failure=metrics.counts_flush_failures.inc)
    return SplitWatcher(client, settings.redis_prefix, server_id, champion.load,
                        poll_s=settings.split_poll_ms / 1000.0, metrics=metrics,
                        counts=counts)


def prediction_log(settings: ServeSettings, metrics: ServingMetrics
                   ) -> KafkaPredictionLog | None:
    """The server's prediction log, or None when it is off.

    ``settings.prediction_log`` decides; unset, it is on exactly when
    ``HEADRACE_KAFKA_BOOTSTRAP`` was given (a server deployed without Kafka answers as
    before instead of counting every record as dropped).
    """
    enabled = settings.prediction_log
    if enabled is None:
        enabled = "kafka_bootstrap" in settings.model_fields_set
    if not enabled:
        return None
    return KafkaPredictionLog(
        settings.confluent_producer(), settings.confluent_admin(),
        settings.topic(TOPIC_PREDICTIONS), partitions=settings.partitions,
        buffer=settings.prediction_log_buffer, queue_kb=settings.prediction_log_queue_kb,
        timeout_ms=settings.prediction_log_timeout_ms, metrics=metrics)


def build_server(
    settings: ServeSettings,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    registry: Registry | None = None,
    store: OnlineStore | None = None,
    clock_ms: Callable[[], int] | None = None,
    max_workers: int = 8,
    memo_entries: int = 8192,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    model_poll_s: float = 2.0,
    metrics: ServingMetrics | None = None,
) -> FeatureServer:
    """Build (not start) the feature server: FeatureService and ScoringService.

    Args:
        settings: serving settings (Redis, budget, breaker, priors refresh, max ids).
        port: overrides ``settings.port``; 0 picks a free port.
        host: bind address (loopback only by default; "0.0.0.0" exposes the server).
        registry: feature definitions (default: those ``settings.definitions`` names,
            i.e. ``HEADRACE_DEFINITIONS``).
        store: online store (default: Redis at ``settings.redis_url``).
        clock_ms: epoch-ms clock of the default as-of time.
        max_workers: request threads.
        memo_entries: roll-up memo size (see :class:`~serving.reader.OnlineReader`;
            0 disables it).
        extra_handlers: more generic handlers (benchmarks register an echo method).
        model_poll_s: seconds between polls of ``settings.models_dir``/CHAMPION (hot
            reload of the scoring model).
        metrics: this server's metrics (default: a new :class:`ServingMetrics` in a
            registry of its own, with the process collectors). Everything the server
            builds counts there and nowhere else.

    Returns:
        The server, not started; ``server.metrics`` holds its metrics. Its Score applies
        the traffic split in Redis (:func:`split_watcher`) and, when enabled, logs its
        predictions (:func:`prediction_log`).

    Raises:
        InputError: the port cannot be bound; a TLS file cannot be read or the TLS
            settings are incomplete; a malformed ``HEADRACE_GRPC_TOKENS``.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from headrace.core.errors import InputError

    registry = registry or registry_for(settings)
    store = store or RedisOnlineStore(settings.redis_config(), timeout_ms=settings.redis_budget_ms)
    m = ServingMetrics(process=True) if metrics is None else metrics
    breaker = CircuitBreaker(
        settings.breaker_failures, settings.breaker_reset_s,
        on_change=lambda s: m.breaker_state.set(int(s)),
    )
    m.breaker_state.set(int(breaker.state))
    priors = PriorsCache(store, settings.redis_prefix, settings.priors_refresh_s, metrics=m)
    kwargs: dict[str, Any] = {"metrics": m}
    if clock_ms is not None:
        kwargs["clock_ms"] = clock_ms
    reader = OnlineReader(store, settings.redis_prefix, memo_entries=memo_entries)
    service = OnlineFeatureService(
        registry,
        reader,
        priors,
        breaker,
        budget_ms=settings.redis_budget_ms,
        max_ids=settings.max_ids,
        **kwargs,
    )
    champion = model_watcher(settings.models_dir, registry, model_poll_s, metrics=m)
    split = split_watcher(settings, champion, m) if settings.split_enabled else None
    explore = exploration(settings, settings.server_id or default_server_id(),
                          on_failure=m.explore_flush_failures.inc)
    scoring = ScoringService(
        registry, reader, priors, breaker, champion,
        budget_ms=settings.redis_budget_ms, max_bid_cpm=settings.max_bid_cpm,
        split=split, predictions=prediction_log(settings, m),
        shadow_queue=settings.shadow_queue, counts=None if split is None else split.counts,
        faults=parse_faults(settings.challenger_faults), explore=explore,
        **kwargs,
    )
    credentials = server_credentials(settings)  # before anything binds: InputError early
    tokens = settings.grpc_token_list()
    interceptors: list[grpc.ServerInterceptor] = []
    if tokens:
        interceptors.append(TokenInterceptor(tokens, m))  # first: refusals go no further
    interceptors.append(ErrorInterceptor(m))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=tuple(interceptors),
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_FeatureServiceServicer_to_server(FeatureServicer(service), server)
    spb_grpc.add_ScoringServiceServicer_to_server(ScoringServicer(scoring), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME, SCORING_SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, SCORING_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    if extra_handlers:
        server.add_generic_rpc_handlers(tuple(extra_handlers))
    want = settings.port if port is None else port
    try:
        bound = (server.add_insecure_port(f"{host}:{want}") if credentials is None
                 else server.add_secure_port(f"{host}:{want}", credentials))
    except RuntimeError as exc:
        raise InputError(f"cannot listen on {host}:{want}: {exc}") from exc
    if bound == 0:
        raise InputError(f"cannot listen on {host}:{want} (in use?)")
    log.info("feature server on %s:%d: %s, %s", host, bound,
             "plaintext" if credentials is None else "TLS" + (
                 " (client certificates required)" if settings.grpc_tls_client_ca else ""),
             f"{len(tokens)} accepted bearer token(s)" if tokens else "no token check")
    return FeatureServer(server, bound, service, priors, store, scoring, metrics=m)
