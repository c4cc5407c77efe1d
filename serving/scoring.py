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
champion on the in-process priors (source MODEL). An entity whose stored state cannot
be decoded gets its fallback values (priors) in the champion's rows, and the response
says so: source MODEL, ``fallback_reason`` CORRUPT_STATE (counted in
``headrace_serving_corrupt_states_total{view}``), never a silent cold start.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from feature_defs.coldstart import Priors, Segment, Tier
from feature_defs.registry import Registry
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import HeadraceError
from headrace.model.coldstart import context_time
from serving.breaker import CircuitBreaker
from serving.fetch import FallbackReason, Rows, StoreFetch
from serving.metrics import ServingMetrics
from serving.model_loader import EntityPart, ModelWatcher, ScoringModel
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.rollup import Freshness
from serving.rules import RuleCache, fallback_row
from serving.score_request import MAX_BID_CPM, MAX_CANDIDATES, ScoreInput, parse_score_request

__all__ = ["ModelUnavailable", "model_watcher", "ScoringService", "SCORING_SERVICE_NAME"]

SCORING_SERVICE_NAME = spb.DESCRIPTOR.services_by_name["ScoringService"].full_name

_GLOBAL = int(Tier.GLOBAL)
_NO_FALLBACK = FallbackReason.NONE


class ModelUnavailable(HeadraceError):
    """No model can score (none trained yet, or the champion cannot be loaded)."""

    grpc_status = "FAILED_PRECONDITION"


def model_watcher(models_dir: Path | str, registry: Registry, poll_s: float = 2.0,
                  metrics: ServingMetrics | None = None) -> ModelWatcher[ScoringModel]:
    """The champion watcher of a server: compiles each version for ``registry``.

    Args:
        models_dir: the model folder (``CHAMPION`` and one folder per version).
        registry: the feature definitions the versions are compiled for.
        poll_s: seconds between polls of ``CHAMPION``.
        metrics: the server's metrics (``model_reloads``, ``model_info``; default: a
            new :class:`ServingMetrics` of its own).

    Returns:
        The watcher, not started.
    """
    m = ServingMetrics() if metrics is None else metrics

    def swapped(new: ScoringModel, old: ScoringModel | None) -> None:
        m.model_reloads.labels(outcome="ok").inc()
        m.model_info.labels(version=new.version).set(1)
        if old is not None and old.version != new.version:
            with contextlib.suppress(KeyError):  # metrics shared by two watchers
                m.model_info.remove(old.version)

    return ModelWatcher(models_dir, lambda loaded: ScoringModel.compile(loaded, registry),
                        poll_s=poll_s, on_swap=swapped,
                        on_error=lambda _msg: m.model_reloads.labels(outcome="error").inc())


