"""Cold start (feature_defs.coldstart) and the priors computation (offline.priors)."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from feature_defs.coldstart import (
    HISTORY_FEATURE,
    USER_WITHOUT_HISTORY,
    ColdStartRule,
    Priors,
    Status,
    Tier,
    apply_cold_start,
    apply_cold_start_columns,
    blend_weight,
    fallback_values,
    rule_entity_of,
    tier_for,
)
from feature_defs.registry import load_registry

US = ("US", "mobile")
PRIORS = Priors(
    global_values={"user__ctr_24h": 0.02, "user__impressions_7d": 40.0, "ad__ctr_1h": 0.01},
    segments={US: {"user__ctr_24h": 0.05, "user__impressions_7d": 60.0}},
    computed_at_ms=1_700_000_000_000,
)


def user(n: int | None, ctr: float | None = 0.1, clicks: int = 3) -> dict[str, Any]:
    return {"user__ctr_24h": ctr, HISTORY_FEATURE: n, "user__clicks_1h": clicks}


@pytest.mark.parametrize(
    ("history", "tier"),
    [(None, Tier.GLOBAL), (0, Tier.SEGMENT), (9, Tier.SEGMENT), (10, Tier.BLENDED),
     (55, Tier.BLENDED), (100, Tier.BLENDED), (101, Tier.PERSONALIZED)],
)
def test_tier_boundaries(history: int | None, tier: Tier) -> None:
    assert tier_for(history) is tier


def test_personalized_keeps_own_values_even_null() -> None:
    vals, tier, sts = apply_cold_start("user", user(150, ctr=None), False, PRIORS, US)
    assert tier is Tier.PERSONALIZED
    assert vals == user(150, ctr=None)
    assert set(sts.values()) == {Status.PRESENT}


def test_blended_weights_own_value_by_history() -> None:
    vals, tier, sts = apply_cold_start("user", user(55), False, PRIORS, US)
    w = (55 - 10) / 90
    assert tier is Tier.BLENDED and blend_weight(55) == w
    assert vals["user__ctr_24h"] == w * 0.1 + (1 - w) * 0.05
    assert vals[HISTORY_FEATURE] == w * 55 + (1 - w) * 60.0  # counts are blended too
    assert vals["user__clicks_1h"] == 3  # no prior: own value
    assert set(sts.values()) == {Status.PRESENT}


def test_blended_null_own_value_takes_the_prior() -> None:
    vals, _tier, sts = apply_cold_start("user", user(40, ctr=None), False, PRIORS, US)
    assert vals["user__ctr_24h"] == 0.05 and sts["user__ctr_24h"] is Status.DEFAULT


def test_blended_without_segment_blends_toward_global() -> None:
    vals, tier, _ = apply_cold_start("user", user(100), False, PRIORS, None)
    assert tier is Tier.BLENDED and vals["user__ctr_24h"] == 1.0 * 0.1 + 0.0 * 0.02


def test_segment_tier_uses_segment_prior() -> None:
    vals, tier, sts = apply_cold_start("user", user(3), False, PRIORS, US)
    assert tier is Tier.SEGMENT
    assert vals["user__ctr_24h"] == 0.05 and sts["user__ctr_24h"] is Status.DEFAULT
    assert vals["user__clicks_1h"] == 3 and sts["user__clicks_1h"] is Status.PRESENT


@pytest.mark.parametrize("segment", [None, ("FR", "tv")])
def test_unknown_segment_falls_to_global(segment: tuple[str, str] | None) -> None:
    vals, tier, _ = apply_cold_start("user", user(3), False, PRIORS, segment)
    assert tier is Tier.GLOBAL and vals["user__ctr_24h"] == 0.02


def test_anonymous_user_gets_global_even_with_known_segment() -> None:
    vals, tier, _ = apply_cold_start("user", user(None), False, PRIORS, US)
    assert tier is Tier.GLOBAL and vals["user__ctr_24h"] == 0.02


@pytest.mark.parametrize(("stale", "status"), [(False, Status.DEFAULT), (True, Status.STALE)])
def test_user_without_data_is_segment_tier(stale: bool, status: Status) -> None:
    defaults = {"user__ctr_24h": None, HISTORY_FEATURE: 0, "user__clicks_1h": 0}
    vals, tier, sts = apply_cold_start("user", defaults, True, PRIORS, US, stale=stale)
    assert tier is Tier.SEGMENT
    assert vals == {"user__ctr_24h": 0.05, HISTORY_FEATURE: 60.0, "user__clicks_1h": 0}
    assert set(sts.values()) == {status}


def test_other_entities_global_prior_only_without_data() -> None:
    own = {"ad__ctr_1h": 0.3, "ad__clicks_1h": 7}
    assert apply_cold_start("ad", own, False, PRIORS, US)[:2] == (own, Tier.PERSONALIZED)
    vals, tier, sts = apply_cold_start("ad", {"ad__ctr_1h": None, "ad__clicks_1h": 0}, True,
                                       PRIORS, US)
    assert tier is Tier.GLOBAL and vals == {"ad__ctr_1h": 0.01, "ad__clicks_1h": 0}
    assert set(sts.values()) == {Status.DEFAULT}


def test_user_history_must_be_known() -> None:
    with pytest.raises(ValueError, match=HISTORY_FEATURE):
        apply_cold_start("user", {"user__ctr_24h": 0.1}, False, PRIORS, US)
    vals, tier, _ = apply_cold_start("user", {"user__ctr_24h": 0.1}, False, PRIORS, US,
                                     history=500)
    assert tier is Tier.PERSONALIZED and vals == {"user__ctr_24h": 0.1}


def test_users_read_without_history_follow_the_rule_of_other_entities() -> None:
    assert rule_entity_of("user", has_history=False) == USER_WITHOUT_HISTORY
    assert rule_entity_of("user", has_history=True) == "user"
    assert rule_entity_of("ad", has_history=False) == "ad"
    names = ["user__ctr_24h"]
    rule = ColdStartRule(USER_WITHOUT_HISTORY, names, PRIORS, US)
    assert rule.apply([0.3], False, False, None) == ([0.3], Tier.PERSONALIZED, [Status.PRESENT])
    # without data: the global prior, never the segment one (no history to tier by)
    assert rule.apply([None], True, True, None) == ([0.02], Tier.GLOBAL, [Status.STALE])
    cols, tiers, _ = apply_cold_start_columns(
        USER_WITHOUT_HISTORY, {"user__ctr_24h": np.array([0.3, np.nan])},
        np.array([False, True]), PRIORS, ["US", "US"], ["mobile", "mobile"])
    assert cols["user__ctr_24h"].tolist() == [0.3, 0.02]
    assert tiers.tolist() == [Tier.PERSONALIZED, Tier.GLOBAL]


def test_fallback_values() -> None:
    defaults = {"user__ctr_24h": None, "user__clicks_1h": 0}
    assert fallback_values("user", defaults, PRIORS, US) == (
        {"user__ctr_24h": 0.05, "user__clicks_1h": 0},
        Tier.SEGMENT,
    )
    assert fallback_values("user", defaults, PRIORS, None)[1] is Tier.GLOBAL
    assert fallback_values("ad", {"ad__ctr_1h": None}, PRIORS, US) == (
        {"ad__ctr_1h": 0.01},
        Tier.GLOBAL,
    )


def test_priors_json_round_trip_and_immutability() -> None:
    back = Priors.from_json(PRIORS.to_json())
    assert back == PRIORS and back.segments[US]["user__ctr_24h"] == 0.05
    with pytest.raises(TypeError):
        back.global_values["x"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        back.computed_at_ms = 1  # type: ignore[misc]
    assert Priors({"a": None, "b": math.nan, "c": 1}).global_values == {  # type: ignore[dict-item]
        "c": 1.0}
    for bad in ("{}", "[]", '{"format": 2}', "not json"):
        with pytest.raises(ValueError):
            Priors.from_json(bad)


def _random_rows(rng: random.Random, entity: str, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        is_default = rng.random() < 0.2
        hist = rng.choice([None, 0, 5, 9, 10, 11, 50, 99, 100, 101, 400])
        ctr = None if rng.random() < 0.3 else rng.random()
        rows.append({
            "is_default": is_default, "stale": is_default and rng.random() < 0.5,
            "segment": rng.choice([US, ("FR", "tv"), None]),
            "values": {"user__ctr_24h": None if is_default else ctr,
                       HISTORY_FEATURE: 0 if is_default else hist,
                       "user__clicks_1h": 0 if is_default else rng.randrange(5)}
            if entity == "user" else
            {"ad__ctr_1h": None if is_default else ctr, "ad__clicks_1h": rng.randrange(5)},
        })
    return rows


@pytest.mark.parametrize("entity", ["user", "ad"])
def test_columns_variant_equals_scalar_rule(entity: str) -> None:
    rows = _random_rows(random.Random(7), entity, 500)
    names = list(rows[0]["values"])
    cols = {n: np.array([np.nan if r["values"][n] is None else r["values"][n] for r in rows],
                        dtype=np.float64) for n in names}
    out, tiers, statuses = apply_cold_start_columns(
        entity, cols, np.array([r["is_default"] for r in rows]), PRIORS,
        [r["segment"][0] if r["segment"] else None for r in rows],
        [r["segment"][1] if r["segment"] else None for r in rows],
        stale=np.array([r["stale"] for r in rows]),
    )
    for i, r in enumerate(rows):
        vals, tier, sts = apply_cold_start(entity, r["values"], r["is_default"], PRIORS,
                                           r["segment"], stale=r["stale"])
        assert tiers[i] == tier, (i, r)
        for n in names:
            got = out[n][i]
            assert (vals[n] is None and np.isnan(got)) or vals[n] == got, (i, n, r)
            assert statuses[n][i] == sts[n], (i, n, r)


# ----------------------------------------------------------------- offline priors rules
def _events() -> tuple[pa.Table, pa.Table]:
    day = 86_400_000
    t0 = 1_700_000_000_000 // day * day
    imps = []
    # u1, u2: US/mobile (u2 once DE/desktop: the modal segment wins); u3: DE/desktop
    for i, (u, c, d, ts) in enumerate([
        ("u1", "US", "mobile", t0 + 1000), ("u1", "US", "mobile", t0 + 2000),
        ("u2", "US", "mobile", t0 + 3000), ("u2", "US", "mobile", t0 + day + 5),
        ("u2", "DE", "desktop", t0 + day + 10), ("u3", "DE", "desktop", t0 + 4000),
    ]):
        imps.append({"event_id": f"i{i}", "ts": ts, "user_id": u, "ad_id": f"a{i % 2}",
                     "campaign_id": "c", "publisher_id": "p", "country": c,
                     "device_type": d})
    clicks = [{"event_id": "k0", "ts": t0 + 1500, "user_id": "u1", "ad_id": "a0",
               "campaign_id": "c", "publisher_id": "p"}]
    return pa.Table.from_pylist(imps), pa.Table.from_pylist(clicks)


def test_priors_rules_by_hand() -> None:
    from offline.priors import compute_priors

    imps, clicks = _events()
    p = compute_priors(load_registry(), imps, clicks, smoothing=10.0, min_segment_users=1)
    assert p.global_values["user__ctr_24h"] == 1 / 6
    assert p.global_values["campaign__ctr_24h"] == 1 / 6
    us = p.segments[("US", "mobile")]
    de = p.segments[("DE", "desktop")]
    assert us["user__ctr_24h"] == (1 + 10 * (1 / 6)) / (5 + 10)  # u1+u2: 5 imps, 1 click
    assert de["user__ctr_24h"] == (0 + 10 * (1 / 6)) / (1 + 10)
    # active user-days: u1 d0, u2 d0, u2 d1, u3 d0 -> 4; impressions 6
    assert p.global_values["user__impressions_24h"] == 6 / 4
    assert us["user__impressions_24h"] == 5 / 3 and de["user__impressions_24h"] == 1 / 1
    assert p.global_values["user__clicks_24h"] == 1 / 4
    # distinct ads per active user-day: u1 d0 {a0,a1}, u2 d0 {a0}, u2 d1 {a1,a0}, u3 d0 {a1}
    assert p.global_values["user__distinct_ads_24h"] == 6 / 4
    assert p.meta["users_with_segment"] == 3
    strict = compute_priors(load_registry(), imps, clicks, min_segment_users=3)
    assert strict.segments == {}


def test_priors_of_no_events_are_empty() -> None:
    from offline.priors import _CLICK_COLS, _IMP_COLS, _ensure, compute_priors

    p = compute_priors(load_registry(), _ensure(pa.table({}), _IMP_COLS),
                       _ensure(pa.table({}), _CLICK_COLS))
    assert p.global_values == {} and p.segments == {}
