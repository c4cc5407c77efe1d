"""Drift aggregation over the prediction log, pure: tumbling event-time windows of the
served feature rows, histogrammed on the model's reference profile, and the drift of
one window against that profile.

**Windows.** Tumbling, in event time (the record's ``ts``, epoch ms UTC), of 1 h and
24 h (:data:`WINDOWS`), aligned to multiples of their length since the epoch: the
window of ``ts`` starts at ``ts - ts % length`` and holds ``[start, start + length)``
(start inclusive, end exclusive). A 24 h window is the union of its 24 hourly ones.

**What is counted.** Per (model version, window, window start), from the decoded
prediction records that were *served* (not ``shadow``) and did not fail (``error`` is
None), of a version whose :class:`~headrace.monitor.profile.ReferenceProfile` is known:

* per feature, the histogram of ``record.features`` (the row of the candidate the model
  ranked first, in the model's feature order, NaN for null) on that feature's profile
  bins (k value bins + the null bin, last);
* the histogram of the served prediction: ``p_ctr[i]`` of the candidate ``i`` whose
  ``ranks[i]`` is the record's ``chosen_rank`` (0 for a served record: the model's
  best eCPM, the one the answer put first);
* per context column of the profile (``country``, ``device_type``, …), the counts per
  category (:meth:`CategoricalProfile.histogram`);
* the row count.

A record whose feature row is missing or has another length than the profile's feature
list (an older schema, another model's row), or whose ranks hold no ``chosen_rank``, is
counted as ``mismatched`` and skipped. Every record gets one outcome
(:data:`OUTCOMES`): ``ok``, ``shadow``, ``error``, ``no_profile``, ``mismatched``
(``undecodable`` is the reader's, for bytes :func:`~feature_defs.predictions.
decode_prediction` refused).

**Drift** (:func:`window_drift`): per feature, PSI over all k + 1 bins (the null bin
included) and the binned KS statistic and p-value over the k value bins
(:mod:`headrace.monitor.stats`); the same for the prediction (:data:`PREDICTION`); for
context columns PSI over the profile's categories (``context:<column>``, KS undefined).

The online monitor (``headrace monitor``) and the offline command (``headrace drift``)
both aggregate through :class:`DriftAggregator`, so their numbers are the same.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from headrace.monitor.profile import NULL
from headrace.monitor.stats import ks_binned, psi

if TYPE_CHECKING:
    from feature_defs.predictions import PredictionRecord
    from headrace.monitor.profile import NumericProfile, ReferenceProfile

__all__ = ["HOUR_MS", "DAY_MS", "WINDOWS", "PREDICTION", "CONTEXT_PREFIX", "OUTCOMES",
           "window_start", "served_prediction", "WindowAggregate", "DriftAggregator",
           "FeatureDrift", "window_drift"]

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000
#: window name -> length in ms
WINDOWS: Final[Mapping[str, int]] = {"1h": HOUR_MS, "24h": DAY_MS}
#: the ``feature`` name of the served prediction's drift
PREDICTION: Final = "__prediction__"
#: the ``feature`` name of a context column is this + the column
CONTEXT_PREFIX: Final = "context:"
#: every outcome a prediction-log record can have (``headrace_monitor_records_total``)
OUTCOMES: Final = ("ok", "shadow", "error", "no_profile", "mismatched", "undecodable")


def window_start(ts_ms: int, length_ms: int) -> int:
    """The start (epoch ms) of the ``length_ms`` window that holds ``ts_ms``."""
    return ts_ms - ts_ms % length_ms


def served_prediction(record: PredictionRecord) -> float | None:
    """The pCTR of the candidate the record's answer put first (``ranks[i] ==
    chosen_rank``, 0 when unset), or None when no candidate has that rank."""
    rank = 0 if record.chosen_rank is None else record.chosen_rank
    ranks = list(record.ranks)
    if rank not in ranks:
        return None
    i = ranks.index(rank)
    return float(record.p_ctr[i]) if i < len(record.p_ctr) else None


@dataclass
class WindowAggregate:
    """The counts of one (model version, window, start); ``[start_ms, start_ms +
    length_ms)``.

    Attributes:
        features: per profile feature, in the profile's order, counts per bin (k + 1,
            the null bin last).
        prediction: counts per bin of the served prediction.
        context: per context column, counts per category (the profile's keys, 0
            included).
        rows: records counted.
    """

    model_version: str
    window: str
    start_ms: int
    length_ms: int
    features: list[np.ndarray]
    prediction: np.ndarray
    context: dict[str, Counter[str]]
    rows: int = 0

    @property
    def end_ms(self) -> int:
        """The first ms after the window."""
        return self.start_ms + self.length_ms

    @classmethod
    def empty(cls, profile: ReferenceProfile, window: str, start_ms: int, length_ms: int
              ) -> WindowAggregate:
        """No rows yet, bins shaped like ``profile``'s."""
        return cls(profile.version, window, start_ms, length_ms,
                   [np.zeros(len(p.counts), dtype=np.int64)
                    for p in profile.features.values()],
                   np.zeros(len(profile.prediction.counts), dtype=np.int64),
                   {c: Counter(dict.fromkeys(cp.counts, 0))
                    for c, cp in profile.context.items()})


