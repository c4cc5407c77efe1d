"""A daemon thread that calls one function every few seconds until stopped.

The server's background loops (the model reload, the priors refresh, the rollout split
watch, the exploration budget's flush) are all this: wait ``every_s`` (or until
stopped), call the step, log an exception that escapes it and go on at the next period.
The step handles its own expected failures (a store that is down): what escapes is a
bug, and a supervisor keeps the loop alive rather than letting the thread die silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``step`` every ``every_s`` seconds from a daemon thread named ``name``.

    Args:
        name: the thread's name.
        every_s: seconds between two calls (the first one ``every_s`` after start).
        step: what to call; an exception that escapes it is logged with ``failure``.
        failure: the log message of such an exception.
    """

    def __init__(self, name: str, every_s: float, step: Callable[[], object],
                 failure: str) -> None:
        self.name = name
        self.every_s = every_s
        self._step = step
        self._failure = failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once; again after :meth:`stop`)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, waiting up to ``timeout_s`` for a call in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a supervisor, not a fallback: keep going
                log.exception(self._failure)
