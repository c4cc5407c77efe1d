"""Cold start: which values to serve for entities with little or no data. Pure, no I/O.

Shared by the online server and the offline training-set builder, so both apply the
same priors with the same rule.

The rule
--------
A user's *history* is their ``user__impressions_7d`` value (:data:`HISTORY_FEATURE`,
the roll-up as of the request; 0 when the user has no data or only stale data):

=============  ===============  ==========================================================
history n      tier             values
=============  ===============  ==========================================================
n > 100        PERSONALIZED     own values, unchanged (a null own value stays null)
10 <= n <= 100 BLENDED          ``w * own + (1 - w) * prior`` with ``w = (n - 10) / 90``;
                                null own value → prior (counts and ratios alike)
n < 10         SEGMENT          the (country, device_type) segment prior
None           GLOBAL           the global prior (anonymous traffic: no user id)
=============  ===============  ==========================================================

A user without data (no event before T, or only data beyond the TTL) has history 0:
SEGMENT. The segment comes from the request context; when it is missing, or the priors
hold no such segment, SEGMENT reads GLOBAL (the global prior) and BLENDED blends toward
the global prior (still BLENDED: it is the user's own data). Other entities (ad,
campaign, publisher) have no segment: with data they are PERSONALIZED, without data
(no event before T, or the latest older than the view TTL) they get the global prior.

A prior replaces a value only where the priors hold one for that feature; otherwise
the value in ``values`` stays (the definition's default when ``is_default``).

Statuses: PRESENT for a value computed from own data (also blended), DEFAULT for a
prior/default served because the entity has little or no data, STALE for the same when
the entity's data is beyond its TTL, FALLBACK for the serving fallback (Redis down).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Final

import numpy as np

__all__ = [
    "HISTORY_FEATURE",
    "USER_ENTITY",
    "USER_WITHOUT_HISTORY",
    "rule_entity_of",
    "PERSONALIZED_ABOVE",
    "SEGMENT_BELOW",
    "Tier",
    "Status",
    "Segment",
    "AUTO",
    "Priors",
    "tier_for",
    "blend_weight",
    "ColdStartRule",
    "apply_cold_start",
    "fallback_values",
    "apply_cold_start_columns",
]

#: the user feature whose value is the impression history deciding the tier
HISTORY_FEATURE: Final = "user__impressions_7d"
PERSONALIZED_ABOVE: Final = 100
SEGMENT_BELOW: Final = 10
#: the entity the tiers are about (segment priors and the history feature are users')
USER_ENTITY: Final = "user"
#: the rule entity of users read without :data:`HISTORY_FEATURE` (a feature selection or
#: a model without it): with no history to choose a tier from, they follow the rule of
#: the other entities (own values with data, else the global prior). Not an entity name.
USER_WITHOUT_HISTORY: Final = "user/no-history"

Segment = tuple[str, str]  # (country, device_type)


class Tier(IntEnum):
    """Cold-start tier (numbers equal the proto ``ColdStartTier`` values)."""

    PERSONALIZED = 1
    BLENDED = 2
    SEGMENT = 3
    GLOBAL = 4


class Status(IntEnum):
    """Per-value status (numbers equal the proto ``FeatureStatus`` values)."""

    PRESENT = 1
    DEFAULT = 2
    STALE = 3
    FALLBACK = 4


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = _Auto()


def _frozen(values: Mapping[str, Any]) -> Mapping[str, float]:
    # NaN is not a prior (JSON would carry it, and NaN != NaN keeps it out here)
    return MappingProxyType(
        {str(k): float(v) for k, v in values.items() if v is not None and v == v}
    )


@dataclass(frozen=True)
class Priors:
    """Prior feature values: global per feature, and per (country, device_type) segment.

    Attributes:
        global_values: feature name → prior (features without a prior are absent).
        segments: (country, device_type) → feature name → prior (user features).
        computed_at_ms: when the priors were computed (epoch ms; 0 unknown).
        meta: free-form provenance (lookback, smoothing, counts), JSON-serializable.
    """

    global_values: Mapping[str, float] = field(default_factory=dict)
    segments: Mapping[Segment, Mapping[str, float]] = field(default_factory=dict)
    computed_at_ms: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_values", _frozen(self.global_values))
        object.__setattr__(
            self,
            "segments",
            MappingProxyType({(str(c), str(d)): _frozen(v) for (c, d), v in self.segments.items()}),
        )
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def prior(self, name: str, segment: Segment | None = None) -> float | None:
        """The segment prior of ``name`` if any, else its global prior, else None."""
        if segment is not None:
            seg = self.segments.get(segment)
            if seg is not None and name in seg:
                return seg[name]
        return self.global_values.get(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "computed_at_ms": self.computed_at_ms,
                "meta": dict(self.meta),
                "global": dict(self.global_values),
                "segments": [
                    {"country": c, "device_type": d, "values": dict(v)}
                    for (c, d), v in sorted(self.segments.items())
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Priors:
        """Parse :meth:`to_json` output. Raises ValueError on anything else."""
        try:
            doc = json.loads(text)
            if doc.get("format") != 1:
                raise ValueError(f"unknown priors format {doc.get('format')!r}")
            return cls(
                global_values=doc["global"],
                segments={(s["country"], s["device_type"]): s["values"] for s in doc["segments"]},
                computed_at_ms=int(doc.get("computed_at_ms", 0)),
                meta=doc.get("meta", {}),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed priors document: {exc}") from exc


def tier_for(history: int | None) -> Tier:
    """Tier of a user with ``history`` impressions in 7 days (None: anonymous)."""
    if history is None:
        return Tier.GLOBAL
    if history > PERSONALIZED_ABOVE:
        return Tier.PERSONALIZED
    if history >= SEGMENT_BELOW:
        return Tier.BLENDED
    return Tier.SEGMENT


def rule_entity_of(entity: str, has_history: bool) -> str:
    """The entity whose cold-start rule applies to ``entity``.

    Args:
        entity: entity name (``user``, ``ad``, ...).
        has_history: the values read include the user's :data:`HISTORY_FEATURE`.

    Returns:
        :data:`USER_WITHOUT_HISTORY` for a user read without the history feature,
        else ``entity`` itself. Pass it to :class:`ColdStartRule` or
        :func:`apply_cold_start_columns`.
    """
    return USER_WITHOUT_HISTORY if entity == USER_ENTITY and not has_history else entity


def blend_weight(history: int) -> float:
    """Weight of the user's own value in the BLENDED tier: ``(n - 10) / 90``."""
    return (history - SEGMENT_BELOW) / (PERSONALIZED_ABOVE - SEGMENT_BELOW)


