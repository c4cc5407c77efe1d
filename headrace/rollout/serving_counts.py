"""Serving-side counts of each arm of a rollout, summed over every server in Redis.

The guardrails (:func:`~headrace.rollout.gates.guardrails`) need per-arm requests,
errors, latency, the predictions' range and per-publisher errors. Only the servers see
those, so every server counts its own answers in memory
(:class:`serving.rollout_counts.CountsAccumulator`) and adds them here every split poll
(250 ms). The sums survive server restarts and cover every server;
:class:`ServingStatsSource` reads them for the controller.

Key layout: one hash per rollout and model version,
``{prefix}:rollout:serving:{rollout_id}:{version}`` (:func:`counts_key`), cumulative
since the first answer of the rollout, expiring :data:`COUNTS_TTL_S` after the last
flush. Fields:

* ``requests``, ``errors``: answers of this version, and those that failed (integers);
* ``lat_le_{bound}``, one per bound of :data:`LATENCY_BOUNDS_MS` (``lat_le_1`` …
  ``lat_le_100``, ``lat_le_inf``): successful answers whose server latency (validation
  to response, ms) is at most that bound and above the one before. **Fixed**: changing
  the bounds is a new key layout;
* ``pub_requests:{publisher}``, ``pub_errors:{publisher}`` (an absent publisher is
  the empty string);
* ``min_pctr``, ``max_pctr``: the smallest and largest pCTR served, as the exact
  decimal Python wrote (``repr``; ``inf``/``-inf``; a NaN prediction is recorded as
  ``-inf`` and ``inf``, out of range).

Writes: :func:`flush_batch` (and :func:`flush_deltas`, its one-key form) runs ONE Lua
script (:data:`FLUSH_SCRIPT`), so a flush is applied whole or not at all and no other
command interleaves: HINCRBY per counter, compare-and-set of the min/max (which HINCRBY
cannot do, and a read-then-write from two servers would race), EXPIRE. Each flush
carries ``(token, seq)``: the writer's unique token and a sequence number it increases
by one per new batch. The script records the last ``seq`` applied per token at
``{prefix}:rollout:serving-flush:{token}`` (same TTL) and skips a batch whose ``seq``
is not above it, so a writer that lost the reply (a timeout after Redis applied it)
resends the *same* batch with the *same* seq and it is counted exactly once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from headrace.core.errors import InputError, OnlineStoreError
from headrace.rollout.gates import ArmStats, SegmentStats
from headrace.rollout.source import StatsUnavailable

__all__ = ["LATENCY_BOUNDS_MS", "LATENCY_FIELDS", "COUNTS_TTL_S", "FLUSH_SCRIPT",
           "ServingCounts", "counts_key", "flush_key", "flush_batch", "flush_deltas",
           "read_serving_counts", "ServingStatsSource"]

#: latency bucket upper bounds, ms (inclusive, as Prometheus' ``le``); fixed
LATENCY_BOUNDS_MS: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                                        50.0, 100.0, math.inf)
#: the hash field of each latency bucket, in :data:`LATENCY_BOUNDS_MS`'s order
LATENCY_FIELDS: tuple[str, ...] = tuple(
    "lat_le_inf" if math.isinf(b) else f"lat_le_{b:g}" for b in LATENCY_BOUNDS_MS)
#: seconds the counts (and the flush markers) live after the last flush: longer than
#: the longest rollout (five phases at their maximum plus a shadow day, 16 days)
COUNTS_TTL_S = 30 * 86400
_LAT_INDEX = {f: i for i, f in enumerate(LATENCY_FIELDS)}

#: KEYS[1]: the flush marker; KEYS[2..]: count hashes. ARGV: seq, ttl_s, then per hash:
#: n, n (field, increment) pairs, min ('' for none), max ('' for none).
FLUSH_SCRIPT = """
local function num(s)
  if s == 'inf' then return math.huge elseif s == '-inf' then return -math.huge end
  return tonumber(s)
