"""``ScoringService.Score``: validate, read every entity once, cold start, predict once, rank.

One request: the user (optional), every candidate's ad and campaign (deduplicated) and
the context's publisher are read with ONE pipelined round trip (every key asks for the
union of the views the model reads; a view an entity does not have answers nil), rolled
up with the shared :class:`~serving.reader.OnlineReader` (its memo included) and passed
through the same cold-start rule as ``GetOnlineFeatures``. Each candidate's row is laid
out in the booster's feature order and ALL rows are scored by ONE single-threaded
LightGBM call; candidates are ranked by eCPM = pCTR × bid_cpm × 1000 (ties keep request
order).

Failure behaviour: a malformed request raises :class:`~headrace.core.errors.InvalidArgument`
naming the field (``candidates[3].bid_cpm``); no servable model raises
:class:`ModelUnavailable` (FAILED_PRECONDITION). A failing online store is never an RPC
error: Redis errors, a read over ``redis_budget_ms`` and an open breaker (the breaker
shared with ``GetOnlineFeatures``) are answered by the champion's cold-start model from
the request context (source COLDSTART_MODEL), or, for a version without one, by the
champion on the in-process priors (source MODEL).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from feature_defs.coldstart import ColdStartRule, Priors, Tier, fallback_values
from feature_defs.layout import entity_id_problem
from feature_defs.registry import Registry
from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import HeadraceError, InvalidArgument, OnlineStoreError
from headrace.model.coldstart import context_time
from serving.breaker import CircuitBreaker
from serving.metrics import metrics
from serving.model_loader import EntityPart, ModelWatcher, ScoringModel
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.rollup import Freshness

__all__ = ["MAX_CANDIDATES", "ModelUnavailable", "ScoreInput", "ScoringMetrics",
           "scoring_metrics", "model_watcher", "ScoringService", "SCORING_SERVICE_NAME"]

SCORING_SERVICE_NAME = spb.DESCRIPTOR.services_by_name["ScoringService"].full_name

MAX_CANDIDATES = 200
_CONTEXT = ("country", "device_type", "placement", "creative_type", "publisher_id")
_REASONS = {name: pb.FallbackReason.Value(name)
            for name in ("NONE", "REDIS_ERROR", "BUDGET_EXCEEDED", "BREAKER_OPEN")}
_GLOBAL = int(Tier.GLOBAL)


class ModelUnavailable(HeadraceError):
    """No model can score (none trained yet, or the champion cannot be loaded)."""

    grpc_status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class ScoringMetrics:
    """``headrace_scoring_seconds`` (histogram by source), ``headrace_scoring_model_info``
    (gauge 1 for the served version), ``headrace_scoring_fallbacks_total`` (requests by
    reason and source), ``headrace_scoring_model_reloads_total`` (by outcome)."""

    seconds: Any
    model_info: Any
    fallbacks: Any
    reloads: Any


_lock = threading.Lock()
_metrics: ScoringMetrics | None = None
_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
            0.25, 1.0)


def scoring_metrics() -> ScoringMetrics:
    """The process-wide scoring metrics (created on first use, default registry)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = ScoringMetrics(
                seconds=Histogram("headrace_scoring_seconds",
                                  "Score latency in the server (validation to response)",
                                  ["source"], buckets=_BUCKETS),
                model_info=Gauge("headrace_scoring_model_info",
                                 "1 for the model version being served", ["version"]),
                fallbacks=Counter("headrace_scoring_fallbacks_total",
                                  "Score requests answered without online features",
                                  ["reason", "source"]),
                reloads=Counter("headrace_scoring_model_reloads_total",
                                "champion loads by outcome (ok, error)", ["outcome"]),
            )
        return _metrics


