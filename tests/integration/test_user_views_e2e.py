"""A user's own definitions (``tests.user_views:ALL_VIEWS``) end to end on the real local
stack, through a SIGKILL, checked against the generic brute-force oracle
(:mod:`tests.oracle_views`) for every operator and window kind.

A small adversarial stream (``generate(small=True)``: ~6k events over 2 days, lateness
edge cases, out-of-order arrival up to 60 s, malformed messages) arrives partly live
while a ``headrace worker --definitions tests.user_views:ALL_VIEWS`` is SIGKILLed
mid-processing; a final ``--until-idle`` worker finishes it. Then:

a. every feature of every view (the shipped ones and the user's: a clicks-only view keyed
   by publisher, an impressions-only one keyed by ad with SUM/MEAN/MIN/MAX/LAST over a
   tumbling hour and a lifetime window and a declared TTL, a user view with a 5 s
   allowed lateness) read through ``headrace get --at T --json --definitions ...`` for
   a few hundred probes equals the oracle (SUM/MEAN and ratios of sums within 1e-9:
   the oracle sums with ``math.fsum``);
b. a point-in-time training set (``build_training_set`` with the user registry) over
   random label times, before and after each entity's events, equals the oracle;
c. the late topic holds the events late for every view (the 60 s views), each once or
   as identical duplicates; the offline ``events/`` are exactly the rest.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from feature_defs.registry import load_registry
from headrace.core.settings import OfflineSettings
from offline.training_set import build_training_set
from tests import oracle_views as ov
from tests import streamcheck as sc
from tests import streamkit as sk
from tests.adversarial import Stream, generate
from tests.oracle import DAY, MINUTE
from tests.user_views import ALL_SPECS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEFINITIONS = "tests.user_views:ALL_VIEWS"
ARGS = ("--definitions", DEFINITIONS)
SEED = 12_012
IDS_PER_ENTITY = 30
LABELS = 600
WORKER_TIMEOUT_S = 120
PROGRESS_TIMEOUT_S = 60
ENTITY_OF = {"user_id": "user", "ad_id": "ad", "campaign_id": "campaign",
             "publisher_id": "publisher"}


# --------------------------------------------------------------------------- the oracle
class Oracles:
    """One :class:`ov.ViewOracle` per spec, over the events that view applies."""

    def __init__(self, stream: Stream) -> None:
        self.views = [ov.ViewOracle(spec, ov.applied_events(stream.events, spec,
                                                            stream.partitions))
                      for spec in ALL_SPECS]
        #: features compared within a tolerance: sums (fsum in the oracle) and means,
        #: and ratios with a sum in them
        self.inexact = {f.name for spec in ALL_SPECS for f in spec.features
                        if any(m.op in ("sum", "mean") for m in f.measures)}

    def of(self, key: str) -> list[ov.ViewOracle]:
        return [o for o in self.views if o.view.key == key]

    def ids(self, key: str) -> list[str]:
        return sorted({i for o in self.of(key) for i in o.ids()})

    def latest(self, key: str, eid: str) -> int | None:
        """Latest applied event of the entity over all its views (``get --at`` answers
        as of that time or later)."""
        times = [t for o in self.of(key) if (t := o.latest(eid)) is not None]
        return max(times) if times else None

    def features(self, key: str, eid: str, at: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for o in self.of(key):
            out.update(o.features_as_of(eid, at))
        return out

    def same(self, name: str, got: Any, want: Any) -> bool:
        if name in self.inexact and isinstance(got, float) and isinstance(want, float):
            return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
        return type(got) is type(want) and got == want


def _probes(oracles: Oracles, rng: random.Random) -> list[sk.Probe]:
    """(entity, id, T) with T at or after the entity's latest event: equal to it, just
    after, within minutes, within a day, at each view's TTL edges, far beyond."""
    probes: list[sk.Probe] = []
    for key, entity in ENTITY_OF.items():
        ids = oracles.ids(key)
        ttls = sorted({o.view.effective_ttl_ms for o in oracles.of(key)})
        for k, eid in enumerate(rng.sample(ids, min(IDS_PER_ENTITY, len(ids)))):
            latest = oracles.latest(key, eid)
            assert latest is not None
            ttl = ttls[k % len(ttls)]
            offset = [0, 1, rng.randrange(2, 10 * MINUTE), rng.randrange(MINUTE, DAY),
                      ttl - 1, ttl, 10 * DAY][k % 7]
            probes.append((entity, eid, latest + offset))
        probes.append((entity, f"{entity}-never-seen", 1_800_000_000_000))
    return probes


