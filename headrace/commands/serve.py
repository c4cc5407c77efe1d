"""``headrace serve`` (the gRPC feature server) and ``headrace priors`` (cold-start priors)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the gRPC feature server",
        description="Serve headrace.v1.FeatureService (plus gRPC health and reflection) from "
                    "the online store. Settings come from HEADRACE_* variables (redis_url, "
                    "redis_prefix, port, redis_budget_ms, breaker_*, priors_refresh_s, max_ids, "
                    "metrics_port). Prints one JSON line {\"event\": \"listening\", ...} when "
                    "ready; SIGTERM/SIGINT stop it gracefully.")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default HEADRACE_PORT; "
                                                          "0 picks a free one)")
    p.add_argument("--host", default=None,
                   help="bind address (default HEADRACE_HOST, else 127.0.0.1: local clients "
                        "only; 0.0.0.0 exposes the server)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port (default HEADRACE_METRICS_PORT; unset: none)",
    )
    p.add_argument("--workers", type=int, default=8, help="request threads (default 8)")
    p.add_argument(
        "--memo-entries",
        type=int,
        default=8192,
        help="roll-up memo size, keyed by exact state bytes (default 8192; 0: off)",
    )
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.set_defaults(func=_serve)

    q = sub.add_parser(
        "priors", help="compute cold-start priors from the offline store",
        description="Compute the cold-start priors (global and per country x device_type "
                    "segment; rules in offline/priors.py) from the raw events of the lookback "
                    "in the offline store and store them in Redis, where servers pick them up "
                    "within HEADRACE_PRIORS_REFRESH_S.")
    q.add_argument("--days", type=float, default=7.0, help="lookback in days (default 7)")
    q.add_argument(
        "--until",
        default=None,
        metavar="T",
        help="end of the lookback, exclusive: epoch ms or ISO-8601 (default now)",
    )
    q.add_argument(
        "--smoothing",
        type=float,
        default=100.0,
        help="pseudo-impressions pulling a segment CTR to the global one (default 100)",
    )
    q.add_argument(
        "--min-segment-users",
        type=int,
        default=5,
        help="users a segment needs for its own prior (default 5)",
    )
    q.add_argument("--dry-run", action="store_true", help="compute and print, do not store")
    q.add_argument("--json", action="store_true", help="print the priors document as JSON")
    q.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    q.set_defaults(func=_priors)


def _serve(args: argparse.Namespace) -> int:
    import gc
    import logging
    import signal
    import threading

    from feature_defs.registry import registry_for
    from headrace.core.errors import missing_extra
    from headrace.core.settings import ServeSettings

    try:
        import grpc  # noqa: F401
        import grpc_health  # noqa: F401
        import grpc_reflection  # noqa: F401
    except ImportError as exc:
        raise missing_extra(exc.name or "grpcio", "serve") from exc
    from serving.server import build_server

    settings = ServeSettings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = registry_for(settings, args.definitions)
    host = args.host or settings.host
    server = build_server(settings, port=args.port, host=host, registry=registry,
                          max_workers=args.workers, memo_entries=args.memo_entries)
    metrics_port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    if metrics_port is not None:
        server.metrics.serve(metrics_port)  # this server's registry (serving.metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    gc.freeze()  # start-up objects leave the collector's generations: shorter GC pauses
    print(json.dumps({"event": "listening", "host": host, "port": server.port,
                      "metrics_port": metrics_port}), flush=True)
    stop.wait()
    server.stop(grace_s=2.0)
    return 0


def _priors(args: argparse.Namespace) -> int:
    from feature_defs.registry import registry_for
    from headrace.core.settings import OfflineSettings
    from headrace.core.timeparse import parse_time_ms
    from offline.priors import build_priors, write_priors

    settings = OfflineSettings()
    registry = registry_for(settings, args.definitions)
    until = parse_time_ms(args.until) if args.until else None
    priors = build_priors(
        settings,
        registry,
        until_ms=until,
        days=args.days,
        smoothing=args.smoothing,
        min_segment_users=args.min_segment_users,
    )
    key = None if args.dry_run else write_priors(settings, priors)
    if args.json:
        print(priors.to_json())
    else:
        meta = dict(priors.meta)
        print(
            f"priors from {meta.get('impressions')} impressions and {meta.get('clicks')} clicks"
            f" ({meta.get('users_with_segment')} users with a segment): "
            f"{len(priors.global_values)} global, {len(priors.segments)} segments"
            + (f"; stored at {key}" if key else " (dry run, not stored)")
        )
    if not priors.global_values:
        print(
            "headrace priors: no events in the lookback; servers keep definition defaults",
            file=sys.stderr,
        )
    return 0
