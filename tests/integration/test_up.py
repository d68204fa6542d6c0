"""`discovery up --dev`: agent, watcher, HAProxy, DNS and HTTP in one process, private etcd."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.harness.agent import REPO_ROOT, DiscoveryProcess
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread

pytestmark = pytest.mark.integration


def get_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
        return json.loads(resp.read())


def test_up_dev_registers_routes_and_answers(containers, agents, tmp_path: Path):
    web = f"u{uuid.uuid4().hex[:8]}"
    listen, dns_port, http_port = free_port(), free_port(), free_port()
    proc = DiscoveryProcess(["up", "--dev", "--service", f"{web}:{listen}",
                             "--dns", f"127.0.0.1:{dns_port}", "--http", f"127.0.0.1:{http_port}",
                             "--node", "devnode"], "up", tmp_path).start()
    agents.append(proc)
    wait_for(lambda: get_json(http_port, "/v1/health"), 30, message="the HTTP API")
    port = free_port()
    containers(name=f"{web}-1", port=port, labels={
        "discovery.service": web, "discovery.port": str(port), "discovery.tags": "blue",
        "discovery.check.interval": "200ms"})
    found = wait_for(lambda: get_json(http_port, f"/v1/services/{web}"), 20,
                     message="the instance in the HTTP API")
    assert found[0]["port"] == port and found[0]["node"] == "devnode"  # type: ignore[index]
    wait_for(lambda: spread(listen, 2)[f"{web}-1"] == 2, 20, message="routed through HAProxy")
    dig = subprocess.run(["dig", "+short", "-p", str(dns_port), "@127.0.0.1",
                          f"blue.{web}.service.discovery", "A"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert dig.stdout.split() == ["127.0.0.1"], dig.stdout + dig.stderr
    srv = subprocess.run(["dig", "+short", "-p", str(dns_port), "@127.0.0.1",
                          f"_{web}._tcp.service.discovery", "SRV"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert f" {port} " in srv.stdout, srv.stdout
    health = get_json(http_port, "/v1/health")
    assert health["healthy"] is True, health  # type: ignore[index]
    url = health["components"]["registry"]["url"]  # type: ignore[index]
    shown = subprocess.run([sys.executable, "-m", "discovery", "show", web, "--registry", url,
                            "--agent", f"127.0.0.1:{http_port}", "-o", "json"],
                           capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT)
    assert shown.returncode == 0, shown.stderr
    check = json.loads(shown.stdout)[0]["check"]
    assert (check["type"], check["healthy"], check["registered"]) == ("tcp", True, True)
    assert "127.0.0.1" in check["output"] and check["since"] > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=3) as resp:
        metrics = resp.read().decode()
    # at least ours: the agent registers every labelled container on this dockerd
    assert re.search(r"^discovery_registrations_total [1-9][0-9]*\.0$", metrics, re.M), \
        metrics[:2000]
    assert re.search(r"^discovery_propagation_seconds_count [1-9]", metrics, re.M)
    etcd_dirs = re.findall(r"data in (\S+discovery-dev-etcd-\S+)\)", proc.log())
    assert etcd_dirs, proc.log()[-2000:]
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not Path(etcd_dirs[0]).exists(), "the private etcd's data must be removed"
    assert "everything stopped" in proc.log()


def test_up_without_registry_or_dev_is_one_clear_error(tmp_path: Path):
    proc = DiscoveryProcess(["up"], "up", tmp_path).start()
    assert proc.wait(timeout=30) == 2
    assert "discovery: no registry" in proc.log()


def test_up_exits_1_naming_a_component_that_died(tmp_path: Path):
    """A component of ``up`` that dies takes the process down with exit status 1, so that a
    supervisor's Restart=on-failure runs (it was 0). The agent is made to die in its loop in
    the real process; the watcher, still waiting for its registry, is stopped with it."""
    boom = ("import sys, discovery.agent.core as core\n"
            "def jittered(seconds): raise RuntimeError('the agent broke')\n"
            "core.jittered = jittered\n"
            "from discovery.cli.app import main\n"
            "sys.argv[0] = 'discovery'\n"
            "main()\n")
    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-c", boom, "up", "--registry", f"etcd://127.0.0.1:{free_port()}/p",
         "--dns", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
         "--state-dir", str(state), "--docker", f"unix://{tmp_path}/no-dockerd.sock"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: the agent broke" in proc.stderr
    assert "agent failed: stopping" in proc.stderr
    assert proc.stderr.endswith("discovery: agent failed (see the log above)\n")
    assert "up: everything stopped" in proc.stderr  # the rest stopped in order first
    # like SIGUSR2, not SIGTERM: what is registered stays for the restart to adopt
    assert "agent stopped (registrations left)" in proc.stderr


def test_up_started_before_dockerd_waits_for_it(tmp_path: Path):
    """dockerd not (yet) there: ``up`` runs and says so in /v1/health, retrying (it was a
    traceback, exit 1, and ``--dev``'s private etcd left running); SIGTERM still exits 0 and
    removes that etcd."""
    http_port = free_port()
    proc = DiscoveryProcess(["up", "--dev", "--docker", f"unix://{tmp_path}/no-dockerd.sock",
                             "--dns", f"127.0.0.1:{free_port()}", "--http",
                             f"127.0.0.1:{http_port}"], "up", tmp_path).start()

    def docker_down() -> bool:
        try:
            get_json(http_port, "/v1/health")
        except urllib.error.HTTPError as exc:  # 503: a component down
            components = json.loads(exc.read())["components"]
            return components["agent_docker"]["ok"] is False and components["agent_registry"]["ok"]
        return False

    wait_for(docker_down, 30, message="up serving /v1/health, Docker down")
    # the health component turns before the retry's log line is written: wait for that too
    wait_for(lambda: "docker: reconnecting" in proc.log(), 10, message="docker: reconnecting")
    assert "Traceback" not in proc.log()
    etcd_dirs = re.findall(r"data in (\S+discovery-dev-etcd-\S+)\)", proc.log())
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert etcd_dirs and not Path(etcd_dirs[0]).exists()


def test_a_killed_up_dev_takes_its_private_etcd_with_it(tmp_path: Path):
    """SIGKILL leaves ``up`` no time to stop its etcd: the kernel does (it was left running,
    re-parented to init, with its data)."""
    http_port = free_port()
    proc = DiscoveryProcess(["up", "--dev", "--dns", "off", "--http", f"127.0.0.1:{http_port}",
                             "--state-dir", str(tmp_path / "state"), "--docker",
                             f"unix://{tmp_path}/no-dockerd.sock"], "up", tmp_path).start()
    data = wait_for(lambda: re.findall(r"data in (\S+discovery-dev-etcd-\S+)\)", proc.log()),
                    30, message="the private etcd")[0]

    def etcd_pids() -> list[int]:  # found by its data dir, ours alone
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"etcd") and f"{data}/data".encode() in argv:
                pids.append(int(cmdline.parent.name))
        return pids

    assert len(etcd_pids()) == 1
    proc.signal(signal.SIGKILL)
    proc.wait(timeout=10)
    try:
        wait_for(lambda: not etcd_pids(), 5, message="the private etcd gone with its parent")
    finally:
        for pid in etcd_pids():  # failed: stopped by its own pid, not left behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


def test_maint_drains_without_stopping(containers, agents, tmp_path: Path):
    web = f"m{uuid.uuid4().hex[:8]}"
    listen, dns_port, http_port = free_port(), free_port(), free_port()
    token = tmp_path / "http-token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    proc = DiscoveryProcess(["up", "--dev", "--service", f"{web}:{listen}",
                             "--dns", f"127.0.0.1:{dns_port}", "--http", f"127.0.0.1:{http_port}",
                             "--http-token-file", str(token)], "up", tmp_path).start()
    agents.append(proc)
    wait_for(lambda: get_json(http_port, "/v1/health"), 30, message="the HTTP API")
    for n in (1, 2):
        containers.instance(f"{web}-{n}", web)
    wait_for(lambda: set(spread(listen, 8)) == {f"{web}-1", f"{web}-2"}, 30,
             message="both routed")
    found = get_json(http_port, f"/v1/services/{web}")
    victim = next(i for i in found if i["container_name"] == f"{web}-1")  # type: ignore[union-attr]

    def maint(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "discovery", "maint", *args,
                               "--agent", f"127.0.0.1:{http_port}",
                               "--http-token-file", str(token)], capture_output=True,
                              text=True, timeout=30, check=False, cwd=REPO_ROOT)

    out = maint(victim["id"], "on")
    assert out.returncode == 0 and victim["id"] in out.stdout, out.stdout + out.stderr
    wait_for(lambda: set(spread(listen, 8)) == {f"{web}-2"}, 10, message="drained in HAProxy")
    states = {i["container_name"]: i["state"] for i in get_json(http_port, f"/v1/services/{web}")}
    assert states == {f"{web}-1": "draining", f"{web}-2": "up"}
    dig = subprocess.run(["dig", "+short", "-p", str(dns_port), "@127.0.0.1",
                          f"_{web}._tcp.service.discovery", "SRV"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert len(dig.stdout.strip().splitlines()) == 1 and str(victim["port"]) not in dig.stdout
    assert maint(victim["id"], "off").returncode == 0
    wait_for(lambda: set(spread(listen, 8)) == {f"{web}-1", f"{web}-2"}, 10, message="back")
    bad = maint("nosuch:000000000000:1", "on")
    assert bad.returncode == 2 and "not on this node" in bad.stderr


def test_up_rereads_its_config_on_sighup_its_flags_winning(containers, agents, etcd_url: str,
                                                          tmp_path: Path):
    """The registry, the agent's zone and the routed listener come from the file, the node
    from the flag over the file's; SIGHUP applies a new zone and listener, a broken file
    changes nothing, and SIGTERM still ends it cleanly."""
    web = f"h{uuid.uuid4().hex[:8]}"
    first, second, http_port = free_port(), free_port(), free_port()
    config = tmp_path / "up.toml"

    def write(zone: str, listen: int) -> None:
        config.write_text(f'[agent]\nregistry = "{etcd_url}"\nnode = "filenode"\n'
                          f'zone = "{zone}"\n[services.{web}]\nport = {listen}\n')

    write("zone-a", first)
    proc = DiscoveryProcess(["up", "--config", str(config), "--node", "flagnode", "--dns", "off",
                             "--http", f"127.0.0.1:{http_port}", "--state-dir",
                             str(tmp_path / "state")], "up", tmp_path).start()
    agents.append(proc)
    wait_for(lambda: get_json(http_port, "/v1/health"), 30, message="the HTTP API")
    containers.instance(f"{web}-1", web)

    def record() -> dict | None:
        found = get_json(http_port, f"/v1/services/{web}")
        return found[0] if found else None  # type: ignore[index]

    rec = wait_for(record, 20, message="the instance in the HTTP API")
    assert (rec["node"], rec.get("zone")) == ("flagnode", "zone-a"), rec
    wait_for(lambda: spread(first, 2)[f"{web}-1"] == 2, 20, message="routed on the first port")
    write("zone-b", second)
    proc.signal(signal.SIGHUP)
    wait_for(lambda: (record() or {}).get("zone") == "zone-b", 15, message="the new zone")
    wait_for(lambda: spread(second, 2)[f"{web}-1"] == 2, 20, message="routed on the new port")
    assert record()["node"] == "flagnode"  # type: ignore[index]
    config.write_text("[agent\n")  # broken: the last good configuration stays
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in proc.log(), 10, message="the error")
    assert spread(second, 2)[f"{web}-1"] == 2 and proc.alive
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "everything stopped" in proc.log()
