"""Strict JSON data from Python values (ground floor: no imports of ours)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: NaN and ±inf become None, tuples lists, mapping
    keys strings; everything else is returned as is (``json.dumps`` with
    ``allow_nan=False`` then accepts what it accepted before, minus the non-finite
    floats). Used for model metadata, the model history and the rollout's state."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
