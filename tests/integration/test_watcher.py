"""The watcher end to end: real etcd / ZooKeeper, real HAProxy 2.6, real dockerd and agent."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from discovery.model import Instance
from discovery.registry import open_registry
from discovery.registry.url import RegistryURL
from tests.harness.agent import REPO_ROOT
from tests.harness.haproxy import http_get
from tests.harness.raw_clients import raw_put
from tests.harness.tcp_proxy import TcpProxy
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread

pytestmark = pytest.mark.integration
TEMPLATE = REPO_ROOT / "discovery" / "templates" / "haproxy.cfg.j2"


def inst(service: str, n: int, port: int) -> Instance:
    return Instance(service=service, id=f"h1:{n:012x}:80", node="h1", address="127.0.0.1",
                    port=port)


@pytest.fixture
def reg(registry_url):  # a registry client for writing instances directly
    client = open_registry(registry_url)
    yield client
    client.close(revoke=True)


def test_routes_healthy_instances_without_reloads(registry_url, containers, start_agent,
                                                  start_watcher):
    web = f"w{uuid.uuid4().hex[:8]}"
    listen, agent_http = free_port(), free_port()
    start_agent(registry_url, None, "--http", f"127.0.0.1:{agent_http}")
    watcher = start_watcher(registry_url, {web: listen})
    reloads = watcher.reload_count()
    p1, p2 = free_port(), free_port()
    labels = {"discovery.service": web, "discovery.check.interval": "200ms"}
    first = containers(name=f"{web}-1", port=p1, labels={**labels, "discovery.port": str(p1)})
    wait_for(lambda: spread(listen, 4)[f"{web}-1"] == 4, 20, message="web-1 served")
    second = containers(
        name=f"{web}-2", port=p2, labels={**labels, "discovery.port": str(p2)},
        env={"HEALTHY": "0"}, healthcheck={"test": ["CMD", "test", "-f", "/tmp/ok"],
                                           "interval": 200_000_000, "retries": 1})

    def held_back() -> bool:  # the agent knows web-2 and holds it: not healthy, not registered
        status, body = http_get(agent_http, "/v1/agent/checks")
        return status == 200 and any(
            c["service"] == web and second.id[:12] in c["id"] and not c["healthy"]
            and not c["registered"] for c in json.loads(body))

    wait_for(held_back, 20, message="the agent holds web-2 back (GET /v1/agent/checks)")
    early = spread(listen, 10)
    assert f"{web}-2" not in early, f"routed before healthy: {early}"
    second.exec_run(["touch", "/tmp/ok"])
    wait_for(lambda: set(spread(listen, 10)) == {f"{web}-1", f"{web}-2"}, 20,
             message="both instances served")
    first.stop(timeout=5)
    wait_for(lambda: set(spread(listen, 4)) == {f"{web}-2"}, 10, message="web-1 drained")
    after = spread(listen, 30)
    assert after == {f"{web}-2": 30}, f"every request must land, none on the stopped one: {after}"
    assert watcher.reload_count() == reloads, "membership changes must not reload HAProxy"
    assert "reloaded" not in watcher.log()


def test_new_service_causes_exactly_one_validated_reload(registry_url, reg, http_backends,
                                                         start_watcher, tmp_path):
    a, b = http_backends("a", "b")
    web_port, api_port = free_port(), free_port()
    conf = tmp_path / "watch.toml"
    conf.write_text(f"[services.web]\nport = {web_port}\n")
    reg.register(inst("web", 1, a.port))
    reg.register(inst("api", 2, b.port))
    watcher = start_watcher(registry_url, {}, "--config", str(conf))
    wait_for(lambda: spread(web_port, 2)["a"] == 2, 10, message="web served")
    before = watcher.reload_count()
    conf.write_text(f"[services.web]\nport = {web_port}\n\n[services.api]\nport = {api_port}\n")
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: spread(api_port, 2)["b"] == 2, 10, message="api served after SIGHUP")
    reg.register(inst("web", 3, b.port))  # membership after the reload: runtime only
    wait_for(lambda: "b" in spread(web_port, 6), 10, message="second web instance")
    assert watcher.reload_count() == before + 1
    assert f"bind 127.0.0.1:{api_port}" in watcher.config_text()


def test_registry_outage_keeps_routing(registry_url, registry_server, reg, http_backends,
                                       start_watcher):
    a, b, c = http_backends("a", "b", "c")
    parsed = RegistryURL.parse(registry_url)
    proxy = TcpProxy(parsed.hosts[0])
    try:
        listen = free_port()
        reg.register(inst("web", 1, a.port))
        reg.register(inst("web", 2, b.port))
        watcher = start_watcher(proxy.url(parsed.scheme, parsed.prefix), {"web": listen})
        wait_for(lambda: set(spread(listen, 8)) == {"a", "b"}, 10, message="a and b served")
        with proxy.blocked():
            wait_for(lambda: "connection lost" in watcher.log(), 20,
                     message="the watcher to notice the outage")
            assert set(spread(listen, 20)) == {"a", "b"}  # the last known catalog serves on
            reg.register(inst("web", 3, c.port))  # happens while the watcher cannot see
        wait_for(lambda: set(spread(listen, 12)) == {"a", "b", "c"}, 30,
                 message="resync after the outage")
        assert watcher.alive
    finally:
        proxy.close()


def test_broken_template_keeps_last_good_config(registry_url, reg, http_backends,
                                                start_watcher, tmp_path):
    a, b = http_backends("a", "b")
    template = tmp_path / "mine.cfg.j2"
    shutil.copy(TEMPLATE, template)
    conf = tmp_path / "watch.toml"
    web_port = free_port()
    conf.write_text(f"[services.web]\nport = {web_port}\n")
    reg.register(inst("web", 1, a.port))
    watcher = start_watcher(registry_url, {}, "--config", str(conf), "--template", str(template))
    wait_for(lambda: spread(web_port, 2)["a"] == 2, 10, message="web served")
    good = watcher.config_text()
    reloads = watcher.reload_count()
    template.write_text(template.read_text() + "\n{% for x in %}\n")  # a syntax error
    conf.write_text(f"[services.web]\nport = {web_port}\n\n[services.api]\nport = {free_port()}\n")
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: "mine.cfg.j2" in watcher.log() and "not reloaded" in watcher.log(), 10,
             message="a clear error naming the template")
    reg.register(inst("web", 2, b.port))  # membership still flows through the runtime API
    wait_for(lambda: set(spread(web_port, 8)) == {"a", "b"}, 10, message="b served")
    assert watcher.config_text() == good
    assert watcher.reload_count() == reloads
    assert watcher.alive


def test_sighup_after_a_template_edit_alone_renders_it(registry_url, reg, http_backends,
                                                      start_watcher, tmp_path):
    """Only the template changed (same TOML): SIGHUP renders it and reloads once."""
    (a,) = http_backends("a")
    template = tmp_path / "mine.cfg.j2"
    shutil.copy(TEMPLATE, template)
    web_port = free_port()
    reg.register(inst("web", 1, a.port))
    watcher = start_watcher(registry_url, {"web": web_port}, "--template", str(template))
    wait_for(lambda: spread(web_port, 2)["a"] == 2, 10, message="web served")
    reloads = watcher.reload_count()
    template.write_text(template.read_text() + "\n# edited by the operator\n")
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: "# edited by the operator" in watcher.config_text(), 10,
             message="the edited template rendered and installed")
    wait_for(lambda: watcher.reload_count() == reloads + 1, 10, message="one reload")
    assert spread(web_port, 4) == {"a": 4}


def test_template_haproxy_rejects_keeps_last_good_config(registry_url, reg, http_backends,
                                                         start_watcher, tmp_path):
    """The template renders (no Jinja error) but ``haproxy -c`` rejects the result, on a running
    watcher after SIGHUP: nothing installed, no reload, traffic and membership keep flowing,
    the error is logged with HAProxy's own words and counted in /metrics."""
    a, b = http_backends("a", "b")
    template = tmp_path / "mine.cfg.j2"
    shutil.copy(TEMPLATE, template)
    conf = tmp_path / "watch.toml"
    web_port, http_port = free_port(), free_port()
    conf.write_text(f"[services.web]\nport = {web_port}\n")
    reg.register(inst("web", 1, a.port))
    watcher = start_watcher(registry_url, {}, "--config", str(conf), "--template", str(template),
                            "--http", f"127.0.0.1:{http_port}")
    wait_for(lambda: spread(web_port, 2)["a"] == 2, 10, message="web served")
    assert render_errors(http_port) == 0
    good = watcher.config_text()
    reloads = watcher.reload_count()
    # Plain text to Jinja, so it renders; HAProxy refuses the algorithm.
    template.write_text(template.read_text()
                        + "\nbackend rejected_by_haproxy\n    balance no-such-algorithm\n")
    conf.write_text(f"[services.web]\nport = {web_port}\n\n[services.api]\nport = {free_port()}\n")
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: "HAProxy rejects the config" in watcher.log(), 10,
             message="HAProxy's refusal in the log")
    log = watcher.log()
    assert "SIGHUP: configuration re-read" in log  # accepted and rendered: not a template error
    assert "configuration not reloaded" not in log
    assert "config not applied, the last good one keeps serving" in log
    assert "balance only supports" in log, log[-2000:]  # HAProxy's own line, passed on
    wait_for(lambda: render_errors(http_port) >= 1, 10, message="discovery_render_errors_total")
    failures = 0
    for _ in range(20):  # traffic keeps flowing on the last good config, request after request
        failures += sum(n for body, n in spread(web_port, 2).items() if body != "a")
    assert failures == 0
    reg.register(inst("web", 2, b.port))  # membership still flows through the runtime API
    wait_for(lambda: set(spread(web_port, 8)) == {"a", "b"}, 10, message="b served")
    assert watcher.config_text() == good
    assert watcher.reload_count() == reloads
    assert render_errors(http_port) == 1  # counted once, not once per sync
    assert watcher.alive


