"""The simulated world of ``headrace simulate rollout``: ads with known true CTRs, the
requests an ad server sends, and the small LightGBM versions that score them.

True click probability of ad ``a`` shown on device ``d``: ``ctr[a] * DEVICE_LIFT[d]``
(base CTRs lognormal around 6 %, clipped to 1–30 %; a higher base than production so
that phases of seconds hold enough clicks to judge). A request has a user, a device,
a country and a publisher, and :data:`CANDIDATES` distinct ads with bids uniform in
1–3 CPM. The models (trained here on synthetic rows, never on the stream):

* champion: ``bid_cpm``, ``device_type`` and the ad's online ``ad__impressions_24h``
  (which says nothing of its CTR: it cannot tell ads apart and shows the highest bid;
  reading it makes both arms pay the same online read);
* ``good``: adds the ad's online ``ad__ctr_24h`` and ``ad__impressions_24h`` (computed
  by the stream worker from the simulated impressions and clicks); trained on rows whose
  ``ad__ctr_24h`` is a binomial estimate from ``ad__impressions_24h`` impressions, so its
  prediction is calibrated given what it sees, and it ranks by true CTR × bid;
* ``constant``: one leaf, the same pCTR for every candidate;
* ``miscalibrated``: the good model trained with every positive weighted 2 (its odds
  doubled: pCTR ≈ ×1.9 at these CTRs);
* ``errors`` / ``slow``: the good model, with the server's challenger fault injection
  (:mod:`serving.faults`) failing 1 % of its predictions / adding 20 ms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from headrace.model.artifact import write_artifact

__all__ = ["World", "DEVICES", "DEVICE_LIFT", "CANDIDATES", "CHALLENGER_FEATURES",
           "CHAMPION_FEATURES", "DRIFT_FEATURES", "COUNTRIES", "train_version"]

DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
DEVICE_SHARE: tuple[float, ...] = (0.6, 0.3, 0.1)
DEVICE_LIFT: dict[str, float] = {"mobile": 1.0, "desktop": 0.8, "tablet": 0.9}
COUNTRIES: tuple[str, ...] = ("US", "DE", "BR")
PUBLISHERS: tuple[str, ...] = ("p1", "p2", "p3", "p4")
CANDIDATES = 6
#: the champion reads the ad's online impressions too (no CTR signal in them): both arms
#: then pay the same online read per request, and their latencies compare fairly
CHAMPION_FEATURES: tuple[str, ...] = ("ad__impressions_24h", "bid_cpm", "device_type")
CHALLENGER_FEATURES: tuple[str, ...] = ("ad__ctr_24h", "ad__impressions_24h", "bid_cpm",
                                        "device_type")
#: ``headrace simulate drift``'s champion: nothing that grows with the run (a count would
#: drift by itself), and the country the simulation shifts
DRIFT_FEATURES: tuple[str, ...] = ("bid_cpm", "device_type", "country")
_MEAN_LIFT = float(np.dot(DEVICE_SHARE, [DEVICE_LIFT[d] for d in DEVICES]))


class World:
    """Ads, campaigns, users and their true CTRs (deterministic for a seed).

    Args:
        seed: the world's seed.
        ads: number of ads.
        users: number of users.
        base_ctr: the median base CTR.
    """

    def __init__(self, seed: int = 0, ads: int = 60, users: int = 2000,
                 base_ctr: float = 0.06) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        #: the requests' country shares (None: uniform) and each country's CTR lift;
        #: ``headrace simulate drift`` moves both mid-run (:meth:`shift_country`)
        self.country_share: np.ndarray | None = None
        self.country_lift: dict[str, float] = dict.fromkeys(COUNTRIES, 1.0)
        self.ads = [f"sa{i:03d}" for i in range(ads)]
        self.campaigns = [f"sc{i % 12:02d}" for i in range(ads)]
        self.ctr = np.clip(base_ctr * rng.lognormal(0.0, 0.6, ads), 0.01, 0.30)
        self.users = [f"su{i:05d}" for i in range(users)]

    def true_p(self, ad: int, device: str, country: str | None = None) -> float:
        """The true click probability of ad index ``ad`` on ``device`` (in ``country``:
        times its lift, 1 unless :meth:`shift_country` moved it; at most 1)."""
        lift = 1.0 if country is None else self.country_lift[country]
        return min(float(self.ctr[ad] * DEVICE_LIFT[device]) * lift, 1.0)

    def shift_country(self, country: str, share: float, lift: float) -> None:
        """From now on ``country`` gets ``share`` of the requests (the others share the
        rest equally) and its CTRs are multiplied by ``lift``."""
        k = COUNTRIES.index(country)
        rest = (1.0 - share) / (len(COUNTRIES) - 1)
        shares = np.full(len(COUNTRIES), rest)
        shares[k] = share
        self.country_share = shares
        self.country_lift = {**self.country_lift, country: lift}

    def _country(self, rng: np.random.Generator) -> str:
        if self.country_share is None:  # the draw the rollout simulation has always made
            return COUNTRIES[int(rng.integers(len(COUNTRIES)))]
        return COUNTRIES[int(rng.choice(len(COUNTRIES), p=self.country_share))]

    def request(self, rng: np.random.Generator) -> dict[str, Any]:
        """One ad request: user, context and candidates (ad indexes, ids and bids)."""
        idx = rng.choice(len(self.ads), CANDIDATES, replace=False)
        bids = np.round(rng.uniform(1.0, 3.0, CANDIDATES), 3)
        device = DEVICES[int(rng.choice(len(DEVICES), p=DEVICE_SHARE))]
        return {
            "user": self.users[int(rng.integers(len(self.users)))],
            "context": {"device_type": device,
                        "country": self._country(rng),
                        "publisher_id": PUBLISHERS[int(rng.integers(len(PUBLISHERS)))],
                        "placement": "feed", "creative_type": "banner"},
            "index": [int(i) for i in idx],
            "candidates": [{"ad_id": self.ads[i], "campaign_id": self.campaigns[i],
                            "bid_cpm": float(b)} for i, b in zip(idx, bids, strict=True)],
        }

    def history(self, per_ad: int, start_ms: int, end_ms: int, rng: np.random.Generator,
                click_delay_ms: tuple[int, int] = (1, 1)) -> list[dict[str, Any]]:
        """Past impressions (``per_ad`` each) and their clicks, without a model version,
        in time order: what gives every ad its online CTR before the rollout starts. A
        click comes ``click_delay_ms`` (uniform between the bounds) after its impression
        (the default, 1 ms, is what the rollout simulation has always sent; behavioural
        filters drop clicks under a second)."""
        n = per_ad * len(self.ads)
        ts = np.sort(rng.integers(start_ms, end_ms, n))
        ads = rng.integers(0, len(self.ads), n)
        out: list[dict[str, Any]] = []
        for k in range(n):
            a = int(ads[k])
            device = DEVICES[int(rng.choice(len(DEVICES), p=DEVICE_SHARE))]
            imp = {"type": "impression", "event_id": f"h{self.seed}-{k}", "ts": int(ts[k]),
                   "user_id": self.users[int(rng.integers(len(self.users)))],
                   "ad_id": self.ads[a], "campaign_id": self.campaigns[a],
                   "publisher_id": PUBLISHERS[k % len(PUBLISHERS)], "placement": "feed",
                   "creative_type": "banner", "device_type": device, "country": "US",
                   "bid_cpm": 2.0}
            out.append(imp)
            if rng.random() < self.true_p(a, device):
                lo, hi = click_delay_ms
                delay = lo if lo == hi else int(rng.integers(lo, hi + 1))
                out.append({"type": "click", "event_id": f"hc{self.seed}-{k}",
                            "ts": int(ts[k]) + delay, "impression_id": imp["event_id"],
                            "user_id": imp["user_id"], "ad_id": imp["ad_id"],
                            "campaign_id": imp["campaign_id"],
                            "publisher_id": imp["publisher_id"]})
        return out

    def training_rows(self, n: int, rng: np.random.Generator
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Synthetic labelled rows: every feature the models may use, and the click."""
        ads = rng.integers(0, len(self.ads), n)
        dev = rng.choice(len(DEVICES), n, p=DEVICE_SHARE)
        imps = rng.integers(100, 6000, n)
        ctr_hat = rng.binomial(imps, self.ctr[ads] * _MEAN_LIFT) / imps
        lift = np.array([DEVICE_LIFT[d] for d in DEVICES])[dev]
        y = (rng.random(n) < self.ctr[ads] * lift).astype(np.float64)
        cols = {"ad__ctr_24h": ctr_hat, "ad__impressions_24h": imps.astype(np.float64),
                "bid_cpm": rng.uniform(1.0, 3.0, n), "device_type": dev.astype(np.float64)}
        # drawn last, so the columns above stay what they were before country existed
        cols["country"] = rng.integers(0, len(COUNTRIES), n).astype(np.float64)
        return cols, y


