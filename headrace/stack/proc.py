"""Process, port and readiness helpers for :mod:`headrace.stack.local` (Linux ``/proc``).

Kept apart from :mod:`headrace.stack.local` so that module reads as the stack's life cycle;
nothing outside :mod:`headrace.stack.local` should need these.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from headrace.core.errors import MissingDependencyError, StackError

__all__ = [
    "PortTaken",
    "is_executable",
    "free_port",
    "port_free",
    "spawn",
    "identity",
    "cmdline",
    "running",
    "matches",
    "owns_listener",
    "wait_ready",
    "stop_all",
]

# Tansu reads these from the environment; an inherited value (say SCHEMA_REGISTRY) would
# silently change the broker, so children never see them.
_SCRUBBED_ENV = frozenset(
    {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
     "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"}
)
_STOP_TIMEOUT_S = 5.0
_KILL_TIMEOUT_S = 3.0


class PortTaken(Exception):
    """The service exited because its port was taken after we chose it."""


class _Record(Protocol):
    name: str
    pid: int
    start_ticks: int | None
    stop_signal: int

    def is_ours(self) -> bool: ...


# -- ports -------------------------------------------------------------------------------


def is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_port() -> int:
    """A loopback port that was free a moment ago (callers retry if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """True if a server could listen on loopback ``port`` now.

    SO_REUSEADDR, as the three services set it: connections of a killed service linger
    in TIME_WAIT on its port, which must not make ``up`` move its restart elsewhere.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- processes ---------------------------------------------------------------------------


def spawn(argv: Sequence[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached (own session), output appended to ``log``."""
    # Child-process hygiene, not configuration: pass the environment on, minus Tansu's
    # own variables.
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True,
            )
        except OSError as exc:
            raise MissingDependencyError(f"cannot run {argv[0]}: {exc.strerror}") from exc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def identity(pid: int) -> tuple[int | None, str | None]:
    """(start time in clock ticks since boot, resolved executable) of a live pid."""
    fields = _stat_fields(pid)
    ticks = int(fields[19]) if fields and len(fields) > 19 else None
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    return ticks, exe


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    parts = raw.decode(errors="replace").split("\0")
    while parts and parts[-1] == "":
        parts.pop()  # redis pads its rewritten title with NULs
    return parts


def running(pid: int, start_ticks: int | None) -> bool:
    """True while the process started at ``start_ticks`` has not exited (zombies have).

    Weaker than :func:`matches` on purpose: an exiting process loses its cmdline and exe
    before it becomes a zombie, and must still count as running until then.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def matches(
    pid: int, start_ticks: int | None, exe: str | None, argv: list[str] | None
) -> bool:
    """True if ``pid`` is alive (not a zombie) and is the recorded process.

    Without a recorded start time there is no way to tell a recycled pid: False.
    """
    fields = _stat_fields(pid)
    if fields is None or start_ticks is None or fields[0] in ("Z", "X"):
        return False
    now_ticks, now_exe = identity(pid)
    if now_ticks != start_ticks or (exe is not None and now_exe != exe):
        return False
    return argv is None or cmdline(pid) == argv


def owns_listener(pid: int, port: int) -> bool:
    """True if ``pid`` holds a listening TCP socket on ``port``.

    Proves that a readiness probe talks to our process, not to whoever took the port.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _program(child: subprocess.Popen[bytes]) -> str:
    """The program a child runs, for messages."""
    args = child.args
    first = args if isinstance(args, str | bytes | os.PathLike) else args[0]
    return os.fsdecode(first)


def wait_ready(
    child: subprocess.Popen[bytes],
    port: int,
    probe: Callable[[int, float], None],
    log: Path,
    timeout: float,
) -> None:
    """Wait until ``child`` listens on ``port`` and ``probe`` succeeds.

    Raises:
        PortTaken: The child exited because the port was in use.
        StackError: The child exited otherwise, or did not answer within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    name = _program(child)
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            tail = _tail(log)
            if "in use" in tail.lower() or "AddrInUse" in tail:
                raise PortTaken(port)
            raise StackError(f"{name} exited with status {code}; log {log}:\n{tail}")
        if owns_listener(child.pid, port):
            try:
                probe(port, max(0.5, min(5.0, deadline - time.monotonic())))
                return
            except StackError as exc:
                last_error = str(exc)
        time.sleep(0.05)
    child.kill()
    child.wait()
    raise StackError(f"{name} did not answer on port {port} within {timeout:.0f} s "
                     f"({last_error}); log {log}:\n{_tail(log)}")


# -- stopping ----------------------------------------------------------------------------


def _reap(pid: int) -> None:
    # When the stack was started in this process the children are ours to reap;
    # otherwise init reaps them and waitpid says so.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(records: Sequence[_Record], timeout: float) -> list[_Record]:
    deadline = time.monotonic() + timeout
    alive = list(records)
    while alive and time.monotonic() < deadline:
        for rec in alive:
            _reap(rec.pid)
        alive = [rec for rec in alive if running(rec.pid, rec.start_ticks)]
        if alive:
            time.sleep(0.05)
    for rec in records:
        _reap(rec.pid)  # it may have turned zombie between the last reap and the check
    return alive


def _signal(rec: _Record, sig: int) -> bool:
    try:
        os.kill(rec.pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_all(records: Sequence[_Record], say: Callable[[str], None]) -> dict[str, str]:
    """Stop every record whose process is still ours; never touch anything else.

    Sends each its stop signal, waits up to 5 s, then SIGKILLs (after re-verifying the
    identity) and waits again.

    Returns:
        ``stopped``, ``killed`` or ``not running`` per service name.

    Raises:
        StackError: A process survived SIGKILL.
    """
    outcome: dict[str, str] = {}
    signalled: list[_Record] = []
    for rec in records:
        if rec.is_ours() and _signal(rec, rec.stop_signal):
            say(f"stopping {rec.name} (pid {rec.pid})")
            signalled.append(rec)
            outcome[rec.name] = "stopped"
        else:
            outcome[rec.name] = "not running"
    survivors = _wait_gone(signalled, _STOP_TIMEOUT_S)
    for rec in survivors:
        # Identity was verified when signalled; the start time alone still pins it.
        if running(rec.pid, rec.start_ticks) and _signal(rec, signal.SIGKILL):
            say(f"{rec.name} (pid {rec.pid}) ignored its stop signal; killed")
            outcome[rec.name] = "killed"
    left = _wait_gone(survivors, _KILL_TIMEOUT_S)
    if left:
        raise StackError("still running after SIGKILL: "
                         + ", ".join(f"{r.name} (pid {r.pid})" for r in left))
    return outcome
