"""Cold-start priors from the offline store (``headrace priors``).

Invariant: every prior is a plain statistic of the de-duplicated raw events of the
lookback ``[until - days, until)``; the same events always give the same document.

Rules (the spec left them open; chosen here, one place):

* **Segment of a user** = their most frequent ``(country, device_type)`` over their
  impressions in the lookback (ties: the smallest pair). Segments with fewer than
  ``min_segment_users`` users get no segment prior (the global one applies).
* **Ratio of two COUNT measures** (``ctr``): global = Σ numerator / Σ denominator
  events; a segment's = ``(num_s + α · global) / (den_s + α)``, smoothed toward the
  global ratio with ``α = smoothing`` pseudo-events (default 100 impressions). The same
  prior serves every window of the feature (a CTR estimate does not depend on it).
* **COUNT** over a window of length ``W``: the mean count per *active entity-window*:
  event time is cut into ``W``-aligned buckets, an (entity, bucket) pair is active when
  the entity has any event of the view's sources in it, and the prior is
  Σ events / Σ active pairs (over all entities, or the segment's users). Lifetime
  windows use one bucket. (Tumbling buckets approximate the sliding windows.)
* **APPROX_DISTINCT** over ``W``: the mean exact distinct count per active entity-window.
* Other operators (SUM, MEAN, MIN, MAX, LAST) and other ratios get no prior: their
  definition default serves.

Segment priors are computed for ``user`` features only (the segment is a property of
the request's user); other entities get global priors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.coldstart import Priors, Segment
from feature_defs.layout import priors_key
from feature_defs.model import AggOp, FeatureView, feature_name
from feature_defs.plan import OutputPlan
from feature_defs.registry import Registry
from feature_defs.windows import to_ms
from headrace.core.errors import OnlineStoreError

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = ["compute_priors", "read_priors_input", "build_priors", "write_priors", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {"days": 7, "smoothing": 100.0, "min_segment_users": 5}
_IMP_COLS = ("user_id", "ad_id", "campaign_id", "publisher_id", "country", "device_type")
_CLICK_COLS = ("user_id", "ad_id", "campaign_id", "publisher_id")
_USER = "user"


def _np_ts(table: pa.Table) -> np.ndarray:
    col = table.column("ts")
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _codes(columns: list[pa.ChunkedArray]) -> tuple[list[np.ndarray], list[Any]]:
    """Shared integer codes of string columns (-1 for null) and the dictionary."""
    chunks = [c.cast(pa.string()) for c in columns]
    merged = pa.chunked_array([ch for c in chunks for ch in c.chunks], type=pa.string())
    enc = pc.dictionary_encode(merged).combine_chunks()
    codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(), dtype=np.int64)
    out, start = [], 0
    for c in columns:
        out.append(codes[start : start + len(c)])
        start += len(c)
    return out, enc.dictionary.to_pylist()


def _user_segments(imps: pa.Table, min_users: int) -> dict[str, Segment]:
    """user id → modal (country, device_type) over their impressions."""
    if imps.num_rows == 0:
        return {}
    counts = (
        imps.select(["user_id", "country", "device_type"])
        .filter(pc.and_(pc.is_valid(imps["user_id"]),
                        pc.and_(pc.is_valid(imps["country"]), pc.is_valid(imps["device_type"]))))
        .group_by(["user_id", "country", "device_type"], use_threads=False)
        .aggregate([([], "count_all")])
    )
    best: dict[str, tuple[int, Segment]] = {}
    columns = [counts[k].to_pylist() for k in ("user_id", "country", "device_type", "count_all")]
    for u, c, d, n in zip(*columns, strict=True):
        cur = best.get(u)
        seg = (str(c), str(d))
        if cur is None or n > cur[0] or (n == cur[0] and seg < cur[1]):
            best[u] = (n, seg)
    per_seg: dict[Segment, int] = {}
    for _n, seg in best.values():
        per_seg[seg] = per_seg.get(seg, 0) + 1
    return {u: seg for u, (_n, seg) in best.items() if per_seg[seg] >= min_users}


class _ViewData:
    """Events of one view's sources, keyed by integer entity codes."""

    def __init__(self, view: FeatureView, tables: dict[str, pa.Table]) -> None:
        key = view.entity.key
        self.sources = {s.name: tables[s.kind] for s in view.sources}
        names = list(self.sources)
        cols = [self.sources[n].column(key) if self.sources[n].num_rows else
                pa.chunked_array([], pa.string()) for n in names]
        codes, self.keys = _codes(cols)
        self.code = dict(zip(names, codes, strict=True))
        self.ts = {n: _np_ts(self.sources[n]) if self.sources[n].num_rows else
                   np.zeros(0, np.int64) for n in names}

    def active_pairs(self, bucket_ms: int) -> np.ndarray:
        """Unique (code, bucket) pairs of any source, packed into int64."""
        packed = [self._pack(n, bucket_ms) for n in self.sources]
        return np.unique(np.concatenate(packed)) if packed else np.zeros(0, np.int64)

    def _pack(self, source: str, bucket_ms: int) -> np.ndarray:
        code, ts = self.code[source], self.ts[source]
        ok = code >= 0
        bucket = ts[ok] // bucket_ms if bucket_ms else np.zeros(int(ok.sum()), np.int64)
        return (code[ok] << 32) + (bucket - _BUCKET_BASE)

    def codes_of(self, source: str) -> np.ndarray:
        code = self.code[source]
        return code[code >= 0]