def test_first_config_haproxy_rejects_starts_nothing_until_fixed(registry_url, reg, http_backends,
                                                                 start_watcher, tmp_path):
    """No HAProxy runs yet: the new one checks the config itself as it starts (no ``haproxy
    -c`` first). One it refuses is reported as ``haproxy -c`` reports it, counted once, and
    nothing listens; the fixed template (SIGHUP) starts it."""
    (a,) = http_backends("a")
    template = tmp_path / "mine.cfg.j2"
    template.write_text(TEMPLATE.read_text()
                        + "\nbackend rejected_by_haproxy\n    balance no-such-algorithm\n")
    web_port, http_port = free_port(), free_port()
    reg.register(inst("web", 1, a.port))
    watcher = start_watcher(registry_url, {"web": web_port}, "--template", str(template),
                            "--http", f"127.0.0.1:{http_port}", ready=False)
    wait_for(lambda: "HAProxy rejects the config" in watcher.log(), 15,
             message="HAProxy's refusal in the log")
    assert "balance only supports" in watcher.log()  # HAProxy's own line, passed on
    wait_for(lambda: render_errors(http_port) == 1, 10, message="discovery_render_errors_total")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", web_port), timeout=1).close()
    shutil.copy(TEMPLATE, template)
    watcher.signal(signal.SIGHUP)
    wait_for(lambda: spread(web_port, 2) == {"a": 2}, 15, message="web served once fixed")
    assert render_errors(http_port) == 1 and watcher.alive


