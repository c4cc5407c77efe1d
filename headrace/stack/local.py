"""A real local stack: a Tansu Kafka broker, redis-server and a moto S3 endpoint.

The services run as detached local processes on free loopback ports (no root, no Docker,
no network), so they outlive the ``headrace stack up`` command that started them. All
state lives in one directory::

    DIR/stack.json        endpoints plus, per service, the identity of its process
    DIR/<service>.pid     one pid per process (kafka, redis, s3)
    DIR/<service>.log     the service's stdout and stderr

A process is only ever signalled after its identity is verified: pid, start time (from
``/proc/PID/stat``), executable and command line must all match what ``stack.json``
recorded, so a recycled pid is never killed. This needs Linux ``/proc``.

``up`` on a directory that already holds a stack never stops a service it finds
answering: it restarts only the services that are down (on their recorded ports, so the
exported environment stays valid), keeps the others and their data, and refuses to
touch anything when a recorded process is alive but does not answer. Only
``up(..., restart=True)`` (``headrace stack up --restart``) stops everything first.

Python API::

    info = LocalStack.up("/tmp/stack")   # or reuse (and repair) the stack already there
    info.env                             # HEADRACE_* and AWS_* variables for clients
    LocalStack.down("/tmp/stack")

    with local_stack(tmp_dir) as info:   # stopped on exit, also on error
        ...
"""

from __future__ import annotations

import fcntl
import json
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headrace.core.errors import StackError
from headrace.stack import proc, services

__all__ = [
    "SERVICES",
    "OFFLINE_BUCKET",
    "S3_TEST_CREDENTIAL",
    "STATE_FILE",
    "ServiceRecord",
    "StackInfo",
    "LocalStack",
    "local_stack",
]

SERVICES: tuple[str, ...] = ("kafka", "redis", "s3")
OFFLINE_BUCKET = "headrace-offline"
#: moto accepts any credentials; clients still need some to sign requests.
S3_TEST_CREDENTIAL = services.S3_CREDENTIAL
STATE_FILE = "stack.json"
_READY_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 5

Progress = Callable[[str], None]


@dataclass
class ServiceRecord:
    """One service process as recorded in ``stack.json``.

    Attributes:
        name: ``kafka``, ``redis`` or ``s3``.
        pid: Process id.
        port: Loopback TCP port the service listens on.
        argv: Command line it was started with.
        start_ticks: Start time from ``/proc/PID/stat`` (clock ticks since boot).
        exe: Resolved executable (``/proc/PID/exe``).
        cmdline: ``/proc/PID/cmdline`` once ready (redis rewrites its own title).
        stop_signal: Signal sent first by ``down`` (SIGINT for Tansu, else SIGTERM).
    """

    name: str
    pid: int
    port: int
    argv: list[str]
    start_ticks: int | None
    exe: str | None
    cmdline: list[str] | None = None
    stop_signal: int = int(signal.SIGTERM)

    def is_ours(self) -> bool:
        """True if the process is alive and still the one that was started."""
        return proc.matches(self.pid, self.start_ticks, self.exe, self.cmdline)


