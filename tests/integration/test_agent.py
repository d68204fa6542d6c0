"""The agent end to end, against real dockerd and real etcd / ZooKeeper (both backends)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid

import pytest

from discovery.registry import Change, open_registry
from tests.harness.agent import (
    registry_instances,
    service_instances,
    wait_gone,
    wait_registered,
)
from tests.harness.docker_daemon import restart_dockerd
from tests.harness.dockerd import app_healthcheck, set_app_healthy
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.integration


def svc() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


def labels(service: str, port: int, **extra: str) -> dict[str, str]:
    out = {"discovery.service": service, "discovery.port": str(port),
           "discovery.check.interval": "200ms"}
    out.update({k.replace("_", "."): v for k, v in extra.items()})
    return out


def test_registered_only_once_healthy(registry_url, containers, start_agent):
    """Docker HEALTHCHECK followed; label http check followed; unhealthy never registered."""
    web, slow, sick = svc(), svc(), svc()
    agent = start_agent(registry_url)
    p1, p2, p3 = free_port(), free_port(), free_port()
    containers(name=f"{slow}-1", port=p2, labels=labels(slow, p2),
               env={"HEALTHY": "0"}, healthcheck=app_healthcheck(interval=0.2, retries=1))
    sick_c = containers(name=f"{sick}-1", port=p3, env={"HEALTHY": "0"},
                        labels=labels(sick, p3, discovery_check="http",
                                      discovery_check_path="/health"))
    containers(name=f"{web}-1", port=p1, labels=labels(web, p1, discovery_check="http",
                                                       discovery_check_path="/health"))
    [inst] = wait_registered(registry_url, web)
    assert (inst.address, inst.port, inst.node) == ("127.0.0.1", p1, agent.node)
    assert service_instances(registry_url, slow) == []
    assert service_instances(registry_url, sick) == []
    slow_c = next(c for c in containers.started if c.name == f"{slow}-1")
    set_app_healthy(slow_c, True)
    wait_registered(registry_url, slow)
    set_app_healthy(sick_c, True)
    wait_registered(registry_url, sick)
    set_app_healthy(sick_c, False)  # fall (default 2) failures → deregistered
    wait_gone(registry_url, sick, timeout=10)
    assert agent.alive


@pytest.mark.parametrize("stop_signal", [None, "SIGWINCH"])
def test_deregistered_within_a_second_of_docker_stop(registry_url, containers, start_agent,
                                                     stop_signal):
    """SIGWINCH: a stop signal that is not SIGTERM (httpd's image); the app ignores it and
    is killed after the stop timeout. Docker's kill event gives it as a number (28): it was
    not taken for a terminating signal, and the container stayed registered until its die."""
    web = svc()
    start_agent(registry_url)
    port = free_port()
    c = containers(name=f"{web}-1", port=port, labels=labels(web, port), stop_signal=stop_signal)
    wait_registered(registry_url, web)
    t0 = time.monotonic()
    stopper = threading.Thread(target=c.stop, kwargs={"timeout": 5})
    stopper.start()
    wait_gone(registry_url, web, timeout=1.0)
    assert time.monotonic() - t0 <= 1.0
    stopper.join()


def test_agent_sigkill_entries_expire(registry_url, containers, start_agent):
    web = svc()
    ttl = 3
    agent = start_agent(registry_url, None, "--ttl", str(ttl))
    port = free_port()
    containers(name=f"{web}-1", port=port, labels=labels(web, port))
    wait_registered(registry_url, web)
    t0 = time.monotonic()
    agent.signal(signal.SIGKILL)
    # Gone within TTL + 1 s of the kill: etcd revokes expired leases every 0.5 s, ZooKeeper
    # rounds session expiry up to its next tick (0.5 s here).
    wait_gone(registry_url, web, timeout=ttl + 1)
    took = time.monotonic() - t0
    assert 1.0 < took <= ttl + 1, f"gone after {took:.2f}s (too early: something else removed it)"


def test_sigterm_deregisters_everything_and_exits_zero(registry_url, containers, start_agent):
    web = svc()
    agent = start_agent(registry_url, None, "--ttl", "30")
    ports = [free_port(), free_port()]
    for n, port in enumerate(ports):
        containers(name=f"{web}-{n}", port=port, labels=labels(web, port))
    wait_registered(registry_url, web, count=2)
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=15) == 0
    assert service_instances(registry_url, web) == []  # at once, not after the 30 s TTL


def test_restart_cleans_dangling_and_keeps_live(registry_url, containers, start_agent):
    live, dead = svc(), svc()
    node = f"n{uuid.uuid4().hex[:8]}"
    first = start_agent(registry_url, node, "--ttl", "30")
    p1, p2 = free_port(), free_port()
    containers(name=f"{live}-1", port=p1, labels=labels(live, p1))
    doomed = containers(name=f"{dead}-1", port=p2, labels=labels(dead, p2))
    wait_registered(registry_url, live)
    wait_registered(registry_url, dead)
    first.kill()  # SIGKILL: its entries stay until the TTL
    doomed.remove(force=True)
    reader = open_registry(registry_url)
    changes: list[Change] = []
    watch = reader.watch(changes.append, reader.snapshot().revision)
    try:
        second = start_agent(registry_url, node, "--ttl", "30")
        wait_gone(registry_url, dead, timeout=10)  # cleaned by reconcile, long before the TTL
        wait_for(lambda: "reconcile done" in second.log(), timeout=10, message="a reconcile")
    finally:
        watch.stop()
        reader.close(revoke=False)
    [inst] = service_instances(registry_url, live)
    assert inst.node == node
    assert not [c for c in changes if c.kind == "delete" and c.key[0] == live], \
        "a live instance flapped while its agent restarted"


def test_bad_labels_skip_the_container_only(registry_url, containers, start_agent):
    good = svc()
    agent = start_agent(registry_url)
    hostile = {
        "newline": {"discovery.service": "web\nbackend evil"},
        "quote": {"discovery.service": 'web"x'},
        "huge": {"discovery.service": "a" * 100_000},
        "port": {"discovery.service": "okname", "discovery.port": "eighty"},
        "check": {"discovery.service": "okname2", "discovery.check": "telepathy"},
        "meta": {"discovery.service": "okname3", "discovery.meta.x": "a\r\nb"},
    }
    for n, (what, lab) in enumerate(hostile.items()):
        port = free_port()
        containers(name=f"bad-{what}-{uuid.uuid4().hex[:6]}-{n}", port=port,
                   labels={"discovery.port": str(port), **lab})
    port = free_port()
    containers(name=f"{good}-1", port=port, labels=labels(good, port))
    wait_registered(registry_url, good)
    names = {i.service for i in registry_instances(registry_url).values()}
    assert not names & {"okname", "okname2", "okname3"}
    assert all("\n" not in n and '"' not in n for n in names)
    wait_for(lambda: agent.log().count("skipping container bad-") >= len(hostile), timeout=10,
             message="one log line per bad container")
    assert agent.alive


def test_exec_check_runs_inside_the_container(registry_url, containers, start_agent):
    web = svc()
    start_agent(registry_url)
    port = free_port()
    command = '["test", "-f", "/tmp/www/ready"]'
    c = containers(name=f"{web}-1", port=port, labels=labels(
        web, port, discovery_check="exec", discovery_check_command=command,
        discovery_check_interval="1s"))  # the shortest an exec check may have
    other = svc()
    p2 = free_port()
    containers(name=f"{other}-1", port=p2, labels=labels(other, p2))
    wait_registered(registry_url, other)  # the agent is running checks by now
    assert service_instances(registry_url, web) == []
    c.exec_run(["touch", "/tmp/www/ready"])  # exists only inside the container
    wait_registered(registry_url, web)


def test_pause_and_unpause(registry_url, containers, start_agent):
    web = svc()
    start_agent(registry_url)
    port = free_port()
    c = containers(name=f"{web}-1", port=port, labels=labels(web, port))
    wait_registered(registry_url, web)
    c.pause()
    wait_gone(registry_url, web, timeout=5)
    c.unpause()
    wait_registered(registry_url, web)


def test_cluster_leader_sigkilled(cluster_url, containers, start_agent):
    """SIGKILL of the etcd leader / ZooKeeper leader: an election, no goodbye. What is
    registered stays registered past the TTL, and a new container is registered promptly."""
    cluster, url = cluster_url
    ttl = 5
    agent = start_agent(url, None, "--ttl", str(ttl))
    web = svc()
    p1, p2 = free_port(), free_port()
    containers(name=f"{web}-1", port=p1, labels=labels(web, p1))
    [first] = wait_registered(url, web)
    leader = cluster.wait_leader()
    killed_at = time.monotonic()
    cluster.kill_member(leader)
    try:
        containers(name=f"{web}-2", port=p2, labels=labels(web, p2))
        assert cluster.wait_leader(timeout=10) != leader
        dropped: list[set[str]] = []

        def ids_now() -> set[str]:
            ids = {i.id for i in service_instances(url, web)}  # raises while no quorum: not yet
            if first.id not in ids:
                dropped.append(ids)
            return ids

        # An election takes about a second (etcd: election timeout 1 s; ZooKeeper: tickTime
        # 0.5 s), the new container's first check 0.2 s: measured 2.1 s (etcd), 1.0 s (ZooKeeper).
        wait_for(lambda: len(ids_now()) == 2 or dropped, timeout=killed_at + 6 - time.monotonic(),
                 interval=0.1, message=f"{web}-2 registered within 6 s of the leader's SIGKILL")
        # The first instance is in every read until TTL + 1 s after the kill: an expired lease
        # or session (not carried over to the new leader) would have shown by then.
        wait_for(lambda: (ids_now() and time.monotonic() - killed_at > ttl + 1) or dropped,
                 timeout=ttl + 2, interval=0.1, message="TTL + 1 s after the kill")
        assert not dropped, f"{web}-1 missing from a read after the leader's SIGKILL: {dropped}"
        assert agent.alive
    finally:
        cluster.start_member(leader)


@pytest.mark.slow
def test_dockerd_restart_state_recovered(registry_url, containers, start_agent):
    web, gone = svc(), svc()
    agent = start_agent(registry_url, None, "--resync", "2")
    p1, p2 = free_port(), free_port()
    containers(name=f"{web}-1", port=p1, labels=labels(web, p1), restart_policy={"Name": "always"})
    containers(name=f"{gone}-1", port=p2, labels=labels(gone, p2))
    wait_registered(registry_url, web)
    wait_registered(registry_url, gone)
    restart_dockerd()
    wait_gone(registry_url, gone, timeout=30)  # not restarted by dockerd: must not linger
    wait_registered(registry_url, web, timeout=60)  # restarted by dockerd: back again
    assert agent.alive
    assert "reconnecting" in agent.log()


def test_sighup_rereads_the_config_file(registry_url, containers, start_agent, tmp_path):
    web = svc()
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\naddress = "127.0.0.1"\n')
    agent = start_agent(registry_url, None, "--config", str(conf))
    port = free_port()
    containers(name=f"{web}-1", port=port, labels=labels(web, port))
    [inst] = wait_registered(registry_url, web)
    assert inst.address == "127.0.0.1"
    conf.write_text('[agent]\naddress = "127.0.0.2"\n')
    agent.signal(signal.SIGHUP)
    wait_for(lambda: [i.address for i in service_instances(registry_url, web)] == ["127.0.0.2"],
             10, message="re-registered at the new address")
    conf.write_text("[agent]\nbogus = 1\n")  # a broken file: logged, the last config kept
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in agent.log(), 10, message="a clear error")
    assert agent.alive
    assert [i.address for i in service_instances(registry_url, web)] == ["127.0.0.2"]


def test_maintenance_and_events_go_on_while_the_registry_does_not_answer(
        etcd_single, etcd_url, containers, agents, tmp_path):
    """The etcd member stopped (SIGSTOP: it takes connections, answers nothing): the node's
    maintenance PUT answers at once and a container started meanwhile is checked; the first
    write fails after its timeout, the others are left to the reconcile, and all are written
    once the member answers. Before, each write waited its request's timeout (5 s) holding
    the agent's lock, and everything waited behind it (the PUT answered after 7.9 s)."""
    from tests.integration.test_http_auth import MAINT, call, start, token_file

    web = svc()
    path, token = token_file(tmp_path)
    port, node = start(agents, tmp_path, "agent", "--registry", etcd_url,
                       "--http-token-file", str(path))
    ports = [free_port() for _ in range(3)]
    for n, p in enumerate(ports[:2], 1):
        containers(name=f"{web}-{n}", port=p, labels=labels(web, p))
    wait_registered(etcd_url, web, 2)
    member = etcd_single.procs[0].popen
    assert member is not None
    os.kill(member.pid, signal.SIGSTOP)
    try:
        start_at = time.monotonic()
        assert call(port, "PUT", MAINT, {"X-Discovery-Token": token})[0] == 200  # two writes
        assert time.monotonic() - start_at < 1.0  # not the first write's 5 s
        containers(name=f"{web}-3", port=ports[2], labels=labels(web, ports[2]))
        wait_for(lambda: len([c for c in call(port, "GET", "/v1/agent/checks", timeout=1)[2]
                              if c["healthy"]]) == 3, 5,
                 message="the new container checked while the registry does not answer")
        wait_for(lambda: re.search(r"\d+ more registry writes left to the reconcile",
                                   agents[-1].log()), 10,
                 message="the first write failed, the others left to the reconcile")
    finally:
        os.kill(member.pid, signal.SIGCONT)
    wait_for(lambda: sorted(i.state.value for i in service_instances(etcd_url, web))
             == ["draining"] * 3, 15, message="all written, in maintenance")
    assert all(i.node == node for i in service_instances(etcd_url, web))
