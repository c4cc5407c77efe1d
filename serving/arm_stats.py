"""The rollout controller's per-arm counts, read from the stream's evaluation views.

:class:`ViewStatsSource` is a :class:`~headrace.rollout.source.StatsSource` over the
opt-in views of :mod:`feature_defs.evaluation` (run the worker with ``--definitions
feature_defs.evaluation``). It reads them from Redis through the serving read path
(:class:`~serving.reader.OnlineReader`: keys, one pipelined HMGET per entity, the exact
roll-up of :mod:`serving.rollup`), so the counts are the worker's: exact on replay and
effectively once. They are lifetime counts, i.e. cumulative since the views started,
which is what a ``StatsSource`` answers (the controller subtracts its phase-start
snapshot).

What it reads per arm (``model_version``):

* ``arm``: impressions, clicks, Σ p_ctr, min and max p_ctr;
* ``arm_pctr_bucket``: every bucket of the fixed :data:`feature_defs.keys.PCTR_EDGES`
  (all ten, always: a bucket without data has zero counts);
* the segments ``publisher``, ``device_type`` and ``country``: only the values *configured*
  in ``segments`` (a views' key cannot be listed without a scan, and a per-arm set of
  values seen would be approximate or unbounded; the segments a rollout judges are few
  and known, so they are configuration). A configured value without data is left out.

Not in these views (left zero / unset): ``requests``, ``errors`` and the latency
histogram, which come from the serving side, not from impressions and clicks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from feature_defs.evaluation import (
    ARM,
    ARM_PCTR_BUCKET,
    EVALUATION_VIEWS,
    SEGMENT_ENTITIES,
)
from feature_defs.keys import PCTR_BUCKET_LABELS, bucket_bounds, id_problem, join_id
from feature_defs.model import Entity
from feature_defs.registry import Registry
from headrace.core.errors import InputError, OnlineStoreError
from headrace.rollout.gates import ArmStats, PctrBucket, SegmentStats
from headrace.rollout.source import StatsUnavailable
from serving.reader import OnlineReader, compile_read_plan

__all__ = ["ViewStatsSource", "READ_AHEAD_MS"]

#: the roll-up is taken this far past the clock: a lifetime window holds the events
#: *before* its as-of time, and the contract accepts event times up to an hour ahead
#: of a worker's clock (``max_future_ms``), so every applied event is counted
READ_AHEAD_MS: Final = 86_400_000


class ViewStatsSource:
    """Each arm's cumulative counts from the evaluation views in the online store.

    Args:
        registry: the deployment's definitions; must hold the evaluation views
            (:data:`feature_defs.evaluation.EVALUATION_VIEWS`).
        reader: the serving online reader (store and key prefix bound).
        segments: dimension (``publisher``, ``device_type``, ``country``) -> the values
            to read (see the module docstring for why they are configured).
        clock_ms: current time, epoch ms (injected; tests pin it).

    Raises:
        InputError: the registry lacks an evaluation view, a dimension is unknown, or a
            segment value is not a valid id.
    """

    def __init__(self, registry: Registry, reader: OnlineReader, *,
                 segments: Mapping[str, Sequence[str]] | None = None,
                 clock_ms: Callable[[], int] | None = None) -> None:
        missing = [v.id for v in EVALUATION_VIEWS if v.id not in registry.plans]
        if missing:
            raise InputError(f"the definitions lack the evaluation views ({', '.join(missing)}):"
                             " run them with --definitions feature_defs.evaluation")
        unknown = sorted(set(segments or {}) - set(SEGMENT_ENTITIES))
        if unknown:
            raise InputError(f"unknown segment dimension(s) {', '.join(unknown)} (known: "
                             f"{', '.join(SEGMENT_ENTITIES)})")
        self.registry = registry
        self.reader = reader
        self.segments = {d: tuple(dict.fromkeys(vs)) for d, vs in (segments or {}).items()}
        for dim, values in self.segments.items():
            for v in values:
                if join_id(["v", v]) is None:
                    raise InputError(f"segment {dim} value {v!r} is not a valid id")
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._plans = {e.name: compile_read_plan(registry, e.name, registry.feature_names(e.name))
                       for e in (ARM, ARM_PCTR_BUCKET, *SEGMENT_ENTITIES.values())}

    def _read(self, entity: Entity, ids: Sequence[str], as_of: int) -> list[dict[str, Any]]:
        """Per id, feature name (without the entity prefix and window) -> value."""
        if not ids:
            return []
        plan = self._plans[entity.name]
        try:
            rows = self.reader.store.read_hashes(self.reader.keys(entity.name, ids),
                                                 list(plan.fields))
        except OnlineStoreError as exc:
            raise StatsUnavailable(f"cannot read the evaluation views: {exc}") from exc
        out = []
        for eid, row in zip(ids, self.reader.rollup(plan, rows, as_of, explicit=False),
                            strict=True):
            if row.corrupt:
                raise StatsUnavailable(f"unreadable state of {entity.name} {eid!r}: "
                                       f"{', '.join(row.corrupt)}")
            prefix = f"{entity.name}__"
            out.append({n[len(prefix):].rsplit("_", 1)[0]: v
                        for n, v in zip(plan.names, row.values, strict=True)})
        return out

    def arm(self, version: str) -> ArmStats:
        """One arm's cumulative counts (zero for a version without data).

        Raises:
            StatsUnavailable: Redis failed, a state is unreadable, or the counts are
                momentarily inconsistent (a click counted before its impression).
            InputError: ``version`` is not a valid id.
        """
        problem = id_problem(ARM, version)
        if problem is not None:
            raise InputError(f"model version {version!r}: {problem}")
        as_of = self.clock_ms() + READ_AHEAD_MS
        (a,) = self._read(ARM, [version], as_of)
        ids = [join_id([version, b]) or "" for b in PCTR_BUCKET_LABELS]
        buckets = tuple(
            PctrBucket(*bucket_bounds(label), impressions=int(b["impressions"]),
                       clicks=int(b["clicks"]), sum_pctr=float(b["sum_pctr"] or 0.0))
            for label, b in zip(PCTR_BUCKET_LABELS, self._read(ARM_PCTR_BUCKET, ids, as_of),
                                strict=True))
        segments: dict[str, dict[str, SegmentStats]] = {}
        for dim, values in self.segments.items():
            seg_ids = [join_id([version, v]) or "" for v in values]
            got = self._read(SEGMENT_ENTITIES[dim], seg_ids, as_of)
            segments[dim] = {v: SegmentStats(int(g["impressions"]), int(g["clicks"]))
                             for v, g in zip(values, got, strict=True)
                             if g["impressions"] or g["clicks"]}
        try:
            return ArmStats(impressions=int(a["impressions"]), clicks=int(a["clicks"]),
                            sum_pctr=float(a["sum_pctr"] or 0.0), buckets=buckets,
                            min_pctr=a["min_pctr"], max_pctr=a["max_pctr"],
                            segments=segments)
        except InputError as exc:
            raise StatsUnavailable(f"arm {version}: {exc} (clicks are counted by their own "
                                   "model_version: a click may be applied before its "
                                   "impression; the next read catches up)") from exc

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) cumulative counts (see :meth:`arm`)."""
        return self.arm(champion), self.arm(challenger)
