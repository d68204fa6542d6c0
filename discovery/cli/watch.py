"""``discovery watch``: follow the registry and keep a local HAProxy in step."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from discovery.cli.options import (
    DNS_DOMAIN_HELP,
    DNS_TTL_HELP,
    datacenter_option,
    dns_answer_options,
    http_token_option,
    registry_options,
    zone_option,
)
from discovery.cli.output import fail
from discovery.cli.signals import Held, on_signals
from discovery.errors import DiscoveryError
from discovery.registry import mask_url

if TYPE_CHECKING:
    from discovery.lookup.handover import Taken
    from discovery.lookup.serve import Lookups
    from discovery.metrics import Metrics
    from discovery.watcher.core import Watcher

log = logging.getLogger(__name__)
DEFAULT_STATE_DIR = "/var/lib/discovery/watch"
WATCH_ZONE_HELP = ("This host's zone: route to its instances, spill over to other zones below "
                   "zone_min_up (default [watcher] zone)")


@click.command()
@registry_options()
@click.option("--service", "services", multiple=True, metavar="NAME[:BIND]:PORT",
              help="Route service NAME on BIND:PORT (bind default 127.0.0.1); repeatable")
@click.option("--config", "config_file", envvar="DISCOVERY_WATCH_CONFIG", metavar="FILE",
              help="TOML with [watcher] and [services.NAME]; re-read on SIGHUP "
                   "[env DISCOVERY_WATCH_CONFIG]")
@click.option("--state-dir", envvar="DISCOVERY_STATE_DIR", default=DEFAULT_STATE_DIR,
              show_default=True,
              help="HAProxy config, sockets and pid file [env DISCOVERY_STATE_DIR]")
@click.option("--template", default=None, metavar="FILE",
              help="Jinja2 template for haproxy.cfg (default: the built-in one)")
@click.option("--haproxy-bin", default="haproxy", show_default=True,
              help="HAProxy binary: the watcher runs and supervises it (master-worker)")
@click.option("--haproxy-socket", default=None, metavar="PATH",
              help="Drive an HAProxy that is already running through this admin socket")
@click.option("--haproxy-config", default=None, metavar="FILE",
              help="With --haproxy-socket: the config file that HAProxy reads")
@click.option("--master-socket", default=None, metavar="PATH",
              help="With --haproxy-socket: its master CLI socket, used to reload")
@click.option("--reload-cmd", default=None, metavar="CMD",
              help="With --haproxy-socket: command that reloads it (split like a shell, never "
                   "run by one)")
@click.option("--json-out", default=None, metavar="FILE",
              help="Write the catalog as JSON here, atomically, only when it changes")
@zone_option(WATCH_ZONE_HELP)
@click.option("--wait", default=None, metavar="MIN:MAX",
              help="Quiescence window for bursts, e.g. 50ms:500ms (default from config)")
@click.option("--dns", "dns", default=None, metavar="ADDR:PORT",
              help="Also answer DNS from the catalog here, e.g. 127.0.0.1:8600")
@dns_answer_options()
@click.option("--http", "http", default=None, metavar="ADDR:PORT",
              help="Also serve the HTTP API and /metrics here, e.g. 127.0.0.1:8500")
@http_token_option()
@datacenter_option()
@click.option("--once", is_flag=True, help="Render (and install) once, then exit")
@click.option("--dry-run", is_flag=True, help="With --once: print the config, touch nothing")
@click.pass_context
def watch(ctx: click.Context, registry: str, services: tuple[str, ...],
          config_file: str | None, state_dir: str,
          template: str | None, haproxy_bin: str, haproxy_socket: str | None,
          haproxy_config: str | None, master_socket: str | None, reload_cmd: str | None,
          json_out: str | None, zone: str | None, wait: str | None, dns: str | None,
          dns_domain: str,
          dns_ttl: int, dns_udp_answer_limit: int, http: str | None, http_token: str | None,
          datacenter: str, once: bool,
          dry_run: bool) -> None:
    """Follow the registry; route services through a local HAProxy without dropping requests."""
    from discovery.agent.config import read_toml
    from discovery.lookup.serve import predecessor
    from discovery.metrics import Metrics
    from discovery.watcher.assemble import HAProxySettings, assemble, reconfigure
    from discovery.watcher.config import (
        WatcherConfig,
        load_watcher_config,
        merge,
        parse_wait,
    )

    def load_config() -> WatcherConfig:
        if config_file:
            read_toml(config_file)  # one error for a misspelled table such as [watchr]
        cfg = load_watcher_config(config_file) if config_file else WatcherConfig()
        cfg = merge(cfg, services)
        if template:
            cfg = replace(cfg, template=template)
        if wait:
            low, high = parse_wait(wait)
            cfg = replace(cfg, wait_min=low, wait_max=high)
        if zone is not None:
            cfg = replace(cfg, zone=zone)  # a DNS label: checked by the option
        return cfg

    held = None if once else Held()  # a daemon's start-up signals: handled once serving
    if once and not (ctx.obj or {}).get("log_level_given"):
        logging.getLogger().setLevel(logging.ERROR)  # one-shot: only errors, like `services`
    try:
        if dry_run and not once:
            raise DiscoveryError("--dry-run goes with --once")
        cfg = load_config()
        settings = HAProxySettings(Path(state_dir), haproxy_bin, haproxy_socket, haproxy_config,
                                   master_socket, reload_cmd)
        metrics = Metrics()
        # a watcher leaving this state dir (SIGUSR2) hands its DNS/HTTP sockets over: take
        # them before adopting its HAProxy (it offers them once it has let go of HAProxy)
        taken = None if once else predecessor(Path(state_dir), dns, http)
        watcher = assemble(registry, cfg, settings, json_out=Path(json_out) if json_out else None,
                           render_only=once, dry_run=dry_run, metrics=metrics,
                           only_routed=not (dns or http))  # DNS/HTTP answer for everything
        router = watcher.router
        if once:
            watcher.load(retry=False)
            if dry_run:
                assert router is not None
                click.echo(router.render_current(watcher.catalog), nl=False)
            else:
                watcher.sync()
            watcher.close()  # --json-out written by then
            if router is not None and router.stats.last_error:
                raise DiscoveryError(router.stats.last_error)
            if watcher.json_error:
                raise DiscoveryError(watcher.json_error)
            return
        lookups = _lookups(watcher, metrics, dns, http, dns_domain, dns_ttl,
                           dns_udp_answer_limit, http_token, datacenter, taken)
    except DiscoveryError as exc:
        fail(str(exc))
        return

    def on_hup() -> None:
        reconfigure(watcher, load_config)

    log.info("watcher starting: registry %s, %d services routed", mask_url(registry),
             len(cfg.services))
    serve(watcher, lookups, on_hup, Path(state_dir), held)


@click.command()
@registry_options()
@click.option("--listen", "dns", default="127.0.0.1:8600", show_default=True,
              help="DNS listen address (UDP and TCP)")
@click.option("--domain", "dns_domain", default="discovery.", show_default=True,
              help=DNS_DOMAIN_HELP)
@click.option("--ttl", "dns_ttl", type=int, default=0, show_default=True, help=DNS_TTL_HELP)
@click.option("--udp-answer-limit", "dns_udp_answer_limit", type=click.IntRange(0, 65535),
              default=3, show_default=True,
              help="Most answer records in a UDP response (all of them over TCP); 0: as many "
                   "as fit")
@click.option("--http", "http", default=None, metavar="ADDR:PORT",
              help="Also serve the HTTP API and /metrics here")
@http_token_option()
@datacenter_option()
@click.option("--state-dir", default=None, metavar="DIR",
              help="Keep the last catalog here (catalog.last.json): a restart while the "
                   "registry is wiped answers what it answered before; without it, none kept")
def dns(registry: str, dns: str, dns_domain: str, dns_ttl: int, dns_udp_answer_limit: int,
        http: str | None, http_token: str | None, datacenter: str,
        state_dir: str | None) -> None:
    """Answer DNS (and optionally HTTP) from the registry, without HAProxy."""
    from discovery.metrics import Metrics
    from discovery.watcher.assemble import HAProxySettings, assemble, usable_state_dir
    from discovery.watcher.config import WatcherConfig

    held = Held()  # signals of the start-up: handled once serving

    try:
        metrics = Metrics()
        if state_dir is not None:
            usable_state_dir(Path(state_dir))  # asked for: one error naming it
        watcher = assemble(registry, WatcherConfig(),
                           HAProxySettings(Path(state_dir or DEFAULT_STATE_DIR)),
                           metrics=metrics, keep_last=state_dir is not None)
        lookups = _lookups(watcher, metrics, dns, http, dns_domain, dns_ttl,
                           dns_udp_answer_limit, http_token, datacenter)
    except DiscoveryError as exc:
        fail(str(exc))
        return

    serve(watcher, lookups, held=held)


def _lookups(watcher: Watcher, metrics: Metrics, dns: str | None, http: str | None,
             domain: str, ttl: int, udp_answer_limit: int, token: str | None,
             datacenter: str, inherited: Taken | None = None) -> Lookups:
    """DNS and HTTP next to ``watcher``'s catalog, as ``watch`` and ``dns`` start them."""
    from discovery.agent.config import default_node
    from discovery.lookup.serve import start_lookups

    return start_lookups(watcher, metrics, dns=dns, http=http, domain=domain, ttl=ttl,
                         dns_udp_answer_limit=udp_answer_limit, token=token,
                         datacenter=datacenter, node=default_node(), inherited=inherited)


