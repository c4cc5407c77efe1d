"""Prometheus metrics of one feature server, in that server's own registry.

:func:`~serving.server.build_server` creates one :class:`ServingMetrics` per server and
passes it to everything that counts (the services, the store fetch, the priors cache,
the breaker's state callback, the champion watcher, the request interceptor); ``headrace
serve --metrics-port`` exports its registry. Two servers in one process (tests,
benchmarks) never share a counter, so a test can assert exact values.

==============================================  =========  ==========================
name                                            type       labels
==============================================  =========  ==========================
headrace_serving_request_seconds                histogram  method
headrace_serving_redis_seconds                  histogram  -
headrace_serving_fallbacks_total                counter    tier, reason
headrace_serving_entities_total                 counter    entity, tier
headrace_serving_corrupt_states_total           counter    view
headrace_serving_breaker_state                  gauge      - (0 closed, 1 half-open, 2 open)
headrace_serving_priors_age_seconds             gauge      - (since the priors' computation)
headrace_serving_priors_refresh_errors_total    counter    -
headrace_scoring_seconds                        histogram  source
headrace_scoring_model_info                     gauge      version (1 for the served one)
headrace_scoring_fallbacks_total                counter    reason, source
headrace_scoring_model_reloads_total            counter    outcome (ok, error)
headrace_scoring_arm_total                      counter    arm (CHAMPION, CHALLENGER)
headrace_scoring_predict_errors_total           counter    arm
headrace_scoring_shadow_total                   counter    outcome (scored, dropped, error)
headrace_scoring_explore_total                  counter    policy, outcome (explored, greedy,
                                                           budget_exhausted, ineligible)
headrace_scoring_explore_share                  gauge      - (explored share of answers, 60 s,
                                                           all servers, as this one knows it)
headrace_scoring_explore_flush_failures_total   counter    - (budget counts kept, resent)
headrace_rollout_split_share                    gauge      - (challenger share served)
headrace_rollout_split_seq                      gauge      - (seq applied; -1: none)
headrace_rollout_split_redis_available          gauge      - (1 up, 0: 100 % champion)
headrace_rollout_split_errors_total             counter    reason
headrace_rollout_counts_flush_failures_total    counter    - (kept, resent next poll)
headrace_prediction_log_total                   counter    outcome
headrace_prediction_log_available               gauge      - (1: Kafka delivers)
headrace_serving_auth_failures_total            counter    reason (missing, malformed, wrong)
headrace_serving_errors_total                   counter    method, code (a non-OK gRPC status)
==============================================  =========  ==========================
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from headrace.core.process_metrics import register_process_collectors

__all__ = ["ServingMetrics"]

_SERVING_BUCKETS = (0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                    0.02, 0.05, 0.1, 0.25, 1.0)
_SCORING_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02,
                    0.05, 0.1, 0.25, 1.0)


class ServingMetrics:
    """The metrics of one server (see the module docstring for names and labels).

    Args:
        registry: where to register them; by default a new, empty
            :class:`~prometheus_client.CollectorRegistry` of their own.
        process: also register the process, platform and GC collectors (what
            ``prometheus_client``'s default registry exports: ``process_*``,
            ``python_info``, ``python_gc_*``). ``build_server`` sets it for the
            exported registry; tests leave it off.

    Raises:
        ValueError: ``registry`` already holds metrics of these names.

    Attributes:
        registry: the registry holding every metric below.
        request_seconds: gRPC request latency by method (seconds).
        redis_seconds: online store round-trip latency (seconds).
        fallbacks: entities answered from the priors because the store could not answer
            (or held a state that cannot be decoded: reason ``CORRUPT_STATE``).
        entities: entities served, by entity and cold-start tier.
        corrupt_states: stored states read that cannot be decoded, by view (each read:
            one per entity and view of a request).
        breaker_state: the circuit breaker's state (:class:`~serving.breaker.BreakerState`).
        priors_age: age of the in-process priors, since their computation (seconds).
        priors_errors: failed refreshes of the in-process priors.
        score_seconds: ``Score`` latency in the server, validation to response (seconds).
        model_info: 1 for the model version being served.
        score_fallbacks: ``Score`` requests answered without (some of their) online
            features, by reason and source.
        model_reloads: champion loads by outcome.
        score_arms: ``Score`` answers by split arm.
        predict_errors: model predictions that raised, by arm (a challenger's is
            answered by the champion).
        shadow: shadow predictions by outcome (``dropped``: the shadow queue was full).
        explore: ``Score`` answers of an exploring deployment by policy label and
            outcome (:mod:`serving.exploration`).
        explore_share: the explored share of answers over the budget's window, summed
            over every server (as of this server's last flush, plus its own since).
        explore_flush_failures: flushes of the exploration budget's counts that Redis
            did not confirm (kept and resent).
        split_share: the challenger share this server serves (0: 100 % champion).
        split_seq: the ``seq`` of the split applied (-1: none in Redis).
        split_redis_available: 1 while the split is readable, 0 during an outage.
        split_errors: split polls that fell back to 100 % champion, by reason
            (``redis``, ``invalid``, ``challenger_load``).
        counts_flush_failures: flushes of the per-arm serving counts that Redis did not
            confirm (the batch is kept and resent at the next poll).
        prediction_log: prediction records by outcome (``sent``, ``dropped_buffer``,
            ``dropped_queue``, ``failed``: delivery failed).
        prediction_log_available: 1 while Kafka accepts the prediction log, 0 during an
            outage.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False
                 ) -> None:
        r = CollectorRegistry() if registry is None else registry
        self.registry = r
        if process:
            register_process_collectors(r)
        self.request_seconds = Histogram(
            "headrace_serving_request_seconds", "gRPC request latency by method",
            ["method"], buckets=_SERVING_BUCKETS, registry=r)
        self.redis_seconds = Histogram(
            "headrace_serving_redis_seconds", "online store round trip latency",
            buckets=_SERVING_BUCKETS, registry=r)
        self.fallbacks = Counter(
            "headrace_serving_fallbacks_total",
            "entities answered from priors because the online store could not answer "
            "(or held an unreadable state: reason CORRUPT_STATE)",
            ["tier", "reason"], registry=r)
        self.entities = Counter(
            "headrace_serving_entities_total", "entities served by cold-start tier",
            ["entity", "tier"], registry=r)
        self.corrupt_states = Counter(
            "headrace_serving_corrupt_states_total",
            "stored view states that cannot be decoded, answered as FALLBACK with reason "
            "CORRUPT_STATE", ["view"], registry=r)
        self.breaker_state = Gauge(
            "headrace_serving_breaker_state",
            "online store circuit breaker: 0 closed, 1 half-open, 2 open", registry=r)
        self.priors_age = Gauge(
            "headrace_serving_priors_age_seconds",
            "age of the in-process priors (since their computation)", registry=r)
        self.auth_failures = Counter(
            "headrace_serving_auth_failures_total",
            "calls refused UNAUTHENTICATED by the bearer-token check, by reason (missing, "
            "malformed, wrong); never labelled by token", ["reason"], registry=r)
        self.errors = Counter(
            "headrace_serving_errors_total",
            "calls answered with a non-OK gRPC status by the service (bad requests, "
            "unavailable stores...), by method and status code", ["method", "code"],
            registry=r)
        self.priors_errors = Counter(
            "headrace_serving_priors_refresh_errors_total",
            "failed refreshes of the in-process priors", registry=r)
        self.score_seconds = Histogram(
            "headrace_scoring_seconds", "Score latency in the server (validation to response)",
            ["source"], buckets=_SCORING_BUCKETS, registry=r)
        self.model_info = Gauge(
            "headrace_scoring_model_info", "1 for the model version being served",
            ["version"], registry=r)
        self.score_fallbacks = Counter(
            "headrace_scoring_fallbacks_total",
            "Score requests answered without online features", ["reason", "source"],
            registry=r)
        self.model_reloads = Counter(
            "headrace_scoring_model_reloads_total", "champion loads by outcome (ok, error)",
            ["outcome"], registry=r)

        self.score_arms = Counter(
            "headrace_scoring_arm_total", "Score answers by split arm", ["arm"], registry=r)
        self.predict_errors = Counter(
            "headrace_scoring_predict_errors_total",
            "model predictions that raised, by arm (the champion answers a challenger's)",
            ["arm"], registry=r)
        self.shadow = Counter(
            "headrace_scoring_shadow_total", "shadow predictions by outcome (scored, dropped, "
            "error)", ["outcome"], registry=r)
        self.explore = Counter(
            "headrace_scoring_explore_total", "Score answers of an exploring deployment by "
            "policy and outcome (explored, greedy, budget_exhausted, ineligible)",
            ["policy", "outcome"], registry=r)
        self.explore_share = Gauge(
            "headrace_scoring_explore_share", "explored share of Score answers over the "
            "budget's window, all servers", registry=r)
        self.explore_flush_failures = Counter(
            "headrace_scoring_explore_flush_failures_total",
            "flushes of the exploration budget Redis did not confirm (kept and resent)",
            registry=r)
        self.split_share = Gauge(
            "headrace_rollout_split_share", "challenger share of traffic served", registry=r)
        self.split_seq = Gauge(
            "headrace_rollout_split_seq", "seq of the split applied (-1: none)", registry=r)
        self.split_redis_available = Gauge(
            "headrace_rollout_split_redis_available",
            "1 while the split is readable; 0: Redis unavailable, 100 % champion", registry=r)
        self.split_errors = Counter(
            "headrace_rollout_split_errors_total",
            "split polls answered with 100 % champion, by reason", ["reason"], registry=r)
        self.counts_flush_failures = Counter(
            "headrace_rollout_counts_flush_failures_total",
            "flushes of the rollout's per-arm serving counts Redis did not confirm (kept "
            "and resent)", registry=r)
        self.prediction_log = Counter(
            "headrace_prediction_log_total", "prediction records by outcome (sent, "
            "dropped_buffer, dropped_queue, failed)", ["outcome"], registry=r)
        self.prediction_log_available = Gauge(
            "headrace_prediction_log_available", "1 while Kafka accepts the prediction log",
            registry=r)
        self.split_seq.set(-1)
        self.split_redis_available.set(1)
        self.prediction_log_available.set(1)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0.0 when it was never set or incremented).

        Args:
            name: the sample name as exported, e.g. ``headrace_serving_fallbacks_total``
                or ``headrace_serving_redis_seconds_count``.
            **labels: the sample's labels.

        Returns:
            The sample's value in this registry.
        """
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Export this registry on ``http://addr:port/metrics`` from a daemon thread.

        Args:
            port: TCP port (0 picks a free one, which this method does not report).
            addr: bind address.

        Raises:
            OSError: the port cannot be bound.
        """
        start_http_server(port, addr=addr, registry=self.registry)
