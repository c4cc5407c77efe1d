"""Starting a rollout: the one implementation behind ``headrace rollout start`` (which
then drives the controller in the foreground) and the pipeline's ``start_rollout`` step
(which releases the controller lock at once, so a running ``headrace rollout run`` — or
the next one — drives it).

:func:`start_rollout` checks that the version may be rolled out (:func:`check_start`:
each refusal an :class:`~headrace.core.errors.InputError`, nothing changed), reads the
arms' counts (the first phase's baseline), takes the controller lock, makes the version
the registry's challenger (skipped when it already is: an interrupted start, resumed),
clears a stale abort request and commits the first state: the controller document and
the phase-1 split (phase 0 with a shadow phase) in Redis, the split in the history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headrace.core.errors import InputError, UsageError
from headrace.model.registry import ModelRegistry, Role
from headrace.rollout.controller import RolloutState, Status, begin
from headrace.rollout.gates import ArmStats
from headrace.rollout.policy import Policy
from headrace.rollout.runner import Runner
from headrace.rollout.source import StatsSource, StatsUnavailable
from headrace.rollout.store import RolloutStore, Stored

__all__ = ["FIRST_READ_S", "load_policy", "running", "check_start", "first_read",
           "start_rollout"]

#: seconds :func:`first_read` retries the first read of the counts (the baseline)
FIRST_READ_S = 30.0


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def load_policy(path: str | None, time_scale: float) -> Policy:
    """The rollout policy: the JSON file ``path`` (``Policy.to_dict`` shape) or the
    default one, with ``time_scale``.

    Raises:
        UsageError: ``time_scale`` is not a positive finite number.
        InputError: the file cannot be read or is no JSON object.
    """
    if not (time_scale > 0 and time_scale < float("inf")):
        raise UsageError(f"--time-scale must be positive, got {time_scale}")
    if path is None:
        return Policy(time_scale=time_scale)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the policy {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"the policy {path} must be a JSON object")
    return Policy.from_dict({**doc, "time_scale": time_scale})


def running(stored: Stored | None) -> bool:
    """Whether the controller document is a rollout still running (or mid-decision)."""
    return stored is not None and (stored.state.status is Status.RUNNING or stored.state.busy)


def check_start(store: RolloutStore, registry: ModelRegistry, version: str) -> str:
    """The refusals of a rollout of ``version``; returns the champion it is compared with.

    Raises:
        InputError: another rollout runs; ``version`` is unknown, failed, the champion,
            or failed its offline gates; there is no champion; another version is the
            challenger. Nothing is changed.
    """
    current = store.load()
    if running(current):
        assert current is not None
        s = current.state
        raise InputError(f"rollout {s.rollout_id} of {s.challenger} is already running (phase "
                         f"{s.phase}); resume it with headrace rollout run or stop it with "
                         "headrace rollout abort")
    registry.history(version)  # an unknown version: InputError naming the known ones
    role, champion = registry.roles()[version], registry.champion()
    if role is Role.FAILED:
        raise InputError(f"model {version} failed and can never be rolled out again")
    if champion is None or champion == version:
        raise InputError(f"model {version} is already the champion" if champion else
                         f"there is no champion in {registry.models_dir} to compare "
                         f"{version} with")
    if (other := registry.challenger()) not in (None, version):
        raise InputError(f"model {other} is already the challenger of another rollout; "
                         "finish or abort it first")
    if registry.gate_passed(version) is False:
        raise InputError(f"model {version} failed its offline gates and cannot be rolled out")
    return champion


def first_read(source: StatsSource, champion: str, challenger: str, *,
               within_s: float = FIRST_READ_S, sleep: Callable[[float], None] | None = None
               ) -> tuple[ArmStats, ArmStats]:
    """The counts at the start (the first phase's baseline). A read that is momentarily
    inconsistent (a click applied before its impression) or unavailable is retried
    every 0.5 s for ``within_s`` seconds; then the last reason is the error (InputError).
    """
    deadline = time.monotonic() + within_s
    while True:
        try:
            return source.read(champion, challenger)
        except StatsUnavailable as exc:
            if time.monotonic() >= deadline:
                raise InputError(f"cannot read the arms' counts to start the rollout: "
                                 f"{exc}") from exc
            (sleep or time.sleep)(0.5)  # looked up now: tests patch time.sleep


def start_rollout(store: RolloutStore, registry: ModelRegistry, source: StatsSource,
                  make_runner: Callable[[Stored], Runner], *, version: str, rollout_id: str,
                  policy: Policy, shadow_s: float = 0.0, stats_file: str | None = None,
                  reason: str | None = None, gates: dict[str, Any] | None = None,
                  clock_ms: Callable[[], int] = _wall_ms,
                  within_s: float = FIRST_READ_S) -> tuple[Runner, RolloutState]:
    """Start the rollout of ``version`` (module docstring); returns the runner, *holding
    the controller lock*, and the first state (committed). The caller drives the runner
    (``rollout start``) or releases it (the pipeline).

    Args:
        shadow_s: the shadow phase's production length in seconds (0: none), multiplied
            by the policy's time scale.
        stats_file: recorded in the controller document (``rollout run`` reads it).
        reason / gates: the registry event's (default ``rollout <id> started``).

    Raises:
        InputError: a refusal of :func:`check_start`, unreadable counts, a registry move
            refused; :class:`~headrace.rollout.runner.ControllerLocked`: another
            controller holds the lock. Nothing is changed then.
        OnlineStoreError: Redis failed (transient).
    """
    champion = check_start(store, registry, version)
    champ, chall = first_read(source, champion, version, within_s=within_s)
    state, _ = begin(rollout_id, champion, version, clock_ms(), policy,
                     shadow_ms=round(shadow_s * 1000 * policy.time_scale),
                     champion_stats=champ, challenger_stats=chall)
    runner = make_runner(Stored(state, policy, stats_file))
    runner.acquire()  # a second controller: ControllerLocked, exit 2, nothing changed
    try:
        if registry.challenger() != version:  # already: an interrupted start, resumed
            registry.transition(version, Role.CHALLENGER, reason or f"rollout {rollout_id} "
                                "started", gates if gates is not None else
                                {"policy": policy.to_dict(), "shadow_s": shadow_s},
                                actor="rollout", rollout_id=rollout_id, phase=state.phase)
        store.clear_abort()
        first = runner.commit(state)
    except BaseException:
        runner.release()
        raise
    return runner, first
