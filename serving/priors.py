"""In-process cache of the cold-start priors, refreshed from the online store.

``headrace priors`` writes the priors document (:meth:`Priors.to_json`) to
``priors_key(prefix)``; the server loads it at start and every ``priors_refresh_s``
in a daemon thread. A failed or malformed refresh keeps the previous priors (counted
in ``headrace_serving_priors_refresh_errors_total``); with no document at all the
priors are empty and every cold-start value is its definition's default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from feature_defs.coldstart import Priors
from feature_defs.layout import priors_key
from headrace.core.errors import OnlineStoreError
from headrace.core.online_store import OnlineStore
from serving.metrics import ServingMetrics
from serving.periodic import Periodic

__all__ = ["PriorsCache"]

log = logging.getLogger(__name__)


class PriorsCache:
    """The current :class:`Priors`; :attr:`priors` is read lock-free on the hot path.

    Args:
        store: where the priors document lives.
        prefix: Redis key prefix (the document is at ``priors_key(prefix)``).
        refresh_s: seconds between background refreshes.
        clock_ms: epoch milliseconds (for the age gauge).
        metrics: the server's metrics (``priors_age``, ``priors_errors``; default: a
            new :class:`ServingMetrics` of its own).

    Attributes:
        listeners: called with the new priors after each change (plan caches).
    """

    def __init__(
        self,
        store: OnlineStore,
        prefix: str,
        refresh_s: float = 60.0,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.priors = Priors()
        self.metrics = ServingMetrics() if metrics is None else metrics
        self._store = store
        self._key = priors_key(prefix)
        self._clock_ms = clock_ms
        self._raw: bytes | None = None
        self._loop = Periodic("priors-refresh", refresh_s, self.refresh,
                              "priors refresh failed unexpectedly; retrying at the next one")
        self.listeners: list[Callable[[Priors], None]] = []

    def refresh(self) -> bool:
        """Reload the priors document now.

        A store error or a malformed document keeps the previous priors and counts in
        ``priors_errors``; a missing document keeps them silently.

        Returns:
            True when the priors changed (the listeners were called). Never raises for
            store errors.
        """
        try:
            raw = self._store.get(self._key)
        except OnlineStoreError as exc:
            self.metrics.priors_errors.inc()
            log.warning("priors refresh failed, keeping the previous priors: %s", exc)
            return False
        changed = False
        if raw is not None and raw != self._raw:
            try:
                priors = Priors.from_json(raw)
            except ValueError as exc:
                self.metrics.priors_errors.inc()
                log.warning(
                    "malformed priors at %s, keeping the previous priors: %s", self._key, exc
                )
                return False
            self._raw, self.priors, changed = raw, priors, True
            for listener in self.listeners:
                listener(priors)
        if self.priors.computed_at_ms:
            self.metrics.priors_age.set(max(0, self._clock_ms() - self.priors.computed_at_ms) / 1e3)
        return changed

    def start(self) -> None:
        """Load once, then refresh every ``refresh_s`` in a daemon thread."""
        self.refresh()
        self._loop.start()

    def stop(self) -> None:
        """Stop the refresh thread (waits up to 5 s for it)."""
        self._loop.stop()
