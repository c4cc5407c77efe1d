"""The model registry: the role of every version and an append-only history of changes.

Roles (:class:`Role`): ``candidate`` (trained, not deployed; also every version on disk
the history does not mention), ``challenger`` (in rollout; at most one), ``champion``
(what ``CHAMPION`` names), ``failed`` (terminal) and ``retired``. Moves: :data:`ALLOWED`.

``MODELS_DIR/HISTORY.jsonl`` holds one JSON object per line per event, never rewritten::

    {"seq": 3, "at_ms": 1764633600000, "kind": "role", "version": "2025-12-02-00",
     "role": "champion", "previous": "challenger", "reason": "…", "gates": {…},
     "actor": "rollout", "rollout_id": "r-1", "phase": 5}
    {"seq": 4, "at_ms": 1764633600000, "kind": "split", "shares": {"v3": 0.97, "v4": 0.03},
     "reason": "phase 1", "actor": "rollout", "rollout_id": "r-1", "phase": 1}

``previous`` is null on a version's first event; ``seq`` is unique and increasing;
``at_ms`` (epoch ms UTC, injected clock) never decreases. Writers hold an ``fcntl.flock``
on ``.history.lock`` around "read, validate, append" and write the lines of one decision
(a promotion and the retirement it causes) in one ``O_APPEND`` write, then fsync. A torn
last line (a crash mid-write) is skipped with a warning; the next append starts a line.
The file's I/O (reading, the lock, the append) is :mod:`headrace.model.history`.

``CHAMPION`` is what serves, so it wins: promotion moves it *before* the append, and a
pointer naming another version than the history's champion (a models dir from before
the history, a hand-moved pointer, a crash between the two steps) reads as ``actor:
"migration"`` events at the pointer's mtime, persisted by the next write. Reads never
write.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from headrace.core.errors import InputError
from headrace.core.jsonsafe import json_safe
from headrace.model.artifact import (
    CHAMPION_FILE,
    champion_version,
    list_versions,
    set_champion,
    version_key,
)
from headrace.model.history import (
    HISTORY_FILE,
    HistoryEvent,
    HistoryFile,
    Role,
    RoleEvent,
    SplitEvent,
)

__all__ = ["HISTORY_FILE", "ACTORS", "Role", "ALLOWED", "RoleEvent", "SplitEvent",
           "HistoryEvent", "ModelRegistry"]

#: who made a change; "migration" marks events read from the CHAMPION pointer
ACTORS = ("train", "rollout", "cli", "migration")


#: role -> roles it may move to. champion -> retired happens only as the side effect of
#: promoting another version (the server always has a champion); failed is terminal.
ALLOWED: Mapping[Role, frozenset[Role]] = {
    Role.CANDIDATE: frozenset({Role.CHALLENGER, Role.CHAMPION, Role.FAILED}),
    Role.CHALLENGER: frozenset({Role.CHAMPION, Role.FAILED, Role.CANDIDATE}),
    Role.CHAMPION: frozenset({Role.RETIRED}),
    Role.RETIRED: frozenset({Role.CHALLENGER, Role.CHAMPION, Role.FAILED}),
    Role.FAILED: frozenset(),
}


def _replay(events: Sequence[HistoryEvent]) -> dict[str, Role]:
    """Version -> its role after ``events`` (the last role event wins)."""
    return {e.version: e.role for e in events if isinstance(e, RoleEvent)}


def _holder(state: Mapping[str, Role], role: Role) -> str | None:
    return next((v for v, r in state.items() if r is role), None)


def _check_actor(actor: str) -> None:
    if actor not in ACTORS:
        raise InputError(f"unknown actor '{actor}'; actors are {', '.join(ACTORS)}")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ModelRegistry:
    """Roles and history of the versions in ``models_dir``.

    Args:
        models_dir: the models folder (need not exist for reads: then it is empty).
        clock: current time in epoch milliseconds UTC.
    """

    def __init__(self, models_dir: Path | str, clock: Callable[[], int] = _wall_ms) -> None:
        self.models_dir = Path(models_dir)
        self._file = HistoryFile(self.models_dir)
        self.path = self._file.path
        self._clock = clock

    def history(self, version: str | None = None) -> list[HistoryEvent]:
        """Every event in order (``version``: its role events and the splits naming it).
        Raises InputError for an unknown ``version``."""
        events = self._snapshot()
        if version is None:
            return events
        self._check_known(version, _replay(events))
        return [e for e in events if (e.version == version if isinstance(e, RoleEvent)
                                      else version in e.shares)]

    def roles(self) -> dict[str, Role]:
        """Version -> role for every version on disk or in the history, oldest first."""
        state = _replay(self._snapshot())
        names = sorted(set(state) | set(list_versions(self.models_dir)), key=version_key)
        return {v: state.get(v, Role.CANDIDATE) for v in names}

    def champion(self) -> str | None:
        """The champion's version, or None."""
        return _holder(_replay(self._snapshot()), Role.CHAMPION)

    def challenger(self) -> str | None:
        """The challenger in rollout, or None."""
        return _holder(_replay(self._snapshot()), Role.CHALLENGER)

    def serving_at(self, t_ms: int) -> dict[str, float]:
        """Which versions served at ``t_ms`` and at which share of requests.

        The champion at ``t_ms`` gets 1 - the challenger's share; the challenger gets the
        share of the last split recorded after it became challenger (0 before one).
        Versions with share 0 are left out; before any champion the answer is ``{}``.
        """
        prefix = [e for e in self._snapshot() if e.at_ms <= t_ms]
        state = _replay(prefix)
        champ, chall = _holder(state, Role.CHAMPION), _holder(state, Role.CHALLENGER)
        share = 0.0
        for e in reversed(prefix if chall else []):
            if isinstance(e, SplitEvent) or e.version == chall:  # whichever came last
                share = e.shares.get(chall or "", 0.0) if isinstance(e, SplitEvent) else 0.0
                break
        return {v: s for v, s in ((champ, 1.0 - share), (chall, share)) if v and s > 0}

    def rollback_target(self) -> str | None:
        """The last version that passed every gate: it was champion (offline gates and,
        for a rollout, the online ones), its metadata's offline gate decision promoted
        it and it never failed. Normally the champion; None when no version qualifies."""
        events = [e for e in self._snapshot() if isinstance(e, RoleEvent)]
        failed = {e.version for e in events if e.role is Role.FAILED}
        for e in reversed(events):
            if (e.role is Role.CHAMPION and e.version not in failed
                    and self.gate_passed(e.version) is True):
                return e.version
        return None

    def metadata(self, version: str) -> dict[str, Any]:
        """``metadata.json`` of ``version``; ``{}`` when missing or unreadable."""
        meta: Any = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((self.models_dir / version / "metadata.json").read_text("utf-8"))
        return meta if isinstance(meta, dict) else {}

    def gate_passed(self, version: str) -> bool | None:
        """The offline gate decision in the metadata; None when there is none."""
        gate = self.metadata(version).get("gate")
        promote = gate.get("promote") if isinstance(gate, dict) else None
        return promote if isinstance(promote, bool) else None

    def transition(self, version: str, role: Role | str, reason: str,
                   gates: Mapping[str, Any] | None = None, *, actor: str = "cli",
                   rollout_id: str | None = None, phase: int | None = None
                   ) -> list[RoleEvent]:
        """Move ``version`` to ``role`` and append the change (see :data:`ALLOWED`).

        ``candidate`` as a version's first event registers it. Promotion to champion
        moves ``CHAMPION`` and retires the previous champion in the same append.

        Returns:
            The events appended (the promotion and the retirement it caused).

        Raises:
            InputError: nothing written: unknown version, role or actor; a move
                :data:`ALLOWED` refuses; a second challenger or one without a champion;
                a promotion during another's rollout; failed offline gates in the
                metadata; an incomplete version folder.
        """
        if role not in list(Role):
            raise InputError(f"unknown role '{role}'; roles are {', '.join(Role)}")
        _check_actor(actor)
        target = Role(role)
        with self._file.lock(exclusive=True):
            events, now, sync = self._read_synced()
            state = _replay(events)
            self._check_known(version, state)
            current = state.get(version)
            self._check_move(version, current, target, state)
            seq = events[-1].seq + 1 if events else 1
            new = [RoleEvent(seq, now, version, target, current, reason,
                             json_safe(dict(gates or {})), actor, rollout_id, phase)]
            old = _holder(state, Role.CHAMPION)
            if target is Role.CHAMPION:
                new += [RoleEvent(seq + 1, now, old, Role.RETIRED, Role.CHAMPION,
                                  f"replaced by {version}", {}, actor, rollout_id, phase)
                        ] if old is not None else []
                set_champion(self.models_dir, version)  # the pointer first: it is what serves
            self._file.append([*sync, *new])
        return new

    def record_split(self, shares: Mapping[str, float], reason: str,
                     rollout_id: str | None = None, phase: int | None = None, *,
                     actor: str = "rollout") -> SplitEvent:
        """Record the traffic shares from now on: only the current champion and
        challenger may have one, each in [0, 1], adding up to 1 (±1e-6); else InputError
        and nothing written."""
        _check_actor(actor)
        with self._file.lock(exclusive=True):
            events, now, sync = self._read_synced()
            state = _replay(events)
            serving = (_holder(state, Role.CHAMPION), _holder(state, Role.CHALLENGER))
            clean: dict[str, float] = {}
            for v, s in shares.items():
                if v not in serving:
                    raise InputError(f"cannot give {v} a traffic share: only the champion "
                                     f"({serving[0]}) and the challenger ({serving[1]}) serve")
                if not 0.0 <= float(s) <= 1.0:
                    raise InputError(f"the traffic share of {v} must be in [0, 1], not {s}")
                clean[v] = float(s)
            if abs(sum(clean.values()) - 1.0) > 1e-6:
                raise InputError(f"traffic shares must add up to 1, not {sum(clean.values())}")
            event = SplitEvent(events[-1].seq + 1 if events else 1, now, clean, reason, actor,
                               rollout_id, phase)
            self._file.append([*sync, event])
        return event

    def _check_known(self, version: str, state: Mapping[str, Role]) -> None:
        known = sorted(set(state) | set(list_versions(self.models_dir)), key=version_key)
        if version not in known:
            shown = ", ".join(known[-12:]) if known else "none"
            more = f" (the last 12 of {len(known)})" if len(known) > 12 else ""
            raise InputError(f"unknown model version '{version}' in {self.models_dir}; "
                             f"known versions{more}: {shown}")

    def _check_move(self, version: str, current: Role | None, target: Role,
                    state: Mapping[str, Role]) -> None:
        eff, chall = current or Role.CANDIDATE, _holder(state, Role.CHALLENGER)
        if target is eff and not (eff is Role.CANDIDATE and current is None):
            raise InputError(f"model {version} is already {eff}")
        if eff is Role.FAILED:
            raise InputError(f"model {version} failed and can never become {target}")
        if eff is Role.CHAMPION and target is Role.RETIRED:
            raise InputError(f"champion {version} is retired by promoting another version "
                             "(the server must always have a champion)")
        if target is not eff and target not in ALLOWED[eff]:
            raise InputError(f"model {version} cannot move from {eff} to {target} (a {eff} "
                             f"may become: {', '.join(sorted(ALLOWED[eff]))})")
        if target in (Role.CHALLENGER, Role.CHAMPION):
            if self.gate_passed(version) is False:
                raise InputError(f"model {version} failed its offline gates and can never "
                                 f"become {target}")
            if chall not in (None, version):
                raise InputError(f"model {chall} is already in rollout; finish or abort it "
                                 f"before making {version} {target}")
        if target is Role.CHALLENGER and _holder(state, Role.CHAMPION) is None:
            raise InputError(f"there is no champion to compare challenger {version} with")

    def _read_synced(self) -> tuple[list[HistoryEvent], int, list[RoleEvent]]:
        """(events + pointer sync events, now, the sync events). ``now`` never goes back."""
        events = self._file.read()
        now = max([int(self._clock()), *(e.at_ms for e in events[-1:])])
        sync = self._sync(events, now)
        return [*events, *sync], now, sync

    def _snapshot(self) -> list[HistoryEvent]:
        with self._file.lock(exclusive=False):
            return self._read_synced()[0]

    def _sync(self, events: Sequence[HistoryEvent], now: int) -> list[RoleEvent]:
        """Events that make the history agree with the CHAMPION pointer (usually none)."""
        pointer = champion_version(self.models_dir)
        state = _replay(events)
        old = _holder(state, Role.CHAMPION)
        if pointer is None or pointer == old:
            return []
        mtime = now
        with contextlib.suppress(OSError):
            mtime = (self.models_dir / CHAMPION_FILE).stat().st_mtime_ns // 1_000_000
        at = max([min(mtime, now), *(e.at_ms for e in events[-1:])])
        seq = events[-1].seq + 1 if events else 1
        why = ("migrated: CHAMPION named it before the history began" if not events
               else "CHAMPION was moved outside the registry")
        out = [RoleEvent(seq, at, pointer, Role.CHAMPION, state.get(pointer), why, {},
                         "migration")]
        return out + ([RoleEvent(seq + 1, at, old, Role.RETIRED, Role.CHAMPION,
                                 f"replaced by {pointer} ({why})", {}, "migration")]
                      if old is not None else [])