end
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  local want = (i == 1) and 'string' or 'hash'
  if t ~= 'none' and t ~= want then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. t .. ', not a ' .. want)
  end
end
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if last ~= nil and last >= seq then return 0 end
local ttl = tonumber(ARGV[2])
local a = 3
for k = 2, #KEYS do
  local key = KEYS[k]
  local n = tonumber(ARGV[a]); a = a + 1
  for j = 1, n do
    redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1]); a = a + 2
  end
  local lo, hi = ARGV[a], ARGV[a + 1]; a = a + 2
  if lo ~= '' then
    local cur = num(redis.call('HGET', key, 'min_pctr') or '')
    if cur == nil or num(lo) < cur then redis.call('HSET', key, 'min_pctr', lo) end
  end
  if hi ~= '' then
    local cur = num(redis.call('HGET', key, 'max_pctr') or '')
    if cur == nil or num(hi) > cur then redis.call('HSET', key, 'max_pctr', hi) end
  end
  redis.call('EXPIRE', key, ttl)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
return 1
"""


def counts_key(prefix: str, rollout_id: str, version: str) -> str:
    """The hash of one version's counts in one rollout:
    ``{prefix}:rollout:serving:{rollout_id}:{version}``."""
    return f"{prefix}:rollout:serving:{rollout_id}:{version}"


def flush_key(prefix: str, token: str) -> str:
    """One writer's flush marker (the last ``seq`` applied):
    ``{prefix}:rollout:serving-flush:{token}``."""
    return f"{prefix}:rollout:serving-flush:{token}"


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _sum(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass(frozen=True)
class ServingCounts:
    """One version's serving counts (cumulative, or a delta to add).

    Attributes:
        requests: answers (successful or failed).
        errors: failed answers (the model raised).
        latency_counts: successful answers per :data:`LATENCY_BOUNDS_MS` bucket (not
            cumulative; all zeros by default).
        pub_requests / pub_errors: publisher → requests / errors.
        min_pctr / max_pctr: the smallest / largest pCTR served (None: none yet).
    """

    requests: int = 0
    errors: int = 0
    latency_counts: tuple[int, ...] = (0,) * len(LATENCY_BOUNDS_MS)
    pub_requests: Mapping[str, int] = field(default_factory=dict)
    pub_errors: Mapping[str, int] = field(default_factory=dict)
    min_pctr: float | None = None
    max_pctr: float | None = None

    def __post_init__(self) -> None:
        if len(self.latency_counts) != len(LATENCY_BOUNDS_MS):
            raise InputError(f"latency_counts: {len(LATENCY_BOUNDS_MS)} buckets expected, "
                             f"got {len(self.latency_counts)}")

    @property
    def empty(self) -> bool:
        """Nothing counted (a flush of it would change nothing)."""
        return not self.requests and self.min_pctr is None and self.max_pctr is None

    def merge(self, other: ServingCounts) -> ServingCounts:
        """The counts of both: counters summed, the min of the mins, the max of the maxes."""
        return ServingCounts(
            self.requests + other.requests, self.errors + other.errors,
            tuple(a + b for a, b in zip(self.latency_counts, other.latency_counts,
                                        strict=True)),
            _sum(self.pub_requests, other.pub_requests), _sum(self.pub_errors, other.pub_errors),
            _min(self.min_pctr, other.min_pctr), _max(self.max_pctr, other.max_pctr))

    @classmethod
    def answer(cls, publisher: str, latency_ms: float | None = None, *,
               pctr: tuple[float, float] | None = None, error: bool = False) -> ServingCounts:
        """The delta of ONE answer: a success with its latency (ms) and its predictions'
        (min, max), or a failure (``error``; no latency, no predictions)."""
        lat = [0] * len(LATENCY_BOUNDS_MS)
        if latency_ms is not None and not error:
            lat[bucket(latency_ms)] = 1
        lo, hi = (None, None) if pctr is None or error else clean_range(*pctr)
        return cls(1, int(error), tuple(lat), {publisher: 1},
                   {publisher: 1} if error else {}, lo, hi)

    def increments(self) -> list[tuple[str, int]]:
        """The non-zero HINCRBY (field, increment) pairs of this delta."""
        out = [("requests", self.requests), ("errors", self.errors)]
        out += list(zip(LATENCY_FIELDS, self.latency_counts, strict=True))
        out += [(f"pub_requests:{p}", n) for p, n in self.pub_requests.items()]
        out += [(f"pub_errors:{p}", n) for p, n in self.pub_errors.items()]
        return [(f, n) for f, n in out if n]

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> ServingCounts:
        """Parse a count hash (HGETALL's reply, bytes or str); unknown fields are ignored.

        Raises:
            InputError: a field that is not a number.
        """
        lat = [0] * len(LATENCY_BOUNDS_MS)
        req: dict[str, int] = {}
        err: dict[str, int] = {}
        scalars: dict[str, str] = {}
        try:
            for k, v in raw.items():
                name = k.decode() if isinstance(k, bytes) else str(k)
                value = v.decode() if isinstance(v, bytes) else str(v)
                if name in _LAT_INDEX:
                    lat[_LAT_INDEX[name]] = int(value)
                elif name.startswith("pub_requests:"):
                    req[name[len("pub_requests:"):]] = int(value)
                elif name.startswith("pub_errors:"):
                    err[name[len("pub_errors:"):]] = int(value)
                else:
                    scalars[name] = value
            lo, hi = scalars.get("min_pctr"), scalars.get("max_pctr")
            return cls(int(scalars.get("requests", 0)), int(scalars.get("errors", 0)),
                       tuple(lat), req, err, None if lo is None else float(lo),
                       None if hi is None else float(hi))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"invalid serving counts: {exc}") from exc

    def to_arm_stats(self) -> ArmStats:
        """As the gates read them: requests, errors, the latency histogram, the pCTR
        range and ``segments["publisher"]`` (impressions and clicks 0: the streams'
        part)."""
        pubs = {p: SegmentStats(errors=self.pub_errors.get(p, 0), requests=n)
                for p, n in self.pub_requests.items()}
        return ArmStats(requests=self.requests, errors=self.errors,
                        latency_bounds_ms=LATENCY_BOUNDS_MS, latency_counts=self.latency_counts,
                        min_pctr=self.min_pctr, max_pctr=self.max_pctr,
                        segments={"publisher": pubs} if pubs else {})


def bucket(latency_ms: float) -> int:
    """The :data:`LATENCY_BOUNDS_MS` bucket of ``latency_ms`` (upper bounds inclusive:
    exactly 10 ms is in ``lat_le_10``)."""
    return bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def clean_range(lo: float, hi: float) -> tuple[float, float]:
    """A prediction range as stored: a NaN minimum is ``-inf``, a NaN maximum ``inf``
    (a NaN prediction is out of [0, 1], never hidden)."""
    return (-math.inf if math.isnan(lo) else lo), (math.inf if math.isnan(hi) else hi)


def _text(x: float | None) -> str:
    if x is None:
        return ""
    return "inf" if x == math.inf else "-inf" if x == -math.inf else repr(float(x))


class _Redis(Protocol):
    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def pipeline(self, transaction: bool = True) -> Any: ...


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def flush_batch(client: _Redis, prefix: str,
                batch: Mapping[tuple[str, str], ServingCounts], *, token: str, seq: int,
                ttl_s: int = COUNTS_TTL_S) -> bool:
    """Add ``batch`` ((rollout_id, version) → delta) to Redis in ONE atomic script.

    Args:
        client: a redis-py client (``eval``).
        prefix: the deployment's key prefix.
        batch: the deltas; empty ones are left out.
        token: the writer's unique token (per process lifetime).
        seq: this batch's sequence number: one more than the writer's last batch; a
            resend of a batch whose outcome is unknown reuses its seq.
        ttl_s: the counts' (and marker's) expiry, refreshed by every flush.

    Returns:
        True when this call applied the batch, False when Redis had already applied
        this ``seq`` (a resend after a lost reply): either way the batch is in Redis.

    Raises:
        OnlineStoreError: Redis did not confirm (transient: the batch may or may not
            be applied; resend it with the same ``seq``), or a key of the wrong type.
    """
    keys, args = [flush_key(prefix, token)], [str(seq), str(ttl_s)]
    for (rollout_id, version), delta in batch.items():
        if delta.empty:
            continue
        keys.append(counts_key(prefix, rollout_id, version))
        pairs = delta.increments()
        args.append(str(len(pairs)))
        for name, n in pairs:
            args += [name, str(n)]
        lo, hi = (delta.min_pctr, delta.max_pctr)
        if lo is not None and hi is not None:
            lo, hi = clean_range(lo, hi)
        args += [_text(lo), _text(hi)]
    if len(keys) == 1:
        return True
    try:
        return bool(client.eval(FLUSH_SCRIPT, len(keys), *keys, *args))
    except _redis_errors() as exc:
        raise OnlineStoreError(f"cannot flush the serving counts: {type(exc).__name__}: {exc}",
                               transient=True) from exc


def flush_deltas(client: _Redis, prefix: str, rollout_id: str, version: str,
                 deltas: ServingCounts, *, token: str, seq: int,
                 ttl_s: int = COUNTS_TTL_S) -> bool:
    """:func:`flush_batch` of one version's delta (same arguments, result and errors)."""
    return flush_batch(client, prefix, {(rollout_id, version): deltas}, token=token,
                       seq=seq, ttl_s=ttl_s)