class ScoringService:
    """The request logic behind ``Score`` (no gRPC types beyond the messages).

    Args:
        registry: the feature definitions.
        reader: online reader (shared with the feature service: one memo).
        priors: the in-process priors cache.
        breaker: circuit breaker around the store (shared with the feature service).
        models: the champion watcher (see :func:`model_watcher`).
        budget_ms: time budget of the store round trip in milliseconds (overrun →
            fallback).
        max_candidates: most candidates per request.
        max_bid_cpm: the largest ``bid_cpm`` a candidate may carry (``HEADRACE_MAX_BID_CPM``).
        clock_ms: epoch milliseconds, the default request time.
        timer: monotonic seconds used to time the store and the request (tests pin it).
        metrics: the server's metrics (default: a new :class:`ServingMetrics` of its
            own).
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
        max_bid_cpm: float = MAX_BID_CPM,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        timer: Callable[[], float] = time.perf_counter,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.reader = reader
        self.priors = priors
        self.breaker = breaker
        self.models = models
        self.max_candidates = max_candidates
        self.max_bid_cpm = max_bid_cpm
        self.metrics = ServingMetrics() if metrics is None else metrics
        self._clock_ms = clock_ms
        self._timer = timer
        self._fetch = StoreFetch(reader.store, breaker, self.metrics, budget_ms=budget_ms,
                                 timer=timer)
        self._rules = RuleCache()

    # ------------------------------------------------------------------ validation
    def parse(self, request: spb.ScoreRequest) -> ScoreInput:
        """Validate ``request`` (see :func:`~serving.score_request.parse_score_request`).

        Raises:
            InvalidArgument: naming the first bad field.
        """
        return parse_score_request(request, max_candidates=self.max_candidates,
                                   clock_ms=self._clock_ms, max_bid_cpm=self.max_bid_cpm)

    # ------------------------------------------------------------------ the method
    def score(self, request: spb.ScoreRequest) -> spb.ScoreResponse:
        """Score and rank the candidates of one request.

        Args:
            request: the request as received.

        Returns:
            Candidates ranked by eCPM (ties keep request order) with pCTR, eCPM and
            tiers; ``source`` and ``fallback_reason`` say how the store answered (see
            the module docstring).

        Raises:
            ModelUnavailable: no servable champion.
            InvalidArgument: naming the first bad field.
        """
        start = self._timer()
        model = self._model()
        inp = self.parse(request)
        n = len(inp.ad_ids)
        user_tier = 0
        rows, reason = self._read(model, inp)
        if rows is None and model.coldstart is not None:
            p = np.full(n, model.coldstart.predict_context([inp.context])[0])
            tiers = np.full(n, _GLOBAL, dtype=np.int64)
            user_tier, source = _GLOBAL, spb.COLDSTART_MODEL
        else:
            x, tiers, user_tier, corrupt = self._matrix(model, inp, rows)
            p = model.predict(x)
            source = spb.MODEL
            if corrupt:
                reason = FallbackReason.CORRUPT_STATE
                for vid in corrupt:
                    self.metrics.corrupt_states.labels(view=vid).inc()
        ecpm = p * inp.bids * 1000.0
        order = np.argsort(-ecpm, kind="stable")
        ads = inp.ad_ids
        resp = spb.ScoreResponse(
            order=order.tolist(), ad_ids=[ads[i] for i in order.tolist()],
            p_ctr=p[order].tolist(), ecpm=ecpm[order].tolist(),
            tiers=tiers[order].tolist(), model_version=model.version, source=source,
            fallback_reason=reason, user_tier=user_tier,  # type: ignore[arg-type]
            as_of_ms=inp.as_of_ms)
        label = spb.ScoreSource.Name(source)
        if reason is not _NO_FALLBACK:
            self.metrics.score_fallbacks.labels(reason=reason.name, source=label).inc()
        self.metrics.score_seconds.labels(source=label).observe(self._timer() - start)
        return resp

    def feature_matrix(self, request: spb.ScoreRequest) -> tuple[ScoringModel, np.ndarray]:
        """The champion and the rows it would score for ``request``. For benchmarks and tests.

        Args:
            request: the request as received.

        Returns:
            The champion and one row per candidate in its feature order (the fallback
            values when the store cannot answer; the breaker and the round trip are
            counted as for :meth:`score`).

        Raises:
            ModelUnavailable: no servable champion.
            InvalidArgument: naming the first bad field.
        """
        model = self._model()
        inp = self.parse(request)
        return model, self._matrix(model, inp, self._read(model, inp)[0])[0]

    def _model(self) -> ScoringModel:
        model = self.models.current  # read ONCE per request: a swap later is not seen
        if model is None:
            raise ModelUnavailable(f"no model to score with: {self.models.problem}")
        return model

    def _read(self, model: ScoringModel, inp: ScoreInput
              ) -> tuple[list[Rows] | None, FallbackReason]:
        """Raw states per part (one round trip), or None and the fallback reason."""
        ids = [self._ids(part, inp) for part in model.parts]
        keys = [k for part, pid in zip(model.parts, ids, strict=True)
                for k in self.reader.keys(part.entity, pid)]
        if not keys:
            return [[] for _ in model.parts], _NO_FALLBACK
        rows, reason = self._fetch.read(keys, model.fields)
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

    @staticmethod
    def _ids(part: EntityPart, inp: ScoreInput) -> list[str]:
        """The distinct ids of ``part`` to read, in first-seen order."""
        if part.key == "ad_id":
            return inp.ads
        if part.key == "campaign_id":
            return inp.campaigns
        one = inp.user_id if part.key == "user_id" else inp.publisher_id
        return [] if one is None else [one]

    def _matrix(self, model: ScoringModel, inp: ScoreInput, rows: list[Rows] | None
                ) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
        """Rows in the model's feature order, per-candidate tiers, the user's tier and
        the view ids of the unreadable states met (one per entity and view).

        ``rows`` None: the store could not answer; every entity gets its fallback values.
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
                mat, part_tiers = self._values(part, rows[k], priors, inp, corrupt)
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
                corrupt: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Served values (one row per distinct id) and tiers of one part's entities; an
        entity with an unreadable state gets its fallback values, its views are added
        to ``corrupt``."""
        apply = self._rules.rule(part.plan, priors, inp.segment).apply
        if not rows:  # anonymous user / no publisher: the global priors
            vals, tier, _ = apply(list(part.plan.defaults), True, False, None)
            return np.array([vals], dtype=np.float64), np.array([int(tier)])
        values, tiers = [], []
        ok, stale = Freshness.OK, Freshness.STALE
        for row in self.reader.rollup(part.plan, rows, inp.as_of_ms, False):
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

