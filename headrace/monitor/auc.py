"""Rolling AUC and calibration of the served models, pure: impressions joined with
their clicks, per model version and tumbling event-time window of the impression.

**Labels** (the ``headrace labels`` rule): an impression that carries a
``model_version`` and a ``p_ctr`` (the answer that chose its ad) is positive when a
click carrying its ``event_id`` as ``impression_id`` has ``imp.ts <= click.ts <=
imp.ts + attribution`` (both ends inclusive); negative otherwise. Impressions without
a model version or pCTR are not counted. Clicks may be read before their impression
(two topics): both are kept until the impression's last window closes.

**Windows** are those of :mod:`headrace.monitor.windows` (``[start, start + length)``,
aligned to the epoch), on the impression's ``ts``. A window is *closed* — its AUC
final — once the clicks' event-time watermark (given by the caller: the smallest, over
the click partitions that delivered anything, of their largest click ``ts``) reaches
``end + attribution``: no click that could still count can be newer.

**AUC**: exact, ties counted half (Mann–Whitney U from average ranks):
``(sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0)``; NaN without positives
or without negatives. **Calibration ratio**: mean predicted / observed CTR = Σ pCTR /
clicks, as the rollout's :attr:`~headrace.rollout.gates.ArmStats.calibration_ratio`
(inf with predictions and no click, 1.0 with neither).

Memory: every impression of the open 24 h windows (about 100 bytes each) is held; a
deployment at 10M impressions a day needs ~1 GB for this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from headrace.monitor import stats
from headrace.monitor.windows import WINDOWS

__all__ = ["DEFAULT_ATTRIBUTION_MS", "auc_exact", "calibration_ratio", "ClosedWindow",
           "LabelJoin"]

#: the default attribution window, ms (``HEADRACE_MONITOR_ATTRIBUTION_S`` = 1800)
DEFAULT_ATTRIBUTION_MS: Final = 1_800_000


def auc_exact(scores: np.ndarray | Iterable[float], labels: np.ndarray | Iterable[int]
              ) -> float:
    """The ROC AUC of ``scores`` for binary ``labels`` (1 positive), ties counted half.

    Returns:
        In [0, 1]; NaN when there is no positive or no negative.
    """
    s = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores,
                   dtype=np.float64)
    y = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels) > 0
    return stats.auc(s, y)


def calibration_ratio(sum_pctr: float, clicks: int) -> float:
    """Σ pCTR / clicks (mean predicted over observed CTR); inf with predictions and no
    click, 1.0 with neither (as the rollout gates)."""
    if clicks:
        return sum_pctr / clicks
    return math.inf if sum_pctr > 0 else 1.0


@dataclass(frozen=True)
class ClosedWindow:
    """The final AUC and calibration of one (version, window, start).

    Attributes:
        impressions: impressions counted; clicks: the positives among them.
        auc: :func:`auc_exact` (NaN without both classes).
        calibration_ratio: :func:`calibration_ratio` of the impressions' pCTR sum.
    """

    model_version: str
    window: str
    start_ms: int
    length_ms: int
    impressions: int
    clicks: int
    auc: float
    calibration_ratio: float


@dataclass
class _Imp:
    ts: int
    version: str
    p_ctr: float


@dataclass
class LabelJoin:
    """Impressions and clicks in, closed windows out (module docstring).

    Args:
        attribution_ms: the attribution window (>= 0).
        windows: window name -> length (ms).
    """

    attribution_ms: int = DEFAULT_ATTRIBUTION_MS
    windows: Mapping[str, int] = field(default_factory=lambda: dict(WINDOWS))
    _imps: dict[str, _Imp] = field(default_factory=dict)
    _clicks: dict[str, list[int]] = field(default_factory=dict)
    #: (version, window, start) -> impression ids, of the windows not yet closed
    _open: dict[tuple[str, str, int], list[str]] = field(default_factory=dict)
    _closed_until: dict[str, int] = field(default_factory=dict)

    def impression(self, event_id: str, ts: int, model_version: str | None,
                   p_ctr: float | None) -> bool:
        """Add one impression; False (ignored) without a model version or pCTR, or in a
        window already closed (too late to count)."""
        if model_version is None or p_ctr is None or event_id in self._imps:
            return False
        keys = []
        for name, length in self.windows.items():
            start = ts - ts % length
            if start + length <= self._closed_until.get(name, -(2 ** 62)):
                return False
            keys.append((model_version, name, start))
        self._imps[event_id] = _Imp(ts, model_version, float(p_ctr))
        for k in keys:
            self._open.setdefault(k, []).append(event_id)
        return True

    def click(self, impression_id: str | None, ts: int) -> None:
        """Add one click of ``impression_id`` (None: not attributable, ignored)."""
        if impression_id is not None:
            self._clicks.setdefault(impression_id, []).append(ts)

    def _label(self, event_id: str, imp: _Imp) -> int:
        hi = imp.ts + self.attribution_ms
        return int(any(imp.ts <= c <= hi for c in self._clicks.get(event_id, ())))

    def close(self, watermark_ms: int) -> list[ClosedWindow]:
        """The windows whose ``end + attribution <= watermark_ms``, each once, in start
        order; impressions and clicks no open window needs are forgotten."""
        done = sorted((k for k in self._open
                       if k[2] + self.windows[k[1]] + self.attribution_ms <= watermark_ms),
                      key=lambda k: (k[2], k[1], k[0]))
        out = []
        for key in done:
            ids = self._open.pop(key)
            imps = [self._imps[i] for i in ids]
            y = np.asarray([self._label(i, m) for i, m in zip(ids, imps, strict=True)])
            p = np.asarray([m.p_ctr for m in imps], dtype=np.float64)
            length = self.windows[key[1]]
            out.append(ClosedWindow(key[0], key[1], key[2], length, len(ids), int(y.sum()),
                                    auc_exact(p, y), calibration_ratio(float(p.sum()),
                                                                       int(y.sum()))))
        for name, length in self.windows.items():
            edge = watermark_ms - self.attribution_ms
            self._closed_until[name] = max(self._closed_until.get(name, -(2 ** 62)),
                                           edge - edge % length)
        if done:
            self._forget(min(self._closed_until.values()) - self.attribution_ms)
        return out

    def _forget(self, before_ms: int) -> None:
        """Drop impressions no open window holds, their clicks, and the clicks older
        than ``before_ms`` whose impression never came (they cannot count any more)."""
        live = {i for ids in self._open.values() for i in ids}
        for i in [i for i in self._imps if i not in live]:
            del self._imps[i]
            self._clicks.pop(i, None)
        for i in [i for i, ts in self._clicks.items()
                  if i not in self._imps and max(ts) < before_ms]:
            del self._clicks[i]

    @property
    def open_windows(self) -> int:
        """Windows still waiting for their clicks."""
        return len(self._open)
