"""``headrace get``: online feature values of entities.

Two modes:

* ``--server ADDR``: through the gRPC feature server (cold start, statuses, fallback),
  with :class:`serving.client.FeatureClient` (``--tls-ca``/``--token`` for a secured
  server; an UNAUTHENTICATED answer is one sentence and exit 2).
* no ``--server``: the raw as-of values of the online state straight from Redis, one
  round trip, rolled up with ``ViewState.rollup`` (exactly; no cold start, no rounding).
  ``--json`` prints one object per entity per line::

      {"entity": "user", "id": "u1", "as_of": 1700000000000, "features": {...}}

  An ``--at`` before an entity's latest applied event cannot be answered from the
  online state: that line carries ``"error"`` instead of ``"features"`` and the command
  exits 1 after printing every line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feature_defs.registry import Registry
    from headrace.core.online_store import OnlineStore

__all__ = ["register", "raw_lines", "add_security_args", "client_security"]


def add_security_args(p: argparse.ArgumentParser) -> None:
    """``--tls-ca FILE`` and ``--token TOKEN`` of a command that calls the server."""
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="PEM CA of the server's certificate: connect with TLS (default "
                        "HEADRACE_GRPC_TLS_CA; unset: plaintext)")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help="bearer token sent with every call (default HEADRACE_GRPC_TOKEN, "
                        "which keeps it out of the process list)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="PEM client certificate for a server that requires mutual TLS "
                        "(default HEADRACE_GRPC_TLS_CLIENT_CERT; needs --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="PEM key of --tls-cert (default HEADRACE_GRPC_TLS_CLIENT_KEY)")


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """The ``tls_ca``/``token``/``tls_cert``/``tls_key`` keyword arguments of
    :class:`serving.client.FeatureClient`: the flags, else ``HEADRACE_GRPC_TLS_CA``,
    ``HEADRACE_GRPC_TOKEN``, ``HEADRACE_GRPC_TLS_CLIENT_CERT`` and ``_KEY``."""
    from pydantic import SecretStr

    from headrace.core.settings import ServeSettings

    settings = ServeSettings()
    token = SecretStr(args.token) if args.token is not None else settings.grpc_token
    def pick(flag: str | None, setting: str | None) -> str | None:
        return flag if flag is not None else setting

    return {"tls_ca": pick(args.tls_ca, settings.grpc_tls_ca), "token": token,
            "tls_cert": pick(args.tls_cert, settings.grpc_tls_client_cert),
            "tls_key": pick(args.tls_key, settings.grpc_tls_client_key)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "get",
        help="online feature values of entities",
        description="Print online feature values. Without --server: the exact as-of roll-up "
        "of the online state in Redis (HEADRACE_REDIS_URL / HEADRACE_REDIS_PREFIX). "
        "With --server: through the feature server, with statuses and tiers.",
    )
    p.add_argument("--entity", required=True, help="user, ad, campaign or publisher")
    p.add_argument(
        "--id",
        dest="ids",
        action="append",
        required=True,
        metavar="ID",
        help="entity id (repeat for several); a composite key's parts joined by '}{' "
        "(e.g. 'v4}{p01' for arm_publisher)",
    )
    p.add_argument(
        "--features",
        action="append",
        default=None,
        metavar="NAME[,NAME...]",
        help="feature names (repeat or comma-separate; default: all of the entity)",
    )
    p.add_argument(
        "--at", default=None, metavar="T", help="as-of time: epoch ms or ISO-8601 UTC (default now)"
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="ask the feature server instead of reading Redis",
    )
    add_security_args(p)
    p.add_argument("--country", default=None, help="request context (with --server)")
    p.add_argument("--device-type", default=None, help="request context (with --server)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--json", action="store_true", help="one JSON object per entity per line")
    p.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    p.set_defaults(func=_run)


def _features(args: argparse.Namespace) -> list[str] | None:
    if not args.features:
        return None
    return [n.strip() for item in args.features for n in item.split(",") if n.strip()]


def _check(registry: Registry, entity: str, ids: list[str], names: list[str] | None) -> list[str]:
    from feature_defs.keys import id_problem
    from headrace.core.errors import UsageError

    if entity not in registry.entities:
        raise UsageError(f"--entity: unknown entity {entity!r} "
                         f"(known: {', '.join(sorted(registry.entities))})")
    for i, value in enumerate(ids):
        problem = id_problem(registry.entities[entity], value)  # composite: parts joined
        if problem:
            raise UsageError(f"--id {value!r} (ids[{i}]): {problem}")
    known = registry.feature_names(entity)
    for name in names or ():
        if name not in known:
            raise UsageError(f"--features: {name!r} is not a feature of {entity!r}")
    return names or known


def raw_lines(
    registry: Registry,
    store: OnlineStore,
    prefix: str,
    entity: str,
    ids: list[str],
    names: list[str],
    as_of_ms: int,
) -> list[dict[str, Any]]:
    """As-of values of ``names`` for ``ids`` from the online state (one round trip).

    Raises:
        OnlineStoreError: Redis failed.
    """
    from feature_defs.layout import entity_key
    from feature_defs.state import ViewState

    plans = [registry.plans[v] for v in dict.fromkeys(registry.by_feature[n][0].view.id
                                                      for n in names)]
    rows = store.read_hashes([entity_key(prefix, entity, i) for i in ids],
                             [p.view.id for p in plans])
    out = []
    for eid, row in zip(ids, rows, strict=True):
        line: dict[str, Any] = {"entity": entity, "id": eid, "as_of": as_of_ms}
        values: dict[str, Any] = {}
        for plan, blob in zip(plans, row, strict=True):
            if blob is None:
                values.update({o.name: o.default for o in plan.outputs})
                continue
            try:
                state = ViewState.decode(plan, blob)
            except (ValueError, EOFError, TypeError) as exc:
                line["error"] = f"unreadable state of view {plan.view.id}: {exc}"
                break
            if as_of_ms < state.max_ts:
                line["error"] = (
                    f"as_of {as_of_ms} is before the latest applied event of this entity "
                    f"({state.max_ts}, view {plan.view.id}): the online state only answers as "
                    "of its latest event or later; earlier times are the offline store's job "
                    "(point-in-time training sets)"
                )
                break
            values.update(state.rollup(as_of_ms)[0])
        if "error" not in line:
            line["features"] = {n: values[n] for n in names}
        out.append(line)
    return out


def _run(args: argparse.Namespace) -> int:
    from feature_defs.registry import registry_for
    from headrace.core.settings import ServeSettings
    from headrace.core.timeparse import parse_time_ms

    settings = ServeSettings()
    registry = registry_for(settings, args.definitions)
    asked = _features(args)
    names = _check(registry, args.entity, args.ids, asked)
    as_of = parse_time_ms(args.at) if args.at else None
    if args.server:
        return _via_server(args, asked, as_of)
    from headrace.core.online_store import RedisOnlineStore

    store = RedisOnlineStore(settings.redis_config(), timeout_ms=args.timeout * 1000,
                             connect_timeout_ms=args.timeout * 1000)
    try:
        lines = raw_lines(registry, store, settings.redis_prefix, args.entity, args.ids, names,
                          time.time_ns() // 1_000_000 if as_of is None else as_of)
    finally:
        store.close()
    for line in lines:
        if args.json:
            print(json.dumps(line), flush=True)
        elif "error" in line:
            print(f"{line['entity']} {line['id']}  as_of={line['as_of']}  error: {line['error']}")
        else:
            print(f"{line['entity']} {line['id']}  as_of={line['as_of']}")
            width = max(len(n) for n in line["features"])
            for n, v in line["features"].items():
                print(f"  {n:<{width}}  {_fmt(v)}")
    return 1 if any("error" in line for line in lines) else 0


def _via_server(args: argparse.Namespace, names: list[str] | None, as_of: int | None) -> int:
    from serving.client import FeatureClient

    with FeatureClient(args.server, timeout_s=args.timeout, **client_security(args)) as client:
        answer = client.get(args.entity, args.ids, names, as_of_ms=as_of,
                            country=args.country, device_type=args.device_type)
    for line in answer.to_json_lines():
        if args.json:
            print(json.dumps(line), flush=True)
            continue
        print(f"{line['entity']} {line['id']}  as_of={line['as_of']}  tier={line['tier']}"
              + (f"  fallback={line['fallback_reason']}"
                 if line["fallback_reason"] != "NONE" else ""))
        width = max(len(n) for n in line["features"])
        for n, v in line["features"].items():
            print(f"  {n:<{width}}  {_fmt(v):>14}  {line['statuses'][n]}")
    return 0


def _fmt(value: Any) -> str:
    return "null" if value is None else repr(value)
