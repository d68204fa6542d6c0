"""``discovery up``: agent + watcher + HAProxy + DNS + HTTP in one process tree.

With ``--dev`` and no ``--registry`` a private single-node etcd is started on loopback and
removed on exit, like ``consul agent -dev``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from discovery.cli.options import (
    datacenter_option,
    dns_answer_options,
    given,
    host_options,
    http_token_option,
    registry_options,
    zone_option,
)
from discovery.cli.output import fail
from discovery.cli.signals import Held, on_signals
from discovery.errors import ConfigError, DiscoveryError

if TYPE_CHECKING:
    from discovery.agent.config import AgentConfig
    from discovery.watcher.config import WatcherConfig

log = logging.getLogger(__name__)
DEFAULT_AGENT_STATE = Path("/var/lib/discovery/agent")  # maintenance state, as the agent's


@click.command()
@click.option("--dev", is_flag=True,
              help="Private etcd on loopback when no --registry is given; temporary state dir")
@registry_options(required=False)
@host_options()
@zone_option("This host's zone: written into the records of its instances, and routed to "
             "first (other zones below zone_min_up); default [agent] zone / [watcher] zone")
@click.option("--service", "services", multiple=True, metavar="NAME[:BIND]:PORT",
              help="Route service NAME through HAProxy on BIND:PORT; repeatable")
@click.option("--config", "config_file", envvar="DISCOVERY_CONFIG", default=None, metavar="FILE",
              help="TOML with [agent], [watcher] and [services.NAME] tables; re-read on "
                   "SIGHUP [env DISCOVERY_CONFIG]")
@click.option("--state-dir", envvar="DISCOVERY_STATE_DIR", default=None,
              help="HAProxy files, and the agent's maintenance state in its agent/ folder "
                   "(default: /var/lib/discovery/watch and /var/lib/discovery/agent; a "
                   "temporary one with --dev)")
@click.option("--haproxy-bin", default="haproxy", show_default=True,
              help="HAProxy binary: up runs and supervises it (master-worker)")
@click.option("--dns", "dns", envvar="DISCOVERY_DNS", default="127.0.0.1:8600", show_default=True,
              help="DNS listen address; 'off' to disable [env DISCOVERY_DNS]")
@dns_answer_options()
@click.option("--http", "http", envvar="DISCOVERY_HTTP", default="127.0.0.1:8500",
              show_default=True, help="HTTP API listen address; 'off' to disable "
              "[env DISCOVERY_HTTP]")
@http_token_option()
@datacenter_option()
@click.pass_context
def up(ctx: click.Context, dev: bool, registry: str | None, node: str, address: str,
       docker: str | None, ttl: float, resync: float, zone: str | None,
       services: tuple[str, ...], config_file: str | None, state_dir: str | None,
       haproxy_bin: str, dns: str, dns_domain: str, dns_ttl: int,
       dns_udp_answer_limit: int, http: str, http_token: str | None, datacenter: str) -> None:
    """Run the whole thing on this host: register, route, and answer lookups."""
    from discovery.agent.config import AgentConfig, read_file
    from discovery.agent.core import Agent
    from discovery.lookup.serve import Lookups, predecessor, start_lookups
    from discovery.lookup.status import agent_health
    from discovery.metrics import Metrics
    from discovery.registry import mask_url, open_registry
    from discovery.registry.devserver import LocalEtcd, listed_ports
    from discovery.watcher.assemble import (
        HAProxySettings,
        assemble,
        leave_haproxy,
        reconfigure,
        stop_haproxy,
        usable_state_dir,
    )
    from discovery.watcher.render import Renderer

    held = Held()  # signals of the start-up: handled once on_signals is in place
    etcd: LocalEtcd | None = None
    temp_state: Path | None = None
    lookups = Lookups()
    try:
        if registry is None and config_file:  # flags and environment win over the file
            from_file = read_file(config_file).get("registry")
            if from_file is not None and not isinstance(from_file, str):
                raise ConfigError(f"config file {config_file}: [agent] registry must be a "
                                  "string (a registry URL)")
            registry = from_file or None
        if registry is None and not dev:
            raise DiscoveryError("no registry: give --registry URL, or --dev")
        if state_dir is None and dev:
            temp_state = Path(tempfile.mkdtemp(prefix="dw-", dir="/tmp"))
        state = Path(state_dir) if state_dir else (temp_state or Path("/var/lib/discovery/watch"))
        agent_state = state / "agent" if state_dir or temp_state else DEFAULT_AGENT_STATE
        # --dev: a stand-in URL until the dev etcd's ports are picked, apart from every port
        # this process binds (the config file's listeners too)
        base = AgentConfig(registry=registry or "etcd://127.0.0.1:2379", node=node,
                           address=address, docker=docker, ttl=ttl, resync=resync,
                           state_dir=str(agent_state))
        # the registry, once chosen, is the one both share: a reload does not change it
        explicit = given(ctx, ("node", "address", "docker", "ttl", "resync")) | {"registry"}
        agent_cfg, watch_cfg = configs(base, zone, services, config_file, explicit)
        if registry is None:
            etcd = LocalEtcd(avoid=listed_ports(dns, http) | watch_cfg.ports()).start()
            registry = etcd.url()
            base = replace(base, registry=registry)
            agent_cfg = replace(agent_cfg, registry=registry)
        if watch_cfg.services:
            usable_state_dir(state)  # before anything connects: one line, exit 2
        metrics = Metrics()
        taken = predecessor(None if temp_state else state, None if dns == "off" else dns,
                            None if http == "off" else http)  # a leaving `up`'s DNS/HTTP
        # One registry client (one session, one connection) for both: on a fleet, half the
        # sessions, pings and connections of two. The agent closes it (revoking or leaving
        # its registrations) when it stops; the watcher's close after that is a no-op.
        shared = open_registry(registry, ttl=agent_cfg.ttl)
        agent = Agent(agent_cfg, shared, metrics)
        watcher = assemble(shared, watch_cfg, HAProxySettings(state, haproxy_bin),
                           metrics=metrics)
        lookups = start_lookups(watcher, metrics, dns=None if dns == "off" else dns,
                                http=None if http == "off" else http, domain=dns_domain,
                                ttl=dns_ttl, dns_udp_answer_limit=dns_udp_answer_limit,
                                extra_health=agent_health(agent, prefix="agent_"),
                                maint=agent.set_maint, checks=agent.checks, token=http_token,
                                datacenter=datacenter, node=agent_cfg.node,
                                history=agent.history.query, inherited=taken)
    except BaseException as exc:  # nothing of ours is left behind (the private etcd above all)
        lookups.stop()
        if etcd is not None:
            etcd.stop()
        if temp_state is not None:
            shutil.rmtree(temp_state, ignore_errors=True)
        if not isinstance(exc, DiscoveryError):
            raise
        fail(str(exc))
        return

    done = threading.Event()

    leaving = threading.Event()  # SIGUSR2: registrations and HAProxy stay for a successor

    def leave() -> None:
        leaving.set()
        leave_haproxy(watcher)
        done.set()

    def stop() -> None:
        lookups.cancel()
        done.set()

    def load() -> WatcherConfig:  # SIGHUP: the file again, flags and environment still winning
        new_agent, new_watch = configs(base, zone, services, config_file, explicit)
        Renderer(new_watch.template)  # a broken template: nothing of the file is taken
        agent.reload(new_agent)
        return new_watch

    on_signals(stop, reload=lambda: reconfigure(watcher, load), leave=leave, held=held)
    failed: list[str] = []  # components that died: the exit status says so
    threads = [threading.Thread(target=_guard(name, run, done, failed), name=name, daemon=True)
               for name, run in (("agent", agent.run), ("watcher", watcher.run))]
    for t in threads:
        t.start()
    log.info("up: registry %s, node %s, %d services routed, DNS %s, HTTP %s", mask_url(registry),
             agent_cfg.node, len(watch_cfg.services), lookups.dns_port, lookups.http_port)
    try:
        while not done.wait(0.5):
            pass
    finally:
        # A component that died (a bug) leaves like SIGUSR2: the registrations, and HAProxy
        # on a lasting state dir, stay for the restart (Restart=on-failure) to adopt.
        # The last catalog first, while the registry is connected: the agent closes the
        # registry they share (on ZooKeeper its state goes down, and the write was skipped).
        if leaving.is_set() or failed or lookups.failed:
            watcher.remember_now()
        agent.stop(revoke=not (leaving.is_set() or failed or lookups.failed))
        if (failed or lookups.failed) and temp_state is None:
            leave_haproxy(watcher)
        watcher.stop()
        for t in threads:
            t.join(15)
        if leaving.is_set():  # DNS/HTTP answer on until the next `up` answers on their sockets
            lookups.hand_over(state)
        watcher.close()
        stop_haproxy(watcher)
        lookups.stop()
        if etcd is not None:
            etcd.stop()
        if temp_state is not None:
            shutil.rmtree(temp_state, ignore_errors=True)
        log.info("up: everything stopped")
    if lookups.failed:  # (after a predecessor: it stopped the watcher)
        fail(lookups.failed)
    if failed:
        fail(f"{' and '.join(failed)} failed (see the log above)", code=1)


def configs(agent: AgentConfig, zone: str | None, services: tuple[str, ...],
            config_file: str | None, explicit: Collection[str] = ("registry",)
            ) -> tuple[AgentConfig, WatcherConfig]:
    """The agent's and the watcher's configuration of ``up``: the fields of ``agent`` named in
    ``explicit`` (given as flags or in the environment), ``zone`` and ``services`` over the
    ``[agent]`` / ``[watcher]`` tables of ``config_file``, over the defaults in ``agent``. A
    ``--zone`` goes to both: the agent writes it into its records, the watcher routes to it."""
    from discovery.agent.config import merge, read_file
    from discovery.watcher.config import WatcherConfig, load_watcher_config
    from discovery.watcher.config import merge as merge_services

    explicit = set(explicit)
    if zone is not None:
        agent, explicit = replace(agent, zone=zone), explicit | {"zone"}
    agent = merge(agent, read_file(config_file) if config_file else {}, explicit)
    watcher = load_watcher_config(config_file) if config_file else WatcherConfig()
    watcher = merge_services(watcher, services)
    if zone is not None:
        watcher = replace(watcher, zone=zone)
    return agent, watcher


def _guard(name: str, run: Any, done: threading.Event, failed: list[str]) -> Any:
    """Run a component's loop; if it dies, bring the whole process down (never half up),
    and name it in ``failed``."""

    def target() -> None:
        try:
            run()
        except Exception:
            log.exception("%s failed: stopping", name)
            failed.append(name)
        finally:
            done.set()

    return target
