"""One stream run's results (features, offline rows, side outputs) and their comparison
with a reference run of the same records and with the oracle (integration tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests import streamcheck as sc
from tests import streamkit as sk


@dataclass
class Snapshot:
    """Everything one run left behind, as the tests compare it."""

    exp: sc.Expected
    features: dict[sk.Probe, Any]
    offline: dict[str, list[tuple[Any, ...]]]
    offline_problems: list[str]
    late: list[sk.Record]
    dead: list[sk.Record]


def snapshot(ns: Any, exp: sc.Expected, probes: list[sk.Probe]) -> Snapshot:
    features, _calls = sk.online_features(ns.settings_env, probes)
    settings = ns.settings()
    tables = {k: sk.read_offline_events(settings, k) for k in ("impression", "click")}
    bootstrap = ns.stack.kafka_bootstrap
    return Snapshot(
        exp=exp,
        features=features,
        offline=sc.offline_rows(tables),
        offline_problems=sc.offline_problems(exp, tables),
        late=sk.side_records(bootstrap, ns.topic_prefix, "headrace-late"),
        dead=sk.side_records(bootstrap, ns.topic_prefix, "headrace-dlq"),
    )


def compare(run: Snapshot, ref: Snapshot, label: str) -> tuple[list[str], dict[str, int]]:
    """Problems of ``run`` against the reference run and the oracle; duplicate counts."""
    problems = [f"{label}: {p}" for p in sc.feature_problems(run.exp, run.features)]
    diff = [p for p in ref.features if run.features.get(p) != ref.features[p]]
    if diff:
        problems.append(f"{label}: {len(diff)} probes differ from the reference run, e.g. "
                        + "; ".join(f"{p}: {run.features.get(p)} vs {ref.features[p]}"
                                    for p in diff[:3]))
    problems += [f"{label}: {p}" for p in run.offline_problems]
    for kind in ("impression", "click"):
        mine, theirs = set(run.offline[kind]), set(ref.offline[kind])
        if mine != theirs or len(run.offline[kind]) != len(ref.offline[kind]):
            problems.append(
                f"{label}: offline {kind} rows differ from the reference: "
                f"{len(run.offline[kind])} rows vs {len(ref.offline[kind])}, "
                f"{len(mine - theirs)} only here e.g. {sorted(mine - theirs)[:1]}, "
                f"{len(theirs - mine)} only in the reference e.g. {sorted(theirs - mine)[:1]}")
    p_late, dup_late = sc.late_problems(run.exp, run.late, allow_duplicates=True)
    # reason codes vs the generator are test_stream_e2e's business; here: vs the reference
    p_dead, dup_dead = sc.dead_problems(run.exp, run.dead, allow_duplicates=True,
                                        check_codes=False)
    problems += [f"{label}: {p}" for p in p_late + p_dead]
    # late reasons carry the watermark (deterministic); dead-letter reasons may carry the
    # wall clock (ts_in_future), so those compare by code
    dead_mine = [(c, sc.reason_code(r), v) for c, r, v in run.dead]
    dead_theirs = [(c, sc.reason_code(r), v) for c, r, v in ref.dead]
    for name, mine, theirs in (("late", run.late, ref.late), ("dlq", dead_mine, dead_theirs)):
        if set(mine) != set(theirs):
            only = sorted(set(mine) - set(theirs))[:3]
            missing = sorted(set(theirs) - set(mine))[:3]
            problems.append(f"{label}: {name} records differ from the reference: "
                            f"only here {only}, only in the reference {missing}")
    return problems, {"late_duplicates": dup_late, "dlq_duplicates": dup_dead}
