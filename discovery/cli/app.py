"""The ``discovery`` command group. Exit codes: 0 ok, 1 unexpected failure, 2 bad input or
unreachable registry/Docker (one clear line on stderr).

Each command lives in its own module of this package; they are imported here only to be added
to the group, so ``discovery --help`` stays cheap.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import click

from discovery import __version__

# One clear line of ours on a TLS failure, not gRPC's own stderr chatter (read when grpc loads,
# which is later: backends are imported when a registry is opened).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
DAEMONS = {"agent", "watch", "dns", "up"}
#: malloc arenas of a daemon unless ``MALLOC_ARENA_MAX`` says otherwise: glibc's default (8 a
#: core) keeps each thread's freed memory in an arena of its own; with 2, ``discovery up`` (100
#: containers, a 10,100-instance catalog) holds ~5 MB less (docs/benchmarks.md, footprint)
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def fewer_malloc_arenas(environ: Mapping[str, str] = os.environ, libc: Any = None) -> bool:
    """At most :data:`MALLOC_ARENAS` glibc malloc arenas from now on, before any thread
    starts; not when ``MALLOC_ARENA_MAX`` is set (glibc read it at start) or without glibc's
    ``mallopt``. True when it was set."""
    if "MALLOC_ARENA_MAX" in environ:
        return False
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


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
