"""``headrace apply``: validate the feature definitions and print the plan."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "plan_of"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="validate definitions and print the plan",
                       description="Validate every feature definition and print what Headrace "
                                   "will create: topics, keys, Redis layout, Parquet layout. "
                                   "Invalid definitions exit 2 listing every problem.")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run)


def plan_of(registry, settings) -> dict:  # noqa: ANN001 - Registry, CommonSettings
    """The plan ``headrace apply`` prints: topics, keys, Redis and Parquet layout, all
    read from the registry's compiled topology and the layout module."""
    from feature_defs.layout import (
        TOPIC_DLQ,
        TOPIC_LATE,
        chunk_file,
        commit_key,
        entity_key,
        events_dir,
        repartition_topic,
        view_dir,
    )

    topo = registry.topology
    topics = [settings.topic(t) for t in topo.sources]
    remote = sorted(topo.repartitioned_entities)
    internal = [settings.topic(repartition_topic(e)) for e in remote]
    root = settings.offline_uri
    views = []
    for plan in registry.plans.values():
        v = plan.view
        views.append({
            "view": v.id,
            "entity": v.entity.name,
            "key": v.entity.key,
            "sources": [s.name for s in v.sources],
            "consumed_from": [settings.topic(s.name) for s in v.sources]
            if topo.is_local(v.id) else [settings.topic(repartition_topic(v.entity.name))],
            "allowed_lateness_s": v.allowed_lateness.total_seconds(),
            "online_ttl_s": plan.ttl_ms / 1000,
            "redis": {"key": entity_key(settings.redis_prefix, v.entity.name, "<id>"),
                      "field": v.id,
                      "tiles": [{"tile_ms": r.tile_ms, "keep": r.keep} for r in plan.rings]},
            "parquet": f"{view_dir(root, v.id)}/date=YYYY-MM-DD/"
                       + chunk_file("<topic>", 0, 0).replace("p000", "p<partition>")
                       .replace("000000000000", "<first-offset>"),
            "features": [{"name": o.name, "window": o.window.label,
                          "default": o.default} for o in plan.outputs],
        })
    return {
        "topics": {"sources": topics, "internal": internal,
                   "dead_letters": [settings.topic(TOPIC_DLQ), settings.topic(TOPIC_LATE)],
                   "partitions": settings.partitions},
        "routing_key": topo.routing_key,
        "progress_key": commit_key(settings.redis_prefix, "<group>", "<topic>", 0)
        .replace(":0", ":<partition>"),
        "raw_events": [f"{events_dir(root, k)}/date=YYYY-MM-DD/" for k in topo.field_types],
        "views": views,
    }


def _run(args: argparse.Namespace) -> int:
    from feature_defs.registry import registry_for
    from headrace.core.settings import WorkerSettings

    settings = WorkerSettings()
    registry = registry_for(settings, args.definitions)
    plan = {"definitions": {"spec": registry.spec, "file": registry.source_file},
            **plan_of(registry, settings)}
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    t = plan["topics"]
    print(f"definitions {registry.spec} ({registry.source_file})")
    print(f"definitions OK: {len(plan['views'])} views, "
          f"{sum(len(v['features']) for v in plan['views'])} features")
    print(f"topics ({t['partitions']} partitions each): sources {', '.join(t['sources'])}; "
          f"internal {', '.join(t['internal'])}; dead letters {', '.join(t['dead_letters'])}")
    print(f"progress records: {plan['progress_key']}")
    for v in plan["views"]:
        print(f"\nview {v['view']}  entity={v['entity']} key={v['key']}  "
              f"ttl={v['online_ttl_s']:.0f}s lateness={v['allowed_lateness_s']:.0f}s")
        print(f"  consumes  {', '.join(v['consumed_from'])}")
        print(f"  redis     HASH {v['redis']['key']} field {v['redis']['field']}  tiles "
              + ", ".join(f"{r['keep']}x{r['tile_ms']}ms" for r in v['redis']['tiles']))
        print(f"  parquet   {v['parquet']}")
        for f in v["features"]:
            print(f"  feature   {f['name']}  (default {f['default']})")
    return 0
