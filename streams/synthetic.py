"""A deterministic, realistic synthetic impression/click stream with known true CTRs.

The world (fixed per ``seed``): ``users`` users, each with a true CTR drawn from
``Beta(2, 64.7)`` (mean ~3 %), a fixed country and device type, and a Zipf-like activity
weight (a few heavy users, a long tail); ``ads`` ads, each in one of ``campaigns``
campaigns with a fixed creative type, a Zipf-like popularity and a quality factor
(log-normal, normalised so that its popularity-weighted mean is exactly 1); ``publishers``
publishers with Zipf-like traffic; campaign base bids (log-normal, mean ~2 per mille).

The stream: impressions spread over ``days`` days from ``start_ms`` with a diurnal cycle
(peak 20:00 UTC, 3x the 08:00 trough); a share ``anonymous_share`` has ``user_id`` null.
An impression by user ``u`` of ad ``a`` is clicked with probability
``user_ctr[u] * quality[a]`` (anonymous users: the population mean), 1 s to 10 min later
(log-uniform); the click carries the impression's user, ad, campaign and publisher and
``impression_id`` = its ``event_id``. So a user's expected empirical CTR is ``user_ctr``.

Arrival order is event time plus 0-3 s of jitter, and a click never arrives before its
impression. Events are generated an hour of event time at a time, so :func:`iter_events`
holds only about an hour of events in memory.
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["SyntheticStream", "SyntheticWorld", "generate", "iter_events", "write_jsonl"]

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_CTR_BETA = (2.0, 64.7)
_COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "AU", "ES")
_COUNTRY_W = (0.30, 0.10, 0.10, 0.08, 0.12, 0.08, 0.07, 0.06, 0.05, 0.04)
_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_W = (0.62, 0.30, 0.08)
_PLACEMENTS = ("feed", "sidebar", "banner_top", "interstitial", "footer")
_PLACEMENT_W = (0.40, 0.20, 0.20, 0.10, 0.10)
_CREATIVES = ("banner", "native", "video", "rich_media")
_CREATIVE_W = (0.45, 0.30, 0.15, 0.10)
_JITTER_MS = 3_000
_CLICK_DELAY_MS = (1_000, 600_000)


@dataclass(frozen=True)
class SyntheticStream:
    """A generated stream held in memory.

    Attributes:
        events: Event dicts in arrival order, each with ``type`` (impression|click).
        user_ctr: The true click probability of each (non-anonymous) user id.
        start_ms: Start of the event-time span, epoch milliseconds.
    """

    events: list[dict[str, Any]]
    user_ctr: dict[str, float]
    start_ms: int


def _zipf_cdf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    weights = weights[rng.permutation(n)]
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return cdf


def _pick(cdf: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    return np.searchsorted(cdf, rng.random(k), side="right").clip(0, len(cdf) - 1)


def _arrival(item: tuple[int, int, dict[str, Any]]) -> int:
    return item[0]


class SyntheticWorld:
    """The fixed population of a seed: users, ads, campaigns, publishers.

    Raises:
        ValueError: a count is below 1, or ``anonymous_share`` is outside [0, 1].
    """

    def __init__(
        self,
        users: int,
        seed: int,
        *,
        anonymous_share: float = 0.05,
        ads: int = 500,
        campaigns: int = 50,
        publishers: int = 100,
    ) -> None:
        for name, value in (
            ("users", users),
            ("ads", ads),
            ("campaigns", campaigns),
            ("publishers", publishers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= anonymous_share <= 1.0:
            raise ValueError(f"anonymous_share must be within [0, 1], got {anonymous_share}")
        self.seed = seed
        self.anonymous_share = anonymous_share
        rng = np.random.default_rng([seed, 0])
        self.user_ids = [f"u{i:07d}" for i in range(users)]
        self.ctr = rng.beta(*_CTR_BETA, size=users)
        self.user_country = rng.choice(len(_COUNTRIES), size=users, p=_COUNTRY_W)
        self.user_device = rng.choice(len(_DEVICES), size=users, p=_DEVICE_W)
        self.user_cdf = _zipf_cdf(users, 0.9, rng)
        self.ad_ids = [f"ad{i:05d}" for i in range(ads)]
        self.campaign_ids = [f"cmp{i:04d}" for i in range(campaigns)]
        self.publisher_ids = [f"pub{i:04d}" for i in range(publishers)]
        self.ad_campaign = rng.integers(0, campaigns, size=ads)
        self.ad_creative = rng.choice(len(_CREATIVES), size=ads, p=_CREATIVE_W)
        self.ad_cdf = _zipf_cdf(ads, 0.8, rng)
        popularity = np.diff(self.ad_cdf, prepend=0.0)
        quality = rng.lognormal(0.0, 0.35, size=ads)
        self.ad_quality = quality / float(np.dot(popularity, quality))
        self.publisher_cdf = _zipf_cdf(publishers, 1.0, rng)
        self.campaign_bid = rng.lognormal(math.log(2.0) - 0.18, 0.6, size=campaigns)
        self.mean_ctr = _CTR_BETA[0] / (_CTR_BETA[0] + _CTR_BETA[1])
        activity = np.diff(self.user_cdf, prepend=0.0)
        #: expected clicks per impression over the whole stream
        self.expected_ctr = float(
            (1 - anonymous_share) * np.dot(activity, self.ctr) + anonymous_share * self.mean_ctr
        )

    @property
    def user_ctr(self) -> dict[str, float]:
        """True CTR per user id."""
        return dict(zip(self.user_ids, self.ctr.tolist(), strict=True))

    def iter_events(self, events: int, start_ms: int, days: float = 7) -> Iterator[dict[str, Any]]:
        """Yield exactly ``events`` events (impressions and their clicks) in arrival order.

        Impressions are drawn with 2 % headroom over ``events / (1 + expected CTR)`` and
        the stream is cut at ``events``, so it ends slightly before ``start_ms + days``.
        """
        if events < 0 or days <= 0:
            raise ValueError("events must be >= 0 and days > 0")
        rng = np.random.default_rng([self.seed, 1])
        n_imp = math.ceil(events / (1 + self.expected_ctr) * 1.02) + 10 if events else 0
        n_chunks = max(1, math.ceil(days * _DAY_MS / _HOUR_MS))
        starts = start_ms + _HOUR_MS * np.arange(n_chunks, dtype=np.int64)
        span_end = start_ms + int(days * _DAY_MS)
        lengths = np.minimum(starts + _HOUR_MS, span_end) - starts
        hour = (starts // _HOUR_MS) % 24
        weight = (1 + 0.5 * np.cos(2 * np.pi * (hour - 20) / 24)) * lengths
        per_chunk = rng.multinomial(n_imp, weight / weight.sum())
        pending: list[tuple[int, int, dict[str, Any]]] = []  # (arrival, seq, event), unsorted
        emitted = seq = serial = 0
        for c in range(n_chunks):
            fresh = self._chunk(rng, int(starts[c]), int(lengths[c]), int(per_chunk[c]), serial)
            serial += int(per_chunk[c])
            for arrival, event in fresh:
                pending.append((arrival, seq, event))
                seq += 1
            boundary = int(starts[c] + lengths[c]) if c + 1 < n_chunks else None
            pending.sort()  # (arrival, seq) is unique: dicts are never compared
            cut = len(pending)
            if boundary is not None:
                cut = bisect.bisect_left(pending, boundary, key=_arrival)
            for _, _, event in pending[:cut]:
                if emitted == events:
                    return
                emitted += 1
                yield event
            del pending[:cut]

    def _chunk(
        self, rng: np.random.Generator, t0: int, length: int, k: int, serial: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """Impressions of one chunk of event time and their clicks, as (arrival, event)."""
        if k == 0:
            return []
        ts = t0 + np.sort(rng.integers(0, length, size=k))
        user = _pick(self.user_cdf, rng, k)
        anonymous = rng.random(k) < self.anonymous_share
        ad = _pick(self.ad_cdf, rng, k)
        campaign = self.ad_campaign[ad]
        creative = self.ad_creative[ad]
        publisher = _pick(self.publisher_cdf, rng, k)
        placement = rng.choice(len(_PLACEMENTS), size=k, p=_PLACEMENT_W)
        country = np.where(
            anonymous, rng.choice(len(_COUNTRIES), size=k, p=_COUNTRY_W), self.user_country[user]
        )
        device = np.where(
            anonymous, rng.choice(len(_DEVICES), size=k, p=_DEVICE_W), self.user_device[user]
        )
        bid = np.round(self.campaign_bid[campaign] * rng.lognormal(0.0, 0.25, size=k), 4)
        p_click = np.where(anonymous, self.mean_ctr, self.ctr[user]) * self.ad_quality[ad]
        clicked = rng.random(k) < np.clip(p_click, 0.0, 1.0)
        lo, hi = _CLICK_DELAY_MS
        delay = np.exp(rng.uniform(math.log(lo), math.log(hi), size=k)).astype(np.int64)
        arrival = ts + rng.integers(0, _JITTER_MS, size=k)
        click_arrival = np.maximum(ts + delay + rng.integers(0, _JITTER_MS, size=k), arrival + 1)
        out: list[tuple[int, dict[str, Any]]] = []
        seed = self.seed
        rows = zip(
            ts.tolist(),
            user.tolist(),
            anonymous.tolist(),
            ad.tolist(),
            campaign.tolist(),
            publisher.tolist(),
            placement.tolist(),
            creative.tolist(),
            country.tolist(),
            device.tolist(),
            bid.tolist(),
            clicked.tolist(),
            delay.tolist(),
            arrival.tolist(),
            click_arrival.tolist(),
            strict=True,
        )
        for i, row in enumerate(rows):
            t, u, anon, a, cmp, pub, plc, cre, cty, dev, b, clk, dly, arr, carr = row
            event_id = f"imp-{seed}-{serial + i:010d}"
            user_id = None if anon else self.user_ids[u]
            out.append(
                (
                    arr,
                    {
                        "type": "impression",
                        "event_id": event_id,
                        "ts": t,
                        "user_id": user_id,
                        "ad_id": self.ad_ids[a],
                        "campaign_id": self.campaign_ids[cmp],
                        "publisher_id": self.publisher_ids[pub],
                        "placement": _PLACEMENTS[plc],
                        "creative_type": _CREATIVES[cre],
                        "device_type": _DEVICES[dev],
                        "country": _COUNTRIES[cty],
                        "bid_cpm": b,
                    },
                )
            )
            if clk:
                out.append(
                    (
                        carr,
                        {
                            "type": "click",
                            "event_id": f"clk-{seed}-{serial + i:010d}",
                            "ts": t + dly,
                            "impression_id": event_id,
                            "user_id": user_id,
                            "ad_id": self.ad_ids[a],
                            "campaign_id": self.campaign_ids[cmp],
                            "publisher_id": self.publisher_ids[pub],
                        },
                    )
                )
        return out


def iter_events(
    users: int,
    events: int,
    seed: int,
    start_ms: int,
    days: float = 7,
    anonymous_share: float = 0.05,
    ads: int = 500,
    campaigns: int = 50,
    publishers: int = 100,
) -> Iterator[dict[str, Any]]:
    """Generator form of :func:`generate`: the same events, about an hour's worth in memory."""
    world = SyntheticWorld(
        users,
        seed,
        anonymous_share=anonymous_share,
        ads=ads,
        campaigns=campaigns,
        publishers=publishers,
    )
    return world.iter_events(events, start_ms, days)


