"""The rollout controller's decisions: a pure step from state, clock and counts to a new
state and the actions to carry out (CONVENTIONS 10a). :mod:`headrace.rollout.runner`
is the thin loop that reads Redis and the stats, calls :func:`step` every tick and
carries the actions out.

Schedule: phase 0 (shadow, share 0, only with ``shadow_ms`` > 0) → phases 1..5 at the
policy's shares (3, 10, 20, 40, 50 %) → promoted; or rolled back from any phase.

* **Guardrails** (:func:`~headrace.rollout.gates.guardrails`) at every step, on the
  phase's counts: a breach rolls back in the same step.
* **Phase-end gates** (:func:`~headrace.rollout.gates.phase_end`) once the phase reaches
  its minimum duration, and — if that look holds — once more with ``final=True`` at its
  maximum duration (a hold there is a rollback). Never more: the two looks are what
  ``headrace bench rollout`` measures the error rates for.
* **Abort** (an operator's request) rolls back with the guardrail ``aborted``.

The phase's counts are the source's cumulative counts minus the snapshot taken at the
phase's start (``baseline_*``, persisted with the state), so a restarted controller
judges the same window. A step that decides returns the actions and a state whose
``pending`` holds them: the runner persists that state *before* acting and marks each
action done after it (``pending_done``), so a restart completes a decision exactly once
and never takes it again. A state with unfinished ``pending`` actions steps to itself.

Rollback order: the split to 100 % champion first, then waiting for every live server's
acknowledgement (which measures ``rollback_seconds``), then the registry (challenger →
failed, with the guardrail, its values and the phase), the split in the history, the
alert. Promotion: the registry first (``CHAMPION`` moves; servers hot-reload it), then
the split without a challenger, the history, the alert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from enum import StrEnum
from typing import Any, ClassVar

from headrace.core.errors import InputError
from headrace.rollout.gates import Action, ArmStats, Breach, Decision, guardrails, phase_end
from headrace.rollout.ope_gate import OpeEstimate, ope_breach
from headrace.rollout.policy import Policy
from headrace.rollout.source import arm_stats_from_dict, arm_stats_to_dict, subtract

__all__ = ["Status", "WriteSplit", "WaitAcks", "Transition", "RecordSplit", "Alert",
           "Notify", "ControllerAction", "RolloutState", "action_to_dict", "action_from_dict",
           "begin", "step", "phase_share"]


class Status(StrEnum):
    """A rollout's status; every status but ``running`` is final."""

    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


@dataclass(frozen=True)
class WriteSplit:
    """Write a new split (the runner gives it the next ``seq``)."""

    kind: ClassVar[str] = "write_split"
    champion: str
    challenger: str | None
    share: float
    phase: int
    shadow: bool = False


@dataclass(frozen=True)
class WaitAcks:
    """Wait until every live server acknowledges the last split written; the time from
    the breach (``breach_ms``) is ``rollback_seconds``."""

    kind: ClassVar[str] = "wait_acks"


@dataclass(frozen=True)
class Transition:
    """A registry role change; ``timing``: add ``rollback_seconds`` to reason and gates."""

    kind: ClassVar[str] = "transition"
    version: str
    role: str
    reason: str
    phase: int
    gates: dict[str, Any] = field(default_factory=dict)
    timing: bool = False


@dataclass(frozen=True)
class RecordSplit:
    """Record the traffic shares in the registry's history."""

    kind: ClassVar[str] = "record_split"
    shares: dict[str, float]
    reason: str
    phase: int
    timing: bool = False


@dataclass(frozen=True)
class Alert:
    """Tell people: webhook, log line (``level`` warning or info), a counter for
    rollbacks (``guardrail`` set)."""

    kind: ClassVar[str] = "alert"
    text: str
    level: str = "warning"
    guardrail: str | None = None
    timing: bool = False


@dataclass(frozen=True)
class Notify:
    """A decision record for the operator (one JSON line with ``--json``) and metrics."""

    kind: ClassVar[str] = "notify"
    event: dict[str, Any]
    timing: bool = False


ControllerAction = WriteSplit | WaitAcks | Transition | RecordSplit | Alert | Notify
_KINDS: dict[str, type[Any]] = {c.kind: c for c in (WriteSplit, WaitAcks, Transition,
                                                     RecordSplit, Alert, Notify)}


