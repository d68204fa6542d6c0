"""``discovery agent``: register this host's healthy containers in the registry."""

from __future__ import annotations

import logging
from typing import Any

import click

from discovery.cli.options import (
    given,
    host_options,
    http_token_option,
    registry_options,
    zone_option,
)
from discovery.cli.output import fail
from discovery.cli.signals import Held, on_signals
from discovery.errors import DiscoveryError
from discovery.registry import mask_url, open_registry

log = logging.getLogger(__name__)


@click.command()
@registry_options(required=False)
@host_options()
@zone_option("This host's zone (a DNS label), written into every instance record; "
             "a container's discovery.zone label overrides it", default="")
@click.option("--internal/--no-internal", envvar="DISCOVERY_INTERNAL", default=False,
              help="Advertise container IP and exposed port [env DISCOVERY_INTERNAL]")
@click.option("--config", "config_file", envvar="DISCOVERY_CONFIG", default=None, metavar="FILE",
              help="TOML file with an [agent] table; re-read on SIGHUP [env DISCOVERY_CONFIG]")
@click.option("--state-dir", envvar="DISCOVERY_AGENT_STATE_DIR", default="/var/lib/discovery/agent",
              show_default=True, help="Where maintenance state is kept across restarts "
              "[env DISCOVERY_AGENT_STATE_DIR]")
@click.option("--http", "http", envvar="DISCOVERY_AGENT_HTTP", default=None, metavar="ADDR:PORT",
              help="Serve /v1/health, /v1/agent/* and /metrics here [env DISCOVERY_AGENT_HTTP]")
@http_token_option()
@click.pass_context
def agent(ctx: click.Context, **opts: Any) -> None:
    """Register healthy containers of this host in the registry."""
    from discovery.agent.config import AgentConfig, merge, read_file
    from discovery.agent.core import Agent
    from discovery.lookup.status import agent_health
    from discovery.metrics import Metrics

    held = Held()  # signals of the start-up: handled once on_signals is in place
    http, token = opts.pop("http"), opts.pop("http_token")
    explicit = given(ctx, opts)

    def load() -> AgentConfig:
        base = AgentConfig(**{**opts, "registry": opts["registry"] or ""})
        file_values = read_file(opts["config_file"]) if opts["config_file"] else {}
        return merge(base, file_values, explicit)

    try:
        config = load()
        registry = open_registry(config.registry, ttl=config.ttl)
        metrics = Metrics()
        the_agent = Agent(config, registry, metrics)
        api = None
        if http:
            from discovery.lookup.http import HttpApi, parse_listen
            from discovery.lookup.ui import Views

            api = HttpApi(None, agent_health(the_agent), metrics, *parse_listen(http),
                          maint=the_agent.set_maint, checks=the_agent.checks,
                          token=token, views=Views(the_agent.history.query)).start()
    except DiscoveryError as exc:
        fail(str(exc))
        return

    def reload() -> None:
        try:
            the_agent.reload(load())
        except DiscoveryError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)

    on_signals(lambda: the_agent.stop(revoke=True), reload, held=held)
    log.info("agent starting: node %s, registry %s", config.node, mask_url(config.registry))
    try:
        the_agent.run()
    finally:
        if api is not None:
            api.stop()


