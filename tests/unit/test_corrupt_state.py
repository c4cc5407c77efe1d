"""Poison states (issue 13): an unreadable view state in the online store.

The worker dead-letters it (``headrace-dlq``, reason ``corrupt_state``, with its key,
view and bytes), counts it, resets it to empty and keeps going: the rest of the batch is
applied exactly, the reset entity holds exactly the events from that batch on (both
against the brute-force oracle); a replay after a crash publishes the record again,
never loses it, and the dead letter is durable before the junk is overwritten. Serving
answers such an entity as its fallback row, flagged ``CORRUPT_STATE`` (never a silent
cold start), in ``GetOnlineFeatures`` and ``Score``, with a metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_defs.coldstart import Priors, Status, Tier
from feature_defs.layout import entity_key, priors_key
from feature_defs.registry import load_registry
from feature_defs.state import ViewState
from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.online_store import MemoryOnlineStore, StateWrite
from headrace.model.artifact import LoadedModel
from serving.breaker import CircuitBreaker
from serving.client import OnlineFeatures, build_request, build_score_request
from serving.metrics import ServingMetrics
from serving.model_loader import ModelWatcher, ScoringModel
from serving.priors import PriorsCache
from serving.reader import OnlineReader
from serving.scoring import ScoringService
from serving.service import OnlineFeatureService
from streams.encode import encode_arrow
from streams.engine import Engine, RawMessage
from streams.sides import (
    CORRUPT_STATE,
    CORRUPT_VALUE_MAX,
    CorruptState,
    KafkaSideOutputs,
    MemorySideOutputs,
)
from tests import oracle

T0 = 1_700_000_000_000
REG = load_registry()
USER = REG.plans["user_activity@1"]
VID = USER.view.id
VIEW_OF = {p.view.entity.name: p for p in REG.plans.values()}
PREFIX = "hr"
USERS = 7
JUNK = b"\x00 junk, not a view state \xff"


# ------------------------------------------------------------------ the worker
def _events(offsets: range) -> list[dict[str, Any]]:
    """Impressions at offsets ``offsets`` of partition 0, one a second, users round robin."""
    return [{"type": "impression", "event_id": f"i{o}", "ts": T0 + o * 1000,
             "user_id": f"u{o % USERS}", "ad_id": f"a{o % 5}", "campaign_id": f"c{o % 3}",
             "publisher_id": f"p{o % 4}", "placement": "top", "creative_type": "banner",
             "device_type": "mobile", "country": "US", "bid_cpm": 1.0} for o in offsets]


def _messages(events: Sequence[dict[str, Any]]) -> list[RawMessage]:
    out = []
    for e in events:
        row = {k: v for k, v in e.items() if k != "type"}
        offset = int(e["event_id"][1:])
        out.append(RawMessage(encode_arrow("impression", [row]), [("hr-enc", b"arrow")],
                              "impressions", 0, offset, T0))
    return out


class _Parts:
    """An offline writer that keeps nothing (only ``offline_next`` matters here)."""

    def write_part(self, *_args: Any, **_kw: Any) -> None:
        pass

    def remove_orphans(self, *_args: Any, **_kw: Any) -> int:
        return 0

    def durable_end(self, *_args: Any) -> None:
        return None  # no part kept: nothing to recover


def _engine(store: MemoryOnlineStore, sides: MemorySideOutputs,
            background: bool = False) -> Engine:
    eng = Engine(registry=REG, store=store, writer=_Parts(),  # type: ignore[arg-type]
                 sides=sides, topic=lambda t: t,
                 redis_prefix=PREFIX, group="g", max_future_ms=10**13,
                 clock=lambda: T0 / 1000 + 86_400 * 30, background_writes=background)
    eng.assign([("impressions", 0)])
    return eng


def _user_key(uid: str) -> str:
    return entity_key(PREFIX, "user", uid)


def _first_run(store: MemoryOnlineStore, offsets: range, offline: bool = True
               ) -> list[dict[str, Any]]:
    """A worker that applies ``offsets`` and flushes: durable states and progress (the
    offline part too, unless not ``offline``: a restart then replays from 0)."""
    events = _events(offsets)
    eng = _engine(store, MemorySideOutputs())
    eng.on_messages(_messages(events))
    eng.flush_online()
    if offline:
        eng.flush_offline()
    eng.close()
    return events


def _corrupted(sides: MemorySideOutputs) -> list[CorruptState]:
    return [d for d in sides.dead if isinstance(d, CorruptState)]


def _corrupt_count(eng: Engine) -> float:
    got = eng.metrics.registry.get_sample_value("headrace_corrupt_states_total", {"view": VID})
    return 0.0 if got is None else got


def _user_values(store: MemoryOnlineStore, uid: str, at: int) -> dict[str, Any]:
    return ViewState.decode(USER, store.hashes[_user_key(uid)][VID]).rollup(at)[0]


def test_an_unreadable_state_is_dead_lettered_reset_and_the_batch_applied(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryOnlineStore()
    first = _first_run(store, range(0, 21))
    key = _user_key("u1")
    store.hset(key, VID, JUNK)  # junk over u1's field between two workers' runs
    second = _events(range(21, 42))
    sides = MemorySideOutputs()
    eng = _engine(store, sides)  # a restart: u1 is not cached, its next event loads it
    assert eng.resume_offsets() == {("impressions", 0): 21}
    with caplog.at_level(logging.WARNING, logger="streams.state_cache"):
        eng.on_messages(_messages(second))  # no exception: the stream keeps flowing
    [dl] = _corrupted(sides)
    assert (dl.key, dl.view, dl.value) == (key, VID, JUNK)
    assert dl.reason.startswith(f"{CORRUPT_STATE}: malformed view state")
    assert _corrupt_count(eng) == 1 and eng.views.cache.quarantined == 1
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert key in warning.getMessage() and VID in warning.getMessage()
    eng.flush_online()
    eng.close()
    assert sides.flushes >= 1
    assert store.commits[next(iter(store.commits))]["online_next"] == 42
    at = T0 + 42_000 + 1
    for n in range(USERS):
        uid = f"u{n}"
        # the reset entity: only the events from the batch that found the junk on;
        # every other entity: everything
        applied = second if uid == "u1" else first + second
        assert _user_values(store, uid, at) == oracle.features_as_of(applied, "user", uid, at), uid
    assert _user_values(store, "u1", at) != oracle.features_as_of(first + second, "user", "u1", at)


def test_a_replay_after_a_crash_publishes_again_and_loses_nothing() -> None:
    store = MemoryOnlineStore()
    _first_run(store, range(0, 14))
    key = _user_key("u3")
    store.hset(key, VID, JUNK)
    second = _events(range(14, 28))
    crashed_sides = MemorySideOutputs()
    crashed = _engine(store, crashed_sides)
    crashed.on_messages(_messages(second))  # dead-lettered, then killed before any flush
    assert store.hashes[key][VID] == JUNK  # nothing overwritten
    sides = MemorySideOutputs()
    replay = _engine(store, sides)
    assert replay.resume_offsets() == {("impressions", 0): 14}
    replay.on_messages(_messages(second))
    replay.flush_online()
    replay.close()
    # the record is published twice, identically (deduplicate on key, view, digest)
    [a], [b] = _corrupted(crashed_sides), _corrupted(sides)
    assert a == b and a.headers() == b.headers()
    assert store.hashes[key][VID] != JUNK  # overwritten by the reset state's write
    at = T0 + 28_000 + 1
    assert _user_values(store, "u3", at) == oracle.features_as_of(second, "user", "u3", at)
    later = MemorySideOutputs()
    again = _engine(store, later)  # the junk is gone: nothing more to quarantine
    again.on_messages(_messages(_events(range(28, 35))))
    again.flush_online()
    again.close()
    assert _corrupted(later) == [] and _corrupt_count(again) == 0


def test_a_replay_from_behind_the_reset_applies_the_replayed_events_once() -> None:
    """A worker resumes at the smaller of the online and offline progress: events it
    replays reach a reset state (it has no fences), each once; the others skip them."""
    store = MemoryOnlineStore()
    first = _first_run(store, range(0, 21), offline=False)  # offline_next stays 0
    store.hset(_user_key("u1"), VID, JUNK)
    sides = MemorySideOutputs()
    eng = _engine(store, sides)
    assert eng.resume_offsets() == {("impressions", 0): 0}
    second = _events(range(21, 42))
    eng.on_messages(_messages(first + second))
    eng.flush_online()
    eng.close()
    assert len(_corrupted(sides)) == 1
    at = T0 + 42_000 + 1
    for n in range(USERS):
        uid = f"u{n}"
        assert _user_values(store, uid, at) == oracle.features_as_of(
            first + second, "user", uid, at), uid


class _LoggingSides(MemorySideOutputs):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def dead_letter(self, dl: Any) -> None:
        super().dead_letter(dl)
        self.log.append("dead letter")

    def flush(self) -> None:
        super().flush()
        self.log.append("sides flushed")


class _LoggingStore(MemoryOnlineStore):
    def __init__(self, log: list[str], key: str) -> None:
        super().__init__()
        self.log, self.key = log, key

    def write(self, states: Sequence[StateWrite],
              commits: Mapping[str, Mapping[str, int]]) -> None:
        if any(w.key == self.key for w in states):
            self.log.append("junk overwritten")
        super().write(states, commits)


@pytest.mark.parametrize("background", [False, True])
def test_the_dead_letter_is_durable_before_the_junk_is_overwritten(background: bool) -> None:
    log: list[str] = []
    key = _user_key("u2")
    store = _LoggingStore(log, key)
    _first_run(store, range(0, 14))
    store.hset(key, VID, JUNK)
    log.clear()
    eng = _engine(store, _LoggingSides(log), background=background)
    eng.on_messages(_messages(_events(range(14, 28))))
    eng.flush_online(wait=not background)
    eng.close()
    first = log.index("dead letter")
    assert log.index("sides flushed", first) < log.index("junk overwritten")


def test_a_reset_state_is_written_even_without_new_changes() -> None:
    """The reset state is dirty by itself: the junk is overwritten by the next flush."""
    store = MemoryOnlineStore()
    key = _user_key("u9")
    store.hset(key, VID, JUNK)
    sides = MemorySideOutputs()
    eng = _engine(store, sides)
    [state] = eng.views.cache.get(USER, ["u9"])
    assert state.max_ts == ViewState(USER).max_ts and "u9" in eng.views.dirty[VID]
    eng.flush_online()
    assert ViewState.decode(USER, store.hashes[key][VID]).max_ts == state.max_ts
    assert len(_corrupted(sides)) == 1


def test_corrupt_state_headers_and_a_value_over_the_message_limit() -> None:
    big = b"\x07" * (CORRUPT_VALUE_MAX + 10)
    cs = CorruptState(key="hr:user:{u1}", view=VID, error="malformed view state: x", value=big)
    h = dict(cs.headers())
    assert h["hr-reason"] == b"corrupt_state: malformed view state: x"
    assert (h["hr-state-key"], h["hr-state-view"]) == (b"hr:user:{u1}", VID.encode())
    assert h["hr-state-bytes"] == str(len(big)).encode() and len(h["hr-state-xxh64"]) == 16
    assert (h["hr-source-topic"], h["hr-source-partition"], h["hr-source-offset"],
            h["hr-index"]) == (b"", b"-1", b"-1", b"-1")  # no source message
    assert cs.payload() == big[:CORRUPT_VALUE_MAX] and cs.code == CORRUPT_STATE
    sides = KafkaSideOutputs.__new__(KafkaSideOutputs)
    sides._topic = lambda t: f"p.{t}"
    sent: list[Any] = []
    sides._produce = lambda topic, value, headers=None, partition=None, key=None: sent.append(
        (topic, value, headers, key))
    sides.dead_letter(cs)
    assert sent == [("p.headrace-dlq", big[:CORRUPT_VALUE_MAX], cs.headers(), b"hr:user:{u1}")]


# ------------------------------------------------------------------ serving
def _serving_events() -> list[dict[str, Any]]:
    out = []
    for i in range(800):  # > 100 impressions per user: personalized
        u = i % 4
        out.append({"type": "click" if i % 9 == 0 else "impression", "event_id": f"e{i}",
                    "ts": T0 - (800 - i) * 60_000, "user_id": f"u{u}", "ad_id": f"a{i % 3}",
                    "campaign_id": f"c{i % 2}", "publisher_id": "p0"})
    return out


EVENTS = _serving_events()
PRIORS = Priors(global_values={"user__ctr_24h": 0.02, "ad__ctr_24h": 0.03},
                segments={("US", "mobile"): {"user__ctr_24h": 0.05}})
AT = T0 + 1


def _store() -> MemoryOnlineStore:
    store = MemoryOnlineStore()
    states: dict[tuple[str, str], ViewState] = {}
    for e in EVENTS:
        for entity, key in oracle.ENTITY_KEYS.items():
            st = states.setdefault((entity, e[key]), ViewState(VIEW_OF[entity]))
            st.apply(oracle.TOPIC_OF[e["type"]], e["ts"], e)
    for (entity, eid), st in states.items():
        store.hset(entity_key(PREFIX, entity, eid), VIEW_OF[entity].view.id, st.encode())
    store.set(priors_key(PREFIX), PRIORS.to_json())
    return store


def _truncated() -> bytes:
    st = ViewState(USER)
    st.apply("impressions", T0, {"ad_id": "a0"})
    return st.encode()[:-5]


BAD = {"junk": JUNK, "format 1": b"\x01garbage", "truncated": _truncated()}


def _feature_service(store: MemoryOnlineStore) -> OnlineFeatureService:
    metrics = ServingMetrics()
    cache = PriorsCache(store, PREFIX, metrics=metrics)
    cache.refresh()
    return OnlineFeatureService(REG, OnlineReader(store, PREFIX), cache,
                                CircuitBreaker(failures=2, reset_s=1.0), max_ids=5,
                                clock_ms=lambda: AT, metrics=metrics)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("order", ["definition", "reversed"])  # direct and general paths
def test_get_features_flags_an_unreadable_state(bad: str, order: str) -> None:
    store = _store()
    store.hset(_user_key("u1"), VID, BAD[bad])
    svc = _feature_service(store)
    names = REG.feature_names("user")
    if order == "reversed":
        names = names[::-1]
    req = build_request("user", ["u0", "u1", "u2"], names, country="US", device_type="mobile")
    resp = svc.get_online_features(req)
    assert resp.fallback_reason == pb.CORRUPT_STATE
    got = OnlineFeatures.from_pb("user", resp)
    u0, u1, u2 = got.entities
    # the corrupt entity: its fallback row (the segment prior, else the default), FALLBACK
    assert set(u1.statuses.values()) == {"FALLBACK"} and u1.tier == "SEGMENT"
    want = {n: (0.05 if n == "user__ctr_24h" else oracle.defaults("user")[n]) for n in names}
    assert u1.values == want
    # the others: their own values, as without the junk
    for ent in (u0, u2):
        assert set(ent.statuses.values()) == {"PRESENT"} and ent.tier == "PERSONALIZED"
        assert ent.values == pytest.approx(oracle.features_as_of(EVENTS, "user", ent.id, AT))
    m = svc.metrics
    assert m.value("headrace_serving_corrupt_states_total", view=VID) == 1
    assert m.value("headrace_serving_fallbacks_total", tier="SEGMENT",
                   reason="CORRUPT_STATE") == 1
    served = {t.name: m.value("headrace_serving_entities_total", entity="user", tier=t.name)
              for t in Tier}
    assert served == {"PERSONALIZED": 2, "BLENDED": 0, "SEGMENT": 1, "GLOBAL": 0}
    # a request without the corrupt entity is a normal answer
    clean = svc.get_online_features(build_request("user", ["u0"], names))
    assert clean.fallback_reason == pb.NONE
    assert set(clean.statuses) == {Status.PRESENT}


def test_get_features_never_answers_a_corrupt_state_as_a_cold_start() -> None:
    store = _store()
    store.hset(entity_key(PREFIX, "ad", "a1"), VIEW_OF["ad"].view.id, JUNK)
    svc = _feature_service(store)
    corrupt = svc.get_online_features(build_request("ad", ["a1"]))
    cold = svc.get_online_features(build_request("ad", ["never-seen"]))
    assert (corrupt.fallback_reason, cold.fallback_reason) == (pb.CORRUPT_STATE, pb.NONE)
    assert set(corrupt.statuses) == {Status.FALLBACK} and set(cold.statuses) == {Status.DEFAULT}
    assert list(corrupt.tiers) == [Tier.GLOBAL]


class _Booster:
    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def predict(self, x: np.ndarray, **_kw: Any) -> np.ndarray:
        self.calls.append(np.array(x))
        return np.full(x.shape[0], 0.01)


def _scoring(store: MemoryOnlineStore, tmp: Path, booster: _Booster) -> ScoringService:
    metrics = ServingMetrics()
    cache = PriorsCache(store, PREFIX, metrics=metrics)
    cache.refresh()
    model = LoadedModel("v1", booster, ("user__ctr_24h", "ad__ctr_24h", "user__clicks_24h"), {})
    watcher: ModelWatcher[ScoringModel] = ModelWatcher(
        tmp, lambda m: ScoringModel.compile(m, REG), load=lambda _d, _v: model)
    (tmp / "CHAMPION").write_text("v1\n")
    watcher.refresh()
    return ScoringService(REG, OnlineReader(store, PREFIX), cache,
                          CircuitBreaker(failures=2, reset_s=1.0), watcher,
                          clock_ms=lambda: AT, metrics=metrics)


def _score_request(user: str) -> spb.ScoreRequest:
    cands = [{"ad_id": a, "campaign_id": "c0", "bid_cpm": 1.0} for a in ("a0", "a1")]
    return build_score_request(user, cands, {"country": "US", "device_type": "mobile",
                                             "ts_ms": AT})


def _own(entity: str, eid: str, name: str) -> Any:
    return oracle.features_as_of(EVENTS, entity, eid, AT)[name]


@pytest.mark.parametrize("bad", list(BAD))
def test_score_flags_an_unreadable_user_state(tmp_path: Path, bad: str) -> None:
    store = _store()
    store.hset(_user_key("u1"), VID, BAD[bad])
    booster = _Booster()
    svc = _scoring(store, tmp_path, booster)
    resp = svc.score(_score_request("u1"))
    assert resp.source == spb.MODEL and resp.fallback_reason == pb.CORRUPT_STATE
    assert resp.user_tier == pb.SEGMENT
    x = booster.calls[-1]
    # the user's columns: its fallback values (segment prior, default 0 for clicks)
    assert x[:, 0].tolist() == [0.05, 0.05] and x[:, 2].tolist() == [0.0, 0.0]
    assert x[:, 1].tolist() == pytest.approx([_own("ad", "a0", "ad__ctr_24h"),
                                              _own("ad", "a1", "ad__ctr_24h")])
    m = svc.metrics
    assert m.value("headrace_serving_corrupt_states_total", view=VID) == 1
    assert m.value("headrace_scoring_fallbacks_total", reason="CORRUPT_STATE",
                   source="MODEL") == 1
    assert svc.score(_score_request("u0")).fallback_reason == pb.NONE


def test_score_flags_an_unreadable_candidate_state(tmp_path: Path) -> None:
    store = _store()
    ad = VIEW_OF["ad"].view.id
    store.hset(entity_key(PREFIX, "ad", "a1"), ad, JUNK)
    booster = _Booster()
    svc = _scoring(store, tmp_path, booster)
    resp = svc.score(_score_request("u0"))
    assert resp.source == spb.MODEL and resp.fallback_reason == pb.CORRUPT_STATE
    x = booster.calls[-1]
    assert x[0, 1] == pytest.approx(_own("ad", "a0", "ad__ctr_24h"))
    assert x[1, 1] == 0.03  # the ad's global prior
    assert list(resp.tiers)[list(resp.order).index(1)] == pb.GLOBAL
    assert not math.isnan(x[0, 0]) and x[0, 0] == pytest.approx(
        _own("user", "u0", "user__ctr_24h"))
    assert svc.metrics.value("headrace_serving_corrupt_states_total", view=ad) == 1