def _hist(p: NumericProfile, values: np.ndarray) -> np.ndarray:
    return np.asarray(p.histogram(values), dtype=np.int64)


@dataclass
class DriftAggregator:
    """Groups prediction records into :class:`WindowAggregate` per (version, window,
    start).

    Args:
        profiles: the reference profile of a model version, or None when it has none
            (called once per version, the answer kept).
        windows: window name -> length (ms); default :data:`WINDOWS`.
        span: ``(from_ms, to_ms)``: instead of tumbling windows, one window named
            ``range`` holding ``[from_ms, to_ms)`` (records outside are not counted,
            and get no outcome); what ``headrace drift`` without ``--window`` uses.
    """

    profiles: Callable[[str], ReferenceProfile | None]
    windows: Mapping[str, int] = field(default_factory=lambda: dict(WINDOWS))
    span: tuple[int, int] | None = None
    aggregates: dict[tuple[str, str, int], WindowAggregate] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    _known: dict[str, ReferenceProfile | None] = field(default_factory=dict)

    def profile(self, version: str) -> ReferenceProfile | None:
        """``version``'s profile (cached)."""
        if version not in self._known:
            self._known[version] = self.profiles(version)
        return self._known[version]

    def forget_missing(self) -> None:
        """Ask again, at the next record, for the profiles that were missing."""
        for version in [v for v, p in self._known.items() if p is None]:
            del self._known[version]

    def add(self, records: Iterable[PredictionRecord]) -> Counter[str]:
        """Count ``records`` (any order, any versions) into their windows.

        Returns:
            The outcome of each record, counted (also added to :attr:`outcomes`).
        """
        out: Counter[str] = Counter()
        rows: dict[str, list[PredictionRecord]] = {}
        preds: dict[str, list[float]] = {}
        for r in records:
            if self.span is not None and not self.span[0] <= r.ts < self.span[1]:
                continue
            outcome = self._classify(r)
            out[outcome] += 1
            if outcome == "ok":
                rows.setdefault(r.model_version, []).append(r)
                preds.setdefault(r.model_version, []).append(
                    served_prediction(r))  # type: ignore[arg-type]
        for version, recs in rows.items():
            profile = self.profile(version)
            assert profile is not None
            self._count(profile, recs, np.asarray(preds[version], dtype=np.float64))
        self.outcomes.update(out)
        return out

    def _classify(self, r: PredictionRecord) -> str:
        if r.shadow:
            return "shadow"
        if r.error is not None:
            return "error"
        profile = self.profile(r.model_version)
        if profile is None:
            return "no_profile"
        if len(r.features) != len(profile.features):
            return "mismatched"
        if served_prediction(r) is None:
            return "mismatched"
        return "ok"

    def _starts(self, ts: np.ndarray) -> Iterable[tuple[str, int, np.ndarray]]:
        """(window name, length, start per row) for each window length."""
        if self.span is not None:
            lo, hi = self.span
            yield "range", hi - lo, np.full(len(ts), lo, dtype=np.int64)
            return
        for name, length in self.windows.items():
            yield name, length, ts - ts % length

    def _count(self, profile: ReferenceProfile, recs: Sequence[PredictionRecord],
               pred: np.ndarray) -> None:
        x = np.asarray([np.asarray(r.features, dtype=np.float64) for r in recs],
                       dtype=np.float64).reshape(len(recs), len(profile.features))
        ts = np.asarray([r.ts for r in recs], dtype=np.int64)
        ctx: dict[str, np.ndarray] = {
            c: np.asarray([getattr(r, c, None) for r in recs], dtype=object)
            for c in profile.context}
        feats = list(profile.features.values())
        for name, length, starts in self._starts(ts):
            for start in np.unique(starts):
                sel = starts == start
                key = (profile.version, name, int(start))
                agg = self.aggregates.get(key)
                if agg is None:
                    agg = WindowAggregate.empty(profile, name, int(start), length)
                    self.aggregates[key] = agg
                for j, p in enumerate(feats):
                    agg.features[j] += _hist(p, x[sel, j])
                agg.prediction += _hist(profile.prediction, pred[sel])
                for c, cp in profile.context.items():
                    agg.context[c].update(cp.histogram(list(ctx[c][sel])))
                agg.rows += int(sel.sum())

    def evict_before(self, ms: int) -> int:
        """Forget the windows that ended at or before ``ms``; returns how many."""
        old = [k for k, a in self.aggregates.items() if a.end_ms <= ms]
        for k in old:
            del self.aggregates[k]
        return len(old)