def _user_tier(history: int | None, is_default: bool, known: bool) -> tuple[Tier, bool]:
    """Tier of a user, and whether the segment prior applies (else the global one)."""
    tier = tier_for(history)
    if is_default and tier in (Tier.PERSONALIZED, Tier.BLENDED):
        tier = Tier.SEGMENT  # no own data to personalize or blend
    if tier is Tier.SEGMENT and not known:
        tier = Tier.GLOBAL
    return tier, known and tier is not Tier.GLOBAL


def _history_of(values: Mapping[str, Any], is_default: bool) -> int | None:
    if is_default:
        return 0
    if HISTORY_FEATURE not in values:
        raise ValueError(f"pass history= or include {HISTORY_FEATURE} in the user's values")
    n = values[HISTORY_FEATURE]
    return None if n is None else int(n)


class ColdStartRule:
    """The cold-start rule compiled for one (entity, feature names, priors, segment).

    :func:`apply_cold_start` is this class applied once; servers keep one per request
    shape and segment and call :meth:`apply` per entity (lists in ``names`` order).
    """

    __slots__ = ("entity", "names", "priors", "segment", "_user", "_known", "_p_seg",
                 "_p_glob", "_present")

    def __init__(
        self, entity: str, names: Sequence[str], priors: Priors, segment: Segment | None
    ) -> None:
        self.entity = entity
        self.names = tuple(names)
        self.priors = priors
        self.segment = segment
        self._user = entity == USER_ENTITY
        self._known = self._user and segment is not None and segment in priors.segments
        seg = segment if self._known else None
        self._p_seg = [priors.prior(n, seg) for n in self.names]
        self._p_glob = [priors.prior(n, None) for n in self.names]
        self._present = [Status.PRESENT] * len(self.names)

    def apply(
        self, values: Sequence[Any], is_default: bool, stale: bool, history: int | None
    ) -> tuple[list[Any], Tier, list[Status]]:
        """Values (in ``names`` order), tier and statuses of one entity.

        ``history`` is the user's 7-day impressions (ignored for other entities).
        The returned status list may be shared between calls: do not mutate it.
        """
        fill = Status.STALE if stale else Status.DEFAULT
        if not self._user:
            if not is_default:
                return list(values), Tier.PERSONALIZED, self._present
            vals = [v if p is None else p for v, p in zip(values, self._p_glob, strict=True)]
            return vals, Tier.GLOBAL, [fill] * len(vals)
        tier, use_segment = _user_tier(history, is_default, self._known)
        if tier is Tier.PERSONALIZED:
            return list(values), tier, self._present
        priors = self._p_seg if use_segment else self._p_glob
        out: list[Any] = []
        sts: list[Status] = []
        if tier is Tier.BLENDED:
            assert history is not None
            w = blend_weight(history)
            for own, p in zip(values, priors, strict=True):
                if p is None:
                    out.append(own)
                    sts.append(Status.PRESENT)
                elif own is None:
                    out.append(p)
                    sts.append(fill)
                else:
                    out.append(w * own + (1.0 - w) * p)
                    sts.append(Status.PRESENT)
            return out, tier, sts
        kept = fill if is_default else Status.PRESENT
        for own, p in zip(values, priors, strict=True):
            if p is None:
                out.append(own)
                sts.append(kept)
            else:
                out.append(p)
                sts.append(fill)
        return out, tier, sts


