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
from discovery.cli.options import registry_options, service_name, timeout_option
from discovery.cli.output import fail
from discovery.errors import DiscoveryError
from discovery.registry import open_registry


@click.command()
@click.argument("service")
@registry_options()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@timeout_option()
@click.option("--agent", "agent_http", envvar="DISCOVERY_AGENT_HTTP", default=None,
              metavar="ADDR:PORT", help="Also show live check state (type, output, since) from "
              "this agent's HTTP API [env DISCOVERY_AGENT_HTTP]")
@click.option("--watcher", "watcher_http", envvar="DISCOVERY_WATCHER_HTTP", default=None,
              metavar="ADDR:PORT", help="Also show which instances this watcher's outlier "
              "detection has ejected (reason, until when), from its HTTP API (watch --http, "
              "or up) [env DISCOVERY_WATCHER_HTTP]")
def show(service: str, registry: str, fmt: str, timeout: float, agent_http: str | None,
         watcher_http: str | None) -> None:
    """Every instance of SERVICE with all it carries: state, since when, node, container, meta.

    Exit 0 when the service has instances, 1 when it has none, 2 on a bad registry or a
    SERVICE that is no service name."""
    service = service_name(service)
    try:
        reg = open_registry(registry, timeout=timeout)
        try:
            found = list(reg.snapshot({service}).instances.values())  # that one only
        finally:
            reg.close(revoke=False)
    except DiscoveryError as exc:
        fail(str(exc))
    found = output.sort_instances(found)
    checks: dict[str, dict[str, Any]] = {}
    if agent_http:
        checks = {c["id"]: c for c in agent_call(agent_http, "GET", "/v1/agent/checks")}
    now = time.time()
    ejected = ejections(watcher_http, service, now) if watcher_http else {}
    if fmt == "json":
        rows = [{**i.to_dict(), **({"check": checks[i.id]} if i.id in checks else {}),
                 **({"ejected": ejected.get(i.id)} if watcher_http else {})} for i in found]
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        columns = ["ID", "ADDRESS", "STATE", "SINCE", "NODE", "WEIGHT", "TAGS", "CONTAINER",
                   "IMAGE", "META"] + (["CHECK", "OUTPUT"] if agent_http else []) + (
                   ["EJECTED", "REASON"] if watcher_http else [])
        for column in columns:
            table.add_column(column, overflow="fold")
        for i in found:
            row = [i.id, output.hostport(i), i.state.value,
                   output.age(now - i.registered_at), i.node, str(i.weight), ",".join(i.tags),
                   i.container_name, i.image, " ".join(f"{k}={v}" for k, v in i.meta.items())]
            if agent_http:
                check = checks.get(i.id, {})
                row += [f"{check.get('type', '-')} "
                        f"{'passing' if check.get('healthy') else 'failing'}" if check else "-",
                        str(check.get("output", ""))]
            if watcher_http:
                out = ejected.get(i.id)
                row += [_until(out["until"], now) if out else "-", out["reason"] if out else ""]
            table.add_row(*row)
        output.console().print(table if found else f"no instances of {service}")
    raise SystemExit(0 if found else 1)


def ejections(watcher_http: str, service: str, now: float) -> dict[str, dict[str, Any]]:
    """The instances of ``service`` the watcher at ``watcher_http`` has ejected, by id: reason,
    ejections so far, seconds until it comes back and that moment (``until``, epoch seconds).
    A watcher without outlier detection has ejected nothing."""
    components = agent_call(watcher_http, "GET", "/v1/health", peer="watcher")["components"]
    found = components.get("outliers", {}).get("ejected", [])
    return {e["id"]: {"reason": e["reason"], "ejections": e["ejections"],
                      "back_in_s": e["back_in_s"], "until": round(now + e["back_in_s"], 1)}
            for e in found if e["service"] == service}


def _until(until: float, now: float) -> str:
    return f"until {time.strftime('%H:%M:%SZ', time.gmtime(until))} (in {until - now:.0f}s)"


@click.command(name="check-config")
@click.option("--config", "config_file", metavar="FILE", help="Agent/watcher TOML to validate")
@click.option("--service", "services", multiple=True, metavar="NAME[:BIND]:PORT",
              help="A listener to validate, as watch --service; repeatable")
@click.option("--template", default=None, metavar="FILE", help="Template to render")
@click.option("--haproxy-bin", default="haproxy", show_default=True,
              help="HAProxy binary that runs haproxy -c on the rendered config")
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def check_config(config_file: str | None, services: tuple[str, ...], template: str | None,
                 haproxy_bin: str, fmt: str) -> None:
    """Validate the configuration, render the template and check it with `haproxy -c`.

    Exit 0 when everything is valid, 2 with one line naming the culprit otherwise."""
    from discovery.agent.config import AgentConfig, read_file
    from discovery.agent.config import merge as merge_agent
    from discovery.watcher.assemble import check_haproxy_bin
    from discovery.watcher.config import (
        WatcherConfig,
        load_watcher_config,
        merge,
    )
    from discovery.watcher.render import Renderer, RuntimePaths, build_context
    from discovery.watcher.slots import SlotTable, slot_count
    from discovery.watcher.supervisor import validate_config

    try:
        if config_file:  # the [agent] table, if any, checked as the agent takes it
            merge_agent(AgentConfig(registry="etcd://127.0.0.1"), read_file(config_file),
                        set())
        cfg = load_watcher_config(config_file) if config_file else WatcherConfig()
        cfg = merge(cfg, services)
        if template:
            cfg = replace(cfg, template=template)
        with tempfile.TemporaryDirectory(prefix="discovery-check-") as tmp:
            paths = RuntimePaths(admin_socket=f"{tmp}/admin.sock")
            slots = {name: SlotTable(slot_count(0, svc.slots or 8)).slots()
                     for name, svc in cfg.services.items()}
            text = Renderer(cfg.template).render(build_context(cfg, slots, paths))
            rendered = Path(tmp) / "haproxy.cfg"
            rendered.write_text(text)
            check_haproxy_bin(haproxy_bin)  # else /bin/false "rejects" the config
            validate_config(haproxy_bin, rendered)
    except DiscoveryError as exc:
        fail(str(exc))
    result = {"ok": True, "services": sorted(cfg.services), "template": cfg.template or "default"}
    if fmt == "json":
        click.echo(json.dumps(result))
    else:
        click.echo(f"ok: {len(cfg.services)} services, template {result['template']}, "
                   "haproxy -c passed")
