"""The HTTP API's guards on real processes: the write token (`discovery agent --http`,
`discovery maint`), the DNS-rebinding Host check, and blocking-query slots that are freed when
clients hang up and capped per client (`discovery watch --http`, no HAProxy)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from discovery.lookup.http import MAX_BLOCKING_PER_CLIENT, HttpApi
from discovery.model.catalog import Catalog
from discovery.registry.base import Change
from tests.harness.agent import (
    REPO_ROOT,
    DiscoveryProcess,
    registry_instances,
    wait_registered,
)
from tests.harness.dockerd import ContainerFactory
from tests.harness.util import free_port, wait_for
from tests.integration.test_http import catalog, get, get_json, inst

__all__ = ["catalog"]  # the fixture, shared with test_http.py

pytestmark = pytest.mark.integration

Reply = tuple[int, dict[str, str], Any]
Procs = list[DiscoveryProcess]


def call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         source: str = "127.0.0.1", timeout: float = 10) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(body)
    finally:
        conn.close()


def token_file(tmp_path: Path, token: str | None = None) -> tuple[Path, str]:
    token = token or secrets.token_hex(32)
    path = tmp_path / f"token-{uuid.uuid4().hex[:6]}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True,
                          text=True, timeout=30, check=False, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


def start(agents: list[DiscoveryProcess], tmp_path: Path, *args: str) -> tuple[int, str]:
    """Start ``discovery ARGS --http 127.0.0.1:PORT``; wait for its API; (port, node)."""
    port, node = free_port(), f"n{uuid.uuid4().hex[:8]}"
    extra = ["--node", node] if args[0] == "agent" else []
    proc = DiscoveryProcess([*args, *extra, "--http", f"127.0.0.1:{port}"], args[0],
                            tmp_path).start()
    agents.append(proc)
    wait_for(lambda: not proc.alive or call(port, "GET", "/v1/health")[0] in (200, 503), 30,
             message=f"the HTTP API of {args[0]}")  # (exited: at once, not 30 s of refusals)
    assert proc.alive, proc.log()[-3000:]
    return port, node


MAINT = "/v1/agent/maint?enable=true"


def test_writes_are_refused_without_a_configured_token(etcd_url: str, agents: Procs,
                                                       tmp_path: Path) -> None:
    port, _ = start(agents, tmp_path, "agent", "--registry", etcd_url)
    status, _, data = call(port, "PUT", MAINT, {"X-Discovery-Token": "x" * 32})
    assert status == 403 and "--http-token-file" in data["error"], data
    assert call(port, "GET", "/v1/health")[0] in (200, 503)  # reads stay open
    path, _ = token_file(tmp_path)
    out = cli("maint", "--node", "x", "on", "--agent", f"127.0.0.1:{port}",
              "--http-token-file", str(path))
    assert out.returncode == 2 and "writes are disabled" in out.stderr, out.stderr


def test_token_guards_writes_and_maint_sends_it(
        etcd_url: str, agents: Procs, containers: ContainerFactory, tmp_path: Path) -> None:
    path, token = token_file(tmp_path)
    port, node = start(agents, tmp_path, "agent", "--registry", etcd_url,
                       "--http-token-file", str(path))
    status, headers, data = call(port, "PUT", MAINT)
    assert status == 401 and "X-Discovery-Token" in data["error"]
    assert headers["www-authenticate"].startswith("Bearer")
    for wrong in ({"X-Discovery-Token": token[:-1] + "x"},
                  {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"}):
        assert call(port, "PUT", MAINT, wrong)[0] == 401, wrong
    assert call(port, "PUT", MAINT, {"X-Discovery-Token": token})[:3:2] == (
        200, {"maintenance": True, "instances": [], "held": []})
    assert call(port, "PUT", MAINT.replace("true", "false"),
                {"Authorization": f"Bearer {token}"})[0] == 200

    web = f"a{uuid.uuid4().hex[:8]}"
    app_port = free_port()
    containers(name=f"{web}-1", port=app_port, labels={
        "discovery.service": web, "discovery.port": str(app_port),
        "discovery.check.interval": "200ms"})
    victim = wait_registered(etcd_url, web)[0]
    assert victim.node == node
    no_token = cli("maint", victim.id, "on", "--agent", f"127.0.0.1:{port}")
    assert no_token.returncode == 2 and "token" in no_token.stderr, no_token.stderr
    out = cli("maint", victim.id, "on", "--agent", f"127.0.0.1:{port}",
              "--http-token-file", str(path))
    assert out.returncode == 0 and victim.id in out.stdout, out.stdout + out.stderr
    wait_for(lambda: registry_instances(etcd_url)[victim.key].state.value == "draining", 10,
             message="the instance draining in the registry")
    back = cli("maint", victim.id, "off", "--agent", f"127.0.0.1:{port}",
               env={"DISCOVERY_HTTP_TOKEN_FILE": str(path)})
    assert back.returncode == 0, back.stderr
    wait_for(lambda: registry_instances(etcd_url)[victim.key].state.value == "up", 10,
             message="the instance up again")


def test_foreign_host_is_refused_reads_and_writes(etcd_url: str, agents: Procs,
                                                  tmp_path: Path) -> None:
    path, token = token_file(tmp_path)
    port, _ = start(agents, tmp_path, "agent", "--registry", etcd_url,
                    "--http-token-file", str(path))
    evil = {"Host": "evil.example.com"}
    status, _, data = call(port, "GET", "/v1/health", evil)
    assert status == 421 and "rebinding" in data["error"]
    assert call(port, "PUT", MAINT, {**evil, "X-Discovery-Token": token})[0] == 421
    assert call(port, "GET", "/v1/health", {"Host": f"localhost:{port}"})[0] in (200, 503)


@pytest.mark.parametrize("command", ["agent", "up"])
def test_unreadable_token_file_is_one_line_exit_2(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    out = cli(command, "--http-token-file", str(missing))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--http-token-file" in out.stderr and "cannot read" in out.stderr
    short, _ = token_file(tmp_path, "short")
    out = cli(command, env={"DISCOVERY_HTTP_TOKEN_FILE": str(short)})
    assert out.returncode == 2 and "fewer than 16" in out.stderr, out.stderr


def blocking(port: int, index: int, source: str = "127.0.0.1") -> socket.socket:
    """A blocking query sent and never read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(f"GET /v1/services?index={index}&wait=5m HTTP/1.1\r\n"
                 "Host: 127.0.0.1\r\n\r\n".encode())
    return sock


