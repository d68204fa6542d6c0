"""``discovery watch``: follow the registry and keep a local HAProxy in step."""

from __future__ import annotations

import logging
import shlex
import signal
from dataclasses import replace
from pathlib import Path
from types import FrameType

import click

from discovery.errors import DiscoveryError
from discovery.output import fail
from discovery.registry import open_registry

log = logging.getLogger(__name__)
DEFAULT_STATE_DIR = "/var/lib/discovery/watch"


@click.command()
@click.option("--registry", envvar="DISCOVERY_REGISTRY", required=True, metavar="URL",
              help="etcd://h1:2379/prefix or zk://h1:2181/prefix [env DISCOVERY_REGISTRY]")
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
@click.option("--wait", default=None, metavar="MIN:MAX",
              help="Quiescence window for bursts, e.g. 50ms:500ms (default from config)")
@click.option("--once", is_flag=True, help="Render (and install) once, then exit")
@click.option("--dry-run", is_flag=True, help="With --once: print the config, touch nothing")
@click.pass_context
def watch(ctx: click.Context, registry: str, services: tuple[str, ...],
          config_file: str | None, state_dir: str,
          template: str | None, haproxy_bin: str, haproxy_socket: str | None,
          haproxy_config: str | None, master_socket: str | None, reload_cmd: str | None,
          json_out: str | None, wait: str | None, once: bool, dry_run: bool) -> None:
    """Follow the registry; route services through a local HAProxy without dropping requests."""
    from discovery.watcher.config import (
        WatcherConfig,
        load_watcher_config,
        merge,
        parse_service_arg,
        parse_wait,
    )
    from discovery.watcher.core import Watcher
    from discovery.watcher.render import Renderer, RuntimePaths
    from discovery.watcher.router import Router
    from discovery.watcher.supervisor import ExternalHAProxy, HAProxyControl, HAProxySupervisor

    def load_config() -> WatcherConfig:
        cfg = load_watcher_config(config_file) if config_file else WatcherConfig()
        cfg = merge(cfg, [parse_service_arg(s) for s in services])
        if template:
            cfg = replace(cfg, template=template)
        if wait:
            low, high = parse_wait(wait)
            cfg = replace(cfg, wait_min=low, wait_max=high)
        return cfg

    if once and not (ctx.obj or {}).get("log_level_given"):
        logging.getLogger().setLevel(logging.ERROR)  # one-shot: only errors, like `services`
    try:
        if dry_run and not once:
            raise DiscoveryError("--dry-run goes with --once")
        if haproxy_socket and not haproxy_config:
            raise DiscoveryError("--haproxy-socket needs --haproxy-config (the file it reads)")
        cfg = load_config()
        renderer = Renderer(cfg.template)
        state = Path(state_dir).absolute()
        reg = open_registry(registry)
        control: HAProxyControl | None = None
        router: Router | None = None
        if haproxy_socket:
            paths = RuntimePaths(admin_socket=str(Path(haproxy_socket).absolute()))
            config_path = Path(str(haproxy_config)).absolute()
            if not dry_run:
                control = ExternalHAProxy(haproxy_socket, shlex.split(reload_cmd or "") or None,
                                          master_socket)
        else:
            paths = RuntimePaths(admin_socket=str(state / "admin.sock"))
            config_path = state / "haproxy.cfg"
        if cfg.services or once:
            router = Router(cfg, config_path, paths, control, haproxy_bin=haproxy_bin,
                            renderer=renderer)
            if control is None and not once and not haproxy_socket:
                supervisor = HAProxySupervisor(config_path, state, haproxy_bin,
                                               on_restart=router.reapply)
                router.control = control = supervisor
        watcher = Watcher(reg, router, json_out=Path(json_out) if json_out else None,
                          wait=(cfg.wait_min, cfg.wait_max),
                          reload_min_interval=cfg.reload_min_interval)
        if once:
            watcher.load(retry=False)
            if dry_run:
                assert router is not None
                click.echo(router.render_current(watcher.catalog), nl=False)
            else:
                watcher._sync()
                if router is not None and router.stats.last_error:
                    raise DiscoveryError(router.stats.last_error)
            watcher.close()
            return
    except DiscoveryError as exc:
        fail(str(exc))
        return

    def on_term(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        watcher.stop()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        if router is None:
            return
        try:
            new = load_config()
            router.set_config(new, Renderer(new.template))
            log.info("SIGHUP: configuration re-read")
        except DiscoveryError as exc:
            router.stats.render_errors += 1
            router.stats.last_error = str(exc)
            log.error("SIGHUP: configuration not reloaded, keeping the last good one: %s", exc)
        watcher.poke()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("watcher starting: registry %s, %d services routed", registry, len(cfg.services))
    try:
        watcher.run()
    finally:
        watcher.close()
        if isinstance(control, HAProxySupervisor):
            control.stop()