def test_a_start_haproxy_fails_is_tried_again_until_it_serves(registry_url, reg, http_backends,
                                                              start_watcher):
    """The service's port is taken when the watcher starts (an old process still on it): the
    start fails, nothing changes in the catalog, and HAProxy starts on its own once the port is
    free (1 s, 2 s, 4 s ... apart), not at the next structural change."""
    (a,) = http_backends("a")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    web_port = squatter.getsockname()[1]
    reg.register(inst("web", 1, a.port))
    watcher = start_watcher(registry_url, {"web": web_port}, ready=False)
    wait_for(lambda: watcher.log().count("HAProxy not started") >= 2, 15,
             message="the failed start, tried again")
    assert "Address already in use" in watcher.log() and "runtime API" not in watcher.log()
    squatter.close()
    wait_for(lambda: spread(web_port, 2) == {"a": 2}, 15, message="web served once free")
    assert watcher.alive


def render_errors(http_port: int) -> float:
    status, text = http_get(http_port, "/metrics")
    assert status == 200, text
    [value] = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("discovery_render_errors_total ")]
    return value


def test_hostile_registry_entries_never_reach_the_config(registry_url, reg, http_backends,
                                                         start_watcher):
    (a,) = http_backends("a")
    listen = free_port()
    reg.register(inst("web", 1, a.port))
    prefix = RegistryURL.parse(registry_url)
    hostile = inst("web", 2, a.port).to_dict()
    hostile["address"] = "127.0.0.1:1\n    server evil 127.0.0.9:1"
    bad_key = prefix.key("web", "h1:000000000002:80")
    raw_put(registry_url, bad_key, json.dumps(hostile).encode())
    raw_put(registry_url, prefix.key("web", "h1:000000000003:80"), b"{not json")
    watcher = start_watcher(registry_url, {"web": listen})
    wait_for(lambda: spread(listen, 2)["a"] == 2, 10, message="the good instance served")
    assert "evil" not in watcher.config_text()
    assert bad_key in watcher.log()  # one warning naming the key
    assert "127.0.0.9" not in watcher.config_text()


