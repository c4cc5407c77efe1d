"""Work taken off the RPC path: a bounded queue drained by one daemon thread.

The shadow predictions (:mod:`serving.shadow`) and the prediction log
(:mod:`serving.prediction_log`) hand their work here. :meth:`OffPath.offer` never
blocks: a full queue drops the item and counts it (``on_drop``), so a slow consumer
costs data, never latency. The thread handles one item at a time and yields the GIL
between items (``time.sleep(0)``): a backlog is worked off in slices of one item, and
a request thread never waits for more than one item's work to get the interpreter back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["OffPath"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


class OffPath(Generic[T]):
    """A bounded queue and the one thread that works it off.

    Args:
        name: the thread's name (logs).
        work: called with each item in the thread; it handles its own errors (an
            exception that escapes is logged and the thread goes on).
        maxsize: most items waiting (>= 1).
        on_drop: called for each item dropped because the queue was full.
        idle: called every ``idle_s`` seconds while the queue is empty (a producer's
            delivery callbacks), and once when stopping.
        idle_s: see ``idle``.
        batch_s: > 0: wake up every ``batch_s`` seconds and work off everything queued
            then, instead of waking up for each item as it arrives. An item is queued
            while its request is still being answered (its response not yet sent), so
            waking up at once competes with that request for the interpreter; a
            periodic drain does not line up with any request.
    """

    def __init__(self, name: str, work: Callable[[T], None], *, maxsize: int,
                 on_drop: Callable[[], None] | None = None,
                 idle: Callable[[], None] | None = None, idle_s: float = 0.1,
                 batch_s: float = 0.0) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.name = name
        self._work = work
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._on_drop = on_drop
        self._idle = idle
        self._idle_s = idle_s
        self._batch_s = batch_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def offer(self, item: T) -> bool:
        """Queue ``item`` unless the queue is full (then drop it, counted). Never blocks.

        Returns:
            Whether the item was queued.
        """
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return False
        return True

    @property
    def pending(self) -> int:
        """Items waiting now (approximate)."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Work off what is queued (for at most ``timeout_s``), then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout_s
        self._stopping.set()  # a batching thread drains now
        while True:  # the stop marker must get in even when the queue is full
            try:
                self._queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    self._drain()
                    break
        thread.join(max(0.0, deadline - time.monotonic()) + 0.5)

    def _drain(self) -> None:
        """Drop what is left (stop ran out of time), counted; the thread then stops."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
        self._queue.put_nowait(_STOP)

    def _run(self) -> None:
        if self._batch_s > 0:
            self._run_batches()
            return
        get = self._queue.get
        while True:
            try:
                item = get(timeout=self._idle_s)
            except queue.Empty:
                self._call_idle()
                continue
            if not self._one(item):
                return

    def _run_batches(self) -> None:
        get = self._queue.get_nowait
        while True:
            self._stopping.wait(self._batch_s)
            while True:
                try:
                    item = get()
                except queue.Empty:
                    self._call_idle()
                    break
                if not self._one(item):
                    return

    def _one(self, item: object) -> bool:
        """Work one item off; False for the stop marker."""
        if item is _STOP:
            self._call_idle()
            return False
        try:
            self._work(item)  # type: ignore[arg-type]  # only T and _STOP are queued
        except Exception:  # noqa: BLE001 - a supervisor, not a fallback: keep working
            log.exception("%s: an item failed unexpectedly; going on", self.name)
        time.sleep(0)  # hand the GIL to the request threads between two items
        return True

    def _call_idle(self) -> None:
        if self._idle is None:
            return
        try:
            self._idle()
        except Exception:  # noqa: BLE001 - a supervisor, not a fallback: keep working
            log.exception("%s: idle call failed unexpectedly; going on", self.name)
