"""Comparisons of the stream end-to-end tests: what the worker produced against what
:mod:`tests.oracle` expects, as lists of readable problems (empty when they agree).

Online features, the late and dead-letter topics and the offline store each have one
function; :mod:`tests.streamkit` moves the bytes these compare.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tests.adversarial import Stream
from tests.oracle import OracleIndex, accepted_events, features_as_of
from tests.streamkit import Probe, Produced, Record, _same

__all__ = [
    "Expected",
    "expectations",
    "feature_problems",
    "late_problems",
    "reason_code",
    "dead_problems",
    "offline_problems",
    "offline_rows",
]


# --------------------------------------------------------------------------- expectations
@dataclass
class Expected:
    """The oracle's view of one produced stream."""

    stream: Stream
    produced: Produced
    accepted: list[dict[str, Any]]
    late: list[dict[str, Any]]
    index: OracleIndex
    #: event_id -> (topic, partition, offset, index)
    coords_of: dict[str, tuple[str, int, int, int]]
    #: (topic, partition, offset, index) -> expected reason code of each malformed arrival
    dead: dict[tuple[str, int, int, int], str]
    #: event_id -> its index in ``stream.arrivals``
    arrival_of: dict[str, int]

    def late_coords(self) -> set[tuple[str, int, int, int]]:
        return {self.coords_of[e["event_id"]] for e in self.late}

    def features(self, entity: str, eid: str, as_of: int) -> dict[str, Any]:
        return features_as_of(self.index, entity, eid, as_of)


def expectations(stream: Stream, produced: Produced) -> Expected:
    accepted, late = accepted_events(stream.events, stream.partitions)
    coords_of: dict[str, tuple[str, int, int, int]] = {}
    arrival_of: dict[str, int] = {}
    dead: dict[tuple[str, int, int, int], str] = {}
    for i, a in enumerate(stream.arrivals):
        if a.event is not None:
            coords_of[a.event["event_id"]] = produced.coords[i]
            arrival_of[a.event["event_id"]] = i
        else:
            assert a.reason is not None
            dead[produced.coords[i]] = a.reason
    return Expected(stream, produced, accepted, late, OracleIndex(accepted), coords_of, dead,
                    arrival_of)


# --------------------------------------------------------------------------- workers

def feature_problems(exp: Expected, got: dict[Probe, dict[str, Any] | str],
                     limit: int = 30) -> list[str]:
    """Every probe whose features differ from the oracle (feature by feature)."""
    problems: list[str] = []
    for (entity, eid, at), features in got.items():
        want = exp.features(entity, eid, at)
        if isinstance(features, str):
            problems.append(f"{entity} {eid} @ {at}: {features}")
            continue
        diff = {n: (features.get(n, "<missing>"), w) for n, w in want.items()
                if not _same(features.get(n, "<missing>"), w)}
        extra = set(features) - set(want)
        if diff or extra:
            latest = exp.index.latest(entity, eid)
            problems.append(f"{entity} {eid} @ {at} (latest event {latest}): "
                            f"(got, oracle) {diff}" + (f" extra {extra}" if extra else ""))
    more = [f"... {len(problems) - limit} more"] if len(problems) > limit else []
    return problems[:limit] + more




def late_problems(exp: Expected, records: Sequence[Record], *,
                  allow_duplicates: bool) -> tuple[list[str], int]:
    """The late topic against the oracle's late events. Returns (problems, #duplicates)."""
    problems: list[str] = []
    want = exp.late_coords()
    by_coords: dict[tuple[str, int, int, int], list[Record]] = defaultdict(list)
    for r in records:
        by_coords[r[0]].append(r)
    got = set(by_coords)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        problems.append(f"late topic: {len(missing)} oracle-late events missing {missing[:5]}, "
                        f"{len(extra)} records that are not late {extra[:5]}")
    event_at = {c: e for e in exp.late for c in [exp.coords_of[e["event_id"]]]}
    n_dup = 0
    for coords, recs in by_coords.items():
        if len(recs) > 1:
            n_dup += len(recs) - 1
            if not allow_duplicates:
                problems.append(f"late topic: {len(recs)} records for {coords}")
            elif len({(r[1], r[2]) for r in recs}) > 1:
                problems.append(f"late topic: differing duplicates for {coords}: {recs}")
        event = event_at.get(coords)
        if event is None:
            continue
        reason, value = recs[0][1], recs[0][2]
        if reason.split(":", 1)[0] != "late":
            problems.append(f"late topic: {coords} has reason {reason!r}")
        try:
            body = json.loads(value)
        except ValueError:
            problems.append(f"late topic: {coords} value is not JSON: {value[:80]!r}")
            continue
        if body.get("event_id") != event["event_id"] or body.get("ts") != event["ts"]:
            problems.append(f"late topic: {coords} holds {body.get('event_id')}@{body.get('ts')}"
                            f", the event there is {event['event_id']}@{event['ts']}")
    return problems[:30], n_dup


def reason_code(reason: str) -> str:
    """The code of an ``hr-reason`` header (its first token)."""
    return reason.split(":", 1)[0].strip()


