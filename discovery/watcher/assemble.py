"""Putting a watcher together from settings: registry, router, HAProxy control.

Shared by ``discovery watch`` and ``discovery up`` so both run the same thing.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from discovery.errors import ConfigError, DiscoveryError
from discovery.metrics import Metrics
from discovery.registry import Registry, open_registry
from discovery.registry.view import ServicesView
from discovery.watcher.adopt import converge
from discovery.watcher.config import WatcherConfig
from discovery.watcher.core import Watcher
from discovery.watcher.remember import FILE as REMEMBER_FILE
from discovery.watcher.render import Renderer, RuntimePaths
from discovery.watcher.router import Router
from discovery.watcher.supervisor import ExternalHAProxy, HAProxyControl, HAProxySupervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HAProxySettings:
    state_dir: Path
    binary: str = "haproxy"
    socket: str | None = None  # drive an external HAProxy through this admin socket
    config: str | None = None  # ... whose config file is this
    master_socket: str | None = None
    reload_cmd: str | None = None


def assemble(registry_url: str | Registry, cfg: WatcherConfig, haproxy: HAProxySettings, *,
             json_out: Path | None = None, render_only: bool = False,
             dry_run: bool = False, metrics: Metrics | None = None,
             only_routed: bool = False, keep_last: bool = True) -> Watcher:
    """A ready-to-run :class:`Watcher`. ``render_only``: no HAProxy is started (``--once``);
    with ``dry_run`` nothing external is driven either. ``only_routed`` (nothing serves the
    whole catalog): read and watch only the routed services (:mod:`discovery.registry.view`).
    ``registry_url`` may be an open registry instead (``up`` shares the agent's).
    ``keep_last``: keep the last catalog in the state dir (watcher/remember.py; a watcher
    with DNS or HTTP alone makes the dir if it can)."""
    if haproxy.socket and not haproxy.config:
        raise DiscoveryError("--haproxy-socket needs --haproxy-config (the file it reads)")
    if not haproxy.socket:  # else silently unused: say so
        for flag, value in (("--haproxy-config", haproxy.config),
                            ("--master-socket", haproxy.master_socket),
                            ("--reload-cmd", haproxy.reload_cmd)):
            if value is not None:
                raise ConfigError(f"{flag} needs --haproxy-socket (it drives an HAProxy "
                                  "already running; without it the watcher runs its own)")
    if json_out is not None and not dry_run:
        usable_json_out(json_out)
    renderer = Renderer(cfg.template)
    control: HAProxyControl | None = None
    if haproxy.socket:
        paths = RuntimePaths(admin_socket=str(Path(haproxy.socket).absolute()))
        config_path = Path(str(haproxy.config)).absolute()
        if not dry_run:
            try:
                reload_cmd = shlex.split(haproxy.reload_cmd or "") or None
            except ValueError as exc:  # an unbalanced quote
                raise ConfigError(f"--reload-cmd {haproxy.reload_cmd!r:.80}: {exc}") from None
            control = ExternalHAProxy(haproxy.socket, reload_cmd, haproxy.master_socket)
    else:
        state = haproxy.state_dir.absolute()
        paths = RuntimePaths(admin_socket=str(state / "admin.sock"))
        config_path = state / "haproxy.cfg"
    router: Router | None = None
    if (cfg.services or render_only) and not haproxy.socket and not dry_run:
        usable_state_dir(haproxy.state_dir)
    if (cfg.services or render_only) and not dry_run:  # it checks every config (haproxy -c)
        check_haproxy_bin(haproxy.binary)
    if cfg.services or render_only:
        router = Router(cfg, config_path, paths, control, haproxy_bin=haproxy.binary,
                        renderer=renderer)
        if control is None and not render_only and not haproxy.socket:
            router.control = supervise(router, config_path, haproxy)
    registry: Registry = (open_registry(registry_url) if isinstance(registry_url, str)
                          else registry_url)
    if only_routed and cfg.services and json_out is None:
        registry = ServicesView(registry, cfg.services)
    # the last catalog, kept beside HAProxy's files (watcher/remember.py): also with DNS or
    # HTTP alone, whose answers a restart during a wipe would otherwise empty
    state, remember = haproxy.state_dir.absolute(), None
    if keep_last and not render_only and not dry_run:
        try:  # (with a router it was made above, or is HAProxy's own: only looked at)
            if router is None:
                usable_state_dir(state)  # made, and a file written there, or one warning
            remember = state / REMEMBER_FILE if state.is_dir() else None
        except ConfigError as exc:
            log.warning("%s: no last catalog kept", exc)
    return Watcher(registry, router, json_out=json_out,
                   wait=(cfg.wait_min, cfg.wait_max),
                   reload_min_interval=cfg.reload_min_interval, metrics=metrics,
                   guard=cfg.guard, remember=remember)


def supervise(router: Router, config_path: Path, haproxy: HAProxySettings) -> HAProxySupervisor:
    """Our own HAProxy: re-applied after a restart, converged when adopted (watcher/adopt.py)."""
    def on_adopt() -> bool:
        return converge({name: t.slots() for name, t in router.tables.items()}, sup.runtime)

    sup = HAProxySupervisor(config_path, haproxy.state_dir.absolute(), haproxy.binary,
                            on_restart=router.reapply, on_adopt=on_adopt)
    return sup


def usable_state_dir(path: Path) -> None:
    """Create ``path`` if missing and prove a file can be written in it (root ignores mode
    bits, so only a write tells); :class:`ConfigError` naming the path otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "not a directory" if path.exists() and not path.is_dir() else exc.strerror
        raise ConfigError(f"--state-dir {path}: cannot create it: {reason or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--state-dir {path}: cannot write in it: {exc.strerror or exc}"
                          ) from None


_VERSION = re.compile(r"HA-?Proxy version (\S+)")


def check_haproxy_bin(binary: str, timeout: float = 10.0) -> str:
    """The version ``binary -v`` prints; :class:`ConfigError` naming ``--haproxy-bin`` when it
    cannot run or is no HAProxy (else every config would be "rejected" by, say, /bin/false)."""
    def bad(reason: str) -> ConfigError:
        return ConfigError(f"--haproxy-bin {binary!r:.200}: {reason}")

    try:
        proc = subprocess.run([binary, "-v"], capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise bad(f"'-v' took longer than {timeout:g}s") from None
    except (OSError, ValueError) as exc:  # missing, a directory, not executable, a NUL
        raise bad(f"cannot run it: {getattr(exc, 'strerror', None) or exc}") from None
    found = _VERSION.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise bad(f"not HAProxy: '-v' exited {proc.returncode} without an HAProxy version")
    return found.group(1)


def usable_json_out(path: Path) -> None:
    """Create the folder of ``path`` if missing and prove a file can be written in it and
    renamed onto ``path`` (not a directory); :class:`ConfigError` naming ``--json-out``."""
    if path.is_dir():
        raise ConfigError(f"--json-out {path}: is a directory (give a file name)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"--json-out {path}: cannot write in its folder: {reason}") from None


def stop_haproxy(watcher: Watcher) -> None:
    """Stop the HAProxy this watcher runs itself (an external one is left alone; so is ours
    after :func:`leave_haproxy`)."""
    control = watcher.router.control if watcher.router is not None else None
    if isinstance(control, HAProxySupervisor):
        control.stop()


def leave_haproxy(watcher: Watcher) -> None:
    """SIGUSR2: stop supervising our HAProxy and leave it serving for the next watcher of the
    state dir, which adopts it (signal-handler safe)."""
    control = watcher.router.control if watcher.router is not None else None
    if isinstance(control, HAProxySupervisor):
        control.leave()
        log.info("leaving HAProxy (master %s) running for the next watcher", control.master_pid)


def reconfigure(watcher: Watcher, load: Callable[[], WatcherConfig]) -> None:
    """SIGHUP of ``watch`` and ``up``: the routed services, their settings and the template
    from ``load`` (the configuration file read again). One that does not load (or render) is
    logged and counted as a render error; the last good configuration stays. One at a time:
    two close together (each signal has a thread of its own) interleaved, and could leave
    HAProxy routing one file's services and the registry view following the other's."""
    with watcher.config_lock:
        _reconfigure(watcher, load)


def _reconfigure(watcher: Watcher, load: Callable[[], WatcherConfig]) -> None:
    router = watcher.router
    try:
        new = load()
        if router is None:  # nothing was routed at start: no HAProxy runs to take them
            if new.services:
                log.warning("SIGHUP: %d services to route, but none was at start: restart to "
                            "route them", len(new.services))
            return
        router.set_config(new, Renderer(new.template))
        watcher.wait_min, watcher.wait_max = new.wait_min, new.wait_max  # (the loop's own)
        watcher.reload_min_interval = new.reload_min_interval
        if isinstance(watcher.registry, ServicesView):
            watcher.registry.set_services(new.services)
        log.info("SIGHUP: configuration re-read")
    except DiscoveryError as exc:
        log.error("SIGHUP: configuration not reloaded, keeping the last good one: %s", exc)
        if router is None:
            return
        router.stats.render_errors += 1
        router.stats.last_error = str(exc)
    watcher.poke()