@dataclass(frozen=True)
class FeatureDrift:
    """The drift of one feature (or the prediction, or a context column) in one window.

    Attributes:
        feature: the feature name, :data:`PREDICTION`, or ``context:<column>``.
        psi: PSI over every bin (the null bin included), >= 0; NaN with no rows.
        ks: binned KS statistic over the value bins, in [0, 1]; NaN with no non-null
            values or for a context column.
        ks_pvalue: its asymptotic p-value, in [0, 1]; NaN likewise.
        null_share: share of the window's rows whose value is null (NaN feature,
            ``__null__`` category), in [0, 1]; NaN with no rows.
        rows: the window's rows.
    """

    feature: str
    psi: float
    ks: float
    ks_pvalue: float
    null_share: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """The fields, JSON-able apart from NaN (see :func:`~headrace.core.jsonsafe.
        json_safe`)."""
        return {"feature": self.feature, "psi": self.psi, "ks": self.ks,
                "ks_pvalue": self.ks_pvalue, "null_share": self.null_share,
                "rows": self.rows}


def _numeric(name: str, expected: Sequence[int], actual: np.ndarray, rows: int
             ) -> FeatureDrift:
    e = np.asarray(expected, dtype=np.int64)
    p = psi(e, actual)
    d, pv = ks_binned(e[:-1], actual[:-1]) if len(e) > 1 else (math.nan, math.nan)
    null = float(actual[-1]) / rows if rows else math.nan
    return FeatureDrift(name, p, d, pv, null, rows)


def window_drift(agg: WindowAggregate, profile: ReferenceProfile) -> list[FeatureDrift]:
    """Per feature (profile order), then :data:`PREDICTION`, then each context column,
    the drift of ``agg`` against ``profile`` (module docstring)."""
    out = [_numeric(name, p.counts, agg.features[j], agg.rows)
           for j, (name, p) in enumerate(profile.features.items())]
    out.append(_numeric(PREDICTION, profile.prediction.counts, agg.prediction, agg.rows))
    for c, cp in profile.context.items():
        keys = list(cp.counts)
        e = [cp.counts[k] for k in keys]
        a = [agg.context[c].get(k, 0) for k in keys]
        null = agg.context[c].get(NULL, 0) / agg.rows if agg.rows else math.nan
        out.append(FeatureDrift(CONTEXT_PREFIX + c, psi(e, a) if keys else math.nan,
                                math.nan, math.nan, null, agg.rows))
    return out