def action_to_dict(a: ControllerAction) -> dict[str, Any]:
    """``{"kind": …, **fields}``."""
    return {"kind": a.kind, **{f.name: getattr(a, f.name) for f in fields(a)}}


def action_from_dict(doc: dict[str, Any]) -> ControllerAction:
    """The inverse of :func:`action_to_dict`. Raises InputError for an unknown kind."""
    cls = _KINDS.get(str(doc.get("kind")))
    if cls is None:
        raise InputError(f"unknown controller action {doc.get('kind')!r}")
    try:
        action: ControllerAction = cls(**{k: v for k, v in doc.items() if k != "kind"})
    except TypeError as exc:
        raise InputError(f"invalid controller action {doc!r}: {exc}") from exc
    return action


@dataclass(frozen=True)
class RolloutState:
    """Everything the controller must remember (persisted as JSON, see :meth:`to_dict`).

    Attributes:
        rollout_id: salts the assignment hash; names the rollout in history and alerts.
        champion / challenger: the two versions.
        status: :class:`Status`.
        phase: 0 (shadow) or 1..5.
        phase_started_ms: when the phase began (epoch ms UTC).
        started_ms: when the rollout began.
        shadow_ms: the shadow phase's length (already time-scaled; 0: none).
        baseline_champion / baseline_challenger: the cumulative counts at the phase's
            start.
        looks: phase-end looks taken in this phase (0, 1 = held at the minimum
            duration, 2 = the final look).
        pending: the actions of the last decision; ``pending_done`` of them are done.
        last_decision: the last phase-end decision (or breach) as JSON.
        breach: the breach that rolled back (``name``, ``values``, ``message``,
            ``phase``), None otherwise; ``breach_ms``: when it was detected.
        rollback_seconds: breach → every live server acknowledging 100 % champion.
        split_seq: the ``seq`` of the last split the runner wrote.
        acks: the acknowledgement wait's result (``servers``, ``timed_out``, ``lagging``).
        ended_ms: when the rollout ended (promoted or rolled back).
        problems: actions that failed and were skipped (logged as errors).
    """

    rollout_id: str
    champion: str
    challenger: str
    status: Status
    phase: int
    phase_started_ms: int
    started_ms: int
    shadow_ms: int = 0
    baseline_champion: ArmStats = field(default_factory=ArmStats)
    baseline_challenger: ArmStats = field(default_factory=ArmStats)
    looks: int = 0
    pending: tuple[ControllerAction, ...] = ()
    pending_done: int = 0
    last_decision: dict[str, Any] | None = None
    breach: dict[str, Any] | None = None
    breach_ms: int | None = None
    rollback_seconds: float | None = None
    split_seq: int | None = None
    acks: dict[str, Any] | None = None
    ended_ms: int | None = None
    problems: tuple[str, ...] = ()

    @property
    def busy(self) -> bool:
        """Actions of the last decision are still to be carried out."""
        return self.pending_done < len(self.pending)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        out["baseline_champion"] = arm_stats_to_dict(self.baseline_champion)
        out["baseline_challenger"] = arm_stats_to_dict(self.baseline_challenger)
        out["pending"] = [action_to_dict(a) for a in self.pending]
        out["problems"] = list(self.problems)
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RolloutState:
        """The inverse of :meth:`to_dict`. Raises InputError for a malformed document."""
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in doc.items() if k in known}
            values["status"] = Status(values["status"])
            values["baseline_champion"] = arm_stats_from_dict(values.get("baseline_champion", {}))
            values["baseline_challenger"] = arm_stats_from_dict(
                values.get("baseline_challenger", {}))
            values["pending"] = tuple(action_from_dict(a) for a in values.get("pending", ()))
            values["problems"] = tuple(values.get("problems", ()))
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid rollout controller state: {exc!r}") from exc


def _ms(td: timedelta) -> int:
    return math.ceil(td / timedelta(milliseconds=1))


def phase_share(policy: Policy, phase: int) -> float:
    """The challenger's share in ``phase`` (0 for the shadow phase 0)."""
    return 0.0 if phase == 0 else policy.phase(phase).share