def test_once_dry_run_prints_config_and_json_out(registry_url, reg, http_backends, tmp_path):
    (a,) = http_backends("a")
    reg.register(inst("web", 1, a.port))
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "discovery", "watch", "--registry", registry_url,
                          "--service", f"web:{port}", "--once", "--dry-run",
                          "--state-dir", str(tmp_path / "st")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert f"bind 127.0.0.1:{port}" in out.stdout
    assert f"127.0.0.1:{a.port}" in out.stdout
    assert not (tmp_path / "st").exists()  # --dry-run touches nothing
    json_path = tmp_path / "catalog.json"
    out = subprocess.run([sys.executable, "-m", "discovery", "watch", "--registry", registry_url,
                          "--once", "--json-out", str(json_path),
                          "--state-dir", str(tmp_path / "st")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(json_path.read_text())
    assert [i["port"] for i in data["services"]["web"]] == [a.port]


def test_a_running_watcher_keeps_its_json_out_current(registry_url, reg, http_backends,
                                                      start_watcher, tmp_path):
    """``--json-out`` is written by a thread of the watcher's own, each service's part kept
    (the loop only names what changed): a registration, another service and a deregistration
    show in the file, which is whole JSON whenever it is read; SIGTERM leaves the last one."""
    a, b = http_backends("a", "b")
    reg.register(inst("web", 1, a.port))
    json_path = tmp_path / "catalog.json"
    watcher = start_watcher(registry_url, {"web": free_port()}, "--json-out", str(json_path))

    def ports(service: str = "web") -> list[int] | None:
        try:
            data = json.loads(json_path.read_text())  # never half a file: renamed in place
        except FileNotFoundError:
            return None
        return sorted(i["port"] for i in data["services"].get(service, []))

    wait_for(lambda: ports() == [a.port], 15, message="the first catalog in the file")
    reg.register(inst("web", 2, b.port))
    wait_for(lambda: ports() == sorted([a.port, b.port]), 15, message="a registration")
    reg.register(inst("db", 3, 9003))
    wait_for(lambda: ports("db") == [9003], 15, message="another service")
    reg.deregister("web", inst("web", 1, a.port).id)
    wait_for(lambda: ports() == [b.port], 15, message="a deregistration")
    assert watcher.terminate() == 0
    assert ports() == [b.port] and ports("db") == [9003]


def test_once_unreachable_registry_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "discovery", "watch", "--registry",
                          f"etcd://127.0.0.1:{free_port()}/x", "--once", "--dry-run",
                          "--service", "web:1234"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith("discovery: ")




# A SIGKILLed watcher's HAProxy is adopted by the next watcher (never stopped, never two
# masters): tests/integration/test_watcher_handover.py.


def test_watch_drives_an_external_haproxy(registry_url, reg, http_backends, haproxy_factory,
                                          agents, tmp_path):
    """--haproxy-socket: an HAProxy someone else runs; we write its config and reload it through
    its master socket once, then membership goes through the runtime API; stopping the watcher
    leaves that HAProxy running."""
    from tests.harness.agent import DiscoveryProcess
    from tests.harness.haproxy import build_config

    a, b = http_backends("a", "b")
    reg.register(inst("web", 1, a.port))
    theirs = haproxy_factory(build_config(free_port(), {"be": 2}))
    before = theirs.reload_count()
    listen = free_port()
    watcher = DiscoveryProcess(
        ["watch", "--registry", registry_url, "--service", f"web:{listen}",
         "--haproxy-socket", str(theirs.admin_socket), "--master-socket",
         str(theirs.master_socket), "--haproxy-config", str(theirs.config),
         "--state-dir", str(tmp_path / "unused")], "watcher", tmp_path).start()
    agents.append(watcher)
    wait_for(lambda: spread(listen, 2)["a"] == 2, 20, message="routed by the external HAProxy")
    assert theirs.reload_count() == before + 1  # our config installed with one reload
    reg.register(inst("web", 2, b.port))
    wait_for(lambda: set(spread(listen, 8)) == {"a", "b"}, 10, message="b added at runtime")
    assert theirs.reload_count() == before + 1
    assert watcher.terminate() == 0
    assert theirs.running and set(spread(listen, 8)) == {"a", "b"}  # not ours to stop
