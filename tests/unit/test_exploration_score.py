"""Exploration wired into ScoringService.Score on the fake online store: exploration off
answers and logs as a greedy server; ε-greedy and Thompson answers, their records and
metrics; the ads' counts read in the same round trip (against the brute-force oracle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.coldstart import Priors
from feature_defs.layout import priors_key
from feature_defs.predictions import PredictionRecord
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.online_store import MemoryOnlineStore
from headrace.model.artifact import LoadedModel
from headrace.rollout.split import SplitState
from serving.breaker import CircuitBreaker
from serving.exploration import Exploration, ExploreBudget, ExploreConfig, MemoryBudgetCounter
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.prediction_log import MemoryPredictionLog
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.score_features import counts_layout, counts_plan
from serving.scoring import ScoringService
from serving.split import AppliedSplit, StaticSplit
from tests.unit.test_scoring import (
    EVENTS,
    PREFIX,
    REG,
    T0,
    FakeBooster,
    Timer,
    expected,
    load_store,
    request,
)

AS_OF = T0 + 1
#: pCTR from the ad's 24 h clicks (column 0) and the bid (column 1): distinct per ad
FEATURES_AD = ("ad__clicks_24h", "bid_cpm")
FEATURES_USER = ("user__ctr_24h", "bid_cpm")  # no ad feature: the counts need the ad keys
FEATURES_BOTH = ("ad__clicks_24h", "bid_cpm", "ad__impressions_24h")  # reads both counts


def p_of(x: np.ndarray) -> np.ndarray:
    return 0.01 + 0.001 * np.nan_to_num(x[:, 0])


class Failing:
    def predict(self, x: np.ndarray, **_kw: Any) -> np.ndarray:
        if len(x) > 1:  # the warm-up's one row passes
            raise ValueError("broken booster")
        return np.full(len(x), 0.01)


def build(tmp: Path, store: MemoryOnlineStore, features: tuple[str, ...] = FEATURES_AD, *,
          explore: ExploreConfig | None = None, budget: float | None = None,
          prior_ctr: float | None = 0.02, challenger: Any = None, share: float = 0.0,
          shadow: bool = False) -> tuple[ScoringService, MemoryPredictionLog]:
    store.set(priors_key(PREFIX), Priors(
        global_values={} if prior_ctr is None else {"ad__ctr_24h": prior_ctr}).to_json())
    metrics = ServingMetrics()
    cache = PriorsCache(store, PREFIX, metrics=metrics)
    cache.refresh()
    models = {"v1": LoadedModel("v1", FakeBooster(p_of), features, {}),
              "v2": LoadedModel("v2", challenger or FakeBooster(p_of), features, {})}
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, lambda m: ScoringModel.compile(m, REG), load=lambda _d, v: models[v])
    (tmp / "CHAMPION").write_text("v1\n")
    watcher.refresh()
    log = MemoryPredictionLog()
    exp = None
    if explore is not None:
        exp = Exploration(explore, ExploreBudget(explore.budget if budget is None else budget,
                                                 MemoryBudgetCounter(), "t"))
    timer = Timer()
    split = StaticSplit()
    if challenger is not None:
        split.current = AppliedSplit(SplitState(3, "r-1", "v1", "v2", share, shadow, 1, 1),
                                     watcher.load("v2"), share, shadow, "r-1", "applied")
    svc = ScoringService(REG, OnlineReader(store, PREFIX), cache,
                         CircuitBreaker(failures=2, reset_s=1.0, clock=timer), watcher,
                         budget_ms=10.0, clock_ms=lambda: AS_OF, timer=timer, metrics=metrics,
                         predictions=log, explore=exp, split=split)
    return svc, log


CANDS = [("a0", "c0", 2.0), ("a1", "c1", 1.0), ("zz", "c0", 3.0), ("a2", "c2", 0.5),
         ("a3", "c1", 5.0), ("a4", "c2", 1.0), ("a5", "c0", 1.5)]


def greedy_order(cands: list[tuple[str, str, float]]) -> list[int]:
    """The oracle's ranking: eCPM from the oracle's ad clicks, ties in request order."""
    ecpm = [(0.01 + 0.001 * expected(EVENTS, "ad", a, AS_OF)["ad__clicks_24h"]) * b
            for a, _, b in cands]
    return sorted(range(len(cands)), key=lambda i: (-ecpm[i], i))


def req(user: str | None, cands: list[tuple[str, str, float]], rid: str
        ) -> spb.ScoreRequest:
    r = request(user, cands, ts_ms=AS_OF)
    r.request_id = rid
    return r


def score(svc: ScoringService, i: int, user: str | None = "u1") -> spb.ScoreResponse:
    return svc.score(req(user, CANDS, f"req-{i}"))


def test_exploration_off_answers_greedily_and_logs_propensity_one(tmp_path: Path) -> None:
    svc, log = build(tmp_path, load_store(EVENTS))
    want = greedy_order(CANDS)
    for i, user in enumerate(("u1", None, "nobody")):
        resp = score(svc, i, user)
        assert list(resp.order) == want
        rec = log.records[-1]
        assert (rec.propensity, rec.explored, rec.policy) == (1.0, False, "greedy")
        assert rec.chosen_rank == 0 and list(rec.ranks)[want[0]] == 0
    assert svc.metrics.value("headrace_scoring_explore_total", policy="greedy",
                             outcome="ineligible") == 0  # off: not counted at all


def test_eps_greedy_serves_the_draw_first_and_logs_its_exact_propensity(tmp_path: Path
                                                                        ) -> None:
    """ε = 1 (every eligible request draws uniformly): the served first candidate is the
    draw, the rest in greedy order; the record keeps the model's ranking, the shown
    candidate's greedy rank, propensity 1/K and the policy label."""
    svc, log = build(tmp_path, load_store(EVENTS), explore=ExploreConfig(
        "eps-greedy", epsilon=1.0, budget=0.6, seed=5))
    want = greedy_order(CANDS)
    k = len(CANDS)
    outcomes: dict[str, int] = {}
    for i in range(60):
        resp = score(svc, i)
        first = int(resp.order[0])
        rec: PredictionRecord = log.records[-1]
        assert list(resp.order) == [first] + [j for j in want if j != first]
        assert list(resp.ad_ids) == [CANDS[j][0] for j in resp.order]
        assert list(rec.ranks) == [want.index(j) for j in range(k)]  # the model's ranking
        assert rec.chosen_rank == want.index(first)
        assert rec.policy == "eps-greedy:1" and rec.explored == (first != want[0])
        if rec.explored:
            assert rec.propensity == pytest.approx(1 / k)
        else:  # the draw hit the greedy one (1/K), or the budget said no (greedy, 1.0)
            assert first == want[0]
            assert rec.propensity == pytest.approx(1 / k) or rec.propensity == 1.0
        outcome = ("explored" if rec.explored else "budget_exhausted"
                   if rec.propensity == 1.0 else "greedy")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    m = svc.metrics
    for outcome, n in outcomes.items():
        assert m.value("headrace_scoring_explore_total", policy="eps-greedy:1",
                       outcome=outcome) == n
    assert outcomes["explored"] > 20 and outcomes["budget_exhausted"] > 5  # 60 % of answers
    assert m.value("headrace_scoring_explore_share") == pytest.approx(
        outcomes["explored"] / 60)


