"""Online serving: the gRPC feature server, its online reader, fallback and client.

Imports run one way: ``serving`` reads what ``streams`` writes (the Redis layout of
:mod:`feature_defs.layout`) and never imports ``streams``. Heavy modules (gRPC) are
imported from their submodules: ``serving.server``, ``serving.client``.
"""

from __future__ import annotations

from serving.breaker import BreakerState, CircuitBreaker
from serving.fetch import FallbackReason, StoreFetch
from serving.metrics import ServingMetrics
from serving.reader import OnlineReader, ReadPlan, compile_read_plan
from serving.rollup import Freshness, RollupProgram
from serving.rules import RuleCache

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "FallbackReason",
    "StoreFetch",
    "ServingMetrics",
    "RuleCache",
    "OnlineReader",
    "ReadPlan",
    "compile_read_plan",
    "Freshness",
    "RollupProgram",
]
