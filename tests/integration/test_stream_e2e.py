"""The stream worker end to end on the real local stack, checked against the oracle.

The full adversarial stream (``tests.adversarial.generate()``: ~100k events over 9 days,
>= 500 users, lateness edge cases, malformed messages) is produced to the real broker in
arrival order per partition (mostly one raw message per event, about a fifth of the
events as Arrow envelopes), one ``headrace worker --until-idle`` subprocess processes
it, and then:

a. every feature of a few hundred probes (all four entities, T >= the entity's latest
   event) read through ``headrace get --at T --json`` equals the oracle exactly (in
   process for every probe, through real subprocesses for a batched sample);
b. the late topic holds exactly the oracle's late events, the dead-letter topic exactly
   the malformed messages with their expected reason codes (both read to the fetch high
   watermark, never ListOffsets: defect D1 in test_broker_contract.py), with no duplicates;
c. the offline ``events/`` Parquet rows are exactly the accepted events, once each,
   with their source coordinates and Kafka timestamps.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import streamcheck as sc
from tests import streamkit as sk
from tests.adversarial import generate, probe_points

if TYPE_CHECKING:
    from tests.conftest import Namespace

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(480)]

SEED = 20240304
N_PROBES = 600  # probe_points spreads them over 4 entities (fewer publishers/campaigns)
WORKER_TIMEOUT_S = 300
SUBPROCESS_IDS = 60  # ids per entity in the subprocess sample


def _subprocess_sample(ns: Namespace, exp: sc.Expected, rng: random.Random) -> list[str]:
    """Batched ``headrace get`` subprocess calls (many ids, one T each) vs the oracle."""
    problems: list[str] = []
    env = ns.subprocess_env()
    for entity in ("user", "ad", "campaign", "publisher"):
        ids = exp.index.ids(entity)
        chosen = rng.sample(ids, min(SUBPROCESS_IDS, len(ids)))
        latest = max(exp.index.latest(entity, i) or 0 for i in chosen)
        # T at the newest of them (that one's own events excluded) and a random later T
        for at in (latest, latest + rng.randrange(1, 2 * 24 * 3_600_000)):
            code, lines, stderr = sk.get_subprocess(env, entity, chosen, at)
            got: dict[sk.Probe, Any] = {}
            for line in lines:
                got[(entity, line["id"], at)] = line.get("features") or f"error {line}"
            for eid in chosen:
                got.setdefault((entity, eid, at), f"no line (exit {code}): {stderr[-300:]}")
            if code != 0:
                problems.append(f"headrace get --entity {entity} --at {at}: exit {code} "
                                f"{stderr[-300:]}")
            problems += sc.feature_problems(exp, got)
    return problems


def test_stream_end_to_end_matches_oracle(
    ns: Namespace, tmp_path: Path, redis_client: Any
) -> None:
    timings: dict[str, float] = {}
    bootstrap = ns.stack.kafka_bootstrap
    started = time.monotonic()

    with sk.timer("generate", timings):
        stream = generate(seed=SEED, partitions=sk.PARTITIONS)
    users = {e["user_id"] for e in stream.events if e["user_id"] is not None}
    assert len(stream.events) >= 100_000 and len(users) >= 500

    with sk.timer("produce", timings):
        sk.create_source_topics(bootstrap, [ns.topic("impressions"), ns.topic("clicks")],
                                sk.PARTITIONS)
        produced = sk.produce_arrivals(bootstrap, ns.topic_prefix, stream.arrivals)
    print(f"produced {len(stream.arrivals)} arrivals as {produced.messages} messages "
          f"({produced.envelopes} Arrow envelopes holding {produced.enveloped_events} events)")
    assert produced.envelopes > 0

    with sk.timer("oracle", timings):
        exp = sc.expectations(stream, produced)
    late_ids = {e["event_id"] for e in exp.late}
    for a in stream.arrivals:  # the generator's intent and the oracle agree
        if a.event is not None:
            assert (a.event["event_id"] in late_ids) == (a.intent in ("edge_late", "far_late"))
    print(f"oracle: {len(exp.accepted)} accepted, {len(exp.late)} late, "
          f"{len(exp.dead)} malformed")

    env = sk.worker_env(ns, tmp_path)
    worker = sk.Worker(env, tmp_path / "worker.log", until_idle=5)
    try:
        with sk.timer("worker", timings):
            rc = worker.wait(WORKER_TIMEOUT_S)
    finally:
        worker.kill()
    assert rc == 0, f"worker exited {rc}:\n{worker.log_tail()}"

    problems: list[str] = []
    # (a) online features through `headrace get --at T --json`
    with sk.timer("probes (in-process CLI)", timings):
        probes = probe_points(exp.index, N_PROBES, seed=SEED)
        got, calls = sk.online_features(ns.settings_env, probes)
        problems += sc.feature_problems(exp, got)
    by_entity = {e: sum(p[0] == e for p in probes) for e in ("user", "ad", "campaign", "publisher")}
    live = sum(not _default(exp, p) for p in probes)
    print(f"{len(probes)} probes {by_entity} ({live} with non-default features), {calls} calls")
    assert live >= len(probes) // 2, "too few probes see live features to mean anything"
    with sk.timer("probes (subprocess CLI)", timings):
        problems += _subprocess_sample(ns, exp, random.Random(SEED))

    # (b) dead-letter topics, read to the fetch high watermark
    with sk.timer("dead-letter topics", timings):
        late = sk.side_records(bootstrap, ns.topic_prefix, "headrace-late")
        dead = sk.side_records(bootstrap, ns.topic_prefix, "headrace-dlq")
        p_late, _ = sc.late_problems(exp, late, allow_duplicates=False)
        p_dead, _ = sc.dead_problems(exp, dead, allow_duplicates=False)
        problems += p_late + p_dead
    print(f"late topic: {len(late)} records (oracle {len(exp.late)}); "
          f"dlq: {len(dead)} records (malformed {len(exp.dead)})")

    # (c) the offline store
    with sk.timer("offline store", timings):
        settings = ns.settings()
        tables = {k: sk.read_offline_events(settings, k) for k in ("impression", "click")}
        problems += sc.offline_problems(exp, tables)
    print(f"offline rows: { {k: t.num_rows for k, t in tables.items()} } "
          f"(accepted {len(exp.accepted)})")

    timings["total"] = round(time.monotonic() - started, 2)
    print(f"[timing] summary: {timings}")
    assert not problems, "\n".join(["stream output differs from the oracle:", *problems])


def _default(exp: sc.Expected, probe: sk.Probe) -> bool:
    from tests.oracle import is_default

    entity, eid, at = probe
    return is_default(exp.index, entity, eid, at)
