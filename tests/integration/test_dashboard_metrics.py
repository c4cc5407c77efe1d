"""Every metric the operators' Grafana dashboard queries is exported by something real.

The dashboard's PromQL (panel targets and query variables) is tokenized by
:func:`tests.unit.test_dashboard.metric_names`. The names are checked against:

* a running ``headrace worker`` subprocess (real broker and redis-server of the session
  stack) that consumed a few events, one of them malformed, and a running
  ``headrace serve`` subprocess that answered one ``GetOnlineFeatures``: both scraped
  over HTTP on their metrics ports;
* the rollout controller's :class:`~headrace.rollout.alerts.RolloutMetrics`, the drift
  monitor's ``MonitorMetrics`` and the retraining pipeline's metrics, instantiated in
  process and read through ``registry.collect()``.

Series names are compared exactly: a counter ``x`` exports ``x_total``, a histogram ``x``
exports ``x_bucket``/``x_sum``/``x_count`` (:func:`tests.unit.test_dashboard.series_names`),
taken from the families' ``# TYPE`` lines as well as from their samples, so a labelled
family that has seen no traffic yet still counts. A name nothing exports fails with the
panel title and the expression.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from headrace.core.settings import ProducerSettings
from tests import streamkit as sk
from tests.unit.test_dashboard import dashboard_queries, load_dashboard, metric_names, series_names

pytestmark = pytest.mark.integration

__all__: list[str] = []

#: names Prometheus itself writes for every scrape target (not exported by anyone)
PROMETHEUS_BUILTIN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped",
                                "scrape_samples_post_metric_relabeling",
                                "scrape_series_added"})
#: name prefixes of the metrics owned by components checked in process, so a module that
#: does not exist yet skips only its own names
OWNERS: dict[str, tuple[str, ...]] = {
    "monitor": ("headrace_drift_", "headrace_model_", "headrace_monitor_"),
    "pipeline": ("headrace_pipeline_",),
}
T0 = 1_700_000_000_000
N_VALID = 6  # valid impressions produced for the worker
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _parse(text: str) -> tuple[set[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """(series names, sample values by (name, sorted labels)) of one exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    names = set().union(*(series_names(f) for f in families)) if families else set()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families for s in f.samples}
    return names, samples


def _poll(what: str, check: Callable[[], bool], log: Callable[[], str],
          timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass  # not listening yet
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s:.0f}s; log tail:\n{log()}")


def _events() -> list[dict[str, Any]]:
    valid = [{"type": "impression", "event_id": f"imp{i}", "ts": T0 + 1000 * i,
              "user_id": f"u{i % 3}", "ad_id": "a1", "campaign_id": "c1",
              "publisher_id": "p1", "placement": "feed", "creative_type": "banner",
              "device_type": "mobile", "country": "US", "bid_cpm": 1.5}
             for i in range(N_VALID)]
    broken = dict(valid[0], event_id="broken")
    del broken["ad_id"]  # dead-lettered: missing_field: ad_id
    return [*valid, broken]


@dataclass
class Exported:
    """Series names per source (``worker``, ``serve``, ``rollout``) and the raw samples."""

    names: dict[str, set[str]]
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


@pytest.fixture(scope="module")
def exported(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """A worker that consumed a few events and a server that answered one request, both
    scraped; plus the rollout controller's registry."""
    from headrace.rollout.alerts import RolloutMetrics
    from serving.client import FeatureClient
    from streams.producer import EventProducer

    tmp = tmp_path_factory.mktemp("dashboard")
    ns = sk.namespace_for(stack)
    producer = EventProducer(ns.settings(ProducerSettings, partitions=sk.PARTITIONS),
                             encoding="json")
    producer.send_events(_events())
    producer.flush(30)

    worker_port, serve_port = _free_port(), _free_port()
    worker = sk.Worker(sk.worker_env(ns, tmp, HEADRACE_METRICS_PORT=str(worker_port)),
                       tmp / "worker.log")
    serve_log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [sys.executable, "-m", "headrace.cli", "serve", "--port", "0", "--host", "127.0.0.1",
         "--metrics-port", str(serve_port)],
        stdout=subprocess.PIPE, stderr=serve_log, text=True,
        env=ns.subprocess_env(HEADRACE_REDIS_BUDGET_MS="2000", HEADRACE_LOG_LEVEL="WARNING"))
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert line, f"headrace serve exited {serve.poll()}: {(tmp / 'serve.log').read_text()}"
        grpc_port = json.loads(line)["port"]
        with FeatureClient(f"127.0.0.1:{grpc_port}", timeout_s=5.0) as client:
            client.wait_ready()
            client.get("user", ["u0"], as_of_ms=T0 + 60_000)

        def worker_done() -> bool:
            _, samples = _parse(_scrape(worker_port))
            return sum(v for (n, _), v in samples.items()
                       if n == "headrace_events_in_total") >= N_VALID and any(
                n == "headrace_events_dead_lettered_total" for n, _ in samples)

        _poll("the worker did not count the produced events", worker_done, worker.log_tail)
        texts = {"worker": _scrape(worker_port), "serve": _scrape(serve_port)}
    finally:
        worker.kill()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        serve_log.close()
    parsed = {src: _parse(text) for src, text in texts.items()}
    names = {src: p[0] for src, p in parsed.items()}
    names["rollout"] = set().union(*(series_names(f) for f in RolloutMetrics().registry.collect()))
    yield Exported(names, {src: p[1] for src, p in parsed.items()})