def _online_problems(oracles: Oracles, got: dict[sk.Probe, Any]) -> list[str]:
    problems = []
    key_of = {e: k for k, e in ENTITY_OF.items()}
    for (entity, eid, at), features in got.items():
        want = oracles.features(key_of[entity], eid, at)
        if isinstance(features, str):
            problems.append(f"{entity} {eid} @ {at}: {features}")
            continue
        diff = {n: (features.get(n, "<missing>"), w) for n, w in want.items()
                if not oracles.same(n, features.get(n, "<missing>"), w)}
        if diff or set(features) - set(want):
            problems.append(f"online {entity} {eid} @ {at}: (got, oracle) {diff} "
                            f"extra {set(features) - set(want)}")
    return problems


def _labels(oracles: Oracles, stream: Stream, rng: random.Random) -> pa.Table:
    """Random label rows: every key column, T anywhere from before the stream to a day
    after it (point in time: no need to be after the entity's events)."""
    cols: dict[str, list[Any]] = {"ts": []}
    ids = {key: [*oracles.ids(key), f"{ENTITY_OF[key]}-never-seen"] for key in ENTITY_OF}
    for _ in range(LABELS):
        cols["ts"].append(rng.randrange(stream.start_ms - MINUTE, stream.end_ms + DAY))
        for key, pool in ids.items():
            cols.setdefault(key, []).append(rng.choice(pool))
    return pa.table({"ts": pa.array(cols.pop("ts"), pa.int64()),
                     **{k: pa.array(v, pa.string()) for k, v in cols.items()}})


def _offline_problems(oracles: Oracles, labels: pa.Table, out: pa.Table) -> list[str]:
    problems = []
    rows = out.to_pylist()
    for n, row in enumerate(rows):
        for key in ENTITY_OF:
            want = oracles.features(key, row[key], row["ts"])
            diff = {f: (row.get(f, "<missing>"), w) for f, w in want.items()
                    if not oracles.same(f, row.get(f, "<missing>"), w)}
            if diff:
                problems.append(f"offline label {n} {key}={row[key]} @ {row['ts']}: "
                                f"(got, oracle) {diff}")
    assert len(rows) == labels.num_rows
    return problems


# --------------------------------------------------------------------------- the run
def _online_next_sum(redis_client: Any, ns: Any, group: str) -> int:
    sources = (ns.topic("impressions"), ns.topic("clicks"))
    return sum(rec.get("online_next", 0)
               for key, rec in sk.commit_records(redis_client, ns.redis_prefix, group).items()
               if key.rsplit(":", 2)[1] in sources)


