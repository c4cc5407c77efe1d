"""The rollout controller's thin loop: Redis, the registry and the alerts around the pure
:func:`~headrace.rollout.controller.step`.

Each tick: renew the lock, finish a decision's pending actions, else read the abort
request and the counts, :func:`~headrace.rollout.controller.step`, persist, act (the keys
are :mod:`headrace.rollout.store`'s).

Exactly once: a decision's actions are persisted (``pending``) before the first runs
and ``pending_done`` after each, so a restart redoes at most the one action that was
running. Each is idempotent on a redo: a split is written again with a new ``seq``; a
registry transition already made (the version has the role) is skipped; a split already
the history's last event is not recorded twice; an alert may go out twice (at least
once). A failing registry action is logged and recorded in ``problems``, never retried
forever; the split — what protects users — never depends on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from headrace.core.errors import InputError, OnlineStoreError
from headrace.model.registry import ModelRegistry, Role, SplitEvent
from headrace.rollout.alerts import RolloutMetrics, WebhookAlerter
from headrace.rollout.controller import (
    Alert,
    ControllerAction,
    Notify,
    RecordSplit,
    RolloutState,
    Status,
    Transition,
    WaitAcks,
    WriteSplit,
    step,
)
from headrace.rollout.ope_gate import OpeEstimate
from headrace.rollout.source import StatsSource, StatsUnavailable
from headrace.rollout.split import SplitState
from headrace.rollout.store import RolloutStore, Stored, new_token

__all__ = ["ControllerLocked", "ControllerLockLost", "Runner"]

log = logging.getLogger(__name__)


class ControllerLocked(InputError):
    """Another controller holds the rollout lock (exit 2)."""


class ControllerLockLost(OnlineStoreError):
    """This controller's lock expired and another took it: stop at once."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Runner:
    """Carries a rollout's decisions out, one tick at a time (module docstring).

    Args:
        store: the Redis keys.
        registry: the models folder's registry (promotion moves ``CHAMPION``).
        source: each arm's cumulative counts.
        stored: the controller document to run (its policy and stats file).
        tick_ms: milliseconds between evaluations.
        lock_ttl_ms: the lock's lifetime, renewed every tick.
        ack_timeout_ms / ack_poll_ms: the acknowledgement wait after a rollback.
        alerter: the webhook; metrics: the gauges and counters.
        on_event: called with every decision record (the CLI prints it).
        clock_ms: epoch ms UTC; sleep: seconds → None (tests pin both).
        token: this controller's lock token (default :func:`new_token`).
    """

    def __init__(self, store: RolloutStore, registry: ModelRegistry, source: StatsSource,
                 stored: Stored, *, tick_ms: int = 1000, lock_ttl_ms: int = 10_000,
                 ack_timeout_ms: int = 60_000, ack_poll_ms: int = 50,
                 alerter: WebhookAlerter | None = None, metrics: RolloutMetrics | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 clock_ms: Callable[[], int] = _wall_ms,
                 sleep: Callable[[float], None] = time.sleep, token: str | None = None,
                 ope: Callable[[RolloutState], OpeEstimate] | None = None) -> None:
        self.store, self.registry, self.source = store, registry, source
        self.ope = ope
        self.stored = stored
        self.tick_ms, self.lock_ttl_ms = tick_ms, lock_ttl_ms
        self.ack_timeout_ms, self.ack_poll_ms = ack_timeout_ms, ack_poll_ms
        self.alerter = alerter or WebhookAlerter(None)
        self.metrics = metrics or RolloutMetrics()
        self.on_event = on_event
        self.clock_ms, self.sleep = clock_ms, sleep
        self.token = token or new_token()
        self._renewed_ms = 0
        self._warned: str | None = None

    @property
    def state(self) -> RolloutState:
        """The state as last persisted."""
        return self.stored.state

    # ------------------------------------------------------------------ the lock
    def acquire(self) -> None:
        """Take the lock.

        Raises:
            ControllerLocked: another controller holds it (the message names it).
        """
        if not self.store.acquire(self.token, self.lock_ttl_ms):
            held = self.store.holder()
            who = f"{held[0]}, for {max(held[1], 0) / 1000:.1f} s more" if held else "unknown"
            raise ControllerLocked(f"another rollout controller holds {self.store.lock_key} "
                                   f"(holder {who}); stop it or wait for its lock to expire")
        self._renewed_ms = self.clock_ms()

    def release(self) -> None:
        """Release the lock if still ours (never raises for Redis errors)."""
        try:
            self.store.release(self.token)
        except OnlineStoreError as exc:
            log.warning("could not release the rollout lock (it expires by itself): %s", exc)

    def keepalive(self, force: bool = False) -> None:
        """Renew the lock (at most every tick unless ``force``); an expired but free
        lock is taken again.

        Raises:
            ControllerLockLost: another controller holds it now.
        """
        now = self.clock_ms()
        if not force and now - self._renewed_ms < min(self.tick_ms, self.lock_ttl_ms // 3):
            return
        if not (self.store.renew(self.token, self.lock_ttl_ms)
                or self.store.acquire(self.token, self.lock_ttl_ms)):
            held = self.store.holder()
            raise ControllerLockLost(f"the rollout lock was taken by {held[0] if held else '?'}"
                                     "; this controller stops", transient=False)
        self._renewed_ms = now

    # ------------------------------------------------------------------ the loop
    def commit(self, state: RolloutState) -> RolloutState:
        """Persist ``state`` (a decision's, with ``pending``) and carry its actions out."""
        self._save(state)
        return self._complete()

    def tick(self) -> RolloutState:
        """One evaluation: finish pending actions, else read the abort request and the
        counts, :func:`step`, persist, act."""
        self.keepalive(force=True)
        state = self.state
        if state.busy:
            return self._complete()
        if state.status is not Status.RUNNING:
            return state
        abort = self.store.abort_request(state.rollout_id)
        try:
            champ, chall = self.source.read(state.champion, state.challenger)
            new, actions = step(state, self.clock_ms(), champ, chall, self.stored.policy,
                                abort=abort, ope=self._ope_due(state))
        except (StatsUnavailable, InputError) as exc:
            if abort is None:
                self._warn_once(f"rollout {state.rollout_id}: no evaluation this tick: {exc}")
                return state
            champ, chall = state.baseline_champion, state.baseline_challenger
            new, actions = step(state, self.clock_ms(), champ, chall, self.stored.policy,
                                abort=abort)
        self._warned = None
        self.metrics.observe(new, champ, chall, self.stored.policy, self.clock_ms())
        if actions:
            return self.commit(new)
        if new != state:
            self._save(new)
        return new

    def _ope_due(self, state: RolloutState) -> OpeEstimate | None:
        """The off-policy estimate when the shadow phase ends under an off-policy gate
        (asked once per decision: the step then advances or rolls back), else None."""
        if (state.phase != 0 or self.stored.policy.ope_max_drop is None
                or self.clock_ms() - state.phase_started_ms < state.shadow_ms):
            return None
        if self.ope is None:
            return OpeEstimate(problem="this controller has no off-policy evaluator")
        return self.ope(state)

    def run(self) -> RolloutState:
        """Tick every ``tick_ms`` until the rollout ends and its actions are done.
        Redis failures are logged and retried at the next tick.

        Raises:
            ControllerLockLost: another controller took the lock.
        """
        while True:
            started = self.clock_ms()
            try:
                state = self.tick()
            except ControllerLockLost:
                raise
            except OnlineStoreError as exc:
                self._warn_once(f"rollout controller: {exc}; retrying")
                state = self.state
            if state.status is not Status.RUNNING and not state.busy:
                return state
            self.sleep(max(0.0, (self.tick_ms - (self.clock_ms() - started)) / 1000))

    # ------------------------------------------------------------------ actions
    def _save(self, state: RolloutState) -> None:
        self.store.save(replace(self.stored, state=state), self.clock_ms())
        self.stored = replace(self.stored, state=state)

    def _complete(self) -> RolloutState:
        state = self.state
        while state.busy:
            action = state.pending[state.pending_done]
            state = self._apply(state, action)
            state = replace(state, pending_done=state.pending_done + 1)
            self._save(state)
        self.metrics.observe(state, None, None, self.stored.policy)
        return state

    def _apply(self, state: RolloutState, a: ControllerAction) -> RolloutState:
        rid = state.rollout_id
        if isinstance(a, WriteSplit):
            now, w = self.clock_ms(), a
            split = self.store.write_split(lambda seq: SplitState(
                seq, rid, w.champion, w.challenger, w.share, w.shadow, w.phase, now))
            log.info("rollout %s: split seq %d: %s at %.1f %%%s", rid, split.seq,
                     a.challenger or "no challenger", 100 * a.share, " (shadow)" * a.shadow)
            return replace(state, split_seq=split.seq)
        if isinstance(a, WaitAcks):
            return self._wait_acks(state)
        try:
            if isinstance(a, Transition):
                self._transition(state, a)
            elif isinstance(a, RecordSplit):
                self._record_split(state, a)
        except InputError as exc:
            log.error("rollout %s: %s failed and is skipped: %s", rid, a.kind, exc)
            return replace(state, problems=(*state.problems, f"{a.kind}: {exc}"))
        if isinstance(a, Alert):
            text = a.text + (_timing(state) if a.timing else "")
            log.log(logging.WARNING if a.level == "warning" else logging.INFO, "%s", text)
            if a.guardrail is not None:
                self.metrics.rollbacks.labels(guardrail=a.guardrail).inc()
            self.alerter.send(text)
        elif isinstance(a, Notify):
            event = {**a.event, **({"rollback_seconds": state.rollback_seconds,
                                    "acks": state.acks} if a.timing else {})}
            self.metrics.decisions.labels(event=str(event.get("event"))).inc()
            if self.on_event is not None:
                self.on_event(event)
        return state

    def _transition(self, state: RolloutState, a: Transition) -> None:
        if self.registry.roles().get(a.version) == Role(a.role):
            log.info("rollout %s: %s is already %s (a redo after a restart)",
                     state.rollout_id, a.version, a.role)
            return
        gates = {**a.gates, **({"rollback_seconds": state.rollback_seconds,
                                "acks": state.acks} if a.timing else {})}
        reason = a.reason + (_timing(state) if a.timing else "")
        self.registry.transition(a.version, a.role, reason, gates, actor="rollout",
                                 rollout_id=state.rollout_id, phase=a.phase)

    def _record_split(self, state: RolloutState, a: RecordSplit) -> None:
        reason = a.reason + (_timing(state) if a.timing else "")
        last = self.registry.history()[-1:]
        if (last and isinstance(last[0], SplitEvent) and last[0].rollout_id == state.rollout_id
                and last[0].reason == reason and dict(last[0].shares) == a.shares):
            return  # a redo after a restart
        self.registry.record_split(a.shares, reason, state.rollout_id, a.phase)

    def _wait_acks(self, state: RolloutState) -> RolloutState:
        """Poll the acknowledgements until every live server shows ``split_seq``."""
        target = state.split_seq if state.split_seq is not None else -1
        deadline = time.monotonic() + self.ack_timeout_ms / 1000
        while True:
            acks = self.store.acks()
            lagging = sorted(s for s, ack in acks.items() if ack.seq < target)
            if not lagging or time.monotonic() >= deadline:
                break
            self.keepalive()
            self.sleep(self.ack_poll_ms / 1000)
        done = self.clock_ms()
        start = state.breach_ms if state.breach_ms is not None else done
        seconds = None if lagging else round((done - start) / 1000, 3)
        result = {"servers": len(acks), "seq": target, "timed_out": bool(lagging),
                  "lagging": lagging, "acked_ms": None if lagging else done}
        self.metrics.rollback_seconds.set(-1 if seconds is None else seconds)
        if lagging:
            log.error("rollout %s: %d live server(s) did not acknowledge the rollback split "
                      "(seq %d) within %.0f s: %s", state.rollout_id, len(lagging), target,
                      self.ack_timeout_ms / 1000, ", ".join(lagging))
        return replace(state, rollback_seconds=seconds, acks=result)

    def _warn_once(self, message: str) -> None:
        if message != self._warned:
            log.warning("%s", message)
            self._warned = message


def _timing(state: RolloutState) -> str:
    acks = state.acks or {}
    if state.rollback_seconds is not None:
        return (f"; 100 % champion on {acks.get('servers', 0)} live server(s) "
                f"{state.rollback_seconds:.2f} s after the breach")
    lag = ", ".join(acks.get("lagging", [])) or "?"
    return f"; servers not acknowledging 100 % champion: {lag}"
