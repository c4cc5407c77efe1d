"""The rows ``Score`` predicts on: one store round trip for every entity of a request,
roll-ups, the cold-start rule, the request's time, bids and context, in the model's
feature order.

:meth:`ScoreFeatures.read` asks the store for the raw states of the user, every
candidate's ad and campaign (deduplicated) and the publisher in ONE pipelined round
trip (every key asks for the union of the views the model reads); :meth:`ScoreFeatures.
matrix` rolls them up with the shared :class:`~serving.reader.OnlineReader` (its memo
included), applies the same cold-start rule as ``GetOnlineFeatures`` and lays each
candidate's row out in the booster's feature order. Two models with the same layout
(:func:`same_layout`) read the same raw states: a shadow prediction reuses the served
model's read.

With exploration on (:mod:`serving.exploration`), the same round trip also carries
every candidate ad's impressions and clicks (:data:`IMPRESSIONS_FEATURE`,
:data:`CLICKS_FEATURE`): :func:`counts_layout` adds the view holding them to the
fields read when the model does not read it, and the ad keys when the model reads no
ad feature; :meth:`ScoreFeatures.read_counted` returns their raw states beside the
model's rows and :meth:`ScoreFeatures.ad_counts` rolls them up per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from feature_defs.coldstart import Priors, Segment, Tier
from feature_defs.registry import Registry
from headrace.core.errors import InputError
from headrace.model.coldstart import context_time
from serving.fetch import FallbackReason, Rows, StoreFetch
from serving.model_loader import EntityPart, ScoringModel
from serving.priors import PriorsCache
from serving.reader import EntityRow, OnlineReader, ReadPlan, compile_read_plan
from serving.rollup import Freshness
from serving.rules import RuleCache, fallback_row
from serving.score_request import ScoreInput

__all__ = ["Ranked", "ScoreFeatures", "same_layout", "CountsLayout", "counts_plan",
           "counts_layout",
           "IMPRESSIONS_FEATURE", "CLICKS_FEATURE"]

#: the online features of an ad's impressions and clicks exploration reads
#: (``feature_defs/standard.py``: the ad view's 24 h counts)
IMPRESSIONS_FEATURE = "ad__impressions_24h"
CLICKS_FEATURE = "ad__clicks_24h"

_GLOBAL = int(Tier.GLOBAL)
_NO_FALLBACK = FallbackReason.NONE


@dataclass(frozen=True, slots=True)
class Ranked:
    """One model's answer on the rows: pCTR and eCPM per candidate (request order), the
    ranking (request indexes, best first), tiers, the user's tier, source and fallback
    reason (see :meth:`serving.scoring.ScoringService.rank`)."""

    p: np.ndarray
    ecpm: np.ndarray
    order: np.ndarray
    tiers: np.ndarray
    user_tier: int
    source: int
    reason: FallbackReason


def same_layout(a: ScoringModel, b: ScoringModel) -> bool:
    """Whether ``a`` and ``b`` read the same keys and fields in the same order (then
    :meth:`ScoreFeatures.read` returns the same rows for both)."""
    return a.fields == b.fields and [(p.entity, p.field_index) for p in a.parts] == [
        (p.entity, p.field_index) for p in b.parts]


@dataclass(frozen=True)
class CountsLayout:
    """Where a model's read finds the candidate ads' impressions and clicks.

    Attributes:
        plan: the read plan of :data:`IMPRESSIONS_FEATURE` and :data:`CLICKS_FEATURE`.
        fields: the fields the round trip reads: the model's, then the counts' views
            the model lacks.
        field_index: the positions of ``plan.fields`` in ``fields``.
        ad_part: index of the model's ad part (its keys carry the counts), or None: the
            ad keys are appended to the read.
        extended: ``fields`` holds views the model does not read.
        reuse: the positions of the two features among the ad part's ``plan.names``
            when the model reads both (then :meth:`ScoreFeatures.ad_counts` takes them
            from the model's own roll-up, no second decode), else None.
    """

    plan: ReadPlan
    fields: tuple[str, ...]
    field_index: tuple[int, ...]
    ad_part: int | None
    extended: bool
    reuse: tuple[int, int] | None = None


def counts_plan(registry: Registry) -> ReadPlan:
    """The read plan of :data:`IMPRESSIONS_FEATURE` and :data:`CLICKS_FEATURE`.

    Raises:
        InputError: the registry has no such feature of an entity keyed by ``ad_id``
            (exploration cannot tell new ads).
    """
    names = (IMPRESSIONS_FEATURE, CLICKS_FEATURE)
    missing = [n for n in names if n not in registry.by_feature]
    if missing:
        raise InputError(f"exploration needs the online feature(s) {', '.join(missing)} "
                         "(an ad's impressions and clicks); the feature definitions have "
                         "none")
    entity = registry.by_feature[IMPRESSIONS_FEATURE][0].view.entity.name
    if registry.entities[entity].key != "ad_id":
        raise InputError(f"exploration reads {IMPRESSIONS_FEATURE} of the ads, but its "
                         f"entity {entity!r} is not keyed by ad_id")
    return compile_read_plan(registry, entity, list(names))


def counts_layout(plan: ReadPlan, model: ScoringModel) -> CountsLayout:
    """The :class:`CountsLayout` of ``model``'s read for the counts' ``plan``
    (:func:`counts_plan`)."""
    extra = tuple(f for f in plan.fields if f not in model.fields)
    fields = model.fields + extra
    ad_part = next((i for i, part in enumerate(model.parts) if part.key == "ad_id"), None)
    reuse = None
    if ad_part is not None:
        names = model.parts[ad_part].plan.names
        if IMPRESSIONS_FEATURE in names and CLICKS_FEATURE in names:
            reuse = (names.index(IMPRESSIONS_FEATURE), names.index(CLICKS_FEATURE))
    return CountsLayout(plan, fields, tuple(fields.index(f) for f in plan.fields), ad_part,
                        bool(extra), reuse)


class ScoreFeatures:
    """Reads and lays out the rows of one ``Score`` request.

    Args:
        reader: online reader (shared with the feature service: one memo).
        priors: the in-process priors cache.
        fetch: the store round trip under the breaker and budget.
    """

    def __init__(self, reader: OnlineReader, priors: PriorsCache, fetch: StoreFetch) -> None:
        self.reader = reader
        self.priors = priors
        self.fetch = fetch
        self._rules = RuleCache()

    def read(self, model: ScoringModel, inp: ScoreInput
             ) -> tuple[list[Rows] | None, FallbackReason]:
        """Raw states of ``model``'s entities for ``inp``: one round trip.

        Returns:
            One list of rows per part of ``model`` (distinct ids, first-seen order) and
            the fallback reason; None and the reason when the store could not answer
            (an error, the budget, the open breaker).
        """
        ids = [self.ids(part, inp) for part in model.parts]
        keys = [k for part, pid in zip(model.parts, ids, strict=True)
                for k in self.reader.keys(part.entity, pid)]
        if not keys:
            return [[] for _ in model.parts], _NO_FALLBACK
        rows, reason = self.fetch.read(keys, model.fields)
        if rows is None:
            return None, reason
        out: list[Rows] = []
        lo, full = 0, tuple(range(len(model.fields)))
        for part, pid in zip(model.parts, ids, strict=True):
            chunk = rows[lo : lo + len(pid)]
            lo += len(pid)
            if part.field_index != full:
                chunk = [[row[j] for j in part.field_index] for row in chunk]
            out.append(chunk)
        return out, reason

    def read_counted(self, model: ScoringModel, inp: ScoreInput, layout: CountsLayout
                     ) -> tuple[list[Rows] | None, FallbackReason, Rows | None]:
        """:meth:`read` plus the candidate ads' count states, in the SAME round trip.

        Args:
            model: the model whose rows are read.
            inp: the validated request.
            layout: ``model``'s :func:`counts_layout`.

        Returns:
            :meth:`read`'s rows and reason, and one row per distinct ad (``inp.ads``
            order) of ``layout.plan.fields`` (none with ``layout.reuse``: the model's
            roll-up holds the counts); None for both when the store could not answer.
        """
        ids = [self.ids(part, inp) for part in model.parts]
        keys = [k for part, pid in zip(model.parts, ids, strict=True)
                for k in self.reader.keys(part.entity, pid)]
        n_model = len(keys)
        if layout.ad_part is None:
            keys += self.reader.keys(layout.plan.entity, inp.ads)
        rows, reason = self.fetch.read(keys, layout.fields)
        if rows is None:
            return None, reason, None
        out: list[Rows] = []
        lo, full = 0, tuple(range(len(layout.fields)))
        counts: Rows = []
        at = layout.field_index
        for k, (part, pid) in enumerate(zip(model.parts, ids, strict=True)):
            chunk = rows[lo : lo + len(pid)]
            lo += len(pid)
            if k == layout.ad_part and layout.reuse is None:
                counts = [[row[j] for j in at] for row in chunk]
            if part.field_index != full:
                chunk = [[row[j] for j in part.field_index] for row in chunk]
            out.append(chunk)
        if layout.ad_part is None:
            counts = [[row[j] for j in at] for row in rows[n_model:]]
        return out, reason, counts

    def ad_counts(self, layout: CountsLayout, counts: Rows, inp: ScoreInput,
                  rolled: dict[int, list[EntityRow]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate (request order), its ad's impressions and clicks as of the
        request (0 for an ad without data or with an unreadable state).

        Args:
            layout: the read's :class:`CountsLayout`.
            counts: :meth:`read_counted`'s count states.
            inp: the validated request.
            rolled: the roll-ups :meth:`matrix` kept; with ``layout.reuse``, the model's
                ad roll-up gives the counts and ``counts`` is not decoded again.
        """
        i_imp, i_clk = 0, 1
        entity_rows = None
        if layout.reuse is not None and rolled is not None and layout.ad_part in rolled:
            entity_rows = rolled[layout.ad_part]
            i_imp, i_clk = layout.reuse
        if entity_rows is None:
            if len(counts) != len(inp.ads):
                raise ValueError(f"{len(counts)} count states for {len(inp.ads)} ads (a "
                                 "reused layout needs the model's roll-ups)")
            entity_rows = self.reader.rollup(layout.plan, counts, inp.as_of_ms, False)
        imps = np.zeros(len(entity_rows))
        clicks = np.zeros(len(entity_rows))
        for i, row in enumerate(entity_rows):
            if not row.corrupt:
                imps[i] = row.values[i_imp] or 0
                clicks[i] = row.values[i_clk] or 0
        return imps[inp.ad_index], clicks[inp.ad_index]

    @staticmethod
    def ids(part: EntityPart, inp: ScoreInput) -> list[str]:
        """The distinct ids of ``part`` to read, in first-seen order."""
        if part.key == "ad_id":
            return inp.ads
        if part.key == "campaign_id":
            return inp.campaigns
        one = inp.user_id if part.key == "user_id" else inp.publisher_id
        return [] if one is None else [one]

    def matrix(self, model: ScoringModel, inp: ScoreInput, rows: list[Rows] | None,
               rolled: dict[int, list[EntityRow]] | None = None
               ) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
        """Rows in the model's feature order, per-candidate tiers, the user's tier and
        the view ids of the unreadable states met (one per entity and view).

        ``rows`` None: the store could not answer; every entity gets its fallback values.
        ``rolled``: when given, receives each part's roll-ups (part index → one
        :class:`~serving.reader.EntityRow` per entity, before the cold-start rule).
        """
        n = len(inp.ad_ids)
        x = np.full((n, len(model.features)), np.nan)
        tiers = np.zeros(n, dtype=np.int64)
        user_tier = 0
        priors = self.priors.priors
        corrupt: list[str] = []
        for k, part in enumerate(model.parts):
            if rows is None:
                mat, part_tiers = self._fallback_values(part, priors, inp.segment)
            else:
                mat, part_tiers = self._values(part, rows[k], priors, inp, corrupt,
                                               None if rolled is None else (rolled, k))
            if mat.shape[0] == 1:  # one entity for every candidate (or a fallback)
                x[:, part.columns] = mat[0]
                np.maximum(tiers, part_tiers[0], out=tiers)
            else:
                index = inp.ad_index if part.key == "ad_id" else inp.campaign_index
                x[:, part.columns] = mat[index]
                np.maximum(tiers, part_tiers[index], out=tiers)
            if part.key == "user_id":
                user_tier = int(part_tiers[0])
        tiers[tiers == 0] = _GLOBAL  # a model without entity features: nothing personal
        self._context_columns(model, inp, x)
        return x, tiers, user_tier, corrupt

    def _values(self, part: EntityPart, rows: Rows, priors: Priors, inp: ScoreInput,
                corrupt: list[str],
                keep: tuple[dict[int, list[EntityRow]], int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Served values (one row per distinct id) and tiers of one part's entities; an
        entity with an unreadable state gets its fallback values, its views are added
        to ``corrupt``."""
        apply = self._rules.rule(part.plan, priors, inp.segment).apply
        if not rows:  # anonymous user / no publisher: the global priors
            vals, tier, _ = apply(list(part.plan.defaults), True, False, None)
            return np.array([vals], dtype=np.float64), np.array([int(tier)])
        values, tiers = [], []
        ok, stale = Freshness.OK, Freshness.STALE
        rolled = self.reader.rollup(part.plan, rows, inp.as_of_ms, False)
        if keep is not None:
            keep[0][keep[1]] = rolled
        for row in rolled:
            if row.corrupt:  # unreadable bytes: the fallback values, flagged
                vals, tier = fallback_row(part.plan, priors, inp.segment)
                values.append(vals)
                tiers.append(int(tier))
                corrupt.extend(row.corrupt)
                continue
            fresh = row.freshness
            vals, tier, _ = apply(row.values, fresh is not ok, fresh is stale, row.history)
            values.append(vals)
            tiers.append(int(tier))
        return np.array(values, dtype=np.float64), np.array(tiers)

    @staticmethod
    def _fallback_values(part: EntityPart, priors: Priors, segment: Segment | None
                         ) -> tuple[np.ndarray, np.ndarray]:
        row, tier = fallback_row(part.plan, priors, segment)
        return np.array([row], dtype=np.float64), np.array([int(tier)])

    @staticmethod
    def _context_columns(model: ScoringModel, inp: ScoreInput, x: np.ndarray) -> None:
        hour_col, dow_col = model.time_columns
        if hour_col is not None or dow_col is not None:
            hour, dow = context_time(np.array([inp.as_of_ms], dtype=np.int64))
            if hour_col is not None:
                x[:, hour_col] = float(hour[0])
            if dow_col is not None:
                x[:, dow_col] = float(dow[0])
        if model.bid_column is not None:
            x[:, model.bid_column] = inp.bids
        for col, name, codes in model.categorical:
            code = codes.get(inp.context.get(name) or "")
            x[:, col] = math.nan if code is None else float(code)