def generate(
    users: int,
    events: int,
    seed: int,
    start_ms: int,
    days: float = 7,
    anonymous_share: float = 0.05,
    ads: int = 500,
    campaigns: int = 50,
    publishers: int = 100,
) -> SyntheticStream:
    """Generate ``events`` events (impressions and clicks) of ``users`` users, deterministically.

    Args:
        users: Number of users (>= 1).
        events: Total number of events to return (>= 0).
        seed: Seed (>= 0); the same arguments give the same stream.
        start_ms: Start of the event-time span, epoch milliseconds UTC.
        days: Length of the event-time span in days (> 0).
        anonymous_share: Share of impressions with a null ``user_id``.
        ads, campaigns, publishers: Sizes of the ad inventory.

    Raises:
        ValueError: An argument is out of range.
    """
    world = SyntheticWorld(
        users,
        seed,
        anonymous_share=anonymous_share,
        ads=ads,
        campaigns=campaigns,
        publishers=publishers,
    )
    return SyntheticStream(
        list(world.iter_events(events, start_ms, days)), world.user_ctr, start_ms
    )


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return path.open(mode, encoding="utf-8")


def write_jsonl(path: str | Path, events: Iterable[dict[str, Any]]) -> int:
    """Write events as JSON lines (gzip when ``path`` ends in ``.gz``); returns the count."""
    count = 0
    with _open_text(Path(path), "w") as fh:
        for event in events:
            fh.write(json.dumps(event, separators=(",", ":")))
            fh.write("\n")
            count += 1
    return count