def train_version(models: Path, hour: int, world: World, kind: str, seed: int) -> str:
    """Train one version (``champion``, ``good``, ``constant``, ``miscalibrated``) on
    synthetic rows and write it as a model artifact; returns its version."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    cols, y = world.training_rows(60_000, rng)
    features: Sequence[str] = DRIFT_FEATURES if kind == "drift" else CHAMPION_FEATURES \
        if kind in ("champion", "constant") else CHALLENGER_FEATURES
    x = np.column_stack([cols[f] for f in features])
    params: dict[str, Any] = {"objective": "binary", "verbosity": -1, "num_threads": 1,
                              "seed": seed, "learning_rate": 0.1, "num_leaves": 15,
                              "min_data_in_leaf": 200}
    weight = None
    if kind == "constant":
        params["min_data_in_leaf"] = len(y) + 1  # no split possible: one leaf
    if kind == "miscalibrated":
        weight = np.where(y > 0, 2.0, 1.0)
    cats = [f for f in ("device_type", "country") if f in features]
    data = lgb.Dataset(x, y, weight=weight, feature_name=list(features),
                       categorical_feature=cats or "auto")
    booster = lgb.train(params, data, 60 if kind != "constant" else 1)
    extra: dict[str, Any] = {}
    if kind == "drift":  # what the monitor reads: validation AUC and importance
        from offline.evaluation import auc

        vcols, vy = world.training_rows(20_000, rng)
        vx = np.column_stack([vcols[f] for f in features])
        gains = booster.feature_importance(importance_type="gain")
        extra = {"metrics": {"auc": auc(vy, np.asarray(booster.predict(vx)))},
                 "importance_gain": dict(zip(features, map(float, gains), strict=True))}

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({
            "features": list(features), **extra,
            "categories": {"device_type": list(DEVICES), "country": list(COUNTRIES)},
            "simulation": {"kind": kind, "seed": seed},
            "gate": {"promote": True, "reasons": [f"simulation: {kind}"]}}))

    return write_artifact(models, datetime(2026, 1, 1, hour, tzinfo=UTC), fill)[0]