def _read(client: _Redis, prefix: str, rollout_id: str, versions: tuple[str, ...]
          ) -> list[ServingCounts]:
    try:
        pipe = client.pipeline(transaction=True)  # MULTI/EXEC: both arms at one instant
        for v in versions:
            pipe.hgetall(counts_key(prefix, rollout_id, v))
        raws = pipe.execute()
    except _redis_errors() as exc:
        raise OnlineStoreError(f"cannot read the serving counts: {type(exc).__name__}: {exc}",
                               transient=True) from exc
    return [ServingCounts.from_hash(raw or {}) for raw in raws]


def read_serving_counts(client: _Redis, prefix: str, rollout_id: str, version: str
                        ) -> ServingCounts:
    """One version's cumulative counts in one rollout (zero when none were flushed).

    Raises:
        OnlineStoreError: Redis cannot answer.
        InputError: the hash holds a field that is not a number.
    """
    return _read(client, prefix, rollout_id, (version,))[0]


class ServingStatsSource:
    """A :class:`~headrace.rollout.source.StatsSource` of the servers' counts of one
    rollout: requests, errors, latency histogram, pCTR range and publisher segments
    (impressions, clicks and Σ pCTR are 0: they come from the streams; combine with
    :class:`~headrace.rollout.source.MergedStatsSource`).

    Args:
        client: a redis-py client (``pipeline``) with a socket timeout.
        prefix: the deployment's key prefix.
        rollout_id: the rollout whose counts are read.
    """

    def __init__(self, client: Any, prefix: str, rollout_id: str) -> None:
        self.client = client
        self.prefix = prefix
        self.rollout_id = rollout_id

    def read(self, champion: str, challenger: str) -> tuple[ArmStats, ArmStats]:
        """(champion's, challenger's) counts, read in one MULTI/EXEC round trip.

        Raises:
            StatsUnavailable: Redis cannot answer, or a hash is invalid.
        """
        try:
            champ, chall = _read(self.client, self.prefix, self.rollout_id,
                                 (champion, challenger))
            return champ.to_arm_stats(), chall.to_arm_stats()
        except (OnlineStoreError, InputError) as exc:
            raise StatsUnavailable(f"serving counts of rollout {self.rollout_id}: {exc}"
                                   ) from exc
