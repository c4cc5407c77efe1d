"""``headrace lag``: consumer lag per topic/partition (fetch high watermark, not ListOffsets)."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lag", help="show consumer lag per topic partition",
                       description="Committed offset, end (from the fetch high watermark) and "
                                   "lag of the worker group on every input topic partition.")
    p.add_argument("--group", default=None, help="consumer group (default HEADRACE_GROUP_ID)")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {topic, partition, group, committed, end, lag}")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from feature_defs.layout import repartition_topic
    from feature_defs.registry import registry_for
    from headrace.core.settings import WorkerSettings
    from streams.lag import consumer_lag

    settings = WorkerSettings()
    topo = registry_for(settings, args.definitions).topology
    topics = [settings.topic(t) for t in topo.sources] + sorted(
        {settings.topic(repartition_topic(e)) for e in topo.repartitioned_entities})
    rows = consumer_lag(settings.confluent_consumer(args.group or settings.group_id),
                        args.group or settings.group_id, topics)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
        return 0
    print(f"{'topic':40} {'part':>4} {'committed':>10} {'end':>10} {'lag':>8}")
    for r in rows:
        print(f"{r.topic:40} {r.partition:>4} {str(r.committed):>10} {r.end:>10} {r.lag:>8}")
    print(f"total lag: {sum(max(0, r.lag) for r in rows)}")
    return 0
