"""The run summary a worker writes at exit for benchmarks (``headrace worker --stats``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["RunStats"]


@dataclass
class RunStats:
    """Run statistics of one engine, for benchmarks (``bench/stream.py``, the demo).

    Updated by the engine's thread only (the offline writer's threads set
    ``last_offline_commit``, a single store). Fields can also be read by their JSON
    name, ``stats["events_in"]``.

    Attributes:
        events_in: Events decoded from source topics (valid ones, late ones included).
        first_input: Wall time (epoch s) the first source event was decoded, or None.
        last_online_commit: Wall time (epoch s) the last online progress record was
            written (its states are durable), or None.
        last_offline_commit: Wall time (epoch s) the last offline part's progress was
            recorded, or None.
        freshness_ms: A bounded uniform sample of freshness values (ms: wall time the
            value was written to Redis - event time), one per sampled event and view
            entity, in arrival order.
        freshness_ts_ms: The event time (epoch ms) of each value in ``freshness_ms``.
        state_cache_hits, state_cache_misses, state_cache_evictions: The view-state
            cache's totals (:mod:`streams.state_cache`) as of the last online commit.
        state_cache_bytes, states_cached: Its estimated bytes and its states then.
    """

    events_in: int = 0
    first_input: float | None = None
    last_online_commit: float | None = None
    last_offline_commit: float | None = None
    freshness_ms: list[float] = field(default_factory=list)
    freshness_ts_ms: list[int] = field(default_factory=list)
    state_cache_hits: int = 0
    state_cache_misses: int = 0
    state_cache_evictions: int = 0
    state_cache_bytes: int = 0
    states_cached: int = 0

    def __getitem__(self, name: str) -> Any:
        if name not in _NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """The summary as the JSON object the stats file holds (lists not copied)."""
        return {name: getattr(self, name) for name in _NAMES}

    def write_json(self, path: str) -> None:
        """Write :meth:`as_dict` to ``path`` (UTF-8 JSON)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.as_dict(), fh)


_NAMES = tuple(f.name for f in fields(RunStats))
