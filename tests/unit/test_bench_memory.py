"""``bench memory``'s RSS at a time of the run: the peak over a window of samples, so
that the growth figure follows a trend (a leak) and not the phase of the batch-by-batch
swings; and its CPU figures (hand-computed values)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.memory import RSS_WINDOW_S, cpu_figures, rss_around

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


def test_cpu_figures_by_hand() -> None:
    # samples each second from t=100: the worker burns 0.8 s of CPU per second, the
    # stack 0.5 s; 20,000 events processed over t=102 .. t=112 (10 s)
    cpu = [(100.0 + t, 3.0 + 0.8 * t, 50.0 + 0.5 * t) for t in range(20)]
    fig = cpu_figures(cpu, start=102.2, end=111.9, events=20_000, cores=2)
    # nearest samples: t=102 and t=112; worker 8.0 s, stack 5.0 s over 10 s
    assert fig["cores"] == 2
    assert fig["worker_cpu_us_per_event"] == pytest.approx(400.0)  # 8 s / 20k events
    assert fig["stack_cpu_us_per_event"] == pytest.approx(250.0)
    assert fig["worker_cores_busy"] == pytest.approx(0.8)
    assert fig["stack_cores_busy"] == pytest.approx(0.5)
    assert fig["worker_cpu_bound_events_per_s"] == 2500  # 20k events / 8 s


def test_cpu_figures_without_samples_or_cpu() -> None:
    assert cpu_figures([], 0.0, 1.0, 10, 2) == {}
    idle = cpu_figures([(0.0, 1.0, 1.0), (1.0, 1.0, 1.0)], 0.0, 1.0, 10, 2)
    assert idle["worker_cpu_us_per_event"] == 0.0
    assert idle["worker_cpu_bound_events_per_s"] is None
