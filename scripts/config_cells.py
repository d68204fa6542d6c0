"""The Markdown cells, tables and spellings ``scripts/gen_config_reference.py`` writes, and
the list of what the code has that ``scripts/config_texts.py`` does not describe yet."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

UNDOCUMENTED = "UNDOCUMENTED"


missing: list[str] = []


def undocumented(what: str) -> str:
    missing.append(what)
    return f"**{UNDOCUMENTED}**: describe it in scripts/config_texts.py"


def cell(text: object) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: object) -> str:
    return f"`{text}`"


def table(head: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    head = list(head)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def unset(value: object) -> bool:
    """None, or click's ``UNSET`` sentinel (click >= 8.2)."""
    return value is None or type(value).__name__ == "Sentinel"


def duration(seconds: float) -> str:
    """0.05 -> 50ms, 2.0 -> 2s, 60 -> 1m (how the config files spell durations)."""
    ms = round(seconds * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def defaults_of(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def guard_default(g: Any) -> str:
    """The default wipe guard as the TOML a user would write."""
    return (f'{{ settle = "{duration(g.settle)}", window = "{duration(g.window)}", '
            f'fraction = {g.fraction}, min_removed = {g.min_removed}, '
            f'hold = "{duration(g.hold)}" }}')
