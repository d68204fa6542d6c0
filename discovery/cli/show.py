"""``discovery show`` and ``discovery check-config``: look before you leap."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from discovery.cli import output
from discovery.cli.maint import agent_call
from discovery.cli.options import registry_options
from discovery.cli.output import fail
from discovery.errors import DiscoveryError
from discovery.registry import open_registry


@click.command()
@click.argument("service")
@registry_options()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--agent", "agent_http", envvar="DISCOVERY_AGENT_HTTP", default=None,
              metavar="ADDR:PORT", help="Also show live check state (type, output, since) from "
              "this agent's HTTP API [env DISCOVERY_AGENT_HTTP]")
def show(service: str, registry: str, fmt: str, timeout: float, agent_http: str | None) -> None:
    """Every instance of SERVICE with all it carries: state, since when, node, container, meta.

    Exit 0 when the service has instances, 1 when it has none, 2 on a bad registry."""
    try:
        reg = open_registry(registry, timeout=timeout)
        try:
            found = [i for i in reg.snapshot().instances.values() if i.service == service]
        finally:
            reg.close(revoke=False)
    except DiscoveryError as exc:
        fail(str(exc))
    found = output.sort_instances(found)
    checks: dict[str, dict[str, Any]] = {}
    if agent_http:
        checks = {c["id"]: c for c in agent_call(agent_http, "GET", "/v1/agent/checks")}
    if fmt == "json":
        rows = [{**i.to_dict(), **({"check": checks[i.id]} if i.id in checks else {})}
                for i in found]
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        now = time.time()
        table = Table(box=None, header_style="bold", pad_edge=False)
        columns = ["ID", "ADDRESS", "STATE", "SINCE", "NODE", "WEIGHT", "TAGS", "CONTAINER",
                   "IMAGE", "META"] + (["CHECK", "OUTPUT"] if agent_http else [])
        for column in columns:
            table.add_column(column, overflow="fold")
        for i in found:
            row = [i.id, f"{i.address}:{i.port}", i.state.value,
                   output.age(now - i.registered_at), i.node, str(i.weight), ",".join(i.tags),
                   i.container_name, i.image, " ".join(f"{k}={v}" for k, v in i.meta.items())]
            if agent_http:
                check = checks.get(i.id, {})
                row += [f"{check.get('type', '-')} "
                        f"{'passing' if check.get('healthy') else 'failing'}" if check else "-",
                        str(check.get("output", ""))]
            table.add_row(*row)
        output.console().print(table if found else f"no instances of {service}")
    raise SystemExit(0 if found else 1)


@click.command(name="check-config")
@click.option("--config", "config_file", metavar="FILE", help="Agent/watcher TOML to validate")
@click.option("--service", "services", multiple=True, metavar="NAME[:BIND]:PORT")
@click.option("--template", default=None, metavar="FILE", help="Template to render")
@click.option("--haproxy-bin", default="haproxy", show_default=True)
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def check_config(config_file: str | None, services: tuple[str, ...], template: str | None,
                 haproxy_bin: str, fmt: str) -> None:
    """Validate the configuration, render the template and check it with `haproxy -c`.

    Exit 0 when everything is valid, 2 with one line naming the culprit otherwise."""
    from discovery.agent.config import read_file
    from discovery.watcher.config import (
        WatcherConfig,
        load_watcher_config,
        merge,
        parse_service_arg,
    )
    from discovery.watcher.render import Renderer, RuntimePaths, build_context
    from discovery.watcher.slots import SlotTable, slot_count
    from discovery.watcher.supervisor import validate_config

    try:
        if config_file:
            read_file(config_file)  # the [agent] table, if any
        cfg = load_watcher_config(config_file) if config_file else WatcherConfig()
        cfg = merge(cfg, [parse_service_arg(s) for s in services])
        if template:
            cfg = replace(cfg, template=template)
        with tempfile.TemporaryDirectory(prefix="discovery-check-") as tmp:
            paths = RuntimePaths(admin_socket=f"{tmp}/admin.sock")
            slots = {name: SlotTable(slot_count(0, svc.slots or 8)).slots()
                     for name, svc in cfg.services.items()}
            text = Renderer(cfg.template).render(build_context(cfg, slots, paths))
            rendered = Path(tmp) / "haproxy.cfg"
            rendered.write_text(text)
            validate_config(haproxy_bin, rendered)
    except DiscoveryError as exc:
        fail(str(exc))
    result = {"ok": True, "services": sorted(cfg.services), "template": cfg.template or "default"}
    if fmt == "json":
        click.echo(json.dumps(result))
    else:
        click.echo(f"ok: {len(cfg.services)} services, template {result['template']}, "
                   "haproxy -c passed")
