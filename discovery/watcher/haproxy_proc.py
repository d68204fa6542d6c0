"""Parsing the master CLI's ``show proc`` and the runtime API's ``show info`` (pure functions)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from discovery.errors import HAProxyError


@dataclass(frozen=True)
class Proc:
    """One row of the master CLI's ``show proc``."""

    pid: int
    kind: str  # master | worker | a program name
    reloads: int
    uptime: str
    version: str
    failed: int = 0  # master row only: failed reloads since the last successful one


@dataclass(frozen=True)
class ShowProc:
    master: Proc
    workers: list[Proc] = field(default_factory=list)
    old_workers: list[Proc] = field(default_factory=list)
    programs: list[Proc] = field(default_factory=list)


_PROC_ROW = re.compile(
    r"^(?P<pid>\d+)\s+(?P<kind>\S+)\s+(?P<reloads>\d+)(?:\s+\[failed:\s*(?P<failed>\d+)\])?"
    r"\s+(?P<uptime>\S+)(?:\s+(?P<version>\S+))?")


def parse_show_proc(text: str) -> ShowProc:
    """Parse the master CLI's ``show proc`` (HAProxy 2.x layout)."""
    master: Proc | None = None
    sections: dict[str, list[Proc]] = {"workers": [], "old workers": [], "programs": []}
    current = "master"
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#<"):
            continue
        if line.startswith("#"):
            current = line.lstrip("# ").strip().lower()
            continue
        m = _PROC_ROW.match(line)
        if m is None:
            raise HAProxyError(f"malformed 'show proc' row: {line[:120]!r}")
        proc = Proc(int(m["pid"]), m["kind"], int(m["reloads"]), m["uptime"],
                    m["version"] or "", int(m["failed"] or 0))
        if proc.kind == "master":
            master = proc
        else:
            sections.setdefault(current, []).append(proc)
    if master is None:
        raise HAProxyError(f"no master row in 'show proc' output: {text[:200]!r}")
    return ShowProc(master, sections["workers"], sections["old workers"],
                    sections["programs"] + sections.get("old programs", []))


def parse_info(text: str) -> dict[str, str]:
    """Parse ``show info`` ("Name: value" lines)."""
    pairs = (line.partition(":") for line in text.splitlines())
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}
