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
           "CHAMPION_FEATURES", "train_version"]

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
        self.ads = [f"sa{i:03d}" for i in range(ads)]
        self.campaigns = [f"sc{i % 12:02d}" for i in range(ads)]
        self.ctr = np.clip(base_ctr * rng.lognormal(0.0, 0.6, ads), 0.01, 0.30)
        self.users = [f"su{i:05d}" for i in range(users)]

    def true_p(self, ad: int, device: str) -> float:
        """The true click probability of ad index ``ad`` on ``device``."""
        return float(self.ctr[ad] * DEVICE_LIFT[device])

    def request(self, rng: np.random.Generator) -> dict[str, Any]:
        """One ad request: user, context and candidates (ad indexes, ids and bids)."""
        idx = rng.choice(len(self.ads), CANDIDATES, replace=False)
        bids = np.round(rng.uniform(1.0, 3.0, CANDIDATES), 3)
        device = DEVICES[int(rng.choice(len(DEVICES), p=DEVICE_SHARE))]
        return {
            "user": self.users[int(rng.integers(len(self.users)))],
            "context": {"device_type": device,
                        "country": COUNTRIES[int(rng.integers(len(COUNTRIES)))],
                        "publisher_id": PUBLISHERS[int(rng.integers(len(PUBLISHERS)))],
                        "placement": "feed", "creative_type": "banner"},
            "index": [int(i) for i in idx],
            "candidates": [{"ad_id": self.ads[i], "campaign_id": self.campaigns[i],
                            "bid_cpm": float(b)} for i, b in zip(idx, bids, strict=True)],
        }

    def history(self, per_ad: int, start_ms: int, end_ms: int, rng: np.random.Generator
                ) -> list[dict[str, Any]]:
        """Past impressions (``per_ad`` each) and their clicks, without a model version,
        in time order: what gives every ad its online CTR before the rollout starts."""
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
                out.append({"type": "click", "event_id": f"hc{self.seed}-{k}",
                            "ts": int(ts[k]) + 1, "impression_id": imp["event_id"],
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
        return cols, y


def train_version(models: Path, hour: int, world: World, kind: str, seed: int) -> str:
    """Train one version (``champion``, ``good``, ``constant``, ``miscalibrated``) on
    synthetic rows and write it as a model artifact; returns its version."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    cols, y = world.training_rows(60_000, rng)
    features: Sequence[str] = CHAMPION_FEATURES if kind in ("champion", "constant") \
        else CHALLENGER_FEATURES
    x = np.column_stack([cols[f] for f in features])
    params: dict[str, Any] = {"objective": "binary", "verbosity": -1, "num_threads": 1,
                              "seed": seed, "learning_rate": 0.1, "num_leaves": 15,
                              "min_data_in_leaf": 200}
    weight = None
    if kind == "constant":
        params["min_data_in_leaf"] = len(y) + 1  # no split possible: one leaf
    if kind == "miscalibrated":
        weight = np.where(y > 0, 2.0, 1.0)
    data = lgb.Dataset(x, y, weight=weight, feature_name=list(features),
                       categorical_feature=["device_type"] if "device_type" in features
                       else "auto")
    booster = lgb.train(params, data, 60 if kind != "constant" else 1)

    def fill(folder: Path, version: str) -> None:
        booster.save_model(str(folder / "model.txt"))
        (folder / "metadata.json").write_text(json.dumps({
            "features": list(features), "categories": {"device_type": list(DEVICES)},
            "simulation": {"kind": kind, "seed": seed},
            "gate": {"promote": True, "reasons": [f"simulation: {kind}"]}}))

    return write_artifact(models, datetime(2026, 1, 1, hour, tzinfo=UTC), fill)[0]
