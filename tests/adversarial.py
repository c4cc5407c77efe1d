"""Deterministic adversarial test stream for the integration tests.

:func:`generate` builds, from a seed, a multi-day stream of impressions and clicks in
*arrival* order, with the malformed raw messages interleaved:

* ``>= 500`` users (1 per 100 events beyond that), Zipf-popular ads, campaigns and
  publishers; a heavy user who sees more than 512 distinct ads in a day (KMV estimate
  regime); a cohort of users active only on the first and the last day (longer gap than
  the 8-day user TTL when ``days >= 9``); users seen once.
* out-of-order arrival within the 60 s lateness (arrival = ts + a delay < 60 s, which
  can never make an event late), ties (same user, same ms; click at its impression's
  ms), event times on tile boundaries;
* injected lateness edge cases, computed from the partition's running max at the point
  of arrival: ``ts == max - 60 s`` (accepted), ``ts == max - 60 s - 1 ms`` (late) and
  far-late events (61 s to 3 days behind: late);
* anonymous events (``user_id`` null, routed by ``event_id``);
* malformed raw messages with the dead-letter reason each must get (``bad_json``,
  ``missing_field``, ``bad_type``, ``ts_in_future``, ``undecodable``, ``bad_id``).
  Those that carry a usable ts carry the partition's current max, so whether or not a
  consumer lets them touch the watermark cannot change which valid events are late.

Which valid events are late is the oracle's call (:func:`tests.oracle.accepted_events`);
``Arrival.intent`` only records what an injected event was built to be, so a test can
check the two agree.

:func:`probe_points` picks (entity, id, T) probes with ``T >= `` the entity's latest
applied event, including T equal to it, T at the TTL edge and far beyond it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import xxhash

from tests.oracle import DAY, ENTITY_KEYS, HOUR, MINUTE, TTL_MS, OracleIndex

__all__ = [
    "REASONS",
    "START_MS",
    "FUTURE_TS",
    "Arrival",
    "Stream",
    "generate",
    "encode_event",
    "topic_of",
    "routing_key",
    "probe_points",
]

#: 2024-03-04T00:00:00Z, a Monday
START_MS = 1_709_510_400_000
#: 2100-01-01T00:00:00Z: far in the future for any clock
FUTURE_TS = 4_102_444_800_000
REASONS = ("bad_json", "missing_field", "bad_type", "ts_in_future", "undecodable", "bad_id")
LATENESS_MS = 60_000

_IMP_FIELDS = ("event_id", "ts", "user_id", "ad_id", "campaign_id", "publisher_id",
               "placement", "creative_type", "device_type", "country", "bid_cpm")
_CLICK_FIELDS = ("event_id", "ts", "impression_id", "user_id", "ad_id", "campaign_id",
                 "publisher_id")


@dataclass(frozen=True)
class Arrival:
    """One raw message in arrival order.

    Attributes:
        topic: ``impressions`` or ``clicks``.
        partition: the partition to produce to.
        key: the message key (UTF-8 routing key).
        value: the raw message bytes (JSON of the contract fields for valid events).
        event: the valid event (with ``type``) or None for a malformed message.
        reason: the expected dead-letter reason code of a malformed message, else None.
        intent: for valid events, what the generator built it to be: ``"normal"``,
            ``"edge_ok"`` (ts == partition max - lateness: accepted), ``"edge_late"``
            (1 ms older: late) or ``"far_late"`` (late).
    """

    topic: str
    partition: int
    key: bytes
    value: bytes
    event: dict[str, Any] | None = None
    reason: str | None = None
    intent: str = "normal"


@dataclass
class Stream:
    """A generated stream; ``arrivals`` is the produce order (valid and malformed)."""

    seed: int
    partitions: int
    start_ms: int
    end_ms: int
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every valid event (late ones included) in arrival order."""
        return [a.event for a in self.arrivals if a.event is not None]

    @property
    def malformed(self) -> list[Arrival]:
        """The malformed messages, each with its expected ``reason``."""
        return [a for a in self.arrivals if a.reason is not None]