def test_known_ads_and_users_are_ineligible(tmp_path: Path) -> None:
    """A threshold of 1 impression: every candidate ad of ours has some (``zz`` none, so
    it is left out) and the heaviest user is PERSONALIZED: nothing explores."""
    heavy = max({e["user_id"] for e in EVENTS},
                key=lambda u: sum(e["user_id"] == u for e in EVENTS))
    cands = [c for c in CANDS if c[0] != "zz"]
    assert all(expected(EVENTS, "ad", a, AS_OF)["ad__impressions_24h"] >= 1 for a, _, _ in cands)
    svc, log = build(tmp_path, load_store(EVENTS), ("user__impressions_7d", "ad__clicks_24h",
                                                    "bid_cpm"),
                     explore=ExploreConfig("eps-greedy", epsilon=1.0, new_ad_impressions=1))
    for i in range(5):
        svc.score(req(heavy, cands, f"k{i}"))
        assert log.records[-1].propensity == 1.0 and not log.records[-1].explored
    assert svc.metrics.value("headrace_scoring_explore_total", policy="eps-greedy:1",
                             outcome="ineligible") == 5


@pytest.mark.parametrize("features", [FEATURES_AD, FEATURES_USER, FEATURES_BOTH])
def test_ad_counts_come_in_the_same_round_trip(tmp_path: Path, features: tuple[str, ...]
                                               ) -> None:
    """With or without ad features in the model, one round trip per Score, and the
    counts per candidate equal the oracle's ``ad__impressions_24h``/``ad__clicks_24h``,
    decoded again or, when the model reads both, taken from its own roll-up."""
    store = load_store(EVENTS)
    svc, _ = build(tmp_path, store, features, explore=ExploreConfig("thompson", seed=1))
    model = svc.models.current
    assert model is not None
    layout = counts_layout(counts_plan(REG), model)
    assert (layout.ad_part is None) == (features == FEATURES_USER)
    assert (layout.reuse is not None) == (features == FEATURES_BOTH)
    inp = svc.parse(request("u1", CANDS, ts_ms=AS_OF))
    before = store.calls
    rows, _reason, ad_rows = svc.features.read_counted(model, inp, layout)
    assert store.calls == before + 1 and rows is not None and ad_rows is not None
    rolled: dict[int, list[Any]] = {}
    svc.features.matrix(model, inp, rows, rolled)
    if layout.reuse is not None:
        assert ad_rows == []  # not extracted: the model's roll-up has them
        with pytest.raises(ValueError, match="0 count states for 7 ads"):
            svc.features.ad_counts(layout, ad_rows, inp)
    for kept in (rolled,) if layout.reuse else (None, rolled):
        imps, clicks = svc.features.ad_counts(layout, ad_rows, inp, kept)
        for i, (ad, _, _) in enumerate(CANDS):
            want = expected(EVENTS, "ad", ad, AS_OF)
            assert imps[i] == want["ad__impressions_24h"]
            assert clicks[i] == want["ad__clicks_24h"]
    # the model's own rows are what a plain read gives
    assert rows == svc.features.read(model, inp)[0]
    before = store.calls
    score(svc, 0)
    assert store.calls == before + 1


