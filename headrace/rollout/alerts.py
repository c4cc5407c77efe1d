"""What the rollout controller tells people and Prometheus.

* :class:`WebhookAlerter` — POSTs ``{"text": …}`` (Slack's incoming-webhook format, also
  understood by Mattermost, Rocket.Chat and most chat bridges) with a 5 s timeout
  through ``urllib``; a failure is logged as a WARNING and never stops the controller.
* :class:`RolloutMetrics` — the controller's gauges and counters, in a registry of
  their own (served on ``HEADRACE_METRICS_PORT`` by :meth:`RolloutMetrics.serve`):

  ``headrace_rollout_phase``, ``headrace_rollout_challenger_share``,
  ``headrace_rollout_status{status}`` (1 for the current one),
  ``headrace_rollout_phase_elapsed_seconds``, ``headrace_rollout_looks``,
  ``headrace_rollout_p_better``, ``headrace_rollout_p_worse``,
  ``headrace_rollout_expected_lift`` (the posteriors on the phase's counts, recomputed
  every tick for display: the gates judge them only at phase ends),
  ``headrace_rollout_guardrail_value{guardrail}`` (the challenger's error rate, p99 ms,
  CTR, calibration ratio, min and max pCTR in the phase), ``headrace_rollout_split_seq``
  (the last split written), ``headrace_rollout_rollback_seconds`` (−1: unknown),
  ``headrace_rollout_decisions_total{event}`` and
  ``headrace_rollout_rollbacks_total{guardrail}``.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from headrace.core.errors import InputError
from headrace.rollout import stats
from headrace.rollout.controller import RolloutState, Status, phase_share
from headrace.rollout.gates import ArmStats
from headrace.rollout.source import subtract

if TYPE_CHECKING:
    from headrace.rollout.policy import Policy

__all__ = ["WebhookAlerter", "RolloutMetrics"]

log = logging.getLogger(__name__)


class WebhookAlerter:
    """Sends alert texts to a Slack-compatible webhook.

    Args:
        url: the webhook URL; None: nothing is sent.
        timeout_s: the longest one POST may take.
    """

    def __init__(self, url: str | None, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0

    def send(self, text: str) -> bool:
        """POST ``{"text": text}``; True when the hook answered 2xx. Never raises."""
        if not self.url:
            return False
        body = json.dumps({"text": text}).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                ok = 200 <= int(resp.status) < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            ok = False
            log.warning("rollout alert webhook failed (the alert is in this log): %s", exc)
        self.sent += ok
        self.failed += not ok
        return ok


class RolloutMetrics:
    """The controller's Prometheus metrics (module docstring), in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.phase = Gauge("headrace_rollout_phase", "current rollout phase (0: shadow or "
                           "none, 1..5)", registry=r)
        self.share = Gauge("headrace_rollout_challenger_share", "challenger share of "
                           "traffic in the current phase", registry=r)
        self.status = Gauge("headrace_rollout_status", "1 for the rollout's current status",
                            ["status"], registry=r)
        self.elapsed = Gauge("headrace_rollout_phase_elapsed_seconds", "seconds since the "
                             "phase began", registry=r)
        self.looks = Gauge("headrace_rollout_looks", "phase-end looks taken in this phase",
                           registry=r)
        self.p_better = Gauge("headrace_rollout_p_better", "posterior P(challenger CTR "
                              "better) on the phase's counts", registry=r)
        self.p_worse = Gauge("headrace_rollout_p_worse", "posterior P(challenger CTR worse) "
                             "on the phase's counts", registry=r)
        self.lift = Gauge("headrace_rollout_expected_lift", "expected relative CTR lift of "
                          "the challenger on the phase's counts", registry=r)
        self.guardrail = Gauge("headrace_rollout_guardrail_value", "the challenger's "
                               "guardrail inputs in the phase", ["guardrail"], registry=r)
        self.split_seq = Gauge("headrace_rollout_split_seq", "seq of the last split written",
                               registry=r)
        self.rollback_seconds = Gauge("headrace_rollout_rollback_seconds", "breach to every "
                                      "live server serving 100 % champion (-1: unknown)",
                                      registry=r)
        self.decisions = Counter("headrace_rollout_decisions_total", "controller decisions "
                                 "by event", ["event"], registry=r)
        self.rollbacks = Counter("headrace_rollout_rollbacks_total", "rollbacks by the "
                                 "guardrail or gate that caused them", ["guardrail"],
                                 registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` in a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def observe(self, state: RolloutState, champion: ArmStats | None,
                challenger: ArmStats | None, policy: Policy, now_ms: int | None = None
                ) -> None:
        """Set the gauges from the state and, when given, the cumulative counts and the
        clock (epoch ms)."""
        self.phase.set(state.phase)
        if now_ms is not None:
            self.elapsed.set(max(0, now_ms - state.phase_started_ms) / 1000)
        running = state.status is Status.RUNNING
        self.share.set(phase_share(policy, state.phase) if running else 0.0)
        for s in Status:
            self.status.labels(status=s.value).set(1 if s is state.status else 0)
        self.looks.set(state.looks)
        if state.split_seq is not None:
            self.split_seq.set(state.split_seq)
        if state.rollback_seconds is not None:
            self.rollback_seconds.set(state.rollback_seconds)
        if champion is None or challenger is None or not running:
            return
        try:
            a = subtract(champion, state.baseline_champion)
            c = subtract(challenger, state.baseline_challenger)
        except InputError:
            return
        g = self.guardrail
        g.labels(guardrail="error_rate").set(c.error_rate)
        g.labels(guardrail="latency_p99_ms").set(_finite(c.p99_ms()))
        g.labels(guardrail="ctr").set(c.clicks / c.impressions if c.impressions else math.nan)
        g.labels(guardrail="calibration_ratio").set(_finite(c.calibration_ratio))
        g.labels(guardrail="min_pctr").set(_finite(c.min_pctr))
        g.labels(guardrail="max_pctr").set(_finite(c.max_pctr))
        if a.impressions and c.impressions:
            comp = stats.compare(a.clicks, a.impressions, c.clicks, c.impressions,
                                 prior=(policy.prior_alpha, policy.prior_beta))
            self.p_better.set(comp.p_better)
            self.p_worse.set(comp.p_worse)
            self.lift.set(comp.expected_lift)


def _finite(x: float | None) -> float:
    return math.nan if x is None or not math.isfinite(x) else x
