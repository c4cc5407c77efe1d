"""The worker's exported registry carries the process's memory and CPU; private ones do
not (tests build many engines in one process)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from streams.metrics import StreamMetrics


def _samples(metrics: StreamMetrics) -> dict[str, float]:
    return {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_exported_registry_reports_rss_and_cpu_of_this_process() -> None:
    metrics = StreamMetrics(process=True)
    before = _samples(metrics)["process_cpu_seconds_total"]
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU
        pass
    got = _samples(metrics)
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert got["process_resident_memory_bytes"] == pytest.approx(resident, rel=0.2)
    assert got["process_cpu_seconds_total"] - before >= 0.25
    assert "python_info" in got and "python_gc_collections_total" in got


def test_private_registries_stay_small() -> None:
    names = _samples(StreamMetrics())
    assert not [n for n in names if n.startswith(("process_", "python_"))]