def apply_cold_start(
    entity: str,
    values: Mapping[str, Any],
    is_default: bool,
    priors: Priors,
    segment: Segment | None,
    *,
    stale: bool = False,
    history: int | None | _Auto = AUTO,
) -> tuple[dict[str, Any], Tier, dict[str, Status]]:
    """Apply the cold-start rule to one entity's rolled-up values.

    Args:
        entity: entity name (``user``, ``ad``, ...).
        values: feature name → value as rolled up (definition defaults when
            ``is_default``); None is null.
        is_default: the entity has no data as of T (or only data beyond its TTL).
        priors: the priors.
        segment: (country, device_type) of the request, or None.
        stale: ``is_default`` because the data is beyond its TTL (status STALE).
        history: a user's 7-day impressions (None: anonymous → GLOBAL); by default
            ``values[HISTORY_FEATURE]``, 0 when ``is_default``.

    Returns:
        (new values in the same order, tier, status per feature).

    Raises:
        ValueError: a user with data, ``history`` not given and not in ``values``.
    """
    hist: int | None = None
    if entity == USER_ENTITY:
        hist = _history_of(values, is_default) if isinstance(history, _Auto) else history
    rule = ColdStartRule(entity, list(values), priors, segment)
    vals, tier, sts = rule.apply(list(values.values()), is_default, stale, hist)
    return dict(zip(rule.names, vals, strict=True)), tier, dict(zip(rule.names, sts, strict=True))


def fallback_values(
    entity: str,
    defaults: Mapping[str, Any],
    priors: Priors,
    segment: Segment | None,
) -> tuple[dict[str, Any], Tier]:
    """Values served when the online store cannot answer (every status FALLBACK).

    A user gets the segment prior when the segment is known (tier SEGMENT), anything
    else the global prior (tier GLOBAL); a feature without a prior gets its definition
    default from ``defaults``.
    """
    known = entity == USER_ENTITY and segment is not None and segment in priors.segments
    seg = segment if known else None
    out = {}
    for name, default in defaults.items():
        p = priors.prior(name, seg)
        out[name] = default if p is None else p
    return out, (Tier.SEGMENT if known else Tier.GLOBAL)