def test_thompson_answers_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    def run(seed: int, where: Path) -> list[tuple[list[int], float, bool]]:
        where.mkdir()
        svc, log = build(where, load_store(EVENTS), explore=ExploreConfig(
            "thompson", seed=seed, budget=0.6, draws=64, prior_strength=20.0))
        out: list[tuple[list[int], float, bool]] = []
        for i in range(40):
            resp = score(svc, i)
            rec = log.records[-1]
            assert rec.policy == "thompson:v1"
            assert rec.propensity is not None and 0 < rec.propensity <= 1
            assert rec.explored == (rec.chosen_rank != 0)
            out.append((list(resp.order), rec.propensity, rec.explored))
        return out

    a = run(9, tmp_path / "a")
    assert a == run(9, tmp_path / "b")
    assert a != run(10, tmp_path / "c")
    assert any(explored for _, _, explored in a)


def test_a_store_failure_is_not_explored(tmp_path: Path) -> None:
    store = load_store(EVENTS)
    svc, log = build(tmp_path, store, explore=ExploreConfig("eps-greedy", epsilon=1.0))
    store.fail = "down"
    resp = score(svc, 0)
    assert resp.source == spb.MODEL  # no cold-start model: the priors
    rec = log.records[-1]
    assert (rec.propensity, rec.explored) == (1.0, False)
    assert svc.metrics.value("headrace_scoring_explore_total", policy="eps-greedy:1",
                             outcome="ineligible") == 1


def test_the_challenger_explores_and_shadows_log_their_greedy_choice(tmp_path: Path) -> None:
    """100 % challenger (p = 2x the champion's): it explores the same way; in shadow
    mode (0 % challenger) the champion explores and the challenger's shadow records say
    greedy, propensity 1.0, and its rank of the candidate the answer put first."""
    cfg = ExploreConfig("eps-greedy", epsilon=1.0, budget=0.5, seed=2)
    (tmp_path / "a").mkdir()
    svc, log = build(tmp_path / "a", load_store(EVENTS), explore=cfg,
                     challenger=FakeBooster(lambda x: 2 * p_of(x)), share=1.0)
    for i in range(20):
        assert score(svc, i).arm == spb.CHALLENGER
    assert any(r.explored for r in log.records)
    assert all(r.model_version == "v2" and r.policy == "eps-greedy:1" for r in log.records)
    (tmp_path / "b").mkdir()
    svc, log = build(tmp_path / "b", load_store(EVENTS), explore=cfg,
                     challenger=FakeBooster(lambda x: 2 * p_of(x)), shadow=True)
    svc.shadow.start()
    try:
        for i in range(20):
            score(svc, i)
    finally:
        svc.shadow.stop()
    served = {r.prediction_id: r for r in log.records if not r.shadow}
    shadows = [r for r in log.records if r.shadow]
    assert len(shadows) == 20 and any(r.explored for r in served.values())
    want = greedy_order(CANDS)
    for rec in shadows:
        assert (rec.propensity, rec.explored, rec.policy) == (1.0, False, "greedy")
        first = list(served[rec.prediction_id].ranks).index(
            served[rec.prediction_id].chosen_rank)  # the candidate served first
        assert rec.chosen_rank == want.index(first)  # same ranking (2x the pCTR)


def test_an_error_record_has_no_propensity(tmp_path: Path) -> None:
    svc, log = build(tmp_path, load_store(EVENTS), explore=ExploreConfig("eps-greedy"),
                     challenger=Failing(), share=1.0)
    assert score(svc, 0).arm == spb.CHAMPION  # the challenger raised
    err = [r for r in log.records if r.error is not None]
    assert len(err) == 1 and err[0].propensity is None and err[0].policy is None
    ok = [r for r in log.records if r.error is None]
    assert len(ok) == 1 and ok[0].propensity is not None
