"""A registry that answers reads but refuses writes: a real etcd out of space (NOSPACE).

A dedicated single-member etcd with a small ``--quota-backend-bytes`` is filled by raw puts
until one is refused with ``etcdserver: mvcc: database space exceeded`` (etcd raises its
NOSPACE alarm: every put, transaction with a put and lease grant is refused from then on,
reads are served). A real agent next to a real container whose check passes then tries to
register it, and is refused. Each retry is a reconcile: a read of the node's index, then the
write again. They must come after 0.25 s, the wait doubling (commit 2241d85); before, each
refusal woke the loop at once and the agent read and wrote at the round-trip rate, forever.
Counted twice: the agent's own log (``reconcile done``, one per node read) and etcd's
``grpc_server_handled_total`` (what the registry was sent). The agent's /metrics has no
such counter (``discovery_registry_read_bytes_total`` stays 0: the node's index is empty).
Once space is freed and the alarm disarmed, the instance is registered at the next retry.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agent import AgentProcess, wait_registered
from tests.harness.dockerd import ContainerFactory
from tests.harness.haproxy import http_get
from tests.harness.servers import HOST, EtcdCluster, unique_prefix
from tests.harness.util import free_port, require_tool, wait_for

pytestmark = pytest.mark.integration

QUOTA = 2 * 1024 * 1024  # etcd's backend quota: full after ~100 puts of FILL_VALUE
FILL_VALUE = b"x" * 64 * 1024
FILL_PREFIX = "/filler/"
NOSPACE = "database space exceeded"
WINDOW = 4.0  # seconds measured after the first refused write
#: reconciles within WINDOW: 0.25, 0.75, 1.75, 3.75 s after the first refusal (4), with margin;
#: before 2241d85 it was hundreds (one per round trip)
MAX_RETRIES = 8


@pytest.fixture
def full_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A single etcd of its own (no other test shares it) whose NOSPACE alarm is raised."""
    cluster = EtcdCluster(1, tmp_path / "etcd", extra=("--quota-backend-bytes", str(QUOTA)))
    try:
        cluster.start()
        client = _client(cluster)
        try:
            filled = _fill(client)
            alarms = list(client.list_alarms())
        finally:
            client.close()
        assert alarms, f"no alarm after {filled} puts of {len(FILL_VALUE)} B"
        yield cluster
    finally:
        cluster.stop()


def _client(cluster: EtcdCluster) -> Any:
    import pyetcd

    return pyetcd.client(HOST, cluster.client_ports[0], timeout=5)


def _fill(client: Any) -> int:
    """Raw puts until etcd refuses one for want of space: how many went in."""
    for n in range(2000):
        try:
            client.put(f"{FILL_PREFIX}{n:06d}", FILL_VALUE)
        except Exception as exc:
            assert NOSPACE in str(exc), exc
            return n
    raise AssertionError(f"etcd took {n + 1} puts of {len(FILL_VALUE)} B under a {QUOTA} B quota")


def _free_space(cluster: EtcdCluster) -> None:
    """What an operator does: delete the filler, compact, defragment, disarm the alarm."""
    client = _client(cluster)
    try:
        client.delete_prefix(FILL_PREFIX)
        client.compact(int(client.get_response("/").header.revision), physical=True)
    finally:
        client.close()
    etcdctl = require_tool("etcdctl", "etcd-client")
    endpoint = f"{HOST}:{cluster.client_ports[0]}"
    for args in (("defrag",), ("alarm", "disarm")):
        out = subprocess.run([etcdctl, "--endpoints", endpoint, "--dial-timeout", "5s", *args],
                             capture_output=True, text=True, timeout=30,
                             env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, (args, out.stderr)


def etcd_handled(cluster: EtcdCluster) -> dict[str, float]:
    """etcd's own count of the gRPC calls it answered, by method (every code summed)."""
    url = f"http://{HOST}:{cluster.client_ports[0]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^grpc_server_handled_total\{([^}]*)\} (\S+)$', text, re.M):
        method = re.search(r'grpc_method="([^"]+)"', m.group(1))
        if method:
            out[method.group(1)] = out.get(method.group(1), 0.0) + float(m.group(2))
    return out


def metric(port: int, name: str) -> float:
    status, text = http_get(port, "/metrics")
    assert status == 200
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_refused_writes_are_retried_rarely_not_per_round_trip(
        full_etcd: EtcdCluster, containers: ContainerFactory,
        start_agent: Callable[..., AgentProcess]) -> None:
    """A container whose check passes, its registration refused by a full etcd: in WINDOW s
    a few reconciles and writes (0.25 s, doubling), not one per round trip; registered at
    the next retry once space is freed."""
    url = full_etcd.url(unique_prefix())
    http, app = free_port(), free_port()
    web = f"s{uuid.uuid4().hex[:10]}"
    agent = start_agent(url, None, "--http", f"{HOST}:{http}")
    containers(name=f"{web}-1", port=app, labels={
        "discovery.service": web, "discovery.port": str(app), "discovery.check.interval": "200ms"})
    refused = re.compile(rf"registry write for {web}/\S+ failed \([^\n]*{NOSPACE}")

    def counts() -> tuple[int, int, dict[str, float]]:
        log = agent.log()
        return log.count("reconcile done"), len(refused.findall(log)), etcd_handled(full_etcd)

    wait_for(lambda: refused.search(agent.log()), 30, message="a write refused for want of space")
    reconciles0, refusals0, etcd0 = counts()
    time.sleep(WINDOW)  # the measurement: what the agent sends a full registry in WINDOW s
    reconciles1, refusals1, etcd1 = counts()
    reconciles, refusals = reconciles1 - reconciles0, refusals1 - refusals0
    sent = {k: etcd1.get(k, 0.0) - etcd0.get(k, 0.0) for k in ("Range", "LeaseGrant", "Txn")}
    print(f"in {WINDOW:g} s of NOSPACE: {reconciles} reconciles, {refusals} refused writes; "
          f"etcd answered {sent}")
    assert agent.alive
    assert 2 <= reconciles <= MAX_RETRIES, (reconciles, refusals, sent)
    assert refusals <= MAX_RETRIES, (reconciles, refusals, sent)
    assert sent["Range"] <= MAX_RETRIES + 2, sent  # the node reads (and a pulse's, if any)
    assert sent["LeaseGrant"] + sent["Txn"] <= MAX_RETRIES, sent  # the refused writes
    assert metric(http, "discovery_registry_connected") == 1.0  # reads are answered
    assert metric(http, "discovery_registrations_total") == 0.0

    _free_space(full_etcd)
    waits = re.findall(r"a reconcile tries again in (\S+) s", agent.log())
    assert waits, "no retry scheduled"
    freed = time.monotonic()
    wait_registered(url, web, timeout=float(waits[-1]) + 1.0)  # the next retry, not a resync
    print(f"registered {time.monotonic() - freed:.2f} s after the alarm was disarmed "
          f"(the wait then: {waits[-1]} s)")
    assert metric(http, "discovery_registrations_total") == 1.0
