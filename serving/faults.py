"""Fault injection into the challenger arm of ``Score``: a simulation and chaos aid.

Off by default. ``HEADRACE_CHALLENGER_FAULTS`` (:class:`~headrace.core.settings.
ServeSettings` ``challenger_faults``) turns it on with a spec such as
``error_rate=0.01,latency_ms=20,seed=1``: before the challenger predicts a request it
answers, the server sleeps ``latency_ms`` (so the arm's latency counts it) and, with
probability ``error_rate``, fails the prediction. The failure takes the path of a real
model failure (:class:`serving.scoring.ModelPredictError`: logged, counted in the
rollout's serving counts as the challenger's error, then the champion answers), so the
rollout guardrails ``error_rate`` and ``latency_p99`` see exactly what a broken or slow
challenger would cause. The champion and shadow predictions are never touched.
``headrace simulate rollout`` (scenarios ``errors`` and ``slow``) uses it; never set it
in production.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from headrace.core.errors import InputError

__all__ = ["ChallengerFaults", "parse_faults"]

_KEYS = ("error_rate", "latency_ms", "seed")


@dataclass
class ChallengerFaults:
    """Errors and added latency for the challenger's predictions.

    Attributes:
        error_rate: probability in [0, 1] that one challenger prediction fails.
        added_latency_ms: milliseconds slept before each challenger prediction (>= 0).
        seed: seed of the error draws (reproducible simulations).
        sleep: seconds -> None (tests pin it).
    """

    error_rate: float = 0.0
    added_latency_ms: float = 0.0
    seed: int = 0
    sleep: Callable[[float], None] = time.sleep
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise InputError(f"challenger faults: error_rate must be in [0, 1], got "
                             f"{self.error_rate!r}")
        if not 0.0 <= self.added_latency_ms < 60_000:
            raise InputError(f"challenger faults: latency_ms must be in [0, 60000), got "
                             f"{self.added_latency_ms!r}")
        self._rng = random.Random(self.seed)

    def before_predict(self, version: str) -> str | None:
        """Apply the faults to one challenger prediction of ``version``.

        Returns:
            The injected error's message when this prediction must fail, else None.
        """
        if self.added_latency_ms > 0:
            self.sleep(self.added_latency_ms / 1000.0)
        if self.error_rate <= 0.0:
            return None
        with self._lock:
            fail = self._rng.random() < self.error_rate
        return f"injected fault: challenger {version} failed (error_rate " \
               f"{self.error_rate:g})" if fail else None


def parse_faults(spec: str) -> ChallengerFaults | None:
    """The faults of a ``key=value,…`` spec (keys ``error_rate``, ``latency_ms``,
    ``seed``); an empty spec is None (no fault injection).

    Raises:
        InputError: an unknown key, a value that is not a number, or one out of range.
    """
    if not spec.strip():
        return None
    values: dict[str, float] = {}
    for item in spec.split(","):
        key, sep, raw = item.strip().partition("=")
        if not sep or key not in _KEYS:
            raise InputError(f"challenger faults: expected {', '.join(k + '=N' for k in _KEYS)}"
                             f" separated by commas, got {item.strip()!r}")
        try:
            values[key] = float(raw)
        except ValueError as exc:
            raise InputError(f"challenger faults: {key} must be a number, got {raw!r}") from exc
    return ChallengerFaults(values.get("error_rate", 0.0), values.get("latency_ms", 0.0),
                            int(values.get("seed", 0)))
