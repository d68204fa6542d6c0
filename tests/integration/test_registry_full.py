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

The registry's lease keeper, refused the same way: a lease revoked from outside while etcd is
full (a new one refused: NOSPACE), and a new lease granted but the rewrite of the instances
refused (its role lost write permission). Each is tried again after 0.8 s, the wait doubling
(±25 %) to 30 s, and logged as a warning; before, every 0.8 s (±50 %) forever, at DEBUG
(measured here in 10 s: 13 to 15 grants, all refused; 11 to 14 rewrites and as many renewals).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery.model import Instance
from discovery.registry import open_registry
from tests.harness.agent import AgentProcess, wait_registered
from tests.harness.dockerd import ContainerFactory
from tests.harness.haproxy import http_get
from tests.harness.registries import no_write_back
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
TTL = 6.0  # the lease keeper's tests: a renewal every 2 s
KEEPER_WINDOW = 10.0  # seconds measured after the keeper's first refusal
#: the keeper's tries within KEEPER_WINDOW: 0.8, 2.4, 5.6 s (nominal, ±25 %) after the first
#: refusal (3), with margin; before, one every 0.8 s ±50 % (13)
MAX_KEEPER_TRIES = 5
REFUSED = "PermissionDenied"  # etcd's grpc_code for a write the role does not permit
WEB = Instance(service="web", id="node-1:000000000001:80", node="node-1", address=HOST,
               port=8001, registered_at=1.0)


@pytest.fixture
def quota_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A single etcd of its own (no other test shares it) with a QUOTA, not full yet."""
    cluster = EtcdCluster(1, tmp_path / "etcd", extra=("--quota-backend-bytes", str(QUOTA)))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def full_etcd(quota_etcd: EtcdCluster) -> EtcdCluster:
    """``quota_etcd`` with its NOSPACE alarm raised."""
    _fill_to_alarm(quota_etcd)
    return quota_etcd


def _fill_to_alarm(cluster: EtcdCluster) -> None:
    client = _client(cluster)
    try:
        filled = _fill(client)
        alarms = list(client.list_alarms())
    finally:
        client.close()
    assert alarms, f"no alarm after {filled} puts of {len(FILL_VALUE)} B"


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
        return log.count("reconcile done"), len(refused.findall(log)), full_etcd.grpc_counts()

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


def _keeper_waits(caplog: pytest.LogCaptureFixture, cause: str) -> list[float]:
    """The waits the keeper's warnings named, for refusals that say ``cause``."""
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and r.name.startswith("discovery.registry") and cause in r.getMessage()]
    return [float(w) for m in said for w in re.findall(r"tries again in (\S+) s", m)]


def _counted(cluster: EtcdCluster, since: dict[str, float], *methods: str,
             name: str = "grpc_server_handled_total", code: str = "") -> dict[str, float]:
    now = cluster.grpc_counts(name, code=code)
    return {m: now.get(m, 0.0) - since.get(m, 0.0) for m in methods}


def test_a_new_lease_refused_is_asked_for_rarely_not_every_second(
        quota_etcd: EtcdCluster, caplog: pytest.LogCaptureFixture) -> None:
    """An instance registered, etcd filled to NOSPACE, the lease revoked from outside: the
    keeper asks for a new lease 0.8 s after the first refusal, the wait doubling (each
    refusal a warning that names the cause), not every 0.8 s forever; once space is freed
    the instance is back at the next try."""
    caplog.set_level(logging.WARNING, logger="discovery.registry")
    prefix = unique_prefix()
    reg = open_registry(quota_etcd.url(prefix), ttl=TTL, timeout=2.0, environ={})
    client = _client(quota_etcd)
    try:
        reg.register(WEB)
        leases = {meta.lease_id for _, meta in client.get_prefix(prefix + "/")}
        assert len(leases) == 1 and 0 not in leases, leases
        _fill_to_alarm(quota_etcd)
        before = quota_etcd.grpc_counts()
        client.revoke_lease(leases.pop())
        wait_for(lambda: _counted(quota_etcd, before, "LeaseGrant")["LeaseGrant"], 10,
                 message="the keeper's first try of a new lease")
        first = quota_etcd.grpc_counts()
        time.sleep(KEEPER_WINDOW)
        sent = _counted(quota_etcd, first, "LeaseGrant", "Txn", "LeaseKeepAlive")
        waits = _keeper_waits(caplog, NOSPACE)
        print(f"in {KEEPER_WINDOW:g} s after the first refused grant etcd answered {sent}; "
              f"the keeper's waits: {waits}")
        assert 2 <= sent["LeaseGrant"] <= MAX_KEEPER_TRIES, sent
        assert sent["Txn"] == 0, sent  # nothing to write under no lease
        assert len(waits) >= 3 and waits == sorted(waits) and waits[0] < 1.5, waits

        _free_space(quota_etcd)
        freed = time.monotonic()
        wait_for(lambda: WEB.key in reg.snapshot().instances, _keeper_waits(caplog, NOSPACE)[-1]
                 + 3.0, message="the instance registered again at the keeper's next try")
        print(f"registered again {time.monotonic() - freed:.2f} s after space was freed")
    finally:
        client.close()
        reg.close()


