"""``discovery services``: list what the registry holds."""

from __future__ import annotations

import click

from discovery.cli import output
from discovery.cli.options import registry_options, service_name, timeout_option
from discovery.cli.output import fail
from discovery.errors import DiscoveryError
from discovery.registry import open_registry


@click.command()
@click.argument("service", required=False)
@registry_options()
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@timeout_option()
def services(service: str | None, registry: str, fmt: str, timeout: float) -> None:
    """List registered services and their instances."""
    if service is not None:
        service = service_name(service)  # a name no service can have: exit 2, not "none"
    try:
        reg = open_registry(registry, timeout=timeout)
        try:
            snap = reg.snapshot(None if service is None else {service})  # that one only
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


