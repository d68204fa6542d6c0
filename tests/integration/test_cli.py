"""`discovery services` and `make demo`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from discovery.model import Instance
from discovery.registry import open_registry
from tests.harness.agent import REPO_ROOT
from tests.harness.util import free_port

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout, check=False)


def inst(service: str, n: int, **kw: object) -> Instance:
    return Instance(service=service, id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=8000 + n, **kw)  # type: ignore[arg-type]


def test_services_table_and_json(registry_url):
    reg = open_registry(registry_url)
    try:
        reg.register(inst("web", 1, tags=("blue",)))
        reg.register(inst("web", 2))
        reg.register(inst("db", 3))
        table = cli("services", "--registry", registry_url)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "INSTANCES", "ADDRESS", "NODE", "STATE", "TAGS",
                                    "AGE"]
        assert any(line.startswith("web") and "2 up / 0 draining" in line for line in lines)
        assert "127.0.0.1:8003" in table.stdout
        out = cli("services", "web", "--registry", registry_url, "-o", "json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert [d["port"] for d in data] == [8001, 8002]
        for field in ("service", "id", "node", "address", "port", "tags", "weight", "meta",
                      "state"):
            assert field in data[0]
        assert data[0]["tags"] == ["blue"]
    finally:
        reg.close(revoke=True)


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:{port}/x", "zk://127.0.0.1:{port}/x"])
def test_unreachable_registry_is_one_line_exit_2(url):
    t0 = time.monotonic()
    out = cli("services", "--registry", url.format(port=free_port()), "--timeout", "2")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("discovery: ")
    took = time.monotonic() - t0
    assert took < 2 + 3, f"{took:.1f} s with --timeout 2 (and the interpreter's start)"


@pytest.mark.parametrize("url", ["http://x", "etcd://host:99999/x", "etcd:///x", ""])
def test_bad_registry_url_is_one_line_exit_2(url):
    out = cli("services", "--registry", url)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_make_demo_converges(docker_client, example_image):
    out = subprocess.run([sys.executable, "scripts/demo.py", "--once"], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=180, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 up / 0 draining" in out.stdout
    table = out.stdout.split("discovery services --registry")[1].split("billing is not listed")[0]
    assert "web" in table and "billing" not in table
    assert "; 0 failed; HAProxy reloads: 0" in out.stdout  # traffic moved on without errors


def test_show_lists_every_field_and_exits_1_when_empty(registry_url):
    reg = open_registry(registry_url)
    try:
        reg.register(inst("web", 1, tags=("blue",), meta={"version": "1.2"}))
        out = cli("show", "web", "--registry", registry_url)
        assert out.returncode == 0, out.stderr
        assert "h1:000000000001:80" in out.stdout and "version=1.2" in out.stdout
        data = json.loads(cli("show", "web", "--registry", registry_url, "-o", "json").stdout)
        assert data[0]["meta"] == {"version": "1.2"}
        assert cli("show", "nothing", "--registry", registry_url).returncode == 1
    finally:
        reg.close(revoke=True)


def test_check_config(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[agent]\nttl = 5\n\n[services.web]\nport = 18000\n")
    out = cli("check-config", "--config", str(good), "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["services"] == ["web"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[services.web]\nport = 18000\nserver_options = "maxconn 1\\n bind :1"\n')
    out = cli("check-config", "--config", str(bad))
    assert out.returncode == 2
    assert "services.web.server_options" in out.stderr and len(out.stderr.splitlines()) == 1
    broken = tmp_path / "broken.j2"
    broken.write_text("global\n{% if %}\n")
    out = cli("check-config", "--service", "web:18000", "--template", str(broken))
    assert out.returncode == 2 and "broken.j2" in out.stderr
