"""The process's own metrics in a private Prometheus registry.

``prometheus_client``'s default registry exports ``process_*`` (RSS, CPU seconds, open
files), ``python_info`` and ``python_gc_*``; a private registry (one per server or worker,
so two of them in one test process do not collide) exports none of them unless asked.
The processes that serve their registry over HTTP ask with
:func:`register_process_collectors`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

__all__ = ["register_process_collectors"]


def register_process_collectors(registry: CollectorRegistry) -> None:
    """Register the process, platform and GC collectors in ``registry``.

    Raises:
        ValueError: ``registry`` already holds them.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