def _split(state: RolloutState, phase: int, policy: Policy, why: str
           ) -> tuple[WriteSplit, RecordSplit]:
    share = phase_share(policy, phase)
    return (WriteSplit(state.champion, state.challenger, share, phase, shadow=phase == 0),
            RecordSplit({state.champion: 1.0 - share, state.challenger: share}, why, phase))


def begin(rollout_id: str, champion: str, challenger: str, now_ms: int, policy: Policy, *,
          shadow_ms: int = 0, champion_stats: ArmStats | None = None,
          challenger_stats: ArmStats | None = None
          ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    """A new rollout at phase 0 (``shadow_ms`` > 0) or phase 1, and its first actions
    (write the split, record it, notify). The counts now are the first baseline."""
    if champion == challenger:
        raise InputError(f"the challenger {challenger} is the champion")
    state = RolloutState(rollout_id, champion, challenger, Status.RUNNING,
                         0 if shadow_ms > 0 else 1, now_ms, now_ms, max(0, shadow_ms),
                         champion_stats or ArmStats(), challenger_stats or ArmStats())
    write, record = _split(state, state.phase, policy, f"rollout {rollout_id} started "
                           f"(phase {state.phase})")
    event = {"event": "started", "rollout_id": rollout_id, "champion": champion,
             "challenger": challenger, "phase": state.phase, "share": write.share,
             "shadow": write.shadow, "at_ms": now_ms}
    actions = (write, record, Notify(event))
    return replace(state, pending=actions), actions


def _with(state: RolloutState, actions: tuple[ControllerAction, ...], **changes: Any
          ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    return replace(state, pending=actions, pending_done=0, **changes), actions


def _advance(state: RolloutState, now_ms: int, policy: Policy, champion: ArmStats,
             challenger: ArmStats, decision: dict[str, Any] | None
             ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    nxt = state.phase + 1
    write, record = _split(state, nxt, policy, f"rollout {state.rollout_id}: phase {nxt}")
    event = {"event": "advance", "rollout_id": state.rollout_id, "from_phase": state.phase,
             "phase": nxt, "share": write.share, "at_ms": now_ms, "decision": decision}
    return _with(state, (write, record, Notify(event)), phase=nxt, phase_started_ms=now_ms,
                 baseline_champion=champion, baseline_challenger=challenger, looks=0,
                 last_decision=decision if decision is not None else state.last_decision)


def _promote(state: RolloutState, now_ms: int, d: Decision
             ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    rid, new = state.rollout_id, state.challenger
    text = (f"rollout {rid}: {new} promoted to champion after phase {d.phase} "
            f"({state.champion} retired): {d.message}")
    actions: tuple[ControllerAction, ...] = (
        Transition(new, "champion", f"rollout {rid} passed phase {d.phase}: {d.message}",
                   d.phase, d.to_dict()),
        WriteSplit(new, None, 0.0, 0),
        RecordSplit({new: 1.0}, f"rollout {rid}: promoted", d.phase),
        Alert(text, "info"),
        Notify({"event": "promoted", "rollout_id": rid, "phase": d.phase, "at_ms": now_ms,
                "champion": new, "retired": state.champion, "decision": d.to_dict()}),
    )
    return _with(state, actions, status=Status.PROMOTED, looks=2, ended_ms=now_ms,
                 last_decision=d.to_dict())


def _rollback(state: RolloutState, now_ms: int, breach: Breach, status: Status,
              decision: dict[str, Any] | None = None
              ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    rid, old, phase = state.rollout_id, state.challenger, state.phase
    values = {**breach.values, "phase": phase}
    found = {"name": breach.name, "values": values, "message": breach.message, "phase": phase}
    why = f"rollout {rid} rolled back at phase {phase}: {breach.name}: {breach.message}"
    gates = {"guardrail": breach.name, "phase": phase, "values": values,
             "message": breach.message, "breach_ms": now_ms}
    actions: tuple[ControllerAction, ...] = (
        WriteSplit(state.champion, None, 0.0, 0),
        WaitAcks(),
        Transition(old, "failed", why, phase, gates, timing=True),
        RecordSplit({state.champion: 1.0}, f"rollout {rid}: rollback to 100 % champion "
                    f"({breach.name})", phase, timing=True),
        Alert(f":rotating_light: {why} — 100 % of traffic is back on {state.champion}",
              "warning", breach.name, timing=True),
        Notify({"event": "rolled_back", "rollout_id": rid, "status": status.value,
                "phase": phase, "at_ms": now_ms, "breach": found, "decision": decision},
               timing=True),
    )
    return _with(state, actions, status=status, breach=found, breach_ms=now_ms,
                 ended_ms=now_ms, last_decision=decision or {"breach": found})


def _breach(breaches: list[Breach], phase: int) -> Breach:
    b = breaches[0]
    others = [x.name for x in breaches[1:]]
    return Breach(b.name, {**b.values, "phase": phase, **({"also": others} if others else {})},
                  b.message)


def step(state: RolloutState, now_ms: int, champion_stats: ArmStats,
         challenger_stats: ArmStats, policy: Policy, *, abort: str | None = None,
         ope: OpeEstimate | None = None
         ) -> tuple[RolloutState, tuple[ControllerAction, ...]]:
    """One evaluation of a running rollout.

    Args:
        state: the controller's state.
        now_ms: the clock (epoch ms UTC).
        champion_stats / challenger_stats: each arm's cumulative counts since the
            rollout started (the step subtracts the phase's baseline).
        policy: the thresholds and durations (``time_scale`` applied).
        abort: an operator's abort request (its reason): roll back now.
        ope: the off-policy estimate judged at the end of the shadow phase when
            ``policy.ope_max_drop`` is set (:mod:`headrace.rollout.ope_gate`); None
            there: no estimate, the gate fails.

    Returns:
        The new state and the actions to carry out, in order (also in
        ``new_state.pending``). A finished rollout, or one whose last decision's actions
        are not all done, steps to itself with no actions.

    Raises:
        InputError: the counts went backwards since the phase began
            (:func:`~headrace.rollout.source.subtract`).
    """
    if state.status is not Status.RUNNING or state.busy:
        return state, ()
    if abort is not None:
        return _rollback(state, now_ms, Breach("aborted", {"reason": abort},
                                               f"aborted by an operator: {abort}"),
                         Status.ABORTED)
    champ = subtract(champion_stats, state.baseline_champion)
    chall = subtract(challenger_stats, state.baseline_challenger)
    elapsed = now_ms - state.phase_started_ms
    # phase 0 (shadow) is judged by phase 1's guardrail thresholds
    breaches = guardrails(max(1, state.phase), champ, chall, policy)
    if breaches:
        return _rollback(state, now_ms, _breach(breaches, state.phase), Status.ROLLED_BACK)
    if state.phase == 0:
        if elapsed < state.shadow_ms:
            return state, ()
        if policy.ope_max_drop is None:
            return _advance(state, now_ms, policy, champion_stats, challenger_stats, None)
        blocked = ope_breach(ope, policy.ope_max_drop)
        if blocked is not None:
            return _rollback(state, now_ms, blocked, Status.ROLLED_BACK)
        assert ope is not None
        return _advance(state, now_ms, policy, champion_stats, challenger_stats,
                        {"gate": "ope", "ope": ope.to_dict(),
                         "max_drop": policy.ope_max_drop})
    final = elapsed >= _ms(policy.max_duration(state.phase))
    due = (state.looks == 0 and elapsed >= _ms(policy.min_duration(state.phase))) or (
        state.looks == 1 and final)
    if not due:
        return state, ()
    d = phase_end(state.phase, champ, chall, policy, final=final)
    if d.action is Action.HOLD:
        event = {"event": "hold", "rollout_id": state.rollout_id, "phase": state.phase,
                 "at_ms": now_ms, "decision": d.to_dict()}
        return _with(state, (Notify(event),), looks=1, last_decision=d.to_dict())
    looks = 2 if final else state.looks + 1
    if d.action is Action.ADVANCE:
        return _advance(replace(state, looks=looks), now_ms, policy, champion_stats,
                        challenger_stats, d.to_dict())
    if d.action is Action.PROMOTE:
        return _promote(state, now_ms, d)
    breach = Breach(d.name, d.values, d.message)
    return _rollback(replace(state, looks=looks), now_ms, breach, Status.ROLLED_BACK,
                     d.to_dict())
