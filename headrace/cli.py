"""The ``headrace`` command line.

Each command lives in its own module under :mod:`headrace.commands` (or in the
package that owns the capability) and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to a handler ``(args) -> int``. Modules keep their
top-level imports light; heavy libraries are imported inside the handlers so that
``headrace --help`` stays fast and a missing extra only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from headrace.core.errors import HeadraceError

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: command module names, in help order. A module may register several commands.
COMMAND_MODULES: tuple[str, ...] = (
    "headrace.commands.stack",
    "headrace.commands.demo",
    "headrace.commands.apply",
    "headrace.commands.produce",
    "headrace.commands.worker",
    "headrace.commands.get",
    "headrace.commands.lag",
    "headrace.commands.offline",
    "headrace.commands.train",
    "headrace.commands.models",
    "headrace.commands.rollout",
    "headrace.commands.drift",
    "headrace.commands.evaluate_policy",
    "headrace.commands.monitor",
    "headrace.commands.pipeline",
    "headrace.commands.simulate",
    "headrace.commands.serve",
    "headrace.commands.score",
    "headrace.commands.example",
    "headrace.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headrace",
        description="Headrace: Kafka stream-processing feature platform for ad CTR prediction.",
    )
    from headrace import __version__

    parser.add_argument("--version", action="version", version=f"headrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the command is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HeadraceError as exc:
        print(f"headrace {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"headrace {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