def topic_of(event: dict[str, Any]) -> str:
    return "impressions" if event["type"] == "impression" else "clicks"


def routing_key(event: dict[str, Any]) -> str:
    return event["user_id"] if event.get("user_id") is not None else event["event_id"]


def _partition(key: str, partitions: int) -> int:
    return xxhash.xxh64_intdigest(key.encode("utf-8")) % partitions


def encode_event(event: dict[str, Any]) -> bytes:
    """Wire form of a valid event: compact JSON of its contract fields (no ``type``)."""
    fields = _IMP_FIELDS if event["type"] == "impression" else _CLICK_FIELDS
    return json.dumps({f: event[f] for f in fields}, separators=(",", ":")).encode("utf-8")


def _arrival(event: dict[str, Any], partitions: int, intent: str = "normal") -> Arrival:
    key = routing_key(event)
    return Arrival(topic_of(event), _partition(key, partitions), key.encode("utf-8"),
                   encode_event(event), event=event, intent=intent)


# --------------------------------------------------------------------------- generator
class _World:
    """Users, ads and their campaigns, publishers; Zipf-like popularity."""

    def __init__(self, rng: random.Random, n_users: int, n_ads: int) -> None:
        self.rng = rng
        self.users = [f"u{i:05d}" for i in range(n_users)]
        self.ads = [f"ad{i:05d}" for i in range(n_ads)]
        n_campaigns = max(10, n_ads // 40)
        self.campaign_of = {a: f"c{rng.randrange(n_campaigns):04d}" for a in self.ads}
        self.publishers = [f"p{i:03d}" for i in range(40)]
        self._ad_cum = list(accumulate(1.0 / (i + 1) ** 0.8 for i in range(n_ads)))
        self._user_cum = list(accumulate(1.0 / (i + 1) ** 0.6 for i in range(n_users)))
        self._pub_cum = list(accumulate(1.0 / (i + 1) for i in range(len(self.publishers))))

    def ad(self) -> str:
        return self.rng.choices(self.ads, cum_weights=self._ad_cum)[0]

    def user(self) -> str:
        return self.rng.choices(self.users, cum_weights=self._user_cum)[0]

    def publisher(self) -> str:
        return self.rng.choices(self.publishers, cum_weights=self._pub_cum)[0]


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n:07d}"


def _impression(ids: _Ids, w: _World, ts: int, user: str | None, ad: str | None = None,
                publisher: str | None = None) -> dict[str, Any]:
    rng = w.rng
    ad = ad or w.ad()
    return {
        "type": "impression", "event_id": ids("imp"), "ts": ts, "user_id": user, "ad_id": ad,
        "campaign_id": w.campaign_of[ad], "publisher_id": publisher or w.publisher(),
        "placement": rng.choice(("feed", "sidebar", "interstitial", "search")),
        "creative_type": rng.choice(("banner", "video", "native")),
        "device_type": rng.choice(("mobile", "desktop", "tablet")),
        "country": rng.choice(("US", "DE", "FR", "BR", "IN", "JP")),
        "bid_cpm": round(rng.uniform(0.05, 12.0), 4),
    }


def _click(ids: _Ids, imp: dict[str, Any], ts: int) -> dict[str, Any]:
    return {
        "type": "click", "event_id": ids("clk"), "ts": ts, "impression_id": imp["event_id"],
        "user_id": imp["user_id"], "ad_id": imp["ad_id"], "campaign_id": imp["campaign_id"],
        "publisher_id": imp["publisher_id"],
    }


