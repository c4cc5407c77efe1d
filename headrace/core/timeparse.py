"""Times and durations as the command line and the offline jobs take them.

Every function returns integer epoch milliseconds (UTC) or milliseconds; none returns a
naive datetime.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from headrace.core.errors import InputError, UsageError

__all__ = ["parse_duration", "parse_time", "parse_time_ms"]

_DAY_MS = 86_400_000
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": _DAY_MS}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")


def parse_time(text: str) -> int:
    """Epoch milliseconds from ``1767225600000`` or ISO-8601 with a UTC offset
    (``2026-01-01T00:00:00Z``); a bare date means its UTC midnight.

    Raises:
        InputError: unparseable, or a date-time without a time zone.
    """
    value = text.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise InputError(f"cannot read '{text}' as a time; give epoch milliseconds or "
                         "ISO-8601 such as 2026-01-01T00:00:00Z") from None
    if parsed.tzinfo is None:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            parsed = parsed.replace(tzinfo=UTC)
        else:
            raise InputError(f"the time '{text}' has no time zone; add Z (UTC) or an offset")
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_duration(text: str) -> int:
    """Milliseconds from ``30m``, ``1h30m``, ``45s``, ``500ms``, ``2d`` or bare ``1800000``.

    Raises:
        InputError: unparseable.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+", value):
        return int(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise InputError(f"cannot read '{text}' as a duration; use e.g. 30m, 1h, 45s, 500ms")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from ``text``: an integer, or ISO-8601 (naive means UTC).

    Raises:
        UsageError: neither.
    """
    value = text.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"{text!r} is neither epoch milliseconds nor ISO-8601") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
