"""``discovery maint``: drain an instance or a whole node through the local agent's HTTP API;
:func:`agent_call` is the one way the CLI talks to an agent."""

from __future__ import annotations

import json
from typing import Any

import click

from discovery.cli.options import http_token_option
from discovery.cli.output import fail
from discovery.errors import DiscoveryError

#: ``--agent ADDR:PORT``: the local agent's HTTP API, for the commands that ask it
agent_option = click.option(
    "--agent", "agent_http", envvar="DISCOVERY_AGENT_HTTP", default="127.0.0.1:8500",
    show_default=True, metavar="ADDR:PORT",
    help="The agent's HTTP API (discovery agent --http, or discovery up) "
         "[env DISCOVERY_AGENT_HTTP]")


@click.command()
@click.argument("target", metavar="INSTANCE_ID|--node")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--node", "whole_node", is_flag=True, help="Every instance of the agent's node")
@agent_option
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@http_token_option(client=True)
def maint(target: str, state: str, whole_node: bool, agent_http: str, fmt: str,
          http_token: str | None) -> None:
    """Drain an instance (or the whole node) without stopping it: it stays registered as
    `draining`, HAProxy drains it and DNS stops answering it. `off` puts it back.

    Examples: `discovery maint host1:3f2a3f2a3f2a:8080 on`, `discovery maint --node x on`
    (with --node, TARGET is the node name and is only echoed). The agent must have been
    started with --http-token-file; give this command the same file."""
    import urllib.parse

    query = {"enable": "true" if state == "on" else "false"}
    if not whole_node:
        query["id"] = target
    data = agent_call(agent_http, "PUT", f"/v1/agent/maint?{urllib.parse.urlencode(query)}",
                      token=http_token)
    if fmt == "json":
        click.echo(json.dumps(data))
    else:
        click.echo(f"maintenance {state}: {', '.join(data['instances']) or 'no instance changed'}")
        if data.get("held"):  # the node's and an instance's own maintenance are apart
            why = ("its own maintenance: `discovery maint ID off`" if whole_node
                   else "the whole node's: `discovery maint --node NODE off`")
            click.echo(f"still in maintenance ({why}): {', '.join(data['held'])}")


def agent_call(agent_http: str, method: str, path: str, token: str | None = None,
               not_found: int = 2, peer: str = "agent") -> Any:
    """One request to the local agent's HTTP API (with ``token`` as X-Discovery-Token when
    given); any failure is one line naming ``peer`` and exit 2 (a 404: exit ``not_found``).
    A 503 from ``/v1/health`` is an answer too: its body still carries the components."""
    import urllib.error
    import urllib.request

    from discovery.lookup.http_guard import TOKEN_HEADER
    from discovery.model import validate

    try:
        host, port = validate.listen(f"--{peer}", agent_http, localhost=True)
    except DiscoveryError as exc:
        fail(str(exc))
    headers = {TOKEN_HEADER: token} if token else {}
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = urllib.request.Request(f"http://{authority}{path}", method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
        if exc.code == 503 and path.startswith("/v1/health") and "components" in body:
            return body
        reason = body.get("error", exc.reason) if isinstance(body, dict) else exc.reason
        fail(f"{peer} at {host}:{port}: {reason}", code=not_found if exc.code == 404 else 2)
    except (OSError, ValueError) as exc:
        fail(f"{peer} at {host}:{port} unreachable: {exc}")