def _event_times(rng: random.Random, start: int, end: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        ts = rng.randrange(start, end)
        r = rng.random()
        if r < 0.01:
            ts -= ts % (15 * MINUTE)  # on a 24h-window tile boundary
        elif r < 0.02:
            ts -= ts % HOUR
        elif r < 0.03:
            ts -= ts % MINUTE
        elif r < 0.04:
            ts -= ts % 5000
        out.append(ts)
    return out


def _valid_events(rng: random.Random, w: _World, ids: _Ids, n_events: int, start: int,
                  end: int, days: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    # the heavy user: > 512 distinct ads inside one day (more in the big stream)
    # more than the sketch size (512), never more ads than exist
    heavy_ads = rng.sample(w.ads, min(len(w.ads), 640 if n_events < 20_000 else 1_200))
    heavy_ads += rng.choices(heavy_ads, k=len(heavy_ads) // 3)  # repeats
    heavy_day = start + (days // 2) * DAY
    for ts, ad in zip(_event_times(rng, heavy_day, heavy_day + 20 * HOUR, len(heavy_ads)),
                      heavy_ads, strict=True):
        events.append(_impression(ids, w, ts, "u-heavy", ad=ad))
    # returning cohort: first day and last day only
    for i in range(20):
        user = f"u-return-{i:02d}"
        for day in (start, end - DAY):
            for ts in _event_times(rng, day, day + DAY, rng.randint(1, 6)):
                events.append(_impression(ids, w, ts, user))
    # one-shot users
    for i in range(30):
        (ts,) = _event_times(rng, start, end, 1)
        events.append(_impression(ids, w, ts, f"u-once-{i:02d}"))
    # sessions of the main population until the impression budget is spent
    n_imps = int(n_events * 0.93) - len(events)
    roster = iter(w.users)  # every user has at least one session
    while n_imps > 0:
        user: str | None = next(roster, None) or (None if rng.random() < 0.08 else w.user())
        (t0,) = _event_times(rng, start, end, 1)
        size = min(n_imps, rng.choice((1, 1, 2, 3, 5, 8, 13)))
        ts = t0
        publisher = w.publisher()
        for _ in range(size):
            events.append(_impression(ids, w, ts, user, publisher=publisher))
            if rng.random() < 0.05 and n_imps > 1:  # a tie: same user, same ms
                events.append(_impression(ids, w, ts, user, publisher=publisher))
                n_imps -= 1
            ts = min(end - 1, ts + rng.choice((0, 200, 1_500, 10_000, 45_000, 240_000)))
            n_imps -= 1
    # clicks on ~7 % of impressions (a few at the impression's very ms)
    for imp in list(events):
        if rng.random() < 0.07 or (imp["user_id"] == "u-heavy" and rng.random() < 0.02):
            delay = 0 if rng.random() < 0.1 else int(rng.expovariate(1 / 20_000))
            events.append(_click(ids, imp, min(end - 1, imp["ts"] + delay)))
    return events


def _arrival_order(rng: random.Random, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order by ts + a delay below the lateness: out of order, yet never late."""
    keyed = []
    for i, e in enumerate(events):
        r = rng.random()
        if r < 0.75:
            delay = rng.randrange(0, 2_000)
        elif r < 0.97:
            delay = rng.randrange(0, 30_000)
        else:
            delay = rng.randrange(55_000, LATENESS_MS)
        keyed.append((e["ts"] + delay, i, e))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [e for _, _, e in keyed]


_REASON_WEIGHT = {"bad_json": 3, "missing_field": 4, "bad_type": 3, "ts_in_future": 2,
                  "undecodable": 2, "bad_id": 4}


def _malformed(rng: random.Random, reason: str, template: dict[str, Any], max_ts: int,
               variant: int, partition: int, n: int) -> Arrival:
    """A malformed message modelled on ``template`` whose usable ts is ``max_ts``."""
    base = json.loads(encode_event(template))
    base["event_id"] = f"bad-{n:05d}"
    base["ts"] = max_ts
    topic = topic_of(template)
    fields = _IMP_FIELDS if template["type"] == "impression" else _CLICK_FIELDS
    if reason == "bad_json":
        value = [
            b'{"event_id": "bad", "ts": 17',
            b"not json at all",
            b'{"event_id": "bad",}',
            b"{'event_id': 'single quotes'}",
            json.dumps(base).encode()[:-1],
        ][variant % 5]
    elif reason == "undecodable":
        value = [
            b"\xff\xfe\x00\x81garbage",
            json.dumps(base).encode().replace(b'"bad-', b'"\xc3\x28bad-'),
            b"\x80" * 16,
        ][variant % 3]
    elif reason == "missing_field":
        required = [f for f in fields if f != "user_id"]
        drop = required[variant % len(required)]
        value = json.dumps({k: v for k, v in base.items() if k != drop}).encode()
    elif reason == "bad_type":
        bad: dict[str, Any] = dict(base)
        choice = variant % (4 if topic == "impressions" else 3)
        if choice == 0:
            bad["ts"] = str(max_ts)
        elif choice == 1:
            bad["ts"] = "yesterday"
        elif choice == 2:
            bad["ts"] = [max_ts]
        else:
            bad["bid_cpm"] = "1.25"
        value = json.dumps(bad).encode()
    elif reason == "ts_in_future":
        bad = dict(base)
        bad["ts"] = FUTURE_TS + n
        value = json.dumps(bad).encode()
    elif reason == "bad_id":
        bad = dict(base)
        fld, val = [
            ("ad_id", "ad{1}"),
            ("user_id", "user 1"),
            ("campaign_id", ""),
            ("publisher_id", "p\x00x"),
            ("ad_id", "a" * 300),
            ("user_id", ""),
            ("user_id", "u\n2"),
            ("campaign_id", "c}"),
        ][variant % 8]
        bad[fld] = val
        value = json.dumps(bad).encode()
    else:  # pragma: no cover - REASONS is closed
        raise ValueError(reason)
    key = f"malformed-{n:05d}".encode()
    return Arrival(topic, partition, key, value, event=None, reason=reason)


def generate(
    n_events: int = 100_000,
    *,
    seed: int = 20240304,
    small: bool = False,
    days: int | None = None,
    partitions: int = 4,
    start_ms: int = START_MS,
) -> Stream:
    """Build the adversarial stream.

    Args:
        n_events: approximate number of valid events (``small=True`` makes it 6,000).
        seed: everything is a function of the arguments.
        small: a quick stream for fast integration tests (2 days unless ``days`` is set).
        days: span of event times (default 9, so returning users outlive the user TTL).
        partitions: partitions of each source topic (routing and lateness are per
            (topic, partition)).
        start_ms: event time of the stream start (UTC epoch ms).

    Returns:
        The stream; ``stream.events`` (valid, arrival order) is what to feed
        :func:`tests.oracle.accepted_events`.
    """
    if small:
        n_events = min(n_events, 6_000)
        days = days or 2
    days = days or 9
    rng = random.Random(seed)
    w = _World(rng, n_users=max(500, n_events // 100), n_ads=max(800, n_events // 50))
    ids = _Ids()
    start, end = start_ms, start_ms + days * DAY
    ordered = _arrival_order(rng, _valid_events(rng, w, ids, n_events, start, end, days))

    users_by_part: dict[int, list[str]] = {}
    for u in w.users:
        users_by_part.setdefault(_partition(u, partitions), []).append(u)

    stream = Stream(seed=seed, partitions=partitions, start_ms=start, end_ms=end)
    max_seen: dict[tuple[str, int], int] = {}
    n_inject = max(12, len(ordered) // 250)
    inject_at = set(rng.sample(range(len(ordered) // 20, len(ordered)), n_inject))
    n_bad = max(3 * len(REASONS), len(ordered) // 500)
    bad_at = sorted(rng.sample(range(len(ordered) // 20, len(ordered)), n_bad))
    bad_reasons = [r for r in REASONS for _ in range(2)] + rng.choices(
        list(_REASON_WEIGHT), list(_REASON_WEIGHT.values()), k=n_bad - 2 * len(REASONS))
    rng.shuffle(bad_reasons)
    bad_iter = iter(zip(bad_at, bad_reasons, strict=True))
    next_bad = next(bad_iter, None)
    variant: dict[str, int] = {}

    for i, event in enumerate(ordered):
        arr = _arrival(event, partitions)
        where = (arr.topic, arr.partition)
        stream.arrivals.append(arr)
        max_seen[where] = max(max_seen.get(where, event["ts"]), event["ts"])
        if i in inject_at:
            kind = ("edge_ok", "edge_late", "far_late", "far_late")[len(stream.arrivals) % 4]
            part = rng.choice(sorted(users_by_part))
            pmax = max_seen.get((arr.topic, part))
            if pmax is not None:
                if kind == "edge_ok":
                    ts = pmax - LATENESS_MS
                elif kind == "edge_late":
                    ts = pmax - LATENESS_MS - 1
                else:
                    ts = pmax - rng.randrange(LATENESS_MS + 1_000, 3 * DAY)
                imp = _impression(ids, w, ts, rng.choice(users_by_part[part]))
                late_ev = imp if arr.topic == "impressions" else _click(ids, imp, ts)
                stream.arrivals.append(_arrival(late_ev, partitions, intent=kind))
        while next_bad is not None and next_bad[0] == i:
            reason = next_bad[1]
            v = variant[reason] = variant.get(reason, -1) + 1
            stream.arrivals.append(_malformed(rng, reason, event, max_seen[where], v,
                                              arr.partition, len(stream.malformed)))
            next_bad = next(bad_iter, None)
    return stream


# --------------------------------------------------------------------------- probes
def _probe_offset(rng: random.Random, k: int, ttl: int) -> int:
    """The k-th probe offset after an entity's latest event (cycles through 9 kinds)."""
    kind = k % 9
    if kind in (0, 7):
        return 0  # T == the latest event: that event is excluded, the previous one counts
    if kind == 1:
        return 1
    if kind == 2:
        return rng.randrange(5 * MINUTE)
    if kind == 3:
        return rng.randrange(DAY)
    if kind == 4:
        return ttl - 1
    if kind == 5:
        return ttl  # exactly the TTL: defaults
    if kind == 6:
        return ttl + rng.randrange(1, 400 * DAY)  # far beyond the TTL
    return rng.randrange(HOUR)


def probe_points(
    accepted: list[dict[str, Any]] | OracleIndex, n: int, seed: int = 0
) -> list[tuple[str, str, int]]:
    """About ``n`` (entity, id, T) probes, spread over the four entities.

    Every T is at or after the entity's latest applied event (where the online path is
    defined). Per entity the offsets cycle through: T equal to the latest event, +1 ms,
    within 5 min, within a day, the TTL edge (TTL - 1 ms, TTL exactly: default) and far
    beyond the TTL; plus one id that never had an event (defaults at any T).
    """
    index = accepted if isinstance(accepted, OracleIndex) else OracleIndex(accepted)
    rng = random.Random(seed)
    per_entity = max(8, n // len(ENTITY_KEYS))
    probes: list[tuple[str, str, int]] = []
    for entity in ENTITY_KEYS:
        ids = index.ids(entity)
        chosen = rng.sample(ids, min(len(ids), per_entity - 1))
        latest_all = max((index.latest(entity, i) or 0) for i in ids) if ids else START_MS
        for k, eid in enumerate(chosen):
            latest = index.latest(entity, eid)
            assert latest is not None
            probes.append((entity, eid, latest + _probe_offset(rng, k, TTL_MS[entity])))
        probes.append((entity, f"{entity}-never-seen", latest_all + 1))
    return probes