def _owner(name: str) -> str | None:
    return next((o for o, prefixes in OWNERS.items() if name.startswith(prefixes)), None)


def _used(owner: str | None) -> list[tuple[str, str, str]]:
    """(panel, expr, name) for every dashboard name of ``owner`` (None: the others)."""
    return [(where, expr, name) for where, expr in dashboard_queries(load_dashboard())
            for name in sorted(metric_names(expr)) if _owner(name) == owner]


def _missing(used: list[tuple[str, str, str]], known: set[str]) -> list[str]:
    return [f"{where!r}: {name} in {expr!r}" for where, expr, name in used if name not in known]


def _registry_names(module: Any, cls_name: str) -> set[str]:
    metrics = getattr(module, cls_name)()
    return set().union(*(series_names(f) for f in metrics.registry.collect()))


def test_the_stack_saw_the_traffic(exported: Exported) -> None:
    """The scrapes come from processes that did real work (hand-counted): 6 valid
    impressions in, 1 dead letter, 1 timed GetOnlineFeatures."""
    w, s = exported.samples["worker"], exported.samples["serve"]
    assert sum(v for (n, _), v in w.items() if n == "headrace_events_in_total") == N_VALID
    dead = {labels: v for (n, labels), v in w.items()
            if n == "headrace_events_dead_lettered_total"}
    assert sum(dead.values()) == 1
    ((labels, _),) = dead.items()
    assert dict(labels)["reason"].startswith("missing_field")
    assert s[("headrace_serving_request_seconds_count", (("method", "GetOnlineFeatures"),))] == 1
    # names are the stored series' names: no bare histogram or counter family names
    names = exported.names
    assert {"headrace_freshness_seconds_bucket", "headrace_events_late_total",
            "headrace_store_retries_total", "headrace_consumer_lag"} <= names["worker"]
    assert not {"headrace_freshness_seconds", "headrace_events_late"} & names["worker"]
    assert "headrace_rollout_decisions_total" in names["rollout"]
    assert "headrace_rollout_decisions" not in names["rollout"]


def test_worker_server_and_rollout_export_every_other_dashboard_metric(
        exported: Exported) -> None:
    used = _used(None)
    assert len({name for _, _, name in used}) >= 40
    known = set().union(*exported.names.values()) | PROMETHEUS_BUILTIN
    missing = _missing(used, known)
    assert not missing, "dashboard queries metrics nothing exports:\n" + "\n".join(missing)


def test_monitor_exports_its_dashboard_metrics() -> None:
    module = pytest.importorskip("headrace.monitor.metrics",
                                 reason="the drift monitor (headrace/monitor/metrics.py) "
                                        "does not exist yet")
    used = _used("monitor")
    assert used
    missing = _missing(used, _registry_names(module, "MonitorMetrics"))
    assert not missing, "dashboard queries monitor metrics MonitorMetrics lacks:\n" + \
        "\n".join(missing)


def test_pipeline_exports_its_dashboard_metrics() -> None:
    module = pytest.importorskip("headrace.pipeline.metrics",
                                 reason="the retraining pipeline (headrace/pipeline/"
                                        "metrics.py) does not exist yet")
    used = _used("pipeline")
    assert used
    missing = _missing(used, _registry_names(module, "PipelineMetrics"))
    assert not missing, "dashboard queries pipeline metrics PipelineMetrics lacks:\n" + \
        "\n".join(missing)


def test_owned_prefixes_are_not_exported_by_the_others(exported: Exported) -> None:
    """The prefix split above is sound: nothing of the worker, server or controller
    carries a monitor or pipeline prefix (else a skip could hide one of their names)."""
    stray = {n for names in exported.names.values() for n in names if _owner(n)}
    assert not stray


#: scrape job (deploy/prometheus.yml) -> the process of this test exporting it
JOB_PROCESS = {"headrace-worker": "worker", "headrace-serve": "serve"}
_JOB_SELECTOR = re.compile(r'([A-Za-z_:][A-Za-z0-9_:]*)\{[^}]*\bjob\s*=\s*"([^"]+)"')


def test_names_selected_by_job_are_exported_by_that_job(exported: Exported) -> None:
    """A name queried with ``{job="headrace-worker"}`` (say, the worker's RSS and CPU)
    comes from the worker's own scrape, not merely from some process: the server
    exporting ``process_*`` would not draw the worker's memory."""
    selected = [(where, name, job) for where, expr in dashboard_queries(load_dashboard())
                for name, job in _JOB_SELECTOR.findall(expr) if job in JOB_PROCESS]
    assert {job for _, _, job in selected} >= {"headrace-worker"}
    missing = [f"{where!r}: {name} (job {job})" for where, name, job in selected
               if name not in exported.names[JOB_PROCESS[job]]]
    assert not missing, "not exported by the job the query selects:\n" + "\n".join(missing)
