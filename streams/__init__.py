"""The stream runtime: Faust agents feed an engine that keeps event-time view states in
Redis, raw events and view rows in Parquet, and side outputs (forwards, dead letters,
late events) in Kafka, effectively once.

Layout (data flows down the list):

* :mod:`streams.events`, :mod:`streams.codec`, :mod:`streams.encode`: the input contract's
  schemas and the wire codecs (producers and the engine share them).
* :mod:`streams.producer`, :mod:`streams.synthetic`, :mod:`streams.csv_replay`,
  :mod:`streams.live`: producing events.
* :mod:`streams.engine` (:class:`Engine`), composed of :mod:`streams.admission`
  (admission and progress), :mod:`streams.apply` (view states) and :mod:`streams.flush`
  (online and offline flushes), with :mod:`streams.rows`, :mod:`streams.sides`,
  :mod:`streams.online`, :mod:`streams.offline_writer`, :mod:`streams.run_stats`.
* :mod:`streams.worker` (:class:`Worker`: the Faust app and its run loop),
  :mod:`streams.pacing` (when to flush), :mod:`streams.faust_adapter` (every Faust
  work-around), :mod:`streams.app` (:func:`run_worker`, the process entry point),
  :mod:`streams.lag`, :mod:`streams.metrics`.

The public names below are loaded on first use (``streams.Engine``), so importing one
submodule does not pull in Faust, Redis or the offline writer.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Engine", "RunStats", "Worker", "build_engine", "run_worker"]

_HOMES = {"Engine": "streams.engine", "RunStats": "streams.run_stats",
          "Worker": "streams.worker", "build_engine": "streams.app",
          "run_worker": "streams.app"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'streams' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