def serve(watcher: Watcher, lookups: Lookups, on_hup: Callable[[], None] | None = None,
          state_dir: Path | None = None, held: Held | None = None) -> None:
    """Run a watcher until SIGTERM/SIGINT, then stop its lookups, its registry and its HAProxy
    (SIGUSR2: the same, but HAProxy is left serving for the next watcher, which adopts it,
    and DNS/HTTP answer on until it answers on their sockets, taken from ``state_dir``)."""
    from discovery.watcher.assemble import leave_haproxy, stop_haproxy

    leaving = threading.Event()

    def leave() -> None:
        leave_haproxy(watcher)
        leaving.set()
        watcher.stop()

    def stop() -> None:
        lookups.cancel()
        watcher.stop()

    on_signals(stop, on_hup, leave, held)
    try:
        watcher.run()
    finally:
        if leaving.is_set():
            watcher.remember_now()  # before the successor reads it
        if leaving.is_set() and state_dir is not None:
            lookups.hand_over(state_dir)
        if lookups.failed:  # HAProxy serves on, for the next start to adopt
            leave_haproxy(watcher)
        lookups.stop()
        watcher.close()
        stop_haproxy(watcher)
    if lookups.failed:  # (after a predecessor: it stopped the watcher)
        fail(lookups.failed)