def probe(port: int, index: int, source: str = "127.0.0.1") -> int:
    return call(port, "GET", f"/v1/services?index={index}&wait=100ms", source=source)[0]


def test_abandoned_blocking_queries_free_their_slots(etcd_url: str, agents: Procs,
                                                     tmp_path: Path) -> None:
    port, _ = start(agents, tmp_path, "watch", "--registry", etcd_url,
                    "--state-dir", str(tmp_path))
    # the API answers 503 until the first catalog is loaded (start() waits for the API only)
    loaded = wait_for(lambda: (r := call(port, "GET", "/v1/services"))[0] == 200 and r, 20,
                      message="the first catalog")
    index = int(loaded[1]["x-discovery-index"])
    per_client = MAX_BLOCKING_PER_CLIENT  # HttpApi's default
    with contextlib.ExitStack() as stack:
        for _ in range(per_client + 2):
            stack.enter_context(blocking(port, index))
        wait_for(lambda: probe(port, index) == 429, 20, message="this client's slots full")
        status, _, data = call(port, "GET", f"/v1/services?index={index}&wait=1s")
        assert status == 429 and "127.0.0.1" in data["error"]
        assert probe(port, index, source="127.0.0.2") == 200  # other clients still served
    # every socket closed: their slots come back within a wait slice, not after 5 minutes
    wait_for(lambda: probe(port, index) == 200, 5, message="slots freed after hang-up")


