"""``headrace evaluate-policy`` on the real local broker: prediction records of a known
ε-greedy logger and clicks produced to Kafka, the command run in this process, its
IPS/SNIPS/DR checked against an oracle recomputed here from the raw records, and its
refusals (a greedy-only log with a differing target, no propensities, an empty range,
an unknown model)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from feature_defs.layout import TOPIC_CLICKS, TOPIC_PREDICTIONS
from feature_defs.predictions import Arm, PredictionRecord, encode_prediction
from headrace.core.settings import CommonSettings
from tests.conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

H = 3_600_000
ATTR = 30 * 60_000
ADS = ("a0", "a1", "a2")
EPS = 0.5


def _cli(ns: Namespace, *args: str) -> tuple[int, str, str]:
    from headrace.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in ns.settings_env.items()
                       if k.startswith("HEADRACE_")})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["evaluate-policy", *args, "--timeout", "10"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def _record(pid: str, ts: int, version: str, shadow: bool, p_ctr: list[float],
            ranks: list[int], chosen: int, propensity: float | None,
            policy: str | None) -> PredictionRecord:
    return PredictionRecord(pid, ts, f"u{pid}", "pub", "us", "mobile", "feed", "banner",
                            ADS, ("c0", "c1", "c2"), tuple(p_ctr), tuple(ranks), chosen,
                            Arm.CHALLENGER if shadow else Arm.CHAMPION, version, shadow,
                            1.0, None, (), propensity, False, policy)


def _ranks(scores: list[float]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for pos, i in enumerate(order):
        ranks[i] = pos
    return ranks


def _topics(ns: Namespace) -> tuple[Any, list[str]]:
    settings: CommonSettings = ns.settings()
    topics = [settings.topic(TOPIC_PREDICTIONS), settings.topic(TOPIC_CLICKS)]
    admin = AdminClient(settings.confluent_admin())
    for fut in admin.create_topics([NewTopic(t, 2, 1) for t in topics]).values():
        fut.result(timeout=10)
    return Producer(settings.confluent_producer()), topics


def _click(pid: str, ad: str, ts: int, n: int) -> bytes:
    return json.dumps({"event_id": f"k{n}", "ts": ts, "impression_id": f"i{pid}",
                       "user_id": f"u{pid}", "ad_id": ad, "campaign_id": "c" + ad[1:],
                       "publisher_id": "pub", "prediction_id": pid,
                       "model_version": "champ"}).encode()


def test_ips_snips_dr_equal_the_oracle_and_refusals(ns: Namespace) -> None:
    producer, (t_pred, t_click) = _topics(ns)
    now = time.time_ns() // 1_000_000
    t1 = now - now % H - 3 * H
    t2 = t1 + H
    rng = np.random.default_rng(3)
    served: list[PredictionRecord] = []
    shadows: dict[str, PredictionRecord] = {}
    clicks: list[tuple[str, str, int]] = []
    # 640 requests, 20 before t1 and 20 at/after t2 (outside the range); every 10th
    # request has no challenger record (coverage 0.9 of those in range)
    times = sorted([int(t) for t in rng.integers(t1, t2, 600)]
                   + [t1 - 1 - int(x) for x in rng.integers(0, 60_000, 20)]
                   + [t2 + int(x) for x in rng.integers(0, 60_000, 20)])
    true_ctr = {"a0": 0.05, "a1": 0.3, "a2": 0.15}
    for n, ts in enumerate(times):
        pid = f"p{n}"
        champ = [float(v) for v in rng.uniform(0.01, 0.2, 3)]
        chal = [float(c * m) for c, m in zip(champ, rng.uniform(0.6, 1.4, 3), strict=True)]
        champ_ranks, chal_ranks = _ranks(champ), _ranks(chal)
        greedy = champ_ranks.index(0)
        # the logger: eps-greedy, eps .5 over all 3 candidates
        shown = int(rng.integers(0, 3)) if rng.random() < EPS else greedy
        prop = (1 - EPS) * (shown == greedy) + EPS / 3
        rec = _record(pid, ts, "champ", False, champ, champ_ranks, champ_ranks[shown],
                      prop, f"eps-greedy:{EPS}")
        served.append(rec)
        producer.produce(t_pred, encode_prediction(rec), partition=n % 2, timestamp=ts)
        if n % 10:
            sh = _record(pid, ts, "chal", True, chal, chal_ranks, 0, 1.0, "greedy")
            shadows[pid] = sh
            producer.produce(t_pred, encode_prediction(sh), partition=n % 2, timestamp=ts)
        if rng.random() < true_ctr[ADS[shown]]:  # a click, sometimes after the window
            ct = ts + int(rng.integers(0, 40 * 60_000))
            clicks.append((pid, ADS[shown], ct))
        if rng.random() < 0.2:  # a click on an ad not shown first: never a reward
            clicks.append((pid, ADS[(shown + 1) % 3], ts + 1000))
    for n, (pid, ad, ct) in enumerate(sorted(clicks, key=lambda c: c[2])):
        producer.produce(t_click, _click(pid, ad, ct, n), partition=n % 2, timestamp=ct)
    producer.flush(10)

    # the oracle, from the raw records: decisions in [t1, t2) with a challenger record
    w, r, q_t, q_l = [], [], [], []
    for rec in served:
        if not t1 <= rec.ts < t2 or rec.prediction_id not in shadows:
            continue
        sh = shadows[rec.prediction_id]
        shown = list(rec.ranks).index(rec.chosen_rank)
        chal_top = list(sh.ranks).index(0)
        assert rec.propensity is not None
        w.append((1.0 if shown == chal_top else 0.0) / rec.propensity)
        r.append(1.0 if any(pid == rec.prediction_id and ad == ADS[shown]
                            and rec.ts <= ct <= rec.ts + ATTR
                            for pid, ad, ct in clicks) else 0.0)
        q_t.append(sh.p_ctr[chal_top])
        q_l.append(sh.p_ctr[shown])
    n_dec = len(w)
    ips = sum(wi * ri for wi, ri in zip(w, r, strict=True)) / n_dec
    snips = sum(wi * ri for wi, ri in zip(w, r, strict=True)) / sum(w)
    dr = sum(qt + wi * (ri - ql) for qt, wi, ri, ql in zip(q_t, w, r, q_l, strict=True)
             ) / n_dec
    ess = sum(w) ** 2 / sum(wi * wi for wi in w)

    code, out, err = _cli(ns, "--log", f"{t1}..{t2}", "--model", "chal", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["decisions"] == n_dec == 540 and rep["served"] == 600
    assert rep["coverage"] == pytest.approx(0.9)
    assert rep["logged_ctr"] == pytest.approx(sum(r) / n_dec, abs=1e-12)
    assert rep["ips"]["value"] == pytest.approx(ips, abs=1e-12)
    assert rep["snips"]["value"] == pytest.approx(snips, abs=1e-12)
    assert rep["dr"]["value"] == pytest.approx(dr, abs=1e-12)
    assert rep["ess"] == pytest.approx(ess, rel=1e-12) and rep["ess"] >= 100
    assert rep["ips"]["ci_low"] < ips < rep["ips"]["ci_high"]
    assert rep["policy"] == "greedy" and rep["model"] == "chal" and rep["clip"] is None
    assert "normal" in rep["ci_method"] and rep["support"] == 1.0
    assert rep["logged_policies"] == {f"eps-greedy:{EPS}": n_dec}

    # the logged policy itself: every weight 1, IPS = the logged CTR exactly
    code, out, err = _cli(ns, "--log", f"{t1}..{t2}", "--model", "champ", "--policy",
                          "logged", "--json")
    assert code == 0, err
    logged = json.loads(out)
    assert logged["decisions"] == 600
    assert logged["ips"]["value"] == logged["logged_ctr"] == logged["snips"]["value"]

    # refusals: an empty range, an unknown model
    code, out, err = _cli(ns, "--log", f"{t1 - 3 * H}..{t1 - 2 * H}", "--model", "chal")
    assert code == 2 and out == "" and "no served decision" in err and "empty" in err
    code, out, err = _cli(ns, "--log", f"{t1}..{t2}", "--model", "nope")
    assert code == 2 and out == "" and "unknown model nope" in err
    assert err.count("\n") == 1


def test_greedy_log_with_a_differing_target_and_no_propensities_are_refused(
        ns: Namespace) -> None:
    producer, (t_pred, _t_click) = _topics(ns)
    now = time.time_ns() // 1_000_000
    t1 = now - now % H - 3 * H
    rng = np.random.default_rng(5)
    # hour 1: a greedy-only log (propensity 1); the challenger disagrees on ~2/3
    # hour 2: the same requests logged before schema 3 (no propensity)
    for hour, prop in ((0, 1.0), (1, None)):
        for n, ts in enumerate(sorted(int(t) for t in rng.integers(0, H - 120_000, 300))):
            pid, ts = f"p{hour}-{n}", t1 + hour * H + ts
            champ = [float(v) for v in rng.uniform(0.01, 0.2, 3)]
            chal = [float(v) for v in rng.uniform(0.01, 0.2, 3)]
            for version, scores, shadow in (("champ", champ, False), ("chal", chal, True)):
                rec = _record(pid, ts, version, shadow, scores, _ranks(scores), 0, prop,
                              None if prop is None else "greedy")
                producer.produce(t_pred, encode_prediction(rec), partition=n % 2,
                                 timestamp=ts)
    producer.flush(10)
    code, out, err = _cli(ns, "--log", f"{t1}..{t1 + H}", "--model", "chal")
    assert code == 2 and out == ""
    assert "supports only" in err and "chose deterministically" in err
    assert err.count("\n") == 1
    # the champion's own greedy policy on the same log is fully supported
    code, out, err = _cli(ns, "--log", f"{t1}..{t1 + H}", "--model", "champ", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["support"] == 1.0 and rep["ess"] == pytest.approx(300)
    assert rep["ips"]["value"] == rep["logged_ctr"] == 0.0
    code, out, err = _cli(ns, "--log", f"{t1 + H}..{t1 + 2 * H}", "--model", "champ")
    assert code == 2 and out == ""
    assert "300 of 300 decisions carry no logging propensity" in err