def test_user_views_match_the_oracle_online_and_offline_through_a_sigkill(
    ns: Any, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    rng = random.Random(SEED)
    bootstrap = ns.stack.kafka_bootstrap
    group = f"g{ns.id}"
    with sk.timer("generate + oracle", timings):
        stream = generate(seed=SEED, small=True, partitions=sk.PARTITIONS)
        oracles = Oracles(stream)
    pub = next(o for o in oracles.views if o.view.name == "publisher_clicks")
    assert len(pub.ids()) >= 5, "the stream must hold publisher clicks to mean anything"
    tight = next(o for o in oracles.views if o.view.name == "user_spend")
    loose = next(o for o in oracles.views if o.view.name == "user_activity")
    n_tight = sum(len(tight.events_of(i)) for i in tight.ids())
    n_loose = sum(len(loose.events_of(i)) for i in loose.ids())
    assert n_tight < n_loose, "some events must be late for the 5 s view only"

    sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                            sk.PARTITIONS)
    env = sk.worker_env(ns, tmp_path, group=group)
    upfront = len(stream.arrivals) // 2
    result: dict[str, Any] = {}

    def produce() -> None:
        try:
            result["produced"] = sk.produce_arrivals(
                bootstrap, ns.topic_prefix, stream.arrivals,
                pace=(upfront, (len(stream.arrivals) - upfront) / 4))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc

    producer = threading.Thread(target=produce, name="live-producer", daemon=True)
    producer.start()
    workers: list[sk.Worker] = []
    try:
        with sk.timer("worker, SIGKILLed mid-processing", timings):
            w = sk.Worker(env, tmp_path / "worker-0.log", extra_args=ARGS)
            workers.append(w)
            target = int(upfront * rng.uniform(0.2, 0.5))
            deadline = time.monotonic() + PROGRESS_TIMEOUT_S
            while _online_next_sum(redis_client, ns, group) < target:
                assert w.alive(), w.log_tail()
                assert time.monotonic() < deadline, f"no progress to {target}:\n{w.log_tail()}"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            killed_at = _online_next_sum(redis_client, ns, group)
            w.kill()
        producer.join(60)
        assert not producer.is_alive(), "the live producer did not finish"
        if "error" in result:
            raise result["error"]
        produced: sk.Produced = result["produced"]
        assert killed_at < produced.messages, "the stream was done before the SIGKILL"
        with sk.timer("final --until-idle worker", timings):
            final = sk.Worker(env, tmp_path / "worker-final.log", until_idle=3,
                              extra_args=ARGS)
            workers.append(final)
            rc = final.wait(WORKER_TIMEOUT_S)
        assert rc == 0, final.log_tail()
    finally:
        for w in workers:
            w.kill()
        producer.join(5)
    print(f"[kill] SIGKILL at online_next sum {killed_at} of {upfront} upfront arrivals")

    problems: list[str] = []
    with sk.timer("online probes", timings):
        probes = _probes(oracles, rng)
        got, _calls = sk.online_features(ns.settings_env, probes, ARGS)
        problems += _online_problems(oracles, got)
    live = sum(1 for (e, i, at) in probes
               if not all(o.is_default(i, at) for o in oracles.of(
                   next(k for k, v in ENTITY_OF.items() if v == e))))
    assert live >= len(probes) // 3, "too few probes see live features"

    with sk.timer("training set", timings):
        labels = _labels(oracles, stream, rng)
        settings = ns.settings(OfflineSettings, progress=False)
        features = [f.name for spec in ALL_SPECS for f in spec.features]
        out = build_training_set(labels, features, settings,
                                 registry=load_registry(DEFINITIONS))
        problems += _offline_problems(oracles, labels, out)

    with sk.timer("late topic + events/", timings):
        exp = sc.expectations(stream, produced)  # the 60 s rule: late for every view
        late = sk.side_records(bootstrap, ns.topic_prefix, "headrace-late")
        problems += sc.late_problems(exp, late, allow_duplicates=True)[0]
        tables = {k: sk.read_offline_events(ns.settings(), k) for k in ("impression", "click")}
        problems += sc.offline_problems(exp, tables)

    timings["total"] = round(time.monotonic() - started, 2)
    print(f"[result] {len(probes)} probes ({live} live), {labels.num_rows} labels, "
          f"{len(problems)} problems; [timing] {timings}")
    assert not problems, "\n".join(["user views differ from the oracle:", *problems[:40],
                                    f"({len(problems)} in all)"])