def dead_problems(exp: Expected, records: Sequence[Record], *, allow_duplicates: bool,
                  check_codes: bool = True) -> tuple[list[str], int]:
    """The dead-letter topic against the malformed arrivals. Returns (problems, #dups).

    ``check_codes=False`` skips comparing reason codes with the generator's (for tests
    that compare reasons with a reference run instead)."""
    problems: list[str] = []
    by_coords: dict[tuple[str, int, int, int], list[Record]] = defaultdict(list)
    for r in records:
        by_coords[r[0]].append(r)
    missing = sorted(set(exp.dead) - set(by_coords))
    extra = sorted(set(by_coords) - set(exp.dead))
    if missing:
        problems.append(f"dlq: {len(missing)} malformed messages missing: "
                        + ", ".join(f"{c} ({exp.dead[c]})" for c in missing[:8]))
    if extra:
        problems.append(f"dlq: {len(extra)} unexpected records: "
                        + ", ".join(f"{c} {by_coords[c][0][1][:80]!r}" for c in extra[:8]))
    raw_at = {exp.produced.coords[i]: a.value for i, a in enumerate(exp.stream.arrivals)
              if a.event is None}
    wrong: list[str] = []
    n_dup = 0
    for coords, recs in by_coords.items():
        if len(recs) > 1:
            n_dup += len(recs) - 1
            if not allow_duplicates:
                problems.append(f"dlq: {len(recs)} records for {coords}")
            elif len({(reason_code(r[1]), r[2]) for r in recs}) > 1:
                # the reason's detail may hold the wall clock (ts_in_future): codes only
                problems.append(f"dlq: differing duplicates for {coords}: {recs}")
        want = exp.dead.get(coords)
        if want is None:
            continue
        code = reason_code(recs[0][1])
        if check_codes and code != want:
            wrong.append(f"{coords} expected {want}, got {recs[0][1][:120]!r} "
                         f"(value {raw_at[coords][:60]!r})")
        if recs[0][2] != raw_at[coords]:
            problems.append(f"dlq: {coords} value is not the raw message")
    if wrong:
        problems.append(f"dlq: {len(wrong)} wrong reason codes: " + "; ".join(wrong[:10]))
    return problems[:30], n_dup


_KIND_FIELDS = {
    "impression": ("event_id", "ts", "user_id", "ad_id", "campaign_id", "publisher_id",
                   "placement", "creative_type", "device_type", "country", "bid_cpm"),
    "click": ("event_id", "ts", "impression_id", "user_id", "ad_id", "campaign_id",
              "publisher_id"),
}


def offline_problems(exp: Expected, tables: dict[str, pa.Table]) -> list[str]:
    """The ``events/`` rows against the oracle's accepted events: no duplicates, nothing
    late or malformed, every column equal to the event and its source coordinates."""
    problems: list[str] = []
    accepted_ids = {e["event_id"] for e in exp.accepted}
    late_ids = {e["event_id"] for e in exp.late}
    for kind, table in tables.items():
        want = {e["event_id"]: e for e in exp.accepted if e["type"] == kind}
        rows = table.to_pylist() if table.num_rows else []
        coords = Counter((r["_partition"], r["_offset"], r["_index"]) for r in rows)
        dups = {c: n for c, n in coords.items() if n > 1}
        if dups:
            problems.append(f"offline {kind}: {len(dups)} duplicated (_partition,_offset,_index)"
                            f", e.g. {sorted(dups.items())[:5]}")
        ids = Counter(r["event_id"] for r in rows)
        got_ids = set(ids)
        if got_ids != set(want):
            missing = sorted(set(want) - got_ids)
            extra = sorted(got_ids - set(want))
            problems.append(
                f"offline {kind}: {len(missing)} accepted events missing {missing[:5]}, "
                f"{len(extra)} extra ({len(set(extra) & late_ids)} late, "
                f"{len(set(extra) - accepted_ids - late_ids)} unknown) {extra[:5]}")
        bad: list[str] = []
        for r in rows:
            e = want.get(r["event_id"])
            if e is None:
                continue
            i = exp.arrival_of[e["event_id"]]
            topic, part, off, idx = exp.produced.coords[i]
            expect = {f: e[f] for f in _KIND_FIELDS[kind]}
            expect.update(_partition=part, _offset=off, _index=idx,
                          _ingest_ms=exp.produced.timestamps[i])
            diff = {k: (r.get(k), v) for k, v in expect.items() if r.get(k) != v}
            date = time.strftime("%Y-%m-%d", time.gmtime(e["ts"] // 1000))
            if f"/date={date}/" not in r["_file"]:
                diff["_file"] = (r["_file"], f"date={date}")
            if diff:
                bad.append(f"{e['event_id']}: (got, want) {diff}")
        if bad:
            problems.append(f"offline {kind}: {len(bad)} rows differ from their event: {bad[:5]}")
    return problems


def offline_rows(tables: dict[str, pa.Table]) -> dict[str, list[tuple[Any, ...]]]:
    """Every offline row as a sorted tuple of (column, value) pairs, per kind (no ``_file``)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for kind, table in tables.items():
        rows = table.drop_columns(["_file"]).to_pylist() if table.num_rows else []
        out[kind] = sorted(tuple(sorted(r.items())) for r in rows)
    return out
