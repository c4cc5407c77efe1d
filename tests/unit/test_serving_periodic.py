"""serving.periodic.Periodic: the server's background loops."""

from __future__ import annotations

import threading

from serving.periodic import Periodic


def test_periodic_calls_the_step_survives_an_exception_and_restarts() -> None:
    calls: list[int] = []
    done = threading.Event()

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the step")
        if len(calls) >= 3:
            done.set()

    loop = Periodic("t-periodic", 0.01, step, "step failed")
    loop.start()
    loop.start()  # once: a second start is no second thread
    assert done.wait(5), "the loop stopped after the step raised"
    loop.stop()
    assert not [t for t in threading.enumerate() if t.name == "t-periodic"]
    n = len(calls)
    done.clear()
    loop.start()  # again after stop
    assert done.wait(5) and len(calls) > n
    loop.stop()
