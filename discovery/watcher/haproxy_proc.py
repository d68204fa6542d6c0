"""Parsing HAProxy's answers (pure functions): the master CLI's ``show proc``, and the runtime
API's ``show info``, ``show servers state`` and ``show stat``."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from discovery.errors import HAProxyError
from discovery.watcher.slots import Slot, SlotState

# srv_admin_state bits (HAProxy's enum srv_admin): FMAINT 0x01, IMAINT 0x02, CMAINT 0x04
# ("disabled" in the config; stays set after "state ready"), FDRAIN 0x08, IDRAIN 0x10,
# RMAINT 0x20. Maint is any of FMAINT|IMAINT|RMAINT, drain any of FDRAIN|IDRAIN.
_MAINT_MASK, _DRAIN_MASK = 0x23, 0x18
OP_STATES = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}


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


def parse_servers_state(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``show servers state`` (format 1) -> {(backend, server): {header field: value}}."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    if lines[0].strip() != "1":
        raise HAProxyError(f"unsupported 'show servers state' format: {lines[0][:80]!r}")
    header: list[str] = []
    out: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        values = line.split()
        if not header or len(values) != len(header):
            raise HAProxyError(f"malformed 'show servers state' row: {line[:120]!r}")
        row = dict(zip(header, values, strict=True))
        out[(row["be_name"], row["srv_name"])] = row
    return out


def parse_stat(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``show stat`` CSV (``# pxname,svname,...`` then rows) -> {(backend, server): row}."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# pxname,"):
        raise HAProxyError(f"unexpected 'show stat' answer: {text[:80]!r}")
    header = lines[0][2:].split(",")
    out: dict[tuple[str, str], dict[str, str]] = {}
    for row in csv.reader(line for line in lines[1:] if line.strip()):
        fields = dict(zip(header, row, strict=False))
        out[(fields.get("pxname", ""), fields.get("svname", ""))] = fields
    return out


@dataclass(frozen=True)
class ServerView:
    """One server as HAProxy has it now, in Slot terms (from ``show servers state``)."""

    backend: str
    name: str
    address: str
    port: int
    weight: int
    state: SlotState
    operational: str  # stopped | starting | running | stopping (health, not admin state)

    def as_slot(self) -> Slot:
        return Slot(self.name, self.address, self.port, self.weight, self.state)

    def matches(self, slot: Slot) -> bool:
        """True when address, port, weight and admin state are what ``slot`` asks for."""
        return self.as_slot() == replace(slot, instance_id="")

    def __str__(self) -> str:
        return (f"{self.backend}/{self.name} {self.state} at {self.address}:{self.port} "
                f"weight {self.weight} ({self.operational})")


def server_view(fields: Mapping[str, str]) -> ServerView:
    """Map one parsed ``show servers state`` row to a :class:`ServerView`."""
    admin = int(fields["srv_admin_state"])
    state: SlotState = ("maint" if admin & _MAINT_MASK else
                        "drain" if admin & _DRAIN_MASK else "ready")
    port = fields.get("srv_port", "0")
    return ServerView(fields["be_name"], fields["srv_name"], fields["srv_addr"],
                      int(port) if port.isdigit() else 0, int(fields["srv_uweight"]), state,
                      OP_STATES.get(int(fields["srv_op_state"]), fields["srv_op_state"]))
