"""Closed-loop simulations on the embedded local stack (``headrace simulate``)."""

from __future__ import annotations

__all__: list[str] = []
