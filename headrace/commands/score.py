"""``headrace score``: rank candidate ads for one user through a running server's Score.

    headrace score --server 127.0.0.1:50051 --user u1 --ad a1:c1:2.5 --ad a2:c1:1.0 \\
        --country US --device-type mobile [--json]

Prints the ranking, best eCPM first (``--json``: one object with the model version,
source, fallback reason, user tier and the ranked candidates). Exit status 0 on an
answer; 2 for a malformed option or an UNAUTHENTICATED answer (``--token`` /
``HEADRACE_GRPC_TOKEN`` missing or not accepted; ``--tls-ca`` for a TLS server); 1 when
the server rejects the request (the message names the field) or cannot answer
(unreachable, no model: FAILED_PRECONDITION).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from headrace.commands.get import add_security_args, client_security
from headrace.core.errors import UsageError

__all__ = ["register", "handler", "parse_ad"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="rank candidate ads for a user (ScoringService.Score)",
        description="Ask a running server (headrace serve) to rank candidate ads by eCPM = "
                    "pCTR x bid_cpm x 1000 for one user and request context.")
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="server address (default 127.0.0.1:50051)")
    add_security_args(p)
    p.add_argument("--user", default="", metavar="USER_ID",
                   help="the viewer (omit for anonymous traffic)")
    p.add_argument("--ad", action="append", required=True, type=parse_ad, dest="ads",
                   metavar="AD:CAMPAIGN:BID",
                   help="a candidate: ad id, campaign id and bid CPM (repeat, up to 200)")
    g = p.add_argument_group("request context (cold-start segment and model inputs)")
    g.add_argument("--country", default=None)
    g.add_argument("--device-type", default=None)
    g.add_argument("--placement", default=None)
    g.add_argument("--creative-type", default=None)
    g.add_argument("--publisher", default=None, metavar="PUBLISHER_ID")
    g.add_argument("--ts", default=None, metavar="T",
                   help="request time: epoch ms or ISO-8601 (default: the server's clock)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="deadline in seconds (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=handler)


def parse_ad(text: str) -> dict[str, Any]:
    """``AD:CAMPAIGN:BID`` → a candidate dict (the ad id may itself contain ``:``).

    Raises:
        argparse.ArgumentTypeError: not three parts, or BID is not a number.
    """
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"expected AD:CAMPAIGN:BID, got {text!r}")
    try:
        bid = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"the bid of {text!r} is not a number") from None
    return {"ad_id": parts[0], "campaign_id": parts[1], "bid_cpm": bid}


def _context(args: argparse.Namespace) -> dict[str, Any]:
    ctx: dict[str, Any] = {"country": args.country, "device_type": args.device_type,
                           "placement": args.placement, "creative_type": args.creative_type,
                           "publisher_id": args.publisher}
    if args.ts is not None:
        from headrace.core.timeparse import parse_time_ms

        ctx["ts_ms"] = parse_time_ms(args.ts)
    return {k: v for k, v in ctx.items() if v is not None}


def handler(args: argparse.Namespace) -> int:
    """Run ``headrace score`` (see the module docstring)."""
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    from headrace.api.v1 import features_pb2 as pb
    from headrace.api.v1 import scoring_pb2 as spb
    from serving.client import FeatureClient, build_score_request, ranked_candidates

    request = build_score_request(args.user, args.ads, _context(args))
    with FeatureClient(args.server, timeout_s=args.timeout, **client_security(args)) as client:
        resp = client.score_pb(request)
    ranked = ranked_candidates(request, resp)
    summary = {"model_version": resp.model_version,
               "source": spb.ScoreSource.Name(resp.source),
               "fallback_reason": pb.FallbackReason.Name(resp.fallback_reason),
               "user_tier": pb.ColdStartTier.Name(resp.user_tier), "as_of_ms": resp.as_of_ms}
    if args.json:
        keep = ("rank", "ad_id", "campaign_id", "bid_cpm", "p_ctr", "ecpm", "tier")
        print(json.dumps({**summary, "ranked": [{k: r[k] for k in keep} for r in ranked]}))
        return 0
    out = sys.stdout
    print(f"model {summary['model_version']} ({summary['source']}), user "
          f"{args.user or '(anonymous)'} tier {summary['user_tier']}, fallback "
          f"{summary['fallback_reason']}", file=out)
    print(f"{'rank':>4}  {'ad_id':<20} {'campaign_id':<16} {'bid_cpm':>9} {'pCTR':>10} "
          f"{'eCPM':>10}  tier", file=out)
    for r in ranked:
        print(f"{r['rank']:>4}  {r['ad_id']:<20} {r['campaign_id']:<16} {r['bid_cpm']:>9.4g} "
              f"{r['p_ctr']:>10.6f} {r['ecpm']:>10.4f}  {r['tier']}", file=out)
    return 0
