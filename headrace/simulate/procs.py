"""The simulations' child processes: real ``headrace`` commands with their logs in
files, stopped together (last started first) when the simulation ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["CLI", "Children"]

#: how a simulation runs a ``headrace`` command (this interpreter, this checkout)
CLI = [sys.executable, "-m", "headrace.cli"]


class Children:
    """The processes a simulation started; :meth:`stop` ends them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, args: list[str], env: dict[str, str], log: Path,
              stdout: int | None = None) -> subprocess.Popen[str]:
        """Start ``headrace ARGS`` with ``env``; stderr (and stdout unless given) append
        to ``log``."""
        fh = open(log, "ab")  # noqa: SIM115 - the child keeps it; closed with the process
        proc = subprocess.Popen([*CLI, *args], env=env, text=True, cwd=os.getcwd(),
                                stdout=fh if stdout is None else stdout, stderr=fh)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM every live child (last started first), then wait; SIGKILL after 10 s."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
