"""Where the workplace's real public data sets live (never copied into the project).

Looked up in order: ``$HEADRACE_SHARED_DATA``, ``../shared/data`` next to the checkout,
``/work/shared/data``. Tests that need a file skip, naming where they looked, only when
none of these holds it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["data_file", "require"]

_REPO = Path(__file__).resolve().parents[1]


def _candidates() -> list[Path]:
    env = os.environ.get("HEADRACE_SHARED_DATA")
    found = [Path(env)] if env else []
    return [*found, _REPO.parent / "shared" / "data", Path("/work/shared/data")]


def data_file(*parts: str) -> Path:
    """The first existing ``<candidate>/<parts>``, else the first candidate's path."""
    for base in _candidates():
        path = base.joinpath(*parts)
        if path.exists():
            return path
    return _candidates()[0].joinpath(*parts)


def require(path: Path) -> Path:
    """Skip the calling test when ``path`` is absent (the data set is not on this machine)."""
    if not path.exists():
        pytest.skip(f"shared data not found (looked in {', '.join(map(str, _candidates()))}); "
                    "set HEADRACE_SHARED_DATA")
    return path