def test_a_rewrite_refused_is_tried_rarely_and_the_lease_renewed(tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An instance registered by a user whose role then loses write permission, its lease
    revoked: the keeper's new lease is granted, the rewrite refused; the rewrite is tried
    again 0.8 s later, the wait doubling, while the new lease is renewed every TTL/3 as in
    steady state (before: a rewrite and a renewal every 0.8 s, forever)."""
    from tests.harness.secure import AuthEtcd

    caplog.set_level(logging.WARNING, logger="discovery.registry")
    cluster = AuthEtcd(1, tmp_path / "etcd")
    reg = None
    try:
        cluster.start()
        root = ("--user", f"root:{cluster.ROOT_PASSWORD}")
        prefix = cluster.USER_PREFIX + unique_prefix()
        reg = open_registry(cluster.url_as(cluster.USER, cluster.USER_PASSWORD, prefix),
                            ttl=TTL, timeout=2.0, environ={})
        reg.register(WEB)
        # the keeper's tries alone: its watch of its own key (etcd_own) would see the revoke's
        # delete and try a write-back, refused too (test_registry_written_back.py covers it)
        no_write_back(reg)
        where = ("--prefix=true", cluster.USER_PREFIX + "/")
        cluster.etcdctl("role", "revoke-permission", "agents", *where, *root)
        cluster.etcdctl("role", "grant-permission", "agents", "read", *where, *root)
        leases = cluster.etcdctl("lease", "list", *root).split()[3:]  # found N leases ...
        assert len(leases) == 1, leases
        before = cluster.grpc_counts(code=REFUSED)
        cluster.etcdctl("lease", "revoke", leases[0], *root)
        wait_for(lambda: _counted(cluster, before, "Txn", code=REFUSED)["Txn"], 10,
                 message="the keeper's first rewrite under a new lease")
        first, first_refused = cluster.grpc_counts(), cluster.grpc_counts(code=REFUSED)
        first_messages = cluster.grpc_counts("grpc_server_msg_received_total")
        time.sleep(KEEPER_WINDOW)
        # the rewrites etcd refused: a Txn its idle token had lost first (TOKEN_TTL 2 s, etcd
        # answers Unauthenticated) is sent again at once with a new token, the same try
        sent = {**_counted(cluster, first, "LeaseGrant"),
                **_counted(cluster, first_refused, "Txn", code=REFUSED)}
        renewals = _counted(cluster, first_messages, "LeaseKeepAlive",
                            name="grpc_server_msg_received_total")["LeaseKeepAlive"]
        waits = _keeper_waits(caplog, "permission denied")
        print(f"in {KEEPER_WINDOW:g} s after the first refused rewrite etcd answered {sent}, "
              f"{renewals:g} renewals; the keeper's waits: {waits}")
        assert 2 <= sent["Txn"] <= MAX_KEEPER_TRIES, sent
        assert sent["LeaseGrant"] == 0, sent  # the new lease is kept...
        # ...renewed every TTL/3 (±10 %), and with each rewrite (before: every 0.8 s)
        steady = KEEPER_WINDOW / (TTL / 3)
        assert steady / 1.1 - 1 <= renewals <= steady / 0.9 + sent["Txn"] + 1, renewals
        assert len(waits) >= 3 and waits == sorted(waits) and waits[0] < 1.5, waits
    finally:
        if reg is not None:
            reg.close(revoke=False)
        cluster.stop()
