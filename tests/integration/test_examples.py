"""The examples in examples/ do what their READMEs say: custom-template/ and zookeeper/."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.url import RegistryURL
from tests.harness.agent import REPO_ROOT
from tests.harness.servers import ServerCluster, unique_prefix
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration

TEMPLATE = REPO_ROOT / "examples" / "custom-template" / "haproxy.cfg.j2"
ZK = REPO_ROOT / "examples" / "zookeeper"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout, check=False)


class _Echo(BaseHTTPRequestHandler):
    """Answers its server's name; the X-Forwarded-For it got goes into a header."""

    server: _EchoServer

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Echo-Forwarded-For", self.headers.get("X-Forwarded-For", "-"))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    name = ""


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    server.name = f"echo-{uuid.uuid4().hex[:6]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server.name, server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def get(port: int, path: str = "/") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def instance(service: str, port: int, n: int = 1) -> Instance:
    return Instance(service=service, id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=port)


# -- examples/custom-template ---------------------------------------------------------------


def test_custom_template_passes_check_config() -> None:
    out = cli("check-config", "--service", "web:18000", "--template", str(TEMPLATE))
    assert out.returncode == 0, out.stderr
    assert "haproxy -c passed" in out.stdout


def test_custom_template_with_tcp_hashing_and_stats(tmp_path: Path) -> None:
    config = tmp_path / "discovery.toml"
    config.write_text(
        "[watcher]\nstats_port = 18404\n\n"
        "[services.web]\nport = 18000\n\n"
        "[services.db]\nport = 18001\nmode = \"tcp\"\nbalance = \"source\"\n\n"
        "[services.api]\nport = 18002\nbalance = \"uri\"\ncheck = true\nhttpchk = \"/health\"\n")
    out = cli("check-config", "--config", str(config), "--template", str(TEMPLATE), "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["services"] == ["api", "db", "web"]


def test_custom_template_routes_with_its_additions(etcd_single: ServerCluster, echo,
                                                   start_watcher) -> None:
    url = etcd_single.url(unique_prefix())
    name, backend_port = echo
    listen = free_port()
    watcher = start_watcher(url, {"web": listen}, "--template", str(TEMPLATE))
    config = watcher.config_text()
    assert "X-Served-By" in config and "monitor-uri /haproxy-health" in config
    reg = open_registry(url)
    try:
        reg.register(instance("web", backend_port))
        _status, headers, body = wait_for(
            lambda: (answer := get(listen)) and answer[0] == 200 and answer, 20,
            message="web routed through the custom template")
        assert body == name
        host = socket.gethostname()
        assert re.fullmatch(rf"{re.escape(host)}(\.[^/]*)?/web/s[0-9]+",
                            headers["x-served-by"]), headers
        assert headers["x-echo-forwarded-for"] == "127.0.0.1"   # option forwardfor
        assert get(listen, "/haproxy-health")[0] == 200          # monitor-uri, from HAProxy
    finally:
        reg.close(revoke=True)


def test_a_broken_copy_is_refused_naming_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg.j2"
    text = TEMPLATE.read_text().replace("{% for slot in svc.slots %}",
                                        "{% for slot in svc.slotz %}")
    assert text != TEMPLATE.read_text(), "the line to break is not in the template any more"
    broken.write_text(text)
    out = cli("check-config", "--service", "web:18000", "--template", str(broken))
    assert out.returncode == 2
    assert "haproxy.cfg.j2" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- examples/zookeeper ---------------------------------------------------------------------


def _example_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (ZK / "discovery.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_zookeeper_config_passes_check_config() -> None:
    out = cli("check-config", "--config", str(ZK / "discovery.toml"), "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["services"] == ["db", "web"]


def test_zookeeper_env_file_names_three_members_and_a_digest_user() -> None:
    env = _example_env()
    url = RegistryURL.parse(env["DISCOVERY_REGISTRY"])
    assert url.scheme == "zk" and len(url.hosts) == 3
    assert url.user == "discovery" and url.password is None
    assert url.password_file == "/etc/discovery/zk.password"
    zoo = (ZK / "zoo.cfg").read_text()
    members = re.findall(r"^server\.(\d)=([^:\s]+):2888:3888$", zoo, re.M)
    assert [m[0] for m in members] == ["1", "2", "3"]
    assert sorted(h for h, _ in url.hosts) == sorted(h for _, h in members)
    toml = tomllib.loads((ZK / "discovery.toml").read_text())
    assert "registry" not in toml["agent"]  # it is in discovery.env, for every command


def test_zookeeper_example_on_a_real_ensemble(zk_ensemble3: ServerCluster, echo, tmp_path: Path,
                                              start_watcher) -> None:
    """The example's URL form (user + password file, three members) and its TOML, with the
    hosts and the password file swapped for the test ensemble's."""
    zk_ensemble3.ensure_running()
    password = tmp_path / "zk.password"
    password.write_text("s3cret-for-the-test\n")
    password.chmod(0o600)
    example = RegistryURL.parse(_example_env()["DISCOVERY_REGISTRY"])
    hosts = ",".join(f"{h}:{p}" for h, p in (zk_ensemble3.address(i) for i in range(3)))
    prefix = unique_prefix()
    url = f"zk://{example.user}@{hosts}{prefix}?password_file={password}"
    anonymous = f"zk://{hosts}{prefix}"

    name, backend_port = echo
    web, db = free_port(), free_port()
    # the example's [services.*], on free ports (--service overrides the port of a table)
    watcher = start_watcher(anonymous, {"web": web, "db": db},
                            "--config", str(ZK / "discovery.toml"))
    assert "balance leastconn" in watcher.config_text()  # [services.db] from the file

    agent_side = open_registry(url, ttl=10.0)
    try:
        agent_side.register(instance("web", backend_port))
        wait_for(lambda: get(web)[2] == name, 20, message="web routed from the ensemble")
        listed = cli("services", "web", "--registry", anonymous, "-o", "json")
        assert listed.returncode == 0, listed.stderr   # world-readable: no password needed
        assert [i["port"] for i in json.loads(listed.stdout)] == [backend_port]
        intruder = open_registry(anonymous)
        try:
            with pytest.raises(RegistryError, match="NoAuth"):
                intruder.deregister("web", instance("web", backend_port).id)
        finally:
            intruder.close(revoke=False)
    finally:
        agent_side.close(revoke=True)


# -- configuration shown in the docs --------------------------------------------------------


# The Markdown files with discovery TOML in them. test_every_toml_block_is_tested keeps this
# list complete; a document listed here with no block fails (a loop over nothing proves nothing).
TOML_DOCS = ["README.md", "docs/migration.md", "docs/traffic.md"]
NOT_DISCOVERY_TOML = {"docs/checks.md"}  # a plugin's pyproject.toml, not a discovery config


def _toml_blocks(doc: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", (REPO_ROOT / doc).read_text(), re.S)


def test_every_toml_block_is_tested() -> None:
    docs = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md"),
            *(REPO_ROOT / "examples").rglob("*.md")]
    with_toml = {str(p.relative_to(REPO_ROOT)) for p in docs if "```toml" in p.read_text()}
    assert with_toml, "no ```toml block found in any document: the pattern is wrong"
    assert with_toml - NOT_DISCOVERY_TOML == set(TOML_DOCS)


@pytest.mark.parametrize("doc", TOML_DOCS)
def test_toml_in_the_docs_passes_check_config(doc: str, tmp_path: Path) -> None:
    blocks = _toml_blocks(doc)
    assert blocks, f"{doc} has no ```toml block: drop it from TOML_DOCS"
    for n, block in enumerate(blocks):
        config = tmp_path / f"{n}.toml"
        # a template path shown in a doc is a placeholder: the example template stands in
        config.write_text(block.replace("/etc/discovery/haproxy.cfg.j2", str(TEMPLATE)))
        out = cli("check-config", "--config", str(config))
        assert out.returncode == 0, f"{doc}, TOML block {n + 1}: {out.stderr}"
