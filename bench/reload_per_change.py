#!/usr/bin/env python3
"""Baseline for the routing benchmark: reload HAProxy on every registry change.

This is what consul-template and confd do: follow the registry, and on every change render
the *whole* HAProxy config with exactly the servers that exist now (no pre-allocated
slots, no runtime API), validate it (``haproxy -c``, confd's ``check_cmd``), install it
and reload HAProxy (master-worker, seamless: ``expose-fd listeners``, through the master
socket). Changes that arrive while a reload is in progress are rendered together by the
next pass (both tools render the current state, not a queue of events); an identical
rendering is skipped, as both tools do.

It runs HAProxy the way careful users of those tools do (``--tuning best``, the default): the
master-worker reload through the master socket re-executes HAProxy with the listening sockets
passed over (``expose-fd listeners`` on the stats socket; the master adds ``-x`` itself), and
the project's template gets two more lines: ``option idle-close-on-response`` (an old worker
answers the next request on an idle keep-alive connection with ``Connection: close`` instead
of closing it under the client) and ``hard-stop-after 30s`` (old workers kept alive by
long-lived connections go away after 30 s). ``--tuning plain`` renders the template as is.

It reuses the project's own pieces so that the only difference from ``discovery watch``
is *how* a change reaches HAProxy: the same built-in template (``option redispatch``,
``retries 2``, the same timeouts), the same registry client and catalog, the same
supervisor. Run on its own::

    .venv/bin/python bench/reload_per_change.py --registry etcd://127.0.0.1:2379/discovery \\
        --service web:18001 --state-dir /tmp/rpc-web --stats-out /tmp/rpc.json

SIGTERM/SIGINT stop it and its HAProxy; ``--stats-out`` then holds the counters (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from discovery.errors import DiscoveryError  # noqa: E402
from discovery.files import install, stage  # noqa: E402
from discovery.model.catalog import Catalog  # noqa: E402
from discovery.registry import Change, open_registry  # noqa: E402
from discovery.watcher.config import ServiceConfig, WatcherConfig  # noqa: E402
from discovery.watcher.render import (  # noqa: E402
    DEFAULT_TEMPLATE,
    Renderer,
    RuntimePaths,
    render_config,
)
from discovery.watcher.slots import Slot  # noqa: E402
from discovery.watcher.supervisor import HAProxySupervisor, validate_config  # noqa: E402

log = logging.getLogger("reload_per_change")

#: what careful consul-template/confd users add to the config (see the module docstring)
BEST_GLOBAL = "    hard-stop-after 30s"
BEST_DEFAULTS = "    option idle-close-on-response"


def best_template(out: Path) -> Path:
    """The project's template plus :data:`BEST_GLOBAL` and :data:`BEST_DEFAULTS`, in ``out``."""
    text = DEFAULT_TEMPLATE.read_text()
    for anchor, line in (("\nglobal\n", BEST_GLOBAL), ("\ndefaults\n", BEST_DEFAULTS)):
        if anchor not in text:
            raise SystemExit(f"{DEFAULT_TEMPLATE}: no {anchor.strip()!r} section")
        text = text.replace(anchor, f"{anchor}{line}\n", 1)
    out.write_text(text)
    return out