_BUCKET_BASE = -(2**31)  # keeps (bucket - base) within 32 bits for any ms timestamp / 1 s+


def _segment_index(
    data: _ViewData, segments: dict[str, Segment]
) -> tuple[np.ndarray, list[Segment]]:
    """Segment number per entity code (-1: none) and the segment list."""
    seg_list = sorted(set(segments.values()))
    number = {s: i for i, s in enumerate(seg_list)}
    idx = np.array([number.get(segments.get(k, ("", "")), -1) if k is not None else -1
                    for k in data.keys], dtype=np.int64)
    return idx, seg_list


def _per_segment(values_codes: np.ndarray, seg_of: np.ndarray, n_seg: int,
                 weights: np.ndarray | None = None) -> np.ndarray:
    if n_seg == 0 or values_codes.size == 0:
        return np.zeros(n_seg)
    seg = seg_of[values_codes]
    ok = seg >= 0
    return np.bincount(seg[ok], weights=None if weights is None else weights[ok],
                       minlength=n_seg)


def compute_priors(
    registry: Registry,
    impressions: pa.Table,
    clicks: pa.Table,
    *,
    smoothing: float = DEFAULTS["smoothing"],
    min_segment_users: int = DEFAULTS["min_segment_users"],
    computed_at_ms: int = 0,
    meta: dict[str, Any] | None = None,
) -> Priors:
    """Priors of every feature with a rule (see the module docstring). Pure.

    Args:
        impressions, clicks: de-duplicated events (columns of the input contract;
            ``ts`` as timestamp or int64 epoch ms).
    """
    tables = {"impression": impressions, "click": clicks}
    segments = _user_segments(impressions, min_segment_users)
    glob: dict[str, float] = {}
    per_seg: dict[Segment, dict[str, float]] = {}
    for plan in registry.plans.values():
        view = plan.view
        if not isinstance(view.entity.key, str):
            continue  # composite keys (the evaluation views): online-only, no model priors
        data = _ViewData(view, tables)
        with_segments = view.entity.name == _USER
        seg_of, seg_list = _segment_index(data, segments) if with_segments else (None, [])
        for out in plan.outputs:
            result = _output_prior(view, out, data, seg_of, len(seg_list), smoothing)
            if result is None:
                continue
            g, s = result
            if g is not None:
                glob[out.name] = g
            for i, v in enumerate(s):
                if v is not None:
                    per_seg.setdefault(seg_list[i], {})[out.name] = v
    info = {"smoothing": smoothing, "min_segment_users": min_segment_users,
            "impressions": impressions.num_rows, "clicks": clicks.num_rows,
            "users_with_segment": len(segments), **(meta or {})}
    return Priors(glob, per_seg, computed_at_ms=computed_at_ms, meta=info)