@dataclass
class StackInfo:
    """Endpoints of a running local stack.

    Attributes:
        dir: The stack directory.
        kafka_bootstrap: ``127.0.0.1:PORT`` of the Tansu broker.
        redis_url: ``redis://127.0.0.1:PORT/0``.
        s3_endpoint: ``http://127.0.0.1:PORT`` of the moto S3 server.
        offline_uri: ``s3://headrace-offline``.
        services: Process records by service name.
        reused: True if ``up`` found (some of) this stack running and kept it; it then
            belongs to whoever started it.
        started: The services this ``up`` call started (empty when it found the whole
            stack running).
    """

    dir: str
    kafka_bootstrap: str
    redis_url: str
    s3_endpoint: str
    offline_uri: str = f"s3://{OFFLINE_BUCKET}"
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    reused: bool = False
    started: list[str] = field(default_factory=list)

    @property
    def pids(self) -> dict[str, int]:
        """Process id per service."""
        return {name: rec.pid for name, rec in self.services.items()}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point Headrace and AWS clients at this stack."""
        return {
            "HEADRACE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "HEADRACE_BROKER_PROFILE": "embedded",
            "HEADRACE_REDIS_URL": self.redis_url,
            "HEADRACE_S3_ENDPOINT": self.s3_endpoint,
            "HEADRACE_S3_KEY": S3_TEST_CREDENTIAL,
            "HEADRACE_S3_SECRET": S3_TEST_CREDENTIAL,
            "HEADRACE_OFFLINE_URI": self.offline_uri,
            "AWS_ACCESS_KEY_ID": S3_TEST_CREDENTIAL,
            "AWS_SECRET_ACCESS_KEY": S3_TEST_CREDENTIAL,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def to_json(self) -> dict[str, Any]:
        """The object ``headrace stack up --json`` prints."""
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "s3_endpoint": self.s3_endpoint,
            "offline_uri": self.offline_uri,
            "dir": self.dir,
            "pids": self.pids,
            "reused": self.reused,
            "env": self.env,
        }


def _endpoints(ports: Mapping[str, int]) -> dict[str, str]:
    return {
        "kafka_bootstrap": f"127.0.0.1:{ports['kafka']}",
        "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
        "s3_endpoint": f"http://127.0.0.1:{ports['s3']}",
    }


# -- state on disk -------------------------------------------------------------------------


def _write_state(root: Path, records: Mapping[str, ServiceRecord], complete: bool) -> None:
    state: dict[str, Any] = {"version": 1, "complete": complete, "dir": str(root)}
    if complete:
        state.update(_endpoints({n: r.port for n, r in records.items()}))
        state["offline_uri"] = f"s3://{OFFLINE_BUCKET}"
    state["services"] = {name: asdict(rec) for name, rec in records.items()}
    tmp = root / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(root / STATE_FILE)
    for name, rec in records.items():
        (root / f"{name}.pid").write_text(f"{rec.pid}\n")


def _read_state(root: Path) -> dict[str, Any] | None:
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != 1:
        raise StackError(f"{path} is not a Headrace stack file")
    return state


def _records(state: Mapping[str, Any]) -> dict[str, ServiceRecord]:
    return {name: ServiceRecord(**rec) for name, rec in state.get("services", {}).items()}


def _info(root: Path, state: Mapping[str, Any], reused: bool,
          started: list[str] | None = None) -> StackInfo:
    return StackInfo(
        dir=str(root),
        kafka_bootstrap=state["kafka_bootstrap"],
        redis_url=state["redis_url"],
        s3_endpoint=state["s3_endpoint"],
        offline_uri=state["offline_uri"],
        services=_records(state),
        reused=reused,
        started=list(started or []),
    )


def _clear(root: Path) -> None:
    for name in SERVICES:
        (root / f"{name}.pid").unlink(missing_ok=True)
    (root / STATE_FILE).unlink(missing_ok=True)


def _restore(root: Path, records: Mapping[str, ServiceRecord], complete: bool) -> None:
    """Put back the state ``up`` found (after a failed repair), or clear a fresh start."""
    if not records:
        _clear(root)
        return
    _write_state(root, records, complete=complete and set(records) == set(SERVICES))
    for name in SERVICES:
        if name not in records:
            (root / f"{name}.pid").unlink(missing_ok=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    # Serialises concurrent up/down on one directory; children do not inherit the fd.
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the stack -----------------------------------------------------------------------------


def _quiet(_: str) -> None:
    return None


class LocalStack:
    """Start, inspect and stop the local stack recorded in a directory."""

    @classmethod
    def up(
        cls,
        dir: str | Path,
        ports: Mapping[str, int] | None = None,
        progress: Progress | None = None,
        restart: bool = False,
    ) -> StackInfo:
        """Start the stack in ``dir``, or keep (and repair) the one recorded there.

        A recorded service that answers is never stopped: only the services that are
        down are started again, on their recorded port when it is free (so clients keep
        their environment), the others keep running with their data. A recorded process
        that is alive but does not answer is left alone and the call fails.

        Args:
            dir: Stack directory (created if missing).
            ports: Preferred port per service (``kafka``, ``redis``, ``s3``); a taken
                port is skipped for a free one. Default: the port recorded in ``dir``
                for a service restarted there, else any free port.
            progress: Called with one line per step (the CLI prints them to stderr).
            restart: Stop every recorded service first, healthy or not, and start a
                fresh stack (all data in the broker, Redis and S3 is lost).

        Returns:
            The endpoints; ``reused`` tells whether services were found running and
            kept, ``started`` which ones this call started.

        Raises:
            MissingDependencyError: A binary or package is missing (names what to install).
            StackError: A recorded process is alive but does not answer (nothing is
                stopped or started), or a service did not start or answer within 30 s
                (what this call started has been stopped again, the rest is untouched).
        """
        say = progress or _quiet
        root = Path(dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            state = _read_state(root)
            if state is not None and restart:
                for name in SERVICES:  # a missing dependency must not cost the running stack
                    services.ARGV[name](0)
                say(f"--restart: stopping every service of the stack in {root}; "
                    "their data is lost")
                proc.stop_all(list(_records(state).values()), say)
                state = None
            if state is None:
                _clear(root)
                return cls._bring_up(root, {}, False, [], ports or {}, say)
            records = _records(state)
            complete = bool(state.get("complete"))
            down = cls._triage(root, records, say)
            if not down and complete:
                say(f"stack already running in {root}")
                return _info(root, state, reused=True)
            return cls._bring_up(root, records, complete, down, ports or {}, say)

    @classmethod
    def _triage(cls, root: Path, records: Mapping[str, ServiceRecord],
                say: Progress) -> list[str]:
        """The services to start: recorded ones whose process is gone, and missing ones.

        Raises:
            StackError: A recorded process is alive but does not answer.
        """
        down: list[str] = []
        for name in SERVICES:
            rec = records.get(name)
            if rec is None:
                down.append(name)
            elif not rec.is_ours():
                say(f"{name} is down (pid {rec.pid} is no longer running)")
                down.append(name)
            elif not cls._answers(rec):
                raise StackError(
                    f"{name} (pid {rec.pid}) is running but does not answer on port "
                    f"{rec.port}; nothing was stopped or started: wait for it, or run "
                    f"headrace stack up --restart --dir {root} to stop everything and start "
                    "a fresh stack")
        return down

    @classmethod
    def _bring_up(
        cls,
        root: Path,
        found: Mapping[str, ServiceRecord],
        complete: bool,
        down: list[str],
        ports: Mapping[str, int],
        say: Progress,
    ) -> StackInfo:
        """Start the services of ``found`` that are down (all of them on a fresh stack)."""
        fresh = not found
        to_start = list(SERVICES) if fresh else down
        for name in to_start:  # fail on a missing dependency before starting anything
            services.ARGV[name](0)
        kept = [name for name in SERVICES if name in found and name not in to_start]
        if kept and to_start:
            say(f"restarting only {', '.join(to_start)}; "
                f"{', '.join(kept)} keep running with their data")
        elif kept:
            say(f"every service answers; completing the stack record in {root}")
        elif not fresh:
            say(f"no service of the stack in {root} is running; starting all of them")
        current = dict(found)
        started: list[str] = []
        try:
            for name in to_start:
                old = found.get(name)
                preferred = ports.get(name) or (old.port if old is not None else 0)
                rec = cls._start(root, name, preferred, current, say)
                started.append(name)
                if not fresh:
                    say(f"{name} is back on 127.0.0.1:{rec.port} (pid {rec.pid}); "
                        f"{services.DATA_NOTES[name]}")
                    if old is not None and rec.port != old.port:
                        say(f"{name} now listens on port {rec.port}, not {old.port}: "
                            "export the environment again")
            if fresh or "s3" in started or not complete:
                say(f"creating bucket {OFFLINE_BUCKET}")
                services.create_bucket(current["s3"].port, OFFLINE_BUCKET)
            _write_state(root, current, complete=True)
        except BaseException:
            say("start failed; stopping what this call started"
                + (f" ({', '.join(kept)} left running)" if kept else ""))
            proc.stop_all([current[n] for n in to_start if n in current
                           and current[n] is not found.get(n)], say)
            _restore(root, found, complete)
            raise
        state = _read_state(root)
        assert state is not None
        say(f"stack running in {root}")
        return _info(root, state, reused=bool(kept), started=started)

    @classmethod
    def down(cls, dir: str | Path, progress: Progress | None = None) -> dict[str, str]:
        """Stop exactly the processes recorded in ``dir`` and remove the pid files.

        Returns:
            Outcome per service: ``stopped``, ``killed`` (needed SIGKILL) or
            ``not running`` (dead, or its pid now belongs to another process, untouched).

        Raises:
            StackError: ``dir`` holds no stack record; nothing is signalled.
        """
        root = Path(dir).expanduser().resolve()
        if not (root / STATE_FILE).is_file():
            raise StackError(f"no Headrace stack recorded in {root} (no {STATE_FILE}); "
                             "nothing was stopped")
        with _locked(root):
            state = _read_state(root)
            if state is None:
                raise StackError(f"no Headrace stack recorded in {root}; nothing was stopped")
            outcome = proc.stop_all(list(_records(state).values()), progress or _quiet)
            _clear(root)
        return outcome

    @classmethod
    def status(cls, dir: str | Path) -> dict[str, Any]:
        """Report whether each recorded service runs and answers.

        Raises:
            StackError: ``dir`` holds no stack record.
        """
        root = Path(dir).expanduser().resolve()
        state = _read_state(root)
        if state is None:
            raise StackError(f"no Headrace stack recorded in {root} (no {STATE_FILE})")
        found: dict[str, Any] = {}
        for name, rec in _records(state).items():
            alive = rec.is_ours()
            answering = alive and cls._answers(rec)
            found[name] = {"pid": rec.pid, "port": rec.port, "alive": alive, "answering": answering}
        running = bool(state.get("complete")) and all(
            found.get(n, {}).get("answering") for n in SERVICES
        )
        keys = ("kafka_bootstrap", "redis_url", "s3_endpoint", "offline_uri")
        report = {key: state.get(key) for key in keys}
        return {"dir": str(root), "running": running, **report, "services": found}

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _answers(rec: ServiceRecord, timeout: float = 3.0) -> bool:
        try:
            services.PROBES[rec.name](rec.port, timeout)
        except StackError:
            return False
        return True

    @staticmethod
    def _start(
        root: Path,
        name: str,
        preferred: int,
        started: dict[str, ServiceRecord],
        say: Progress,
    ) -> ServiceRecord:
        log = root / f"{name}.log"
        for attempt in range(_PORT_ATTEMPTS):
            port = 0
            if attempt == 0 and preferred:
                if proc.port_free(preferred):
                    port = preferred
                else:
                    say(f"{name}: port {preferred} is taken, using another free port")
            port = port or proc.free_port()
            argv = services.ARGV[name](port)
            say(f"starting {name} on 127.0.0.1:{port}")
            child = proc.spawn(argv, log, cwd=root)
            ticks, exe = proc.identity(child.pid)
            rec = ServiceRecord(name=name, pid=child.pid, port=port, argv=argv, start_ticks=ticks,
                                exe=exe, stop_signal=services.STOP_SIGNALS[name])
            started[name] = rec
            _write_state(root, started, complete=False)  # recorded before waiting
            try:
                proc.wait_ready(child, port, services.PROBES[name], log, _READY_TIMEOUT_S)
            except proc.PortTaken:
                say(f"{name}: port {port} was taken meanwhile, retrying on another port")
                del started[name]
                (root / f"{name}.pid").unlink(missing_ok=True)
                continue
            rec.cmdline = proc.cmdline(child.pid)
            return rec
        raise StackError(f"{name} found no free port in {_PORT_ATTEMPTS} attempts; see {log}")


@contextmanager
def local_stack(
    dir: str | Path,
    ports: Mapping[str, int] | None = None,
    progress: Progress | None = None,
    keep: bool = False,
) -> Iterator[StackInfo]:
    """Run a local stack in ``dir`` for the duration of the block.

    The stack is stopped on exit (also on error) unless ``keep`` is true or the stack was
    already running before the block (then it belongs to someone else).
    """
    info = LocalStack.up(dir, ports=ports, progress=progress)
    try:
        yield info
    finally:
        if not keep and not info.reused:
            LocalStack.down(dir, progress=progress)