class ReloadPerChange:
    """Registry → full config → ``haproxy -c`` → install → reload, for every change."""

    def __init__(self, registry_url: str, services: Mapping[str, int], state_dir: Path,
                 haproxy_bin: str = "haproxy", validate: bool = True,
                 tuning: str = "best") -> None:
        self.config = WatcherConfig(services={
            name: ServiceConfig(name=name, port=port) for name, port in sorted(services.items())})
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state_dir / "haproxy.cfg"
        self.paths = RuntimePaths(admin_socket=str(self.state_dir / "admin.sock"))
        self.tuning = tuning
        self.renderer = Renderer(best_template(self.state_dir / "best.cfg.j2")
                                 if tuning == "best" else None)
        self.haproxy_bin = haproxy_bin
        self.validate = validate
        self.catalog = Catalog()
        self.registry = open_registry(registry_url)
        self.supervisor = HAProxySupervisor(self.config_path, self.state_dir, haproxy_bin)
        self.changes = 0          # registry changes that altered the catalog
        self.passes = 0           # render passes (one per change, or per backlog of changes)
        self.reloads = 0
        self.skipped_identical = 0
        self.failures = 0
        self.pass_ms: list[float] = []    # render + validate + install + reload, per reload
        self.reload_ms: list[float] = []  # the reload alone (until the new worker answers)
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._last_text = ""
        self._watch: Any = None

    def render(self) -> str:
        """The config with one ``server`` line per current instance (s1..sN, no spares)."""
        slots: dict[str, list[Slot]] = {}
        for name, svc in self.config.services.items():
            insts = [i for i in self.catalog.instances(name) if svc.accepts(i)]
            # A backend with nothing in it still needs one (disabled) server line.
            slots[name] = [Slot.of(f"s{n + 1}", i) for n, i in enumerate(insts)] or [Slot("s1")]
        return render_config(self.config, slots, self.paths, self.renderer)

    def _on_change(self, change: Change) -> None:
        if self.catalog.apply(change):
            self.changes += 1
            self._dirty.set()

    def start(self) -> None:
        snap = self.registry.snapshot()
        self.catalog.load(snap)
        self._last_text = self.render()
        self.config_path.write_text(self._last_text)
        self.supervisor.start()
        self._watch = self.registry.watch(self._on_change, snap.revision)
        log.info("baseline HAProxy started with %d instances", len(snap.instances))

    def run(self) -> None:
        """Apply changes until :meth:`stop`."""
        while not self._stop.is_set():
            if not self._dirty.wait(0.5) or self._stop.is_set():
                continue
            self._dirty.clear()
            self.apply()

    def apply(self) -> None:
        started = time.monotonic()
        self.passes += 1
        try:
            text = self.render()
            if text == self._last_text:
                self.skipped_identical += 1
                return
            staged = stage(text, self.config_path)
            try:
                if self.validate:
                    validate_config(self.haproxy_bin, staged)
                install(staged, self.config_path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
            before = time.monotonic()
            self.supervisor.reload()
            done = time.monotonic()
            self._last_text = text
            self.reloads += 1
            self.reload_ms.append((done - before) * 1000)
            self.pass_ms.append((done - started) * 1000)
        except DiscoveryError as exc:
            self.failures += 1
            log.error("baseline: config not applied: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        with contextlib.suppress(DiscoveryError):
            self.registry.close(revoke=False)
        self.supervisor.stop()

    def stats(self) -> dict[str, Any]:
        try:
            master_reloads: int | None = self.supervisor.reload_count()
        except DiscoveryError:
            master_reloads = None
        return {"tuning": self.tuning, "changes": self.changes, "passes": self.passes,
                "reloads": self.reloads,
                "master_reload_count": master_reloads,
                "skipped_identical": self.skipped_identical, "failures": self.failures,
                "pass_ms": [round(v, 2) for v in self.pass_ms],
                "reload_ms": [round(v, 2) for v in self.reload_ms]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", required=True, metavar="URL")
    ap.add_argument("--service", action="append", default=[], metavar="NAME:PORT",
                    help="route NAME on 127.0.0.1:PORT (repeatable)")
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--haproxy-bin", default="haproxy")
    ap.add_argument("--no-validate", action="store_true", help="skip 'haproxy -c'")
    ap.add_argument("--tuning", choices=("best", "plain"), default="best",
                    help="best: + idle-close-on-response, hard-stop-after (default)")
    ap.add_argument("--stats-out", type=Path, help="write the counters here (JSON) on exit")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services: dict[str, int] = {}
    for item in args.service:
        name, _, port = item.rpartition(":")
        if not name or not port.isdigit():
            ap.error(f"--service {item!r}: expected NAME:PORT")
        services[name] = int(port)
    if not services:
        ap.error("at least one --service")
    driver = ReloadPerChange(args.registry, services, args.state_dir, args.haproxy_bin,
                             validate=not args.no_validate, tuning=args.tuning)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        driver.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        driver.start()
        print("ready", flush=True)
        driver.run()
    finally:
        stats = driver.stats()
        driver.close()
        if args.stats_out is not None:
            args.stats_out.write_text(json.dumps(stats) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
