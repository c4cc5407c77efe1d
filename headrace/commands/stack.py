"""``headrace stack up|down|status``: the local stack (Tansu Kafka, redis-server, moto S3).

Examples::

    headrace stack up --dir .stack            # human summary + export lines; restarts
                                              # only services that are down
    headrace stack up --dir .stack --restart  # stop everything, start fresh (data lost)
    eval "$(headrace stack up --dir .stack | grep ^export)"
    headrace stack up --dir .stack --json     # one JSON object (endpoints, pids, env)
    headrace stack status --dir .stack
    headrace stack down --dir .stack
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

__all__ = ["register"]

_DEFAULT_DIR = ".stack"


def _progress(line: str) -> None:
    print(f"[stack] {line}", file=sys.stderr, flush=True)


def _up(args: argparse.Namespace) -> int:
    from headrace.stack.local import LocalStack

    ports = {"kafka": args.kafka_port, "redis": args.redis_port, "s3": args.s3_port}
    info = LocalStack.up(args.dir, ports=ports, progress=_progress, restart=args.restart)
    if args.json:
        print(json.dumps(info.to_json(), sort_keys=True))
        return 0
    if not info.reused:
        state = "started"
    elif info.started:
        state = f"running again (restarted {', '.join(info.started)}, kept the rest)"
    else:
        state = "already running"
    print(f"Headrace local stack {state} in {info.dir}")
    notes = {"kafka": "(Tansu, in-memory)", "redis": "", "s3": f"({info.offline_uri})"}
    for name, url in (("kafka", info.kafka_bootstrap), ("redis", info.redis_url),
                      ("s3", info.s3_endpoint)):
        again = "  restarted" if info.reused and name in info.started else ""
        print(f"  {name:<6} {url:<28} pid {info.pids[name]}  {notes[name]}{again}".rstrip())
    print(f"Stop it with: headrace stack down --dir {shlex.quote(info.dir)}")
    print("# environment for Headrace commands and S3 clients:")
    for key, value in info.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from headrace.stack.local import LocalStack

    outcome = LocalStack.down(args.dir, progress=_progress)
    for name, result in outcome.items():
        print(f"{name}: {result}")
    print(f"stack in {args.dir} is down")
    return 0


def _status(args: argparse.Namespace) -> int:
    from headrace.stack.local import LocalStack

    report: dict[str, Any] = LocalStack.status(args.dir)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"stack in {report['dir']}: {'running' if report['running'] else 'NOT running'}")
        for name, svc in report["services"].items():
            state = "answering" if svc["answering"] else ("alive" if svc["alive"] else "dead")
            print(f"  {name:<6} pid {svc['pid']:<8} port {svc['port']:<6} {state}")
    return 0 if report["running"] else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stack`` with its ``up``, ``down`` and ``status`` actions."""
    parser = subparsers.add_parser(
        "stack",
        help="start/stop a local Kafka (Tansu) + Redis + S3 (moto) stack",
        description="Run real local services on free loopback ports, detached from this "
        "command; state, pid files and logs live in --dir.",
    )
    actions = parser.add_subparsers(dest="stack_command", metavar="ACTION")
    actions.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument(
            "--dir", default=_DEFAULT_DIR, help=f"stack directory (default: {_DEFAULT_DIR})"
        )
        return action

    up = add("up", "start the stack in DIR; a stack already there is kept: services that "
             "answer are never stopped, only those that are down are restarted")
    up.add_argument("--json", action="store_true", help="print one JSON object")
    up.add_argument(
        "--restart", action="store_true",
        help="stop every service recorded in DIR, healthy or not, and start a fresh stack: "
        "all topics, Redis keys and S3 objects are lost",
    )
    for service, flag in (("kafka", "--kafka-port"), ("redis", "--redis-port"),
                          ("s3", "--s3-port")):
        up.add_argument(
            flag, type=int, default=0, metavar="PORT",
            help=f"preferred {service} port; a taken port is skipped (default: any free)",
        )
    up.set_defaults(func=_up)

    down = add("down", "stop exactly the processes recorded in DIR")
    down.set_defaults(func=_down)

    status = add("status", "report whether the stack in DIR runs (exit 1 if not)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)