def apply_cold_start_columns(
    entity: str,
    columns: Mapping[str, np.ndarray],
    is_default: np.ndarray,
    priors: Priors,
    countries: Sequence[str | None] | np.ndarray | None = None,
    device_types: Sequence[str | None] | np.ndarray | None = None,
    *,
    stale: np.ndarray | None = None,
    history: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Vectorized :func:`apply_cold_start` over rows (training sets): same rule, same floats.

    Args:
        entity: entity name.
        columns: feature name → float64 array per row, NaN for null.
        is_default: bool per row.
        priors: the priors.
        countries, device_types: request context per row (None or "" = unknown).
        stale: bool per row (default all False).
        history: per-row 7-day impressions, NaN for anonymous; by default the
            :data:`HISTORY_FEATURE` column (0 where ``is_default``).

    Returns:
        (float64 columns, int8 tier per row, int8 status column per feature).

    Raises:
        ValueError: a user frame without ``history`` and without the history column.
    """
    is_default = np.asarray(is_default, dtype=bool)
    n = is_default.shape[0]
    stale_arr = np.zeros(n, bool) if stale is None else np.asarray(stale, dtype=bool)
    fill = np.where(stale_arr, Status.STALE, Status.DEFAULT).astype(np.int8)
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    out: dict[str, np.ndarray] = {}
    statuses: dict[str, np.ndarray] = {}
    if entity != USER_ENTITY:
        tiers = np.where(is_default, Tier.GLOBAL, Tier.PERSONALIZED).astype(np.int8)
        for name, own in cols.items():
            p = priors.global_values.get(name)
            out[name] = np.where(is_default, p, own) if p is not None else own.copy()
            statuses[name] = np.where(is_default, fill, np.int8(Status.PRESENT)).astype(np.int8)
        return out, tiers, statuses
    if history is None:
        if HISTORY_FEATURE not in cols:
            raise ValueError(f"pass history= or include the {HISTORY_FEATURE} column")
        hist = np.where(is_default, 0.0, cols[HISTORY_FEATURE])
    else:
        hist = np.asarray(history, dtype=np.float64)
    anon = np.isnan(hist)
    h = np.where(anon, 0.0, hist)
    tiers = np.full(n, Tier.SEGMENT, dtype=np.int8)
    tiers[h >= SEGMENT_BELOW] = Tier.BLENDED
    tiers[h > PERSONALIZED_ABOVE] = Tier.PERSONALIZED
    tiers[anon] = Tier.GLOBAL
    tiers[is_default & ((tiers == Tier.PERSONALIZED) | (tiers == Tier.BLENDED))] = Tier.SEGMENT
    seg_ids = _segment_rows(priors, countries, device_types, n)
    known = seg_ids >= 0
    tiers[(tiers == Tier.SEGMENT) & ~known] = Tier.GLOBAL
    seg_use = known & (tiers != Tier.GLOBAL)
    blended = tiers == Tier.BLENDED
    replace = (tiers == Tier.SEGMENT) | (tiers == Tier.GLOBAL)
    w = (h - SEGMENT_BELOW) / (PERSONALIZED_ABOVE - SEGMENT_BELOW)
    own_status = np.where(is_default, fill, np.int8(Status.PRESENT)).astype(np.int8)
    seg_list = list(priors.segments.values())
    for name, own in cols.items():
        g = priors.global_values.get(name)
        prior = np.full(n, np.nan if g is None else g)
        for i, seg in enumerate(seg_list):
            if name in seg:
                prior[seg_use & (seg_ids == i)] = seg[name]
        has_p = ~np.isnan(prior)
        own_null = np.isnan(own)
        val = own.copy()
        st = np.full(n, Status.PRESENT, dtype=np.int8)
        mix = blended & has_p & ~own_null
        val[mix] = w[mix] * own[mix] + (1.0 - w[mix]) * prior[mix]
        take = (blended & has_p & own_null) | (replace & has_p)
        val[take] = prior[take]
        st[take] = fill[take]
        keep = replace & ~has_p
        st[keep] = own_status[keep]
        out[name], statuses[name] = val, st
    return out, tiers, statuses


def _segment_rows(
    priors: Priors,
    countries: Sequence[str | None] | np.ndarray | None,
    device_types: Sequence[str | None] | np.ndarray | None,
    n: int,
) -> np.ndarray:
    ids = np.full(n, -1, dtype=np.int64)
    if countries is None or device_types is None:
        return ids
    index = {seg: i for i, seg in enumerate(priors.segments)}
    for row, (c, d) in enumerate(zip(countries, device_types, strict=True)):
        if c and d:
            ids[row] = index.get((str(c), str(d)), -1)
    return ids
