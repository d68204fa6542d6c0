"""The ``discovery`` command group. Exit codes: 0 ok, 1 unexpected failure, 2 bad input or
unreachable registry/Docker (one clear line on stderr).

Each command lives in its own module of this package; they are imported here only to be added
to the group, so ``discovery --help`` stays cheap.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import click

from discovery import __version__
from discovery.heap import fewer_malloc_arenas, keep_giving_back

# One clear line of ours on a TLS failure, not gRPC's own stderr chatter (read when grpc loads,
# which is later: backends are imported when a registry is opened).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
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
    if daemon:
        fewer_malloc_arenas()
        done = threading.Event()
        keep_giving_back(stop=done)
        ctx.call_on_close(done.set)  # (the command ended: in tests, the process goes on)
    ctx.obj = {"log_level_given": log_level is not None}
    logging.basicConfig(
        level=(log_level or ("info" if daemon else "error")).upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _register_commands() -> None:
    from discovery.cli.agent import agent
    from discovery.cli.history import history
    from discovery.cli.maint import maint
    from discovery.cli.services import services
    from discovery.cli.show import check_config, show
    from discovery.cli.up import up
    from discovery.cli.watch import dns, watch

    for command in (agent, services, watch, dns, up, show, check_config, maint, history):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
