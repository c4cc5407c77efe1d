"""Freed memory handed back to the OS (streams.memory) and a batch's apply slices."""

from __future__ import annotations

import ctypes

import pytest

from streams import memory
from streams.rows import RawMessage
from streams.worker import apply_slices


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


glibc = pytest.mark.skipif(memory._libc() is None, reason="glibc only")


@glibc
def test_release_memory_returns_freed_chunks_to_the_os() -> None:
    libc = memory._libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 150 MB of small chunks (below the mmap threshold: they live in the heap), written
    # so that they are resident; the last one stays, pinning the heap's top
    blocks = [libc.malloc(4096) for _ in range(150 * 256)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    for b in blocks[:-1]:
        libc.free(b)
    before = _rss()
    memory.release_memory()
    after = _rss()
    libc.free(blocks[-1])
    assert before - after > 100 << 20, (before >> 20, after >> 20)


@glibc
def test_arena_limit_takes_effect() -> None:
    assert memory.limit_malloc_arenas(8) is True  # the glibc default for 1 core: harmless


def _msg(offset: int, size: int) -> RawMessage:
    return RawMessage(value=b"x" * size, headers=None, topic="t", partition=0, offset=offset,
                      timestamp_ms=0)


def test_apply_slices_keep_order_and_bound_bytes() -> None:
    msgs = [_msg(i, n) for i, n in enumerate([4, 4, 4, 9, 1, 1, 0, 3])]
    slices = apply_slices(msgs, 8)
    assert [[m.offset for m in s] for s in slices] == [[0, 1], [2], [3], [4, 5, 6, 7]]
    assert apply_slices(msgs, 10**9) == [msgs]
    assert apply_slices([], 8) == []


def test_slices_shrink_for_batches_that_load_many_states_and_grow_back() -> None:
    from streams.worker import APPLY_BYTES, GATHER_BYTES, SLICE_LOADS, Worker

    w = Worker.__new__(Worker)
    w._slice_bytes = GATHER_BYTES
    w._fit_slices(8 << 20, SLICE_LOADS // 4)  # locality: whole batches
    assert w._slice_bytes == GATHER_BYTES
    w._fit_slices(8 << 20, 5 * SLICE_LOADS)  # a batch that loaded 100k states
    assert w._slice_bytes == (8 << 20) // 5
    w._fit_slices(1 << 20, 10**9)
    assert w._slice_bytes == APPLY_BYTES  # never below the smallest slice
    for _ in range(20):
        w._fit_slices(w._slice_bytes, 0)
    assert w._slice_bytes == GATHER_BYTES


# ---------------------------------------------------------------- GcFreezer
class _Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_gc_freezer_freezes_once_a_second_and_collects_cycles_when_due() -> None:
    import gc
    import weakref

    from streams.memory import GcFreezer

    now = [100.0]
    freezer = GcFreezer(freeze_every_s=1.0, collect_every_s=60.0, clock=lambda: now[0])
    try:
        gc.unfreeze()
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        freezer.tick()  # not due yet
        assert (freezer.freezes, gc.get_freeze_count()) == (0, 0)
        now[0] += 1.0
        freezer.tick()
        assert freezer.freezes == 1 and gc.get_freeze_count() > 0
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: the collector does not see it
        now[0] += 59.0  # the collection is due 60 s after start
        freezer.tick()
        assert freezer.collections == 1 and freezer.collected >= 1
        assert alive() is None  # unfrozen and collected
        assert gc.get_freeze_count() > 0  # frozen again afterwards
    finally:
        gc.unfreeze()


def test_gc_freezer_frees_frozen_objects_by_reference_count() -> None:
    import gc
    import weakref

    from streams.memory import GcFreezer

    now = [0.0]
    freezer = GcFreezer(freeze_every_s=1.0, collect_every_s=3600.0, clock=lambda: now[0])
    try:
        state = _Cycle()
        state.me = None  # no cycle: reference counting frees it
        alive = weakref.ref(state)
        now[0] = 1.0
        freezer.tick()
        assert freezer.freezes == 1
        del state
        assert alive() is None  # an evicted state goes at once, frozen or not
    finally:
        gc.unfreeze()


def test_backlog_turns_automatic_collection_off_and_live_input_back_on() -> None:
    import gc
    import weakref

    from streams.memory import GcFreezer

    was = gc.isenabled()
    now = [0.0]
    try:
        gc.enable()
        freezer = GcFreezer(freeze_every_s=1.0, collect_every_s=10.0, clock=lambda: now[0],
                            pause_in_backlog=True)
        freezer.backlog(True)
        assert freezer.paused and not gc.isenabled()
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        junk = [[[]] for _ in range(100_000)]  # would trigger many young collections
        del junk
        assert alive() is not None  # no automatic collection ran
        now[0] = 10.0
        freezer.tick()
        assert freezer.collections == 1 and freezer.collected >= 1
        assert alive() is None  # the scheduled collection freed it
        freezer.backlog(True)  # still behind: no change
        assert not gc.isenabled()
        freezer.backlog(False)  # live input: on again
        assert gc.isenabled() and not freezer.paused
        freezer.backlog(True)
        freezer.resume()  # the worker stops
        assert gc.isenabled() and not freezer.paused
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def test_backlog_leaves_the_collector_alone_unless_the_process_is_the_workers() -> None:
    import gc

    from streams.memory import GcFreezer

    assert gc.isenabled()
    freezer = GcFreezer()  # a worker inside a test process: process-wide tuning is off
    freezer.backlog(True)
    assert gc.isenabled() and not freezer.paused
