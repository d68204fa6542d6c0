"""How the CLI shows instances: a table for people, JSON for programs."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:  # rich is loaded only by commands that print tables (not by daemons)
    from rich.console import Console

from discovery.model import Instance, State


def age(seconds: float) -> str:
    """Compact age: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, exit code 2 (bad input or unreachable registry/Docker)."""
    click.echo(f"discovery: {message}", err=True)
    sys.exit(code)


def console() -> Console:
    """A console for tables: terminal width on a terminal, no folding when piped. What it
    prints is shown as it is: registry values and labels are never read as Rich markup,
    emoji codes or highlighting (``[/x]`` in a meta value, ``:abc:`` in an id)."""
    from rich.console import Console

    probe = Console()
    return Console(soft_wrap=True, width=None if probe.is_terminal else 1000, markup=False,
                   emoji=False, highlight=False)


def hostport(inst: Instance) -> str:
    """``ADDRESS:PORT``, an IPv6 address in brackets (``[2001:db8::5]:8080``, not ambiguous)."""
    return f"[{inst.address}]:{inst.port}" if ":" in inst.address else f"{inst.address}:{inst.port}"


def sort_instances(instances: Iterable[Instance]) -> list[Instance]:
    return sorted(instances, key=lambda i: (i.service, i.node, i.address, i.port, i.id))


def as_json(instances: Iterable[Instance]) -> str:
    return json.dumps([i.to_dict() for i in sort_instances(instances)], indent=2)


def as_table(instances: Iterable[Instance], console: Console, now: float | None = None) -> None:
    now = time.time() if now is None else now
    rows = sort_instances(instances)
    by_service: dict[str, list[Instance]] = defaultdict(list)
    for inst in rows:
        by_service[inst.service].append(inst)
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SERVICE", "INSTANCES", "ADDRESS", "NODE", "STATE", "TAGS", "AGE"):
        table.add_column(column, overflow="fold")
    for service, members in by_service.items():
        up = sum(1 for i in members if i.state is State.UP)
        counts = f"{up} up / {len(members) - up} draining"
        for n, inst in enumerate(members):
            table.add_row(
                service if n == 0 else "",
                counts if n == 0 else "",
                hostport(inst),
                inst.node,
                inst.state.value,
                ",".join(inst.tags),
                age(now - inst.registered_at),
            )
    if not rows:
        console.print("no services registered")
        return
    console.print(table)
