"""``ScoringService.Score``: validate, pick the split arm, read every entity once, cold
start, predict once, rank, log.

One request: the user (optional), every candidate's ad and campaign (deduplicated) and
the context's publisher are read with ONE pipelined round trip and laid out in the
booster's feature order (:class:`~serving.score_features.ScoreFeatures`); ALL rows are
scored by ONE single-threaded LightGBM call; candidates are ranked by eCPM = pCTR ×
bid_cpm × 1000 (ties keep request order).

Traffic split (:mod:`serving.split`): the champion is the server's ``CHAMPION`` model;
a loaded challenger answers iff :func:`~headrace.rollout.split.assign` puts the unit
(user id, else request id, else the generated prediction id) in its share; ``arm`` and
``model_version`` say which did. In shadow mode the challenger also scores the
champion's requests off the response path (:class:`~serving.offpath.OffPath`: a full
queue drops, ``headrace_scoring_shadow_total{outcome="dropped"}``). Every answer and
shadow prediction goes to the prediction log (:mod:`serving.prediction_log`), with the
feature row the model scored for its top candidate (one row copied out of the scored
matrix on the RPC path, converted to a list when encoded off it; empty for an error or a
cold-start answer), and, in a rollout, is counted per arm
(:mod:`serving.rollout_counts`; shadows are not).

Failure behaviour: a malformed request raises :class:`~headrace.core.errors.InvalidArgument`
naming the field (``candidates[3].bid_cpm``, ``request_id``); no servable model raises
:class:`ModelUnavailable` (FAILED_PRECONDITION); a prediction that raises is
:class:`ModelPredictError` (INTERNAL) for the champion, while a challenger's is logged
(with its error, arm CHALLENGER) and the champion answers. A failing online store is
never an RPC error: Redis errors, a read over ``redis_budget_ms`` and an open breaker
(the breaker shared with ``GetOnlineFeatures``) are answered by the model's cold-start
model from the request context (source COLDSTART_MODEL), or, for a version without
one, by the model on the in-process priors (source MODEL). An entity whose stored state
cannot be decoded gets its fallback values (priors) in the rows, and the response says
so: source MODEL, ``fallback_reason`` CORRUPT_STATE (counted in
``headrace_serving_corrupt_states_total{view}``), never a silent cold start.

Exploration (:mod:`serving.exploration`, ``HEADRACE_EXPLORE``; off by default): the
served arm's ranking is computed as above, then the policy may give the first slot to
another candidate (the rest keep the greedy order). The candidate ads' impressions and
clicks come in the same round trip (:meth:`~serving.score_features.ScoreFeatures.
read_counted`). Every served record carries ``propensity`` (of the candidate shown
first), ``explored`` and ``policy``; its ``ranks`` stay the model's ranking, so
``chosen_rank`` is the greedy rank of the candidate shown first (not 0 when explored)
and ``features`` the model's top-ranked row. Exploration off: propensity 1.0, policy
``greedy`` and the answer of a greedy server. Shadow records: the challenger's greedy
ranking, propensity 1.0, policy ``greedy``. Error records: null.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_defs.coldstart import Tier
from feature_defs.predictions import Arm, PredictionRecord
from feature_defs.registry import Registry
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import HeadraceError
from headrace.model.booster import lightgbm
from headrace.rollout.split import assign
from serving.breaker import CircuitBreaker
from serving.exploration import (
    GREEDY,
    OUTCOMES,
    PRIOR_CTR_FEATURE,
    Decision,
    Exploration,
    decide,
    is_eligible,
    request_rng,
    served_order,
)
from serving.faults import ChallengerFaults
from serving.fetch import FallbackReason, Rows, StoreFetch
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.offpath import OffPath
from serving.prediction_log import PredictionSink
from serving.priors import PriorsCache
from serving.reader import EntityRow, OnlineReader
from serving.rollout_counts import CountsAccumulator
from serving.score_features import (
    CountsLayout,
    Ranked,
    ScoreFeatures,
    counts_layout,
    counts_plan,
    same_layout,
)
from serving.score_request import MAX_BID_CPM, MAX_CANDIDATES, ScoreInput, parse_score_request
from serving.split import SplitSource, StaticSplit

__all__ = ["ModelUnavailable", "ModelPredictError", "model_watcher", "ScoringService",
           "SCORING_SERVICE_NAME"]

SCORING_SERVICE_NAME = spb.DESCRIPTOR.services_by_name["ScoringService"].full_name

_GLOBAL = int(Tier.GLOBAL)
_NO_FALLBACK = FallbackReason.NONE
_ARM_PB = {Arm.CHAMPION: spb.CHAMPION, Arm.CHALLENGER: spb.CHALLENGER}


class ModelUnavailable(HeadraceError):
    """No model can score (none trained yet, or the champion cannot be loaded)."""

    grpc_status = "FAILED_PRECONDITION"


class ModelPredictError(HeadraceError):
    """A loaded model raised while predicting (LightGBM, or rows it cannot take)."""

    grpc_status = "INTERNAL"


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
        The watcher, not started; its :meth:`~serving.model_loader.ModelWatcher.load`
        loads the split's challenger the same way.
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


@dataclass(frozen=True, slots=True)
class _ShadowJob:
    challenger: ScoringModel
    served: ScoringModel
    inp: ScoreInput
    rows: list[Rows] | None
    reason: FallbackReason
    prediction_id: str
    top: int  # request index of the served answer's first candidate


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
        split: the applied traffic split (default: none, 100 % champion; a server
            passes its :class:`~serving.split.SplitWatcher`).
        predictions: the prediction log (default: none).
        shadow_queue: most shadow predictions waiting (more are dropped, counted).
        counts: the rollout's per-arm counts, flushed by the split watcher (default: none).
        faults: injected challenger faults (:mod:`serving.faults`, a simulation aid;
            default: none).
        explore: the deployment's exploration (:func:`serving.exploration.exploration`;
            default: none, greedy). Its budget is flushed by a thread started and
            stopped with the service.

    Raises:
        InputError: ``explore`` is set but the feature definitions have no ad
            impressions and clicks (``ad__impressions_24h``, ``ad__clicks_24h``).
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
        split: SplitSource | None = None,
        predictions: PredictionSink | None = None,
        shadow_queue: int = 256,
        counts: CountsAccumulator | None = None,
        faults: ChallengerFaults | None = None,
        explore: Exploration | None = None,
    ) -> None:
        self.registry = registry
        self.reader = reader
        self.priors = priors
        self.breaker = breaker
        self.models = models
        self.max_candidates = max_candidates
        self.max_bid_cpm = max_bid_cpm
        self.metrics = m = ServingMetrics() if metrics is None else metrics
        self.split: SplitSource = StaticSplit() if split is None else split
        self.predictions = predictions
        self.counts = counts
        self.faults = faults
        self._clock_ms = clock_ms
        self._timer = timer
        self.features = ScoreFeatures(reader, priors, StoreFetch(
            reader.store, breaker, m, budget_ms=budget_ms, timer=timer))
        self._predict_errors = (ValueError, TypeError, lightgbm().basic.LightGBMError)
        self._arms = {a: m.score_arms.labels(arm=a.value) for a in Arm}
        self._id_prefix = secrets.token_hex(6)  # this process's prediction ids
        self._ids = itertools.count()
        self.shadow: OffPath[_ShadowJob] = OffPath(
            "shadow-score", self._shadow_score, maxsize=shadow_queue,
            on_drop=m.shadow.labels(outcome="dropped").inc)
        self.explore = explore
        self._layouts: dict[str, CountsLayout] = {}  # per model version (immutable)
        if explore is not None:
            self._counts_plan = counts_plan(registry)  # InputError without ad counts
            self._label = label = explore.config.label
            self._outcomes = {o: m.explore.labels(policy=label, outcome=o) for o in OUTCOMES}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Load the champion, then the split (and its challenger), then start the
        prediction log and the shadow thread."""
        self.models.start()
        self.split.start()
        if self.predictions is not None:
            self.predictions.start()
        self.shadow.start()
        if self.explore is not None:
            self.explore.budget.start()

    def stop(self) -> None:
        """Stop polling, finish (briefly) the shadow queue and the log, stop the watcher."""
        self.split.stop()
        if self.explore is not None:
            self.explore.budget.stop()
        self.shadow.stop(1.0)
        if self.predictions is not None:
            self.predictions.stop()
        self.models.stop()

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
            tiers; ``source`` and ``fallback_reason`` say how the store answered,
            ``arm``/``model_version`` which model did, ``prediction_id`` the answer's
            key in the prediction log (see the module docstring).

        Raises:
            ModelUnavailable: no servable champion.
            ModelPredictError: the champion raised while predicting.
            InvalidArgument: naming the first bad field.
        """
        start = self._timer()
        champion = self._model()
        inp = self.parse(request)
        split = self.split.current  # read ONCE per request, like the champion
        pid = inp.request_id or f"{self._id_prefix}-{next(self._ids):x}"
        model, arm = champion, Arm.CHAMPION
        challenger = split.challenger
        if challenger is not None and split.share > 0.0 and assign(
                split.rollout_id, inp.user_id or pid, split.share):
            model, arm = challenger, Arm.CHALLENGER
        counts = self.counts if split.state is not None and split.state.challenger else None
        ad_rows: Rows | None = None
        rolled: dict[int, list[EntityRow]] | None = None
        if self.explore is None:
            rows, reason = self.features.read(model, inp)
        else:  # the ads' impressions and clicks in the same round trip
            rows, reason, ad_rows = self.features.read_counted(model, inp, self._layout(model))
            rolled = {}  # the model's roll-ups, whose ad counts exploration reuses
        try:
            if self.faults is not None and arm is Arm.CHALLENGER:
                injected = self.faults.before_predict(model.version)
                if injected is not None:
                    raise ModelPredictError(injected)
            ranked, x = self._rank(model, inp, rows, reason, rolled=rolled)
        except ModelPredictError as exc:
            self.metrics.predict_errors.labels(arm=arm.value).inc()
            self._log_error(model, arm, inp, pid, start, exc)
            if counts is not None:  # the challenger's error; the champion's answer below
                counts.record(split.rollout_id, model.version, inp.publisher_id, error=True)
            if arm is Arm.CHAMPION:
                raise
            if not same_layout(champion, model):
                rows, reason = self.features.read(champion, inp)
            model, arm = champion, Arm.CHAMPION  # the challenger failed: the champion answers
            if rolled is not None:
                rolled = {}
            ranked, x = self._rank(model, inp, rows, reason, rolled=rolled)
            challenger = None  # and is not asked again as a shadow
        decision = None if self.explore is None else self._explore(
            model, inp, ranked, ad_rows, rolled, pid)
        order = ranked.order if decision is None else served_order(ranked.order,
                                                                   decision.first)
        ads = inp.ad_ids
        resp = spb.ScoreResponse(
            order=order.tolist(), ad_ids=[ads[i] for i in order.tolist()],
            p_ctr=ranked.p[order].tolist(), ecpm=ranked.ecpm[order].tolist(),
            tiers=ranked.tiers[order].tolist(), model_version=model.version,
            source=ranked.source,  # type: ignore[arg-type]  # proto enums take ints
            fallback_reason=ranked.reason,  # type: ignore[arg-type]
            user_tier=ranked.user_tier,  # type: ignore[arg-type]
            as_of_ms=inp.as_of_ms, arm=_ARM_PB[arm], prediction_id=pid)
        label = spb.ScoreSource.Name(ranked.source)
        if ranked.reason is not _NO_FALLBACK:
            self.metrics.score_fallbacks.labels(reason=ranked.reason.name, source=label).inc()
        self._arms[arm].inc()
        elapsed = self._timer() - start
        self.metrics.score_seconds.labels(source=label).observe(elapsed)
        if counts is not None:
            counts.record(split.rollout_id, model.version, inp.publisher_id,
                          elapsed * 1000.0, ranked.p)
        if self.predictions is not None:
            if decision is None:
                record = self._record(pid, inp, model, arm, ranked, elapsed, 0,
                                      row=_top_row(x, ranked), propensity=1.0, policy=GREEDY)
            else:
                record = self._record(pid, inp, model, arm, ranked, elapsed, None,
                                      top=decision.first, row=_top_row(x, ranked),
                                      propensity=decision.propensity,
                                      explored=decision.explored, policy=self._label)
            self.predictions.log(record)
        if split.shadow and challenger is not None and arm is Arm.CHAMPION:
            self.shadow.offer(_ShadowJob(challenger, model, inp, rows, reason, pid,
                                         int(order[0])))
        return resp

    def rank(self, model: ScoringModel, inp: ScoreInput, rows: list[Rows] | None,
             reason: FallbackReason, *, count: bool = True) -> Ranked:
        """``model``'s answer on ``rows`` (:meth:`ScoreFeatures.read`'s result).

        Args:
            model: the model to predict with.
            inp: the validated request.
            rows: the raw states, None when the store could not answer.
            reason: the read's fallback reason.
            count: count unreadable states in the metrics (False for a shadow
                prediction, whose rows the served one counted).

        Raises:
            ModelPredictError: the model raised.
        """
        return self._rank(model, inp, rows, reason, count=count)[0]

    def _rank(self, model: ScoringModel, inp: ScoreInput, rows: list[Rows] | None,
              reason: FallbackReason, *, count: bool = True,
              rolled: dict[int, list[EntityRow]] | None = None
              ) -> tuple[Ranked, np.ndarray | None]:
        """:meth:`rank`'s answer and the matrix the booster scored (None: the cold-start
        model answered from the context); ``rolled`` receives the roll-ups (see
        :meth:`ScoreFeatures.matrix`)."""
        n = len(inp.ad_ids)
        x: np.ndarray | None = None
        user_tier = 0
        if rows is None and model.coldstart is not None:
            try:
                value = model.coldstart.predict_context([inp.context])[0]
            except self._predict_errors as exc:
                raise ModelPredictError(f"cold-start model of {model.version} cannot "
                                        f"predict: {exc}") from exc
            p = np.full(n, value)
            tiers = np.full(n, _GLOBAL, dtype=np.int64)
            user_tier, source = _GLOBAL, spb.COLDSTART_MODEL
        else:
            x, tiers, user_tier, corrupt = self.features.matrix(model, inp, rows, rolled)
            try:
                p = model.predict(x)
            except self._predict_errors as exc:
                raise ModelPredictError(f"model {model.version} cannot predict: {exc}") from exc
            source = spb.MODEL
            if corrupt:
                reason = FallbackReason.CORRUPT_STATE
                if count:
                    for vid in corrupt:
                        self.metrics.corrupt_states.labels(view=vid).inc()
        ecpm = p * inp.bids * 1000.0
        return Ranked(p, ecpm, np.argsort(-ecpm, kind="stable"), tiers, user_tier, source,
                      reason), x

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
        return model, self.features.matrix(model, inp, self.features.read(model, inp)[0])[0]

    def _layout(self, model: ScoringModel) -> CountsLayout:
        layout = self._layouts.get(model.version)
        if layout is None:  # once per version; a race computes the same value twice
            layout = self._layouts[model.version] = counts_layout(self._counts_plan, model)
        return layout

    def _explore(self, model: ScoringModel, inp: ScoreInput, ranked: Ranked,
                 ad_rows: list[list[bytes | None]] | None,
                 rolled: dict[int, list[EntityRow]] | None, pid: str) -> Decision:
        """Who takes the first slot of ``ranked`` (see :mod:`serving.exploration`):
        ineligible, over budget, or the policy's draw; counted in the budget and the
        metrics."""
        assert self.explore is not None
        cfg, budget = self.explore.config, self.explore.budget
        greedy = int(ranked.order[0])
        imps = clicks = None
        if ad_rows is not None and ranked.source == spb.MODEL:
            imps, clicks = self.features.ad_counts(self._layout(model), ad_rows, inp, rolled)
        if imps is None or clicks is None or not is_eligible(imps, ranked.user_tier,
                                                             cfg.new_ad_impressions):
            budget.count(False)
            decision = Decision(greedy, 1.0, False, "ineligible")
        elif not budget.try_reserve():
            decision = Decision(greedy, 1.0, False, "budget_exhausted")
        else:
            prior = self.priors.priors.prior(PRIOR_CTR_FEATURE)
            prior_ctr = ranked.p if prior is None else np.full(len(ranked.p), prior)
            decision = decide(cfg, request_rng(cfg.seed, pid), greedy, ranked.p, inp.bids,
                              imps, clicks, prior_ctr, ranked.user_tier)
            budget.settle(decision.explored)
        self._outcomes[decision.outcome].inc()
        self.metrics.explore_share.set(budget.share)
        return decision

    def _model(self) -> ScoringModel:
        model = self.models.current  # read ONCE per request: a swap later is not seen
        if model is None:
            raise ModelUnavailable(f"no model to score with: {self.models.problem}")
        return model

    # ------------------------------------------------------------------ shadow and log
    def _shadow_score(self, job: _ShadowJob) -> None:
        """The challenger's prediction of a request the champion served (shadow thread)."""
        start = self._timer()
        rows, reason = job.rows, job.reason
        if not same_layout(job.served, job.challenger):
            rows, reason = self.features.read(job.challenger, job.inp)
        try:
            ranked, x = self._rank(job.challenger, job.inp, rows, reason, count=False)
        except ModelPredictError as exc:
            self.metrics.shadow.labels(outcome="error").inc()
            self.metrics.predict_errors.labels(arm=Arm.CHALLENGER.value).inc()
            self._log_error(job.challenger, Arm.CHALLENGER, job.inp, job.prediction_id,
                            start, exc, shadow=True)
            return
        self.metrics.shadow.labels(outcome="scored").inc()
        if self.predictions is not None:
            record = self._record(job.prediction_id, job.inp, job.challenger, Arm.CHALLENGER,
                                  ranked, self._timer() - start, None, shadow=True, top=job.top,
                                  row=_top_row(x, ranked), propensity=1.0, policy=GREEDY)
            self.predictions.log(record)

    def _record(self, pid: str, inp: ScoreInput, model: ScoringModel, arm: Arm,
                ranked: Ranked | None, elapsed_s: float, chosen: int | None, *,
                shadow: bool = False, top: int = 0, error: str | None = None,
                row: np.ndarray | tuple[()] = (), propensity: float | None = None,
                explored: bool = False, policy: str | None = None) -> PredictionRecord:
        """The log record of one prediction (``ranked`` None: it failed with ``error``;
        ``chosen`` None: this model's rank of the request's candidate ``top``; ``row``:
        the model's feature row of its first-ranked candidate, see :func:`_top_row`;
        ``propensity``, ``explored``, ``policy``: the exploration's, see the module
        docstring)."""
        ranks: np.ndarray | tuple[()] = ()
        if ranked is not None:
            n = len(inp.ad_ids)
            ranks = np.empty(n, dtype=np.int64)
            ranks[ranked.order] = np.arange(n)
            if chosen is None:
                chosen = int(ranks[top])
        ctx = inp.context
        return PredictionRecord(
            pid, inp.as_of_ms, inp.user_id, inp.publisher_id, ctx["country"],
            ctx["device_type"], ctx["placement"], ctx["creative_type"], inp.ad_ids,
            inp.campaign_ids, () if ranked is None else ranked.p, ranks, chosen, arm,
            model.version, shadow, elapsed_s * 1000.0, error, row, propensity, explored,
            policy)

    def _log_error(self, model: ScoringModel, arm: Arm, inp: ScoreInput, pid: str,
                   start: float, exc: ModelPredictError, *, shadow: bool = False) -> None:
        if self.predictions is not None:
            self.predictions.log(self._record(pid, inp, model, arm, None,
                                              self._timer() - start, None, shadow=shadow,
                                              error=str(exc)))


def _top_row(x: np.ndarray | None, ranked: Ranked) -> np.ndarray | tuple[()]:
    """The row of ``x`` of the candidate ``ranked`` put first, as its own small array;
    empty when the cold-start model answered (no matrix).

    A copy of one row (``len(features)`` doubles, well under a microsecond), not a view:
    a view would keep the request's whole ``candidates x features`` matrix alive while
    the record waits in the log's buffer (10,000 records x 100 candidates x 50 features
    would hold ~400 MB when Kafka is away). The list conversion happens off the RPC
    path, when the record is encoded.
    """
    if x is None or not len(ranked.order):
        return ()
    return x[int(ranked.order[0])].copy()
