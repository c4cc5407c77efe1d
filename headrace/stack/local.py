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

Python API::

    info = LocalStack.up("/tmp/stack")   # or reuse the stack already running there
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
        reused: True if ``up`` found this stack already running.
    """

    dir: str
    kafka_bootstrap: str
    redis_url: str
    s3_endpoint: str
    offline_uri: str = f"s3://{OFFLINE_BUCKET}"
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    reused: bool = False

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


def _info(root: Path, state: Mapping[str, Any], reused: bool) -> StackInfo:
    return StackInfo(
        dir=str(root),
        kafka_bootstrap=state["kafka_bootstrap"],
        redis_url=state["redis_url"],
        s3_endpoint=state["s3_endpoint"],
        offline_uri=state["offline_uri"],
        services=_records(state),
        reused=reused,
    )


def _clear(root: Path) -> None:
    for name in SERVICES:
        (root / f"{name}.pid").unlink(missing_ok=True)
    (root / STATE_FILE).unlink(missing_ok=True)


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
    ) -> StackInfo:
        """Start the stack in ``dir``, or return the one already running there.

        Args:
            dir: Stack directory (created if missing).
            ports: Preferred port per service (``kafka``, ``redis``, ``s3``); a taken
                port is skipped for a free one. Default: any free port.
            progress: Called with one line per step (the CLI prints them to stderr).

        Returns:
            The endpoints; ``reused`` tells whether the stack was already running.

        Raises:
            MissingDependencyError: A binary or package is missing (names what to install).
            StackError: A service did not start or answer within 30 s; anything started
                by this call has been stopped again.
        """
        say = progress or _quiet
        root = Path(dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            state = _read_state(root)
            if state is not None:
                records = _records(state)
                if state.get("complete") and cls._healthy(records):
                    say(f"stack already running in {root}")
                    return _info(root, state, reused=True)
                say(f"cleaning stale stack state in {root}")
                proc.stop_all(list(records.values()), say)
            _clear(root)
            for name in SERVICES:  # fail on a missing dependency before starting anything
                services.ARGV[name](0)
            started: dict[str, ServiceRecord] = {}
            try:
                for name in SERVICES:
                    preferred = (ports or {}).get(name, 0)
                    started[name] = cls._start(root, name, preferred, started, say)
                say(f"creating bucket {OFFLINE_BUCKET}")
                services.create_bucket(started["s3"].port, OFFLINE_BUCKET)
                _write_state(root, started, complete=True)
            except BaseException:
                say("start failed; stopping what was started")
                proc.stop_all(list(started.values()), say)
                _clear(root)
                raise
            state = _read_state(root)
            assert state is not None
            say(f"stack running in {root}")
            return _info(root, state, reused=False)

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

    @classmethod
    def _healthy(cls, records: Mapping[str, ServiceRecord]) -> bool:
        return set(records) == set(SERVICES) and all(
            rec.is_ours() and cls._answers(rec) for rec in records.values()
        )

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
