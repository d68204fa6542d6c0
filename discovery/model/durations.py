"""Durations as operators write them: ``"500ms"``, ``"2s"``, ``"1.5"``, ``"1m"``, ``"1h"``.

One parser for labels, flags and config files. A bare number (or a TOML integer/float) is
read in ``default_unit``: seconds for check intervals, milliseconds for HAProxy timeouts,
as HAProxy itself reads them. Errors are :class:`ValidationError` naming the culprit.
"""

from __future__ import annotations

import re

from discovery.errors import ValidationError

UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*(us|ms|s|m|h|d)?")


def parse_duration(
    culprit: str,
    value: str | int | float,
    *,
    default_unit: str = "s",
    minimum: float = 0.0,
    maximum: float = 86400.0,
) -> float:
    """``value`` in seconds; raises :class:`ValidationError` unless ``minimum <= s <= maximum``."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValidationError(culprit, f"{value!r} is not a duration like 2s, 500ms or 1.5")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip().lower()) if len(value) <= 32 else None
        if m is None:
            raise ValidationError(
                culprit, f"{value[:32]!r} is not a duration like 2s, 500ms or 1.5"
            )
        number, unit = float(m[1]), m[2] or default_unit
    else:
        number, unit = float(value), default_unit
    seconds = number * UNITS[unit]
    if not minimum <= seconds <= maximum:
        shown = value[:32] if isinstance(value, str) else value
        raise ValidationError(
            culprit,
            f"{shown!r} is not between {format_duration(minimum)} and {format_duration(maximum)}",
        )
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: ``0.05`` -> ``"50ms"``, ``3600`` -> ``"1h"``."""
    if seconds <= 0:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / UNITS[unit]
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{round(seconds * 1e6)}us"


def to_ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 for any positive duration (HAProxy's unit)."""
    ms = round(seconds * 1000)
    return max(ms, 1) if seconds > 0 else 0