def model_watcher(models_dir: Path | str, registry: Registry,
                  poll_s: float = 2.0) -> ModelWatcher[ScoringModel]:
    """The champion watcher of a server: compiles each version for ``registry``."""
    m = scoring_metrics()

    def swapped(new: ScoringModel, old: ScoringModel | None) -> None:
        m.reloads.labels(outcome="ok").inc()
        m.model_info.labels(version=new.version).set(1)
        if old is not None and old.version != new.version:
            with contextlib.suppress(KeyError):  # another server in this process removed it
                m.model_info.remove(old.version)

    return ModelWatcher(models_dir, lambda loaded: ScoringModel.compile(loaded, registry),
                        poll_s=poll_s, on_swap=swapped,
                        on_error=lambda _msg: m.reloads.labels(outcome="error").inc())


@dataclass(frozen=True)
class ScoreInput:
    """A validated request. ``user_id``/``publisher_id`` None = absent; ``ads`` and
    ``campaigns`` are the distinct ids (first-seen order), ``*_index`` per candidate the
    position of its id among them."""

    user_id: str | None
    publisher_id: str | None
    ad_ids: list[str]
    ads: list[str]
    ad_index: np.ndarray
    campaigns: list[str]
    campaign_index: np.ndarray
    bids: np.ndarray
    as_of_ms: int
    context: dict[str, Any]  # the cold-start model's row: ts + categoricals (None = unknown)
    segment: tuple[str, str] | None


def _unknown(msg: Any, where: str) -> None:
    fields = UnknownFieldSet(msg)
    if len(fields):
        raise InvalidArgument(where, f"unknown field number {fields[0].field_number} "
                                     "(a newer client? this server does not know it)")


def _distinct(values: Sequence[str], field: str) -> tuple[list[str], np.ndarray]:
    """Distinct valid ids and each value's index among them (InvalidArgument if bad)."""
    seen: dict[str, int] = {}
    index = np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.intp)
    for value in seen:
        problem = entity_id_problem(value)
        if problem is not None:
            raise InvalidArgument(f"candidates[{values.index(value)}].{field}", problem)
    return list(seen), index


