"""Real HAProxy 2.6 (Debian package) for tests, on loopback, plus tiny HTTP backends.

Fixtures (function scope):
``haproxy_factory(config_text, **supervisor_kwargs) -> HAProxySupervisor``: writes the
config (``{state_dir}`` placeholders replaced) under tmp_path, starts a supervised
master-worker HAProxy; every one is stopped by its pid at teardown.
``http_backends(*names) -> list[NamedBackend]``: threaded ``http.server`` instances on free
127.0.0.1 ports answering ``GET /`` with their own name (``status``: the code they answer it
with, 200 by default; ``GET /health`` is always 200: a gray failure passes its check; ``delay``:
seconds each answer takes, ``?sleep=S`` per request).
Helpers: ``build_config(...)``, ``http_get(port)``, ``NamedBackend``.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from discovery.watcher.supervisor import HAProxySupervisor
from tests.harness.util import free_port

HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"
HOST = "127.0.0.1"


def build_config(port: int, backends: dict[str, int] | None = None, *,
                 servers: dict[str, list[str]] | None = None,
                 state_file: bool = False, default_backend: str | None = None) -> str:
    """A minimal HTTP config: one frontend on 127.0.0.1:``port``.

    ``backends`` maps backend name -> number of empty slots (``server sN 127.0.0.1:1
    disabled``); ``servers`` gives literal extra ``server`` lines per backend. The first
    backend is the default one. ``state_file`` adds ``server-state-file`` +
    ``load-server-state-from-file global``. ``{state_dir}`` is left as a placeholder.
    """
    backends = backends or {"be": 4}
    servers = servers or {}
    names = list(dict.fromkeys([*backends, *servers]))
    lines = [
        "global",
        "    stats socket {state_dir}/admin.sock mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
    ]
    if state_file:
        lines.append("    server-state-file {state_dir}/server-state")
    lines += [
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 5s",
        "    timeout server 5s",
    ]
    if state_file:
        lines.append("    load-server-state-from-file global")
    lines += [
        "frontend fe",
        f"    bind {HOST}:{port}",
        f"    default_backend {default_backend or names[0]}",
    ]
    for name in names:
        lines += [f"backend {name}", "    balance roundrobin"]
        lines += [f"    {s}" for s in servers.get(name, [])]
        lines += [f"    server s{i} {HOST}:1 disabled" for i in range(1, backends.get(name, 0) + 1)]
    return "\n".join(lines) + "\n"


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, str]:
    """One request through a new connection (``Connection: close``): (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


class _Handler(BaseHTTPRequestHandler):
    server: _NamedServer

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.server.hits += 1
        path, _, query = self.path.partition("?")
        status = 200 if path == "/health" else self.server.status
        delay = self.server.delay
        if query.startswith("sleep="):
            with contextlib.suppress(ValueError):
                delay = min(10.0, float(query[6:]))
        if delay:
            time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _NamedServer(ThreadingHTTPServer):
    daemon_threads = True
    name = ""
    hits = 0
    status = 200
    delay = 0.0


class _NamedServer6(_NamedServer):
    address_family = socket.AF_INET6


class NamedBackend:
    """A tiny HTTP server that answers its own name; ``hits`` counts requests. ``host``:
    ``127.0.0.1`` or ``::1``."""

    def __init__(self, name: str, host: str = HOST) -> None:
        self.name = name
        self.port = free_port()
        server = _NamedServer6 if ":" in host else _NamedServer
        self._server = server((host, self.port), _Handler)
        self._server.name = name
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def hits(self) -> int:
        return self._server.hits

    @property
    def status(self) -> int:
        return self._server.status

    @status.setter
    def status(self, code: int) -> None:
        self._server.status = code

    @property
    def delay(self) -> float:
        return self._server.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._server.delay = seconds

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def http_backends() -> Iterator[Callable[..., list[NamedBackend]]]:
    started: list[NamedBackend] = []

    def make(*names: str) -> list[NamedBackend]:
        new = [NamedBackend(n) for n in names]
        started.extend(new)
        return new

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Callable[..., HAProxySupervisor]]:
    """Start supervised HAProxies from config text; all stopped (by pid) at teardown."""
    started: list[HAProxySupervisor] = []
    counter = itertools.count(1)

    def make(config_text: str, **kwargs: Any) -> HAProxySupervisor:
        # UNIX socket paths are limited to 107 bytes: keep the state dir short.
        base = tmp_path / f"h{next(counter)}"
        state_dir = base / "run"
        state_dir.mkdir(parents=True)
        config = base / "haproxy.cfg"
        config.write_text(config_text.replace("{state_dir}", str(state_dir)))
        sup = HAProxySupervisor(config, state_dir, HAPROXY_BIN, **kwargs)
        started.append(sup)
        sup.start()
        return sup

    yield make
    for sup in started:
        with contextlib.suppress(Exception):
            sup.stop()
