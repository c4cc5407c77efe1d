""":func:`run_worker` is the entry point of ``headrace worker``: it tunes the process
(:func:`~streams.memory.limit_malloc_arenas`, :func:`~streams.memory.use_system_arrow_pool`,
:func:`relax_gc`, :func:`warm_up`), serves
metrics, builds the engine on the real Redis, offline store and Kafka side outputs
(:func:`build_engine`), creates the topics it reads and writes (:func:`ensure_topics`),
then runs a :class:`~streams.worker.Worker` (the Faust app and its run loop) and writes
the run statistics.
"""

from __future__ import annotations

import gc
import logging

from feature_defs.registry import Registry
from headrace.core.online_store import RedisOnlineStore, RetryingOnlineStore
from headrace.core.retry import Backoff
from headrace.core.settings import WorkerSettings
from streams.engine import Engine
from streams.faust_adapter import require_faust
from streams.memory import limit_malloc_arenas, use_system_arrow_pool
from streams.metrics import StreamMetrics
from streams.offline_writer import OfflineWriter, resolve_filesystem
from streams.outages import Outages
from streams.sides import KafkaSideOutputs
from streams.worker import Worker

__all__ = ["build_engine", "ensure_topics", "run_worker", "relax_gc", "warm_up",
           "GC_GEN0_THRESHOLD", "GC_GEN1_THRESHOLD"]

log = logging.getLogger(__name__)


def build_engine(
    settings: WorkerSettings, registry: Registry, metrics: StreamMetrics | None = None
) -> Engine:
    """Wire the engine to the real Redis, offline store and Kafka side outputs, every
    call of which waits out transient outages (:mod:`streams.outages`)."""
    metrics = metrics or StreamMetrics()
    outages = Outages.for_metrics(metrics)
    backoff = Backoff(max_s=settings.retry_max_s)
    fs, root = resolve_filesystem(settings.offline_uri,
                                  settings.pyarrow_s3(settings.s3_timeout_ms / 1000))
    producer_conf = {**settings.confluent_producer(), "enable.idempotence": True}
    store = RetryingOnlineStore(
        RedisOnlineStore(settings.redis_config(), timeout_ms=settings.redis_timeout_ms),
        outages.redis, backoff)
    return Engine(
        registry=registry,
        store=store,
        background_writes=True,
        writer=OfflineWriter(fs, root, outage=outages.s3, backoff=backoff),
        sides=KafkaSideOutputs(producer_conf, settings.topic, settings.partitions,
                               outage=outages.kafka),
        topic=settings.topic,
        redis_prefix=settings.redis_prefix,
        group=settings.group_id,
        max_future_ms=settings.max_future_ms,
        metrics=metrics,
        state_cache_bytes=(settings.state_cache_mb << 20) or None,
        outages=outages,
    )


def ensure_topics(settings: WorkerSettings, topics: list[str]) -> None:
    """Create missing topics with their final partition count (the embedded broker
    cannot add partitions later: defect D4, see the README's paragraph on the embedded
    broker's known defects and ``tests/integration/test_broker_contract.py``)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from headrace.core.errors import BrokerError

    admin = AdminClient(settings.confluent_admin())
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    # one topic per request: the embedded broker mis-encodes multi-topic CreateTopics replies
    for topic in missing:
        fut = admin.create_topics([NewTopic(topic, settings.partitions, 1)])[topic]
        try:
            fut.result(15)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {topic}: {exc}") from exc


#: young-generation threshold of the cyclic GC in a worker process (CPython's default
#: is 700). The engine keeps millions of small long-lived containers (tile cells, fences)
#: and allocates more per batch, so with the default the collector keeps promoting and
#: re-scanning them: a third of the engine's CPU time at 20k users. Raising it keeps
#: collections (and the full-collection heuristics behind them) but makes them rarer.
GC_GEN0_THRESHOLD = 50_000
#: young collections between two collections of the middle generation. Each of those
#: scans everything promoted since the previous one: with 20 (up to 20 x 50k objects) it
#: stalled the loop ~100 ms here, a freshness outlier; with 2 the same work comes in
#: ~10 ms slices (objects still reach the old generation after one middle collection)
GC_GEN1_THRESHOLD = 2


def relax_gc() -> None:
    """Raise the GC's young-generation threshold to :data:`GC_GEN0_THRESHOLD` (never
    lowers a higher setting) with :data:`GC_GEN1_THRESHOLD` for the middle generation;
    process-wide, like any ``gc.set_threshold``."""
    gen0, _gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, gen2)


def warm_up() -> None:
    """Pay one-time lazy imports before the first batch, not inside it: pyarrow imports
    its pandas shim on the first ``pa.array`` call (0.3 s here, over 1 s on a loaded
    machine), which otherwise delays the first events' freshness."""
    import pyarrow as pa

    pa.array([0])


def run_worker(
    settings: WorkerSettings,
    registry: Registry,
    *,
    until_idle: float | None = None,
    stats_path: str | None = None,
    rebuild_online: bool = False,
) -> int:
    """Run a worker until stopped (or idle for ``until_idle`` seconds). Returns 0.

    ``rebuild_online``: rebuild the online state from the log once assigned
    (:mod:`streams.progress_guard`).

    ``stats_path`` receives a JSON summary at exit (events, first input and last durable
    commit wall times, freshness samples: :class:`~streams.run_stats.RunStats`) for
    benchmarks.

    Raises:
        MissingDependencyError: faust-streaming is not installed.
        BrokerError: Kafka cannot be reached, or a topic cannot be created.
    """
    require_faust()
    limit_malloc_arenas()  # before the threads: each would keep an arena of its own
    use_system_arrow_pool()  # glibc's, which malloc_trim empties (see streams.memory)
    relax_gc()  # process-wide: a worker process holds millions of long-lived tile cells
    warm_up()
    metrics = StreamMetrics(process=True)  # exported: with the process's RSS and CPU
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    engine = build_engine(settings, registry, metrics)
    ensure_topics(settings, engine.input_topics() + engine.side_topics())
    code = Worker(settings, engine, metrics, until_idle=until_idle,
                  rebuild_online=rebuild_online, own_process=True).run()
    if stats_path:
        engine.run_stats().write_json(stats_path)
    return code
