"""``bench memory``'s RSS at a time of the run: the peak over a window of samples, so
that the growth figure follows a trend (a leak) and not the phase of the batch-by-batch
swings."""

from __future__ import annotations

from collections.abc import Callable

from bench.memory import RSS_WINDOW_S, rss_around

MB = 1 << 20


def _samples(rss_of_t: Callable[[int], float], seconds: int = 600) -> list[tuple[float, int]]:
    return [(1000.0 + t, int(rss_of_t(t))) for t in range(seconds + 1)]


def _growth(samples: list[tuple[float, int]]) -> float:
    start, end = samples[0][0], samples[-1][0]
    half = rss_around(samples, (start + end) / 2, start, end)
    return rss_around(samples, end, start, end) / half - 1


def test_swings_without_a_trend_are_no_growth() -> None:
    # ±100 MB every 8 s around 800 MB: single samples half-way and at the end differ
    swing = _samples(lambda t: (800 + (100 if t % 8 < 3 else -100)) * MB)
    assert swing[300][1] != swing[600][1]  # (the single samples: 700 vs 900 MB)
    assert _growth(swing) == 0.0


def test_a_leak_shows_as_growth() -> None:
    leak = _samples(lambda t: (800 + t / 2 + (50 if t % 5 == 0 else 0)) * MB)
    # 0.5 MB/s: 950 MB + swing half-way, 1,100 + swing at the end
    assert abs(_growth(leak) - (1100 + 50) / (950 + 7.5 + 50) + 1) < 0.01


def test_windows_stay_inside_the_run_and_short_runs_use_the_nearest_sample() -> None:
    ramp = _samples(lambda t: t * MB, seconds=100)
    start, end = ramp[0][0], ramp[-1][0]
    assert rss_around(ramp, end, start, end) == 100 * MB  # the last window: its peak
    assert rss_around(ramp, start, start, end) == int(RSS_WINDOW_S) * MB
    sparse = [(0.0, 5 * MB), (100.0, 9 * MB)]
    assert rss_around(sparse, 50.0, 0.0, 100.0) == 5 * MB  # none within: the nearest
