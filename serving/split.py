"""The traffic split as this server applies it: polled from Redis, acknowledged, and
exposed to requests as one immutable :class:`AppliedSplit`.

:class:`SplitWatcher` reads the split (:func:`~headrace.rollout.split.read_split`)
every ``poll_s`` seconds in a daemon thread, loads the challenger it names (the same
loading and compilation as the champion, :meth:`serving.model_loader.ModelWatcher.load`)
and rebinds :attr:`SplitWatcher.current` — one attribute, so a request that read it
once keeps one consistent split. After every poll it refreshes its acknowledgement
(:func:`~headrace.rollout.split.write_ack`, 10 s expiry) with what it serves.

Failure behaviour: the split falls back to 100 % champion, never to the challenger,
immediately and until the cause is gone:

* Redis cannot answer within ``timeout``: ``headrace_rollout_split_errors_total{reason=
  "redis"}`` per failed poll, ``headrace_rollout_split_redis_available`` 0 and one
  WARNING when the outage starts, one when it ends (the challenger stays loaded, so
  recovery applies the split at once);
* an invalid split document: ``reason="invalid"`` and one ERROR per distinct document;
* a challenger that cannot be loaded: ``reason="challenger_load"`` and one ERROR; the
  load is retried every :data:`RETRY_LOAD_S` seconds (a version copied late).

With a :class:`~serving.rollout_counts.CountsAccumulator`, each poll that reached
Redis ends with one flush of the per-arm serving counts (a poll that could not read the
split skips it: Redis is away, and the poll must not wait a second timeout), and
:meth:`SplitWatcher.stop` flushes once more.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from headrace.core.errors import InputError, OnlineStoreError
from headrace.rollout.split import Ack, SplitState, SplitStateError, read_split, write_ack
from serving.metrics import ServingMetrics
from serving.model_loader import ScoringModel
from serving.periodic import Periodic
from serving.rollout_counts import CountsAccumulator

__all__ = ["AppliedSplit", "CHAMPION_ONLY", "SplitSource", "StaticSplit", "SplitWatcher",
           "RETRY_LOAD_S", "default_server_id"]

log = logging.getLogger(__name__)

#: seconds before a challenger that failed to load is tried again
RETRY_LOAD_S = 5.0


@dataclass(frozen=True)
class AppliedSplit:
    """What requests do now. Immutable: a change is a new object.

    Attributes:
        state: the split acted on (None: none in Redis, or it could not be read/parsed).
        challenger: the loaded challenger, None for 100 % champion.
        share: the challenger's share served (0 without ``challenger``).
        shadow: the challenger also scores the champion's requests.
        rollout_id: the assignment salt.
        reason: ``none``, ``applied``, ``loading``, ``redis``, ``invalid`` or
            ``challenger_load`` (the last four serve 100 % champion).
    """

    state: SplitState | None
    challenger: ScoringModel | None
    share: float
    shadow: bool
    rollout_id: str
    reason: str


#: no rollout: 100 % champion
CHAMPION_ONLY = AppliedSplit(None, None, 0.0, False, "", "none")


class SplitSource(Protocol):
    """Where ``Score`` reads the split it applies: read :attr:`current` ONCE per request."""

    @property
    def current(self) -> AppliedSplit: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class StaticSplit:
    """A split that never changes (a server without Redis, tests)."""

    def __init__(self, current: AppliedSplit = CHAMPION_ONLY) -> None:
        self.current = current

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


def default_server_id() -> str:
    """``{hostname}-{pid}``: unique among the live servers of one deployment."""
    return f"{socket.gethostname()}-{os.getpid()}"


class SplitWatcher:
    """Polls the split, loads its challenger, acknowledges (see the module docstring).

    Args:
        client: a redis-py client (``get``/``set``) with a socket timeout of about the
            poll interval: a frozen Redis must fail the poll, not hang it.
        prefix: the deployment's Redis key prefix.
        server_id: this server's name in the acknowledgement key.
        load: loads and compiles a version (raises ``InputError``).
        poll_s: seconds between polls.
        metrics: the server's metrics.
        clock_ms: epoch milliseconds (``applied_ms``).
        clock: monotonic seconds (outage length, load retries).
        counts: the server's per-arm serving counts, flushed after each poll (None:
            not counted).
    """

    def __init__(self, client: Any, prefix: str, server_id: str,
                 load: Callable[[str], ScoringModel], *, poll_s: float = 0.25,
                 metrics: ServingMetrics | None = None,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 clock: Callable[[], float] = time.monotonic,
                 counts: CountsAccumulator | None = None) -> None:
        self.client = client
        self.counts = counts
        self.prefix = prefix
        self.server_id = server_id
        self.poll_s = poll_s
        self.metrics = ServingMetrics() if metrics is None else metrics
        self._load = load
        self._clock_ms = clock_ms
        self._clock = clock
        self.current: AppliedSplit = CHAMPION_ONLY
        self._models: dict[str, ScoringModel] = {}  # the loaded challenger (one at most)
        self._failed: dict[str, float] = {}  # version -> when its load failed
        self._invalid: str | None = None  # the last invalid document's problems (logged)
        self._down_since: float | None = None
        self._loop = Periodic("split-watch", poll_s, self.poll,
                              "split poll failed unexpectedly; retrying at the next poll")

    # ------------------------------------------------------------------ one poll
    def poll(self) -> AppliedSplit:
        """Read the split, apply it, acknowledge it. Never raises for Redis errors, an
        invalid document or an unloadable challenger (see the module docstring).

        Returns:
            The split now applied.
        """
        m = self.metrics
        try:
            state = read_split(self.client, self.prefix)
        except OnlineStoreError as exc:
            m.split_errors.labels(reason="redis").inc()
            self._redis_down(exc)
            return self.current
        except SplitStateError as exc:
            self._redis_up()
            m.split_errors.labels(reason="invalid").inc()
            if str(exc) != self._invalid:
                self._invalid = str(exc)
                log.error("rollout split at %s:rollout:split ignored, serving 100 %% "
                          "champion: %s", self.prefix, exc)
            self._set(AppliedSplit(None, None, 0.0, False, "", "invalid"))
        else:
            self._redis_up()
            self._invalid = None
            self._apply(state)
        self._ack()
        if self.counts is not None and self._down_since is None:
            self.counts.flush(self.client)
        return self.current

    def _apply(self, state: SplitState | None) -> None:
        cur = self.current
        if state == cur.state and cur.reason in ("none", "applied"):
            return
        if state is None or state.challenger is None:
            self._models.clear()
            self._set(AppliedSplit(state, None, 0.0, False,
                                   "" if state is None else state.rollout_id,
                                   "none" if state is None else "applied"))
            return
        model = self._challenger(state)
        if model is None:
            self._set(AppliedSplit(state, None, 0.0, False, state.rollout_id,
                                   "challenger_load"))
            return
        self._set(AppliedSplit(state, model, state.share, state.shadow, state.rollout_id,
                               "applied"))

    def _challenger(self, state: SplitState) -> ScoringModel | None:
        version = state.challenger
        assert version is not None
        model = self._models.get(version)
        if model is not None:
            return model
        failed = self._failed.get(version)
        if failed is not None and self._clock() - failed < RETRY_LOAD_S:
            return None
        # never keep serving a challenger the split no longer names while loading
        self._set(AppliedSplit(state, None, 0.0, False, state.rollout_id, "loading"))
        try:
            model = self._load(version)
        except InputError as exc:  # ModelLoadError included
            self._failed[version] = self._clock()
            self.metrics.split_errors.labels(reason="challenger_load").inc()
            log.error("challenger %s of rollout %s cannot be loaded, serving 100 %% "
                      "champion: %s", version, state.rollout_id, exc)
            return None
        self._failed.pop(version, None)
        self._models = {version: model}
        log.info("challenger %s loaded for rollout %s (share %.3f, shadow %s)", version,
                 state.rollout_id, state.share, state.shadow)
        return model

    def _set(self, applied: AppliedSplit) -> None:
        self.current = applied  # the swap: one reference, atomic for readers
        m = self.metrics
        m.split_share.set(applied.share)
        m.split_seq.set(-1 if applied.state is None else applied.state.seq)

    def _ack(self) -> None:
        cur = self.current
        ack = Ack(-1 if cur.state is None else cur.state.seq, self._clock_ms(), cur.share,
                  None if cur.challenger is None else cur.challenger.version)
        try:
            write_ack(self.client, self.prefix, self.server_id, ack)
        except OnlineStoreError as exc:
            self._redis_down(exc)

    def _redis_down(self, exc: OnlineStoreError) -> None:
        cur = self.current
        if cur.reason != "redis":
            self._set(AppliedSplit(cur.state, None, 0.0, False, cur.rollout_id, "redis"))
        if self._down_since is None:
            self._down_since = self._clock()
            self.metrics.split_redis_available.set(0)
            log.warning("rollout split: redis unavailable (%s); serving 100 %% champion "
                        "until it answers", exc)

    def _redis_up(self) -> None:
        if self._down_since is None:
            return
        stalled = self._clock() - self._down_since
        self._down_since = None
        self.metrics.split_redis_available.set(1)
        log.warning("rollout split: redis available again after %.1f s; applying the split",
                    stalled)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Poll once now (the server starts with the split applied), then every
        ``poll_s`` seconds in a daemon thread."""
        self.poll()
        self._loop.start()

    def stop(self) -> None:
        """Stop polling (the acknowledgement then expires by itself) and flush the
        serving counts one last time (a failure there loses what it held)."""
        self._loop.stop()
        if self.counts is not None:
            for _ in range(2):  # the batch in flight, then what is still in memory
                if not self.counts.flush(self.client):
                    break
