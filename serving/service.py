"""``FeatureService.GetOnlineFeatures``: validate, read once, roll up, cold start, answer.

Failure behaviour: a request that is malformed raises
:class:`~headrace.core.errors.InvalidArgument` naming the field (the server interceptor
turns it into INVALID_ARGUMENT). A failing online store is never an RPC error: Redis
errors, a read slower than ``redis_budget_ms`` and an open circuit breaker all answer
from the in-process priors with status FALLBACK (``fallback_reason`` says why). An
entity whose stored state cannot be decoded is answered the same way, alone: its values
are its fallback row (status FALLBACK), the response's ``fallback_reason`` is
``CORRUPT_STATE``, the other entities are served from their states; counted in
``headrace_serving_corrupt_states_total{view}`` and, per entity, in
``headrace_serving_fallbacks_total{reason="CORRUPT_STATE"}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from feature_defs.coldstart import Priors, Segment, Status, Tier
from feature_defs.keys import id_problem
from feature_defs.layout import entity_id_problem
from feature_defs.registry import Registry
from headrace.api.v1 import features_pb2 as pb
from headrace.core.errors import InvalidArgument
from serving.breaker import CircuitBreaker
from serving.fetch import FallbackReason, StoreFetch
from serving.metrics import ServingMetrics
from serving.priors import PriorsCache
from serving.reader import AsOfTooEarly, EntityRow, OnlineReader, ReadPlan, compile_read_plan
from serving.rollup import Freshness
from serving.rules import RuleCache, fallback_row

__all__ = ["OnlineFeatureService", "ALL_FEATURES", "MAX_FEATURE_NAMES"]

ALL_FEATURES = "all"
#: the default limit of names in ``feature_names`` (duplicates included); a server whose
#: registry has more features raises it to that number
MAX_FEATURE_NAMES = 1024
_NAN = math.nan
_PLAN_CACHE_MAX = 4096


class OnlineFeatureService:
    """The request logic behind the gRPC method (no gRPC types beyond the messages).

    Args:
        registry: the feature definitions.
        reader: online reader (store + key prefix).
        priors: the in-process priors cache.
        breaker: circuit breaker around the store (shared with ``Score``).
        budget_ms: time budget of the store round trip in milliseconds (overrun →
            FALLBACK).
        max_ids: most ids per request.
        max_feature_names: most names in ``feature_names`` (duplicates included), at
            least the number of features in ``registry``.
        clock_ms: epoch milliseconds, the default as-of time.
        timer: monotonic seconds used to time the store (tests pin it).
        metrics: the server's metrics (default: a new :class:`ServingMetrics` of its
            own).
    """

    def __init__(
        self,
        registry: Registry,
        reader: OnlineReader,
        priors: PriorsCache,
        breaker: CircuitBreaker,
        *,
        budget_ms: float = 10.0,
        max_ids: int = 1000,
        max_feature_names: int = MAX_FEATURE_NAMES,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        timer: Callable[[], float] = time.perf_counter,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.reader = reader
        self.priors = priors
        self.breaker = breaker
        self.max_ids = max_ids
        self.max_feature_names = max(max_feature_names, len(registry.by_feature))
        self.metrics = ServingMetrics() if metrics is None else metrics
        self._clock_ms = clock_ms
        self._fetch = StoreFetch(reader.store, breaker, self.metrics, budget_ms=budget_ms,
                                 timer=timer)
        self._entities = {e: registry.feature_names(e) for e in sorted(registry.entities)}
        self._entity_defs = registry.entities
        self._plans: dict[tuple[str, str, tuple[str, ...] | None], ReadPlan] = {}
        self._rules = RuleCache()
        self._children: dict[tuple[str, int], Any] = {}

    def _served(self, entity: str, tier: int) -> Any:
        """The (cached) counter child of entities served by entity and tier."""
        child = self._children.get((entity, tier))
        if child is None:
            child = self.metrics.entities.labels(entity=entity, tier=Tier(tier).name)
            self._children[(entity, tier)] = child
        return child

    # ------------------------------------------------------------------ validation
    def _entity(self, entity: str) -> str:
        if entity not in self._entities:
            known = ", ".join(self._entities)
            raise InvalidArgument("entity_type", f"unknown entity {entity!r} (known: {known})")
        return entity

    def _check_ids(self, ids: Sequence[str], entity: str | None = None) -> None:
        if not ids:
            raise InvalidArgument("ids", "must not be empty")
        if len(ids) > self.max_ids:
            raise InvalidArgument("ids", f"{len(ids)} ids exceed the limit of {self.max_ids}")
        definition = self._entity_defs.get(entity) if entity is not None else None
        for i, value in enumerate(ids):
            # a composite key's id is its parts joined (feature_defs.keys)
            problem = (entity_id_problem(value) if definition is None
                       else id_problem(definition, value))
            if problem is not None:
                raise InvalidArgument(f"ids[{i}]", problem)

    def plan_for(
        self, entity: str, names: Sequence[str] | None = None, feature_set: str = ""
    ) -> ReadPlan:
        """The (cached) read plan of one request shape.

        Args:
            entity: a known entity name.
            names: the requested feature names (request order; a repeated name is
                answered once, where it first appears), or None for a set.
            feature_set: a view id or name, or ``""``/``"all"`` for every feature of
                ``entity``; used when ``names`` is None.

        Returns:
            The compiled plan, shared by every request of this shape.

        Raises:
            InvalidArgument: an unknown feature or set, a feature of another entity, an
                empty ``names`` or more than ``max_feature_names`` of them.
        """
        if names is not None and len(names) > self.max_feature_names:
            raise InvalidArgument("feature_names", f"{len(names)} names exceed the limit of "
                                                   f"{self.max_feature_names}")
        key = (entity, feature_set, None if names is None else tuple(names))
        plan = self._plans.get(key)
        if plan is None:
            resolved = (
                self._resolve_names(entity, names)
                if names is not None
                else self._resolve_set(entity, feature_set)
            )
            plan = compile_read_plan(self.registry, entity, resolved)
            if len(self._plans) >= _PLAN_CACHE_MAX:
                self._plans.clear()  # request shapes are few; this bounds a misbehaving client
            self._plans[key] = plan
        return plan

    def _resolve_names(self, entity: str, names: Sequence[str]) -> list[str]:
        if not names:
            raise InvalidArgument("feature_names", "must not be empty (omit it for all features)")
        first: dict[str, None] = {}  # first-seen order; a repeat is answered once
        for i, name in enumerate(names):
            if name in first:
                continue
            first[name] = None
            found = self.registry.by_feature.get(name)
            if found is None:
                raise InvalidArgument(f"feature_names[{i}]", f"unknown feature {name!r}")
            owner = found[0].view.entity.name
            if owner != entity:
                raise InvalidArgument(
                    f"feature_names[{i}]", f"{name!r} is a feature of {owner!r}, not {entity!r}"
                )
        return list(first)

    def _resolve_set(self, entity: str, feature_set: str) -> list[str]:
        if feature_set in ("", ALL_FEATURES):
            return self._entities[entity]
        for plan in self.registry.views_of(entity):
            if feature_set in (plan.view.id, plan.view.name):
                return plan.names
        known = [ALL_FEATURES] + [
            n for p in self.registry.views_of(entity) for n in (p.view.name, p.view.id)
        ]
        raise InvalidArgument(
            "feature_set", f"unknown feature set {feature_set!r} (known: {', '.join(known)})"
        )

    # ------------------------------------------------------------------ the method
    def get_online_features(
        self, request: pb.GetOnlineFeaturesRequest
    ) -> pb.GetOnlineFeaturesResponse:
        """Answer one request: one store round trip, roll-ups, the cold-start rule.

        Args:
            request: the request as received.

        Returns:
            Values, statuses and tiers per id in request order; status FALLBACK and a
            ``fallback_reason`` when the store could not answer, or for the entities
            whose state cannot be decoded (``CORRUPT_STATE``; see the module docstring).

        Raises:
            InvalidArgument: naming the bad field (entity, ids, features, as-of).

        A name repeated in ``feature_names`` is answered once, at its first position.
        """
        entity = self._entity(request.entity_type)
        ids = request.ids
        self._check_ids(ids, entity)
        which = request.WhichOneof("selection")
        if which == "feature_names":
            plan = self.plan_for(entity, request.feature_names.names)
        else:
            plan = self.plan_for(entity, feature_set=request.feature_set)
        explicit = request.HasField("as_of_ms")
        as_of = request.as_of_ms if explicit else self._clock_ms()
        if explicit and as_of < 0:
            raise InvalidArgument("as_of_ms", "must be >= 0 (epoch milliseconds)")
        ctx = request.context
        segment = (ctx.country, ctx.device_type) if ctx.country and ctx.device_type else None
        priors = self.priors.priors

        rows, reason = self._fetch.read(self.reader.keys(plan.entity, ids), plan.fields)
        if rows is None:
            return self._fallback(plan, ids, as_of, segment, priors, reason)
        try:
            entities = self.reader.rollup(plan, rows, as_of, explicit)
        except AsOfTooEarly as exc:
            raise InvalidArgument(
                "as_of_ms",
                f"{as_of} is before the latest applied event of ids[{exc.index}]"
                f" ({exc.max_ts}); the online store answers as of its latest event or later,"
                " earlier times are the offline store's job",
            ) from exc
        return self._answer(plan, ids, as_of, segment, priors, entities)

    def _fallback(
        self,
        plan: ReadPlan,
        ids: Sequence[str],
        as_of: int,
        segment: Segment | None,
        priors: Priors,
        reason: FallbackReason,
    ) -> pb.GetOnlineFeaturesResponse:
        row, tier = fallback_row(plan, priors, segment)
        n = len(ids)
        tiers: list[Any] = [int(tier)] * n  # proto enum fields take ints
        statuses: list[Any] = [int(Status.FALLBACK)] * (len(row) * n)
        self.metrics.fallbacks.labels(tier=tier.name, reason=reason.name).inc(n)
        self._served(plan.entity, tier).inc(n)
        return pb.GetOnlineFeaturesResponse(
            feature_names=plan.names,
            ids=ids,
            tiers=tiers,
            values=[_NAN if v is None else v for v in row] * n,
            is_null=[v is None for v in row] * n,
            statuses=statuses,
            as_of_ms=as_of,
            fallback_reason=reason,  # type: ignore[arg-type]  # proto takes the int
        )

    def _answer(
        self,
        plan: ReadPlan,
        ids: Sequence[str],
        as_of: int,
        segment: Segment | None,
        priors: Priors,
        rows: list[EntityRow],
    ) -> pb.GetOnlineFeaturesResponse:
        width = len(plan.names)
        no_nulls = [False] * width
        apply = self._rules.rule(plan, priors, segment).apply
        # proto enum fields take ints; the stubs type them as the enum wrappers
        values: list[float] = []
        nulls: list[bool] = []
        statuses: list[Any] = []
        tiers: list[Any] = []
        ok = Freshness.OK
        stale = Freshness.STALE
        corrupt: list[EntityRow] = []
        fallback: tuple[list[Any], Tier] | None = None
        for row in rows:
            if row.corrupt:  # unreadable bytes: the fallback row, flagged (no cold start)
                if fallback is None:
                    fallback = fallback_row(plan, priors, segment)
                vals, tier = fallback
                corrupt.append(row)
                tiers.append(tier)
                statuses.extend([Status.FALLBACK] * width)
                values.extend([_NAN if v is None else v for v in vals])
                nulls.extend([v is None for v in vals])
                continue
            fresh = row.freshness
            vals, tier, sts = apply(row.values, fresh is not ok, fresh is stale, row.history)
            if row.partial is not None:  # several views, some without data: say so per value
                sts = _partial_statuses(sts, row.partial)
            tiers.append(tier)
            statuses.extend(sts)
            if None in vals:
                values.extend([_NAN if v is None else v for v in vals])
                nulls.extend([v is None for v in vals])
            else:
                values.extend(vals)
                nulls.extend(no_nulls)
        counts: dict[int, int] = {}
        for t in tiers:
            counts[t] = counts.get(t, 0) + 1
        for t, count in counts.items():
            self._served(plan.entity, t).inc(count)
        reason = FallbackReason.NONE
        if fallback is not None:
            reason = FallbackReason.CORRUPT_STATE
            self._count_corrupt(corrupt, fallback[1])
        return pb.GetOnlineFeaturesResponse(
            feature_names=plan.names,
            ids=ids,
            tiers=tiers,
            values=values,
            is_null=nulls,
            statuses=statuses,
            as_of_ms=as_of,
            fallback_reason=reason,  # type: ignore[arg-type]  # proto takes the int
        )

    def _count_corrupt(self, rows: list[EntityRow], tier: Tier) -> None:
        """Count the entities answered as fallback rows for their unreadable states."""
        m = self.metrics
        m.fallbacks.labels(tier=tier.name, reason=FallbackReason.CORRUPT_STATE.name).inc(
            len(rows))
        for row in rows:
            for vid in row.corrupt:
                m.corrupt_states.labels(view=vid).inc()


def _partial_statuses(sts: list[Status], partial: tuple[Freshness, ...]) -> list[Status]:
    out = list(sts)
    for j, f in enumerate(partial):
        if f is not Freshness.OK and out[j] is Status.PRESENT:
            out[j] = Status.STALE if f is Freshness.STALE else Status.DEFAULT
    return out