class ScoringService:
    """The request logic behind ``Score`` (no gRPC types beyond the messages).

    Args:
        registry: the feature definitions.
        reader: online reader (shared with the feature service: one memo).
        priors: the in-process priors cache.
        breaker: circuit breaker around the store (shared with the feature service).
        models: the champion watcher (see :func:`model_watcher`).
        budget_ms: time budget of the store round trip (overrun → fallback).
        max_candidates: most candidates per request.
        clock_ms: epoch milliseconds, the default request time.
        timer: monotonic seconds used to time the store (tests pin it).
    """

    def __init__(
        self,
        registry: Registry,
        reader: OnlineReader,
        priors: PriorsCache,
        breaker: CircuitBreaker,
        models: ModelWatcher[ScoringModel],
        *,
        budget_ms: float = 10.0,
        max_candidates: int = MAX_CANDIDATES,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.reader = reader
        self.priors = priors
        self.breaker = breaker
        self.models = models
        self.budget_s = budget_ms / 1000.0
        self.max_candidates = max_candidates
        self._clock_ms = clock_ms
        self._timer = timer
        self._rules: dict[tuple[str, tuple[str, ...], tuple[str, str] | None], ColdStartRule] = {}
        self._m = metrics()
        self._sm = scoring_metrics()

    # ------------------------------------------------------------------ validation
    def parse(self, request: spb.ScoreRequest) -> ScoreInput:
        """Validate ``request``. Raises InvalidArgument naming the first bad field."""
        _unknown(request, "request")
        ctx = request.context
        _unknown(ctx, "context")
        cands = request.candidates
        n = len(cands)
        if n == 0:
            raise InvalidArgument("candidates", "must not be empty")
        if n > self.max_candidates:
            raise InvalidArgument("candidates", f"{n} candidates exceed the limit of "
                                                f"{self.max_candidates}")
        for i, cand in enumerate(cands):
            _unknown(cand, f"candidates[{i}]")
        ads = [c.ad_id for c in cands]
        distinct_ads, ad_index = _distinct(ads, "ad_id")
        distinct_campaigns, campaign_index = _distinct([c.campaign_id for c in cands],
                                                       "campaign_id")
        bids = np.array([c.bid_cpm for c in cands], dtype=np.float64)
        bad = ~(np.isfinite(bids) & (bids >= 0.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidArgument(f"candidates[{i}].bid_cpm",
                                  f"must be a finite number >= 0, got {float(bids[i])}")
        user = request.user_id or None
        if user is not None and (problem := entity_id_problem(user)) is not None:
            raise InvalidArgument("user_id", problem)
        publisher = ctx.publisher_id or None
        if publisher is not None and (problem := entity_id_problem(publisher)) is not None:
            raise InvalidArgument("context.publisher_id", problem)
        if ctx.HasField("ts_ms"):
            if ctx.ts_ms < 0:
                raise InvalidArgument("context.ts_ms", "must be >= 0 (epoch milliseconds)")
            as_of = ctx.ts_ms
        else:
            as_of = self._clock_ms()
        row: dict[str, Any] = {name: getattr(ctx, name) or None for name in _CONTEXT}
        segment = (ctx.country, ctx.device_type) if ctx.country and ctx.device_type else None
        return ScoreInput(user, publisher, ads, distinct_ads, ad_index, distinct_campaigns,
                          campaign_index, bids, as_of, {**row, "ts": as_of}, segment)

    # ------------------------------------------------------------------ the method
    def score(self, request: spb.ScoreRequest) -> spb.ScoreResponse:
        """Answer one request (see the module docstring for failure behaviour)."""
        start = self._timer()
        model = self._model()
        inp = self.parse(request)
        n = len(inp.ad_ids)
        user_tier = 0
        rows, reason = self._fetch(model, inp)
        if rows is None and model.coldstart is not None:
            p = np.full(n, model.coldstart.predict_context([inp.context])[0])
            tiers = np.full(n, _GLOBAL, dtype=np.int64)
            user_tier, source = _GLOBAL, spb.COLDSTART_MODEL
        else:
            x, tiers, user_tier = self._matrix(model, inp, rows)
            p = model.predict(x)
            source = spb.MODEL
        ecpm = p * inp.bids * 1000.0
        order = np.argsort(-ecpm, kind="stable")
        ads = inp.ad_ids
        resp = spb.ScoreResponse(
            order=order.tolist(), ad_ids=[ads[i] for i in order.tolist()],
            p_ctr=p[order].tolist(), ecpm=ecpm[order].tolist(),
            tiers=tiers[order].tolist(), model_version=model.version, source=source,
            fallback_reason=_REASONS[reason], user_tier=user_tier,  # type: ignore[arg-type]
            as_of_ms=inp.as_of_ms)
        label = spb.ScoreSource.Name(source)
        if reason != "NONE":
            self._sm.fallbacks.labels(reason=reason, source=label).inc()
        self._sm.seconds.labels(source=label).observe(self._timer() - start)
        return resp

    def feature_matrix(self, request: spb.ScoreRequest) -> tuple[ScoringModel, np.ndarray]:
        """The champion and the rows it would score for ``request`` (its feature order;
        the fallback values when the store cannot answer). For benchmarks and tests."""
        model = self._model()
        inp = self.parse(request)
        return model, self._matrix(model, inp, self._fetch(model, inp)[0])[0]

    def _model(self) -> ScoringModel:
        model = self.models.current  # read ONCE per request: a swap later is not seen
        if model is None:
            raise ModelUnavailable(f"no model to score with: {self.models.problem}")
        return model

    def _fetch(self, model: ScoringModel, inp: ScoreInput
               ) -> tuple[list[list[list[bytes | None]]] | None, str]:
        """Raw states per part (one round trip), or None and the fallback reason."""
        ids = [self._ids(part, inp) for part in model.parts]
        keys = [k for part, pid in zip(model.parts, ids, strict=True)
                for k in self.reader.keys(part.entity, pid)]
        if not keys:
            return [[] for _ in model.parts], "NONE"
        breaker = self.breaker
        if not breaker.allow():
            return None, "BREAKER_OPEN"
        start = self._timer()
        try:
            rows = self.reader.store.read_hashes(keys, model.fields)
        except OnlineStoreError:
            breaker.failure()
            return None, "REDIS_ERROR"
        elapsed = self._timer() - start
        self._m.redis_seconds.observe(elapsed)
        if elapsed > self.budget_s:
            breaker.failure()
            return None, "BUDGET_EXCEEDED"
        breaker.success()
        out, lo, full = [], 0, tuple(range(len(model.fields)))
        for part, pid in zip(model.parts, ids, strict=True):
            chunk = rows[lo : lo + len(pid)]
            lo += len(pid)
            if part.field_index != full:
                chunk = [[row[j] for j in part.field_index] for row in chunk]
            out.append(chunk)
        return out, "NONE"

    @staticmethod
    def _ids(part: EntityPart, inp: ScoreInput) -> list[str]:
        """The distinct ids of ``part`` to read, in first-seen order."""
        if part.key == "ad_id":
            return inp.ads
        if part.key == "campaign_id":
            return inp.campaigns
        one = inp.user_id if part.key == "user_id" else inp.publisher_id
        return [] if one is None else [one]

    def _rule(self, part: EntityPart, priors: Priors,
              segment: tuple[str, str] | None) -> ColdStartRule:
        plan = part.plan
        key = (plan.entity, plan.names, segment if plan.entity == "user" else None)
        rule = self._rules.get(key)
        if rule is None or rule.priors is not priors:
            # without a history feature, users follow the rule of the other entities
            entity = plan.entity if plan.history is not None or plan.entity != "user" \
                else "user/no-history"
            rule = ColdStartRule(entity, plan.names, priors, key[2])
            if len(self._rules) >= 4096:
                self._rules.clear()
            self._rules[key] = rule
        return rule

    def _matrix(self, model: ScoringModel, inp: ScoreInput,
                rows: list[list[list[bytes | None]]] | None) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows in the model's feature order, per-candidate tiers and the user's tier.

        ``rows`` None: the store could not answer; every entity gets its fallback values.
        """
        n = len(inp.ad_ids)
        x = np.full((n, len(model.features)), np.nan)
        tiers = np.zeros(n, dtype=np.int64)
        user_tier = 0
        priors = self.priors.priors
        for k, part in enumerate(model.parts):
            if rows is None:
                mat, part_tiers = self._fallback_values(part, priors, inp.segment)
            else:
                mat, part_tiers = self._values(part, rows[k], priors, inp)
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
        return x, tiers, user_tier

    def _values(self, part: EntityPart, rows: list[list[bytes | None]], priors: Priors,
                inp: ScoreInput) -> tuple[np.ndarray, np.ndarray]:
        """Served values (one row per distinct id) and tiers of one part's entities."""
        apply = self._rule(part, priors, inp.segment).apply
        if not rows:  # anonymous user / no publisher: the global priors
            vals, tier, _ = apply(list(part.plan.defaults), True, False, None)
            return np.array([vals], dtype=np.float64), np.array([int(tier)])
        values, tiers = [], []
        ok, stale = Freshness.OK, Freshness.STALE
        for row in self.reader.rollup(part.plan, rows, inp.as_of_ms, False):
            fresh = row.freshness
            vals, tier, _ = apply(row.values, fresh is not ok, fresh is stale, row.history)
            values.append(vals)
            tiers.append(int(tier))
        return np.array(values, dtype=np.float64), np.array(tiers)

    @staticmethod
    def _fallback_values(part: EntityPart, priors: Priors, segment: tuple[str, str] | None
                         ) -> tuple[np.ndarray, np.ndarray]:
        plan = part.plan
        defaults = dict(zip(plan.names, plan.defaults, strict=True))
        vals, tier = fallback_values(plan.entity, defaults, priors, segment)
        return np.array([[vals[name] for name in plan.names]], dtype=np.float64), \
            np.array([int(tier)])

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

