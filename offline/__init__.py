"""Offline datasets from the offline store: click labels and point-in-time training sets.

Public names are imported on first use (``from offline import build_training_set``), so
importing the package stays cheap and submodules import each other without cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "OfflineStore",
    "OfflineStoreUnreadable",
    "build_labels",
    "write_labels",
    "build_training_set",
    "write_training_set",
]

_HOME = {
    "OfflineStore": "offline.store",
    "OfflineStoreUnreadable": "offline.store",
    "build_labels": "offline.labels",
    "write_labels": "offline.labels",
    "build_training_set": "offline.training_set",
    "write_training_set": "offline.training_set",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'offline' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
