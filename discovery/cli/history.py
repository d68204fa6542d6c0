"""``discovery history``: an instance's (or a service's) health transitions and their causes,
from the local agent's HTTP API (``GET /v1/agent/history``)."""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import click

from discovery.cli.maint import agent_call, agent_option
from discovery.cli.output import age, console


@click.command()
@click.argument("target", metavar="INSTANCE_ID|SERVICE")
@agent_option
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def history(target: str, agent_http: str, fmt: str) -> None:
    """Why an instance came and went: its last 100 transitions on this agent, each with its
    time and cause (check passed/failed with the output, Docker health_status, kill, stop,
    die, pause, maintenance, re-registration, shutdown); kept after the instance has left.

    TARGET is an instance id (it has a `:`, e.g. `host1:3f2a3f2a3f2a:8080`) or a service name.
    An instance or service this agent does not know: one line, exit 1."""
    param = "id" if ":" in target else "service"
    path = f"/v1/agent/history?{urllib.parse.urlencode({param: target})}"
    data = agent_call(agent_http, "GET", path, not_found=1)
    found: list[dict[str, Any]] = data.get("instances", [])
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
        return
    from rich.table import Table
    from rich.text import Text  # cells as plain text: check output is never rich markup

    out, now = console(), time.time()
    for item in found:
        flags = [] if item["live"] else [f"left {age(now - (item['left_at'] or now))} ago"]
        flags += ["FLAPPING"] if item["flapping"] else []
        out.print(f"{item['id']}  {item['service']}  {item['state']}"
                  + (f"  ({', '.join(flags)})" if flags else ""), markup=False, highlight=False)
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("TIME", "AGO", "STATE", "CAUSE", "OUTPUT"):
            table.add_column(column, overflow="fold")
        for t in reversed(item["transitions"]):
            table.add_row(*(Text(str(cell)) for cell in (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["at"])),
                age(now - t["at"]), t["state"], t["cause"], t["output"])))
        out.print(table, markup=False, highlight=False)
