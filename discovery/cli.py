"""The ``discovery`` command line. Exit codes: 0 ok, 1 unexpected failure, 2 bad input or
unreachable registry/Docker (one clear line on stderr)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from discovery import __version__, output
from discovery.cli_options import registry_options
from discovery.errors import DiscoveryError
from discovery.output import fail
from discovery.registry import mask_url, open_registry

log = logging.getLogger(__name__)
# One clear line of ours on a TLS failure, not gRPC's own stderr chatter (read when grpc loads,
# which is later: backends are imported when a registry is opened).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
F = TypeVar("F", bound=Callable[..., Any])
DAEMONS = {"agent", "watch", "dns", "up"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": None})
@click.version_option(__version__, prog_name="discovery")
@click.option("--log-level", envvar="DISCOVERY_LOG_LEVEL", default=None,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="Default: info for daemons, error for one-shot commands "
                   "[env DISCOVERY_LOG_LEVEL]")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Service discovery for Docker hosts: agent, watcher and lookups."""
    daemon = ctx.invoked_subcommand in DAEMONS
    ctx.obj = {"log_level_given": log_level is not None}
    logging.basicConfig(
        level=(log_level or ("info" if daemon else "error")).upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@registry_options(required=False)
@click.option("--node", envvar="DISCOVERY_NODE", default="", show_default="hostname",
              help="This host's name in the registry [env DISCOVERY_NODE]")
@click.option("--address", envvar="DISCOVERY_ADDRESS", default="127.0.0.1", show_default=True,
              help="Advertised IP for published ports [env DISCOVERY_ADDRESS]")
@click.option("--docker", envvar="DISCOVERY_DOCKER", default=None, metavar="URL",
              help="dockerd URL; default DOCKER_HOST or the local socket [env DISCOVERY_DOCKER]")
@click.option("--ttl", envvar="DISCOVERY_TTL", type=float, default=10.0, show_default=True,
              help="etcd lease TTL / ZooKeeper session timeout, seconds [env DISCOVERY_TTL]")
@click.option("--resync", envvar="DISCOVERY_RESYNC", type=float, default=30.0, show_default=True,
              help="Reconcile Docker and the registry every N seconds [env DISCOVERY_RESYNC]")
@click.option("--internal/--no-internal", envvar="DISCOVERY_INTERNAL", default=False,
              help="Advertise container IP and exposed port [env DISCOVERY_INTERNAL]")
@click.option("--config", "config_file", envvar="DISCOVERY_CONFIG", default=None, metavar="FILE",
              help="TOML file with an [agent] table; re-read on SIGHUP [env DISCOVERY_CONFIG]")
@click.option("--http", "http", envvar="DISCOVERY_AGENT_HTTP", default=None, metavar="ADDR:PORT",
              help="Serve /v1/health and /metrics here [env DISCOVERY_AGENT_HTTP]")
@click.pass_context
def agent(ctx: click.Context, **opts: Any) -> None:
    """Register healthy containers of this host in the registry."""
    from discovery.agent.config import AgentConfig, merge, read_file
    from discovery.agent.core import Agent
    from discovery.metrics import Metrics
    from discovery.status import agent_health

    http = opts.pop("http")
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    explicit = {name for name in opts if ctx.get_parameter_source(name) in given}

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
            from discovery.http import HttpApi, parse_listen

            api = HttpApi(None, agent_health(the_agent), metrics, *parse_listen(http),
                          maint=the_agent.set_maint, checks=the_agent.checks).start()
    except DiscoveryError as exc:
        fail(str(exc))
        return

    def on_term(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: deregistering and exiting", signum)
        the_agent.stop(revoke=True)

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        try:
            the_agent.reload(load())
        except DiscoveryError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("agent starting: node %s, registry %s", config.node, mask_url(config.registry))
    try:
        the_agent.run()
    finally:
        if api is not None:
            api.stop()


@main.command()
@click.argument("service", required=False)
@registry_options()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the registry")
def services(service: str | None, registry: str, fmt: str, timeout: float) -> None:
    """List registered services and their instances."""
    try:
        reg = open_registry(registry, timeout=timeout)
        try:
            snap = reg.snapshot()
        finally:
            reg.close(revoke=False)
    except DiscoveryError as exc:
        fail(str(exc))
        return
    instances = [i for i in snap.instances.values() if service in (None, i.service)]
    if fmt == "json":
        click.echo(output.as_json(instances))
    else:
        output.as_table(instances, output.console())


def _register_commands() -> None:
    from discovery.cli_inspect import check_config, maint, show
    from discovery.cli_up import up
    from discovery.cli_watch import dns, watch

    main.add_command(watch)
    main.add_command(dns)
    main.add_command(up)
    main.add_command(show)
    main.add_command(check_config)
    main.add_command(maint)


_register_commands()

if __name__ == "__main__":
    main()