def test_unicode_digits_are_400_on_a_real_process(etcd_url: str, agents: Procs,
                                                  tmp_path: Path) -> None:
    port, _ = start(agents, tmp_path, "watch", "--registry", etcd_url,
                    "--state-dir", str(tmp_path))
    for query, param in (("index=%C2%B2", "index"), ("index=1&wait=%EF%BC%95s", "wait")):
        status, _, data = call(port, "GET", f"/v1/services?{query}")
        assert status == 400 and data["param"] == param, data


# ---- the same guards in process, with small caps -----------------------------------------

def hang_up_blocked(api: HttpApi, index: int, count: int, source: str = "127.0.0.1") -> None:
    """Send ``count`` blocking queries, wait until they block, then close every socket."""
    socks = [socket.create_connection(("127.0.0.1", api.port), timeout=5,
                                      source_address=(source, 0)) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(f"GET /v1/services?index={index}&wait=5m HTTP/1.1\r\n"
                         "Host: 127.0.0.1\r\n\r\n".encode())
        wait_for(lambda: api.blocked == count, 5, 0.01, f"{count} blocked queries")
    finally:
        for sock in socks:
            sock.close()


def test_hung_up_blocking_queries_free_their_slots(catalog: Catalog) -> None:
    server = HttpApi(catalog, dict, None, port=0, max_blocking=3, max_blocking_per_client=3)
    server.start()
    try:
        hang_up_blocked(server, catalog.index, 3)
        started = time.monotonic()
        wait_for(lambda: server.blocked == 0, 3, 0.02, "the slots given back")
        assert time.monotonic() - started < 1.5  # a wait slice, not the 5 minutes asked for
        assert get(server, f"/v1/services?index={catalog.index}&wait=100ms")[0] == 200
    finally:
        server.stop()


def test_blocking_queries_are_capped_per_client(catalog: Catalog) -> None:
    server = HttpApi(catalog, dict, None, port=0, max_blocking=4, max_blocking_per_client=2)
    server.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            held = [pool.submit(get, server, f"/v1/services?index={catalog.index}&wait=10s")
                    for _ in range(2)]
            wait_for(lambda: server.blocked == 2, 5, 0.01, "two blocked queries")
            status, headers, data = get_json(server, f"/v1/services?index={catalog.index}")
            assert status == 429 and "127.0.0.1" in data["error"] and headers["retry-after"]
            assert server.slots.of("127.0.0.1") == 2
            other = get(server, f"/v1/services?index={catalog.index}&wait=100ms",
                        source="127.0.0.2")
            assert other[0] == 200  # another client still has room
            new = inst("db", 8)
            catalog.apply(Change("put", new.key, new))
            assert [f.result(timeout=5)[0] for f in held] == [200, 200]
    finally:
        server.stop()


def test_writes_need_the_token(catalog: Catalog) -> None:
    calls: list[tuple[str | None, bool]] = []

    def maint(instance: str | None, on: bool) -> tuple[list[str], list[str]]:
        calls.append((instance, on))
        return [], []

    open_api = HttpApi(None, dict, None, port=0, maint=maint).start()
    token = "t" * 40
    guarded = HttpApi(None, dict, None, port=0, maint=maint, token=token).start()
    try:
        path = "/v1/agent/maint?enable=true"
        status, _, data = get_json(open_api, path, method="PUT",
                                   headers={"X-Discovery-Token": token})
        assert status == 403 and "--http-token-file" in data["error"]
        assert get(guarded, path, method="PUT")[0] == 401
        assert get(guarded, path, method="PUT", headers={"X-Discovery-Token": "t" * 39})[0] == 401
        assert get(guarded, "/v1/health", method="PUT",
                   headers={"X-Discovery-Token": "nope"})[0] == 401  # before any routing
        assert calls == []
        assert get(guarded, path, method="PUT", headers={"X-Discovery-Token": token})[0] == 200
        assert get(guarded, path, method="PUT",
                   headers={"Authorization": f"bearer {token}"})[0] == 200
        assert calls == [(None, True), (None, True)]
        assert get(guarded, path, method="PUT", headers={"X-Discovery-Token": token,
                                                         "Host": "evil.example.com"})[0] == 421
    finally:
        open_api.stop()
        guarded.stop()