def _output_prior(
    view: FeatureView,
    out: OutputPlan,
    data: _ViewData,
    seg_of: np.ndarray | None,
    n_seg: int,
    smoothing: float,
) -> tuple[float | None, list[float | None]] | None:
    feat = next(f for f in view.features for w in f.windows
                if feature_name(view.entity.name, f.name, w) == out.name)
    segs: list[float | None] = [None] * n_seg
    if out.is_ratio:
        if out.ops != (AggOp.COUNT, AggOp.COUNT):
            return None
        num_m, den_m = feat.measures
        num = data.codes_of(num_m.source)
        den = data.codes_of(den_m.source)
        if den.size == 0:
            return None
        g = num.size / den.size
        if seg_of is not None:
            ns = _per_segment(num, seg_of, n_seg)
            ds_ = _per_segment(den, seg_of, n_seg)
            segs = [float((ns[i] + smoothing * g) / (ds_[i] + smoothing)) if ds_[i] else None
                    for i in range(n_seg)]
        return g, segs
    op = out.ops[0]
    if op not in (AggOp.COUNT, AggOp.APPROX_DISTINCT):
        return None
    bucket_ms = to_ms(out.window.length) if out.window.length is not None else 0
    pairs = data.active_pairs(bucket_ms)
    if pairs.size == 0:
        return None
    pair_codes = pairs >> 32
    m = feat.measures[0]
    if op is AggOp.COUNT:
        ev = data.codes_of(m.source)
        g = ev.size / pairs.size
        if seg_of is not None:
            ev_s = _per_segment(ev, seg_of, n_seg)
            act_s = _per_segment(pair_codes, seg_of, n_seg)
            segs = [float(ev_s[i] / act_s[i]) if act_s[i] else None for i in range(n_seg)]
        return g, segs
    # APPROX_DISTINCT: distinct (pair, value) per active pair
    table = data.sources[m.source]
    assert m.field is not None
    code = data.code[m.source]
    ok = code >= 0
    vals, _ = _codes([table.column(m.field)]) if table.num_rows else ([np.zeros(0, np.int64)], [])
    v = vals[0][ok]
    packed = data._pack(m.source, bucket_ms)
    good = v >= 0
    uniq = np.unique(np.stack([packed[good], v[good]], axis=1), axis=0) if good.any() else \
        np.zeros((0, 2), np.int64)
    g = uniq.shape[0] / pairs.size
    if seg_of is not None:
        dist_s = _per_segment(uniq[:, 0] >> 32, seg_of, n_seg)
        act_s = _per_segment(pair_codes, seg_of, n_seg)
        segs = [float(dist_s[i] / act_s[i]) if act_s[i] else None for i in range(n_seg)]
    return g, segs


def read_priors_input(
    settings: CommonSettings, until_ms: int, days: float
) -> tuple[pa.Table, pa.Table]:
    """De-duplicated impressions and clicks with ``until - days <= ts < until``.

    Raises:
        OfflineStoreUnreadable: the store cannot be read.
    """
    from offline.store import OfflineStore

    store = OfflineStore.from_settings(settings)
    lo = until_ms - to_ms(timedelta(days=days))
    imps = store.read_events("impression", list(_IMP_COLS), lo, until_ms)
    clicks = store.read_events("click", list(_CLICK_COLS), lo, until_ms)
    return _ensure(imps, _IMP_COLS), _ensure(clicks, _CLICK_COLS)


def _ensure(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    if table.num_columns == 0:  # nothing in the range
        return pa.table({"ts": pa.array([], pa.int64()),
                         **{c: pa.array([], pa.string()) for c in columns}})
    return table


def build_priors(
    settings: CommonSettings,
    registry: Registry,
    *,
    until_ms: int | None = None,
    days: float = DEFAULTS["days"],
    smoothing: float = DEFAULTS["smoothing"],
    min_segment_users: int = DEFAULTS["min_segment_users"],
    clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> Priors:
    """Read the lookback from the offline store and compute the priors."""
    now = clock_ms()
    until = now if until_ms is None else until_ms
    imps, clicks = read_priors_input(settings, until, days)
    return compute_priors(
        registry, imps, clicks, smoothing=smoothing, min_segment_users=min_segment_users,
        computed_at_ms=now, meta={"until_ms": until, "days": days},
    )


def write_priors(settings: CommonSettings, priors: Priors) -> str:
    """Store the priors document at ``priors_key(prefix)``; returns the key.

    Raises:
        OnlineStoreError: Redis failed.
    """
    from headrace.core.online_store import RedisOnlineStore

    key = priors_key(settings.redis_prefix)
    store = RedisOnlineStore(settings.redis_config(), timeout_ms=5000.0)
    try:
        store.set(key, priors.to_json().encode())
    except OnlineStoreError as exc:
        raise OnlineStoreError(f"cannot write the priors to redis: {exc}") from exc
    finally:
        store.close()
    return key
