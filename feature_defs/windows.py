"""Window and tile arithmetic: the ONE implementation shared by streams, offline and serving.

The window rule, exactly
------------------------
A sliding window of length ``W`` with resolution ``r`` (``r`` divides ``W``), evaluated
*as of* ``T`` (epoch milliseconds, UTC), aggregates the entity's applied events with::

    ts < T   and   floor(ts / r) >= floor(T / r) - W/r + 1

that is, the ``W/r`` most recent tiles of size ``r`` counting the tile that contains
``T``, excluding events at or after ``T``. Equivalently the half-open interval
``[lower_bound_ms(T), T)`` with ``lower_bound_ms(T) = (floor(T / r) - W/r + 1) * r``.

* A tumbling window of length ``W`` is the sliding window with ``r = W`` (one tile:
  events since the start of the current ``W``-aligned period, before ``T``).
* A lifetime window aggregates every applied event with ``ts < T``.
* Floors are mathematical floors (Python ``//``), so negative times behave too.
* A ratio is null when its denominator is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import numpy as np

__all__ = [
    "WindowKind",
    "Window",
    "sliding",
    "tumbling",
    "lifetime",
    "window_label",
    "to_ms",
    "LIFETIME_TILE",
]

#: the single tile index used by lifetime windows
LIFETIME_TILE = 0


class WindowKind(Enum):
    SLIDING = "sliding"
    TUMBLING = "tumbling"
    LIFETIME = "lifetime"


def to_ms(value: timedelta) -> int:
    """Whole milliseconds of a timedelta (sub-millisecond parts are an error upstream)."""
    return (value.days * 86_400 + value.seconds) * 1000 + value.microseconds // 1000


def window_label(length: timedelta | None) -> str:
    """Name suffix of a window: ``5m``, ``1h``, ``24h``, ``7d``, ``lifetime``.

    Whole hours up to 24 are written in hours (``24h``, the ad-tech convention);
    whole days beyond that in days.
    """
    if length is None:
        return "lifetime"
    ms = to_ms(length)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if unit == "d" and ms <= 86_400_000:
            continue
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class Window:
    """One aggregation window. Build with :func:`sliding`, :func:`tumbling`, :func:`lifetime`."""

    kind: WindowKind
    length: timedelta | None = None
    resolution: timedelta | None = None

    @property
    def label(self) -> str:
        return window_label(self.length)

    @property
    def tile_ms(self) -> int:
        """Tile size in ms; 0 for lifetime windows (one tile holds everything)."""
        if self.kind is WindowKind.LIFETIME:
            return 0
        res = self.resolution if self.kind is WindowKind.SLIDING else self.length
        assert res is not None
        return to_ms(res)

    @property
    def n_tiles(self) -> int:
        """Number of tiles the window spans (1 for tumbling and lifetime)."""
        if self.kind is not WindowKind.SLIDING:
            return 1
        assert self.length is not None
        return to_ms(self.length) // self.tile_ms

    def tile_of(self, ts_ms: int) -> int:
        """Tile index of an event time."""
        tile = self.tile_ms
        return LIFETIME_TILE if tile == 0 else ts_ms // tile

    def lowest_tile(self, as_of_ms: int) -> int:
        """Smallest tile index inside the window as of ``as_of_ms``."""
        tile = self.tile_ms
        if tile == 0:
            return LIFETIME_TILE
        return as_of_ms // tile - self.n_tiles + 1

    def lower_bound_ms(self, as_of_ms: int) -> int | None:
        """Inclusive lower event-time bound as of ``as_of_ms``; None for lifetime."""
        tile = self.tile_ms
        if tile == 0:
            return None
        return self.lowest_tile(as_of_ms) * tile

    def contains(self, ts_ms: int, as_of_ms: int) -> bool:
        """The window rule for one event: is ``ts_ms`` inside the window as of ``as_of_ms``?"""
        if ts_ms >= as_of_ms:
            return False
        low = self.lower_bound_ms(as_of_ms)
        return low is None or ts_ms >= low

    def lower_bounds_ms(self, as_of_ms: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`lower_bound_ms` over int64 epoch-ms; lifetime gives int64 min."""
        as_of = np.asarray(as_of_ms, dtype=np.int64)
        tile = self.tile_ms
        if tile == 0:
            return np.full(as_of.shape, np.iinfo(np.int64).min, dtype=np.int64)
        return (np.floor_divide(as_of, tile) - self.n_tiles + 1) * tile


def sliding(length: timedelta, resolution: timedelta) -> Window:
    """A sliding window of ``length`` rolled up from tiles of ``resolution``."""
    return Window(WindowKind.SLIDING, length, resolution)


def tumbling(length: timedelta) -> Window:
    """A tumbling window: the current ``length``-aligned period up to (excluding) T."""
    return Window(WindowKind.TUMBLING, length, None)


def lifetime() -> Window:
    """Every event before T."""
    return Window(WindowKind.LIFETIME, None, None)
