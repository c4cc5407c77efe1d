"""Where the rollout controller gets each arm's counts, and their JSON form.

A :class:`StatsSource` answers one question: each arm's *cumulative* counts since the
rollout started (:class:`~headrace.rollout.gates.ArmStats`). The controller keeps a
snapshot of them at each phase's start and judges the difference
(:func:`subtract`): the gates want the current phase's counts
(:mod:`headrace.rollout.policy` says why), and cumulative counts survive a controller
restart where a running tally would not.

Sources:

* :class:`~headrace.rollout.serving_counts.ServingStatsSource` — what every server
  counted of its answers (requests, errors, latency, pCTR range, publisher errors),
  summed in Redis.
* ``serving.arm_stats.ViewStatsSource`` — the stream worker's per-arm evaluation views
  (``feature_defs.evaluation``: impressions, clicks, Σ pCTR, the pCTR buckets,
  per-segment impressions and clicks), exact on replay like every view.
* :class:`MergedStatsSource` — several sources combined field by field
  (:func:`merge`): what ``headrace rollout start`` reads, the servers' counts with the
  stream's views.
* :class:`MemoryStatsSource` — set by hand (unit tests, simulations).
* :class:`JsonFileStatsSource` — a JSON file, re-read at every tick, replacing both
  (counts produced elsewhere: a batch job, a replay); write it atomically (a
  temporary file, then a rename over the old one).

The file::

    {"arms": {"2026-01-02-00": {"impressions": 120000, "clicks": 1300, ...},
              "2026-01-03-00": {...}}}

keyed by model version, each arm in :func:`arm_stats_to_dict`'s shape (every field
optional; an arm missing from the file has no counts yet).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from headrace.core.errors import InputError
from headrace.rollout.gates import ArmStats, PctrBucket, SegmentStats

__all__ = ["StatsSource", "StatsUnavailable", "MemoryStatsSource", "JsonFileStatsSource",
           "MergedStatsSource", "arm_stats_to_dict", "arm_stats_from_dict", "merge",
           "subtract"]


class StatsUnavailable(InputError):
    """The counts cannot be read now (a missing, torn or invalid stats file)."""


class StatsSource(Protocol):
    """Each arm's cumulative counts since the rollout started."""

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) counts.

        Raises:
            StatsUnavailable: the counts cannot be read now (the controller skips the
                tick and tries again at the next).
        """
        ...


def _bound(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def arm_stats_to_dict(s: ArmStats) -> dict[str, Any]:
    """Every field of ``s`` as strict JSON (an infinite latency bound is ``"inf"``)."""
    return {
        "impressions": s.impressions, "clicks": s.clicks, "sum_pctr": s.sum_pctr,
        "requests": s.requests, "errors": s.errors, "latency_p99_ms": s.latency_p99_ms,
        "latency_bounds_ms": [_bound(b) for b in s.latency_bounds_ms],
        "latency_counts": list(s.latency_counts),
        "buckets": [{"low": b.low, "high": b.high, "impressions": b.impressions,
                     "clicks": b.clicks, "sum_pctr": b.sum_pctr} for b in s.buckets],
        "min_pctr": s.min_pctr, "max_pctr": s.max_pctr,
        "segments": {dim: {v: {"impressions": g.impressions, "clicks": g.clicks,
                               "errors": g.errors, "requests": g.requests}
                           for v, g in values.items()} for dim, values in s.segments.items()},
    }


def arm_stats_from_dict(doc: Any, where: str = "arm") -> ArmStats:
    """Parse :func:`arm_stats_to_dict`'s shape (missing fields: zero / none).

    Raises:
        InputError: not an object, a field of the wrong type, or counts out of range
            (the message names ``where``).
    """
    if not isinstance(doc, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(doc).__name__}")
    try:
        bounds = tuple(math.inf if b in ("inf", None) else float(b)
                       for b in doc.get("latency_bounds_ms", ()))
        p99 = doc.get("latency_p99_ms")
        return ArmStats(
            impressions=int(doc.get("impressions", 0)), clicks=int(doc.get("clicks", 0)),
            sum_pctr=float(doc.get("sum_pctr", 0.0)), requests=int(doc.get("requests", 0)),
            errors=int(doc.get("errors", 0)),
            latency_p99_ms=None if p99 is None else float(p99),
            latency_bounds_ms=bounds,
            latency_counts=tuple(int(c) for c in doc.get("latency_counts", ())),
            buckets=tuple(PctrBucket(float(b["low"]), float(b["high"]),
                                     int(b.get("impressions", 0)), int(b.get("clicks", 0)),
                                     float(b.get("sum_pctr", 0.0)))
                          for b in doc.get("buckets", ())),
            min_pctr=None if doc.get("min_pctr") is None else float(doc["min_pctr"]),
            max_pctr=None if doc.get("max_pctr") is None else float(doc["max_pctr"]),
            segments={str(dim): {str(v): SegmentStats(int(g.get("impressions", 0)),
                                                      int(g.get("clicks", 0)),
                                                      int(g.get("errors", 0)),
                                                      int(g.get("requests", 0)))
                                 for v, g in values.items()}
                      for dim, values in doc.get("segments", {}).items()},
        )
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{where}: invalid arm statistics: {exc!r}") from exc


def subtract(cumulative: ArmStats, baseline: ArmStats) -> ArmStats:
    """The counts since ``baseline`` was taken: ``cumulative − baseline``.

    Counters (impressions, clicks, Σ pCTR, requests, errors, latency histogram counts,
    pCTR buckets matched by bounds, segments matched by dimension and value) subtract.
    ``latency_p99_ms`` (a quantile) and ``min_pctr``/``max_pctr`` (extremes) cannot:
    the cumulative values are kept, which is conservative for the range and p99 checks
    (what ever breached stays breached).

    Raises:
        InputError: a counter went backwards (the source was reset or belongs to
            another rollout), or the latency histograms' bounds differ.
    """
    if baseline.latency_counts and baseline.latency_bounds_ms != cumulative.latency_bounds_ms:
        raise InputError("the arm's latency histogram bounds changed during the rollout")
    base_lat = baseline.latency_counts or (0,) * len(cumulative.latency_counts)
    base_buckets = {(b.low, b.high): b for b in baseline.buckets}
    buckets = []
    for b in cumulative.buckets:
        ob = base_buckets.get((b.low, b.high), PctrBucket(b.low, b.high))
        buckets.append(PctrBucket(b.low, b.high, b.impressions - ob.impressions,
                                  b.clicks - ob.clicks, b.sum_pctr - ob.sum_pctr))
    segments: dict[str, dict[str, SegmentStats]] = {}
    for dim, values in cumulative.segments.items():
        before = baseline.segments.get(dim, {})
        segments[dim] = {}
        for v, g in values.items():
            o = before.get(v, SegmentStats())
            segments[dim][v] = SegmentStats(g.impressions - o.impressions, g.clicks - o.clicks,
                                            g.errors - o.errors, g.requests - o.requests)
    counts = [cumulative.impressions - baseline.impressions, cumulative.clicks - baseline.clicks,
              cumulative.requests - baseline.requests, cumulative.errors - baseline.errors]
    lat = tuple(c - o for c, o in zip(cumulative.latency_counts, base_lat, strict=True))
    negative = (min(counts) < 0 or any(c < 0 for c in lat)
                or any(b.impressions < 0 or b.clicks < 0 for b in buckets)
                or any(min(g.impressions, g.clicks, g.errors, g.requests) < 0
                       for vals in segments.values() for g in vals.values())
                or cumulative.sum_pctr < baseline.sum_pctr - 1e-6)
    if negative:
        raise InputError("the arm's cumulative counts went backwards (a reset source, or "
                         "counts of another rollout)")
    return ArmStats(impressions=counts[0], clicks=counts[1],
                    sum_pctr=max(0.0, cumulative.sum_pctr - baseline.sum_pctr),
                    requests=counts[2], errors=counts[3],
                    latency_p99_ms=cumulative.latency_p99_ms,
                    latency_bounds_ms=cumulative.latency_bounds_ms, latency_counts=lat,
                    buckets=tuple(buckets), min_pctr=cumulative.min_pctr,
                    max_pctr=cumulative.max_pctr, segments=segments)


class MemoryStatsSource:
    """Counts held in memory, set by the caller (tests, simulations).

    Args:
        arms: version → cumulative counts; a version not set has none yet.
    """

    def __init__(self, arms: dict[str, ArmStats] | None = None) -> None:
        self.arms: dict[str, ArmStats] = dict(arms or {})

    def set(self, version: str, stats: ArmStats) -> None:
        """Replace ``version``'s cumulative counts."""
        self.arms[version] = stats

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) counts; zero for a version not set."""
        return self.arms.get(champion, ArmStats()), self.arms.get(challenger, ArmStats())


class JsonFileStatsSource:
    """Cumulative counts per arm from a JSON file, re-read at every :meth:`read`.

    Counts produced elsewhere (see the module docstring for the file's shape).

    Args:
        path: the stats file; writers replace it atomically (temp file + rename).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) counts; an arm missing from the file has none.

        Raises:
            StatsUnavailable: the file is missing, unreadable, not JSON or invalid.
        """
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StatsUnavailable(f"the stats file {self.path} does not exist") from exc
        except (OSError, ValueError) as exc:
            raise StatsUnavailable(f"cannot read the stats file {self.path}: {exc}") from exc
        arms = doc.get("arms") if isinstance(doc, dict) else None
        if not isinstance(arms, dict):
            raise StatsUnavailable(f"the stats file {self.path} has no \"arms\" object")
        try:
            got = [arm_stats_from_dict(arms[v], f"{self.path}: arms.{v}") if v in arms
                   else ArmStats() for v in (champion, challenger)]
        except InputError as exc:
            raise StatsUnavailable(str(exc)) from exc
        return got[0], got[1]


def _opt(f: Any, a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else f(a, b)


def merge(a: ArmStats, b: ArmStats) -> ArmStats:
    """The counts of two sources of one arm, field by field.

    Counters sum (impressions, clicks, Σ pCTR, requests, errors; latency histograms of
    equal bounds, or the one that has one; pCTR buckets matched by bounds; segments by
    dimension and value, each field). ``min_pctr`` is the min of the mins,
    ``max_pctr`` the max of the maxes, ``latency_p99_ms`` the larger (a quantile cannot
    be combined; the larger is the conservative one). A field should be counted by
    ONE source: two sources counting the same requests would double them.

    Raises:
        StatsUnavailable: both have a latency histogram, with different bounds.
    """
    if a.latency_counts and b.latency_counts:
        if a.latency_bounds_ms != b.latency_bounds_ms:
            raise StatsUnavailable("cannot merge latency histograms of different bounds: "
                                   f"{a.latency_bounds_ms} and {b.latency_bounds_ms}")
        bounds = a.latency_bounds_ms
        lat = tuple(x + y for x, y in zip(a.latency_counts, b.latency_counts, strict=True))
    else:
        bounds, lat = ((a.latency_bounds_ms, a.latency_counts) if a.latency_counts
                       else (b.latency_bounds_ms, b.latency_counts))
    buckets: dict[tuple[float, float], PctrBucket] = {}
    for k in (*a.buckets, *b.buckets):
        ob = buckets.get((k.low, k.high), PctrBucket(k.low, k.high))
        buckets[(k.low, k.high)] = PctrBucket(k.low, k.high, ob.impressions + k.impressions,
                                              ob.clicks + k.clicks, ob.sum_pctr + k.sum_pctr)
    segments: dict[str, dict[str, SegmentStats]] = {}
    for side in (a.segments, b.segments):
        for dim, values in side.items():
            out = segments.setdefault(dim, {})
            for v, g in values.items():
                o = out.get(v, SegmentStats())
                out[v] = SegmentStats(o.impressions + g.impressions, o.clicks + g.clicks,
                                      o.errors + g.errors, o.requests + g.requests)
    return ArmStats(impressions=a.impressions + b.impressions, clicks=a.clicks + b.clicks,
                    sum_pctr=a.sum_pctr + b.sum_pctr, requests=a.requests + b.requests,
                    errors=a.errors + b.errors,
                    latency_p99_ms=_opt(max, a.latency_p99_ms, b.latency_p99_ms),
                    latency_bounds_ms=bounds, latency_counts=lat,
                    buckets=tuple(sorted(buckets.values(), key=lambda k: (k.low, k.high))),
                    min_pctr=_opt(min, a.min_pctr, b.min_pctr),
                    max_pctr=_opt(max, a.max_pctr, b.max_pctr), segments=segments)


class MergedStatsSource:
    """Several :class:`StatsSource` read together and combined by :func:`merge` (e.g.
    the servers' requests, errors and latency with the streams' impressions and clicks).

    Args:
        *sources: read in order at every :meth:`read`.
    """

    def __init__(self, *sources: StatsSource) -> None:
        if not sources:
            raise InputError("MergedStatsSource needs at least one source")
        self.sources = sources

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) counts of every source, merged.

        Raises:
            StatsUnavailable: any source cannot answer (no partial counts: a guardrail
                judged on half the fields could pass what it should not), or two
                latency histograms disagree on their bounds.
        """
        champ, chall = self.sources[0].read(champion, challenger)
        for source in self.sources[1:]:
            c1, c2 = source.read(champion, challenger)
            champ, chall = merge(champ, c1), merge(chall, c2)
        return champ, chall
