"""The wipe guard's settings, ``[watcher] wipe_guard``; its rule: :mod:`discovery.watcher.guard`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from discovery.errors import ConfigError, ValidationError
from discovery.model.durations import parse_duration


@dataclass(frozen=True)
class GuardSettings:
    """``[watcher] wipe_guard = { settle = "200ms", window = "2s", fraction = 0.5,
    min_removed = 3, hold = "45s" }``, or ``wipe_guard = false`` to turn it off.

    ``hold`` outlasts the agents' reconcile (``--resync``, 30 s ±10 % by default): what an
    agent's registry did not write back (the write-back off, its watch of its own keys down
    when the wipe came) comes back only then, and a held instance of a service with nothing
    else serving must not go first (at 30 s, measured, it did: 10 services emptied,
    ``bench/written_back.py``'s reconcile-only rows); while held instances still come back
    the others wait past it, up to twice ``hold`` (:mod:`discovery.watcher.guard`, rule 3).
    ``horizon``, not set from TOML: a burst that has not made a wipe within it starts again,
    so that crashes replaced as they come never add up to one (it was ``hold``: at 45 s a
    crash every 1.5 s made half a 60-instance catalog); and the longest a service's last
    instance waits while removals of several nodes keep coming."""

    settle: float = 0.2
    window: float = 2.0
    fraction: float = 0.5
    min_removed: int = 3
    hold: float = 45.0
    enabled: bool = True
    horizon: float = 30.0

    @classmethod
    def parse(cls, value: object, culprit: str = "watcher.wipe_guard") -> GuardSettings:
        """From TOML: a table of the keys above, or a boolean. One :class:`ConfigError`
        naming the key otherwise."""
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{culprit}: must be a table or true/false")
        unknown = sorted(set(value) - {"settle", "window", "fraction", "min_removed", "hold"})
        if unknown:
            raise ConfigError(f"{culprit}.{unknown[0]}: unknown key (allowed: fraction, hold, "
                              "min_removed, settle, window)")
        out: dict[str, Any] = {}
        try:
            for key, most in (("settle", 10.0), ("window", 60.0), ("hold", 3600.0)):
                if key in value:
                    out[key] = parse_duration(f"{culprit}.{key}", value[key], maximum=most)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
        fraction = value.get("fraction", cls.fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
                or not 0 < fraction <= 1:
            raise ConfigError(f"{culprit}.fraction: must be a number in (0, 1]")
        least = value.get("min_removed", cls.min_removed)
        if isinstance(least, bool) or not isinstance(least, int) or not 1 <= least <= 10**6:
            raise ConfigError(f"{culprit}.min_removed: must be a whole number >= 1")
        return cls(fraction=float(fraction), min_removed=least, **out)
